"""The server's errors as plain exceptions, and the one table that maps them to gRPC status codes.

Code below the gRPC edge raises these (or `train.vocab.VocabError`); only `serve.server`'s interceptor
turns them into statuses, through `status_code`.
"""
from __future__ import annotations

import grpc

from train.vocab import VocabError


class ServeError(Exception):
    """A request the server refuses; the message is sent to the client as the status details."""


class InvalidArgument(ServeError):
    pass


class NotFound(ServeError):
    pass


class ResourceExhausted(ServeError):
    pass


class Unavailable(ServeError):
    pass


class SessionBusy(ServeError):
    """Another stream is using the session right now."""


_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    VocabError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    SessionBusy: grpc.StatusCode.ABORTED,  # a concurrency conflict: retry once the other stream ends
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status for an exception; anything unexpected is INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL


def shown(text: str, limit: int = 64) -> str:
    """Client text quoted in an error, cut to a bounded length (never echo unbounded client text)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
