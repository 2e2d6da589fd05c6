"""python -m serve.bench: options (one dataclass, the CLI built from it) and the command.

    python -m serve.bench                       # random-weight RNN/LSTM/GRU x hidden 128/256/512, all modes
    python -m serve.bench --quick               # LSTM/GRU x hidden 128/512, short timings (about a minute on 2 cores)
    python -m serve.bench --models runs/seed-p23 --backends torch,ort-cpu --modes step,limit
    python -m serve.bench --quick --threads 1,2 --modes step,limit   # each CPU backend at 1 and 2 threads
    python -m serve.bench --quick --modes grpc --server-cpus 0,1 --client-cpus 2,3   # load generator apart
    python -m serve.bench --modes grpc,http --cells lstm --hidden-sizes 128 --concurrency 1,64   # SSE beside gRPC
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from serve.bench.backends import BACKENDS
from serve.bench.report import MIN_GRPC_REQUESTS, MODES
from serve.bench.runner import BenchError, run
from train.model import CELLS

DESCRIPTION = ("Latency benchmark: every step backend against eager PyTorch, carried state against the seed's "
               "re-feeding, the gRPC server end to end, and each step against the machine's limit. Writes "
               "latency.md, latency.json and PNG plots to --out.")

# --quick and the full run differ only in these defaults; an option given on the command line wins
PRESETS = {
    "full": {"cells": ("rnn", "lstm", "gru"), "hidden_sizes": (128, 256, 512), "seconds": 1.0, "max_calls": 5000,
             "refeed_chars": 300, "grpc_chars": 200, "grpc_requests": 2, "parity": {}},
    "quick": {"cells": ("lstm", "gru"), "hidden_sizes": (128, 512), "seconds": 0.3, "max_calls": 1000,
              "refeed_chars": 75, "grpc_chars": 50, "grpc_requests": 1,
              "parity": {"batches": (1, 8), "prefills": (1, 17), "steps": 20}},
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _cpus(text: str) -> tuple[int, ...]:
    """A CPU list as taskset takes it: "0,1", "2-5", "0-1,4"."""
    out = set()
    for part in (x.strip() for x in text.split(",") if x.strip()):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(out))


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _opt(default, help: str, parse=None, **kw):
    return field(default=default, metadata={"help": help, "parse": parse, **kw})


@dataclass
class BenchConfig:
    models: tuple[Path, ...] = _opt((), "checkpoint directories (taken as they are) or grid run directories (one "
                                        "finished model per cell and hidden size); default: random-weight "
                                        "checkpoints of --cells x --hidden-sizes", nargs="+")
    cells: tuple[str, ...] | None = _opt(None, "cells, comma separated (filters --models; shapes of random-weight "
                                               "models) [full: rnn,lstm,gru; quick: lstm,gru]", _strs)
    hidden_sizes: tuple[int, ...] | None = _opt(None, "hidden sizes, comma separated (as --cells) "
                                                      "[full: 128,256,512; quick: 128,512]", _ints)
    backends: tuple[str, ...] = _opt(tuple(BACKENDS), "backends, comma separated; those that cannot run here are "
                                                      "skipped and the report says why", _strs)
    modes: tuple[str, ...] = _opt(MODES, "what to measure, comma separated", _strs)
    precisions: tuple[str, ...] = _opt(("fp32",), "precisions of the exported backends, comma separated "
                                                  "(fp16: onnxruntime/TensorRT on fp16 ONNX models)", _strs)
    batches: tuple[int, ...] = _opt((1, 8, 64, 256), "step mode's batch sizes", _ints)
    concurrency: tuple[int, ...] = _opt((1, 8, 64), "grpc and http modes' concurrent streams", _ints)
    chunk_chars: tuple[int, ...] = _opt((1, 16), "grpc mode's characters per message (the requests' chunk_chars), "
                                                 "each at every --concurrency", _ints)
    coalesce: tuple[int, ...] = _opt((1,), "grpc mode's characters per message run again with coalescing (the "
                                           "requests' coalesce: that many or more per message, what was ready; "
                                           "shown as 1+), each at every --concurrency; '' for none; http mode's "
                                           "(its streams always coalesce)", _ints)
    server_cpus: tuple[int, ...] = _opt((), "grpc mode: the CPUs the server and its worker processes may run on "
                                            "(as taskset takes them: 0,1 or 0-1); default: all", _cpus)
    client_cpus: tuple[int, ...] = _opt((), "grpc mode: the CPUs of the load generator (e.g. 2-5, apart from "
                                            "--server-cpus, so that the two do not share cores; then it runs one "
                                            "process per CPU); default: all", _cpus)
    threads: tuple[int, ...] = _opt((1,), "intra-op threads of torch and onnxruntime, comma separated: step mode "
                                          "measures the CPU backends at each (taking turns, like backends); the other "
                                          "modes, and the server they start, use the first", _ints)
    seconds: float | None = _opt(None, "timed seconds per backend and step point [full: 1.0; quick: 0.3]")
    max_calls: int | None = _opt(None, "at most this many timed calls per backend and step point "
                                       "[full: 5000; quick: 1000]")
    refeed_chars: int | None = _opt(None, "characters generated per decoding in refeed mode [full: 300; quick: 75]")
    refeed_windows: tuple[int, ...] = _opt((), "re-feeding window lengths; default: 50 and the model's seq_len",
                                           _ints)
    grpc_chars: int | None = _opt(None, "max_chars of each gRPC request [full: 200; quick: 50]")
    grpc_requests: int | None = _opt(None, f"gRPC requests per concurrent stream (at least {MIN_GRPC_REQUESTS} "
                                           "in all) [full: 2; quick: 1]")
    out: Path = _opt(Path("reports"), "output directory for latency.md, latency.json and the PNG plots")
    quick: bool = _opt(False, "short timings and the target models only (LSTM/GRU at hidden 128 and 512)")
    parity: dict = field(default=None, metadata={"cli": False})  # export parity overrides, from the preset
    explicit: frozenset = field(init=False, default=frozenset(), metadata={"cli": False})  # preset options given

    def __post_init__(self):
        preset = PRESETS["quick" if self.quick else "full"]
        self.explicit = frozenset(name for name in preset if getattr(self, name) is not None)
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.models, self.out = tuple(Path(p) for p in self.models), Path(self.out)
        checks = {"cells": CELLS, "backends": tuple(BACKENDS), "modes": MODES, "precisions": ("fp32", "fp16")}
        for name, allowed in checks.items():
            bad = [x for x in getattr(self, name) if x not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')}: {', '.join(bad) or 'empty'}; choose from "
                                 f"{', '.join(allowed)}")
        for name in ("hidden_sizes", "batches", "concurrency", "chunk_chars", "coalesce", "refeed_windows", "threads"):
            if any(x < 1 for x in getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        for name in ("server_cpus", "client_cpus"):
            cpus = getattr(self, name)
            if cpus and usable is None:
                raise ValueError(f"--{name.replace('_', '-')}: this system cannot restrict a process's CPUs")
            if cpus and not set(cpus) <= usable:
                raise ValueError(f"--{name.replace('_', '-')}: CPUs {sorted(set(cpus) - usable)} are not among this "
                                 f"process's usable CPUs ({','.join(map(str, sorted(usable)))})")
        if not self.threads or len(set(self.threads)) != len(self.threads):
            raise ValueError("--threads: one or more different thread counts")
        if min(self.max_calls, self.refeed_chars, self.grpc_chars, self.grpc_requests) < 1 or self.seconds <= 0:
            raise ValueError("--max-calls, --refeed-chars, --grpc-chars, --grpc-requests must be >= 1 "
                             "and --seconds > 0")

    def settings(self) -> dict:
        """What the report records of the options (everything but the model list and the output folder)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.name not in ("models", "out", "explicit")}


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    ap = argparse.ArgumentParser(prog="python -m serve.bench", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    for f in fields(BenchConfig):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = {"help": f.metadata["help"], "dest": f.name, "default": argparse.SUPPRESS}
        if f.type == "bool":
            kw["action"] = "store_true"
        elif "nargs" in f.metadata:
            kw.update(nargs=f.metadata["nargs"], type=Path)
        else:
            kw["type"] = f.metadata["parse"] or {"int": int, "float": float, "Path": Path}[str(f.type).split(" ")[0]]
        if isinstance(f.default, tuple) and f.default:
            kw["help"] += f" [{','.join(map(str, f.default))}]"
        elif f.default not in (None, (), False):
            kw["help"] += f" [{f.default}]"
        ap.add_argument(flag, **kw)
    args = ap.parse_args(argv)
    try:
        return BenchConfig(**vars(args))
    except ValueError as e:
        ap.error(str(e))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("export", "serve.backends"):  # per-export parity lines and the like
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    try:
        files = run(cfg, command="python -m serve.bench " + " ".join(argv))
    except BenchError as e:
        logging.getLogger("serve.bench").error("%s", e)
        return 2
    for path in files:
        print(path)
    return 0
