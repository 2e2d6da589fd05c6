"""The HTTP edge, beside gRPC in the same process and event loop, over the same `Engine`: OpenAI's Completions
API (`POST /v1/completions`, streamed as server-sent events; `GET /v1/models`), `GET /health`, `GET /metrics`
and the playground page at `/` (serve/static/playground.html). JSON <-> serve.types happens only here, and
errors take OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching status.

A character is a token: `max_tokens` counts characters, `usage` counts prompt and generated characters. As in
OpenAI's API (and unlike gRPC's text) a completion leaves out the stop sequence that ended it; a stream holds
back the characters that could begin one until it is sure. Extensions: `top_k`, `session_id` (continue a
session, as over gRPC), `chunk_chars`, and `stats` (gRPC's GenerateStats) in the last message.

aiohttp parses HTTP. A connection with no request in flight (idle, or half a request sent) is closed after
IDLE_TIMEOUT_S; bodies are capped (`max_body`); a client that disconnects has its handler cancelled
(handler_cancellation), which ends its stream in the engine at once: its batch slot is free by the next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import secrets
import time
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from serve.config import ServerConfig
from serve.engine import Engine
from serve.errors import InvalidArgument, NotFound, ResourceExhausted, ServeError, SessionBusy, Unavailable, shown
from serve.metrics import Metrics
from serve.types import CharLogprob, Chunk, FinishReason, GenerateRequest, GenerateStats
from train.vocab import VocabError

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 15.0  # a connection with no request in flight is closed after this (the old metrics port's
#                        thread per connection: 319 half-sent connections held 330 threads)
SHUTDOWN_TIMEOUT_S = 1.0  # at stop, after the drain's grace period: handlers still running are cancelled
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}  # a proxy (nginx) must not buffer the stream
PAGE_HEADERS = {"Content-Type": "text/html; charset=utf-8", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'; img-src data:"}
# request[GONE]: the client disconnected mid-stream (a typed key where aiohttp has them: no warning)
GONE = web.RequestKey("charrnn.gone", bool) if hasattr(web, "RequestKey") else "charrnn.gone"
OPEN_PATHS = ("/health", "/")  # without the API key: health checks, and the page (static: it asks for the key)

# status, OpenAI's error type, code
_ERRORS = {InvalidArgument: (400, "invalid_request_error", None), VocabError: (400, "invalid_request_error", None),
           NotFound: (404, "invalid_request_error", "model_not_found"),
           SessionBusy: (409, "invalid_request_error", "session_busy"),
           ResourceExhausted: (429, "rate_limit_error", "server_busy"),
           Unavailable: (503, "server_error", "unavailable")}
_HTTP_ERRORS = {401: ("authentication_error", "invalid_api_key"), 413: ("invalid_request_error", "request_too_large"),
                404: ("invalid_request_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def error_body(exc: BaseException) -> tuple[int, dict]:
    """An exception as OpenAI's error object, and its HTTP status; anything unexpected is a 500."""
    if isinstance(exc, HttpError):
        status, param = exc.status, exc.param
        kind, code = _HTTP_ERRORS.get(status, ("invalid_request_error", None))
    elif isinstance(exc, web.HTTPException):  # aiohttp's own: no such path, wrong method, body too large
        status, param = exc.status, None
        kind, code = _HTTP_ERRORS.get(status, ("invalid_request_error", None))
        exc = {413: "the request body is too large", 404: "no such path", 405: "method not allowed"}.get(
            status, exc.reason)
    else:
        status, kind, code = next((v for cls, v in _ERRORS.items() if isinstance(exc, cls)),
                                  (500, "server_error", None))
        param = None
        if status == 500:
            exc = f"internal error: {type(exc).__name__}"
    return status, {"error": {"message": str(exc), "type": kind, "param": param, "code": code}}


# JSON -> GenerateRequest

_NEUTRAL = {"best_of": (1, None), "echo": (False, None), "frequency_penalty": (0, None), "presence_penalty": (0, None),
            "logit_bias": (None, {}), "suffix": (None, "")}  # OpenAI's arguments, accepted at their no-op values
_KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
          "logprobs", "n", "user", "top_k", "session_id", "chunk_chars", *_NEUTRAL}
_MAX_SEED = 2 ** 64 - 1


def _field(body: dict, name: str, kind, default, lo=None, hi=None):
    """body[name] (absent or null: default), checked to be of kind and within [lo, hi]."""
    value = body.get(name)
    if value is None:
        return default
    if kind is int and hi is None:  # no number of thousands of digits in an error message
        hi = _MAX_SEED
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)):
        raise HttpError(400, f"{name} must be {'a number' if kind is float else kind.__name__}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise HttpError(400, f"{name} must be between {lo} and {hi}" if hi is not None else f"{name} must be >= {lo}",
                        name)
    return value


def completion_request(body) -> tuple[GenerateRequest, bool, bool]:
    """A /v1/completions body -> (request, stream, include_usage). The engine bounds the rest (its caps)."""
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    for name in body:
        if name not in _KNOWN:
            raise HttpError(400, f"unrecognized request argument: {shown(str(name), 32)}")
    for name, allowed in _NEUTRAL.items():
        if name in body and body[name] not in allowed:
            raise HttpError(400, f"{name} is not supported (only {allowed[0]!r})", name)
    if _field(body, "n", int, 1) != 1:
        raise HttpError(400, "n must be 1: this server returns one choice per request", "n")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise HttpError(400, "prompt must be a string, or a list of one string", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HttpError(400, "prompt must be a string (token ids are not supported)", "prompt")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise HttpError(400, "stop must be a string or a list of strings", "stop")
    model = _field(body, "model", str, "")
    options = _field(body, "stream_options", dict, {})
    req = GenerateRequest(
        model=model, prompt=prompt, max_chars=_field(body, "max_tokens", int, 0, 1),
        temperature=float(_field(body, "temperature", float, 1.0)),  # OpenAI's default, not gRPC's greedy 0
        top_p=float(_field(body, "top_p", float, 1.0)), top_k=_field(body, "top_k", int, 0, 0),
        seed=_field(body, "seed", int, None, 0, _MAX_SEED), stop=tuple(stop),
        session_id=_field(body, "session_id", str, ""), chunk_chars=_field(body, "chunk_chars", int, 0, 0),
        logprobs=_field(body, "logprobs", int, None), coalesce=True)  # an event carries everything that is ready
    return req, _field(body, "stream", bool, False), _field(options, "include_usage", bool, False)


# serve.types -> JSON

def _logprobs(lps: list[CharLogprob], offset: int) -> dict:
    """OpenAI's (legacy) completion logprobs; text_offset counts from the prompt's start."""
    return {"tokens": [lp.char for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(lp.top) for lp in lps], "text_offset": list(range(offset, offset + len(lps)))}


def _usage(s: GenerateStats) -> dict:
    return {"prompt_tokens": s.prompt_chars, "completion_tokens": s.generated_chars,
            "total_tokens": s.prompt_chars + s.generated_chars}


def _stats(s: GenerateStats) -> dict:
    return {"prompt_chars": s.prompt_chars, "generated_chars": s.generated_chars,
            "time_to_first_char_s": s.time_to_first_char_s, "total_s": s.total_s,
            "chars_per_second": s.chars_per_second, "seed": s.seed, "session": s.session.value, "stop": s.stop}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _Completion:
    """One completion's responses: its id, and (streaming) the text held back while it could begin a stop."""

    def __init__(self, req: GenerateRequest, usage: bool):
        self.req, self.usage = req, usage
        self.head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
                     "model": req.model}
        self.offset = len(req.prompt)  # of the next character sent (text_offset)
        self.held, self.held_lps = "", []
        # the common event, formatted by hand: one json.dumps (the text) per event
        pre = json.dumps({**self.head, "choices": [{"text": None}]}, separators=(",", ":"))
        self._pre = ("data: " + pre[:pre.rindex('"text":null') + 7]).encode()
        self._post = (',"index":0,"logprobs":null,"finish_reason":null}]' + ',"usage":null' * usage
                      + "}\n\n").encode()

    def whole(self, chunks: list[Chunk]) -> dict:
        """The non-streaming response."""
        last = chunks[-1]
        text = "".join(c.text for c in chunks)
        lps = [lp for c in chunks for lp in (c.logprobs or ())]
        if last.finish_reason is FinishReason.STOP:  # OpenAI leaves the stop sequence out
            text, lps = text[:len(text) - len(last.stats.stop)], lps[:len(lps) - len(last.stats.stop)]
        choice = {"text": text, "index": 0, "logprobs": _logprobs(lps, self.offset) if self.req.logprobs is not None
                  else None, "finish_reason": last.finish_reason.value}
        return {**self.head, "choices": [choice], "usage": _usage(last.stats), "stats": _stats(last.stats)}

    def event(self, c: Chunk) -> bytes:
        """The event(s) for one message of the stream (b"" when all of it is held back)."""
        text, lps = c.text, list(c.logprobs or ())
        if self.req.stop:
            text, lps = self.held + text, self.held_lps + lps
            if c.finish_reason is FinishReason.STOP:
                keep = len(text) - len(c.stats.stop)
            elif c.stats is not None:  # the end: nothing more can complete a stop sequence
                keep = len(text)
            else:
                keep = len(text) - self._could_stop(text)
            self.held, self.held_lps = ("", []) if c.stats else (text[keep:], lps[keep:])
            text, lps = text[:keep], lps[:keep]
        if c.stats is None and self.req.logprobs is None:
            return self._pre + json.dumps(text, ensure_ascii=False).encode() + self._post if text else b""
        if c.stats is None and not text:
            return b""
        choice = {"text": text, "index": 0,
                  "logprobs": _logprobs(lps, self.offset) if self.req.logprobs is not None else None,
                  "finish_reason": c.finish_reason.value if c.finish_reason else None}
        self.offset += len(text)
        out = {**self.head, "choices": [choice]}
        if self.usage:
            out["usage"] = None
        if c.stats is not None:
            out["stats"] = _stats(c.stats)
            events = _sse(out)
            if self.usage:
                events += _sse({**self.head, "choices": [], "usage": _usage(c.stats)})
            return events + b"data: [DONE]\n\n"
        return _sse(out)

    def _could_stop(self, text: str) -> int:
        """The length of text's longest end that begins a stop sequence (held back until the next characters)."""
        return max((j for s in self.req.stop for j in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:j])), default=0)


# the server

class HttpFront:
    """The HTTP server of a `serve.server.Server`: `await start()` -> (http port, metrics port), `await stop()`."""

    def __init__(self, cfg: ServerConfig, engine: Engine, metrics: Metrics):
        self.cfg, self.engine, self.metrics = cfg, engine, metrics
        self.ready = False  # until the engine serves: everything but /health answers 503
        self.started = int(time.time())
        self.requests = Counter("charrnn_http_requests", "Finished HTTP requests by route and status",
                                ["route", "status"], registry=metrics.registry)
        self._expected = f"Bearer {cfg.api_key}".encode() if cfg.api_key else None
        self._runners: list[web.AppRunner] = []

    @property
    def max_body(self) -> int:
        """Bytes a request body may have: a longest prompt whose every character is JSON-escaped as a surrogate
        pair (12 bytes), and 64 KiB for everything else."""
        return 12 * self.cfg.max_prompt_chars + 65536

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, middlewares=[self._edge])
        app.router.add_get("/", self.page)
        app.router.add_get("/health", self.health_check)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/completions", self.completions)
        if self.cfg.cors_origin:
            app.router.add_route("OPTIONS", "/{path:.*}", self.preflight)
            app.on_response_prepare.append(self._cors)
        return app

    def metrics_app(self) -> web.Application:
        """The --metrics-port server: /metrics and /health only, without the API key (for a scraper)."""
        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/health", self.health_check)
        return app

    async def start(self) -> tuple[int | None, int | None]:
        """Listen on the HTTP port (0: not at all) and the metrics port (None: not at all; 0: a free one)."""
        ports = []
        for app, port in ((self.app(), self.cfg.http_port or None), (self.metrics_app(), self.cfg.metrics_port)):
            if port is None:
                ports.append(None)
                continue
            runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=IDLE_TIMEOUT_S,
                                   shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
            await runner.setup()
            self._runners.append(runner)
            await web.TCPSite(runner, self.cfg.host, port, reuse_port=False).start()
            ports.append(runner.addresses[0][1])
        return ports[0], ports[1]

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []

    # the edge: auth, errors, counts

    @web.middleware
    async def _edge(self, request: web.Request, handler):
        route = request.match_info.route.resource
        route = route.canonical if route is not None else "other"
        status = 500
        try:
            if request.method != "OPTIONS" and request.path not in OPEN_PATHS:
                self._authorize(request)
                if not self.ready:
                    raise Unavailable("the server is starting")
            response = await handler(request)
            status = 499 if request.get(GONE) else response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code)
            raise
        except Exception as e:
            status, body = error_body(e)
            if status == 500:
                log.error("internal error on %s", route, exc_info=e)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return web.json_response(body, status=status, headers=headers)
        finally:
            self.requests.labels(route, str(status)).inc()

    def _authorize(self, request: web.Request) -> None:
        if self._expected is None:
            return
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            raise HttpError(401, "a valid API key is required: 'Authorization: Bearer KEY'")

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                                 "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                                 "Access-Control-Max-Age": "600"})

    async def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Access-Control-Allow-Origin"] = self.cfg.cors_origin
        if self.cfg.cors_origin != "*":
            response.headers["Vary"] = "Origin"

    # the routes

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=_page(), headers=PAGE_HEADERS)

    async def health_check(self, request: web.Request) -> web.Response:
        """200 while serving; 503 while starting, draining, or while a model cannot serve."""
        down = self.engine.down()
        what = "draining" if self.engine.draining else f"not serving: {', '.join(down)}" if down else "serving"
        ok = self.ready and what == "serving"
        return web.json_response({"status": what if self.ready else "starting"}, status=200 if ok else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": m.id, "object": "model", "created": self.started, "owned_by": "charrnn", "cell": m.cell,
             "hidden_size": m.hidden_size, "fc_layers": m.fc_layers, "vocab": m.vocab, "backend": m.backend}
            for m in self.engine.models()]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise HttpError(400, "the request body is not valid JSON") from None
        req, stream, usage = completion_request(body)
        if not stream:
            req = dataclasses.replace(req, chunk_chars=req.chunk_chars or min(self.cfg.max_chunk_chars,
                                                                               req.max_chars or self.cfg.default_chars))
        c = _Completion(req, usage)
        async with contextlib.aclosing(self.engine.generate(req)) as gen:
            first = await anext(gen)  # refusals come before anything is sent: a status of their own
            if not stream:
                chunks = [first]
                while chunks[-1].stats is None:
                    chunks.append(await anext(gen))
                return web.json_response(c.whole(chunks), dumps=_dumps)
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            chunk = first
            try:
                while True:
                    data = c.event(chunk)
                    if data:
                        await response.write(data)
                    if chunk.stats is not None:
                        break
                    chunk = await anext(gen)
            except (ServeError, VocabError, StopAsyncIteration) as e:  # after the 200: an error event, no [DONE]
                await response.write(_sse(error_body(e)[1]))
            except ConnectionResetError:  # the client went away (a cancel may not have reached this task yet)
                request[GONE] = True
            return response


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


_PAGE: bytes | None = None


def _page() -> bytes:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("serve").joinpath("static/playground.html").read_bytes()
    return _PAGE
