"""Drive the server with N concurrent generation streams and report latency and throughput.

    python -m clients.loadgen --concurrency N --requests M [--max-chars K] [--model ID] [--out FILE]

Client-side figures: time to first character (request sent -> first text received), inter-character
latency (the gap between consecutive messages of a stream, shared equally by the characters of the later
message; exact at --chunk-chars 1 without --coalesce), characters per message, aggregate characters per
second (all characters received / wall time of the run) and errors by status code; also the CPU time this
client used while timing (a load generator that needs a whole core measures itself, not the server).
Printed, and written as JSON to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from clients import api
from protos.charrnn.v1 import charrnn_pb2 as pb

TIMING = "timing"  # starts the line printed as the timed requests begin (after the warm-up)
PROMPTS = ("The ", "And ", "What ", "KING:\n", "First Citizen:\n", "O, ", "I ", "the ", "a ")


@dataclass
class Record:
    sent: float
    times: list[float] = field(default_factory=list)  # arrival of each message with text
    sizes: list[int] = field(default_factory=list)  # characters in it
    status: str = "OK"


async def one(stub, request: pb.GenerateRequest, timeout: float | None) -> Record:
    rec = Record(time.perf_counter())
    try:
        async for reply in stub.Generate(request, timeout=timeout):
            if reply.text:
                rec.times.append(time.perf_counter())
                rec.sizes.append(len(reply.text))
    except grpc.aio.AioRpcError as e:
        rec.status = e.code().name
    return rec


def percentiles(xs, qs=(50, 90, 99)) -> dict:
    """pNN for each q, and the mean (arrivals come in bursts when several messages share a read, so the
    mean inter-character time, not p50, is the per-character cost)."""
    if len(xs) == 0:
        return {**{f"p{q}": None for q in qs}, "mean": None}
    return {**{f"p{q}": float(v) for q, v in zip(qs, np.percentile(xs, qs))}, "mean": float(np.mean(xs))}


def summarize(records: list[Record], wall_s: float) -> dict:
    ok = [r for r in records if r.status == "OK"]
    ttfc = [r.times[0] - r.sent for r in ok if r.times]
    gaps = [np.repeat(np.diff(r.times) / np.asarray(r.sizes[1:]), r.sizes[1:]) for r in ok if len(r.times) > 1]
    gaps = np.concatenate(gaps) if gaps else np.zeros(0)
    chars = sum(sum(r.sizes) for r in records)
    messages = sum(len(r.sizes) for r in records)
    return {
        "requests": len(records), "ok": len(ok),
        "errors": dict(Counter(r.status for r in records if r.status != "OK")),
        "chars": chars, "chars_per_msg": chars / messages if messages else None, "wall_s": wall_s,
        "chars_per_s": chars / wall_s if wall_s > 0 else 0.0,
        "ttfc_ms": {k: v and v * 1e3 for k, v in percentiles(ttfc).items()},
        "inter_char_ms": {k: v and v * 1e3 for k, v in percentiles(gaps, (50, 99)).items()},
    }


async def run(args) -> dict:
    stub = api.aio_stub(args.target)
    try:
        models = {m.id: m for m in (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models}
    except grpc.aio.AioRpcError as e:
        raise SystemExit(f"error: {args.target}: {e.code().name}: {e.details()}") from None
    if not models:
        raise SystemExit("the server has no models")
    model = models.get(args.model or next(iter(models)))
    if model is None:
        raise SystemExit(f"unknown model {args.model!r}; the server has {', '.join(models)}")
    prompts = [args.prompt] if args.prompt else \
        [p for p in ("".join(c for c in p if c in model.vocab) for p in PROMPTS) if p] or [model.vocab[0]]

    def request(i: int) -> pb.GenerateRequest:
        return api.generate_request(model.id, prompts[i % len(prompts)], args.max_chars, args.temperature,
                                    args.top_k, None, args.seed + i, chunk_chars=args.chunk_chars,
                                    coalesce=args.coalesce)

    for i in range(args.warmup):
        await one(stub, request(i), args.timeout)
    todo = iter(range(args.requests))
    records: list[Record] = []

    async def worker():
        for i in todo:  # a shared iterator: each request is taken once
            records.append(await one(stub, request(i), args.timeout))

    print(f"{TIMING} {args.requests} requests, {args.concurrency} at a time", flush=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    config = {k: getattr(args, k) for k in ("target", "concurrency", "requests", "max_chars", "chunk_chars",
                                              "coalesce", "temperature", "top_k", "warmup")}
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None  # where this client ran
    return {"model": model.id, "backend": model.backend, **config, "client_cpus": cpus, "client_cpu_s": cpu,
            **summarize(records, wall)}


def report(r: dict) -> str:
    f = lambda d: " ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in d.items())  # noqa: E731
    return (f"{r['model']} ({r['backend']}) concurrency {r['concurrency']}: {r['ok']}/{r['requests']} ok, "
            f"errors {r['errors'] or 0}\n"
            f"  aggregate {r['chars_per_s']:.0f} chars/s ({r['chars']} chars in {r['wall_s']:.2f} s, "
            f"{r['chars_per_msg'] or 0:.1f} per message; this client used "
            f"{r['client_cpu_s'] / r['wall_s'] if r['wall_s'] else 0:.2f} CPU cores)\n"
            f"  time to first char ms: {f(r['ttfc_ms'])}\n"
            f"  inter-char latency ms: {f(r['inter_char_ms'])}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m clients.loadgen", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--target", default=api.DEFAULT_TARGET)
    ap.add_argument("--concurrency", type=int, default=8, help="streams in flight at once")
    ap.add_argument("--requests", type=int, default=64, help="requests in all")
    ap.add_argument("--max-chars", type=int, default=200)
    ap.add_argument("--model", default="", help="default: the server's first model")
    ap.add_argument("--prompt", default="", help="default: a few short prompts in the model's vocabulary")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    ap.add_argument("--chunk-chars", type=int, default=1)
    ap.add_argument("--coalesce", action="store_true", help="requests ask for chunk-chars or more per message "
                    "(the characters ready while the last message was being sent go together)")
    ap.add_argument("--warmup", type=int, default=1, help="requests before timing starts")
    ap.add_argument("--timeout", type=float, default=120.0, help="deadline per request, seconds")
    ap.add_argument("--out", type=Path, default=Path("loadgen.json"), help="JSON results")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1:
        ap.error("--concurrency and --requests must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    print(report(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
