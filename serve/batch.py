"""The running batch of one model: its rows decode together, one vectorized `step` per character.

Rows join (`from_requests`, `concatenate`) and leave (`filter`) between steps; each samples with its own
seeded generator, so its text does not depend on what else is batched. A row's next message is at a known
step, so a step in which none is due costs no per-row work. One path for 1 row and for 256.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve.types import CharLogprob, FinishReason, GenerateRequest, GenerateStats, SessionState
from train.sampling import BatchSampler, Uniforms, log_softmax

ROOM = 64  # steps `hist` holds beyond the widest chunk; then it keeps only its last `width` steps


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

    def match_stop(self, ch: str) -> str | None:
        self.tail = (self.tail + ch)[-max(map(len, self.req.stop)):]
        return next((s for s in self.req.stop if self.tail.endswith(s)), None)


@dataclass
class Prefilled:
    """A request on its way into a batch: it joins once its prompt has been fed but for the last token."""

    row: Row
    tokens: np.ndarray  # what it still has to feed (the last token: by the row's first step)
    state: object  # the runtime state of this one stream
    credit: int  # messages it may send before its client takes some


# The per-row columns (Python lists: a step touches only the rows that send a message). Steps are places in
# `hist` (`at` is the next). sent: where the row's unsent characters start; due: when it sends its next message
# (its chunk is full, or it reaches max_chars at `end`); credit: messages it may still send (see serve.engine);
# last: its last character's time (until the batch's first step).
SHIFTED = ("sent", "due", "end")


class Batch:
    def __init__(self, rows: list[Row], tokens: np.ndarray, hist: np.ndarray, cols: dict[str, list],
                 rngs: list[Uniforms], state, chars: str):
        self.rows, self.tokens, self.cols, self.rngs, self.state, self.chars = rows, tokens, cols, rngs, state, chars
        reqs = [r.req for r in rows]
        self.width = max(r.chunk_chars for r in reqs)
        self.hist = np.zeros((self.width + ROOM, len(rows)), np.int64)  # `width` steps so far
        self.hist[:self.width] = hist
        self.at, self.last = self.width, None  # last: the time of the last step, once there has been one
        self.ids = [r.id for r in rows]
        self.sampler = BatchSampler([r.temperature for r in reqs], [r.top_k for r in reqs], [r.top_p for r in reqs],
                                    rngs, len(chars))
        self.watch = [i for i, r in enumerate(reqs) if r.stop]  # rows that match stop sequences
        self.scored = [i for i, r in enumerate(reqs) if r.logprobs is not None]  # rows that report logprobs
        self.fresh = [i for i, (e, r) in enumerate(zip(cols["end"], reqs)) if e - self.at == r.max_chars]  # unsampled
        self.next_due = min(cols["due"])  # the next step that sends a message

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_requests(cls, ready: list[Prefilled], runtime) -> "Batch":
        reqs = [p.row.req for p in ready]
        at = max(r.chunk_chars for r in reqs)
        cols = {"sent": [at] * len(reqs), "due": [at + min(r.chunk_chars, r.max_chars) for r in reqs],
                "end": [at + r.max_chars for r in reqs], "credit": [p.credit for p in ready], "last": [0.0] * len(reqs)}
        return cls([p.row for p in ready], np.array([p.tokens[-1] for p in ready], np.int64),
                   np.zeros((at, len(ready)), np.int64), cols, [Uniforms(r.seed) for r in reqs],
                   runtime.concat([p.state for p in ready]), runtime.vocab.chars)

    def _now(self, width: int) -> tuple[dict[str, list], np.ndarray]:
        """The columns and the last `width` steps of hist, as a new batch starts them (at = width)."""
        cols, shift = dict(self.cols), width - self.at
        for k in SHIFTED:
            cols[k] = [x + shift for x in cols[k]]
        if self.last is not None:
            cols["last"] = [self.last] * len(self.rows)
        hist, n = np.zeros((width, len(self.rows)), np.int64), min(width, self.at)
        hist[width - n:] = self.hist[self.at - n:self.at]
        return cols, hist

    def filter(self, keep: list[int], runtime) -> "Batch | None":
        """Only these rows (by index), in this order; None when none is kept."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        cols, hist = self._now(max(self.rows[i].req.chunk_chars for i in keep))
        return Batch([self.rows[i] for i in keep], self.tokens[keep], hist[:, keep],
                     {k: [v[i] for i in keep] for k, v in cols.items()}, [self.rngs[i] for i in keep],
                     runtime.take(self.state, keep), self.chars)

    @staticmethod
    def concatenate(batches: list["Batch | None"], runtime) -> "Batch | None":
        batches = [b for b in batches if b is not None]
        if len(batches) < 2:
            return batches[0] if batches else None
        width = max(b.width for b in batches)
        now = [b._now(width) for b in batches]
        cols = {k: [x for c, _ in now for x in c[k]] for k in now[0][0]}
        return Batch([r for b in batches for r in b.rows], np.concatenate([b.tokens for b in batches]),
                     np.concatenate([h for _, h in now], axis=1), cols, [g for b in batches for g in b.rngs],
                     runtime.concat([b.state for b in batches]), batches[0].chars)

    def step(self, runtime, now_fn, metrics=None) -> list[tuple[int, str, FinishReason | None, GenerateStats | None]]:
        """Feed every row its next token, sample its next character; (row, text, finish, stats) for each row
        that sends a message this step: its chunk is full, or it has ended (then with finish and stats)."""
        rows, chars, fresh = self.rows, self.chars, self.fresh
        logits, self.state = runtime.step(self.tokens[:, None], self.state)  # (B, V)
        now = now_fn()
        tokens = self.tokens = self.sampler(logits)  # (B,)
        if self.scored:
            self._score(logits, tokens)
        if self.at == len(self.hist):  # full: keep its last `width` steps (no row has more unsent)
            shift = self.at - self.width
            self.hist[:self.width] = self.hist[shift:]
            for k in SHIFTED:
                self.cols[k] = [x - shift for x in self.cols[k]]
            self.at, self.next_due = self.width, self.next_due - shift
        self.hist[self.at] = tokens
        self.at += 1
        for i in fresh:
            rows[i].first = now
        if metrics is not None:
            metrics.batch_size.observe(len(rows))
            for i in fresh:
                metrics.ttfc.observe(now - rows[i].arrived)
            if self.last is not None:
                metrics.inter_char.observe(now - self.last, len(rows))
            elif len(fresh) < len(rows):
                metrics.inter_char.observe_many(now - np.delete(np.array(self.cols["last"]), fresh))
        self.fresh, self.last = [], now
        stops = {}
        for i in self.watch:
            stop = rows[i].match_stop(chars[tokens[i]])
            if stop is not None:
                stops[i] = stop
        at = self.at
        if at < self.next_due and not stops:
            return []
        c = self.cols
        sent, due, end, credit = c["sent"], c["due"], c["end"], c["credit"]
        out, latest = [], tokens.tolist()
        for i in [i for i, d in enumerate(due) if d <= at or i in stops]:
            s = sent[i]  # its text: this step's character, or those since s
            text = chars[latest[i]] if s == at - 1 else "".join([chars[t] for t in self.hist[s:at, i].tolist()])
            sent[i] = at
            if at >= end[i] or i in stops:  # it ends: it leaves the batch
                reason = FinishReason.STOP if i in stops else FinishReason.LENGTH
                out.append((i, text, reason, self._stats(i, now, stops.get(i, ""))))
            else:
                out.append((i, text, None, None))
                credit[i] -= 1
                d = at + rows[i].req.chunk_chars
                due[i] = d if d < end[i] else end[i]
        self.next_due = min(due)
        return out

    def _score(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        """For the rows that ask only: the sampled character's log-probability and the top n (the model's own
        distribution, before temperature, top-k and top-p), kept with the row until its message goes."""
        idx = self.scored
        lp = log_softmax(logits[idx])  # (R, V)
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
        row = self.rows[i]
        n, total = row.req.max_chars - self.cols["end"][i] + self.at, now - row.arrived
        return GenerateStats(prompt_chars=len(row.req.prompt), generated_chars=n,
                             time_to_first_char_s=row.first - row.arrived, total_s=total,
                             chars_per_second=n / total if total > 0 else 0.0, seed=row.req.seed,
                             session=row.session, stop=stop)
