"""What a request does with the logits of each step: generation (sample, stop, chunk) and prediction.

These run on the scheduler's thread; they turn logits into plain events (`Chunk`, predictions) that
the engine hands to the waiting request on the event loop.
"""
from __future__ import annotations

import numpy as np

from serve.scheduler import Stream
from serve.types import Chunk, FinishReason, GenerateRequest, GenerateStats, Prediction, SessionState
from train.sampling import Uniforms, sample_many
from train.vocab import Vocab


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
        self.buf: list[str] = []
        self.tail = ""  # the last longest_stop characters, to match stop sequences
        self.pending = np.zeros(0, np.int64)  # once done: the last character, sampled but not yet fed

    @classmethod
    def advance_rows(cls, streams, logits, now):
        """All rows sampled in one call: each draw is what `advance` alone would draw (see sample_many)."""
        reqs = [s.req for s in streams]
        tokens = sample_many(logits, [r.temperature for r in reqs], [r.top_k for r in reqs],
                             [r.top_p for r in reqs], [s.rng for s in streams])
        column = tokens.reshape(-1, 1)  # row i, a (1,) view, is stream i's next input: no array per stream
        return [s.accept(t, now, column[i]) for i, (s, t) in enumerate(zip(streams, tokens.tolist()))]

    def accept(self, token: int, now: float, as_input: np.ndarray):
        """The sampled next character: count it, check stops and length, and maybe emit a chunk.
        as_input: the same token as a (1,) int64 array, the stream's next input."""
        r = self.req
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
        stop = self._match_stop(ch) if self.longest_stop else None
        if stop is not None or self.generated >= r.max_chars:
            self.done = True
            self.pending = np.array([token], np.int64)
            return self._flush(FinishReason.STOP if stop is not None else FinishReason.LENGTH, stop or "")
        self.tokens = as_input
        if len(self.buf) >= r.chunk_chars:
            return self._flush()
        return None

    def _match_stop(self, ch: str) -> str | None:
        self.tail = (self.tail + ch)[-self.longest_stop:]
        return next((s for s in self.req.stop if self.tail.endswith(s)), None)

    def _flush(self, finish: FinishReason | None = None, stop: str = "") -> Chunk:
        text, self.buf = "".join(self.buf), []
        if finish is None:
            return Chunk(text)
        total = self.last - self.arrived
        stats = GenerateStats(
            prompt_chars=len(self.req.prompt), generated_chars=self.generated,
            time_to_first_char_s=self.first - self.arrived, total_s=total,
            chars_per_second=self.generated / total if total > 0 else 0.0,
            seed=self.req.seed, session=self.session, stop=stop)
        return Chunk(text, finish, stats)


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
