"""ONNX step model -> serialized TensorRT engine, and a step runtime for it (TensorRT 10.x and 11.x).

Written against NVIDIA's Python API (tensor API only: `num_io_tensors`, `set_input_shape`,
`set_tensor_address`, `execute_async_v3`). `tensorrt` is imported lazily so the package imports on
machines without it; every entry point first calls `require_tensorrt`, whose TensorRTUnavailable
message is one sentence the CLI prints before exiting with code 2.

Precision. Networks are built strongly typed on TensorRT 10 and 11 alike (weak typing is deprecated from
10.12 and gone in 11): the types in the ONNX graph are the precision, so an fp16 engine is built from the
fp16 ONNX (fp16 weights and math, float32 I/O) and no FP16 builder flag is set. fp32 engines are built
with TF32 off (BuilderFlag.TF32 cleared), else Ampere+ GPUs would round matmul inputs to 10 mantissa bits
and miss the 1e-5 parity.

Profiles (export.runtime.Profiles). Profile 0 is the decode step (T = 1, B from min to max); profile 1
covers prefill and chunks (T from 1 to max_prefill). The runtime keeps one execution context per profile
and picks by T. The parity check runs at shapes inside the profiles.

Engines are tied to the TensorRT version and GPU they were built with, unless built version- and/or
hardware-compatible; the manifest records version, GPU, compute capability, profiles and build time. The
timing cache is reused across builds when TensorRT accepts it (same version and GPU), else started afresh.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from export import manifest
from export.onnx import default_out_dir, export_onnx_result
from export.parity import ParitySpec
from export.runtime import Profiles, Runtime, read_onnx_metadata
from train.checkpoint import atomic_write, load_checkpoint, sha256_file
from train.vocab import Vocab

log = logging.getLogger(__name__)

FILE = "model.engine"
HARDWARE_LEVELS = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_cc": "SAME_COMPUTE_CAPABILITY"}
INSTALL_HINT = "install the trt extra on a machine with an NVIDIA GPU: pip install -e '.[trt]'"


class TensorRTUnavailable(Exception):
    """TensorRT or a CUDA GPU is missing; the message is one sentence for the user."""


class EngineBuildError(Exception):
    """TensorRT could not parse the ONNX file or build an engine from it."""


def require_tensorrt():
    """The tensorrt module, or TensorRTUnavailable saying what is missing and how to install it."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError:
        raise TensorRTUnavailable(
            f"TensorRT is not installed (no `tensorrt` Python package); {INSTALL_HINT}.") from None
    except (ImportError, OSError) as e:  # installed, but its libraries (libnvinfer, CUDA) do not load
        raise TensorRTUnavailable(f"TensorRT is installed but does not load ({e}); {INSTALL_HINT}.") from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "no NVIDIA GPU is visible to PyTorch (torch.cuda.is_available() is False), and TensorRT needs one; "
            f"{INSTALL_HINT}, with a CUDA build of torch.") from None
    return trt


@dataclass(frozen=True)
class TrtOptions:
    min_batch: int = field(default=1, metadata={"help": "smallest batch the engine accepts"})
    opt_batch: int = field(default=0, metadata={
        "help": "the batch TensorRT tunes its kernels for (default: min(8, --max-batch))"})
    max_batch: int = field(default=64, metadata={"help": "largest batch the engine accepts"})
    opt_prefill: int = field(default=0, metadata={
        "help": "prompt length the prefill profile is tuned for (default: min(64, --max-prefill))"})
    max_prefill: int = field(default=512, metadata={
        "help": "longest chunk of tokens one call may run (longer prompts are fed in pieces)"})
    workspace_mb: int = field(default=1024, metadata={"help": "builder workspace limit, MiB"})
    version_compatible: bool = field(default=False, metadata={
        "help": "build an engine later TensorRT versions can run (embeds a lean runtime; may be slower)"})
    hardware_compatible: str = field(default="none", metadata={
        "help": "GPU compatibility of the engine", "choices": tuple(HARDWARE_LEVELS)})
    timing_cache: str = field(default="", metadata={
        "help": "timing cache file reused across builds (default: OUT/.trt-timing.cache)"})

    def __post_init__(self):
        resolved = Profiles(self.min_batch, self.opt_batch, self.max_batch, self.opt_prefill, self.max_prefill)
        object.__setattr__(self, "opt_batch", resolved.opt_batch)  # 0 means derived: record what is built
        object.__setattr__(self, "opt_prefill", resolved.opt_prefill)
        if self.hardware_compatible not in HARDWARE_LEVELS:
            raise ValueError(f"hardware_compatible must be one of {', '.join(HARDWARE_LEVELS)}")

    @property
    def limits(self) -> Profiles:
        return Profiles(self.min_batch, self.opt_batch, self.max_batch, self.opt_prefill, self.max_prefill)

    def profiles(self, hidden_size: int, num_states: int) -> list[dict]:
        """[{input name: (min, opt, max) shapes}] for the step profile and the prefill profile."""
        return self.limits.shapes(hidden_size, num_states)

    def parity_spec(self, spec: ParitySpec) -> ParitySpec:
        """`spec` with its batch sizes and prefill lengths moved inside the engine's profiles."""
        batches, prefills = self.limits.clamp(spec.batches, spec.prefills)
        if (batches, prefills) != (spec.batches, spec.prefills):
            log.info("parity at batches %s and prefills %s, inside the engine's profiles", batches, prefills)
        return replace(spec, batches=batches, prefills=prefills)


def hardware_level(trt, opts: TrtOptions):
    """The HardwareCompatibilityLevel asked for, or TensorRTUnavailable when this TensorRT lacks it."""
    name = HARDWARE_LEVELS[opts.hardware_compatible]
    level = getattr(trt.HardwareCompatibilityLevel, name, None)
    if level is None:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} has no HardwareCompatibilityLevel.{name} (--hardware-compatible "
            f"{opts.hardware_compatible} needs a later TensorRT 10.x or 11); upgrade TensorRT or choose another level")
    return level


def gpu_info() -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def build_engine(onnx_path: Path, engine_path: Path, precision: str, opts: TrtOptions, timing_cache: Path,
                 hidden_size: int, num_states: int) -> dict:
    """Parse, configure, build and serialize; returns how it was built (for the manifest)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: strongly typed on request; TensorRT 11: always (the flag is deprecated and ignored there)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # full fp32 matmuls: TF32 breaks 1e-5 parity
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if opts.hardware_compatible != "none":
        config.hardware_compatibility_level = hardware_level(trt, opts)
    profiles = opts.profiles(hidden_size, num_states)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    cache, cache_note = attach_timing_cache(config, timing_cache)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    build_s = time.perf_counter() - t0
    atomic_write(engine_path, bytes(plan))
    atomic_write(timing_cache, bytes(cache.serialize()))  # the builder added this build's timings to it
    return {
        "tensorrt": trt.__version__, **gpu_info(), "build_seconds": round(build_s, 3),
        "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
        "network": "strongly typed: " + ("fp16 ONNX" if precision == "fp16" else "fp32 ONNX, TF32 off"),
        "timing_cache": str(timing_cache), "timing_cache_reused": cache_note,
    }


def attach_timing_cache(config, path: Path):
    """Attach the cache in `path` to the builder config, or an empty one when there is none or TensorRT refuses
    it (set_timing_cache returns False for a cache of another TensorRT version or GPU). Returns (cache, reused)."""
    if path.is_file():
        try:
            cache = config.create_timing_cache(path.read_bytes())
        except Exception:  # noqa: BLE001 -- a damaged file is as good as none
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache, True
        log.info("%s is from another TensorRT version or GPU; starting an empty timing cache", path)
    cache = config.create_timing_cache(b"")  # an empty buffer makes a new, empty cache
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineBuildError("TensorRT refused an empty timing cache")
    return cache, False


class TensorRTRuntime(Runtime):
    """A serialized engine behind the step protocol. State stays on the GPU between steps (torch tensors)."""

    backend = "tensorrt"

    def __init__(self, engine_path: Path, onnx_path: Path | None = None, device: int = 0,
                 allow_host_code: bool | None = None):
        """onnx_path: the step model the engine was built from, for its metadata (default: model.onnx beside
        the engine). allow_host_code: let TensorRT run the lean runtime a version-compatible engine embeds;
        default: what the manifest beside the engine says it was built with. Only for engines you trust."""
        trt = require_tensorrt()
        import torch

        engine_path = Path(engine_path)
        meta = read_onnx_metadata(onnx_path or engine_path.with_name("model.onnx"))
        super().__init__(meta["model_id"], meta["cell"], meta["hidden_size"], meta["fc_layers"], Vocab(meta["vocab"]))
        self.torch, self.device = torch, torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if allow_host_code is None:
            entry = (manifest.read_manifest(engine_path.parent) or {}).get("exports", {}).get("trt", {})
            allow_host_code = bool(entry.get("options", {}).get("version_compatible"))
        self._runtime.engine_host_code_allowed = allow_host_code
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not load {engine_path} (built by another TensorRT version or GPU?)")
        self.stream = torch.cuda.Stream(self.device)
        self._state_in = ["h_in", "c_in"][: self.num_states]
        self._state_out = ["h_out", "c_out"][: self.num_states]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = {"tokens", "logits", *self._state_in, *self._state_out}
        if set(names) != expected:
            raise EngineBuildError(f"{engine_path}: I/O tensors {names}, expected {sorted(expected)}")
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
                  trt.int32: torch.int32}
        self._dtype = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        # one execution context per optimization profile: switching a single context's profile costs a sync
        self._contexts, self._limits = [], []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            if not ctx.set_optimization_profile_async(p, self.stream.cuda_stream):
                raise EngineBuildError(f"{engine_path}: TensorRT rejected optimization profile {p}")
            lo, _, hi = self.engine.get_tensor_profile_shape("tokens", p)
            self._contexts.append(ctx)
            self._limits.append((tuple(lo), tuple(hi)))
        self.stream.synchronize()

    # Every GPU op of this runtime runs on its own stream, so state made by new_state/take/concat is
    # ordered before the engine reads it, and freed blocks are reused only in that same order.
    def new_state(self, batch: int):
        with self.torch.cuda.stream(self.stream):
            return tuple(self.torch.zeros(batch, self.hidden_size, device=self.device, dtype=self._dtype["h_in"])
                         for _ in range(self.num_states))

    def take(self, state, rows):
        with self.torch.cuda.stream(self.stream):
            index = self.torch.as_tensor(rows, dtype=self.torch.int64, device=self.device)
            return tuple(s.index_select(0, index) for s in state)

    def concat(self, states: list):
        with self.torch.cuda.stream(self.stream):
            return tuple(self.torch.cat(parts) for parts in zip(*states))

    def _profile(self, B: int, T: int) -> int:
        for p in ([0] if T == 1 else []) + list(range(1, len(self._contexts))) + [0]:
            (b_lo, t_lo), (b_hi, t_hi) = self._limits[p]
            if b_lo <= B <= b_hi and t_lo <= T <= t_hi:
                return p
        limits = ", ".join(f"B {lo[0]}..{hi[0]} x T {lo[1]}..{hi[1]}" for lo, hi in self._limits)
        raise ValueError(f"tokens of shape ({B}, {T}) are outside this engine's profiles ({limits}); "
                         "rebuild with larger --max-batch/--max-prefill or feed shorter chunks")

    def step(self, tokens, state):
        torch = self.torch
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        B, T = tokens.shape
        ctx = self._contexts[self._profile(B, T)]
        with torch.cuda.stream(self.stream):
            feed = {"tokens": torch.from_numpy(tokens).to(self.device, self._dtype["tokens"])}  # (B, T)
            feed.update((n, s.contiguous()) for n, s in zip(self._state_in, state))  # (B, H) each
            out = {"logits": torch.empty(B, len(self.vocab), device=self.device, dtype=self._dtype["logits"])}
            out.update((n, torch.empty(B, self.hidden_size, device=self.device, dtype=self._dtype[n]))
                       for n in self._state_out)
            for name, t in feed.items():
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"TensorRT rejected shape {tuple(t.shape)} for {name!r}")
            for name, t in {**feed, **out}.items():
                ctx.set_tensor_address(name, t.data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
            logits = out["logits"].float().cpu().numpy()  # the copy waits for the engine on this stream
        return logits, tuple(out[n] for n in self._state_out)

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device)}


def export_trt(ckpt_dir: Path, out_dir: Path | None = None, precision: str = "fp32",
               opts: TrtOptions = TrtOptions(), force: bool = False, parity: ParitySpec | None = None) -> dict:
    """ONNX export (or reuse), engine build, parity on the GPU, manifest entry `trt`. Needs TensorRT and a GPU."""
    trt = require_tensorrt()
    if opts.hardware_compatible != "none":
        hardware_level(trt, opts)  # before any work
    ckpt = load_checkpoint(ckpt_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_dir, precision)
    onnx = export_onnx_result(ckpt_dir, out_dir, precision, force=force)
    onnx_path, path = onnx["path"], out_dir / FILE
    source = manifest.source_of(ckpt)
    options = {**asdict(opts), "precision": precision, "onnx_sha256": sha256_file(onnx_path), **gpu_info(),
               "tensorrt": trt.__version__}
    options.pop("timing_cache")
    if not force and manifest.is_up_to_date(out_dir, "trt", source, options):
        log.info("%s: %s is up to date (use --force to rebuild)", ckpt.model_id, path)
        return {"path": path, "skipped": True, "manifest": manifest.read_manifest(out_dir)}

    cache = Path(opts.timing_cache) if opts.timing_cache else out_dir.parent / ".trt-timing.cache"
    candidate = path.with_name(f".{path.name}.candidate")
    try:
        info = build_engine(onnx_path, candidate, precision, opts, cache, ckpt.model.cfg.hidden_size,
                            ckpt.model.cfg.num_states)
        runtime = TensorRTRuntime(candidate, onnx_path, allow_host_code=opts.version_compatible)
        spec = opts.parity_spec(parity or ParitySpec.for_precision(precision))
        report = manifest.publish_if_parity(ckpt, candidate, path, runtime, spec)
    finally:
        candidate.unlink(missing_ok=True)
    entry = {"file": FILE, "onnx": onnx_path.name, "precision": precision, "options": options, **info,
             "versions": manifest.tool_versions("tensorrt"), "parity": report}
    return {"path": path, "skipped": False, "manifest": manifest.record_export(out_dir, ckpt, source, "trt", entry)}
