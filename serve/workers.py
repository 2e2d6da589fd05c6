"""Model workers: the schedulers in processes of their own, so that the gRPC front end's event loop and
the models' steps stop taking turns on one interpreter lock.

`--workers N` (default 1) spreads the models over N worker processes (spawned, not forked: gRPC's and
onnxruntime's threads do not survive a fork). A worker opens its models' runtimes and runs one
`Scheduler` thread per model, exactly as the server process itself does with `--workers 0`. The front
end (serve.engine) keeps requests, sessions and limits; a worker keeps the streams it steps. One socket
pair per worker carries length-prefixed pickled messages between our own two processes:

    front -> worker  ("submit", model, sid, stream)   the stream with its tokens, state and request
                     ("ack", sid, consumed)           every few events taken (backpressure, see Scheduler)
                     ("cancel", sid), ("stop",)
    worker -> front  ("ready", {model: ModelCard}) or ("error", message), once, after loading
                     ("events", [(sid, event, final)], {model: metrics snapshot}), one per step with events;
                     final = (state, pending) once the stream has ended, else None

The front end reads with an asyncio protocol (one read takes every message waiting) and writes through
its transport (never blocking the loop). A worker that dies (killed, crashed) ends its streams with
UNAVAILABLE, as are its models' requests until a new process has opened them (at most MAX_RESTARTS
times within RESTART_WINDOW_S; then they stay down); the other workers' models carry on.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import multiprocessing
import pickle
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from export.runtime import Runtime
from serve.backends import BackendError, find_models, open_runtimes, resolve_providers
from serve.errors import ServeError, Unavailable
from serve.metrics import ModelMetrics
from serve.scheduler import Scheduler, Stream
from serve.streams import GenerationStream  # noqa: F401  the streams it unpickles: loaded at start, not by request 1
from serve.types import Chunk
from train.vocab import Vocab, VocabError

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 0.1  # a model's metrics travel with its events this often, and whenever streams come or go
STOP_TIMEOUT_S = 10.0  # a worker that has not exited by then after "stop" is killed
MAX_RESTARTS, RESTART_WINDOW_S = 3, 60.0  # a worker that dies more often than this stays down


@dataclass(frozen=True)
class ModelCard:
    """What the front end knows of a model a worker runs: enough to check requests and to list it."""

    model_id: str
    cell: str
    hidden_size: int
    fc_layers: int
    vocab: Vocab
    backend: str

    @classmethod
    def of(cls, rt: Runtime) -> "ModelCard":
        return cls(rt.model_id, rt.cell, rt.hidden_size, rt.fc_layers, rt.vocab, rt.backend)


# messages: a 4-byte length, then the pickled tuple

_HEADER = struct.Struct("!I")


def _frame(msg: tuple) -> bytes:
    data = pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _read_message(f) -> tuple:
    """The next message from a blocking binary file; EOFError once the other end has closed."""
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (n,) = _HEADER.unpack(header)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


# the worker process

def _worker_main(sock: socket.socket, paths: list[Path], backend: str, providers, threads: int,
                 settings: dict) -> None:
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the server drains its streams
    # and then stops the workers, which otherwise leave only when the server's end of the socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    try:
        runtimes = open_runtimes(paths, backend, providers, threads)
    except BackendError as e:
        sock.sendall(_frame(("error", str(e))))
        return
    sock.sendall(_frame(("ready", {name: ModelCard.of(rt) for name, rt in runtimes.items()})))
    _Worker(sock, runtimes, settings).serve()


class _Worker:
    def __init__(self, sock: socket.socket, runtimes: dict[str, Runtime], settings: dict):
        self.sock, self._send_lock = sock, threading.Lock()
        self.streams: dict[int, tuple[Stream, Scheduler]] = {}
        self.metrics = {name: ModelMetrics() for name in runtimes}
        self._snapshot_at = dict.fromkeys(runtimes, 0.0)
        self.schedulers = {name: Scheduler(rt, functools.partial(self.deliver, name), metrics=self.metrics[name],
                                           **settings).start() for name, rt in runtimes.items()}

    def serve(self) -> None:
        """Carry out the front end's messages until "stop" (or until the front end is gone)."""
        f = self.sock.makefile("rb")
        while True:
            try:
                msg = _read_message(f)
            except (EOFError, OSError):
                msg = ("stop",)
            kind = msg[0]
            if kind == "submit":
                _, model, sid, stream = msg
                if hasattr(stream, "metrics"):
                    stream.metrics = self.metrics[model]
                scheduler = self.schedulers[model]
                self.streams[sid] = (stream, scheduler)
                scheduler.submit(stream)
            elif kind == "ack" and msg[1] in self.streams:
                stream, scheduler = self.streams[msg[1]]
                scheduler.ack(stream, msg[2] - stream.consumed)
            elif kind == "cancel" and msg[1] in self.streams:
                stream, scheduler = self.streams.pop(msg[1])  # the scheduler drops it without an event
                scheduler.cancel(stream)
            elif kind == "stop":
                for scheduler in self.schedulers.values():
                    scheduler.stop(Unavailable("the server stopped"))
                return

    def deliver(self, model: str, events: list) -> None:
        """A scheduler's events of one step, on their way to the front end (called on that scheduler's thread).
        A chunk that does not end its stream goes as its bare text: pickling 64 dataclasses costs 10x more."""
        out, ended = [], False
        for stream, event in events:
            final = None
            if stream.done or isinstance(event, BaseException):
                final, ended = (stream.state, getattr(stream, "pending", None)), True
                self.streams.pop(stream.sid, None)
            elif type(event) is Chunk:
                event = event.text
            if isinstance(event, BaseException) and not isinstance(event, (ServeError, VocabError)):
                event = RuntimeError(f"{type(event).__name__}: {event}")  # library exceptions may not pickle
            out.append((stream.sid, event, final))
        now = time.monotonic()
        snapshots = {}
        if ended or not events or now - self._snapshot_at[model] >= SNAPSHOT_EVERY_S:
            self._snapshot_at[model] = now
            snapshots[model] = self.metrics[model].snapshot()
        try:
            with self._send_lock:
                self.sock.sendall(_frame(("events", out, snapshots)))
        except OSError:  # the front end is gone; serve() sees it too and stops
            pass


# the front end's side

class WorkerPool:
    """Starts the workers and waits until they have loaded their models (BackendError if one cannot)."""

    def __init__(self, root: Path, backend: str, providers: str = "", threads: int = 0, workers: int = 1,
                 settings: dict | None = None):
        providers = resolve_providers(backend, providers)  # a bad backend or provider fails here, at once
        paths = find_models(root, backend)
        ctx = multiprocessing.get_context("spawn")
        self.workers: list[_WorkerHandle] = []
        self.cards: dict[str, ModelCard] = {}
        try:
            for i in range(min(workers, len(paths))):
                self.workers.append(_WorkerHandle(ctx, i, paths[i::workers], backend, providers, threads,
                                                  settings or {}))
            for w in self.workers:  # all load at once
                self.cards.update(w.wait_ready())
        except BaseException:
            self.close()
            raise

    async def start(self, metrics, max_unsent: int, health=None) -> dict[str, RemoteScheduler]:
        """Read the workers' events on the running loop; the schedulers' stand-ins, by model.
        health(models, serving) is called when a worker dies (False) and when its restart is ready (True)."""
        schedulers = {}
        for w in self.workers:
            w.health = health
            await w.attach()
            for name in w.models:
                schedulers[name] = RemoteScheduler(w, name, metrics.model(name), max_unsent)
                w.metrics[name] = schedulers[name].metrics
        return schedulers

    async def stop(self, exc: BaseException) -> None:
        """Stop every worker; streams still inside end with exc (the workers' own stop does that)."""
        await asyncio.gather(*(w.stop(exc) for w in self.workers))

    def close(self) -> None:
        """Kill the workers at once (a failed start)."""
        for w in self.workers:
            w.kill()


class _WorkerHandle(asyncio.Protocol):
    """One worker process, seen from the front end: its socket, the streams it holds, its models' metrics."""

    def __init__(self, ctx, index: int, paths: list[Path], backend: str, providers, threads: int, settings: dict):
        self._spec = ctx, index, paths, backend, providers, threads, settings
        self.models: list[str] = []
        self.metrics: dict[str, ModelMetrics] = {}
        self.health = None  # called with (self.models, serving) when the process dies and when it is back
        self._restarts: list[float] = []  # when it was restarted, within the last RESTART_WINDOW_S
        self._restarting: asyncio.Task | None = None
        self._stopping = False
        self._spawn()

    def _spawn(self) -> None:
        """Start the process; until `attach`, the handle is not connected."""
        ctx, index, paths, backend, providers, threads, settings = self._spec
        self.sock, child = socket.socketpair()
        self.process = ctx.Process(target=_worker_main, name=f"charrnn-worker-{index}", daemon=True,
                                   args=(child, paths, backend, providers, threads, settings))
        self.process.start()
        child.close()
        self.streams: dict[int, Stream] = {}
        self.dead: str | None = None  # why, while the process is gone
        self._transport: asyncio.Transport | None = None
        self._outgoing: list[bytes] = []  # frames waiting for the end of this turn of the loop
        self._buf = bytearray()
        self._lost: asyncio.Event | None = None  # set when the socket closes

    def wait_ready(self) -> dict[str, ModelCard]:
        try:
            with self.sock.makefile("rb", buffering=0) as f:  # unbuffered: later bytes stay for the loop
                msg = _read_message(f)
        except EOFError:
            self.process.join(5)
            raise BackendError(f"{self.process.name} exited (code {self.process.exitcode}) while opening its "
                               "models; its log is above") from None
        if msg[0] == "error":
            raise BackendError(msg[1])
        self.models = list(msg[1])
        return msg[1]

    async def attach(self) -> None:
        self._lost = asyncio.Event()  # on the running loop
        await asyncio.get_running_loop().create_connection(lambda: self, sock=self.sock)

    def send(self, msg: tuple) -> None:
        """Queue a message; those of one turn of the loop go out in one write (acks come in bursts)."""
        if self.dead:
            raise Unavailable(self.dead)
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(_frame(msg))

    def _flush(self) -> None:
        data, self._outgoing = b"".join(self._outgoing), []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)  # buffered by the transport: never blocks the loop

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start, size = 0, _HEADER.size
        while len(buf) - start >= size:
            (n,) = _HEADER.unpack_from(buf, start)
            if len(buf) - start - size < n:
                break
            self._handle(pickle.loads(memoryview(buf)[start + size:start + size + n]))
            start += size + n
        del buf[:start]

    def connection_lost(self, exc) -> None:
        self._lost.set()
        if not self._stopping:
            self._died()

    def _handle(self, msg: tuple) -> None:
        _, events, snapshots = msg
        for name, snapshot in snapshots.items():
            self.metrics[name].load(snapshot)
        for sid, event, final in events:
            stream = self.streams.pop(sid, None) if final else self.streams.get(sid)
            if stream is None:  # cancelled meanwhile
                continue
            if final:
                (stream.state, stream.pending), stream.done = final, True
            stream.queue.put_nowait(Chunk(event) if type(event) is str else event)

    def _died(self, exc: BaseException | None = None) -> None:
        """End the streams still here: with exc, or UNAVAILABLE because the process has gone."""
        if self.dead:
            return
        self.process.join(1)
        self.dead = str(exc) if exc else (f"the worker process running model(s) {', '.join(self.models)} "
                                          f"exited (code {self.process.exitcode})")
        if exc is None:
            log.error("%s; ending its %d stream(s)", self.dead, len(self.streams))
            if self.health:
                self.health(self.models, False)
            self._restarting = asyncio.ensure_future(self._restart())
        for stream in self.streams.values():
            stream.done = True
            stream.queue.put_nowait(exc or Unavailable(self.dead))
        self.streams.clear()

    async def _restart(self) -> None:
        """A new process for the same models, unless this one keeps dying (then its models stay down)."""
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        if len(self._restarts) >= MAX_RESTARTS:
            log.error("not restarting %s: it died %d times within %.0f s", self.process.name, MAX_RESTARTS + 1,
                      RESTART_WINDOW_S)
            return
        self._restarts.append(now)
        why = self.dead
        self._spawn()
        self.dead = why  # requests keep getting UNAVAILABLE until the new process is ready
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.wait_ready)
            await self.attach()
        except (BackendError, OSError) as e:
            log.error("%s could not be restarted: %s", self.process.name, e)
            return
        self.dead = None
        log.info("%s restarted: serving %s again", self.process.name, ", ".join(self.models))
        if self.health:
            self.health(self.models, True)

    async def stop(self, exc: BaseException) -> None:
        self._stopping = True
        if self._restarting and not self._restarting.done():
            self._restarting.cancel()  # its process is killed below
        if not self.dead:
            self.send(("stop",))  # the worker ends its streams (their events still arrive), then exits
            try:
                await asyncio.wait_for(self._lost.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("%s did not stop within %.0f s; killing it", self.process.name, STOP_TIMEOUT_S)
            self._died(exc)
        self.kill(wait=1.0)

    def kill(self, wait: float = 0.0) -> None:
        self.process.join(wait)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self._transport is not None:
            self._transport.close()
        else:
            self.sock.close()


class RemoteScheduler:
    """A model's scheduler in a worker, seen from the engine: `submit`, `ack`, `cancel` as on `Scheduler`."""

    _ids = itertools.count()

    def __init__(self, worker: _WorkerHandle, model: str, metrics: ModelMetrics, max_unsent: int):
        self.worker, self.model, self.metrics = worker, model, metrics
        # acks go every few events; the worker's count lags by less than a quarter of max_unsent, so a
        # paused stream always resumes (Scheduler resumes at half)
        self.ack_every = max(1, max_unsent // 4)

    def submit(self, stream: Stream) -> None:
        stream.sid = next(self._ids)
        self.worker.send(("submit", self.model, stream.sid, stream))
        self.worker.streams[stream.sid] = stream

    def ack(self, stream: Stream) -> None:
        stream.consumed += 1
        if stream.consumed % self.ack_every == 0 and not stream.done and not self.worker.dead:
            self.worker.send(("ack", stream.sid, stream.consumed))

    def cancel(self, stream: Stream) -> None:
        if self.worker.streams.pop(getattr(stream, "sid", None), None) is not None and not self.worker.dead:
            self.worker.send(("cancel", stream.sid))
