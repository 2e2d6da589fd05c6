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


VECTOR_ROWS = 4  # from this many generation streams in a batch on, their bookkeeping is done in arrays


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
    """Generation streams decoding together, with their counts and unsent characters in arrays and their
    sampler prepared once: a step costs Python only for the rows that send a message, watch for a stop
    sequence or see their first character. Each stream sends exactly what `GenerationStream.accept` would
    make it send (a test checks)."""

    def __init__(self, streams: list[GenerationStream]):
        super().__init__(streams)
        reqs = [s.req for s in streams]
        vocab, self.metrics = streams[0].vocab, streams[0].metrics  # a scheduler's streams share both
        self.chars = vocab.chars
        self.sampler = BatchSampler([r.temperature for r in reqs], [r.top_k for r in reqs], [r.top_p for r in reqs],
                                    [s.rng for s in streams], len(vocab))
        self.generated = np.array([s.generated for s in streams])
        self.max_chars = np.array([r.max_chars for r in reqs])
        self.chunk = np.array([r.chunk_chars for r in reqs])
        self.last = np.array([s.last for s in streams])
        self.all = np.arange(len(streams))
        self.held = np.zeros((len(streams), int(self.chunk.max())), np.int64)  # sampled, not yet sent
        self.n_held = np.array([len(s.buf) for s in streams])
        for i, s in enumerate(streams):
            self.held[i, :len(s.buf)] = [vocab.index[ch] for ch in s.buf]
        self.watch = [i for i, s in enumerate(streams) if s.longest_stop]  # rows that match stop sequences
        self.next: np.ndarray | None = None  # the tokens sampled last step: the next inputs

    def tokens(self) -> np.ndarray:
        return super().tokens() if self.next is None else self.next

    def advance(self, logits, now):
        tokens = self.next = self.sampler(logits)
        self.held[self.all, self.n_held] = tokens
        self.n_held += 1
        streams, chars = self.streams, self.chars
        fresh = np.flatnonzero(self.generated == 0).tolist()
        for i in fresh:
            streams[i].first = now
            if self.metrics:
                self.metrics.ttfc.observe(now - streams[i].arrived)
        if self.metrics:
            self.metrics.inter_char.observe_many(now - (np.delete(self.last, fresh) if fresh else self.last))
        self.last[:] = now
        self.generated += 1
        stops = {}
        for i in self.watch:
            stop = streams[i].match_stop(chars[tokens[i]])
            if stop is not None:
                stops[i] = stop
        ends = self.generated >= self.max_chars
        due = np.flatnonzero(ends | (self.n_held >= self.chunk))
        if stops:
            due = np.union1d(due, list(stops))
        if not due.size:
            return []
        out = []
        rows = zip(due.tolist(), self.held[due].tolist(), self.n_held[due].tolist(), ends[due].tolist())
        for i, held, n, end in rows:
            text = "".join([chars[t] for t in held[:n]])
            if end or i in stops:
                s = streams[i]
                s.generated, s.last, s.buf = int(self.generated[i]), now, []
                out.append((i, s.finish(int(tokens[i]), text, stops.get(i))))
            else:
                out.append((i, Chunk(text)))
        self.n_held[due] = 0
        return out

    def close(self) -> None:
        for i, s in enumerate(self.streams):
            if not s.done:
                s.generated, s.last = int(self.generated[i]), float(self.last[i])
                s.buf = [self.chars[t] for t in self.held[i, :self.n_held[i]].tolist()]
                if self.next is not None:
                    s.tokens = self.next[i:i + 1]


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
