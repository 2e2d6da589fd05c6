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
        self.seed, self.block = seed, block
        self.rng: Generator | None = None  # made at the first draw: until then this is its seed (small to pickle)
        self._left: list[float] = []  # the current block, reversed: pop() takes the next draw

    def random(self) -> float:
        if not self._left:
            if self.rng is None:
                self.rng = default_rng(self.seed)
            self._left = self.rng.random(self.block).tolist()[::-1]
        return self._left.pop()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-probabilities over the last axis, in float64: the model's own distribution (before any sampling
    setting). The server's Predict and logprobs and export's quality check use it."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


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
    call (64 rows: ~0.07 ms, ~0.05 prepared as a BatchSampler, against ~0.5 ms one by one), and a seeded
    stream gives the same text alone or among others. Greedy rows (temperature <= 0) take no random number.
    """
    logits = np.asarray(logits)
    return BatchSampler(temperature, top_k, top_p, rngs, logits.shape[1])(logits)


class BatchSampler:
    """`sample_many` for rows that keep their settings from step to step: what does not depend on the logits
    is worked out once (the server makes one when streams join or leave its batch, not every step)."""

    def __init__(self, temperature, top_k, top_p, rngs, vocab_size: int):
        t = np.asarray(temperature, np.float64)
        self.size, self.V = len(t), vocab_size
        if self.size == 1:  # one stream: the scalar path is ~3x cheaper than the batch bookkeeping
            self.one = (float(t[0]), int(top_k[0]), float(top_p[0]), rngs[0])
            return
        self.one = None
        rows = self.rows = np.flatnonzero(t > 0)  # greedy rows take argmax and no random number
        self.every_row = rows.size == self.size
        self.t = t[rows, None]
        k = np.asarray(top_k, np.int64)[rows]
        self.cut = np.flatnonzero((k > 0) & (k < vocab_size))  # rows of z kept to their top k
        self.kth = vocab_size - k[self.cut]  # the k-th largest's place in a sorted row
        tp = np.asarray(top_p, np.float64)[rows]
        self.nucleus = np.flatnonzero(tp < 1.0)  # rows of z kept to their top-p nucleus
        self.top_p = tp[self.nucleus, None]
        self.rngs = [rngs[i] for i in rows.tolist()]

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.one is not None:
            return np.array([sample(logits[0], *self.one)])
        if self.rows.size == 0:
            return np.argmax(logits, axis=1)
        V = self.V
        z = (logits if self.every_row else logits[self.rows]).astype(np.float64) / self.t  # (R, V)
        if self.cut.size:
            zc = z[self.cut]
            kth = np.sort(zc, axis=1)[np.arange(self.cut.size), self.kth]  # the k-th largest of each row
            zc[zc < kth[:, None]] = -np.inf
            z[self.cut] = zc
        p = np.exp(z - z.max(axis=1, keepdims=True))  # unnormalised: the draw below scales by the total
        if self.nucleus.size:
            q = p[self.nucleus]
            q /= q.sum(axis=1, keepdims=True)
            order = np.argsort(-q, axis=1, kind="stable")
            cum = np.cumsum(np.take_along_axis(q, order, axis=1), axis=1)
            keep = (cum < self.top_p).sum(axis=1) + 1  # the smallest prefix with mass >= top_p
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.broadcast_to(np.arange(V), order.shape), axis=1)
            q[rank >= keep[:, None]] = 0.0
            p[self.nucleus] = q
        # inverse-CDF draw, as Generator.choice(p=...) does, without its per-call validation
        cdf = np.cumsum(p, axis=1)
        u = np.fromiter([rng.random() for rng in self.rngs], np.float64, self.rows.size) * cdf[:, -1]
        draws = np.minimum((cdf <= u[:, None]).sum(axis=1), V - 1)
        if self.every_row:
            return draws
        out = np.argmax(logits, axis=1)
        out[self.rows] = draws
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
