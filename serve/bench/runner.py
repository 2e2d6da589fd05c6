"""The benchmark's course: models -> runtimes -> measurements per mode -> records -> the report files."""
from __future__ import annotations

import gc
import logging
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from serve.bench import report
from serve.bench.backends import BACKENDS, BackendUnavailable, Exports, open_runtime, unavailable
from serve.bench.grpc import FloorProcess, ServerFailed, ServerProcess, cpus_of, drive
from serve.bench.measure import (Subject, bandwidth, describe_machine, load_average, matmul_rate, summary_us,
                                  time_decoding, time_loop, time_steps)
from serve.bench.models import BenchModel, find_models, random_models
from train.checkpoint import CheckpointError

if TYPE_CHECKING:
    from serve.bench.cli import BenchConfig

log = logging.getLogger("serve.bench")

LADDER = (256 << 10, 1 << 20, 4 << 20)  # bandwidth probes besides each model's own working set
BLOCK_CHARS = 25  # characters per timed block of the decodings
EAGER_ONLY = ("torch", "torch-cuda", "torch-cudagraph")  # run the checkpoint's fp32 weights whatever --precisions


class BenchError(Exception):
    """The benchmark cannot run as asked (no models found, say)."""


class Progress:
    """A tqdm bar on a terminal; one log line per finished task elsewhere (CI logs, pipes)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="task", dynamic_ncols=True, file=sys.stderr)

    def note(self, what: str) -> None:
        if self.bar:
            self.bar.set_description_str(what[:60])

    def advance(self, what: str, n: int = 1) -> None:
        self.done += n
        if self.bar:
            self.bar.update(n)
        else:
            log.info("[%d/%d] %s", self.done, self.total, what)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _precisions(backend: str, precisions: tuple[str, ...]) -> tuple[str, ...]:
    """What a backend is timed at: eager ones the checkpoint's fp32, int8 ones int8, the others --precisions."""
    if backend in EAGER_ONLY:
        return ("fp32",)
    fixed = BACKENDS[backend].precisions
    return fixed if fixed == ("int8",) else precisions


def _models(cfg: BenchConfig, tmp: Path) -> list[BenchModel]:
    if not cfg.models:
        return random_models(tmp / "models", cfg.cells, cfg.hidden_sizes)
    try:
        # explicit models: --cells/--hidden-sizes filter only when given (the presets' shapes are for random ones)
        return find_models(list(cfg.models), cfg.cells if "cells" in cfg.explicit else (),
                           cfg.hidden_sizes if "hidden_sizes" in cfg.explicit else ())
    except CheckpointError as e:
        raise BenchError(str(e)) from None


def probe_limits(device: str, models: list[BenchModel], precisions: tuple[str, ...], threads: int,
                 quick: bool) -> dict:
    """Matrix-multiply rate and bandwidth over each model's weights (and main memory) on this device."""
    n = 1024 if device == "cpu" else 8192
    flops = {"fp32": matmul_rate(device, n, threads=threads)}
    if device == "cuda" and "fp16" in precisions:
        flops["fp16"] = matmul_rate(device, n, torch.float16, threads=threads)
    widths = [4] + [report.WEIGHT_BYTES[p] for p in ("fp16", "int8") if p in precisions]
    sizes = sorted({m.weight_bytes(1, w) for m in models for w in widths} | set(LADDER))
    dram = (128 if quick else 256) * 2**20 if device == "cpu" else 2 * 2**30
    return {"threads": threads, "matmul_n": n, "matmul_flops": flops,
            "bandwidth": {str(ws): bandwidth(ws, device) for ws in sizes},
            "dram": {"working_set": dram, **bandwidth(dram, device, seconds=0.5)}}


def _step_record(m: BenchModel, s: Subject, batch: int, seconds: np.ndarray) -> dict:
    return report.record(m, s.name, "step", precision=s.precision, batch=batch, threads=s.threads,
                         samples=len(seconds), us=summary_us(seconds, per=batch),
                         chars_per_s=batch / float(seconds.mean()), call_us=summary_us(seconds))


def _decoding_records(m: BenchModel, carried: np.ndarray, refeed: dict, chars: int, threads: int) -> list[dict]:
    common = {"batch": 1, "threads": threads, "samples": len(carried)}
    out = [report.record(m, "torch", "carried", **common, us=summary_us(carried),
                         chars_per_s=1 / float(carried.mean()), chars=chars, block_chars=BLOCK_CHARS,
                         per_1000_chars_s=1000 * float(carried.mean()), decoding="train.sampling.generate, greedy")]
    out += [report.record(m, "torch", "refeed", **common, us=summary_us(secs), chars_per_s=1 / float(secs.mean()),
                          chars=chars, block_chars=BLOCK_CHARS, per_1000_chars_s=1000 * float(secs.mean()),
                          window=n, decoding="train.sampling.generate_refeed, greedy")
            for n, secs in refeed.items()]
    return out


def _grpc_us(result: dict) -> dict:
    """A load generator's result as microseconds per character: inter-character p50 and p99, and the mean."""
    gap = result["inter_char_ms"]
    return {"p50": gap["p50"] and gap["p50"] * 1e3, "p99": gap["p99"] and gap["p99"] * 1e3,
            "mean": result["concurrency"] / result["chars_per_s"] * 1e6 if result["chars_per_s"] else None}


def _grpc_details(result: dict, server: ServerProcess) -> dict:
    return {k: result[k] for k in ("ttfc_ms", "requests", "ok", "errors", "chars", "wall_s", "max_chars", "coalesce",
                                   "chars_per_msg", "client_cpus", "server_cpu_s", "client_cpu_s")} | {
        "loadgen": result["loadgen_args"], "server": server.command, "server_cpus": cpus_of(server.proc.pid)}


def _grpc_record(m: BenchModel, backend: str, precision: str, result: dict, threads: int,
                 server: ServerProcess, mode: str = "grpc") -> dict:
    return report.record(m, backend, mode, precision=precision, concurrency=result["concurrency"],
                         chunk_chars=result["chunk_chars"], threads=threads, samples=result["chars"],
                         us=_grpc_us(result), chars_per_s=result["chars_per_s"], **_grpc_details(result, server))


def _points(cfg: BenchConfig) -> list[tuple[str, int, int, bool]]:
    """(mode, concurrency, chunk_chars, coalesce) of grpc and http modes, message sizes side by side at each
    concurrency; http only coalesced (its streams always are), each beside gRPC's point with the same settings."""
    out = []
    for c in cfg.concurrency:
        if "grpc" in cfg.modes:
            out += [("grpc", c, k, False) for k in cfg.chunk_chars]
        for k in cfg.coalesce:
            out += [(mode, c, k, True) for mode in ("grpc", "http") if mode in cfg.modes]
    return out


def _measure_floor(cfg: BenchConfig, tmp: Path, skipped: list, progress: Progress) -> list[dict]:
    """grpc mode's points (coalescing aside: nothing waits to be merged) against the gRPC floor, the service with
    no model behind it (serve.bench.floor), with the same load generator on the same CPUs."""
    out, points = [], [(c, k) for c in cfg.concurrency for k in cfg.chunk_chars]
    try:
        floor = FloorProcess(tmp, cfg.server_cpus)
        with floor:
            for c, k in points:
                progress.note(f"gRPC floor: concurrency {c}, {k} chars/msg")
                result = drive(floor, c, max(report.MIN_GRPC_REQUESTS, c * cfg.grpc_requests), cfg.grpc_chars, k,
                               cpus=cfg.client_cpus, work_dir=tmp)
                out.append({"concurrency": c, "chunk_chars": k, "chars_per_s": result["chars_per_s"],
                            **{f"{q}_us": v for q, v in _grpc_us(result).items()},
                            "details": _grpc_details(result, floor)})
                progress.advance(f"gRPC floor: concurrency {c}, {k} chars/msg")
    except ServerFailed as e:
        _skip(skipped, "the gRPC floor", str(e), mode="grpc")
    if len(out) < len(points):
        progress.advance("gRPC floor", len(points) - len(out))
    return out


def _server_models(backend: str, m: BenchModel, precision: str, exports: Exports) -> Path:
    """The directory `python -m serve --models` is given for this backend: one model in it."""
    if backend == "torch":
        return m.path
    if backend == "tensorrt":
        return exports.engine(m, precision).parent
    return exports.onnx(m, precision).parent


def _skip(skipped: list, what: str, reason: str, backend: str | None = None, precision: str | None = None,
          model: str | None = None, mode: str | None = None) -> None:
    log.warning("not measured: %s%s: %s", what, f" ({model})" if model else "", reason)
    skipped.append({"what": what, "backend": backend, "precision": precision, "model": model, "mode": mode,
                    "reason": reason})


def run(cfg: BenchConfig, command: str = "python -m serve.bench") -> list[Path]:
    """Measure everything cfg asks for and write the report; returns the files written."""
    t_start, load_start = time.perf_counter(), load_average()
    primary = cfg.threads[0]  # refeed and grpc modes, the server, and anything not swept
    torch.set_num_threads(primary)
    records: list[dict] = []
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="charrnn-bench-") as tmp:
        tmp = Path(tmp)
        models = _models(cfg, tmp)
        pairs = []  # (backend, precision) that can run here
        for b in cfg.backends:
            for p in _precisions(b, cfg.precisions):
                reason = unavailable(b, p)
                if reason:
                    _skip(skipped, f"backend {b} ({p})", reason, backend=b, precision=p)
                else:
                    pairs.append((b, p))
        serving = []
        for mode in (m for m in ("grpc", "http") if m in cfg.modes):
            for b, p in pairs:
                if not BACKENDS[b].server:
                    _skip(skipped, f"{mode} on {b}", "python -m serve has no such backend", backend=b, precision=p,
                          mode=mode)
                elif (b, p) not in serving:
                    serving.append((b, p))
        exports = Exports(tmp / "exports", cfg.parity, max(cfg.batches))
        limits = {}
        if "limit" in cfg.modes:
            for device in sorted({BACKENDS[b].device for b, _ in pairs}):
                for t in cfg.threads if device == "cpu" else (primary,):
                    log.info("probing the %s's limits at %d thread(s)", device, t)
                    torch.set_num_threads(t)
                    limits[report.limit_key(device, t)] = probe_limits(device, models, tuple({p for _, p in pairs}),
                                                                       t, cfg.quick)
            torch.set_num_threads(primary)
        per_model = (len(cfg.batches) if "step" in cfg.modes else 0) + ("refeed" in cfg.modes) \
            + len(serving) * len(_points(cfg))
        floor_points = len(cfg.concurrency) * len(cfg.chunk_chars) if serving and "grpc" in cfg.modes else 0
        progress = Progress(len(models) * per_model + floor_points)
        floor = []
        try:
            if floor_points:
                floor = _measure_floor(cfg, tmp, skipped, progress)
            for m in models:
                _measure_model(cfg, m, pairs, serving, exports, tmp, records, skipped, progress)
        finally:
            progress.close()
        report.add_speedups(records)
        records += report.add_limits(records, models, limits)
        machine = describe_machine()
        machine["load_average"] = {"start": load_start, "end": load_average()}
        machine["limits"] = limits
        rep = {
            "format": report.FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "quick": cfg.quick, "wall_s": time.perf_counter() - t_start,
            "settings": cfg.settings(), "machine": machine,
            "models": [{**m.describe(), "weights": m.weights, "path": str(m.path) if m.weights != "random" else None}
                       for m in models],
            "records": records, "grpc_floor": floor, "targets": report.evaluate_targets(records, skipped, floor),
            "skipped": skipped,
        }
        return report.write(rep, cfg.out)


def _measure_model(cfg: BenchConfig, m: BenchModel, pairs: list, serving: list, exports: Exports, tmp: Path,
                   records: list, skipped: list, progress: Progress) -> None:
    """Every mode for one model; what cannot be measured goes to `skipped` with the reason."""
    subjects, failed, primary = [], set(), cfg.threads[0]
    for b, p in pairs:
        progress.note(f"{m.model_id}: opening {b} {p}")
        device = BACKENDS[b].device
        try:
            for t in cfg.threads if device == "cpu" else (primary,):  # thread counts are a CPU matter
                subjects.append(Subject(b, device, p, open_runtime(b, m, p, exports, t), t))
        except BackendUnavailable as e:
            failed.add((b, p))
            _skip(skipped, f"backend {b} ({p})", str(e), backend=b, precision=p, model=m.model_id)
        except Exception as e:  # a backend that breaks on one model must not lose the others' figures
            failed.add((b, p))
            log.exception("%s: opening %s (%s) failed", m.model_id, b, p)
            _skip(skipped, f"backend {b} ({p})", f"{type(e).__name__}: {e}", backend=b, precision=p,
                  model=m.model_id)
    if "step" in cfg.modes and subjects:
        for batch in cfg.batches:
            # One group per thread count, its backends taking turns: a multi-threaded runtime's workers spin on
            # for a while after each call, and would take a core from a single-threaded one timed next.
            for t in cfg.threads:
                group = [s for s in subjects if s.threads == t]
                progress.note(f"{m.model_id}: step, batch {batch}, {t} thread(s)")
                times = time_steps(group, batch, cfg.seconds, cfg.max_calls) if group else {}
                records.extend(_step_record(m, s, batch, times[s.key]) for s in group)
                time.sleep(0.1 if t > 1 else 0)  # let spinning workers settle before the next group
            progress.advance(f"{m.model_id}: step, batch {batch}")
        torch.set_num_threads(primary)
    if serving:  # the server's streams in-process: what gRPC (and HTTP) is compared with
        for sub in (s for s in subjects if s.threads == primary and (s.name, s.precision) in serving):
            sub.activate()
            for c in cfg.concurrency:
                secs = time_loop(sub.runtime, cfg.grpc_chars, c)
                records.append(report.record(m, sub.name, "loop", precision=sub.precision, batch=c, threads=primary,
                                             samples=len(secs), us=summary_us(secs, c),
                                             chars_per_s=c / float(secs.mean()), temperature=1.0,
                                             loop="Runtime.step + train.sampling.BatchSampler"))
    del subjects
    gc.collect()
    if "refeed" in cfg.modes:
        windows = cfg.refeed_windows or tuple(sorted({50, m.seq_len or 50}))
        progress.note(f"{m.model_id}: carried vs re-feeding")
        carried, refeed = time_decoding(m.path, windows, cfg.refeed_chars, BLOCK_CHARS)
        records.extend(_decoding_records(m, carried, refeed, cfg.refeed_chars, primary))
        progress.advance(f"{m.model_id}: carried vs re-feeding {', '.join(map(str, windows))}")
    points = _points(cfg)
    for b, p in serving:
        what = f"{'/'.join(m for m in ('grpc', 'http') if m in cfg.modes)} on {b} ({p})"
        if (b, p) in failed:
            _skip(skipped, what, "the backend did not open for this model (above)", b, p, m.model_id, "grpc")
            progress.advance(what, len(points))
            continue
        done = 0
        try:
            server = ServerProcess(_server_models(b, m, p, exports), *BACKENDS[b].server, threads=primary,
                                   log_dir=tmp, cpus=cfg.server_cpus, http="http" in cfg.modes)
            with server:
                for mode, c, k, co in points:
                    msgs = f"{report.chars_per_msg(k, co)} chars/msg"
                    progress.note(f"{m.model_id}: {mode} {b}, concurrency {c}, {msgs}")
                    requests = max(report.MIN_GRPC_REQUESTS, c * cfg.grpc_requests)
                    result = drive(server, c, requests, cfg.grpc_chars, k, co, cpus=cfg.client_cpus, work_dir=tmp,
                                   http=mode == "http")
                    records.append(_grpc_record(m, b, p, result, primary, server, mode))
                    done += 1
                    progress.advance(f"{m.model_id}: {mode} on {b} ({p}), concurrency {c}, {msgs}")
        except ServerFailed as e:
            _skip(skipped, what, str(e), b, p, m.model_id, "grpc")
        except Exception as e:
            log.exception("%s: %s failed", m.model_id, what)
            _skip(skipped, what, f"{type(e).__name__}: {e}", b, p, m.model_id, "grpc")
        if done < len(points):
            progress.advance(what, len(points) - done)
