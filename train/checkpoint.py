"""Checkpoint directories: config.json (model config, vocabulary, training config, corpus, metrics)
and model.safetensors, each written atomically. Loading never unpickles anything.

This module and `train.model`, `train.vocab`, `train.sampling` are the pieces the other stages import.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from train.model import CharRNN, ModelConfig
from train.vocab import Vocab

FORMAT = "charrnn-checkpoint/1"
CONFIG, WEIGHTS = "config.json", "model.safetensors"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's umask, as open() would apply it


class CheckpointError(Exception):
    """A checkpoint directory is missing, corrupted or not ours."""


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via a temp file in the same directory + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's file is private (0600); a written artifact is not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(path: Path, model: torch.nn.Module) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, st_save(state))


def save_config(ckpt_dir: Path, config: dict) -> None:
    atomic_write(Path(ckpt_dir) / CONFIG, json.dumps({"format": FORMAT, **config}, indent=2) + "\n")


def write_checkpoint(ckpt_dir: Path, model: CharRNN, vocab: Vocab, model_id: str, **extra) -> None:
    """Weights first, then config.json: a directory whose config is readable has its weights."""
    save_weights(Path(ckpt_dir) / WEIGHTS, model)
    save_config(ckpt_dir, {"model_id": model_id, "model": model.cfg.to_dict(), "vocab": vocab.chars, **extra})


def read_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint directory (no {CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a charrnn checkpoint (format {FORMAT!r} expected)")
    return config


@dataclass
class Checkpoint:
    path: Path
    config: dict
    model: CharRNN
    vocab: Vocab

    @property
    def model_id(self) -> str:
        return self.config["model_id"]


def load_checkpoint(ckpt_dir: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the directory alone; any damage is a CheckpointError that says what is wrong."""
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    try:
        vocab = Vocab(config["vocab"])
        cfg = ModelConfig(**config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir / CONFIG}: bad model config or vocabulary ({e})") from None
    if cfg.vocab_size != len(vocab):
        raise CheckpointError(f"{ckpt_dir}: vocab_size {cfg.vocab_size} != {len(vocab)} vocabulary characters")
    weights = ckpt_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS} (training not finished or files lost)")
    try:
        state = st_load(weights.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{weights}: corrupted weights ({e})") from None
    model = CharRNN(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not match the config ({e})") from None
    return Checkpoint(ckpt_dir, config, model.to(device).eval(), vocab)
