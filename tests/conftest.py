from pathlib import Path

import pytest
import torch

from train import corpus
from train.checkpoint import write_checkpoint
from train.model import CharRNN, ModelConfig, model_id
from train.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]

SMALL_TEXT = "the quick brown fox jumps over the lazy dog.\nTHE END!\n"


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """Tiny Shakespeare as the tools find it by default ($CHARRNN_DATA_DIR, else the package's own copy)."""
    return corpus.load_text(corpus.resolve("tinyshakespeare"))


def make_checkpoint(root: Path, cell: str = "lstm", hidden: int = 32, fc: int = 2, seq_len: int = 16,
                    text: str = SMALL_TEXT, seed: int = 0) -> Path:
    """A real checkpoint directory with random weights (no training), for export and serve tests."""
    torch.manual_seed(seed)
    vocab = Vocab.from_text(text)
    model = CharRNN(ModelConfig(cell, len(vocab), hidden, fc))
    mid = model_id(cell, hidden, fc, seq_len)
    ckpt = Path(root) / mid
    write_checkpoint(ckpt, model, vocab, mid, train={"seq_len": seq_len}, corpus={"name": "test"}, done=True)
    return ckpt


@pytest.fixture
def checkpoint_factory(tmp_path):
    return lambda **kw: make_checkpoint(tmp_path, **kw)
