"""The learning rate of a budget: linear warm-up, then cosine (or linear) decay that reaches its floor
when the budget ends, and the measured defaults of objective "all".

The horizon is a number of optimiser steps. A run bounded by epochs knows it exactly (epochs x steps per
epoch), so its learning rate is a pure function of the step and a resumed run repeats it bit for bit. A run
bounded by --max-minutes estimates it from its own measured time per step and per evaluation, and
re-estimates it as it goes (machines are shared, throughput drifts), so the decay lands on the floor when
the time runs out; the horizon in force is saved with the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Objective "all": (learning rate, streams per step) by (cell, hidden size), chosen by
# `python -m train.bench sweep` (docs/training.md has the table and the command). Other sizes take the
# nearest one of the same cell; rnn takes gru's.
TUNED = {
    ("lstm", 128): (8e-3, 32), ("lstm", 256): (6e-3, 32), ("lstm", 512): (3e-3, 32),
    ("gru", 128): (8e-3, 32), ("gru", 256): (6e-3, 32), ("gru", 512): (3e-3, 32),
}  # each the best, or within 0.02 nats of the best, of 3-4 rates bounded by the same work (600 steps)
SEED_LR = 1e-3  # the seed's Adam learning rate, objective "last"


def tuned(cell: str, hidden: int) -> tuple[float, int]:
    """(learning rate, streams per step) for objective "all"."""
    cell = "gru" if cell == "rnn" else cell
    sizes = [h for c, h in TUNED if c == cell]
    return TUNED[cell, min(sizes, key=lambda h: (abs(math.log(h / hidden)), h))]


def lr_factor(step: int, warmup: int, horizon: int, shape: str = "cosine", floor: float = 0.1) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based) of a run of `horizon` steps:
    1/warmup .. 1 over the first `warmup` steps, then down to `floor` at the last step, and floor after it."""
    if step < warmup:
        return (step + 1) / warmup
    x = min(1.0, (step - warmup) / max(1, horizon - 1 - warmup))  # 0 -> 1 across the decay
    decay = 0.5 * (1 + math.cos(math.pi * x)) if shape == "cosine" else 1 - x
    return floor + (1 - floor) * decay


@dataclass
class Horizon:
    """Where the decay ends (`steps`) and how long the warm-up is; saved with the checkpoint."""
    steps: int
    warmup: int

    @classmethod
    def of(cls, steps: int, warmup_fraction: float) -> "Horizon":
        steps = max(1, int(steps))
        return cls(steps, max(1, round(warmup_fraction * steps)) if warmup_fraction > 0 else 0)


def steps_in_time(step: int, wall_s: float, eval_s: float, evals: int, budget_s: float,
                  steps_per_eval: float) -> int:
    """Estimated horizon of a time-bounded run at `step`, after `wall_s` seconds of which `eval_s` went on
    `evals` evaluations: the remaining time buys steps at the measured time per step plus the evaluations
    they will trigger (the final one comes after the budget, as the trainer stops)."""
    t_step = max(wall_s - eval_s, 1e-9) / max(step, 1)
    t_eval = eval_s / evals if evals else 0.0  # unknown before the first: it corrects the estimate then
    return step + max(0, int((budget_s - wall_s) / (t_step + t_eval / max(steps_per_eval, 1))))
