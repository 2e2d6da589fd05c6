"""The backends the benchmark compares, each opened as an `export.runtime.Runtime`.

| name              | what                                                                  | device |
|-------------------|-----------------------------------------------------------------------|--------|
| `torch`           | eager PyTorch (TorchRuntime: the checkpoint as users and the server run it) | cpu |
| `torch-cuda`      | the same on the GPU (the baseline of the GPU backends)                 | cuda   |
| `torch-cudagraph` | CudaGraphRuntime below: one captured CUDA graph per batch size          | cuda   |
| `ort-cpu`         | onnxruntime, CPUExecutionProvider, on the exported step model           | cpu    |
| `ort-cpu-int8`    | the same on the int8 export (`python -m export --precision int8`)     | cpu    |
| `ort-cuda`        | onnxruntime, CUDAExecutionProvider                                    | cuda   |
| `ort-trt`         | onnxruntime, TensorrtExecutionProvider (explicit decode/prefill profiles, engine cache) | cuda |
| `tensorrt`        | a native TensorRT engine (export.tensorrt.TensorRTRuntime)             | cuda   |

A backend that cannot run here is not an error: `unavailable` says why in one sentence, and the report
lists it. Exports (ONNX files, engines) go to a work directory and are parity-checked against eager
PyTorch by the export stage before they are timed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.runtime import OrtRuntime, Profiles, ProviderUnavailable, Runtime, TorchRuntime, ort_trt_options
from serve.bench.models import BenchModel
from train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str
    device: str  # cpu | cuda
    label: str
    server: tuple[str, str] | None = None  # (python -m serve --backend, --providers) serving it, if any
    precisions: tuple[str, ...] = ("fp32", "fp16")
    provider: str = ""  # onnxruntime execution provider


BACKENDS = {b.name: b for b in (
    Backend("torch", "cpu", "eager PyTorch", ("torch", ""), ("fp32",)),
    Backend("torch-cuda", "cuda", "eager PyTorch, CUDA", None, ("fp32",)),
    Backend("torch-cudagraph", "cuda", "PyTorch + CUDA graphs", None, ("fp32",)),
    Backend("ort-cpu", "cpu", "onnxruntime CPU", ("onnxruntime", "cpu"), provider="CPUExecutionProvider"),
    Backend("ort-cpu-int8", "cpu", "onnxruntime CPU, int8 weights", ("onnxruntime", "cpu"), ("int8",),
            provider="CPUExecutionProvider"),
    Backend("ort-cuda", "cuda", "onnxruntime CUDA", ("onnxruntime", "cuda"), provider="CUDAExecutionProvider"),
    Backend("ort-trt", "cuda", "onnxruntime TensorRT", ("onnxruntime", "tensorrt"),
            provider="TensorrtExecutionProvider"),
    Backend("tensorrt", "cuda", "TensorRT engine", ("tensorrt", "")),
)}
EAGER = {"cpu": "torch", "cuda": "torch-cuda"}  # the eager baseline on each device


class BackendUnavailable(Exception):
    """The backend cannot run on this machine; the message says why in one sentence."""


def unavailable(name: str, precision: str = "fp32") -> str | None:
    """Why this backend cannot run here at this precision, or None when it can."""
    b = BACKENDS[name]
    reasons = []
    if precision not in b.precisions:
        return f"{b.label} runs the checkpoint in {', '.join(b.precisions)} only"
    if b.provider:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed (pip install -e '.[export]')"
        available = ort.get_available_providers()
        if b.provider not in available:
            reasons.append(f"onnxruntime {ort.__version__} has no {b.provider} (available: {', '.join(available)}); "
                           "it comes with onnxruntime-gpu (pip install -e '.[trt]')")
    if name == "tensorrt":  # its own sentence covers both a missing package and a missing GPU
        from export.tensorrt import TensorRTUnavailable, require_tensorrt
        try:
            require_tensorrt()
        except TensorRTUnavailable as e:
            return str(e)
    elif b.device == "cuda" and not torch.cuda.is_available():
        reasons.append(f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__})")
    return "; ".join(reasons) or None


def synchronize(device: str) -> None:
    """Wait for the device: a timed call ends only when its work is done (GPU kernels run asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()


class Exports:
    """ONNX files and TensorRT engines of the models, made once per (model, precision) in a work directory."""

    def __init__(self, root: Path, parity=None, max_batch: int = 256):
        self.root, self.parity, self.max_batch = Path(root), parity, max_batch
        self._done: dict[tuple, Path] = {}

    def onnx(self, model: BenchModel, precision: str) -> Path:
        from export.onnx import export_onnx
        from export.parity import ParitySpec

        key = ("onnx", model.model_id, precision)
        if key not in self._done:
            out = self.root / "onnx" / precision / model.model_id
            if precision == "int8":  # judged by held-out loss when trained; random weights have no corpus
                self._done[key] = export_onnx(model.path, out, precision, judge=model.weights != "random")
            else:
                spec = ParitySpec.for_precision(precision, **(self.parity or {}))
                self._done[key] = export_onnx(model.path, out, precision, parity=spec)
        return self._done[key]

    def engine(self, model: BenchModel, precision: str) -> Path:
        from export.parity import ParitySpec
        from export.tensorrt import TrtOptions, export_trt

        key = ("trt", model.model_id, precision)
        if key not in self._done:
            spec = ParitySpec.for_precision(precision, **(self.parity or {}))
            p = bench_profiles(max(self.max_batch, *spec.batches))  # the parity check's batches too
            opts = TrtOptions(min_batch=p.min_batch, opt_batch=p.opt_batch, max_batch=p.max_batch)
            out = self.root / "trt" / precision / model.model_id
            self._done[key] = export_trt(model.path, out, precision, opts, parity=spec)["path"]
        return self._done[key]


def bench_profiles(max_batch: int) -> Profiles:
    """The profiles the TensorRT backends are built with here: tuned for batch 64, the middle of the batches
    step mode times (8, 64, 256), and taking every batch up to the largest; prefill as the exporter's default."""
    return Profiles(max_batch=max_batch, opt_batch=min(64, max_batch))


def ort_providers(name: str, model: BenchModel, precision: str, cache: Path, max_batch: int = 256) -> list:
    b = BACKENDS[name]
    if b.device == "cpu":
        return [b.provider]
    cuda = ("CUDAExecutionProvider", {"device_id": "0"})
    if name == "ort-cuda":
        return [cuda, "CPUExecutionProvider"]
    # explicit decode and prefill profiles: without them the provider rebuilds its engine when a new shape comes
    num_states = 2 if model.cell == "lstm" else 1
    trt = ort_trt_options(model.hidden_size, num_states, bench_profiles(max_batch), cache)
    return [(b.provider, trt), cuda, "CPUExecutionProvider"]


def open_runtime(name: str, model: BenchModel, precision: str, exports: Exports, threads: int) -> Runtime:
    """The runtime of this backend for this model; BackendUnavailable if it cannot run here."""
    reason = unavailable(name, precision)
    if reason:
        raise BackendUnavailable(reason)
    if name == "torch":
        return TorchRuntime(model.path)
    if name == "torch-cuda":
        return TorchRuntime(model.path, device="cuda")
    if name == "torch-cudagraph":
        return CudaGraphRuntime(model.path)
    if name == "tensorrt":
        from export.tensorrt import TensorRTRuntime
        return TensorRTRuntime(exports.engine(model, precision))
    path = exports.onnx(model, precision)
    cache = exports.root / "ort-trt-cache"
    cache.mkdir(parents=True, exist_ok=True)
    providers = ort_providers(name, model, precision, cache, exports.max_batch)
    try:  # strict: onnxruntime falls back to the CPU quietly when a GPU provider fails to load
        return OrtRuntime(path, providers, threads, strict=True)
    except ProviderUnavailable as e:
        raise BackendUnavailable(str(e)) from None


class CudaGraphRuntime(Runtime):
    """Eager PyTorch's one-character step captured as a CUDA graph per batch size, replayed each step.

    Follows PyTorch's CUDA-graph recipe: warm up on a side stream, capture with `torch.cuda.graph`
    into static input/state/output tensors, then per step copy the inputs into the static tensors and
    `replay()`. State stays on the GPU (opaque torch tensors); the state a step returns is a copy, so
    callers may keep several (take/concat) while the static buffers are reused. Prefill (T > 1) runs
    eagerly: its shapes vary, and it is not what the benchmark times.
    """

    backend = "torch-cudagraph"

    def __init__(self, ckpt_dir: Path, device: str = "cuda"):
        ckpt = load_checkpoint(ckpt_dir, device)
        cfg = ckpt.model.cfg
        super().__init__(ckpt.model_id, cfg.cell, cfg.hidden_size, cfg.fc_layers, ckpt.vocab)
        self.model, self.device = ckpt.model.eval(), torch.device(device)
        self._graphs: dict[int, tuple] = {}  # B -> (graph, tokens, state in, logits, state out)

    def new_state(self, batch: int):
        return tuple(torch.zeros(batch, self.hidden_size, device=self.device) for _ in range(self.num_states))

    def take(self, state, rows):
        index = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        return tuple(s.index_select(0, index) for s in state)

    def concat(self, states: list):
        return tuple(torch.cat(parts) for parts in zip(*states))

    @torch.no_grad()
    def _capture(self, batch: int) -> tuple:
        tokens = torch.zeros(batch, 1, dtype=torch.int64, device=self.device)  # (B, 1)
        state = self.new_state(batch)  # (B, H) each
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisation (cuBLAS handles) happens here
            for _ in range(3):
                self.model(tokens, state)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, new = self.model(tokens, state)  # (B, 1, V), ((B, H), ...)
        return graph, tokens, state, logits[:, -1], new

    @torch.no_grad()
    def step(self, tokens, state):
        tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        B, T = tokens.shape
        state = tuple(torch.as_tensor(s, device=self.device) for s in state)
        if T != 1:
            logits, new = self.model(tokens.to(self.device), state)
            return logits[:, -1].float().cpu().numpy(), new
        if B not in self._graphs:
            self._graphs[B] = self._capture(B)
        graph, s_tokens, s_state, s_logits, s_new = self._graphs[B]
        s_tokens.copy_(tokens)
        for dst, src in zip(s_state, state):
            dst.copy_(src)
        graph.replay()
        new = tuple(s.clone() for s in s_new)  # the graph overwrites s_new at the next replay
        return s_logits.float().cpu().numpy(), new  # the copy to the host waits for the replay

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device)}
