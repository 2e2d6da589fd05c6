"""The server's settings: one dataclass is the single source of truth, and the CLI is built from it."""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServerConfig:
    models: Path = field(metadata={"help": "directory of checkpoints (torch) or of exports (onnxruntime, tensorrt)"})
    backend: str = _opt("torch", "how models are run", choices=BACKENDS)
    providers: str = _opt("", "onnxruntime providers, comma separated (CPU, CUDA, TensorRT); default: the best "
                              "available (CUDA, else CPU)")
    threads: int = _opt(0, "intra-op threads: per model (onnxruntime), per process (torch); 0: the library's default")
    host: str = _opt("127.0.0.1", "address to bind; loopback unless asked otherwise")
    port: int = _opt(50051, "gRPC port; 0 picks a free one (logged)")
    http_port: int = _opt(8000, "HTTP port: OpenAI-compatible /v1/completions and /v1/models, /health, /metrics "
                                "and the playground at /; 0: no HTTP")
    metrics_port: int | None = _opt(None, "a second HTTP port with only /metrics and /health, open even with "
                                          "--api-key (for a scraper); 0 picks a free one; unset: none")
    api_key: str = field(default="", repr=False, metadata={  # never in a log line
        "help": "when set (or $CHARRNN_API_KEY, better: not in the process list), requests need it: HTTP "
                "'Authorization: Bearer KEY', gRPC the same in their metadata; health stays open"})
    cors_origin: str = _opt("", "an origin allowed to call the HTTP API from a browser ('*': any); unset: none")
    workers: int = _opt(1, "worker processes that own the models, their batches and sessions (models are spread "
                           "over them; a worker steps its models in turn, different workers in parallel), so that "
                           "steps and the event loop do not share one interpreter lock; 0: one worker in a thread "
                           "of this process")
    max_batch: int = _opt(64, "streams stepped together in one backend call, per model")
    max_streams: int = _opt(256, "concurrent Generate streams and Predict calls, all models together; "
                                 "RESOURCE_EXHAUSTED past it")
    max_prompt_chars: int = _opt(4096, "longest prompt (or Predict text)")
    max_chars: int = _opt(4096, "cap on a request's max_chars")
    default_chars: int = _opt(256, "max_chars when a request leaves it 0 (at most --max-chars)")
    max_stop: int = _opt(8, "stop sequences per request")
    max_stop_chars: int = _opt(64, "longest stop sequence")
    max_top_k: int = _opt(1024, "cap on top_k (Generate and Predict)")
    max_chunk_chars: int = _opt(1024, "cap on chunk_chars")
    prefill_chunk: int = _opt(256, "prompt tokens per prefill call: a long prompt delays others by a chunk per step")
    max_unsent: int = _opt(64, "messages a stream may run ahead of its client (its credit): then it leaves its "
                               "batch until the client takes some (backpressure)")
    stall_timeout_s: float = _opt(30.0, "a stream whose client takes no message for this long is ended, freeing "
                                        "its place")
    max_model_chars: int = _opt(128, "longest model name a request may give")
    session_ttl_s: float = _opt(600.0, "seconds a session's state is kept after its last stream")
    max_sessions: int = _opt(10_000, "sessions kept; the least recently used is evicted past it")
    max_session_mb: float = _opt(1024.0, "hidden state kept for sessions, in MB (fp32); the least recently used "
                                         "is evicted past it")
    max_session_id_chars: int = _opt(128, "longest session_id")
    grace_s: float = _opt(10.0, "on SIGTERM: seconds in-flight streams get to finish before they are cancelled")

    def __post_init__(self):
        self.models = Path(self.models)
        self.api_key = self.api_key or os.environ.get("CHARRNN_API_KEY", "")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        positive = ("max_batch", "max_streams", "max_prompt_chars", "max_chars", "default_chars", "max_top_k",
                    "max_chunk_chars", "prefill_chunk", "max_unsent", "max_sessions", "max_session_id_chars",
                    "max_model_chars")
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"must be >= 1: {', '.join(bad)}")
        self.default_chars = min(self.default_chars, self.max_chars)
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be a port number (0: no HTTP), not {self.http_port}")
        if min(self.session_ttl_s, self.stall_timeout_s, self.max_session_mb) <= 0 or self.grace_s < 0 \
                or self.workers < 0:
            raise ValueError("session_ttl_s, stall_timeout_s and max_session_mb must be > 0, grace_s and workers >= 0")

    def worker_settings(self) -> dict:
        """What a worker (serve.worker.Worker) needs to know."""
        return {"max_batch": self.max_batch, "prefill_chunk": self.prefill_chunk, "session_ttl_s": self.session_ttl_s,
                "max_sessions": self.max_sessions, "max_session_bytes": self.max_session_mb * 1e6}


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    ap = argparse.ArgumentParser(prog="python -m serve", description="charrnn generation server (gRPC and HTTP)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"Path": Path, "str": str, "int": int, "float": float, "int | None": int}[str(f.type)]
        kw = {"help": f.metadata["help"], "type": kind}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        ap.add_argument(flag, **kw)
    args = ap.parse_args(argv)
    try:
        return ServerConfig(**vars(args))
    except ValueError as e:
        ap.error(str(e))
