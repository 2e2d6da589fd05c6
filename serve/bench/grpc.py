"""End to end: the real server (`python -m serve`, its own process on a free loopback port) driven by the
load generator (clients.loadgen) at several concurrencies and message sizes.

The server runs in a process of its own so that its event loop, scheduler thread and runtime do not
share an interpreter (and a GIL) with the load generator; on a small machine they still share cores,
and the report says how many. Readiness is the standard gRPC health check saying SERVING.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import loadgen

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the repository: python -m serve must import from it


class ServerFailed(Exception):
    """The server did not start or died; the message ends with its log's last lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(models, backend, ...) as target:` -- a served model at target ('127.0.0.1:PORT')."""

    def __init__(self, models: Path, backend: str, providers: str = "", threads: int = 1, log_dir: Path = Path("."),
                 max_batch: int = 64, start_timeout_s: float = 120.0):
        self.args = ["--models", str(models), "--backend", backend, "--threads", str(threads), "--host", "127.0.0.1",
                     "--max-batch", str(max_batch), "--grace-s", "1"]
        self.args += ["--providers", providers] if providers else []
        self.threads, self.start_timeout_s = threads, start_timeout_s
        self.log_path = Path(log_dir) / f"server-{backend}-{providers or 'default'}-{os.getpid()}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> str:
        return "python -m serve " + " ".join(self.args + ["--port", "PORT"])

    def __enter__(self) -> str:
        # torch's intra-op threads follow OMP_NUM_THREADS at import; onnxruntime's follow --threads
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        for attempt in range(2):  # a free port can be taken between asking and binding: then once more
            port = free_port()
            with open(self.log_path, "wb") as out:
                self.proc = subprocess.Popen([sys.executable, "-m", "serve", *self.args, "--port", str(port)],
                                             stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            target = f"127.0.0.1:{port}"
            try:
                self._wait_serving(target)
                return target
            except ServerFailed:
                self._stop()
                if attempt or "cannot listen" not in self._log_tail():
                    raise
        raise AssertionError("unreachable")

    def __exit__(self, *exc) -> None:
        self._stop()

    def _wait_serving(self, target: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerFailed(f"the server exited with code {self.proc.returncode}: {self._log_tail()}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise ServerFailed(f"the server was not SERVING after {self.start_timeout_s:.0f} s: {self._log_tail()}")

    def _stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # drain and stop, as in production
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


def drive(target: str, concurrency: int, requests: int, max_chars: int, chunk_chars: int = 1,
          warmup: int = 2) -> dict:
    """clients.loadgen against target: `concurrency` streams in flight, `requests` in all, each asking for
    `max_chars` characters streamed `chunk_chars` per message, sampled at loadgen's defaults."""
    args = loadgen.parse_args(["--target", target, "--concurrency", str(concurrency), "--requests", str(requests),
                               "--max-chars", str(max_chars), "--chunk-chars", str(chunk_chars),
                               "--warmup", str(warmup), "--timeout", "600"])
    result = asyncio.run(loadgen.run(args))
    result["loadgen_args"] = {k: getattr(args, k) for k in ("temperature", "top_k", "chunk_chars", "warmup")}
    return result
