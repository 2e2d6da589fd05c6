"""From measurements to the report: records, speedups, limits, targets; latency.json, latency.md, PNGs.

Every figure derived here (speedups, fractions of the limit, targets) comes from records of the same
run: nothing is compared with a number measured at another time or on another machine.
"""
from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

from serve.bench.backends import BACKENDS, EAGER
from serve.bench.models import BenchModel

log = logging.getLogger(__name__)

FORMAT = "charrnn-latency/5"
MIN_GRPC_REQUESTS = 24  # a gRPC point's requests in all: one stream's run outlasts a hiccup of the machine
MODES = ("step", "refeed", "grpc", "http", "limit")  # what --modes selects; refeed also measures "carried"

# --- records --------------------------------------------------------------------------------------


def record(model: BenchModel, backend: str, mode: str, *, precision: str = "fp32", batch: int | None = None,
           concurrency: int | None = None, chunk_chars: int | None = None, threads: int, samples: int,
           us: dict | None, chars_per_s: float | None, **details) -> dict:
    """One measurement. `us`: p50/p90/p99/mean microseconds per character (any may be None)."""
    us = us or {}
    device = BACKENDS[backend].device if backend in BACKENDS else "cpu"
    return {**model.describe(), "backend": backend, "device": device, "precision": precision, "mode": mode,
            "batch": batch, "concurrency": concurrency, "chunk_chars": chunk_chars, "threads": threads,
            "samples": samples, **{f"{k}_us": us.get(k) for k in ("p50", "p90", "p99", "mean")},
            "chars_per_s": chars_per_s,
            "speedup_vs_eager": None, "baseline": None, "limit_us": None, "x_limit": None, "details": details}


def _key(r: dict) -> tuple:
    return r["model"], r["mode"], r["batch"], r["concurrency"], msg_label(r), r["threads"]


def msg_label(r: dict) -> str | None:
    """A grpc record's characters per message (see `chars_per_msg`); None for other records."""
    return None if r["chunk_chars"] is None else chars_per_msg(r["chunk_chars"], r["details"].get("coalesce"))


def chars_per_msg(chunk_chars: int, coalesce: bool) -> str:
    """chunk_chars, with + when the streams coalesced (that many or more per message): 16, 1+."""
    return f"{chunk_chars}{'+' if coalesce else ''}"


def limit_key(device: str, threads: int) -> str:
    """machine.limits is keyed by device and thread count: 'cpu t1', 'cuda t1'."""
    return f"{device} t{threads}"


def speedup(base: dict, rec: dict, basis: str) -> float | None:
    """How many times faster rec is than base: by median time per character (basis 'p50_us') or by
    aggregate characters per second ('chars_per_s')."""
    if basis == "p50_us":
        b, r = base["p50_us"], rec["p50_us"]
        return b / r if b and r else None
    b, r = base["chars_per_s"], rec["chars_per_s"]
    return r / b if b and r else None


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_eager and baseline of every step and grpc record, against eager PyTorch measured in this
    run on the same model, batch (or concurrency and chunk_chars), thread count and device (the CPU eager run
    when the device has none); and, on each re-feeding record, how many times faster carried-state generation
    was (carried_speedup: eager generate) and each batch-1 step (step_speedups, by backend label)."""
    eager = {(_key(r), r["device"]): r for r in records if r["backend"] in EAGER.values() and r["precision"] == "fp32"}
    for r in records:
        if r["mode"] in ("step", "grpc"):
            base = eager.get((_key(r), r["device"])) or eager.get((_key(r), "cpu"))
            if base is not None:
                r["speedup_vs_eager"] = speedup(base, r, "p50_us" if r["mode"] == "step" else "chars_per_s")
                r["baseline"] = (f"{_label(base)} {base['mode']} "
                                 f"({'p50 time per char' if r['mode'] == 'step' else 'chars/s'})")
    carried = {r["model"]: r for r in records if r["mode"] == "carried"}
    steps = [r for r in records if r["mode"] == "step" and r["batch"] == 1]
    for r in records:
        if r["mode"] == "refeed":
            if r["model"] in carried:
                r["details"]["carried_speedup"] = speedup(r, carried[r["model"]], "p50_us")
            r["details"]["step_speedups"] = {_label(s): speedup(r, s, "p50_us") for s in steps
                                             if s["model"] == r["model"]}


def bandwidth_for(probes: dict, working_set: int) -> float:
    """Bytes/s for a step whose weights span working_set bytes: the fastest probe over a working set at least
    as large (a smaller set fits the same caches or faster ones, and a tiny probe is dominated by the cost
    of the call, so it understates what its cache delivers)."""
    fits = [b["best"] for ws, b in probes.items() if int(ws) >= working_set]
    return max(fits) if fits else min(b["best"] for b in probes.values())


def limit_us(weight_bytes: float, flops: float, bytes_per_s: float, flops_per_s: float) -> dict:
    """The roofline of one step: reading its weights at the measured bandwidth, computing its FLOPs at the
    measured matrix-multiply rate; a step can be no faster than the slower of the two."""
    memory, compute = weight_bytes / bytes_per_s * 1e6, flops / flops_per_s * 1e6
    return {"memory_us": memory, "compute_us": compute, "limit_us": max(memory, compute),
            "bound": "memory" if memory >= compute else "compute"}


# bytes per weight a step reads at each precision: int8's limit is int8 bytes / bandwidth (its matmul rate is
# taken as fp32's, which only matters where compute, not memory, bounds the step)
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def add_limits(records: list[dict], models: list[BenchModel], limits: dict) -> list[dict]:
    """limit_us and x_limit (measured / limit, per character) on each step record whose device was probed;
    returns one 'limit' record per (model, device, precision, batch): the machine's best, per character."""
    by_id = {m.model_id: m for m in models}
    out: dict[tuple, dict] = {}
    for r in records:
        probe = limits.get(limit_key(r["device"], r["threads"]))
        if r["mode"] != "step" or probe is None or r["model"] not in by_id:
            continue
        m, B = by_id[r["model"]], r["batch"]
        nbytes = WEIGHT_BYTES[r["precision"]]
        bw = bandwidth_for(probe["bandwidth"], m.weight_bytes(1, nbytes))
        flops = probe["matmul_flops"].get(r["precision"], probe["matmul_flops"]["fp32"])["best"]
        lim = limit_us(m.weight_bytes(B, nbytes), m.flops(B), bw, flops)
        r["limit_us"] = lim["limit_us"] / B
        r["x_limit"] = r["p50_us"] / r["limit_us"] if r["p50_us"] else None
        key = (m.model_id, r["device"], r["precision"], B, r["threads"])
        if key not in out:
            per_char = lim["limit_us"] / B
            rec = record(m, "machine", "limit", precision=r["precision"], batch=B, threads=r["threads"], samples=0,
                         us={"p50": per_char}, chars_per_s=1e6 / per_char, weight_bytes=m.weight_bytes(B, nbytes),
                         flops=m.flops(B), bandwidth_bytes_per_s=bw, matmul_flops_per_s=flops,
                         memory_us=lim["memory_us"], compute_us=lim["compute_us"], bound=lim["bound"])
            rec["device"], rec["limit_us"] = r["device"], per_char
            out[key] = rec
    return list(out.values())


# --- targets --------------------------------------------------------------------------------------

TARGETS = {
    "ort_cpu_3x": "onnxruntime CPU step at batch 1 >= 3x faster than eager PyTorch (LSTM, GRU; hidden 128, 512)",
    "carried_20x": "carried state >= 20x faster per character than the seed's re-feeding at seq_len 50",
    "limit_3x": "batch-1 step within 3x of the machine's limit (hidden 512)",
    "gpu_3x": "TensorRT and CUDA-graph steps at batch 1 >= 3x faster than eager PyTorch on the GPU",
    "grpc_batching_10x": "gRPC server on onnxruntime CPU: 64 streams >= 10x the characters/s of one stream "
                         "(same chars/msg)",
    "grpc_one_stream_2x": "gRPC server on onnxruntime CPU, one stream: time per character within 2x of the "
                          "in-process step loop (Runtime.step + sampling, one stream)",
    "int8_1.5x": "int8 onnxruntime CPU step at batch 1 >= 1.5x faster than the fp32 one (LSTM, GRU; hidden 512)",
    "int8_64_1.3x": "int8 onnxruntime CPU step at batch 64 >= 1.3x faster than the fp32 one (LSTM, GRU; hidden 512)",
    "int8_under_fp32_limit": "int8 step at batch 1 faster than the fp32 machine limit (measured / fp32 limit < 1; "
                             "hidden 512)",
    "http_1_5x": "HTTP streaming (SSE, /v1/completions) within 1.5x of gRPC's characters/s at 64 streams with "
                 "coalescing, the same server and chars/msg (measured: gRPC chars/s / HTTP chars/s)",
}


NEEDS = {  # what each target needs that a run may lack
    "ort_cpu_3x": "it needs step mode with the torch and ort-cpu backends on an LSTM or GRU at hidden 128 or 512",
    "carried_20x": "it needs refeed mode (window 50)",
    "limit_3x": "it needs step and limit modes on a model at hidden 512",
    "gpu_3x": "it needs a GPU backend (tensorrt, torch-cudagraph) in step mode",
    "grpc_batching_10x": "it needs grpc mode on ort-cpu at concurrency 1 and 64",
    "grpc_one_stream_2x": "it needs grpc mode on ort-cpu at concurrency 1",
    "int8_1.5x": "it needs step mode with ort-cpu and ort-cpu-int8 on an LSTM or GRU at hidden 512, batch 1",
    "int8_64_1.3x": "it needs step mode with ort-cpu and ort-cpu-int8 on an LSTM or GRU at hidden 512, batch 64",
    "int8_under_fp32_limit": "it needs step and limit modes with ort-cpu-int8 at hidden 512",
    "http_1_5x": "it needs grpc and http modes at concurrency 64 with coalescing (--coalesce)",
}
THRESHOLDS = {  # what each target asks: (threshold, whether the measure must be higher or lower)
    "ort_cpu_3x": (3.0, "higher"), "carried_20x": (20.0, "higher"), "limit_3x": (3.0, "lower"),
    "gpu_3x": (3.0, "higher"), "grpc_batching_10x": (10.0, "higher"), "grpc_one_stream_2x": (2.0, "lower"),
    "int8_1.5x": (1.5, "higher"), "int8_64_1.3x": (1.3, "higher"), "int8_under_fp32_limit": (1.0, "lower"),
    "http_1_5x": (1.5, "lower"),
}


def _target(key: str, r: dict | None, measured: float | None, model: str = "", backend: str = "",
            note: str = "") -> dict:
    threshold, better = THRESHOLDS[key]
    passed = None if measured is None else (measured >= threshold if better == "higher" else measured <= threshold)
    return {"target": key, "description": TARGETS[key], "model": r["model"] if r else model,
            "backend": backend or (_label(r) if r else ""), "measured": measured, "threshold": threshold,
            "better": better, "passed": passed, "note": note}


def _int8_targets(records: list[dict]) -> list[dict]:
    """int8 against fp32 on onnxruntime CPU, same model, batch and threads; and against fp32's limit."""
    step = {(r["model"], r["backend"], r["batch"], r["threads"]): r for r in records if r["mode"] == "step"}
    limits = {(r["model"], r["batch"], r["threads"]): r for r in records
              if r["mode"] == "limit" and r["precision"] == "fp32"}
    out = []
    for (model, backend, batch, threads), r in step.items():
        fp32 = step.get((model, "ort-cpu", batch, threads))
        if backend != "ort-cpu-int8" or r["hidden_size"] != 512 or r["cell"] not in ("lstm", "gru"):
            continue
        if fp32 and batch in (1, 64):
            out.append(_target("int8_1.5x" if batch == 1 else "int8_64_1.3x", r, speedup(fp32, r, "p50_us"),
                               note=f"{r['p50_us']:.1f} vs {fp32['p50_us']:.1f} us per character"))
        lim = limits.get((model, 1, threads))
        if batch == 1 and lim:
            out.append(_target("int8_under_fp32_limit", r, r["p50_us"] / lim["limit_us"],
                               note=f"{r['p50_us']:.1f} us vs the fp32 limit {lim['limit_us']:.1f} us"))
    return out


def evaluate_targets(records: list[dict], skipped: list[dict], floor: list[dict] = ()) -> list[dict]:
    """The issue's targets, each judged on this run's records (passed None: not measured here, and why).
    floor: the gRPC floor's points (serve.bench.floor), quoted beside the gRPC targets at the same chars/msg."""
    out = []
    step1 = [r for r in records if r["mode"] == "step" and r["batch"] == 1]
    ort = [r for r in step1 if r["backend"] == "ort-cpu" and r["cell"] in ("lstm", "gru")
           and r["hidden_size"] in (128, 512)]
    out += [_target("ort_cpu_3x", r, r["speedup_vs_eager"], note="same thread count") for r in ort
            if r["speedup_vs_eager"] is not None]
    if len({r["threads"] for r in ort}) > 1:  # several thread counts: each side at its fastest too
        for model in dict.fromkeys(r["model"] for r in ort):
            eager = [r for r in step1 if r["model"] == model and r["backend"] == "torch" and r["precision"] == "fp32"]
            best_ort = min((r for r in ort if r["model"] == model), key=lambda r: r["p50_us"])
            if eager:
                best_eager = min(eager, key=lambda r: r["p50_us"])
                out.append(_target("ort_cpu_3x", None, speedup(best_eager, best_ort, "p50_us"),
                                   model=model, backend=f"{_label(best_ort)} vs {_label(best_eager)}",
                                   note="each at its fastest thread count"))
    for r in (r for r in records if r["mode"] == "refeed" and r["details"]["window"] == 50):
        note = f"re-feeding {r['p50_us'] / 1e3:.2f} ms/char"
        out.append(_target("carried_20x", r, r["details"].get("carried_speedup"), backend="torch",
                           note=note + "; carried: eager train.sampling.generate"))
        best = max(r["details"]["step_speedups"].items(), key=lambda kv: kv[1] or 0, default=None)
        if best and best[1]:
            out.append(_target("carried_20x", None, best[1], model=r["model"], backend=best[0],
                               note=note + "; carried: the fastest backend's batch-1 step (sampling excluded)"))
    big = [r for r in step1 if r["hidden_size"] == 512 and r["x_limit"] is not None]
    out += [_target("limit_3x", r, r["x_limit"], note=f"limit {r['limit_us']:.1f} us") for r in big]
    gpu = [r for r in step1 if r["backend"] in ("tensorrt", "torch-cudagraph")]
    out += [_target("gpu_3x", r, r["speedup_vs_eager"],
                    note="" if r["baseline"] and r["baseline"].startswith("torch-cuda") else "baseline: eager on CPU")
            for r in gpu]
    grpc = [r for r in records if r["mode"] == "grpc" and r["backend"] == "ort-cpu"]
    one = {(r["model"], r["precision"], msg_label(r)): r for r in grpc if r["concurrency"] == 1}
    loops = {(r["model"], r["backend"], r["precision"], r["threads"], r["batch"]): r
             for r in records if r["mode"] == "loop"}
    floors = {(f["concurrency"], msg_label(f)): f for f in floor}
    for r in grpc:
        base = one.get((r["model"], r["precision"], msg_label(r)))
        if r["concurrency"] == 64 and base:
            lo1, lo64 = (loops.get((r["model"], r["backend"], r["precision"], r["threads"], b)) for b in (1, 64))
            ceiling = f"; in-process {speedup(lo1, lo64, 'chars_per_s'):.1f}x" if lo1 and lo64 else ""
            f1, f64 = (floors.get((c, msg_label(r))) for c in (1, 64))
            if f1 and f64 and f1["chars_per_s"]:
                ceiling += (f"; the gRPC floor (no model) {f64['chars_per_s'] / f1['chars_per_s']:.1f}x: "
                            f"{f64['chars_per_s']:,.0f} vs {f1['chars_per_s']:,.0f} chars/s")
            out.append(_target("grpc_batching_10x", r, speedup(base, r, "chars_per_s"),
                               note=f"{msg_label(r)} chars/msg, {r['details']['max_chars']} per request: "
                                    f"{r['chars_per_s']:,.0f} vs {base['chars_per_s']:,.0f} chars/s{ceiling}; "
                                    f"{where(r)}{cpu_use(r)}"))
    for r in one.values():
        loop = loops.get((r["model"], r["backend"], r["precision"], r["threads"], 1))
        f1 = floors.get((1, msg_label(r)))
        bare = f" (the gRPC floor, no model: {f1['mean_us']:.0f})" if f1 and f1["mean_us"] else ""
        if loop and r["mean_us"]:
            out.append(_target("grpc_one_stream_2x", r, r["mean_us"] / loop["mean_us"],
                               note=f"{msg_label(r)} chars/msg, {r['details']['max_chars']} per request: "
                                    f"{r['mean_us']:.0f} vs {loop['mean_us']:.1f} us per character{bare}; "
                                    f"{where(r)}{cpu_use(r)}"))
    out += _int8_targets(records)
    same = lambda r: (r["model"], r["backend"], r["precision"], r["threads"], r["concurrency"],  # noqa: E731
                      msg_label(r))
    beside = {same(r): r for r in records if r["mode"] == "grpc" and r["details"].get("coalesce")}
    for r in records:
        g = beside.get(same(r)) if r["mode"] == "http" and r["concurrency"] == 64 else None
        if g and r["chars_per_s"]:
            out.append(_target("http_1_5x", r, g["chars_per_s"] / r["chars_per_s"],
                               note=f"{msg_label(r)} chars/msg: gRPC {g['chars_per_s']:,.0f} vs HTTP "
                                    f"{r['chars_per_s']:,.0f} chars/s; {where(r)}{cpu_use(r)}"))
    for key in THRESHOLDS:
        if not any(t["target"] == key for t in out):
            why = "; ".join(sorted({s["reason"].rstrip(".") for s in skipped if key == "gpu_3x" and s.get("backend") in
                                    ("tensorrt", "torch-cudagraph", "torch-cuda")}))
            out.append(_target(key, None, None,
                               note=f"not measured in this run: {why or NEEDS[key]}"))
    return out


def where(r: dict) -> str:
    """Where a grpc record's server and load generator ran."""
    d = r["details"]
    server, client = d.get("server_cpus"), d.get("client_cpus")
    processes = (d.get("loadgen") or {}).get("processes", 1)
    if server and client and not set(server) & set(client):
        return (f"server on CPUs {_cpu_list(server)}, load generator on CPUs {_cpu_list(client)}"
                + (f" in {processes} processes" if processes > 1 else ""))
    return f"server and load generator sharing CPUs {_cpu_list(server)}" if server and server == client else \
        "server and load generator sharing the machine's CPUs"


def cpu_use(r: dict, short: bool = False) -> str:
    """The CPU cores a grpc record's server (front end + worker processes) and load generator kept busy while
    timed ("" where not measured); short: the figures alone, for a table."""
    d = r["details"]
    server, client, wall = d.get("server_cpu_s"), d.get("client_cpu_s"), d["wall_s"]
    if not server or client is None or not wall:
        return "-" if short else ""
    front, workers, client = server["front"] / wall, server["workers"] / wall, client / wall
    if short:
        return f"{front:.2f} + {workers:.2f} / {client:.2f}"
    cpus = len(set(d.get("server_cpus") or []) | set(d.get("client_cpus") or []))
    return (f"; CPU cores busy: server {front:.2f} (front end) + {workers:.2f} (workers), load generator "
            f"{client:.2f}" + (f", of {cpus}" if cpus else ""))


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


# --- files ----------------------------------------------------------------------------------------

def schema() -> dict:
    return json.loads(resources.files("serve.bench").joinpath("schema.json").read_text())


def validate(report: dict) -> None:
    """Raise jsonschema.ValidationError if the report does not match schema.json (skipped, with a log line,
    where jsonschema is not installed: it is a dev dependency)."""
    try:
        import jsonschema
        spec = schema()
    except ImportError:
        log.warning("jsonschema is not installed: latency.json was not validated (pip install -e '.[dev]')")
        return
    except OSError as e:  # an install that left the schema file out: measurements matter more than the check
        log.warning("serve/bench/schema.json is not readable (%s): latency.json was not validated", e)
        return
    jsonschema.validate(report, spec)


def write(report: dict, out: Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    validate(report)
    files = [out / "latency.json", out / "latency.md"]
    files[0].write_text(json.dumps(report, indent=1) + "\n")
    files[1].write_text(markdown(report))
    try:
        files += plots(report, out)
    except Exception:  # a plot must never lose the measurements written above
        log.exception("plotting failed; latency.json and latency.md are written")
    return files


# --- markdown -------------------------------------------------------------------------------------

def _us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _ms(us: float | None) -> str:
    return _us(None if us is None else us / 1e3)


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x" if x < 100 else f"{x:,.0f}x"


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _pct(chars_per_s: float | None, floor: dict | None) -> str:
    """chars/s as a share of the gRPC floor's at the same point."""
    return "-" if not (chars_per_s and floor and floor["chars_per_s"]) else f"{chars_per_s / floor['chars_per_s']:.0%}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _msg_label_measured(r: dict) -> str:
    """chars/msg for a table: coalesced rows add the mean that went in one message."""
    mean = r["details"].get("chars_per_msg")
    return f"{msg_label(r)} ({mean:.1f})" if r["details"].get("coalesce") and mean else msg_label(r)


def _order(r: dict) -> tuple:
    names = list(BACKENDS) + ["machine"]
    return (r["cell"], r["hidden_size"], r["model"], r["batch"] or 0, r["concurrency"] or 0, r["chunk_chars"] or 0,
            r["details"].get("coalesce", False),
            names.index(r["backend"]) if r["backend"] in names else 99, r["precision"])


def _label(r: dict) -> str:
    """backend, then precision and thread count where they are not the usual fp32 and 1."""
    shown = r["precision"] == "fp32" or r["backend"].endswith(r["precision"])  # ort-cpu-int8 says it already
    return (r["backend"] + ("" if shown else f" {r['precision']}")
            + ("" if r["threads"] == 1 else f" t{r['threads']}"))


def markdown(rep: dict) -> str:
    m, s = rep["machine"], rep["settings"]
    recs = sorted(rep["records"], key=_order)
    by = lambda mode: [r for r in recs if r["mode"] == mode]  # noqa: E731
    gpu = m["gpu"]["name"] if m.get("gpu") else "none"
    v = m["versions"]
    caches = ", ".join(f"{k} {val}" for k, val in m["caches"].items()) or "unknown"
    out = [
        "# Latency benchmark\n",
        f"`{rep['command']}` -- {rep['created']}, {rep['wall_s']:.0f} s{' (--quick)' if rep['quick'] else ''}.\n",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gib']} GiB; "
        f"caches {caches}; GPU: {gpu}; {m['os']}.",
        f"- **Libraries**: Python {v['python']}, torch {v['torch']} ({m['torch_blas']}), numpy {v['numpy']}, "
        f"onnx {v['onnx'] or '-'}, onnxruntime {v['onnxruntime'] or '-'} "
        f"({', '.join(m['onnxruntime_providers']) or 'not installed'}), grpcio {v['grpcio'] or '-'}, "
        f"TensorRT {v['tensorrt'] or 'not installed'}.",
        f"- **Threads**: {', '.join(map(str, s['threads']))} (intra-op, torch and onnxruntime; step mode measures "
        f"the CPU backends at each, labelled tN past 1; the other modes and the server use {s['threads'][0]}). "
        f"Load average at start {m['load_average']['start']}, at end {m['load_average']['end']} "
        f"(other work on the machine shows here).",
        "- **Models**: " + "; ".join(f"`{x['model']}` ({x['weights']} weights)" for x in rep["models"])
        + ". Timing does not depend on the weights' values.\n",
    ]
    out.append("## Targets\n")
    for key, description in TARGETS.items():
        rows = [t for t in rep["targets"] if t["target"] == key]
        if not rows:
            continue
        met = sum(t["passed"] is True for t in rows)
        judged = sum(t["passed"] is not None for t in rows)
        if not judged:
            out.append(f"**{description}**: {rows[0]['note']}.\n")
            continue
        out.append(f"**{description}**: met in {met} of {judged}.\n")
        out.append(_table(["model", "backend", "measured", "result", "note"], [
            [t["model"] or "-", t["backend"] or "-",
             "-" if t["measured"] is None else f"{t['measured']:.2f}x",
             {True: "met", False: "**missed**", None: "not measured"}[t["passed"]], t["note"]] for t in rows]))
    step = by("step")
    if step:
        out.append("\n## Step: one character per call, state carried (batch 1)\n")
        out.append("Microseconds per call of `Runtime.step` on tokens (1, 1), the logits back on the host. "
                   "x limit: median over the machine's limit for this step (see Limit).\n")
        out.append(_table(["model", "backend", "p50 us", "p90 us", "p99 us", "chars/s", "vs eager", "x limit", "calls"],
                          [[r["model"], _label(r), _us(r["p50_us"]), _us(r["p90_us"]), _us(r["p99_us"]),
                            _n(r["chars_per_s"]), _x(r["speedup_vs_eager"]), _x(r["x_limit"]), r["samples"]]
                           for r in step if r["batch"] == 1]))
        if len({r["batch"] for r in step}) > 1:
            out.append("\n## Step: batch sweep\n")
            out.append("Microseconds per character = per call / batch; chars/s = batch / mean call time.\n")
            out.append(_table(["model", "backend", "batch", "p50 us/char", "p99 us/char", "call p50 us", "chars/s",
                               "vs eager", "x limit"],
                              [[r["model"], _label(r), r["batch"], _us(r["p50_us"]), _us(r["p99_us"]),
                                _us(r["details"]["call_us"]["p50"]), _n(r["chars_per_s"]), _x(r["speedup_vs_eager"]),
                                _x(r["x_limit"])] for r in step]))
    refeed, carried = by("refeed"), {r["model"]: r for r in by("carried")}
    if refeed:
        out.append("\n## Carried state vs the seed's re-feeding (eager PyTorch, greedy, batch 1)\n")
        out.append("Re-feeding runs the last `window` characters from a zero state for every new character "
                   "(`train.sampling.generate_refeed`); carried state runs one step per character "
                   "(`train.sampling.generate`). Seconds per 1000 characters is the seed's \"Inference Time\".\n")
        rows = []
        for model in dict.fromkeys(r["model"] for r in refeed):
            c = carried.get(model)
            if c:
                rows.append([model, "carried state", "-", _us(c["p50_us"]), _us(c["p99_us"]),
                             f"{c['details']['per_1000_chars_s']:.3f}", "1.0x", ""])
            for r in (r for r in refeed if r["model"] == model):
                best = max(r["details"]["step_speedups"].items(), key=lambda kv: kv[1] or 0, default=None)
                rows.append([model, "re-feeding", r["details"]["window"], _us(r["p50_us"]), _us(r["p99_us"]),
                             f"{r['details']['per_1000_chars_s']:.3f}", _x(r["details"].get("carried_speedup")),
                             f"{_x(best[1])} ({best[0]})" if best and best[1] else "-"])
        out.append(_table(["model", "decoding", "window", "p50 us/char", "p99 us/char", "s / 1000 chars",
                           "carried (eager) is faster by", "fastest batch-1 step is faster by"], rows))
    grpc = sorted(by("grpc") + by("http"), key=_order)
    if grpc:
        out.append("\n## gRPC end to end (`python -m serve` + `clients.loadgen`)\n")
        g = grpc[0]["details"]
        out.append(f"Each stream asks for {g['max_chars']} characters, streamed chars/msg at a time (the request's "
                   f"chunk_chars; N+: coalesced, N or more per message, what was ready when the last one had gone, "
                   f"with the mean in brackets), sampled at temperature {g['loadgen']['temperature']}; "
                   f"{s['grpc_requests']} request(s) per stream (at least {MIN_GRPC_REQUESTS} in all); "
                   f"{where(grpc[0])}. "
                   "Rows marked in-process: the same number of streams without gRPC, `Runtime.step` and the server's "
                   "sampler (train.sampling.BatchSampler, prepared once) in one loop. "
                   "Inter-character gaps are taken at the client, a message's gap shared equally by its characters; "
                   "messages arrive in bursts: p50 is the gap inside a burst, p99 the wait between bursts, and "
                   "mean = concurrency / aggregate chars/s (a stream's wall time per character). vs eager: aggregate "
                   "chars/s over the torch-backed server's at the same concurrency and chars/msg. CPU cores: CPU time "
                   "/ wall time while timed, of the server's front end + its worker processes / of the load "
                   "generator. Rows marked gRPC floor: the same requests to the service with no model behind it "
                   "(`python -m serve.bench.floor`, canned text), where the server ran: what Python gRPC and this "
                   "load generator allow on this machine; of floor: a server row's chars/s over the floor's at the "
                   "same concurrency and chars/msg. Rows marked HTTP: the same server's HTTP port, the same requests "
                   "over /v1/completions streamed as server-sent events (`clients.loadgen --http`; always "
                   "coalesced).\n")
        floor = {(f["concurrency"], msg_label(f)): f for f in rep["grpc_floor"]}
        of_floor = lambda r: _pct(r["chars_per_s"], floor.get((r["concurrency"], msg_label(r))))  # noqa: E731
        out.append(_table(["model", "backend", "concurrency", "chars/msg", "TTFC p50 ms", "TTFC p99 ms",
                           "inter-char p50 ms", "inter-char p99 ms", "mean ms/char", "chars/s", "vs eager",
                           "of floor", "CPU cores", "errors"],
                          [[r["model"], _label(r) + " HTTP" * (r["mode"] == "http"), r["concurrency"],
                            _msg_label_measured(r),
                            _us(r["details"]["ttfc_ms"]["p50"]),
                            _us(r["details"]["ttfc_ms"]["p99"]), _ms(r["p50_us"]), _ms(r["p99_us"]), _ms(r["mean_us"]),
                            _n(r["chars_per_s"]), _x(r["speedup_vs_eager"]), of_floor(r), cpu_use(r, short=True),
                            sum(r["details"]["errors"].values())]
                           for r in grpc]
                          + [[r["model"], _label(r), r["batch"], "in-process", "-", "-", "-", "-",
                              _ms(r["batch"] / r["chars_per_s"] * 1e6), _n(r["chars_per_s"]), "-", "-", "-", "-"]
                             for r in by("loop")]
                          + [["gRPC floor", "no model", f["concurrency"], msg_label(f),
                              _us(f["details"]["ttfc_ms"]["p50"]), _us(f["details"]["ttfc_ms"]["p99"]),
                              _ms(f["p50_us"]), _ms(f["p99_us"]), _ms(f["mean_us"]), _n(f["chars_per_s"]), "-", "-",
                              cpu_use(f, short=True), sum(f["details"]["errors"].values())]
                             for f in rep["grpc_floor"]]))
    lim = by("limit")
    if lim:
        out.append("\n## Limit: what the machine allows\n")
        for device, p in rep["machine"]["limits"].items():
            bw = ", ".join(f"{int(ws) / 2**20:.2f} MiB: {b['best'] / 1e9:.0f} GB/s"
                           for ws, b in sorted(p["bandwidth"].items(), key=lambda kv: int(kv[0])))
            out.append(f"- **{device}** ({p['threads']} thread(s)): matrix multiply "
                       + "; ".join(f"{k} " + ", ".join(f"{lib} {x / 1e9:.0f}" for lib, x in rates.items()
                                                     if lib != "best") + " GFLOP/s"
                                   for k, rates in p["matmul_flops"].items())
                       + f" ({p['matmul_n']}^3 product); bandwidth over working sets the size of each model's weights "
                       f"(and a few more), read or copied over and over, the faster of the two: {bw}; main memory "
                       f"({p['dram']['working_set'] / 2**20:.0f} MiB working set): {p['dram']['best'] / 1e9:.0f} GB/s.")
        out.append("\nLimit of a step = max(weight bytes / bandwidth, FLOPs / matmul rate), the faster library's rate; "
                   "x limit = measured median / limit. Small probes are bound by the cost of each call and read low, "
                   "so each model takes the fastest probe over a working set at least as large as its weights (for "
                   "weights that fit a smaller cache the true limit is lower still).\n")
        group = lambda r: (r["model"], r["batch"], r["device"], r["precision"], r["threads"])  # noqa: E731
        steps: dict[tuple, list] = {}
        for r in step:
            steps.setdefault(group(r), []).append(r)
        out.append(_table(["model", "batch", "threads", "weights MiB", "MFLOP", "memory us", "compute us",
                           "limit us/char", "measured x limit"],
                          [[r["model"], r["batch"], r["threads"], f"{r['details']['weight_bytes'] / 2**20:.2f}",
                            f"{r['details']['flops'] / 1e6:.1f}", _us(r["details"]["memory_us"]),
                            _us(r["details"]["compute_us"]), _us(r["p50_us"]),
                            ", ".join(f"{_label(x)} {_x(x['x_limit'])}" for x in steps.get(group(r), []))]
                           for r in lim]))
    if rep["skipped"]:
        out.append("\n## Not measured\n")
        out.append(_table(["what", "model", "why"],
                          [[s["what"], s.get("model") or "all", s["reason"].replace("|", "/")]
                           for s in rep["skipped"]]))
    out.append("\n## How it was measured\n")
    out.append(
        f"- Step: each backend gets about {s['seconds']} s of timed calls per point (at most {s['max_calls']}), in "
        "20 rounds taken in turn by all backends of the model at one thread count (a load burst hits them alike; "
        "thread counts are timed one after the other, so that one's spinning workers do not slow another); "
        "warm-up calls are not timed; a GPU call is timed to `torch.cuda.synchronize()` after the logits reach "
        "the host.\n"
        f"- Carried vs re-feeding: {s['refeed_chars']} characters each, timed in blocks of 25 alternating "
        "between the decodings; percentiles are over blocks.\n"
        "- Speedups compare medians (step) or aggregate chars/s (gRPC) with eager PyTorch measured in this run, "
        "at the same thread count.\n"
        "- Limits take the fastest repetition of each probe (load from elsewhere only slows a probe down).\n"
        "- Exported models passed the export stage's parity check against eager PyTorch before being timed.\n"
        "- Files: latency.json (every record; schema `serve/bench/schema.json`), these tables, PNG plots.\n")
    return "\n".join(out)


# --- plots ----------------------------------------------------------------------------------------

def plots(rep: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = sorted(rep["records"], key=_order)
    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)

    def save_bars(fig, ax, groups: list[str], width: float, ylabel: str, title: str, name: str):
        """The grouped bar charts' common tail: one tick per group, a log scale, labels, legend, file."""
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        save(fig, name)

    step = [r for r in recs if r["mode"] == "step"]
    models = list(dict.fromkeys(r["model"] for r in step))
    labels = list(dict.fromkeys(_label(r) for r in step))
    if step:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(models) * max(1, len(labels)) / 2), 4.5))
        width = 0.8 / max(1, len(labels))
        for j, lab in enumerate(labels):
            rows = {r["model"]: r for r in step if r["batch"] == 1 and _label(r) == lab}
            xs = [i + j * width for i, mod in enumerate(models) if mod in rows]
            p50 = [rows[mod]["p50_us"] for mod in models if mod in rows]
            p99 = [rows[mod]["p99_us"] - rows[mod]["p50_us"] for mod in models if mod in rows]
            ax.bar(xs, p50, width, yerr=[[0] * len(p50), p99], capsize=2, label=lab)
        save_bars(fig, ax, models, width, "us per character (p50, whisker p99)", "Step at batch 1, state carried",
                  "step_batch1.png")
        if len({r["batch"] for r in step}) > 1:
            cols = min(3, len(models))
            rows_n = -(-len(models) // cols)
            fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
            for ax, mod in zip(axes.flat, models):
                for lab in labels:
                    rs = [r for r in step if r["model"] == mod and _label(r) == lab]
                    if rs:
                        ax.plot([r["batch"] for r in rs], [r["chars_per_s"] for r in rs], "o-", label=lab)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(mod, fontsize=9)
                ax.set_xlabel("batch")
                ax.set_ylabel("chars/s")
            for ax in list(axes.flat)[len(models):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=7)
            save(fig, "step_batches.png")
    refeed = [r for r in recs if r["mode"] in ("refeed", "carried")]
    if refeed:
        mods = list(dict.fromkeys(r["model"] for r in refeed))
        bars: dict[str, dict[str, float]] = {}  # kind -> model -> seconds per 1000 characters (p50)
        for r in refeed:
            kind = "carried (eager)" if r["mode"] == "carried" else f"re-feeding, window {r['details']['window']}"
            bars.setdefault(kind, {})[r["model"]] = r["p50_us"] / 1e3
        for mod in mods:
            fastest = min((r for r in step if r["model"] == mod and r["batch"] == 1), key=lambda r: r["p50_us"],
                          default=None)
            if fastest:
                bars.setdefault("fastest batch-1 step", {})[mod] = fastest["p50_us"] / 1e3
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(mods)), 4))
        width = 0.8 / len(bars)
        for j, (kind, vals) in enumerate(bars.items()):
            ax.bar([i + j * width for i, mod in enumerate(mods) if mod in vals],
                   [vals[mod] for mod in mods if mod in vals], width, label=kind)
        save_bars(fig, ax, mods, width, "seconds per 1000 characters (p50)",
                  "Carried state vs the seed's re-feeding (greedy, batch 1)", "decoding.png")
    grpc = [r for r in recs if r["mode"] in ("grpc", "http")]
    if grpc:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        sizes = list(dict.fromkeys(msg_label(r) for r in sorted(grpc, key=_order)))
        styles = ("-", "--", ":", "-.")  # colour: model and backend; line style: characters per message
        labelled = lambda r: (r["model"], _label(r) + " HTTP" * (r["mode"] == "http"))  # noqa: E731
        for i, key in enumerate(dict.fromkeys(labelled(r) for r in grpc)):
            for k in sizes:
                rs = [r for r in grpc if labelled(r) == key and msg_label(r) == k]
                if not rs:
                    continue
                style = {"color": f"C{i % 10}", "ls": styles[sizes.index(k) % len(styles)], "marker": "o"}
                a1.plot([r["concurrency"] for r in rs], [r["chars_per_s"] for r in rs],
                        label=" ".join(key) if k == sizes[0] else None, **style)
                a2.plot([r["concurrency"] for r in rs], [r["details"]["ttfc_ms"]["p50"] or 0 for r in rs], **style)
        for ax, y in ((a1, "aggregate chars/s"), (a2, "time to first char p50, ms")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrent streams")
            ax.set_ylabel(y)
        a1.legend(fontsize=7)
        a2.legend([plt.Line2D([], [], color="grey", ls=styles[j % len(styles)]) for j in range(len(sizes))],
                  [f"{k} chars/msg" for k in sizes], fontsize=7)
        fig.suptitle("gRPC end to end")
        save(fig, "grpc.png")
    lim = [r for r in step if r["batch"] == 1 and r["x_limit"] is not None]
    if lim:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(models)), 4))
        width = 0.8 / max(1, len(labels))
        for j, lab in enumerate(labels):
            rows = {r["model"]: r for r in lim if _label(r) == lab}
            ax.bar([i + j * width for i, mod in enumerate(models) if mod in rows],
                   [rows[mod]["x_limit"] for mod in models if mod in rows], width, label=lab)
        for y in (1, 3):
            ax.axhline(y, color="grey", lw=0.8, ls="--")
        save_bars(fig, ax, models, width, "measured / machine limit (batch 1)",
                  "How far each step is from what the machine allows", "limit.png")
    return files
