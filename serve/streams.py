"""What a request does with the logits of each step: generation (sample, stop, chunk) and prediction.

These run on the scheduler's thread; they turn logits into plain events (`Chunk`, predictions) that
the engine hands to the waiting request on the event loop.
"""
from __future__ import annotations

import numpy as np

from serve.scheduler import Rows, Stream
from serve.types import Chunk, FinishReason, GenerateRequest, GenerateStats, Prediction, SessionState
from train.sampling import BatchSampler, Uniforms, sample
from train.vocab import Vocab


VECTOR_ROWS = 4  # from this many generation streams in a batch on, arrays are the faster (28 against 37 us at 4)


class GenerationStream(Stream):
    """Samples one character per step with its own generator (seeded by the request, so the text does
    not depend on what else is batched), stops on length or a stop sequence, and sends `chunk_chars`
    characters per event. `req` has its defaults resolved (seed, max_chars, chunk_chars)."""

    def __init__(self, tokens: np.ndarray, state, req: GenerateRequest, vocab: Vocab, session: SessionState,
                 arrived: float, metrics=None):
        super().__init__(tokens, state)
        self.req, self.vocab, self.session, self.metrics = req, vocab, session, metrics
        self.rng = Uniforms(req.seed)
        self.longest_stop = max(map(len, req.stop), default=0)
        self.arrived = arrived  # time.perf_counter() when the request came in
        self.first = self.last = arrived
        self.generated = 0
        self.buf: list[str] = []  # characters sampled and not yet sent
        self.tail = ""  # the last longest_stop characters, to match stop sequences
        self.pending = np.zeros(0, np.int64)  # once done: the last character, sampled but not yet fed

    @classmethod
    def rows(cls, streams):
        return GenerationRows(streams) if len(streams) >= VECTOR_ROWS else Rows(streams)

    def advance(self, logits, now):
        r = self.req
        return self.accept(sample(logits, r.temperature, r.top_k, r.top_p, self.rng), now)

    def accept(self, token: int, now: float):
        """The sampled next character: count it, check stops and length, and maybe emit a chunk."""
        ch = self.vocab.chars[token]
        if self.generated:
            if self.metrics:
                self.metrics.inter_char.observe(now - self.last)
        else:
            self.first = now
            if self.metrics:
                self.metrics.ttfc.observe(now - self.arrived)
        self.last = now
        self.generated += 1
        self.buf.append(ch)
        stop = self.match_stop(ch) if self.longest_stop else None
        if stop is not None or self.generated >= self.req.max_chars:
            text, self.buf = "".join(self.buf), []
            return self.finish(token, text, stop)
        self.tokens = np.array([token], np.int64)
        if len(self.buf) >= self.req.chunk_chars:
            text, self.buf = "".join(self.buf), []
            return Chunk(text)
        return None

    def match_stop(self, ch: str) -> str | None:
        self.tail = (self.tail + ch)[-self.longest_stop:]
        return next((s for s in self.req.stop if self.tail.endswith(s)), None)

    def finish(self, token: int, text: str, stop: str | None) -> Chunk:
        """The last chunk, with its finish reason and stats (`generated` and `last` are up to date)."""
        self.done = True
        self.pending = np.array([token], np.int64)
        total = self.last - self.arrived
        stats = GenerateStats(
            prompt_chars=len(self.req.prompt), generated_chars=self.generated,
            time_to_first_char_s=self.first - self.arrived, total_s=total,
            chars_per_second=self.generated / total if total > 0 else 0.0,
            seed=self.req.seed, session=self.session, stop=stop or "")
        return Chunk(text, FinishReason.STOP if stop is not None else FinishReason.LENGTH, stats)


class GenerationRows(Rows):
    """Generation streams decoding together, their settings and counts in one structured array and their unsent
    characters in another: a step costs Python only for the rows that send a message, watch for a stop sequence
    or see their first character, and streams join and leave without the others being gathered again. Each
    stream sends exactly what `GenerationStream.accept` would make it send (a test checks)."""

    ROW = np.dtype([("temperature", np.float64), ("top_k", np.int64), ("top_p", np.float64), ("max_chars", np.int64),
                    ("chunk", np.int64), ("generated", np.int64), ("last", np.float64), ("n_held", np.int64),
                    ("next", np.int64), ("watch", bool)], align=True)  # n_held: characters sampled, not yet sent

    def __init__(self, streams: list[GenerationStream]):
        super().__init__([])
        vocab, self.metrics = streams[0].vocab, streams[0].metrics  # a scheduler's streams share both
        self.chars, self.index = vocab.chars, vocab.index
        self.r = np.zeros(0, self.ROW)
        self.held = np.zeros((0, 1), np.int64)  # row i's unsent characters: held[i, :r["n_held"][i]]
        self.join(streams)

    def join(self, streams):
        new = np.array([(s.req.temperature, s.req.top_k, s.req.top_p, s.req.max_chars, s.req.chunk_chars, s.generated,
                         s.last, len(s.buf), s.tokens[0], bool(s.longest_stop)) for s in streams], self.ROW)
        held = np.zeros((len(streams), max(self.held.shape[1], int(new["chunk"].max()))), np.int64)
        for i, s in enumerate(streams):
            held[i, :len(s.buf)] = [self.index[ch] for ch in s.buf]
        self.held = np.concatenate([np.pad(self.held, ((0, 0), (0, held.shape[1] - self.held.shape[1]))), held])
        self.r = np.concatenate([self.r, new])
        self.streams = self.streams + streams
        return self._prepare()

    def keep(self, rows):
        if len(rows) < VECTOR_ROWS:
            self.close()
            return Rows([self.streams[i] for i in rows])
        kept = set(rows)
        self._write_back([i for i in range(len(self.streams)) if i not in kept])
        self.r, self.held, self.streams = self.r[rows], self.held[rows], [self.streams[i] for i in rows]
        return self._prepare()

    def close(self) -> None:
        self._write_back(range(len(self.streams)))

    def _prepare(self) -> "GenerationRows":
        r, streams = self.r, self.streams
        self.sampler = BatchSampler(r["temperature"], r["top_k"], r["top_p"], [s.rng for s in streams], len(self.chars))
        self.watch = np.flatnonzero(r["watch"]).tolist()  # rows that match stop sequences
        self.all = np.arange(len(streams))
        return self

    def _write_back(self, rows) -> None:
        """The figures of these rows, back on their streams (those not done)."""
        r, chars = self.r, self.chars
        for i in rows:
            s = self.streams[i]
            if not s.done:
                s.generated, s.last = int(r["generated"][i]), float(r["last"][i])
                s.buf = [chars[t] for t in self.held[i, :r["n_held"][i]].tolist()]
                s.tokens = np.array([r["next"][i]], np.int64)

    def tokens(self) -> np.ndarray:
        return np.ascontiguousarray(self.r["next"])

    def advance(self, logits, now):
        r, streams, chars = self.r, self.streams, self.chars
        tokens = self.sampler(logits)
        r["next"] = tokens
        n_held = r["n_held"]
        self.held[self.all, n_held] = tokens
        n_held += 1
        generated = r["generated"]
        fresh = np.flatnonzero(generated == 0).tolist()
        for i in fresh:
            streams[i].first = now
            if self.metrics:
                self.metrics.ttfc.observe(now - streams[i].arrived)
        if self.metrics:
            self.metrics.inter_char.observe_many(now - (np.delete(r["last"], fresh) if fresh else r["last"]))
        r["last"] = now
        generated += 1
        stops = {}
        for i in self.watch:
            stop = streams[i].match_stop(chars[tokens[i]])
            if stop is not None:
                stops[i] = stop
        ends = generated >= r["max_chars"]
        due = np.flatnonzero(ends | (n_held >= r["chunk"]))
        if stops:
            due = np.union1d(due, list(stops))
        if not due.size:
            return []
        out = []
        for i, held, n, end in zip(due.tolist(), self.held[due].tolist(), n_held[due].tolist(), ends[due].tolist()):
            text = "".join([chars[t] for t in held[:n]])
            if end or i in stops:
                s = streams[i]
                s.generated, s.last, s.buf = int(generated[i]), now, []
                out.append((i, s.finish(int(tokens[i]), text, stops.get(i))))
            else:
                out.append((i, Chunk(text)))
        n_held[due] = 0
        return out


class PredictionJob(Stream):
    """Runs a text and returns the top_k next characters with their probabilities (temperature 1)."""

    def __init__(self, tokens: np.ndarray, top_k: int, vocab: Vocab):
        super().__init__(tokens)
        self.top_k, self.vocab = top_k, vocab

    def advance(self, logits, now):
        z = logits.astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")[: self.top_k]
        self.done = True
        return [Prediction(self.vocab.chars[i], float(p[i])) for i in order]
