"""Choosing the next character from logits, and generating text with a model.

`sample` is the one sampler every stage uses (training samples, the server, the benchmark), so the
same seed gives the same text wherever it runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.random import Generator, default_rng  # at import: numpy loads numpy.random lazily, ~18 ms on first use

from train.vocab import Vocab

if TYPE_CHECKING:
    from train.model import CharRNN


class Uniforms:
    """`random()` of a numpy Generator, drawn `block` at a time: the same numbers in the same order (a
    test checks), for ~0.1 us a call instead of ~0.7 us. For a generator used for nothing else."""

    def __init__(self, seed=None, block: int = 256):
        self.rng, self.block = default_rng(seed), block
        self._left: list[float] = []  # the current block, reversed: pop() takes the next draw

    def random(self) -> float:
        if not self._left:
            self._left = self.rng.random(self.block).tolist()[::-1]
        return self._left.pop()


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: Generator | Uniforms | None = None) -> int:
    """One next-token id from logits (V,). temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.

    The same arithmetic as `sample_many` on one row (a test checks they agree draw for draw), without
    its batch bookkeeping, which would triple the cost of a single stream's step.
    """
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())  # unnormalised: the draw below scales by the total
    if top_p < 1.0:
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        p[order[int(np.searchsorted(cum, top_p)) + 1:]] = 0.0  # keep the smallest prefix with mass >= top_p
    # inverse-CDF draw, as Generator.choice(p=...) does, without its validation (~40% of the time)
    cdf = np.cumsum(p)
    rng = rng if rng is not None else default_rng()
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), z.size - 1)


def sample_many(logits: np.ndarray, temperature, top_k, top_p, rngs) -> np.ndarray:
    """Next-token ids (B,) for logits (B, V), row i with its own settings and generator.

    Row i's draw equals sample(logits[i], temperature[i], top_k[i], top_p[i], rngs[i]) and so does not
    depend on the rest of the batch (a test checks both): the server samples all its streams in one
    call (64 rows: ~0.3 ms instead of ~4.7 ms), and a seeded stream gives the same text alone or among
    others. Greedy rows (temperature <= 0) take no random number.
    """
    logits = np.asarray(logits)
    B, V = logits.shape
    if B == 1:  # one stream: the scalar path is ~3x cheaper than the batch bookkeeping
        return np.array([sample(logits[0], temperature[0], top_k[0], top_p[0], rngs[0])])
    t = np.asarray(temperature, np.float64)
    out = np.argmax(logits, axis=1)
    rows = np.flatnonzero(t > 0)
    if rows.size == 0:
        return out
    z = (logits if rows.size == B else logits[rows]).astype(np.float64) / t[rows, None]  # (R, V)
    k = np.asarray(top_k, np.int64)[rows]
    cut = (k > 0) & (k < V)
    if cut.any():
        kth = np.sort(z[cut], axis=1)[np.arange(cut.sum()), V - k[cut]]  # the k-th largest of each row
        zc = z[cut]
        zc[zc < kth[:, None]] = -np.inf
        z[cut] = zc
    p = np.exp(z - z.max(axis=1, keepdims=True))  # unnormalised: the draw below scales by the total
    tp = np.asarray(top_p, np.float64)[rows]
    nucleus = tp < 1.0
    if nucleus.any():
        q = p[nucleus]
        q /= q.sum(axis=1, keepdims=True)
        order = np.argsort(-q, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(q, order, axis=1), axis=1)
        keep = (cum < tp[nucleus, None]).sum(axis=1) + 1  # the smallest prefix with mass >= top_p
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(V), order.shape), axis=1)
        q[rank >= keep[:, None]] = 0.0
        p[nucleus] = q
    # inverse-CDF draw, as Generator.choice(p=...) does, without its per-call validation
    cdf = np.cumsum(p, axis=1)
    u = np.array([rngs[i].random() for i in rows.tolist()]) * cdf[:, -1]
    out[rows] = np.minimum((cdf <= u[:, None]).sum(axis=1), V - 1)
    return out


def generate(model: CharRNN, vocab: Vocab, prompt: str, n: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = 0) -> str:
    """n characters after prompt, the hidden state carried from step to step (one step per character)."""
    import torch  # here: the server imports this module for `sample_many` and never needs torch

    model.eval()
    device = model.embed.weight.device
    rng = default_rng(seed)
    out = []
    with torch.inference_mode():
        tokens = torch.from_numpy(vocab.encode(prompt)).to(device).unsqueeze(0)  # (1, T)
        logits, state = model(tokens)  # prefill the whole prompt in one call
        for _ in range(n):
            nxt = sample(logits[0, -1].float().cpu().numpy(), temperature, top_k, top_p, rng)
            out.append(nxt)
            logits, state = model(torch.tensor([[nxt]], device=device), state)
    return vocab.decode(out)


def generate_refeed(model: CharRNN, vocab: Vocab, prompt: str, n: int, seq_len: int) -> str:
    """The seed's decoding: greedy, re-running the last seq_len characters from a zero state for every character."""
    import torch

    model.eval()
    device = model.embed.weight.device
    ids = list(vocab.encode(prompt))
    with torch.inference_mode():
        for _ in range(n):
            window = torch.tensor([ids[-seq_len:]], device=device)  # (1, seq_len)
            logits, _ = model(window)
            ids.append(int(logits[0, -1].argmax()))
    return vocab.decode(ids[len(ids) - n:])
