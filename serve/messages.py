"""The messages between the front end and a worker: plain dataclasses, a list of them per turn.

front end -> worker: Submit, Predict, Credit, Cancel (a list per turn; closing the socket stops the worker)
worker -> front end: its models (a dict of ModelInfo, or the RuntimeError that stopped it opening them) once,
then Generations (one per model step: every stream's text of the step)
Each list or Generations is pickled once, behind a 4-byte length; hidden state is in none of them.
"""
from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field

import numpy as np

from serve.errors import ServeError
from serve.types import CharLogprob, FinishReason, GenerateRequest, GenerateStats, Prediction


@dataclass
class Submit:
    id: int
    model: str
    req: GenerateRequest  # defaults resolved (seed, max_chars, chunk_chars)
    prompt: np.ndarray  # int64 tokens of req.prompt
    credit: int  # messages the stream may send before it hears more (Credit)
    arrived: float  # time.perf_counter() at the request's arrival
    lost: bool = False  # its session's state was lost with a worker that exited


@dataclass
class Predict:
    id: int
    model: str
    tokens: np.ndarray
    top_k: int


@dataclass
class Credit:
    id: int
    model: str
    n: int  # more messages it may send: its client has taken n


@dataclass
class Cancel:
    id: int
    model: str


@dataclass
class Generations:
    """A model's step: texts[i] is the next message of stream ids[i]; `ends` close streams (with their finish
    and stats), `errors` fail them (serve.messages.error_of), `predictions` answer Predict calls."""

    model: str
    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    ends: dict[int, tuple[FinishReason, GenerateStats]] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)
    predictions: dict[int, list[Prediction]] = field(default_factory=dict)
    metrics: tuple | None = None  # serve.metrics.ModelMetrics.snapshot()
    sessions: int | None = None  # sessions the worker holds
    logprobs: dict[int, tuple[CharLogprob, ...]] = field(default_factory=dict)  # of texts[i], streams that ask

    def __bool__(self) -> bool:
        return bool(self.ids or self.errors or self.predictions or self.metrics is not None)

    def __reduce__(self):  # as a tuple: a step's message pickles in 3.5 us, not 5.3 (unpickles in 3.9, not 5.8)
        return Generations, (self.model, self.ids, self.texts, self.ends, self.errors, self.predictions, self.metrics,
                             self.sessions, self.logprobs)


def error_of(exc: BaseException) -> Exception:
    """An exception as it travels: our own as it is (it pickles), anything else as an internal error."""
    return exc if isinstance(exc, ServeError) else Exception(f"{type(exc).__name__}: {exc}")


_HEADER = struct.Struct("!I")


def frame(obj) -> bytes:
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def unframe(buf: bytearray) -> list:
    """The whole objects at the start of buf (taken out of it)."""
    out, h = [], _HEADER.size
    while len(buf) >= h and len(buf) >= h + (n := _HEADER.unpack_from(buf)[0]):
        out.append(pickle.loads(buf[h:h + n]))
        del buf[:h + n]  # from a bytearray's front: O(1)
    return out
