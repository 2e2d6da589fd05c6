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
    for bad in (dict(opt_batch=100), dict(min_batch=0), dict(opt_prefill=600), dict(hardware_compatible="any"),
                dict(opt_batch=8, max_batch=4), dict(min_batch=9, opt_batch=8)):
        with pytest.raises(ValueError):
            TrtOptions(**bad)


@pytest.mark.parametrize("kw,opt_batch,opt_prefill", [
    (dict(max_batch=8, max_prefill=32), 8, 32),  # what the GPU test builds: opt follows max down
    (dict(max_batch=4), 4, 64), (dict(max_prefill=16), 8, 16), (dict(), 8, 64),
    (dict(min_batch=12, max_batch=16), 12, 64), (dict(max_batch=256, max_prefill=1024), 8, 64)])
def test_opt_shapes_are_derived_from_the_maxima(kw, opt_batch, opt_prefill):
    opts = TrtOptions(**kw)
    assert (opts.opt_batch, opts.opt_prefill) == (opt_batch, opt_prefill)
    step, prefill = opts.profiles(hidden_size=16, num_states=1)
    assert step["tokens"][1] == (opt_batch, 1) and prefill["tokens"][1] == (opt_batch, opt_prefill)


def test_parity_shapes_are_moved_inside_the_profiles():
    spec = ParitySpec()  # batches (1, 3, 8), prefills (1, 17, 64)
    small = TrtOptions(max_batch=4, max_prefill=32).parity_spec(spec)
    assert small.batches == (1, 3, 4) and small.prefills == (1, 17, 32) and small.steps == spec.steps
    assert TrtOptions(min_batch=2, max_batch=2, max_prefill=1).parity_spec(spec).batches == (2,)
    assert TrtOptions(max_prefill=1).parity_spec(spec).prefills == (1,)
    assert TrtOptions().parity_spec(spec) == spec  # the defaults already hold every parity shape


def test_cli_small_profiles_parse_and_bad_ones_exit_2(capsys):
    from export.__main__ import parse_args

    _, trt_opts, _ = parse_args(["--engine", "trt", "--checkpoint", "x", "--max-batch", "4", "--max-prefill", "32"])
    assert (trt_opts.opt_batch, trt_opts.max_batch, trt_opts.opt_prefill, trt_opts.max_prefill) == (4, 4, 32, 32)
    with pytest.raises(SystemExit) as e:
        parse_args(["--engine", "trt", "--checkpoint", "x", "--opt-batch", "8", "--max-batch", "4"])
    assert e.value.code == 2 and "opt_batch" in capsys.readouterr().err


class FakeTRT(types.ModuleType):
    """Just enough of the tensorrt module to run build_engine and record what it asked for.

    TensorRT 10.x lacking SAME_COMPUTE_CAPABILITY is `same_cc=False`; `accepts` is the serialized timing cache
    set_timing_cache accepts (TensorRT refuses a cache of another version or GPU)."""

    def __init__(self, version: str, has_fp16_flag: bool, same_cc: bool = True, accepts: bytes = b""):
        super().__init__("tensorrt")
        self.__version__, self.calls = version, []
        flags = ["TF32", "VERSION_COMPATIBLE"] + ["FP16"] * has_fp16_flag
        self.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        levels = ["AMPERE_PLUS"] + ["SAME_COMPUTE_CAPABILITY"] * same_cc
        self.HardwareCompatibilityLevel = types.SimpleNamespace(**{lv: lv for lv in levels})
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        fake = self

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+BUILD"  # what the build added

        class Recorder:
            def __init__(self, name):
                self.name = name

            def __getattr__(self, attr):
                def call(*args, **kw):
                    fake.calls.append((f"{self.name}.{attr}", args))
                    if attr == "create_timing_cache":
                        return Cache(args[0])
                    if attr == "set_timing_cache":
                        return args[0].data in (b"", accepts)
                    return {"create_network": Recorder("network"), "create_builder_config": Recorder("config"),
                            "create_optimization_profile": Recorder("profile"), "parse_from_file": True,
                            "build_serialized_network": b"PLAN"}.get(attr)
                return call

        self.Builder = lambda logger: Recorder("builder")
        self.OnnxParser = lambda network, logger: Recorder("parser")

    def called(self, name):
        return [args for n, args in self.calls if n == name]


@pytest.fixture
def fake_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))

    def install(trt):
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt
    return install


@pytest.mark.parametrize("version,has_fp16_flag", [("10.13.0", True), ("11.4.0", False)])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_builder_is_strongly_typed_on_10_and_11(tmp_path, fake_gpu, version, has_fp16_flag, precision):
    trt = fake_gpu(FakeTRT(version, has_fp16_flag))
    opts = TrtOptions(version_compatible=True, hardware_compatible="ampere_plus")
    info = build_engine(tmp_path / "m.onnx", tmp_path / "model.engine", precision, opts, tmp_path / "cache",
                        hidden_size=32, num_states=2)
    assert (tmp_path / "model.engine").read_bytes() == b"PLAN"
    assert trt.called("builder.create_network") == [(1 << 0,)]  # STRONGLY_TYPED, on 10 and 11 alike
    assert ("TF32",) in trt.called("config.clear_flag")  # fp32 parity needs full fp32 matmuls
    assert ("FP16",) not in trt.called("config.set_flag")  # the fp16 ONNX carries its types
    assert ("VERSION_COMPATIBLE",) in trt.called("config.set_flag")
    assert len(trt.called("config.add_optimization_profile")) == 2
    shapes = {args[0]: args[1:] for args in trt.called("profile.set_shape")}
    assert shapes["tokens"] == ((1, 1), (8, 64), (64, 512)) and set(shapes) == {"tokens", "h_in", "c_in"}
    assert info["tensorrt"] == version and info["gpu"] == "NVIDIA H200" and info["compute_capability"] == "9.0"
    assert len(info["profiles"]) == 2 and "build_seconds" in info and "strongly typed" in info["network"]


@pytest.mark.parametrize("old,accepted", [(None, False), (b"SAME-VERSION", True), (b"OTHER-GPU", False)])
def test_timing_cache_refused_starts_afresh_and_the_attached_cache_is_saved(tmp_path, fake_gpu, old, accepted):
    trt = fake_gpu(FakeTRT("10.13.0", True, accepts=b"SAME-VERSION"))
    cache = tmp_path / "cache"
    if old is not None:
        cache.write_bytes(old)
    info = build_engine(tmp_path / "m.onnx", tmp_path / "model.engine", "fp32", TrtOptions(), cache,
                        hidden_size=8, num_states=1)
    attached = [args[0].data for args in trt.called("config.set_timing_cache")]
    assert attached[-1] == (old if accepted else b"")  # a refused cache is replaced by an empty one
    assert cache.read_bytes() == attached[-1] + b"+BUILD"  # the cache the build ran with, serialized after it
    assert info["timing_cache_reused"] is accepted


def test_hardware_level_missing_from_an_older_10x_is_one_sentence(tmp_path, fake_gpu, monkeypatch, capsys):
    from export.__main__ import main

    fake_gpu(FakeTRT("10.3.0", True, same_cc=False))
    opts = TrtOptions(hardware_compatible="same_cc")
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT 10\.3\.0 has no HardwareCompatibilityLevel"):
        build_engine(tmp_path / "m.onnx", tmp_path / "e", "fp32", opts, tmp_path / "c", hidden_size=8, num_states=1)
    build_engine(tmp_path / "m.onnx", tmp_path / "e", "fp32", TrtOptions(hardware_compatible="ampere_plus"),
                 tmp_path / "c", hidden_size=8, num_states=1)
    ckpt = make_checkpoint(tmp_path / "runs", cell="gru")
    assert main(["--engine", "trt", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                 "--hardware-compatible", "same_cc"]) == 2  # refused before any work
    err = capsys.readouterr().err
    assert "has no HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


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
    entry = manifest.read_manifest(tmp_path / "fp32")["exports"]["trt"]
    assert entry["options"]["max_batch"] == 8 and entry["options"]["opt_prefill"] == 32
    assert entry["parity"]["spec"]["prefills"] == [1, 17, 32]  # the default parity shapes, moved inside
