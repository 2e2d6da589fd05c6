"""The running batch of one model: its rows decode together, one vectorized `step` per character.

A row is a Generate stream whose prompt has been fed up to its last token. The batch keeps the rows'
ids and request facts, their next tokens, their opaque runtime state (row i is stream i's), their
sampling settings and counts in one structured array, and their unsent characters in another. Rows
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


# n_held: characters sampled and not yet sent; credit: messages it may still send (see serve.engine)
COLS = np.dtype([("temperature", np.float64), ("top_k", np.int64), ("top_p", np.float64), ("max_chars", np.int64),
                 ("chunk", np.int64), ("generated", np.int64), ("last", np.float64), ("n_held", np.int64),
                 ("next", np.int64), ("credit", np.int64)], align=True)


class Batch:
    def __init__(self, rows: list[Row], cols: np.ndarray, held: np.ndarray, rngs: list[Uniforms], state, chars: str):
        self.rows, self.cols, self.held, self.rngs, self.state, self.chars = rows, cols, held, rngs, state, chars
        self.ids = [r.id for r in rows]
        self.sampler = BatchSampler(cols["temperature"], cols["top_k"], cols["top_p"], rngs, len(chars))
        self.watch = [i for i, r in enumerate(rows) if r.req.stop]  # rows that match stop sequences
        self.scored = [i for i, r in enumerate(rows) if r.req.logprobs is not None]  # rows that report logprobs
        self.all = np.arange(len(rows))

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_requests(cls, ready: list[Prefilled], runtime) -> "Batch":
        cols = np.array([(p.row.req.temperature, p.row.req.top_k, p.row.req.top_p, p.row.req.max_chars,
                          p.row.req.chunk_chars, 0, 0.0, 0, p.token, p.credit) for p in ready], COLS)
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
        held = self.held[keep]
        return Batch([self.rows[i] for i in keep], self.cols[keep], held[:, :max(1, int(self.cols["chunk"][keep].max()))],
                     [self.rngs[i] for i in keep], runtime.take(self.state, keep), self.chars)

    @staticmethod
    def concatenate(batches: list["Batch | None"], runtime) -> "Batch | None":
        batches = [b for b in batches if b is not None]
        if len(batches) < 2:
            return batches[0] if batches else None
        width = max(b.held.shape[1] for b in batches)
        held = np.concatenate([np.pad(b.held, ((0, 0), (0, width - b.held.shape[1]))) for b in batches])
        return Batch([r for b in batches for r in b.rows], np.concatenate([b.cols for b in batches]), held,
                     [g for b in batches for g in b.rngs], runtime.concat([b.state for b in batches]), batches[0].chars)

    def step(self, runtime, now_fn, metrics=None) -> list[tuple[int, str, FinishReason | None, GenerateStats | None]]:
        """Feed every row its next token, sample its next character; (row, text, finish, stats) for each row
        that sends a message this step: its chunk is full, or it has ended (then with finish and stats)."""
        c, chars = self.cols, self.chars
        logits, self.state = runtime.step(c["next"].reshape(-1, 1), self.state)  # (B, V)
        now = now_fn()
        tokens = self.sampler(logits)  # (B,)
        c["next"] = tokens
        if self.scored:
            self._score(logits, tokens)
        n_held = c["n_held"]
        self.held[self.all, n_held] = tokens
        n_held += 1
        generated = c["generated"]
        fresh = np.flatnonzero(generated == 0).tolist()
        for i in fresh:
            self.rows[i].first = now
        if metrics is not None:
            metrics.batch_size.observe(len(self.rows))
            for i in fresh:
                metrics.ttfc.observe(now - self.rows[i].arrived)
            metrics.inter_char.observe_many(now - (np.delete(c["last"], fresh) if fresh else c["last"]))
        c["last"] = now
        generated += 1
        stops = {}
        for i in self.watch:
            stop = self.rows[i].match_stop(chars[tokens[i]])
            if stop is not None:
                stops[i] = stop
        ends = generated >= c["max_chars"]
        due = np.flatnonzero(ends | (n_held >= c["chunk"]))
        if stops:
            due = np.union1d(due, list(stops))
        if not due.size:
            return []
        out = []
        for i, held, n, end in zip(due.tolist(), self.held[due].tolist(), n_held[due].tolist(), ends[due].tolist()):
            text = "".join([chars[t] for t in held[:n]])
            if end or i in stops:
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
