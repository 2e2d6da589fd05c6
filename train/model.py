"""The character model shared by every stage: Embedding -> one RNN/LSTM/GRU layer -> FC head.

State is a tuple of batch-first tensors: ``(h,)`` for RNN and GRU, ``(h, c)`` for LSTM, each (B, H).
Batch-first state is what the exported step model and Triton's implicit state use, so every
backend speaks the same shape.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

CELLS = ("rnn", "lstm", "gru")
_RNN_CLASSES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}

State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ModelConfig:
    cell: str  # rnn | lstm | gru
    vocab_size: int
    hidden_size: int = 256
    fc_layers: int = 1  # Linear layers in the head; the last one maps H -> V
    dropout: float = 0.0  # on the recurrent output; adds no parameters

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {', '.join(CELLS)}")
        if self.vocab_size < 1 or self.hidden_size < 1 or self.fc_layers < 1:
            raise ValueError(f"vocab_size, hidden_size and fc_layers must be >= 1: {self}")

    @property
    def num_states(self) -> int:
        return 2 if self.cell == "lstm" else 1

    def to_dict(self) -> dict:
        return asdict(self)


def model_id(cell: str, hidden_size: int, fc_layers: int, seq_len: int) -> str:
    return f"{cell}-h{hidden_size}-fc{fc_layers}-s{seq_len}"


class CharRNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, V = cfg.hidden_size, cfg.vocab_size
        self.embed = nn.Embedding(V, H)
        self.rnn = _RNN_CLASSES[cfg.cell](H, H, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        head: list[nn.Module] = []
        for _ in range(cfg.fc_layers - 1):
            head += [nn.Linear(H, H), nn.ReLU()]
        head.append(nn.Linear(H, V))  # no activation on the logits (the seed's ReLU here was a bug)
        self.head = nn.Sequential(*head)

    def zero_state(self, batch_size: int, device=None, dtype=torch.float32) -> State:
        device = device or self.embed.weight.device
        z = lambda: torch.zeros(batch_size, self.cfg.hidden_size, device=device, dtype=dtype)  # noqa: E731
        return tuple(z() for _ in range(self.cfg.num_states))

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """tokens (B, T) int64, state of (B, H) tensors -> logits (B, T, V), new state."""
        if state is None:
            state = self.zero_state(tokens.shape[0], tokens.device)
        x = self.embed(tokens)  # (B, T, H)
        if tokens.shape[1] == 1 and not torch.onnx.is_in_onnx_export():
            return self._one_step(x[:, 0], state)
        hx = tuple(s.unsqueeze(0).contiguous() for s in state)  # (1, B, H): nn.RNN's layout
        y, hx = self.rnn(x, hx if self.cfg.cell == "lstm" else hx[0])  # y (B, T, H)
        hx = hx if isinstance(hx, tuple) else (hx,)
        logits = self.head(self.drop(y))  # (B, T, V)
        return logits, tuple(s.squeeze(0) for s in hx)


    def _one_step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """T = 1 through the fused cell op with the layer's own weights: same math as nn.RNN/LSTM/GRU,
        but on CPU nn.LSTM's oneDNN path costs ~0.5-6 ms per call at T = 1 (measured, torch 2.13),
        against ~0.1-0.3 ms here. Generation and serving step one character at a time."""
        r = self.rnn
        w = (r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0, r.bias_hh_l0)
        if self.cfg.cell == "lstm":
            new = torch.lstm_cell(x, state, *w)  # (h, c), each (B, H)
        elif self.cfg.cell == "gru":
            new = (torch.gru_cell(x, state[0], *w),)
        else:
            new = (torch.rnn_tanh_cell(x, state[0], *w),)
        return self.head(self.drop(new[0])).unsqueeze(1), tuple(new)  # logits (B, 1, V)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_mb(parameters: int) -> float:
    """fp32 weight size in MiB, as the seed computed it (parameters x 4 / 2^20)."""
    return parameters * 4 / 2**20
