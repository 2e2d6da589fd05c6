"""Step runtimes: one protocol for every way of running a model (DESIGN.md, "Backends").

A runtime makes a zero state for B streams and runs tokens (B, T) with a state, returning the
last-position logits (B, V) and the new state. State is opaque to callers: they only pass it back,
pick rows of it (`take`) and join states of several streams (`concat`). The server's scheduler,
the benchmark and the parity checks are written against this class alone.

Runtimes here: eager PyTorch from a checkpoint directory, ONNX Runtime from an exported .onnx file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train.vocab import Vocab

# metadata_props keys of an exported model (DESIGN.md "Exported step model")
META_KEYS = ("model_id", "cell", "hidden_size", "fc_layers", "vocab", "checkpoint_sha256")


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


class OrtRuntime(Runtime):
    """ONNX Runtime on an exported step model; providers e.g. ["CPUExecutionProvider"]."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: Path, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        meta = read_onnx_metadata(onnx_path)
        super().__init__(meta["model_id"], meta["cell"], meta["hidden_size"], meta["fc_layers"], Vocab(meta["vocab"]))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        names = {p if isinstance(p, str) else p[0] for p in providers or ["CPUExecutionProvider"]}
        if meta.get("precision") == "fp16" and names <= {"CPUExecutionProvider"}:
            # onnxruntime's CPU graph optimizer crashes the process (SIGSEGV, onnxruntime 1.32) on fp16
            # recurrent models at ORT_ENABLE_ALL; the extended level runs them correctly.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers or ["CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self._state_in = ["h_in", "c_in"][: self.num_states]
        self._outputs = ["logits", "h_out", "c_out"][: 1 + self.num_states]

    def step(self, tokens, state):
        feed = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64)}
        feed.update(zip(self._state_in, state))
        logits, *new_state = self.session.run(self._outputs, feed)
        return logits, tuple(new_state)
