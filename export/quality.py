"""Quality on held-out text: how an approximate export (int8) is accepted, where allclose cannot be.

The held-out loss is the project's protocol (train.trainer.eval_stream): the validation split of the corpus
the checkpoint was trained on, read as 8 contiguous streams with the state carried, every character scored,
mean cross-entropy in nats/char. The candidate is run through the step protocol one character at a time (the
decode step it serves with); the reference is the checkpoint in eager PyTorch, fp32. Greedy agreement: 1,000
characters generated greedily from the corpus's seed prompt by each, each feeding back its own choice, counted
up to the first character where they differ.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.parity import ParityError
from export.runtime import Runtime, TorchRuntime
from train.sampling import log_softmax

QUALITY_NATS = 0.01  # accepted when the candidate's held-out loss is at most this much above fp32's
GREEDY_CHARS = 1000
N_STREAMS = 8  # as train.trainer.eval_stream


class QualityError(ParityError):
    """An approximate export is not good enough on held-out text, or there is no held-out text to judge it by."""


def corpus_text(ckpt, data: Path | str | None = None) -> tuple[str, str]:
    """(corpus name, text) the checkpoint was trained on: `data` if given (a file or its folder: the user's
    choice, used as given), else the path its config.json records, else the corpus found as training finds it
    (train.corpus.resolve); either of those only when its sha256 is the one the checkpoint recorded."""
    from train.corpus import CORPORA, CorpusError, load_text, resolve, sha256_text

    info = ckpt.config.get("corpus") or {}
    name, want = info.get("name", ""), info.get("sha256")
    if data:
        data = Path(data)
        path = data / CORPORA[name].filename if data.is_dir() and name in CORPORA else data
        if path.is_file():
            return name, load_text(path)
    else:
        found = []
        if info.get("path"):
            found.append(lambda: Path(info["path"]))
        if name in CORPORA:
            found.append(lambda: resolve(name))
        for where in found:
            try:
                text = load_text(where())
            except (CorpusError, OSError):
                continue
            if not want or sha256_text(text) == want:
                return name, text
    raise QualityError(f"{ckpt.model_id}: the held-out check needs the text it was trained on ({name or 'unnamed'}, "
                       f"{info.get('path') or 'no path recorded'}, sha256 {str(want)[:12]}...) and it is not there; "
                       "pass --data PATH")


def stream_loss(rt: Runtime, ids: np.ndarray, n_streams: int = N_STREAMS) -> tuple[float, float]:
    """(mean nats/char, top-1 accuracy) of `rt` over ids as n contiguous streams, one character per step."""
    L = len(ids) // n_streams
    data = ids[: n_streams * L].reshape(n_streams, L)  # (n, L)
    state = rt.new_state(n_streams)
    loss, correct = 0.0, 0
    for t in range(L - 1):
        logits, state = rt.step(data[:, t: t + 1], state)  # (n, V)
        logp = log_softmax(logits)
        target = data[:, t + 1]
        loss -= logp[np.arange(n_streams), target].sum()
        correct += int((logits.argmax(-1) == target).sum())
    count = n_streams * (L - 1)
    return loss / count, correct / count


def greedy(rt: Runtime, prompt_ids: np.ndarray, n: int) -> list[int]:
    logits, state = rt.step(prompt_ids[None, :], rt.new_state(1))
    out = []
    for _ in range(n):
        nxt = int(logits[0].argmax())
        out.append(nxt)
        logits, state = rt.step(np.array([[nxt]]), state)
    return out


def check_quality(ckpt, cand: Runtime, data: Path | str | None = None, tol: float = QUALITY_NATS) -> dict:
    """Held-out loss of `cand` against the checkpoint's fp32 loss, and greedy agreement; `passed` says whether
    the loss is within `tol`."""
    import time

    import torch

    from train.corpus import prompt, split
    from train.trainer import eval_stream

    t0 = time.perf_counter()
    name, text = corpus_text(ckpt, data)
    val = split(text)[1]
    ids = ckpt.vocab.encode(val)
    ref_loss, ref_acc = eval_stream(ckpt.model.eval(), torch.from_numpy(ids), N_STREAMS)
    loss, acc = stream_loss(cand, ids)
    prompt_ids = ckpt.vocab.encode(prompt(name, text) if name else text[:256])
    a, b = greedy(TorchRuntime(ckpt.path), prompt_ids, GREEDY_CHARS), greedy(cand, prompt_ids, GREEDY_CHARS)
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), GREEDY_CHARS)
    return {"passed": bool(loss - ref_loss <= tol), "tol_nats": tol, "corpus": name, "held_out_chars": len(ids),
            "fp32_loss": round(float(ref_loss), 5), "loss": round(float(loss), 5),
            "delta_nats": round(float(loss - ref_loss), 5), "fp32_acc": round(float(ref_acc), 5), "acc": round(float(acc), 5), "greedy_chars": GREEDY_CHARS,
            "greedy_identical_chars": agree, "seconds": round(time.perf_counter() - t0, 3)}


def summary(report: dict) -> str:
    verdict = "passed" if report["passed"] else "FAILED"
    return (f"quality {verdict}: held-out loss {report['loss']:.4f} vs fp32 {report['fp32_loss']:.4f} nats/char "
            f"({report['delta_nats']:+.4f}, tolerance {report['tol_nats']}), greedy identical for "
            f"{report['greedy_identical_chars']}/{report['greedy_chars']} chars")
