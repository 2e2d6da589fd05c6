"""Thin client helpers for the charrnn.v1 Generator service: one function per RPC, sync and asyncio stubs."""
from __future__ import annotations

import os
from collections.abc import Iterator

import grpc

from protos.charrnn.v1 import charrnn_pb2 as pb
from protos.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop"}
SESSION = {pb.SESSION_STATE_UNSPECIFIED: "", pb.SESSION_STATE_NEW: "new", pb.SESSION_STATE_CONTINUED: "continued",
           pb.SESSION_STATE_EXPIRED: "expired (started fresh)", pb.SESSION_STATE_EVICTED: "evicted (started fresh)"}


class _Key(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call (a server started with --api-key asks for it)."""

    def __init__(self, key: str):
        self.header = ("authorization", f"Bearer {key}")

    def _with_key(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


def stub(target: str = DEFAULT_TARGET, api_key: str | None = None) -> pb_grpc.GeneratorStub:
    """api_key: sent with every call; None: $CHARRNN_API_KEY if set."""
    key = os.environ.get("CHARRNN_API_KEY", "") if api_key is None else api_key
    channel = grpc.insecure_channel(target)
    return pb_grpc.GeneratorStub(grpc.intercept_channel(channel, _Key(key)) if key else channel)


def aio_stub(target: str = DEFAULT_TARGET) -> pb_grpc.GeneratorStub:
    """For use inside a running asyncio loop."""
    return pb_grpc.GeneratorStub(grpc.aio.insecure_channel(target))


def generate_request(model: str, prompt: str = "", max_chars: int = 0, temperature: float = 0.0, top_k: int = 0,
                     top_p: float | None = None, seed: int | None = None, stop: tuple[str, ...] = (),
                     session_id: str = "", chunk_chars: int = 0, require_session: bool = False,
                     coalesce: bool = False) -> pb.GenerateRequest:
    """A GenerateRequest; top_p and seed stay unset (server defaults) when None."""
    req = pb.GenerateRequest(model=model, prompt=prompt, max_chars=max_chars, temperature=temperature, top_k=top_k,
                             stop=list(stop), session_id=session_id, chunk_chars=chunk_chars,
                             require_session=require_session, coalesce=coalesce)
    if top_p is not None:
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    return req


def list_models(s: pb_grpc.GeneratorStub, timeout: float | None = None) -> list[pb.ModelInfo]:
    return list(s.ListModels(pb.ListModelsRequest(), timeout=timeout).models)


def generate(s: pb_grpc.GeneratorStub, request: pb.GenerateRequest,
             timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
    """The response stream; the last message has finish_reason and stats."""
    return s.Generate(request, timeout=timeout)


def generate_text(s: pb_grpc.GeneratorStub, request: pb.GenerateRequest,
                  timeout: float | None = None) -> tuple[str, pb.GenerateResponse]:
    """The whole generated text, and the last message."""
    parts, last = [], None
    for last in generate(s, request, timeout):
        parts.append(last.text)
    return "".join(parts), last


def predict(s: pb_grpc.GeneratorStub, model: str, text: str, top_k: int = 0,
            timeout: float | None = None) -> list[tuple[str, float]]:
    reply = s.Predict(pb.PredictRequest(model=model, text=text, top_k=top_k), timeout=timeout)
    return [(p.char, p.probability) for p in reply.predictions]
