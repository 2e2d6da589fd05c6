"""The gRPC floor: the charrnn.v1.Generator service with no model behind it.

    python -m serve.bench.floor [--host 127.0.0.1] [--port 0]

Generate writes canned text, chunk_chars per message, as fast as grpc.aio takes it; nothing else runs.

serve.bench drives it with the same load generator as the real server, on the same CPUs: its figures are
what Python gRPC itself allows on this machine. At one character per message a message costs more than a
model's step, and the floor says how much of a server figure is the transport's (and the load generator's)
rather than the server's.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.charrnn.v1 import charrnn_pb2 as pb
from protos.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from serve.config import ServerConfig

log = logging.getLogger(__name__)

MODEL = "grpc-floor"  # the one model ListModels lists
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"  # written over and over
MAX_CHARS = ServerConfig.__dataclass_fields__["max_chars"].default  # the server's caps, so requests are bounded alike
MAX_CHUNK_CHARS = ServerConfig.__dataclass_fields__["max_chunk_chars"].default
DEFAULT_CHARS = ServerConfig.__dataclass_fields__["default_chars"].default


class FloorServicer(pb_grpc.GeneratorServicer):
    async def ListModels(self, request, context):
        vocab = "".join(sorted(set(TEXT)))
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=MODEL, cell="none", vocab=vocab, backend="none")])

    async def Generate(self, request, context):
        if request.model != MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}; this is {MODEL}")
        n, k = request.max_chars or DEFAULT_CHARS, request.chunk_chars or 1
        if n > MAX_CHARS or k > MAX_CHUNK_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_chars <= {MAX_CHARS}, chunk_chars <= "
                                                                  f"{MAX_CHUNK_CHARS}")
        t0 = time.perf_counter()
        text = TEXT * (n // len(TEXT) + 1)
        for i in range(0, n - k, k):  # as the server does: context.write, each message awaited
            await context.write(pb.GenerateResponse(text=text[i:i + k]))
        total = time.perf_counter() - t0
        stats = pb.GenerateStats(generated_chars=n, total_s=total, chars_per_second=n / total if total else 0.0)
        last = (n - 1) // k * k
        await context.write(pb.GenerateResponse(text=text[last:n], finish_reason=pb.FINISH_REASON_LENGTH,
                                                stats=stats))


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GeneratorServicer_to_server(FloorServicer(), server)
    status = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    port = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await status.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC floor (no model) serving on %s:%d", host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.bench.floor", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind; loopback unless asked otherwise")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free one (logged)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args.host, args.port))
    except RuntimeError as e:  # the port is taken
        log.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
