"""Choosing the next character from logits, and generating text with a model.

`sample` is the one sampler every stage uses (training samples, the server, the benchmark), so the
same seed gives the same text wherever it runs.
"""
from __future__ import annotations

import numpy as np
import torch

from train.model import CharRNN
from train.vocab import Vocab


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:
    """One next-token id from logits (V,). temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
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
    # inverse-CDF draw: what Generator.choice(p=...) does, without its validation (~40% of the sampler's time)
    cdf = np.cumsum(p)
    rng = rng if rng is not None else np.random.default_rng()
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


@torch.inference_mode()
def generate(model: CharRNN, vocab: Vocab, prompt: str, n: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = 0) -> str:
    """n characters after prompt, the hidden state carried from step to step (one step per character)."""
    model.eval()
    device = model.embed.weight.device
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(vocab.encode(prompt)).to(device).unsqueeze(0)  # (1, T)
    logits, state = model(tokens)  # prefill the whole prompt in one call
    out = []
    for _ in range(n):
        nxt = sample(logits[0, -1].float().cpu().numpy(), temperature, top_k, top_p, rng)
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return vocab.decode(out)


@torch.inference_mode()
def generate_refeed(model: CharRNN, vocab: Vocab, prompt: str, n: int, seq_len: int) -> str:
    """The seed's decoding: greedy, re-running the last seq_len characters from a zero state for every character."""
    model.eval()
    device = model.embed.weight.device
    ids = list(vocab.encode(prompt))
    for _ in range(n):
        window = torch.tensor([ids[-seq_len:]], device=device)  # (1, seq_len)
        logits, _ = model(window)
        ids.append(int(logits[0, -1].argmax()))
    return vocab.decode(ids[len(ids) - n:])
