"""The front end's handle on one worker: messages out once per turn of the event loop, Generations in.

`LocalLink` holds a `serve.worker.Worker` in this process (`--workers 0`, or runtimes given); `ProcessLink`
spawns one in a process of its own (spawned, not forked: gRPC's and onnxruntime's threads do not survive
a fork) and talks to it over a socket pair, a pickled list per write. Both hand each `Generations` to
`on_generations` on the event loop, and have the same `send`, `start`, `stop`.

A worker process that dies (killed, crashed) ends its streams with UNAVAILABLE and loses its sessions;
the link remembers which session ids it held (ids only, at most max_sessions) so the next request on one
is marked `lost` (serve.sessions). It is restarted at once when it had run for RESTART_STABLE_S, else
after a delay that doubles from RESTART_FIRST_S to RESTART_MAX_S; it never gives up. Meanwhile its
models answer UNAVAILABLE and their health (and the server's) says NOT_SERVING.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import socket
import threading
import time
from collections import OrderedDict

from serve.errors import Unavailable
from serve.messages import Ready, Stop, frame, read_frame, unframe
from serve.worker import Worker, worker_main

log = logging.getLogger(__name__)

RESTART_FIRST_S, RESTART_MAX_S, RESTART_STABLE_S = 0.5, 30.0, 60.0
STOP_TIMEOUT_S = 10.0  # a worker that has not exited by then after Stop is killed


class _Link:
    def __init__(self, settings: dict, on_generations):
        self.settings, self.on_generations = settings, on_generations
        self.models: dict = {}  # name -> serve.types.ModelInfo
        self.dead: str | None = None  # why its models cannot serve now
        self.sessions_held = 0  # as the worker last said
        self._stored: OrderedDict[str, None] = OrderedDict()  # session ids whose state the worker holds
        self._lost: OrderedDict[str, None] = OrderedDict()  # ... that it held when it died
        self._out: list = []

    def send(self, msg) -> None:
        """Queue a message; those of one turn of the loop go out together."""
        if self.dead:
            raise Unavailable(self.dead)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(msg)

    def stored(self, session_id: str) -> None:
        self._stored[session_id] = None
        self._stored.move_to_end(session_id)
        if len(self._stored) > self.settings["max_sessions"]:
            self._stored.popitem(last=False)

    def take_lost(self, session_id: str) -> bool:
        """Whether the session's state was lost with a worker that died (said once)."""
        self._stored.pop(session_id, None)  # checked out: stored again when its stream ends
        lost = session_id in self._lost
        self._lost.pop(session_id, None)
        return lost

    def _forget_sessions(self) -> None:
        self._lost.update(self._stored)
        self._stored = OrderedDict()
        while len(self._lost) > self.settings["max_sessions"]:
            self._lost.popitem(last=False)


class LocalLink(_Link):
    """A worker in this process: its model threads emit onto the loop, one wake-up while any is pending."""

    def __init__(self, runtimes: dict, settings: dict, on_generations):
        super().__init__(settings, on_generations)
        self.runtimes, self._inbox, self._lock = runtimes, [], threading.Lock()
        self.worker: Worker | None = None

    async def start(self, health=None) -> None:
        loop = asyncio.get_running_loop()

        def emit(gens) -> None:
            with self._lock:
                wake = not self._inbox
                self._inbox.append(gens)
            if wake:
                loop.call_soon_threadsafe(self._drain)

        self.worker = Worker(self.runtimes, emit, self.settings)
        self.models = self.worker.models()

    def _drain(self) -> None:
        with self._lock:
            batch, self._inbox = self._inbox, []
        for gens in batch:
            self.on_generations(gens)

    def _flush(self) -> None:
        msgs, self._out = self._out, []
        self.worker.handle(msgs)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        self._drain()


class ProcessLink(_Link, asyncio.Protocol):
    def __init__(self, index: int, opener, settings: dict, on_generations, on_death):
        _Link.__init__(self, settings, on_generations)
        self.index, self.opener, self.on_death = index, opener, on_death
        self.health = None
        self._stopping, self._restarting, self._delay = False, None, 0.0
        self._spawn()

    def _spawn(self) -> None:
        self.sock, child = socket.socketpair()
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(target=worker_main, name=f"charrnn-worker-{self.index}", daemon=True,
                                   args=(child, self.opener, self.settings))
        self.process.start()
        child.close()
        self.started_at = time.monotonic()
        self._transport, self._buf, self._lost_event = None, bytearray(), None

    def wait_ready(self) -> None:
        """Block until the worker has opened its models (RuntimeError saying why it could not)."""
        try:
            with self.sock.makefile("rb", buffering=0) as f:  # unbuffered: later bytes stay for the loop
                ready: Ready = read_frame(f)
        except (EOFError, OSError):
            self.process.join(5)
            raise RuntimeError(f"{self.process.name} exited (code {self.process.exitcode}) while opening its "
                               "models; its log is above") from None
        if ready.models is None:
            raise RuntimeError(ready.error)
        self.models = ready.models

    async def start(self, health=None) -> None:
        self.health = health
        self._lost_event = asyncio.Event()
        await asyncio.get_running_loop().create_connection(lambda: self, sock=self.sock)

    def _flush(self) -> None:
        msgs, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(msgs))  # buffered by the transport: never blocks the loop

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        for gens in unframe(self._buf):
            self.on_generations(gens)

    def connection_lost(self, exc) -> None:
        self._lost_event.set()
        if not self._stopping:
            self._died()

    def _died(self) -> None:
        if self.dead:
            return
        self.process.join(1)
        self.dead = f"the worker process running model(s) {', '.join(self.models)} exited (code " \
                    f"{self.process.exitcode}); it is being restarted"
        log.error("%s", self.dead)
        self._forget_sessions()
        self.on_death(self, Unavailable(self.dead))
        if self.health:
            self.health(list(self.models), False)
        self._restarting = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        """A new process for the same models, after a backoff; until it serves, never giving up."""
        up = time.monotonic() - self.started_at
        self._delay = 0.0 if up >= RESTART_STABLE_S else min(max(2 * self._delay, RESTART_FIRST_S), RESTART_MAX_S)
        while not self._stopping:
            if self._delay:
                log.info("restarting %s in %.1f s", self.process.name, self._delay)
                await asyncio.sleep(self._delay)
            self.kill()
            self._spawn()
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.wait_ready)
                await self.start(self.health)
                break
            except (RuntimeError, OSError) as e:
                log.error("%s could not be restarted: %s", self.process.name, e)
                self._delay = min(max(2 * self._delay, RESTART_FIRST_S), RESTART_MAX_S)
        else:
            return
        self.dead = None
        log.info("%s restarted: serving %s again", self.process.name, ", ".join(self.models))
        if self.health:
            self.health(list(self.models), True)

    async def stop(self) -> None:
        self._stopping = True
        if self._restarting and not self._restarting.done():
            self._restarting.cancel()  # its process is killed below
        if not self.dead and self._transport is not None:
            self._out.append(Stop())
            self._flush()  # the worker ends its streams (their errors still arrive), then exits
            try:
                await asyncio.wait_for(self._lost_event.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("%s did not stop within %.0f s; killing it", self.process.name, STOP_TIMEOUT_S)
        self.dead = "the server stopped"
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
