"""Step runtimes: one protocol for every way of running a model (DESIGN.md, "Backends").

A runtime makes a zero state for B streams and runs tokens (B, T) with a state, returning the
last-position logits (B, V) and the new state. State is opaque to callers: they only pass it back,
pick rows of it (`take`) and join states of several streams (`concat`). The server's scheduler,
the benchmark and the parity checks are written against this class alone.

Runtimes here: eager PyTorch from a checkpoint directory, ONNX Runtime from an exported .onnx file.
Also here, torch-free so that servers of exports can use them: the shape profiles TensorRT is built with
(native engines and onnxruntime's TensorRT provider alike) and the GPU set-up of onnxruntime.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.vocab import Vocab

log = logging.getLogger(__name__)

# metadata_props keys of an exported model (DESIGN.md "Exported step model")
META_KEYS = ("model_id", "cell", "hidden_size", "fc_layers", "vocab", "checkpoint_sha256")
STATE_IN, STATE_OUT = ("h_in", "c_in"), ("h_out", "c_out")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class Profiles:
    """The shapes a TensorRT engine accepts: profile 0 the decode step (T = 1, B from min_batch to max_batch),
    profile 1 prefill and chunks (T from 1 to max_prefill). An `opt_*` of 0 is derived from its maximum
    (min(8, max_batch), min(64, max_prefill)): TensorRT tunes its kernels for the opt shapes."""

    min_batch: int = 1
    opt_batch: int = 0
    max_batch: int = 64
    opt_prefill: int = 0
    max_prefill: int = 512

    def __post_init__(self):
        if self.opt_batch == 0:
            object.__setattr__(self, "opt_batch", max(self.min_batch, min(8, self.max_batch)))
        if self.opt_prefill == 0:
            object.__setattr__(self, "opt_prefill", min(64, self.max_prefill))
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}, "
                             f"{self.opt_batch}, {self.max_batch}")
        if not 1 <= self.opt_prefill <= self.max_prefill:
            raise ValueError(f"need 1 <= opt_prefill <= max_prefill, got {self.opt_prefill}, {self.max_prefill}")

    def shapes(self, hidden_size: int, num_states: int) -> list[dict]:
        """[{input name: (min, opt, max) shapes}] for the decode profile and the prefill profile."""
        b = (self.min_batch, self.opt_batch, self.max_batch)

        def profile(t):  # t: (min, opt, max) of T
            prof = {"tokens": tuple(zip(b, t))}
            prof.update((name, tuple((bb, hidden_size) for bb in b)) for name in STATE_IN[:num_states])
            return prof

        return [profile((1, 1, 1)), profile((1, self.opt_prefill, self.max_prefill))]

    def clamp(self, batches, prefills) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Batch sizes and prefill lengths (a parity check's) moved inside these profiles, duplicates dropped."""
        within = lambda values, lo, hi: tuple(dict.fromkeys(min(max(v, lo), hi) for v in values))  # noqa: E731
        return within(batches, self.min_batch, self.max_batch), within(prefills, 1, self.max_prefill)


# What the server's TensorRT provider is built for when nothing else is said: its default --max-batch (64) and
# --prefill-chunk (256) with room to spare. A shape outside these makes onnxruntime rebuild the engine.
SERVER_PROFILES = Profiles(max_batch=256, max_prefill=1024)


def ort_trt_options(hidden_size: int, num_states: int, profiles: Profiles = SERVER_PROFILES,
                    cache_dir: Path | str | None = None, device_id: int = 0) -> dict:
    """Provider options of onnxruntime's TensorRT provider with the two explicit profiles of `Profiles`: the
    same input named once per profile ('tokens:1x1,h_in:1x256,tokens:1x1,h_in:1x256'). No trt_fp16_enable:
    it makes the provider build weakly typed; the fp16 ONNX carries its types (strongly typed build)."""
    shapes = profiles.shapes(hidden_size, num_states)
    spec = lambda i: ",".join(f"{name}:{'x'.join(map(str, dims[i]))}"  # noqa: E731
                              for prof in shapes for name, dims in prof.items())
    opts = {"device_id": str(device_id), "trt_profile_min_shapes": spec(0), "trt_profile_opt_shapes": spec(1),
            "trt_profile_max_shapes": spec(2)}
    if cache_dir:
        opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(cache_dir))
    return opts


def fp32_math() -> bool:
    """Turn TF32 off in every CUDA library this process loads (cuBLAS, cuDNN, TensorRT) through
    NVIDIA_TF32_OVERRIDE=0, for fp32 parity at 1e-5: onnxruntime's TensorRT provider has no switch for it and
    TF32 rounds matmul inputs to 10 mantissa bits on Ampere and later. The libraries read it when they load,
    so call this before the first GPU session. False when the variable was already set otherwise."""
    return os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0") == "0"


def preload_gpu_libraries() -> None:
    """onnxruntime.preload_dlls() (onnxruntime >= 1.21) where it exists: load CUDA and cuDNN from the
    nvidia-* wheels, so that the CUDA provider finds them without LD_LIBRARY_PATH."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 -- a failed preload is reported by the session check that follows
            log.warning("onnxruntime.preload_dlls() failed: %s", e)


class Runtime:
    """Base class: metadata plus numpy-state helpers. Subclasses implement `step`."""

    backend = "?"

    def __init__(self, model_id: str, cell: str, hidden_size: int, fc_layers: int, vocab: Vocab):
        self.model_id, self.cell, self.hidden_size, self.fc_layers = model_id, cell, hidden_size, fc_layers
        self.vocab = vocab
        self.num_states = 2 if cell == "lstm" else 1

    def new_state(self, batch: int):
        return tuple(np.zeros((batch, self.hidden_size), np.float32) for _ in range(self.num_states))

    def step(self, tokens: np.ndarray, state) -> tuple[np.ndarray, object]:
        """tokens (B, T) int64 -> logits (B, V) float32 at the last position, new state."""
        raise NotImplementedError

    def take(self, state, rows) -> object:
        """The state of the streams at `rows` (a list of indices), as a batch of len(rows)."""
        return tuple(s[rows] for s in state)

    def concat(self, states: list) -> object:
        return tuple(np.concatenate(parts) for parts in zip(*states))

    def describe(self) -> dict:
        return {"model_id": self.model_id, "cell": self.cell, "hidden_size": self.hidden_size,
                "fc_layers": self.fc_layers, "vocab": self.vocab.chars, "backend": self.backend}


class TorchRuntime(Runtime):
    """Eager PyTorch on a checkpoint directory (the reference every other runtime is checked against)."""

    backend = "torch"

    def __init__(self, ckpt_dir: Path, device: str = "cpu"):
        import torch  # here, not at the top: servers of exports never load torch (~1 s, ~185 MB a process)

        from train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(ckpt_dir, device)
        cfg = ckpt.model.cfg
        super().__init__(ckpt.model_id, cfg.cell, cfg.hidden_size, cfg.fc_layers, ckpt.vocab)
        self.model, self.device = ckpt.model, torch.device(device)

    def step(self, tokens, state):
        import torch

        with torch.inference_mode():
            t = torch.as_tensor(tokens, dtype=torch.int64, device=self.device)
            st = tuple(torch.as_tensor(s, device=self.device) for s in state)
            logits, st = self.model(t, st)  # (B, T, V)
            return logits[:, -1].float().cpu().numpy(), tuple(s.float().cpu().numpy() for s in st)


def read_onnx_metadata(path: Path) -> dict:
    """The metadata_props of an exported model, with numbers parsed."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: not a charrnn step model (metadata lacks {', '.join(missing)})")
    meta["hidden_size"], meta["fc_layers"] = int(meta["hidden_size"]), int(meta["fc_layers"])
    meta["vocab"] = json.loads(meta["vocab"])  # stored as a JSON string: vocabularies hold newlines
    return meta


class ProviderUnavailable(RuntimeError):
    """onnxruntime did not run the session on the execution provider asked for (it falls back quietly)."""


class OrtRuntime(Runtime):
    """ONNX Runtime on an exported step model; providers e.g. ["CPUExecutionProvider"].

    A bare "TensorrtExecutionProvider" gets explicit decode and prefill profiles (`trt_profiles`), so the
    provider builds its engine once instead of again whenever the batch grows. `strict`: raise
    ProviderUnavailable unless the session's first provider is the first one asked for (onnxruntime lists
    CUDA and TensorRT when its GPU build is installed and falls back to the next provider, CPU at the end,
    when their libraries do not load).

    On CUDA and TensorRT the state stays in device memory between steps (IOBinding, OrtValues on the
    device) and only the logits come back to the host; `bind` forces this on or off. onnxruntime's Python
    API has no gather on the device, so `take` and `concat` copy through the host: they run when the batch
    changes (a stream joins or leaves), not at every step.
    """

    backend = "onnxruntime"

    def __init__(self, onnx_path: Path, providers: list | None = None, threads: int = 0, *,
                 strict: bool = False, bind: bool | None = None, trt_profiles: Profiles = SERVER_PROFILES,
                 trt_cache: Path | None = None):
        import onnxruntime as ort

        meta = read_onnx_metadata(onnx_path)
        super().__init__(meta["model_id"], meta["cell"], meta["hidden_size"], meta["fc_layers"], Vocab(meta["vocab"]))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])
        names = [p if isinstance(p, str) else p[0] for p in providers]
        if meta.get("precision") == "fp16" and set(names) <= {"CPUExecutionProvider"}:
            # onnxruntime's CPU graph optimizer crashes the process (SIGSEGV, onnxruntime 1.32) on fp16
            # recurrent models at ORT_ENABLE_ALL; the extended level runs them correctly.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if set(names) & set(GPU_PROVIDERS):
            preload_gpu_libraries()
        providers = [("TensorrtExecutionProvider", ort_trt_options(self.hidden_size, self.num_states, trt_profiles,
                                                                   trt_cache))
                     if p == "TensorrtExecutionProvider" else p for p in providers]
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.providers = self.session.get_providers()
        if strict and self.providers[0] != names[0]:
            raise ProviderUnavailable(f"onnxruntime did not load {names[0]} for {Path(onnx_path).name} (the session "
                                      f"runs on {', '.join(self.providers)}; see onnxruntime's log for why)")
        self.device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self.bind = self.device == "cuda" if bind is None else bind
        self._ort = ort
        self._state_in = list(STATE_IN[: self.num_states])
        self._state_out = list(STATE_OUT[: self.num_states])
        self._outputs = ["logits", *self._state_out]

    def _device_value(self, a: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32), self.device, 0)

    @staticmethod
    def _host(s) -> np.ndarray:
        return s if isinstance(s, np.ndarray) else s.numpy()

    def new_state(self, batch: int):
        zeros = super().new_state(batch)
        return tuple(map(self._device_value, zeros)) if self.bind else zeros

    def take(self, state, rows):
        if not self.bind:
            return super().take(state, rows)
        return tuple(self._device_value(self._host(s)[rows]) for s in state)

    def concat(self, states: list):
        if not self.bind:
            return super().concat(states)
        return tuple(self._device_value(np.concatenate([self._host(s) for s in parts])) for parts in zip(*states))

    def step(self, tokens, state):
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)  # (B, T)
        if not self.bind:
            feed = {"tokens": tokens}
            feed.update((n, self._host(s)) for n, s in zip(self._state_in, state))
            logits, *new_state = self.session.run(self._outputs, feed)
            return logits, tuple(new_state)
        io = self.session.io_binding()
        io.bind_cpu_input("tokens", tokens)
        for name, s in zip(self._state_in, state):  # (B, H) each, on the device unless a caller passed numpy
            if isinstance(s, np.ndarray):
                io.bind_cpu_input(name, np.ascontiguousarray(s, np.float32))
            else:
                io.bind_ortvalue_input(name, s)
        io.bind_output("logits", "cpu")
        for name in self._state_out:
            io.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(io)
        logits, *new_state = io.get_outputs()  # in binding order
        return logits.numpy(), tuple(new_state)
