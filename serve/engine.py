"""The server below the gRPC edge: validates requests, keeps sessions, bounds concurrency and hands
streams to each model's scheduler. Plain Python types in and out (serve.types); errors are raised as
serve.errors exceptions. Runs on the asyncio event loop; schedulers run on their own threads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager, contextmanager

import numpy as np

from export.runtime import Runtime
from serve.config import ServerConfig
from serve.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from serve.metrics import Metrics
from serve.scheduler import Scheduler, Stream
from serve.sessions import Session, SessionCache
from serve.streams import GenerationStream, PredictionJob
from serve.types import Chunk, GenerateRequest, ModelInfo, Prediction, PredictRequest, SessionState
from serve.workers import ModelCard, RemoteScheduler, WorkerPool

PREDICT_TOP_K = 5  # Predict's top_k when the request leaves it 0
TURN_WAIT_S = 0.02  # longest wait for a turn to send (--max-sending); then a stream sends without one


class Engine:
    """models: runtimes to step in this process (one scheduler thread each), or the cards of the models
    that `pool`'s worker processes step."""

    def __init__(self, models: dict[str, Runtime | ModelCard], cfg: ServerConfig, metrics: Metrics | None = None,
                 pool: WorkerPool | None = None):
        self.served, self.cfg, self.pool = models, cfg, pool
        self.metrics = metrics or Metrics()
        self.sessions = SessionCache(cfg.session_ttl_s, cfg.max_sessions)
        self.schedulers: dict[str, Scheduler | RemoteScheduler] = {}
        self.in_flight = 0  # Generate streams and Predict calls, all models
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list = []  # events from the schedulers, not yet on the loop
        self._turns = asyncio.Semaphore(cfg.max_sending) if cfg.max_sending else None
        self._outbox_lock = threading.Lock()

    # lifecycle

    async def start(self, health: Callable[[list[str], bool], None] | None = None) -> None:
        """Start one scheduler per model (or attach to the workers'), on the loop that will serve requests.
        health(models, serving) is called when a worker process dies (False) and when it is back (True)."""
        self._loop = asyncio.get_running_loop()
        if self.pool:
            self.schedulers = await self.pool.start(self.metrics, self.cfg.max_unsent, health)
            return
        for mid, rt in self.served.items():
            self.schedulers[mid] = Scheduler(rt, self._deliver, metrics=self.metrics.model(mid),
                                             **self.cfg.scheduler_settings()).start()

    def drain(self) -> None:
        """Refuse new requests from now on (UNAVAILABLE); those in flight carry on."""
        self.draining = True

    async def wait_idle(self) -> None:
        """Until no request is in flight."""
        await self._idle.wait()

    async def stop(self) -> None:
        exc = Unavailable("the server stopped")
        if self.pool:
            await self.pool.stop(exc)
            return
        for scheduler in self.schedulers.values():
            scheduler.stop(exc)

    def _deliver(self, events: list) -> None:
        """Called by a scheduler thread with (stream, event) pairs. One hop onto the loop per step, or none
        when a hop is already on its way (the loop is behind): waking the loop costs a syscall."""
        if not events:
            return
        with self._outbox_lock:
            wake = not self._outbox
            self._outbox += events
        if wake:
            self._loop.call_soon_threadsafe(self._dispatch)

    def _dispatch(self) -> None:
        with self._outbox_lock:
            events, self._outbox = self._outbox, []
        for stream, event in events:
            stream.queue.put_nowait(event)

    # the protocol

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name, rt.cell, rt.hidden_size, rt.fc_layers, rt.vocab.chars, rt.backend)
                for name, rt in self.served.items()]

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Chunk]:
        arrived = time.perf_counter()
        rt = self._runtime(req.model)
        req, prompt = self._check_generate(req, rt)
        with self._slot() as release:
            session, how = None, SessionState.NONE
            if req.session_id:
                session, how = self.sessions.checkout(req.session_id, req.model, req.require_session)
            finished = False
            try:
                tokens = np.concatenate([session.pending, prompt]) if session else prompt
                if len(tokens) == 0:
                    raise InvalidArgument("empty prompt: give a prompt, or a session_id to continue")
                stream = GenerationStream(tokens, session.state if session else None, req, rt.vocab, how,
                                          arrived, self.schedulers[req.model].metrics)
                async with aclosing(self._run(stream, req.model, merge=req.coalesce)) as chunks:
                    async for chunk in chunks:
                        if chunk.finish_reason is None:
                            yield chunk
                            continue
                        # Settle before the last message leaves: the client may send its next request at once.
                        finished = True
                        self._end_session(req.session_id, Session(req.model, stream.state, stream.pending))
                        release()
                        yield chunk
                        return
            finally:
                if not finished:  # failed or cancelled: the session keeps the state it had before
                    self._end_session(req.session_id, session)

    async def predict(self, req: PredictRequest) -> list[Prediction]:
        rt = self._runtime(req.model)
        if not req.text:
            raise InvalidArgument("text is empty: Predict needs at least one character")
        self._check_length("text", req.text, self.cfg.max_prompt_chars)
        if req.top_k > self.cfg.max_top_k:
            raise InvalidArgument(f"top_k {req.top_k} exceeds the server's cap of {self.cfg.max_top_k}")
        job = PredictionJob(rt.vocab.encode(req.text), min(req.top_k or PREDICT_TOP_K, len(rt.vocab)), rt.vocab)
        with self._slot():
            async with aclosing(self._run(job, req.model)) as events:
                async for predictions in events:
                    return predictions

    # helpers

    async def _run(self, stream: Stream, model: str, merge: bool = False) -> AsyncIterator:
        """Submit a stream to its model's scheduler and yield its events; the caller stops after the last.
        merge: a chunk goes out together with the chunks already waiting behind it (see `_merge`), once the
        stream's turn to send has come (--max-sending): the caller sends it before asking for the next."""
        scheduler = self.schedulers[model]
        stream.queue = asyncio.Queue()
        scheduler.submit(stream)
        error = None  # met while merging: raised after the merged chunk has gone
        try:
            while error is None:
                event = await stream.queue.get()
                scheduler.ack(stream)
                if merge and type(event) is Chunk:
                    async with self._turn():
                        event, error = self._merge(event, stream, scheduler)
                        yield event
                    continue
                if isinstance(event, BaseException):
                    raise event
                yield event
            raise error
        finally:
            scheduler.cancel(stream)  # a no-op once done; otherwise the scheduler drops it next step

    @asynccontextmanager
    async def _turn(self):
        """One of --max-sending turns to send, waited for at most TURN_WAIT_S: a client that stops reading keeps
        its turn while grpc waits for it, and must not hold up the others for longer than that."""
        turns, held = self._turns, False
        if turns is not None and not turns.locked():
            held = await turns.acquire()  # at once, without wait_for's task
        elif turns is not None:
            try:
                held = await asyncio.wait_for(turns.acquire(), TURN_WAIT_S)
            except asyncio.TimeoutError:
                pass
        try:
            yield
        finally:
            if held:
                turns.release()

    def _merge(self, chunk: Chunk, stream: Stream,
               scheduler: Scheduler | RemoteScheduler) -> tuple[Chunk, BaseException | None]:
        """The chunk and those already waiting behind it, as one (with the last one's finish and stats), up to
        about max_chunk_chars characters: characters made while the last message was being sent go out in the
        next, and none waits for company. An error met on the way is returned, to be raised after it."""
        texts, size = [chunk.text], len(chunk.text)
        while chunk.finish_reason is None and size < self.cfg.max_chunk_chars and not stream.queue.empty():
            event = stream.queue.get_nowait()
            scheduler.ack(stream)
            if isinstance(event, BaseException):
                return Chunk("".join(texts)), event
            chunk = event
            texts.append(chunk.text)
            size += len(chunk.text)
        return (chunk if len(texts) == 1 else Chunk("".join(texts), chunk.finish_reason, chunk.stats)), None

    def _runtime(self, model: str) -> Runtime:
        if self.draining:
            raise Unavailable("the server is shutting down")
        if not model:
            raise InvalidArgument("model is required (ListModels lists them)")
        if model not in self.served:
            raise NotFound(f"unknown model {model!r}; loaded: {', '.join(self.served)}")
        return self.served[model]

    def _check_generate(self, req: GenerateRequest, rt: Runtime) -> tuple[GenerateRequest, np.ndarray]:
        """Bound every field; returns the request with defaults resolved, and the prompt's tokens."""
        c = self.cfg
        self._check_length("prompt", req.prompt, c.max_prompt_chars)
        prompt = rt.vocab.encode(req.prompt)
        if req.max_chars > c.max_chars:
            raise InvalidArgument(f"max_chars {req.max_chars} exceeds the server's cap of {c.max_chars}")
        if not (math.isfinite(req.temperature) and req.temperature >= 0):
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0: greedy), not {req.temperature}")
        if not (0 < req.top_p <= 1):  # also refuses NaN
            raise InvalidArgument(f"top_p must be in (0, 1], not {req.top_p}")
        if req.top_k > c.max_top_k:
            raise InvalidArgument(f"top_k {req.top_k} exceeds the server's cap of {c.max_top_k}")
        if req.chunk_chars > c.max_chunk_chars:
            raise InvalidArgument(f"chunk_chars {req.chunk_chars} exceeds the server's cap of {c.max_chunk_chars}")
        if len(req.stop) > c.max_stop:
            raise InvalidArgument(f"{len(req.stop)} stop sequences; the server allows {c.max_stop}")
        for s in req.stop:
            if not s:
                raise InvalidArgument("a stop sequence is empty")
            self._check_length("a stop sequence", s, c.max_stop_chars)
        self._check_length("session_id", req.session_id, c.max_session_id_chars)
        if req.require_session and not req.session_id:
            raise InvalidArgument("require_session needs a session_id")
        req = dataclasses.replace(
            req, max_chars=req.max_chars or c.default_chars, chunk_chars=req.chunk_chars or 1,
            seed=secrets.randbits(63) if req.seed is None else req.seed, stop=tuple(req.stop))
        return req, prompt

    @staticmethod
    def _check_length(what: str, text: str, limit: int) -> None:
        if len(text) > limit:
            raise InvalidArgument(f"{what} has {len(text)} characters; the server allows {limit}")

    @contextmanager
    def _slot(self):
        """One of max_streams concurrent requests; yields a release function for an early release."""
        if self.in_flight >= self.cfg.max_streams:
            raise ResourceExhausted(f"the server is at its limit of {self.cfg.max_streams} concurrent requests")
        self.in_flight += 1
        self._idle.clear()
        held = True

        def release():
            nonlocal held
            if held:
                held = False
                self.in_flight -= 1
                if not self.in_flight:
                    self._idle.set()

        try:
            yield release
        finally:
            release()

    def _end_session(self, sid: str, session: Session | None) -> None:
        if sid:
            self.sessions.checkin(sid, session)
            self.metrics.sessions.set(len(self.sessions))

