"""Finding the models in a directory and opening each with a runtime of the chosen backend.

Layouts (one directory per model, named by its id): checkpoints `<dir>/<id>/config.json` (torch),
exports `<dir>/<id>/model.onnx` (onnxruntime) and `<dir>/<id>/model.engine` (tensorrt). DIR may also
be a single model's directory. A model is served under its directory's name (the model id, or a variant
such as `<id>-fp16`). Everything else talks to the runtimes through `export.runtime.Runtime`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export.runtime import GPU_PROVIDERS, OrtRuntime, ProviderUnavailable, Runtime, TorchRuntime

log = logging.getLogger(__name__)

# "config.json" is train.checkpoint.CONFIG, spelled out: importing train.checkpoint would load torch,
# which a server of exports never needs (tests check both)
MODEL_FILES = {"torch": "config.json", "onnxruntime": "model.onnx", "tensorrt": "model.engine"}
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}
# The default: CUDA when present, else CPU. TensorRT's provider is opt-in: it builds its engine when a session
# starts (OrtRuntime gives it explicit decode and prefill profiles, export.runtime.SERVER_PROFILES, so that
# the scheduler's changing (B, T) does not rebuild it) and that takes seconds to minutes per model.
_DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class BackendError(Exception):
    """The models cannot be opened as asked (nothing found, a backend missing, a bad file)."""


def find_models(root: Path, backend: str) -> list[Path]:
    name = MODEL_FILES[backend]
    root = Path(root)
    if (root / name).is_file():
        return [root / name]
    found = sorted(p / name for p in root.iterdir() if (p / name).is_file()) if root.is_dir() else []
    if not found:
        hint = next((f"; it holds {other} files: serve them with --backend {b}" for b, other in MODEL_FILES.items()
                     if other != name and ((root / other).is_file() or any(root.glob(f"*/{other}")))), "")
        raise BackendError(f"no models for the {backend} backend in {root} (expected {root}/<model-id>/{name}){hint}")
    return found


def ort_providers(spec: str = "") -> list[str]:
    """'CUDA,CPU' -> onnxruntime provider names; '' -> the best available. CPU always ends the list."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not spec:
        return [p for p in _DEFAULT_PROVIDERS if p in available]
    names = []
    for short in (s.strip().lower() for s in spec.split(",") if s.strip()):
        if short not in ORT_PROVIDERS:
            raise BackendError(f"unknown provider {short!r}; expected some of CPU, CUDA, TensorRT")
        if ORT_PROVIDERS[short] not in available:
            raise BackendError(f"provider {short!r} is not available in this onnxruntime "
                               f"(available: {', '.join(available)})")
        names.append(ORT_PROVIDERS[short])
    return names + ["CPUExecutionProvider"] * ("CPUExecutionProvider" not in names)


def _tensorrt_runtime_class():
    """export.tensorrt.TensorRTRuntime, imported lazily (TensorRT needs an NVIDIA GPU); BackendError if missing."""
    hint = "the tensorrt backend needs TensorRT and an NVIDIA GPU (pip install -e '.[trt]')"
    try:
        from export import tensorrt
    except ImportError as e:
        raise BackendError(f"{hint}: {e}") from None
    unavailable = (ImportError, getattr(tensorrt, "TensorRTUnavailable", ImportError))
    try:
        if hasattr(tensorrt, "require_tensorrt"):
            tensorrt.require_tensorrt()  # fail before looking for engines, with TensorRT's own message
    except unavailable as e:
        raise BackendError(f"{hint}: {e}") from None
    return tensorrt.TensorRTRuntime


def open_runtime(path: Path, backend: str, providers: list[str] | None = None, threads: int = 0) -> Runtime:
    try:
        if backend == "torch":
            return TorchRuntime(path.parent)
        if backend == "onnxruntime":
            # a GPU provider asked for (or chosen as the default) must be the one that runs: onnxruntime lists
            # CUDA and TensorRT whenever its GPU build is installed, and falls back to the CPU when they do not load
            strict = bool(providers) and providers[0] in GPU_PROVIDERS
            return OrtRuntime(path, providers, threads, strict=strict)
        if backend == "tensorrt":
            return _tensorrt_runtime_class()(path)
    except BackendError:
        raise
    except ProviderUnavailable as e:
        raise BackendError(f"{e}; pass --providers CPU to run on the CPU") from None
    except Exception as e:  # corrupt or foreign files fail in many library-specific ways; name the file
        raise BackendError(f"{path}: {e}") from None
    raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(MODEL_FILES)}")


def resolve_providers(backend: str, providers: str = "") -> list[str] | None:
    """Check the backend and find what it needs; onnxruntime's provider list (None for the others)."""
    if backend not in MODEL_FILES:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(MODEL_FILES)}")
    if backend == "tensorrt":
        _tensorrt_runtime_class()
    return ort_providers(providers) if backend == "onnxruntime" else None


def open_runtimes(paths: list[Path], backend: str, providers: list[str] | None = None,
                  threads: int = 0) -> dict[str, Runtime]:
    """A runtime per model file, by the name of its directory: the model id, or a variant of it such as
    the fp16 export `<model-id>-fp16`, so that variants of one model are served side by side."""
    if backend == "torch" and threads:
        import torch

        torch.set_num_threads(threads)  # process-wide; on a busy machine fewer threads stall less
    runtimes: dict[str, Runtime] = {}
    for path in paths:
        rt = open_runtime(path, backend, providers, threads)
        warm_up(rt)
        name = path.parent.name
        runtimes[name] = rt
        log.info("loaded %s (%s%s, %s h%d fc%d, %d chars) from %s%s", name, rt.backend,
                 f", model {rt.model_id}" if rt.model_id != name else "", rt.cell, rt.hidden_size, rt.fc_layers,
                 len(rt.vocab), path, f" on {', '.join(rt.providers)}" if hasattr(rt, "providers") else "")
    return runtimes


def warm_up(rt: Runtime) -> None:
    """A prompt and a step through the runtime before it serves, so that the first request does not pay for
    its first calls: allocation and kernel choice (~0.5 ms on onnxruntime CPU), CUDA's lazy start on a GPU."""
    state = rt.new_state(1)
    for length in (2, 1):  # a prompt's prefill, then a decode step
        _, state = rt.step(np.zeros((1, length), np.int64), state)


def load_runtimes(root: Path, backend: str, providers: str = "", threads: int = 0) -> dict[str, Runtime]:
    """Every model under root, opened in this process."""
    providers = resolve_providers(backend, providers)
    return open_runtimes(find_models(root, backend), backend, providers, threads)
