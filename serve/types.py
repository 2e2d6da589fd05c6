"""Plain request and response types of the server. Only `serve.server` converts them to and from protobuf."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_chars reached
    STOP = "stop"  # a stop sequence was generated


class SessionState(enum.Enum):
    NONE = "none"  # the request named no session
    NEW = "new"  # no state under the id: started fresh
    CONTINUED = "continued"
    EXPIRED = "expired"  # the state outlived the TTL: started fresh
    EVICTED = "evicted"  # the state was evicted to make room: started fresh


@dataclass(frozen=True)
class ModelInfo:
    id: str
    cell: str
    hidden_size: int
    fc_layers: int
    vocab: str
    backend: str


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    prompt: str = ""
    max_chars: int = 0  # 0: the server's default
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: the server draws one and reports it
    stop: tuple[str, ...] = ()
    session_id: str = ""
    chunk_chars: int = 0  # 0: one character per message
    require_session: bool = False
    coalesce: bool = False  # merge the chunks that are ready into one message (see the .proto)
    logprobs: int | None = None  # per generated character, its log-probability and the top n others' (HTTP only)


@dataclass(frozen=True)
class GenerateStats:
    prompt_chars: int
    generated_chars: int
    time_to_first_char_s: float
    total_s: float
    chars_per_second: float
    seed: int
    session: SessionState
    stop: str = ""  # the stop sequence that ended the stream


@dataclass(frozen=True)
class CharLogprob:
    """A generated character's log-probability under the model (before temperature and filters), and the
    top characters' (most likely first), as a request's `logprobs` asks."""

    char: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Chunk:
    """One message of a Generate stream; the last has finish_reason and stats."""

    text: str
    finish_reason: FinishReason | None = None
    stats: GenerateStats | None = None
    logprobs: tuple[CharLogprob, ...] | None = None  # one per character of text, when the request asked


@dataclass(frozen=True)
class PredictRequest:
    model: str
    text: str
    top_k: int = 0  # 0: 5


@dataclass(frozen=True)
class Prediction:
    char: str
    probability: float
