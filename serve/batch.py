"""The running batch of one model: its rows decode together, one vectorized `step` per character.

Rows join (`from_requests`, `concatenate`) and leave (`filter`) between steps; each samples with its own
seeded generator, so its text does not depend on what else is batched. A row's next message is at a known
step, so a step in which none is due costs no per-row work. One path for 1 row and for 256.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve.types import CharLogprob, FinishReason, GenerateRequest, GenerateStats, SessionState
from train.sampling import BatchSampler, Uniforms

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

    def take_logprobs(self) -> tuple[CharLogprob, ...] | None:
        out, self.logprobs = self.logprobs, []
        return tuple(out) if out is not None else None

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


# the per-row columns, steps counted as places in `hist` (`at` is the next): due: when its chunk is full (its
# unsent characters are from due - chunk on); end: when it reaches max_chars. last: its last character's time
# (until the batch's first step); credit: messages it may still send (see serve.engine).
COLS = {"temperature": np.float64, "top_k": np.int64, "top_p": np.float64, "max_chars": np.int64, "chunk": np.int64,
        "due": np.int64, "end": np.int64, "last": np.float64, "next": np.int64, "credit": np.int64}


class Batch:
    def __init__(self, rows: list[Row], cols: dict[str, np.ndarray], hist: np.ndarray, rngs: list[Uniforms], state,
                 chars: str):
        self.rows, self.cols, self.rngs, self.state, self.chars = rows, cols, rngs, state, chars
        self.width = int(cols["chunk"].max())
        self.hist = np.pad(hist, ((0, ROOM), (0, 0)))  # (width + ROOM, B); `width` steps so far
        self.at, self.last = self.width, None  # last: the time of the last step, once there has been one
        self.ids = [r.id for r in rows]
        self.sampler = BatchSampler(cols["temperature"], cols["top_k"], cols["top_p"], rngs, len(chars))
        self.watch = [i for i, r in enumerate(rows) if r.req.stop]  # rows that match stop sequences
        self.scored = [i for i, r in enumerate(rows) if r.req.logprobs is not None]  # rows that report logprobs
        self.fresh = np.flatnonzero(cols["end"] - self.at == cols["max_chars"]).tolist()  # none sampled yet
        self.next_end = int(cols["end"].min())
        self.next_due = min(int(cols["due"].min()), self.next_end)  # the next step that sends a message

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_requests(cls, ready: list[Prefilled], runtime) -> "Batch":
        reqs = [p.row.req for p in ready]
        cols = {"temperature": [r.temperature for r in reqs], "top_k": [r.top_k for r in reqs],
                "top_p": [r.top_p for r in reqs], "max_chars": [r.max_chars for r in reqs],
                "chunk": [r.chunk_chars for r in reqs], "next": [p.tokens[-1] for p in ready],
                "credit": [p.credit for p in ready]}
        cols = {k: np.array(cols.get(k, [0] * len(ready)), t) for k, t in COLS.items()}
        at = int(cols["chunk"].max())
        cols["due"], cols["end"] = at + cols["chunk"], at + cols["max_chars"]
        return cls([p.row for p in ready], cols, np.zeros((at, len(ready)), np.int64),
                   [Uniforms(r.seed) for r in reqs], runtime.concat([p.state for p in ready]), runtime.vocab.chars)

    def _now(self, width: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The columns and the last `width` steps of hist, as a new batch starts them (at = width)."""
        cols, shift = dict(self.cols), width - self.at
        cols["due"], cols["end"] = cols["due"] + shift, cols["end"] + shift
        if self.last is not None:
            cols["last"] = np.full(len(self.rows), self.last)
        return cols, np.pad(self.hist[max(0, -shift):self.at], ((max(0, shift), 0), (0, 0)))

    def filter(self, keep: list[int], runtime) -> "Batch | None":
        """Only these rows (by index), in this order; None when none is kept."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        cols, hist = self._now(int(self.cols["chunk"][keep].max()))
        return Batch([self.rows[i] for i in keep], {k: v[keep] for k, v in cols.items()}, hist[:, keep],
                     [self.rngs[i] for i in keep], runtime.take(self.state, keep), self.chars)

    @staticmethod
    def concatenate(batches: list["Batch | None"], runtime) -> "Batch | None":
        batches = [b for b in batches if b is not None]
        if len(batches) < 2:
            return batches[0] if batches else None
        width = max(b.width for b in batches)
        now = [b._now(width) for b in batches]
        return Batch([r for b in batches for r in b.rows], {k: np.concatenate([c[k] for c, _ in now]) for k in COLS},
                     np.concatenate([h for _, h in now], axis=1), [g for b in batches for g in b.rngs],
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
        if self.at == len(self.hist):  # full: keep its last `width` steps (no row has more unsent)
            shift = self.at - self.width
            self.hist[:self.width] = self.hist[shift:]
            c["due"] -= shift
            c["end"] -= shift
            self.at, self.next_due, self.next_end = self.width, self.next_due - shift, self.next_end - shift
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
                metrics.inter_char.observe_many(now - np.delete(c["last"], fresh))
        self.fresh, self.last = [], now
        stops = {}
        for i in self.watch:
            stop = rows[i].match_stop(chars[tokens[i]])
            if stop is not None:
                stops[i] = stop
        at = self.at
        if at < self.next_due and not stops:
            return []
        due = c["due"] <= at  # (a mask: at one row, indexing by it or by a list costs twice as much)
        ended = set((c["end"] <= at).nonzero()[0].tolist()) if at >= self.next_end else set()
        if stops or ended:
            due[[*stops, *ended]] = True
        out, start = [], (c["due"] - c["chunk"]).tolist()
        for i in due.nonzero()[0].tolist():
            text = "".join([chars[t] for t in self.hist[start[i]:at, i].tolist()])
            if i in ended or i in stops:
                reason = FinishReason.STOP if i in stops else FinishReason.LENGTH
                out.append((i, text, reason, self._stats(i, now, stops.get(i, ""))))
            else:
                out.append((i, text, None, None))
        c["due"] += c["chunk"] * due  # rows that end leave the batch
        c["credit"] -= due
        self.next_due = min(int(c["due"].min()), self.next_end)
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
        row, n = self.rows[i], int(self.cols["max_chars"][i] - self.cols["end"][i] + self.at)
        total = now - row.arrived
        return GenerateStats(prompt_chars=len(row.req.prompt), generated_chars=n,
                             time_to_first_char_s=row.first - row.arrived, total_s=total,
                             chars_per_second=n / total if total > 0 else 0.0, seed=row.req.seed,
                             session=row.session, stop=stop)
