"""The server as a process: SIGTERM drains and exits 0; models that cannot be served are clear errors."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from conftest import make_checkpoint
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import api
from protos.charrnn.v1 import charrnn_pb2 as pb
from serve.backends import BackendError, load_runtimes, ort_providers
from serve.config import ServerConfig
from serve.background import BackgroundServer
from serve.server import StartError, main

ROOT = Path(__file__).resolve().parents[1]


def start_server(models: Path, *args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`python -m serve` on a free port; returns the process, its address and its log lines so far."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--models", str(models), "--port", "0", "--http-port", "0", *args],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, f"127.0.0.1:{m.group(1)}", lines
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def test_sigterm_drains_and_exits_0(tmp_path):
    ckpt = make_checkpoint(tmp_path / "models", cell="gru")
    model = ckpt.name
    proc, target, log = start_server(tmp_path / "models", "--grace-s", "2", "--max-chars", "1000000", "--threads", "1")
    try:
        channel = grpc.insecure_channel(target)
        stub = api.stub(target)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        long = stub.Generate(api.generate_request(model, "the ", 1_000_000), timeout=30)  # cannot finish in grace
        short = stub.Generate(api.generate_request(model, "the ", 300, chunk_chars=10), timeout=30)
        assert next(long).text and next(short).text  # both in flight
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(api.generate_request(model, "the ", 5), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        try:
            assert list(short)[-1].finish_reason == pb.FINISH_REASON_LENGTH  # finished within the grace period
        except grpc.RpcError as e:
            raise AssertionError(f"{time.monotonic() - t0:.3f}s {e}\n{''.join(log)}")
        with pytest.raises(grpc.RpcError) as cut:
            for _ in long:
                pass
        assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert proc.wait(timeout=30) == 0
        assert 1.5 < time.monotonic() - t0 < 20  # the long stream had its grace period, then was cancelled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "draining" in "".join(log)


def test_unservable_model_directories_are_clear_errors(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match="no models for the torch backend"):
        load_runtimes(tmp_path / "empty", "torch")
    with pytest.raises(BackendError, match="no models for the onnxruntime backend"):
        load_runtimes(tmp_path / "empty", "onnxruntime")
    assert main(["--models", str(tmp_path / "empty")]) == 2
    assert "no models" in caplog.text
    broken = tmp_path / "broken" / "lstm-h8-fc1-s1"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(BackendError, match="unreadable JSON"):
        load_runtimes(tmp_path / "broken", "torch")
    with pytest.raises(BackendError, match="unreadable JSON"):  # the same, said by a worker process
        BackgroundServer(ServerConfig(models=tmp_path / "broken", port=0, http_port=0, workers=1))


def test_a_directory_of_exports_without_backend_hints_at_it(tmp_path, caplog):
    """python -m serve --models exports (ONNX files, not checkpoints) without --backend says which backend."""
    model = tmp_path / "exports" / "lstm-h8-fc1-s1"
    model.mkdir(parents=True)
    (model / "model.onnx").write_bytes(b"not read: the hint comes from the file's name")
    assert main(["--models", str(tmp_path / "exports")]) == 2
    assert "--backend onnxruntime" in caplog.text


def test_tensorrt_backend_without_tensorrt_says_so(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(BackendError, match="TensorRT"):
        load_runtimes(tmp_path, "tensorrt")


def test_onnxruntime_providers():
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    assert ort_providers("")[-1] == "CPUExecutionProvider"
    with pytest.raises(BackendError, match="unknown provider"):
        ort_providers("tpu")


def test_models_are_served_by_directory_name(tmp_path):
    ckpt = make_checkpoint(tmp_path, cell="rnn", hidden=8)
    assert list(load_runtimes(ckpt, "torch")) == [ckpt.name]  # a single model's directory
    shutil.copytree(ckpt, tmp_path / f"{ckpt.name}-variant")  # e.g. an fp16 export beside the fp32 one
    assert sorted(load_runtimes(tmp_path, "torch")) == [ckpt.name, f"{ckpt.name}-variant"]


def test_a_taken_port_is_an_error(tmp_path):
    ckpt = make_checkpoint(tmp_path, cell="rnn", hidden=8)
    with BackgroundServer(ServerConfig(models=ckpt, port=0, http_port=0)) as bg:
        with pytest.raises(StartError, match="cannot listen"):
            BackgroundServer(ServerConfig(models=ckpt, port=bg.server.port, http_port=0))
