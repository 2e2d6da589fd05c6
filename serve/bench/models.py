"""Which models the benchmark runs: finished checkpoints from grid runs, or random-weight stand-ins.

Timing does not depend on the weights, so a clean checkout benchmarks random-weight checkpoints of the
grid's shapes (written with train.checkpoint, exactly as training writes them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from train.checkpoint import WEIGHTS, CheckpointError, read_config, write_checkpoint
from train.model import CharRNN, ModelConfig, model_id
from train.vocab import Vocab

log = logging.getLogger(__name__)

# tiny Shakespeare's 65 characters: the vocabulary of random-weight models (V sets the head's size)
SHAKESPEARE_VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SEQ_LEN = 50  # random-weight models' seq_len: the re-feeding target is stated at 50
GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # weight blocks of H x H per recurrent matrix


@dataclass(frozen=True)
class BenchModel:
    path: Path  # checkpoint directory
    model_id: str
    cell: str
    hidden_size: int
    fc_layers: int
    vocab_size: int
    seq_len: int | None  # the window it was trained on (None: not recorded)
    weights: str  # "trained" | "random"

    def weight_bytes(self, batch: int, bytes_per_param: int = 4) -> int:
        """Bytes of weights one step at this batch reads: recurrent and head matrices and biases, and the
        input side: with fewer characters than hidden units the export folds the embedding into the input
        weights (G*H x V, export.onnx.fold_embedding), else the input weights and the embedding rows of the
        step's tokens (at most V distinct ones). The folded size is the bar for every backend."""
        H, V, G = self.hidden_size, self.vocab_size, GATES[self.cell]
        inputs = G * H * V if V < H else G * H * H + min(batch, V) * H
        recurrent = inputs + G * H * H + 2 * G * H  # input side, W_hh, b_ih, b_hh
        head = (self.fc_layers - 1) * (H * H + H) + H * V + V
        return bytes_per_param * (recurrent + head)

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of one step at this batch (the matrix products; pointwise ops are noise)."""
        H, V, G = self.hidden_size, self.vocab_size, GATES[self.cell]
        return 2 * batch * (G * H * min(V, H) + G * H * H + (self.fc_layers - 1) * H * H + H * V)

    def describe(self) -> dict:
        return {"model": self.model_id, "cell": self.cell, "hidden_size": self.hidden_size,
                "fc_layers": self.fc_layers, "seq_len": self.seq_len}


def from_checkpoint(path: Path, weights: str = "trained") -> BenchModel:
    config = read_config(path)
    m = config["model"]
    return BenchModel(Path(path), config["model_id"], m["cell"], m["hidden_size"], m["fc_layers"],
                      m["vocab_size"], (config.get("train") or {}).get("seq_len"), weights)


def is_finished(path: Path) -> bool:
    """A checkpoint directory whose training finished (config.json says done, and the weights are there)."""
    try:
        return bool(read_config(path).get("done")) and (Path(path) / WEIGHTS).is_file()
    except CheckpointError:
        return False


def find_models(paths: list[Path], cells: tuple[str, ...] = (), hidden_sizes: tuple[int, ...] = ()) -> list[BenchModel]:
    """Checkpoints named directly are taken as they are; a grid run directory gives one finished model per
    (cell, hidden size): the one trained at seq_len 50 if any (the re-feeding target), then the fewest fc
    layers. `cells` and `hidden_sizes` filter both (empty: all)."""
    keep = lambda m: (not cells or m.cell in cells) and (not hidden_sizes or m.hidden_size in hidden_sizes)  # noqa: E731
    chosen: list[BenchModel] = []
    for path in map(Path, paths):
        if (path / "config.json").is_file():
            if not is_finished(path):
                raise CheckpointError(f"{path}: not a finished checkpoint (config.json done=true and {WEIGHTS})")
            chosen += [m for m in [from_checkpoint(path)] if keep(m)]
            continue
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint or grid run directory")
        found = [from_checkpoint(p) for p in sorted(path.iterdir()) if p.is_dir() and is_finished(p)]
        groups: dict[tuple[str, int], list[BenchModel]] = {}
        for m in filter(keep, found):
            groups.setdefault((m.cell, m.hidden_size), []).append(m)
        for group in groups.values():
            chosen.append(min(group, key=lambda m: (abs((m.seq_len or 0) - SEQ_LEN), m.fc_layers, m.model_id)))
        log.info("%s: %d finished checkpoints, %d chosen", path, len(found), len(groups))
    if not chosen:
        raise CheckpointError(f"no finished checkpoints in {', '.join(map(str, paths))}"
                              + (" matching the --cells/--hidden-sizes filters" if cells or hidden_sizes else ""))
    return sorted(chosen, key=lambda m: (m.cell, m.hidden_size, m.fc_layers, m.model_id))


def random_models(root: Path, cells: tuple[str, ...], hidden_sizes: tuple[int, ...], fc_layers: int = 1,
                  seed: int = 0) -> list[BenchModel]:
    """Random-weight checkpoints of these shapes under root (tiny Shakespeare's vocabulary, seq_len 50)."""
    vocab = Vocab(SHAKESPEARE_VOCAB)
    models = []
    for cell in cells:
        for hidden in hidden_sizes:
            torch.manual_seed(seed)
            mid = model_id(cell, hidden, fc_layers, SEQ_LEN)
            write_checkpoint(Path(root) / mid, CharRNN(ModelConfig(cell, len(vocab), hidden, fc_layers)), vocab, mid,
                             train={"seq_len": SEQ_LEN}, corpus={"name": "random weights (serve.bench)"}, done=True)
            models.append(from_checkpoint(Path(root) / mid, weights="random"))
    return models
