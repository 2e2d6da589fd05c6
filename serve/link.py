"""The front end's handle on one worker: messages out once per turn of the event loop, Generations in.

It runs `serve.worker.worker_main` in a process of its own (spawned: gRPC's and onnxruntime's threads do
not survive a fork) or, with `--workers 0`, in a thread of this process, over the same socket pair; and
restarts a worker process that dies (docs/design.md, "When a worker process dies").
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
from serve.messages import frame, unframe
from serve.worker import worker_main

log = logging.getLogger(__name__)

RESTART_FIRST_S, RESTART_MAX_S, RESTART_STABLE_S = 0.5, 30.0, 60.0
STOP_TIMEOUT_S = 10.0  # a worker that has not exited by then after its socket closed is killed


class WorkerLink(asyncio.Protocol):
    def __init__(self, index: int, opener, settings: dict, on_generations, on_death, in_process: bool = False):
        """opener() opens the worker's models, in the worker; on_generations(g) gets its every step on the loop;
        on_death(link, exc) when its process has gone."""
        self.index, self.opener, self.settings, self.in_process = index, opener, settings, in_process
        self.on_generations, self.on_death, self.health = on_generations, on_death, None
        self.models: dict = {}  # name -> serve.types.ModelInfo
        self.dead: str | None = None  # why its models cannot serve now
        self.sessions_held = 0  # as the worker last said
        self._sessions: OrderedDict[str, bool] = OrderedDict()  # ids of the sessions it holds: True once lost
        self._out: list = []
        self._stopping, self._restarting, self._delay = False, None, 0.0
        self._spawn()

    def _spawn(self) -> None:
        self.sock, child = socket.socketpair()
        kind = threading.Thread if self.in_process else multiprocessing.get_context("spawn").Process
        self.process = kind(target=worker_main, name=f"charrnn-worker-{self.index}", daemon=True,
                            args=(child, self.opener, self.settings, not self.in_process))
        self.process.start()
        if not self.in_process:
            child.close()  # the worker process has its own
        self.started_at = time.monotonic()
        self._transport, self._buf, self._closed = None, bytearray(), None

    def wait_ready(self) -> None:
        """Block until the worker has opened its models (RuntimeError saying why it could not)."""
        while not (got := unframe(self._buf)):  # the worker sends nothing more until it has messages
            data = self.sock.recv(1 << 16)  # a socket pair: its end closing reads as b""
            if not data:
                self.process.join(5)
                raise RuntimeError(f"{self.process.name} exited (code {getattr(self.process, 'exitcode', None)}) "
                                   "while opening its models; its log is above")
            self._buf += data
        if isinstance(got[0], RuntimeError):
            raise got[0]
        self.models = got[0]

    async def start(self, health) -> None:
        """Read the worker's messages on the running loop. await health(models, serving): it died, or is back."""
        self.health, self._closed = health, asyncio.Event()
        await asyncio.get_running_loop().create_connection(lambda: self, sock=self.sock)

    def send(self, msg) -> None:
        """Queue a message; those of one turn of the loop go out in one write."""
        if self.dead:
            raise Unavailable(self.dead)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(msg)

    def _flush(self) -> None:
        msgs, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(msgs))  # buffered by the transport: never blocks the loop

    def stored(self, session_id: str) -> None:
        self._sessions[session_id] = False
        self._sessions.move_to_end(session_id)
        if len(self._sessions) > self.settings["max_sessions"]:
            self._sessions.popitem(last=False)

    def take_lost(self, session_id: str) -> bool:
        """Whether the session's state was lost with a worker that died; forgets the id until its stream ends."""
        return self._sessions.pop(session_id, False)

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        for gens in unframe(self._buf):
            self.on_generations(gens)

    def connection_lost(self, exc) -> None:
        self._closed.set()
        if not self._stopping:
            self._died()

    def _died(self) -> None:
        self.process.join(1)
        self.dead = f"the worker process running model(s) {', '.join(self.models)} exited (code " \
                    f"{getattr(self.process, 'exitcode', None)}); it is being restarted"
        log.error("%s", self.dead)
        self._sessions = OrderedDict.fromkeys(self._sessions, True)
        self.on_death(self, Unavailable(self.dead))
        self._restarting = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        """A new worker for the same models, after a backoff; until it serves, never giving up."""
        await self.health(list(self.models), False)
        stable = time.monotonic() - self.started_at >= RESTART_STABLE_S
        while not self._stopping:
            self._delay = 0.0 if stable else min(max(2 * self._delay, RESTART_FIRST_S), RESTART_MAX_S)
            if self._delay:
                log.info("restarting %s in %.1f s", self.process.name, self._delay)
                await asyncio.sleep(self._delay)
            self.kill()
            self._spawn()
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.wait_ready)
                await self.start(self.health)
            except (RuntimeError, OSError) as e:
                log.error("%s could not be restarted: %s", self.process.name, e)
                stable = False
                continue
            self.dead = None
            log.info("%s restarted: serving %s again", self.process.name, ", ".join(self.models))
            return await self.health(list(self.models), True)

    async def stop(self) -> None:
        """Close the worker's socket: it ends its turn and exits (torch's teardown can take seconds)."""
        self._stopping, self.dead = True, "the server stopped"
        if self._restarting and not self._restarting.done():
            self._restarting.cancel()  # its process is killed below
        if self._transport is not None:
            self._transport.close()
            await self._closed.wait()
        self.kill(wait=STOP_TIMEOUT_S)

    def kill(self, wait: float = 0.0) -> None:
        (self._transport or self.sock).close()
        self.process.join(wait)
        if self.process.is_alive() and not self.in_process:
            self.process.kill()
            self.process.join()
