"""onnxruntime's GPU providers without a GPU: the options we give them (TensorRT profiles), the check that the
provider asked for is the one that runs (onnxruntime falls back to the CPU quietly), and TF32 for fp32 parity.

onnxruntime.InferenceSession is replaced by a stand-in that records what it was given and answers as a
session that fell back to the CPU does, which is what a machine with onnxruntime-gpu and broken CUDA sees."""
import os

import numpy as np
import pytest

from conftest import make_checkpoint
from export.onnx import export_onnx
from export.parity import ParitySpec
from export.runtime import (SERVER_PROFILES, OrtRuntime, Profiles, ProviderUnavailable, fp32_math,
                            ort_trt_options)

QUICK = ParitySpec(batches=(2,), prefills=(5,), steps=10)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("providers")
    return {cell: export_onnx(make_checkpoint(root / "runs", cell=cell), root / "exports" / cell, parity=QUICK)
            for cell in ("lstm", "gru")}


class FallbackSession:
    """An InferenceSession whose GPU providers did not load: get_providers() is what is left (CPU)."""

    made = []

    def __init__(self, path, opts=None, providers=None):
        self.path, self.providers = path, providers
        FallbackSession.made.append(self)

    def get_providers(self):
        return ["CPUExecutionProvider"]


@pytest.fixture
def gpu_onnxruntime(monkeypatch):
    """onnxruntime as with its GPU build installed but CUDA not loading; returns the preload_dlls calls."""
    import onnxruntime as ort

    FallbackSession.made = []
    preloads = []
    monkeypatch.setattr(ort, "InferenceSession", FallbackSession)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **kw: preloads.append(a), raising=False)
    return preloads


# --- profiles ---------------------------------------------------------------------------------------

def test_tensorrt_provider_options_name_both_profiles():
    opts = ort_trt_options(32, 2, Profiles(max_batch=16, max_prefill=100), cache_dir="/tmp/c")
    assert opts["trt_profile_min_shapes"] == "tokens:1x1,h_in:1x32,c_in:1x32,tokens:1x1,h_in:1x32,c_in:1x32"
    assert opts["trt_profile_opt_shapes"] == "tokens:8x1,h_in:8x32,c_in:8x32,tokens:8x64,h_in:8x32,c_in:8x32"
    assert opts["trt_profile_max_shapes"] == ("tokens:16x1,h_in:16x32,c_in:16x32,"
                                              "tokens:16x100,h_in:16x32,c_in:16x32")
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == "/tmp/c"
    assert "trt_fp16_enable" not in opts  # it would build weakly typed; the fp16 ONNX carries its types
    gru = ort_trt_options(8, 1)
    assert gru["trt_profile_max_shapes"] == "tokens:256x1,h_in:256x8,tokens:256x1024,h_in:256x8"
    assert "trt_engine_cache_path" not in gru


def test_server_profiles_cover_the_servers_defaults():
    from serve.config import ServerConfig

    cfg = ServerConfig(models=".")
    assert SERVER_PROFILES.max_batch >= cfg.max_batch and SERVER_PROFILES.max_prefill >= cfg.prefill_chunk


def test_benchmark_tensorrt_profiles_are_tuned_for_what_it_times():
    from types import SimpleNamespace

    from serve.bench.backends import bench_profiles, ort_providers

    model = SimpleNamespace(cell="lstm", hidden_size=64)  # all ort_providers reads of a BenchModel
    (name, trt), cuda, cpu = ort_providers("ort-trt", model, "fp16", "/tmp/cache", max_batch=256)
    assert name == "TensorrtExecutionProvider" and cpu == "CPUExecutionProvider"
    assert trt == ort_trt_options(64, 2, bench_profiles(256), "/tmp/cache")
    assert trt["trt_profile_opt_shapes"].startswith("tokens:64x1,h_in:64x64,c_in:64x64,tokens:64x64,")
    assert trt["trt_profile_max_shapes"].startswith("tokens:256x1,")
    assert bench_profiles(8).opt_batch == 8


# --- the provider asked for is the one that runs ------------------------------------------------------

def test_a_bare_tensorrt_provider_gets_profiles_and_gpu_libraries_are_preloaded(onnx_files, gpu_onnxruntime):
    rt = OrtRuntime(onnx_files["lstm"], ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    (session,) = FallbackSession.made
    (name, opts), cpu = session.providers
    assert name == "TensorrtExecutionProvider" and opts == ort_trt_options(32, 2)
    assert gpu_onnxruntime == [()]  # onnxruntime.preload_dlls() before the session
    assert rt.providers == ["CPUExecutionProvider"] and not rt.bind  # not strict: it runs where it landed
    OrtRuntime(onnx_files["lstm"], ["CPUExecutionProvider"])
    assert gpu_onnxruntime == [()]  # not for the CPU


def test_strict_runtime_refuses_a_quiet_fallback(onnx_files, gpu_onnxruntime):
    with pytest.raises(ProviderUnavailable, match="did not load CUDAExecutionProvider"):
        OrtRuntime(onnx_files["gru"], ["CUDAExecutionProvider", "CPUExecutionProvider"], strict=True)


def test_server_fails_loudly_when_cuda_does_not_load(onnx_files, gpu_onnxruntime):
    from serve.backends import BackendError, load_runtimes, open_runtime, resolve_providers

    root = onnx_files["gru"].parent.parent
    for spec in ("CUDA", "tensorrt,cuda", ""):  # "": the default picks CUDA, which onnxruntime lists
        with pytest.raises(BackendError, match="did not load .*--providers CPU"):
            load_runtimes(root, "onnxruntime", spec)
    rt = open_runtime(onnx_files["gru"], "onnxruntime", resolve_providers("onnxruntime", "CPU"))
    assert rt.providers == ["CPUExecutionProvider"]


def test_export_check_skips_a_provider_that_falls_back(onnx_files, gpu_onnxruntime, monkeypatch, capsys):
    import json

    from export.check import Skip, main, ort_runtime

    with pytest.raises(Skip, match="did not load TensorrtExecutionProvider"):
        ort_runtime(onnx_files["lstm"], "tensorrt")
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "")
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE")
    assert main([str(onnx_files["lstm"].parent), "--provider", "cuda", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "skipped" and "did not load CUDAExecutionProvider" in row["note"]
    assert os.environ["NVIDIA_TF32_OVERRIDE"] == "0"  # set before any GPU session of the run


# --- TF32 ---------------------------------------------------------------------------------------------

def test_fp32_math_turns_tf32_off_unless_told_otherwise(monkeypatch):
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "")
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE")
    assert fp32_math() and os.environ["NVIDIA_TF32_OVERRIDE"] == "0"
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
    assert not fp32_math() and os.environ["NVIDIA_TF32_OVERRIDE"] == "1"  # the user's choice stands, reported


def test_iobinding_state_stays_in_ortvalues(onnx_files):
    import onnxruntime as ort

    rt = OrtRuntime(onnx_files["lstm"], bind=True)
    state = rt.new_state(3)
    assert all(isinstance(s, ort.OrtValue) and s.shape() == [3, 32] for s in state)
    logits, state = rt.step(np.zeros((3, 4), np.int64), state)
    assert isinstance(logits, np.ndarray) and logits.shape == (3, 35)
    assert all(isinstance(s, ort.OrtValue) for s in state)
    joined = rt.concat([rt.take(state, [2, 0]), rt.new_state(1)])
    assert joined[0].shape() == [3, 32]
    np.testing.assert_array_equal(joined[1].numpy()[0], state[1].numpy()[2])
    plain = OrtRuntime(onnx_files["lstm"])
    host = tuple(s.numpy() for s in joined)  # numpy state passed to a binding runtime is bound as it is
    np.testing.assert_allclose(rt.step(np.ones((3, 1), np.int64), host)[0],
                               plain.step(np.ones((3, 1), np.int64), host)[0], atol=1e-6)
