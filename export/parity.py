"""Parity: an exported runtime against eager PyTorch, written once against the step protocol.

For each batch size B and prefill length T: a prefill of random tokens from a zero state, then `steps`
greedy steps with the state carried by each runtime, then one more random chunk of T tokens on the
carried state. Both runtimes are fed the reference's greedy choice, so their inputs stay identical;
the candidate's own choice must match it at every step (greedy decodes identical character for
character). A mismatch counts as a tie, not a failure, only where the reference's two logits lie within
the tolerance of each other (possible in fp16, practically never in fp32).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from export.runtime import Runtime

TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2}  # atol = rtol, np.allclose style: |a - b| <= atol + rtol * |b|


class ParityError(Exception):
    """An exported model disagrees with eager PyTorch, or breaks the step-model contract it is checked against."""


@dataclass(frozen=True)
class ParitySpec:
    batches: tuple[int, ...] = (1, 3, 8)
    prefills: tuple[int, ...] = (1, 17, 64)
    steps: int = 200  # carried single-token steps after each prefill
    tol: float = 1e-5
    seed: int = 0

    @classmethod
    def for_precision(cls, precision: str, **kw) -> "ParitySpec":
        return cls(tol=TOLERANCE[precision], **kw)


def _excess(ref: np.ndarray, cand: np.ndarray, tol: float) -> tuple[float, bool]:
    """Max abs difference, and whether every element is within atol + rtol * |ref|."""
    diff = np.abs(cand.astype(np.float64) - ref)
    return float(diff.max()), bool(np.all(diff <= tol + tol * np.abs(ref)))


@contextmanager
def one_torch_thread():
    """Parity makes thousands of tiny calls: one intra-op thread is fastest for them, and immune to the
    spin-waiting that made a 2-thread torch 10-30x slower on a shared 2-core machine (measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_parity(ref: Runtime, cand: Runtime, spec: ParitySpec = ParitySpec()) -> dict:
    """Run both runtimes through the same calls; return the figures (`passed` says whether all held)."""
    with one_torch_thread():
        return _check_parity(ref, cand, spec)


def _check_parity(ref: Runtime, cand: Runtime, spec: ParitySpec) -> dict:
    if ref.vocab != cand.vocab or ref.num_states != cand.num_states:
        raise ParityError(f"{cand.describe()['backend']} model does not match the checkpoint's vocabulary or cell")
    t0, V = time.perf_counter(), len(ref.vocab)
    cases = []
    for B in spec.batches:
        for T in spec.prefills:
            rng = np.random.default_rng([spec.seed, B, T])
            case = {"batch": B, "prefill": T, "max_abs_logits": 0.0, "within_tol": True,
                    "greedy_identical": True, "first_divergence": None, "ties": 0, "calls": 0}

            def both(tokens, rs, cs):
                lr, rs = ref.step(tokens, rs)
                lc, cs = cand.step(tokens, cs)
                err, ok = _excess(lr, lc, spec.tol)
                case["max_abs_logits"] = max(case["max_abs_logits"], err)
                case["within_tol"] &= ok
                case["calls"] += 1
                return lr, lc, rs, cs

            tokens = rng.integers(0, V, (B, T))  # (B, T)
            lr, lc, rs, cs = both(tokens, ref.new_state(B), cand.new_state(B))
            for step in range(spec.steps):
                nxt_r, nxt_c = lr.argmax(-1), lc.argmax(-1)  # (B,)
                for row in np.flatnonzero(nxt_r != nxt_c):
                    if lr[row, nxt_r[row]] - lr[row, nxt_c[row]] <= 2 * spec.tol * max(1.0, abs(lr[row]).max()):
                        case["ties"] += 1
                    elif case["greedy_identical"]:
                        case["greedy_identical"], case["first_divergence"] = False, step
                lr, lc, rs, cs = both(nxt_r[:, None], rs, cs)
            lr, lc, rs, cs = both(rng.integers(0, V, (B, T)), rs, cs)  # a chunk on the carried state
            cases.append(case)
    return {
        "passed": all(c["within_tol"] and c["greedy_identical"] for c in cases),
        "reference": ref.describe()["backend"], "candidate": cand.describe()["backend"],
        "max_abs_logits": max(c["max_abs_logits"] for c in cases),
        "greedy_identical": all(c["greedy_identical"] for c in cases),
        "ties": sum(c["ties"] for c in cases),
        "calls": sum(c["calls"] for c in cases),
        "seconds": round(time.perf_counter() - t0, 3),
        "spec": asdict(spec),
        "cases": cases,
    }


def summary(report: dict) -> str:
    """One line: the verdict and the figures behind it."""
    verdict = "passed" if report["passed"] else "FAILED"
    greedy = "identical" if report["greedy_identical"] else "DIVERGED"
    return (f"parity {verdict}: {report['candidate']} vs {report['reference']}, max |dlogits| "
            f"{report['max_abs_logits']:.2e} (tol {report['spec']['tol']:g}), greedy {greedy}, "
            f"{report['calls']} calls x2 in {report['seconds']:.1f}s")
