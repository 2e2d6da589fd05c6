"""End to end: the real server (`python -m serve`, its own process on a free loopback port) driven by the
load generator (clients.loadgen) at several concurrencies and message sizes.

The server and the load generator each run in a process of its own, so that they share no interpreter
(and no GIL); on a small machine they still share cores. `cpus` keeps each on CPUs of its own (the
server's worker processes inherit its set), and the report says where each ran and how many cores each kept
busy. Readiness is the standard gRPC health check saying SERVING.
"""
from __future__ import annotations

import json
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


def module_command(module: str, args: list[str], cpus: tuple[int, ...] = ()) -> list[str]:
    """argv running `python -m module args`, on `cpus` only when given (set before the module is imported,
    so every thread and child process it starts inherits it)."""
    if not cpus:
        return [sys.executable, "-m", module, *args]
    pin = ("import os, runpy, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
           "sys.argv = sys.argv[2:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", pin, ",".join(map(str, cpus)), module, *args]


def cpu_seconds(pid: int) -> dict[str, float] | None:
    """CPU time (user + system) used so far by a process ("front") and by its child processes together
    ("workers": the server's model workers), read from /proc; None where there is no /proc."""
    try:
        front = _cpu_s(Path(f"/proc/{pid}/stat").read_text())
        procs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return None
    workers = 0.0
    for p in procs:
        try:
            stat = (p / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # its parent
            workers += _cpu_s(stat)
    return {"front": front, "workers": workers}


def _cpu_s(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces: state, ppid, ...
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpus_of(pid: int) -> list[int] | None:
    """The CPUs a running process may use (None where the system cannot say)."""
    return sorted(os.sched_getaffinity(pid)) if hasattr(os, "sched_getaffinity") else None


def _env(threads: int) -> dict:
    # torch's intra-op threads follow OMP_NUM_THREADS at import; onnxruntime's follow --threads
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


class ServerFailed(Exception):
    """The server did not start or died; the message ends with its log's last lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(models, backend, ...) as target:` -- a served model at target ('127.0.0.1:PORT')."""

    module = "serve"

    def __init__(self, models: Path, backend: str, providers: str = "", threads: int = 1, log_dir: Path = Path("."),
                 max_batch: int = 64, start_timeout_s: float = 120.0, cpus: tuple[int, ...] = (), http: bool = False):
        self.args = ["--models", str(models), "--backend", backend, "--threads", str(threads), "--host", "127.0.0.1",
                     "--max-batch", str(max_batch), "--grace-s", "1"]
        self.http, self.http_url = http, ""  # http: its HTTP port too (serve.http), at http_url
        self.args += ["--providers", providers] if providers else []
        self.threads, self.start_timeout_s, self.cpus = threads, start_timeout_s, cpus
        self.log_path = Path(log_dir) / f"server-{backend}-{providers or 'default'}-{os.getpid()}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> str:
        pin = f"taskset -c {','.join(map(str, self.cpus))} " if self.cpus else ""
        http = ["--http-port", "HTTP_PORT" if self.http else "0"] if self.module == "serve" else []
        return pin + f"python -m {self.module} " + " ".join(self.args + ["--port", "PORT", *http])

    def __enter__(self) -> str:
        for attempt in range(2):  # a free port can be taken between asking and binding: then once more
            port, http_port = free_port(), free_port() if self.http else 0
            self.http_url = f"http://127.0.0.1:{http_port}" if self.http else ""
            ports = ["--port", str(port)] + (["--http-port", str(http_port)] if self.module == "serve" else [])
            with open(self.log_path, "wb") as out:
                self.proc = subprocess.Popen(module_command(self.module, [*self.args, *ports], self.cpus),
                                             stdout=out, stderr=subprocess.STDOUT, env=_env(self.threads), cwd=ROOT)
            self.target = target = f"127.0.0.1:{port}"
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


class FloorProcess(ServerProcess):
    """The gRPC floor (serve.bench.floor: the service with no model behind it) in the server's place."""

    module = "serve.bench.floor"

    def __init__(self, log_dir: Path = Path("."), cpus: tuple[int, ...] = (), start_timeout_s: float = 30.0):
        self.args = ["--host", "127.0.0.1"]
        self.http, self.http_url = False, ""
        self.threads, self.start_timeout_s, self.cpus = 1, start_timeout_s, cpus
        self.log_path = Path(log_dir) / f"floor-{os.getpid()}.log"
        self.proc = None


def client_processes(cpus: tuple[int, ...], server_cpus: tuple[int, ...], concurrency: int) -> int:
    """Load generator processes: one per CPU of its own (at most one per stream); one where it shares the
    server's CPUs, whose cores a second client process would only take from the server."""
    return min(len(cpus), concurrency) if cpus and server_cpus and not set(cpus) & set(server_cpus) else 1


def drive(server: ServerProcess, concurrency: int, requests: int, max_chars: int, chunk_chars: int = 1,
          coalesce: bool = False, warmup: int = 2, cpus: tuple[int, ...] = (), work_dir: Path = Path("."),
          http: bool = False) -> dict:
    """`python -m clients.loadgen` (its own process, on `cpus` when given) against the running server:
    `concurrency` streams in flight, `requests` in all, each asking for `max_chars` characters streamed
    `chunk_chars` per message (or more, coalescing), sampled at loadgen's defaults; on CPUs apart from the
    server's, in one process per CPU (one Python gRPC client tops out at about a core). Its JSON result, with
    the settings it ran with and the CPU time the server used while the load generator timed (`server_cpu_s`:
    from loadgen's line saying it starts timing to its exit; None without /proc). http: the same requests to the
    server's HTTP port (`--http`; streams there always coalesce)."""
    out = Path(work_dir) / f"loadgen-{os.getpid()}.json"
    processes = client_processes(cpus, server.cpus, concurrency)
    args = [*(["--http", server.http_url] if http else ["--target", server.target]), "--concurrency", str(concurrency), "--requests", str(requests), "--max-chars",
            str(max_chars), "--chunk-chars", str(chunk_chars), "--warmup", str(warmup), "--timeout", "600",
            "--processes", str(processes), "--out", str(out)] + (["--coalesce"] if coalesce else [])
    before, lines = None, []
    with subprocess.Popen(module_command("clients.loadgen", args, cpus), env=_env(1), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if before is None and line.startswith(loadgen.TIMING):
                before = cpu_seconds(server.proc.pid)
    after = cpu_seconds(server.proc.pid)  # the server is idle again once the timed requests are done
    if not out.exists():
        raise RuntimeError(f"clients.loadgen exited with code {proc.returncode}: {''.join(lines).strip()[-500:]}")
    result = json.loads(out.read_text())
    out.unlink()
    result["loadgen_args"] = {k: result[k] for k in ("temperature", "top_k", "chunk_chars", "warmup", "processes")}
    result["server_cpu_s"] = {k: after[k] - before[k] for k in after} if before and after else None
    return result
