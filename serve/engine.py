"""The front end below the gRPC edge: validates requests, bounds them, routes them by model to their
worker (serve.link), turns each stream's generations back into `Chunk`s and grants it credit as its client
takes them (docs/design.md). It keeps no hidden state: only the streams in flight, their queues and credit.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from serve.config import ServerConfig
from serve.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable, shown
from serve.link import WorkerLink
from serve.messages import Cancel, Credit, Generations, Predict, Submit
from serve.metrics import Metrics
from serve.types import Chunk, GenerateRequest, ModelInfo, Prediction, PredictRequest
from train.vocab import Vocab

log = logging.getLogger(__name__)

PREDICT_TOP_K = 5  # Predict's top_k when the request leaves it 0
MAX_LOGPROBS = 5  # OpenAI's cap on a completion's logprobs
NO_END = (None, None)  # a message that does not end its stream (Generations.ends)


def _merge(items: list[Chunk]) -> Chunk:
    """A stream's queued messages as one: texts and logprobs joined, the finish and stats of the last."""
    if len(items) == 1:
        return items[0]
    logprobs = tuple(lp for i in items for lp in i.logprobs or ())
    return Chunk("".join([i.text for i in items]), items[-1].finish_reason, items[-1].stats, logprobs or None)


class _Stream:
    """A request in flight, seen from the front end: what its worker sent that its handler has not taken. Its
    queue is a deque and a future: 0.5-0.8 us a message less than an asyncio.Queue (3% of the front end's
    time at 64 streams x 1 character a message)."""

    __slots__ = ("id", "link", "session_id", "items", "waiter", "granted", "writing_since", "task", "ended")

    def __init__(self, sid: int, link, session_id: str = ""):
        self.id, self.link, self.session_id, self.task = sid, link, session_id, asyncio.current_task()
        self.items: deque = deque()  # Chunk (its messages), list (predictions), Exception
        self.waiter: asyncio.Future | None = None
        self.granted, self.ended = 0, False  # messages taken since credit was last granted; the worker is done
        self.writing_since: float | None = None  # while its handler writes a message: since when

    def put(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self, everything: bool) -> list:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        if not everything:
            return [self.items.popleft()]
        items, self.items = list(self.items), deque()
        return items


class Engine:
    def __init__(self, cfg: ServerConfig, metrics: Metrics, openers: list[Callable], in_process: bool = False):
        """A worker per opener (opener() opens its models, in the worker): a process each, or one thread."""
        self.cfg, self.metrics, settings = cfg, metrics, cfg.worker_settings()
        self.links = [WorkerLink(i, o, settings, self._dispatch, self._lost, in_process) for i, o in enumerate(openers)]
        try:
            for link in self.links:  # all load at once
                link.wait_ready()
        except BaseException:
            for link in self.links:
                link.kill()
            raise
        self.routes: dict[str, WorkerLink] = {name: link for link in self.links for name in link.models}
        self.vocabs = {m.id: Vocab(m.vocab) for m in self.models()}
        for name in self.routes:
            metrics.model(name)
        self.streams: dict[int, _Stream] = {}  # Generate streams and Predict calls in flight, all models
        self.draining = False  # set: new requests are refused (UNAVAILABLE); those in flight carry on
        self._ids, self._sweeper = itertools.count(), None

    async def start(self, health: Callable[[list[str], bool], Awaitable[None]]) -> None:
        """Attach to the workers on the running loop. await health(models, serving): a worker died or is back."""
        for link in self.links:
            await link.start(health)
        self._sweeper = asyncio.ensure_future(self._sweep_stalled())

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        await asyncio.gather(*(link.stop() for link in self.links))
        self._lost(None, Unavailable("the server stopped"))

    def _dispatch(self, g: Generations) -> None:
        """A model's step, from its worker: each text into its stream's queue."""
        streams, ends, logprobs = self.streams, g.ends, g.logprobs
        for sid, text in zip(g.ids, g.texts):
            s = streams.get(sid)
            if s is None:  # cancelled meanwhile
                continue
            finish, stats = ends.get(sid, NO_END)
            if stats is not None:
                s.ended = True
                if s.session_id:  # its worker holds its state now
                    s.link.stored(s.session_id)
            s.put(Chunk(text, finish, stats, logprobs.get(sid)))
        for sid, last in [*g.errors.items(), *g.predictions.items()]:
            if sid in streams:  # an error ends a stream; predictions answer a Predict call
                streams[sid].ended = True
                streams[sid].put(last)
        if g.metrics is not None:  # and with them the worker's count of sessions
            self.metrics.model(g.model).load(g.metrics)
            self.routes[g.model].sessions_held = g.sessions
            self.metrics.sessions.set(sum(link.sessions_held for link in self.links))

    def _lost(self, link, exc: Exception) -> None:
        """The worker behind link has gone (None: all of them): its streams end with exc."""
        for s in list(self.streams.values()):
            if link is None or s.link is link:
                s.ended = True
                s.put(exc)

    def models(self) -> list[ModelInfo]:
        return [info for link in self.links for info in link.models.values()]

    def down(self) -> list[str]:
        """The models that cannot serve now: their worker has gone and is being restarted."""
        return sorted(name for link in self.links if link.dead for name in link.models)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Chunk]:
        arrived = time.perf_counter()
        link = self._route(req.model)
        req, prompt = self._check_generate(req, self.vocabs[req.model])
        s = self._open(link, req.session_id)
        try:
            lost = link.take_lost(req.session_id)
            link.send(Submit(s.id, req.model, req, prompt, self.cfg.max_unsent, arrived, lost))
            every = max(1, self.cfg.max_unsent // 2)  # half the window: a parked row rejoins for that long
            while True:
                items = await s.take(req.coalesce)
                last = items[-1]
                if isinstance(last, Exception):
                    if len(items) > 1:  # what came before the error still goes out
                        yield _merge(items[:-1])
                    raise last
                if last.stats is not None:
                    self._close(s, req.model)  # its slot is free: the client may send its next request at once
                    yield _merge(items)
                    return
                s.writing_since = time.monotonic()
                yield _merge(items)
                s.writing_since = None
                s.granted += len(items)
                if s.granted >= every:
                    link.send(Credit(s.id, req.model, s.granted))
                    s.granted = 0
        finally:
            self._close(s, req.model)

    async def predict(self, req: PredictRequest) -> list[Prediction]:
        link = self._route(req.model)
        if not req.text:
            raise InvalidArgument("text is empty: Predict needs at least one character")
        self._check_length("text", req.text, self.cfg.max_prompt_chars)
        if req.top_k > self.cfg.max_top_k:
            raise InvalidArgument(f"top_k {req.top_k} exceeds the server's cap of {self.cfg.max_top_k}")
        vocab = self.vocabs[req.model]
        tokens = vocab.encode(req.text)
        s = self._open(link)
        try:
            link.send(Predict(s.id, req.model, tokens, min(req.top_k or PREDICT_TOP_K, len(vocab))))
            (result,) = await s.take(False)
            if isinstance(result, Exception):
                raise result
            return result
        finally:
            self._close(s, req.model)

    def _open(self, link, session_id: str = "") -> _Stream:
        """A stream takes one of max_streams places (Generate streams and Predict calls together)."""
        if len(self.streams) >= self.cfg.max_streams:
            raise ResourceExhausted(f"the server is at its limit of {self.cfg.max_streams} concurrent requests")
        s = _Stream(next(self._ids), link, session_id)
        self.streams[s.id] = s
        return s

    def _close(self, s: _Stream, model: str) -> None:
        if self.streams.pop(s.id, None) is None:  # closed already
            return
        if not s.ended and not s.link.dead:  # cancelled, failed on the way: the worker drops it
            s.link.send(Cancel(s.id, model))

    def _route(self, model: str):
        if self.draining:
            raise Unavailable("the server is shutting down")
        if not model:
            raise InvalidArgument("model is required (ListModels lists them)")
        self._check_length("model name", model, self.cfg.max_model_chars)
        link = self.routes.get(model)
        if link is None:
            raise NotFound(f"unknown model {shown(model)}; loaded: {', '.join(self.routes)}")
        if link.dead:
            raise Unavailable(link.dead)
        return link

    def _check_generate(self, req: GenerateRequest, vocab: Vocab) -> tuple[GenerateRequest, np.ndarray]:
        """Bound every field; returns the request with defaults resolved, and the prompt's tokens."""
        c = self.cfg
        self._check_length("prompt", req.prompt, c.max_prompt_chars)
        self._check_length("session_id", req.session_id, c.max_session_id_chars)
        prompt = vocab.encode(req.prompt)
        for name, value, cap in (("max_chars", req.max_chars, c.max_chars), ("top_k", req.top_k, c.max_top_k),
                                 ("chunk_chars", req.chunk_chars, c.max_chunk_chars)):
            if value > cap:
                raise InvalidArgument(f"{name} {value} exceeds the server's cap of {cap}")
        if not (math.isfinite(req.temperature) and req.temperature >= 0):
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0: greedy), not {req.temperature}")
        if not (0 < req.top_p <= 1):  # also refuses NaN
            raise InvalidArgument(f"top_p must be in (0, 1], not {req.top_p}")
        if len(req.stop) > c.max_stop:
            raise InvalidArgument(f"{len(req.stop)} stop sequences; the server allows {c.max_stop}")
        for s in req.stop:
            if not s:
                raise InvalidArgument("a stop sequence is empty")
            self._check_length("a stop sequence", s, c.max_stop_chars)
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(f"logprobs must be between 0 and {MAX_LOGPROBS}, not {req.logprobs}")
        if req.require_session and not req.session_id:
            raise InvalidArgument("require_session needs a session_id")
        if not req.prompt and not req.session_id:
            raise InvalidArgument("empty prompt: give a prompt, or a session_id to continue")
        req = dataclasses.replace(
            req, max_chars=req.max_chars or c.default_chars, chunk_chars=req.chunk_chars or 1,
            seed=secrets.randbits(63) if req.seed is None else req.seed, stop=tuple(req.stop))
        return req, prompt

    @staticmethod
    def _check_length(what: str, text: str, limit: int) -> None:
        if len(text) > limit:
            raise InvalidArgument(f"{what} has {len(text)} characters; the server allows {limit}")

    async def _sweep_stalled(self) -> None:
        """End the streams whose client has taken nothing for stall_timeout_s (their write waits on it)."""
        limit = self.cfg.stall_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for s in list(self.streams.values()):
                if s.writing_since is not None and now - s.writing_since > limit and not s.task.done():
                    log.warning("ending a stream whose client took nothing for %.0f s", now - s.writing_since)
                    self.metrics.stalled.inc()
                    s.writing_since = None
                    s.task.cancel()
