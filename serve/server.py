"""The gRPC edge: the Generator servicer, protobuf <-> serve.types, the interceptor (API key, errors), health,
reflection, and the process's lifecycle (`python -m serve`, which also runs the HTTP edge, serve.http, on the
same loop and engine). Nothing below this module sees protobuf or gRPC status codes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection

from export.runtime import Runtime
from protos.charrnn.v1 import charrnn_pb2 as pb
from protos.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from serve.backends import BackendError, find_models, open_runtimes, resolve_providers
from serve.config import ServerConfig, parse_args
from serve.engine import Engine
from serve.errors import InvalidArgument, status_code
from serve.http import HttpFront
from serve.metrics import Metrics
from serve.types import Chunk, FinishReason, GenerateRequest, PredictRequest, SessionState

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generator"].full_name  # "charrnn.v1.Generator"
# grpc core cancels calls past 1,000 waiting for a handler (CANCELLED, uncounted); so it runs at most --max-streams +
# OTHER_RPCS handlers and the rest wait in its backlog (docs/design.md, "Limits at the edge"; 2,000 calls: all OK)
OTHER_RPCS = 64  # health checks and watches, ListModels, reflection
MAX_PENDING = 16_384
PENDING_OPTIONS = [("grpc.server.max_pending_requests", MAX_PENDING),
                   ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING)]

_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
           FinishReason.STOP: pb.FINISH_REASON_STOP}
_SESSION = {SessionState.NONE: pb.SESSION_STATE_UNSPECIFIED, SessionState.NEW: pb.SESSION_STATE_NEW,
            SessionState.CONTINUED: pb.SESSION_STATE_CONTINUED, SessionState.EXPIRED: pb.SESSION_STATE_EXPIRED,
            SessionState.EVICTED: pb.SESSION_STATE_EVICTED}


def generate_request_from_pb(m: pb.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        model=m.model, prompt=m.prompt, max_chars=m.max_chars, temperature=m.temperature, top_k=m.top_k,
        top_p=m.top_p if m.HasField("top_p") else 1.0, seed=m.seed if m.HasField("seed") else None,
        stop=tuple(m.stop), session_id=m.session_id, chunk_chars=m.chunk_chars, require_session=m.require_session,
        coalesce=m.coalesce)


def chunk_to_pb(c: Chunk) -> pb.GenerateResponse:
    if c.stats is None:
        return pb.GenerateResponse(text=c.text)
    stats = pb.GenerateStats(**{**dataclasses.asdict(c.stats), "session": _SESSION[c.stats.session]})  # same fields
    return pb.GenerateResponse(text=c.text, finish_reason=_FINISH[c.finish_reason], stats=stats)


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(**dataclasses.asdict(m)) for m in self.engine.models()])

    async def Generate(self, request, context):
        # context.write, not yield: a cancel or an expired deadline then lands in this coroutine and the interceptor
        # counts it; with yield it could land in grpc's own send and be counted OK (tests/test_serve.py, deadline)
        async for chunk in self.engine.generate(generate_request_from_pb(request)):
            await context.write(chunk_to_pb(chunk))

    async def Predict(self, request, context):
        found = await self.engine.predict(PredictRequest(model=request.model, text=request.text, top_k=request.top_k))
        return pb.PredictResponse(predictions=[pb.Prediction(char=p.char, probability=p.probability) for p in found])


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Between grpc and the servicers. With --api-key, every call but health checks needs `authorization: Bearer
    KEY` in its metadata (UNAUTHENTICATED otherwise). The Generator's calls parse their bodies here (a corrupt one,
    or invalid UTF-8, is INVALID_ARGUMENT like any other refusal), their exceptions become statuses in this one
    place (serve.errors.status_code), and each is counted by its status."""

    KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

    def __init__(self, api_key: str, metrics: Metrics):
        self.expected, self.requests = f"Bearer {api_key}".encode() if api_key else None, metrics.requests

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        ours, method = details.method.startswith(f"/{SERVICE}/"), details.method.rsplit("/", 1)[1]
        kind = next(k for k in self.KINDS if getattr(handler, k))
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        if self.expected is not None and not self._authorized(details.invocation_metadata):
            async def deny(request, context):
                if ours:
                    self.requests.labels(method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required: metadata "
                                                                     "'authorization: Bearer KEY'")
            return make(deny)
        if not ours:
            return handler
        # requests come as bytes, parsed in the wrapper; Generate writes its messages (context.write): a coroutine too
        return make(self._wrap(method, getattr(handler, kind), handler.request_deserializer),
                    response_serializer=handler.response_serializer)

    def _authorized(self, metadata) -> bool:
        given = next((v for k, v in metadata or () if k == "authorization"), "")
        return hmac.compare_digest(given.encode() if isinstance(given, str) else given, self.expected)

    def _wrap(self, method, behaviour, parse):
        async def wrapper(body, context):
            code = grpc.StatusCode.OK
            try:
                try:
                    request = parse(body)
                except DecodeError:  # a corrupt body, or a string field that is not UTF-8
                    raise InvalidArgument(f"the {method} request is not a valid protobuf message") from None
                return await behaviour(request, context)
            except asyncio.CancelledError:  # a client's deadline timer can cancel it (RST_STREAM) just before ours
                left = context.time_remaining()
                code = grpc.StatusCode.CANCELLED if left is None or left > 0.1 else grpc.StatusCode.DEADLINE_EXCEEDED
                raise
            except Exception as e:
                code, internal = status_code(e), f"internal error: {type(e).__name__}: {e}"
                if code == grpc.StatusCode.INTERNAL:
                    log.error("%s", internal, exc_info=e)
                await context.abort(code, internal if code == grpc.StatusCode.INTERNAL else str(e))  # raises
            finally:
                self.requests.labels(method, code.name).inc()
        return wrapper


class StartError(Exception):
    """The server cannot start (a port is taken, say)."""


class Server:
    """A running server: `await start()`, then `await drain_and_stop()` (what SIGTERM does)."""

    def __init__(self, cfg: ServerConfig, runtimes: dict[str, Runtime] | None = None, opener=open_runtimes):
        """Models are opened by opener(paths, backend, providers, threads) in cfg.workers worker processes, or in
        this process when that is 0; `runtimes` (already open) are served in this process."""
        self.cfg, self.metrics = cfg, Metrics()
        if runtimes is None:
            providers = resolve_providers(cfg.backend, cfg.providers)  # a bad backend or provider fails at once
            paths = find_models(cfg.models, cfg.backend)
            n = min(cfg.workers, len(paths)) or 1  # each worker opens its share (the openers are pickled)
            openers = [functools.partial(opener, paths[i::n], cfg.backend, providers, cfg.threads) for i in range(n)]
        else:
            openers = [lambda: runtimes]
        try:
            self.engine = Engine(cfg, self.metrics, openers, in_process=runtimes is not None or not cfg.workers)
        except RuntimeError as e:  # a worker could not open its models
            raise BackendError(str(e)) from None
        self.health = health.aio.HealthServicer()
        self.http = HttpFront(cfg, self.engine, self.metrics)
        self.port = self.http_port = self.metrics_port = None
        self._grpc: grpc.aio.Server | None = None
        self.hurry = asyncio.Event()  # set: cut a drain's grace period short

    async def start(self) -> "Server":
        # SO_REUSEPORT off: a second server on a taken port must fail, not silently share it
        server = self._grpc = grpc.aio.server(interceptors=[EdgeInterceptor(self.cfg.api_key, self.metrics)],
                                              options=[("grpc.so_reuseport", 0), *PENDING_OPTIONS],
                                              maximum_concurrent_rpcs=self.cfg.max_streams + OTHER_RPCS)
        pb_grpc.add_GeneratorServicer_to_server(GeneratorServicer(self.engine), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        address = f"{self.cfg.host}:{self.cfg.port}"
        try:
            self.port = server.add_insecure_port(address)
            self.http_port, self.metrics_port = await self.http.start()
        except (RuntimeError, OSError) as e:
            await self.http.stop()
            for link in self.engine.links:
                link.kill()
            raise StartError(f"cannot listen on {address} (HTTP port {self.cfg.http_port}, metrics port "
                             f"{self.cfg.metrics_port}): {e}") from None
        await self.engine.start(self._set_health)
        await server.start()
        self.http.ready = True
        models = list(self.engine.routes)
        for name in ["", SERVICE, *models]:  # overall, the service, and each model by id
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %d model(s) (%s) on %s:%d (gRPC)%s%s%s", len(models), ", ".join(models),
                 self.cfg.host, self.port, f", HTTP on :{self.http_port}" if self.http_port else "",
                 f", metrics on :{self.metrics_port}" if self.metrics_port else "",
                 " (API key required)" if self.cfg.api_key else "")
        return self

    async def drain_and_stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, refuse new requests, give in-flight ones grace_s to finish, cancel the rest."""
        grace_s = self.cfg.grace_s if grace_s is None else grace_s
        t0 = time.monotonic()
        await self.health.enter_graceful_shutdown()
        self.engine.draining = True
        log.info("draining: %d request(s) in flight, %.1f s grace", len(self.engine.streams), grace_s)
        while self.engine.streams and not self.hurry.is_set() and time.monotonic() - t0 < grace_s:
            await asyncio.sleep(0.05)
        if self.engine.streams:
            log.warning("cancelling %d request(s) still in flight", len(self.engine.streams))
        await self._grpc.stop(0)
        await self.http.stop()
        await self.engine.stop()
        log.info("stopped after %.2f s", time.monotonic() - t0)

    async def _set_health(self, names: list[str], serving: bool) -> None:
        """Their worker process has gone, or is back: health says so for each model, and for the server as a
        whole (NOT_SERVING while any model cannot serve)."""
        if self.engine.draining:
            return
        status = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}
        everything = not self.engine.down()
        for name, ok in [*((n, serving) for n in names), ("", everything), (SERVICE, everything)]:
            await self.health.set(name, status[ok])


async def run(cfg: ServerConfig, runtimes: dict[str, Runtime] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain; a second signal cuts the grace period short."""
    server = await Server(cfg, runtimes).start()
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: server.hurry.set() if signalled.is_set() else signalled.set())
    await signalled.wait()
    await server.drain_and_stop()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    try:
        asyncio.run(run(cfg))
    except (BackendError, StartError) as e:
        log.error("%s", e)
        return 2
    return 0
