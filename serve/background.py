"""A server on an event loop of its own thread, for synchronous programs (tests, notebooks, benchmarks)."""
from __future__ import annotations

import asyncio
import threading

from export.runtime import Runtime
from serve.backends import open_runtimes
from serve.config import ServerConfig
from serve.server import Server


class BackgroundServer:
    """A Server on an event loop of its own thread, for synchronous programs (tests, notebooks, benchmarks).

        with BackgroundServer(ServerConfig(models=dir, port=0)) as bg:
            stub = clients.api.stub(bg.target)
    """

    def __init__(self, cfg: ServerConfig, runtimes: dict[str, Runtime] | None = None, opener=open_runtimes):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)
        self._thread.start()
        try:
            self.server = self.call(Server(cfg, runtimes, opener).start())
        except BaseException:
            self._close_loop()
            raise

    @property
    def target(self) -> str:
        return f"{self.server.cfg.host}:{self.server.port}"

    def call(self, coro, timeout: float | None = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace_s: float = 0.0) -> None:
        self.call(self.server.drain_and_stop(grace_s))
        self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
