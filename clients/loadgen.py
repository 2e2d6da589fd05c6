"""Drive the server with N concurrent generation streams and report latency and throughput.

    python -m clients.loadgen --concurrency N --requests M [--max-chars K] [--model ID] [--processes P]
                              [--out FILE]

Client-side figures: time to first character (request sent -> first text received), inter-character
latency (the gap between consecutive messages of a stream, shared equally by the characters of the later
message; exact at --chunk-chars 1 without --coalesce), characters per message, aggregate characters per
second (all characters received / wall time of the run) and errors by status code; also the CPU time this
client used while timing (a load generator that needs a whole core measures itself, not the server).
Printed, and written as JSON to --out. --processes P spreads the streams and the requests over P client
processes (one asyncio client tops out at about one core), each with its own channel, warm-up and
share of the requests; they start timing together and their figures are merged. --http URL sends the same
requests to the server's HTTP port instead (POST /v1/completions, streamed as server-sent events; an event is
a message; HTTP streams always coalesce).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty

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


class HttpClient:
    """The same requests over HTTP (serve.http): `models()` and `one()` as the gRPC stub's ListModels and `one`."""

    def __init__(self, base: str):
        import aiohttp

        self.aiohttp, self.base = aiohttp, base.rstrip("/")
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def models(self) -> list[pb.ModelInfo]:
        async with self.session.get(self.base + "/v1/models") as r:
            data = (await r.json())["data"]
        return [pb.ModelInfo(id=m["id"], cell=m["cell"], hidden_size=m["hidden_size"], fc_layers=m["fc_layers"],
                             vocab=m["vocab"], backend=m["backend"]) for m in data]

    async def one(self, request: pb.GenerateRequest, timeout: float | None) -> Record:
        body = {"model": request.model, "prompt": request.prompt, "max_tokens": request.max_chars,
                "temperature": request.temperature, "top_k": request.top_k, "seed": request.seed,
                "chunk_chars": request.chunk_chars, "stream": True}
        rec = Record(time.perf_counter())
        try:
            async with self.session.post(self.base + "/v1/completions", json=body,
                                         timeout=self.aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status != 200:
                    rec.status = f"HTTP_{r.status}"
                    return rec
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            rec.status = f"HTTP_ERROR_{event['error'].get('code')}"
                            break
                        text = event["choices"][0]["text"] if event["choices"] else ""
                        if text:
                            rec.times.append(time.perf_counter())
                            rec.sizes.append(len(text))
        except (self.aiohttp.ClientError, asyncio.TimeoutError) as e:
            rec.status = type(e).__name__
        return rec


async def find_model(stub, args) -> pb.ModelInfo:
    if isinstance(stub, HttpClient):
        models = {m.id: m for m in await stub.models()}
        return _pick(models, args)
    try:
        models = {m.id: m for m in (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models}
    except grpc.aio.AioRpcError as e:
        raise SystemExit(f"error: {args.target}: {e.code().name}: {e.details()}") from None
    return _pick(models, args)


def _pick(models: dict, args) -> pb.ModelInfo:
    if not models:
        raise SystemExit("the server has no models")
    if not args.model and len(models) > 1:
        raise SystemExit(f"the server has {len(models)} models ({', '.join(models)}): pass --model")
    model = models.get(args.model or next(iter(models)))
    if model is None:
        raise SystemExit(f"unknown model {args.model!r}; the server has {', '.join(models)}")
    return model


@dataclass
class Part:
    """What one process measured. Its window is time.perf_counter, CLOCK_MONOTONIC on Linux: one clock for
    the whole system, so windows from several processes compare."""
    model: pb.ModelInfo
    records: list[Record]
    start: float
    end: float
    cpu_s: float  # this process's CPU time in its window
    cpus: list[int] | None  # where it ran


async def drive_part(args, k: int, parts: int, start_gate) -> Part:
    """Part k of `parts`: streams k, k + parts, ... of --concurrency run requests k, k + parts, ... of --requests
    (request i built the same whatever the parts). Looks up the model and warms up first, then calls
    `start_gate()` and times the rest."""
    stub = HttpClient(args.http) if args.http else api.aio_stub(args.target)
    go = stub.one if args.http else functools.partial(one, stub)
    model = await find_model(stub, args)
    prompts = [args.prompt] if args.prompt else \
        [p for p in ("".join(c for c in p if c in model.vocab) for p in PROMPTS) if p] or [model.vocab[0]]

    def request(i: int) -> pb.GenerateRequest:
        return api.generate_request(model.id, prompts[i % len(prompts)], args.max_chars, args.temperature,
                                    args.top_k, None, args.seed + i, chunk_chars=args.chunk_chars,
                                    coalesce=args.coalesce)

    for i in range(args.warmup):
        await go(request(i), args.timeout)
    todo = iter(range(k, args.requests, parts))
    records: list[Record] = []

    async def worker():
        for i in todo:  # a shared iterator: each request is taken once
            records.append(await go(request(i), args.timeout))

    start_gate()
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(k, args.concurrency, parts)))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if args.http:
        await stub.session.close()
    return Part(model, records, t0, time.perf_counter(), time.process_time() - cpu0, cpus)


def say_timing(args) -> None:
    print(f"{TIMING} {args.requests} requests, {args.concurrency} at a time", flush=True)


def start_timeout(args) -> float:
    """Seconds the processes may take to reach the start: spawning and imports, the lookup, the warm-up."""
    return 60 + 10 + args.warmup * args.timeout


def child(args, k: int, barrier, queue) -> None:
    """Process k: its Part through `queue`, or the message that stopped it (and the barrier broken, so that
    nobody waits for it)."""
    try:
        queue.put(asyncio.run(drive_part(args, k, args.processes, lambda: barrier.wait(start_timeout(args)))))
    except threading.BrokenBarrierError:
        pass  # another process stopped first, and said why
    except BaseException as e:
        queue.put(str(e) if isinstance(e, SystemExit) else f"error: client process {k}: {e!r}")
        barrier.abort()
        if not isinstance(e, SystemExit):
            raise


def receive(queue, procs) -> Part:
    """The next Part; a message from a process, or a process dead without one, ends the run."""
    while True:
        # looked at before the get: a process that died after sending has its Part in the queue by then
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        try:
            got = queue.get(timeout=1)
        except Empty:
            if dead:
                raise SystemExit(f"error: a client process exited with code {dead[0]}") from None
            continue
        if isinstance(got, str):
            raise SystemExit(got)
        return got


def why_stopped(queue, args) -> str:
    try:
        return queue.get(timeout=10)  # a process that breaks the barrier says why first
    except Empty:
        return f"error: the client processes did not all start within {start_timeout(args):.0f} s"


def run_processes(args) -> list[Part]:
    """The parts in --processes processes, spawned (gRPC's threads do not survive a fork). They all look up
    and warm up, then start together at a barrier with this one, which says when timing starts."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(args.processes + 1), ctx.Queue()
    procs = [ctx.Process(target=child, args=(args, k, barrier, queue)) for k in range(args.processes)]
    try:
        for p in procs:
            p.start()
        try:
            barrier.wait(start_timeout(args))
        except threading.BrokenBarrierError:
            raise SystemExit(why_stopped(queue, args)) from None
        say_timing(args)
        return [receive(queue, procs) for _ in procs]
    finally:
        for p in procs:  # each has sent all it had, or it is no longer wanted
            if p.pid is not None:
                p.terminate()
                p.join()


def run(args) -> dict:
    parts = run_processes(args) if args.processes > 1 else \
        [asyncio.run(drive_part(args, 0, 1, lambda: say_timing(args)))]
    records = [r for part in parts for r in part.records]
    wall = max(part.end for part in parts) - min(part.start for part in parts)
    cpus = sorted(set().union(*(part.cpus for part in parts))) if parts[0].cpus is not None else None
    config = {k: getattr(args, k) for k in ("target", "http", "concurrency", "requests", "max_chars", "chunk_chars",
                                              "coalesce", "temperature", "top_k", "warmup", "processes")}
    return {"model": parts[0].model.id, "backend": parts[0].model.backend, **config, "client_cpus": cpus,
            "client_cpu_s": sum(part.cpu_s for part in parts), **summarize(records, wall)}


def report(r: dict) -> str:
    f = lambda d: " ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in d.items())  # noqa: E731
    return (f"{r['model']} ({r['backend']}) concurrency {r['concurrency']}: {r['ok']}/{r['requests']} ok, "
            f"errors {r['errors'] or 0}\n"
            f"  aggregate {r['chars_per_s']:.0f} chars/s ({r['chars']} chars in {r['wall_s']:.2f} s, "
            f"{r['chars_per_msg'] or 0:.1f} per message; this client used "
            f"{r['client_cpu_s'] / r['wall_s'] if r['wall_s'] else 0:.2f} CPU cores in {r['processes']} "
            f"process{'es' if r['processes'] > 1 else ''})\n"
            f"  time to first char ms: {f(r['ttfc_ms'])}\n"
            f"  inter-char latency ms: {f(r['inter_char_ms'])}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m clients.loadgen", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--target", default=api.DEFAULT_TARGET)
    ap.add_argument("--http", default="", help="the server's HTTP base URL (e.g. http://127.0.0.1:8000): the same "
                    "requests over /v1/completions, streamed; --target is then unused")
    ap.add_argument("--concurrency", type=int, default=8, help="streams in flight at once")
    ap.add_argument("--requests", type=int, default=64, help="requests in all")
    ap.add_argument("--max-chars", type=int, default=200)
    ap.add_argument("--model", default="", help="model id; may be left out when the server has one model")
    ap.add_argument("--prompt", default="", help="default: a few short prompts in the model's vocabulary")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    ap.add_argument("--chunk-chars", type=int, default=1)
    ap.add_argument("--coalesce", action="store_true", help="requests ask for chunk-chars or more per message "
                    "(the characters ready while the last message was being sent go together)")
    ap.add_argument("--warmup", type=int, default=1, help="requests before timing starts")
    ap.add_argument("--timeout", type=float, default=120.0, help="deadline per request, seconds")
    ap.add_argument("--processes", type=int, default=1, help="client processes the streams are spread over")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1:
        ap.error("--concurrency and --requests must be >= 1")
    if not 1 <= args.processes <= args.concurrency:
        ap.error("--processes must be from 1 to --concurrency")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
