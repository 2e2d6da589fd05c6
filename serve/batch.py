"""The running batch of one model: its rows decode together, one vectorized `step` per character.

A row is a Generate stream whose prompt has been fed up to its last token. The batch keeps the rows'
ids and request facts, their next tokens, their opaque runtime state (row i is stream i's), their
sampling settings and counts in arrays (a column each), and their unsent characters in another. Rows
join (`from_requests`, `concatenate`) and leave (`filter`) between steps; `step` runs the runtime once
on (B, 1), samples every row (each with its own seeded generator, so a text does not depend on what
else is batched) and returns the step's generations. One path for 1 row and for 256.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve.types import CharLogprob, FinishReason, GenerateRequest, GenerateStats, SessionState
from train.sampling import BatchSampler, Uniforms


@dataclass
class Row:
    """What a row keeps in Python: its request (defaults resolved) and the facts its stats report."""

    id: int
    req: GenerateRequest
    session: SessionState
    arrived: float  # time.perf_counter() when the request came in (in the front end's process: same clock)
    first: float = 0.0  # when its first character was sampled
    tail: str = ""  # the last characters, to match stop sequences
    logprobs: list | None = None  # CharLogprob of the unsent characters, when the request asks (req.logprobs)

    def take_logprobs(self) -> tuple[CharLogprob, ...] | None:
        out, self.logprobs = self.logprobs, []
        return tuple(out) if out is not None else None

    def match_stop(self, ch: str) -> str | None:
        self.tail = (self.tail + ch)[-max(map(len, self.req.stop)):]
        return next((s for s in self.req.stop if self.tail.endswith(s)), None)


@dataclass
class Prefilled:
    """A request whose prompt has been fed but for its last token: ready to join a batch."""

    row: Row
    token: int  # the last token, fed by the row's first step
    state: object  # the runtime state of this one stream
    credit: int  # messages it may send before its client takes some


# the per-row columns (each a contiguous array; n_held: characters sampled, not yet sent; credit: messages
# it may still send, see serve.engine). Plain arrays, not one structured array: a step at one row cost
# 60-76 us with a structured array's field views, against 28-31 us before the redesign (2026-12-01).
COLS = {"temperature": np.float64, "top_k": np.int64, "top_p": np.float64, "max_chars": np.int64, "chunk": np.int64,
        "generated": np.int64, "last": np.float64, "n_held": np.int64, "next": np.int64, "credit": np.int64}


class Batch:
    def __init__(self, rows: list[Row], cols: dict[str, np.ndarray], held: np.ndarray, rngs: list[Uniforms], state,
                 chars: str):
        self.rows, self.cols, self.held, self.rngs, self.state, self.chars = rows, cols, held, rngs, state, chars
        self.ids = [r.id for r in rows]
        self.sampler = BatchSampler(cols["temperature"], cols["top_k"], cols["top_p"], rngs, len(chars))
        self.watch = [i for i, r in enumerate(rows) if r.req.stop]  # rows that match stop sequences
        self.scored = [i for i, r in enumerate(rows) if r.req.logprobs is not None]  # rows that report logprobs
        self.fresh = np.flatnonzero(cols["generated"] == 0).tolist()  # rows yet to sample their first character
        self.all = np.arange(len(rows))

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_requests(cls, ready: list[Prefilled], runtime) -> "Batch":
        values = {"temperature": [p.row.req.temperature for p in ready], "top_k": [p.row.req.top_k for p in ready],
                  "top_p": [p.row.req.top_p for p in ready], "max_chars": [p.row.req.max_chars for p in ready],
                  "chunk": [p.row.req.chunk_chars for p in ready], "next": [p.token for p in ready],
                  "credit": [p.credit for p in ready]}
        cols = {k: np.array(values.get(k, [0] * len(ready)), t) for k, t in COLS.items()}
        held = np.zeros((len(ready), int(cols["chunk"].max())), np.int64)  # row i's unsent: held[i, :n_held[i]]
        rngs = [Uniforms(p.row.req.seed) for p in ready]
        return cls([p.row for p in ready], cols, held, rngs, runtime.concat([p.state for p in ready]),
                   runtime.vocab.chars)

    def filter(self, keep: list[int], runtime) -> "Batch | None":
        """Only these rows (by index), in this order; None when none is kept."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        cols = {k: v[keep] for k, v in self.cols.items()}
        return Batch([self.rows[i] for i in keep], cols, self.held[keep][:, :int(cols["chunk"].max())],
                     [self.rngs[i] for i in keep], runtime.take(self.state, keep), self.chars)

    @staticmethod
    def concatenate(batches: list["Batch | None"], runtime) -> "Batch | None":
        batches = [b for b in batches if b is not None]
        if len(batches) < 2:
            return batches[0] if batches else None
        width = max(b.held.shape[1] for b in batches)
        held = np.concatenate([np.pad(b.held, ((0, 0), (0, width - b.held.shape[1]))) for b in batches])
        cols = {k: np.concatenate([b.cols[k] for b in batches]) for k in COLS}
        return Batch([r for b in batches for r in b.rows], cols, held, [g for b in batches for g in b.rngs],
                     runtime.concat([b.state for b in batches]), batches[0].chars)

    def step(self, runtime, now_fn, metrics=None) -> list[tuple[int, str, FinishReason | None, GenerateStats | None]]:
        """Feed every row its next token, sample its next character; (row, text, finish, stats) for each row
        that sends a message this step: its chunk is full, or it has ended (then with finish and stats)."""
        c, chars, rows, fresh = self.cols, self.chars, self.rows, self.fresh
        logits, self.state = runtime.step(c["next"][:, None], self.state)  # (B, V)
        now = now_fn()
        tokens = c["next"] = self.sampler(logits)  # (B,)
        if self.scored:
            self._score(logits, tokens)
        n_held, generated, last = c["n_held"], c["generated"], c["last"]
        self.held[self.all, n_held] = tokens
        n_held += 1
        for i in fresh:
            rows[i].first = now
        if metrics is not None:
            metrics.batch_size.observe(len(rows))
            for i in fresh:
                metrics.ttfc.observe(now - rows[i].arrived)
            gaps = now - (np.delete(last, fresh) if fresh else last)
            if gaps.size == 1:
                metrics.inter_char.observe(float(gaps[0]))
            elif gaps.size:
                metrics.inter_char.observe_many(gaps)
        self.fresh = []
        last.fill(now)
        generated += 1
        stops = {}
        for i in self.watch:
            stop = rows[i].match_stop(chars[tokens[i]])
            if stop is not None:
                stops[i] = stop
        ends = generated >= c["max_chars"]
        due = np.flatnonzero(ends | (n_held >= c["chunk"])).tolist()
        if stops:
            due = sorted(set(due) | set(stops))
        if not due:
            return []
        out = []
        for i in due:
            text = "".join([chars[t] for t in self.held[i, :n_held[i]].tolist()])
            if ends[i] or i in stops:
                reason = FinishReason.STOP if i in stops else FinishReason.LENGTH
                out.append((i, text, reason, self._stats(i, now, stops.get(i, ""))))
            else:
                out.append((i, text, None, None))
        n_held[due] = 0
        c["credit"][due] -= 1
        return out

    def _score(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        """For the rows that ask only: the sampled character's log-probability and the top n (the model's own
        distribution, before temperature, top-k and top-p), kept with the row until its message goes."""
        idx = self.scored
        z = logits[idx].astype(np.float64)  # (R, V)
        z -= z.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        n = max(self.rows[i].req.logprobs for i in idx)
        top = np.argsort(-lp, axis=1, kind="stable")[:, :n]  # (R, n)
        top_lp = np.take_along_axis(lp, top, axis=1).tolist()
        chosen = lp[np.arange(len(idx)), tokens[idx]].tolist()
        chars = self.chars
        for j, (i, best) in enumerate(zip(idx, top.tolist())):
            row = self.rows[i]
            if row.logprobs is None:
                row.logprobs = []
            k = row.req.logprobs
            row.logprobs.append(CharLogprob(chars[tokens[i]], chosen[j],
                                            tuple(zip([chars[t] for t in best[:k]], top_lp[j][:k]))))

    def _stats(self, i: int, now: float, stop: str) -> GenerateStats:
        row, n = self.rows[i], int(self.cols["generated"][i])
        total = now - row.arrived
        return GenerateStats(prompt_chars=len(row.req.prompt), generated_chars=n,
                             time_to_first_char_s=row.first - row.arrived, total_s=total,
                             chars_per_second=n / total if total > 0 else 0.0, seed=row.req.seed,
                             session=row.session, stop=stop)
