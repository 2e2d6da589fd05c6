"""TensorRT: what can be checked without a GPU here (messages, options, the builder's branches against a
stand-in module), and the real engine build + parity, which skips unless TensorRT and a GPU are present."""
import sys
import types

import numpy as np
import pytest

from conftest import make_checkpoint
from export import manifest
from export.parity import ParitySpec
from export.tensorrt import TensorRTUnavailable, TrtOptions, build_engine, require_tensorrt


def _missing() -> str:
    try:
        require_tensorrt()
        return ""
    except TensorRTUnavailable as e:
        return str(e)


gpu = pytest.mark.skipif(bool(_missing()), reason=f"{_missing()} (scripts/gpu_check.sh runs these on a GPU machine)")


# --- without a GPU ------------------------------------------------------------------------------------

def test_missing_tensorrt_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTUnavailable) as e:
        require_tensorrt()
    assert str(e.value).count(". ") == 0 and "pip install -e '.[trt]'" in str(e.value)


def test_missing_gpu_is_one_sentence(monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TensorRTUnavailable, match="no NVIDIA GPU"):
        require_tensorrt()


def test_options_and_profiles():
    step, prefill = TrtOptions(max_batch=32, opt_prefill=50, max_prefill=300).profiles(hidden_size=128, num_states=2)
    assert step == {"tokens": ((1, 1), (8, 1), (32, 1)), "h_in": ((1, 128), (8, 128), (32, 128)),
                    "c_in": ((1, 128), (8, 128), (32, 128))}
    assert prefill["tokens"] == ((1, 1), (8, 50), (32, 300)) and "c_in" in prefill
    for bad in (dict(opt_batch=100), dict(min_batch=0), dict(opt_prefill=600), dict(hardware_compatible="any")):
        with pytest.raises(ValueError):
            TrtOptions(**bad)


class FakeTRT(types.ModuleType):
    """Just enough of the tensorrt module to run build_engine and record what it asked for."""

    def __init__(self, version: str, has_fp16_flag: bool):
        super().__init__("tensorrt")
        self.__version__, self.calls = version, []
        flags = ["TF32", "VERSION_COMPATIBLE"] + ["FP16"] * has_fp16_flag
        self.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        fake = self

        class Recorder:
            def __init__(self, name):
                self.name = name

            def __getattr__(self, attr):
                def call(*args, **kw):
                    fake.calls.append((f"{self.name}.{attr}", args))
                    return {"create_network": Recorder("network"), "create_builder_config": Recorder("config"),
                            "create_optimization_profile": Recorder("profile"), "parse_from_file": True,
                            "create_timing_cache": "cache", "build_serialized_network": b"PLAN",
                            "get_timing_cache": Recorder("cache"), "serialize": b"CACHE"}.get(attr)
                return call

        self.Builder = lambda logger: Recorder("builder")
        self.OnnxParser = lambda network, logger: Recorder("parser")

    def called(self, name):
        return [args for n, args in self.calls if n == name]


@pytest.mark.parametrize("version,has_fp16_flag", [("10.13.0", True), ("11.4.0", False)])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_builder_branches_on_the_installed_tensorrt(tmp_path, monkeypatch, version, has_fp16_flag, precision):
    import torch

    trt = FakeTRT(version, has_fp16_flag)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    opts = TrtOptions(version_compatible=True, hardware_compatible="ampere_plus")
    info = build_engine(tmp_path / "m.onnx", tmp_path / "model.engine", precision, opts, tmp_path / "cache",
                        hidden_size=32, num_states=2)
    assert (tmp_path / "model.engine").read_bytes() == b"PLAN" and (tmp_path / "cache").read_bytes() == b"CACHE"
    assert trt.called("builder.create_network") == [(0,)]
    assert ("TF32",) in trt.called("config.clear_flag")  # fp32 parity needs full fp32 matmuls
    fp16_flag = ("FP16",) in trt.called("config.set_flag")
    assert fp16_flag == (precision == "fp16" and has_fp16_flag)  # TensorRT 11: types come from the fp16 ONNX
    assert ("VERSION_COMPATIBLE",) in trt.called("config.set_flag")
    assert trt.called("config.set_timing_cache") == [("cache",)]
    assert len(trt.called("config.add_optimization_profile")) == 2
    shapes = {args[0]: args[1:] for args in trt.called("profile.set_shape")}
    assert shapes["tokens"] == ((1, 1), (8, 64), (64, 512)) and set(shapes) == {"tokens", "h_in", "c_in"}
    assert info["tensorrt"] == version and info["gpu"] == "NVIDIA H200" and info["compute_capability"] == "9.0"
    assert len(info["profiles"]) == 2 and "build_seconds" in info


# --- on a GPU with TensorRT ---------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_engine_parity_and_manifest(tmp_path, cell):
    from export.tensorrt import export_trt

    ckpt = make_checkpoint(tmp_path / "runs", cell=cell)
    result = export_trt(ckpt, tmp_path / "out")
    entry = result["manifest"]["exports"]["trt"]
    assert entry["parity"]["passed"] and entry["parity"]["max_abs_logits"] < 1e-5
    assert entry["tensorrt"] and entry["gpu"] and entry["compute_capability"] and entry["build_seconds"] > 0
    assert len(entry["profiles"]) == 2
    assert export_trt(ckpt, tmp_path / "out")["skipped"]


@gpu
def test_engine_runtime_protocol_and_fp16(tmp_path):
    from export.runtime import TorchRuntime
    from export.tensorrt import TensorRTRuntime, export_trt

    ckpt = make_checkpoint(tmp_path / "runs", cell="lstm")
    quick = ParitySpec.for_precision("fp16", steps=50)
    assert export_trt(ckpt, tmp_path / "fp16", "fp16", parity=quick)["manifest"]["exports"]["trt"]["parity"]["passed"]
    export_trt(ckpt, tmp_path / "fp32", opts=TrtOptions(max_batch=8, max_prefill=32))
    rt, ref = TensorRTRuntime(tmp_path / "fp32" / "model.engine"), TorchRuntime(ckpt)
    tokens = np.random.default_rng(0).integers(0, len(rt.vocab), (4, 9))
    (lt, st), (lr, sr) = rt.step(tokens, rt.new_state(4)), ref.step(tokens, ref.new_state(4))
    np.testing.assert_allclose(lt, lr, atol=1e-5, rtol=1e-5)  # a prefill through the second profile
    st, sr = rt.concat([rt.take(st, [3, 1]), rt.new_state(1)]), ref.concat([ref.take(sr, [3, 1]), ref.new_state(1)])
    nxt = np.array([[1], [2], [3]])
    np.testing.assert_allclose(rt.step(nxt, st)[0], ref.step(nxt, sr)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside this engine's profiles"):
        rt.step(np.zeros((9, 1), np.int64), rt.new_state(9))
    assert manifest.read_manifest(tmp_path / "fp32")["exports"]["trt"]["options"]["max_batch"] == 8
