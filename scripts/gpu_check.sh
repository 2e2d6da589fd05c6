#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: the export checks CI cannot run.
#
#   bash scripts/gpu_check.sh            (HIDDEN=256 CELLS="rnn lstm gru" KEEP=1 to keep the files)
#
# For one random-weight model per cell (hidden size HIDDEN, fc 2): export fp32 and fp16 ONNX (parity
# on the CPU), re-run parity on ONNX Runtime's CUDA and TensorRT execution providers, build native
# TensorRT engines (fp32 and fp16) with their parity check when `tensorrt` is importable, time one
# decode step at B=1 and B=64 on each runtime, and print one table. Whatever this machine lacks
# (GPU, onnxruntime-gpu, TensorRT) is listed as skipped with the reason. Exit 1 if any check failed.
#
# GPU setup: pip install -e '.[export,trt]' with a CUDA build of torch, and onnxruntime-gpu in place
# of onnxruntime (pip uninstall -y onnxruntime && pip install onnxruntime-gpu): both install the same
# `onnxruntime` module.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d "${TMPDIR:-/tmp}/charrnn-gpu-check.XXXXXX")
if [[ -z "${KEEP:-}" ]]; then trap 'rm -rf "$WORK"' EXIT; else echo "files kept in $WORK"; fi

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python - "$WORK" <<'EOF'
import logging, os, sys, time
from pathlib import Path

import numpy as np
import torch

from export.check import Skip, ort_runtime
from export.cli import table
from export.onnx import export_onnx_result
from export.parity import ParitySpec, check_parity
from export.runtime import TorchRuntime
from export.tensorrt import TensorRTUnavailable, require_tensorrt
from train.checkpoint import write_checkpoint
from train.model import CharRNN, ModelConfig, model_id
from train.vocab import Vocab

logging.basicConfig(level=logging.WARNING)
work = Path(sys.argv[1])
hidden, cells = int(os.environ.get("HIDDEN", 256)), os.environ.get("CELLS", "rnn lstm gru").split()
vocab = Vocab.from_text("".join(map(chr, range(32, 97))) + "\n")  # 66 symbols, like tiny Shakespeare's 65
rows = []


def step_us(rt, batch: int, n: int = 200) -> str:
    state = rt.new_state(batch)
    tokens = np.zeros((batch, 1), np.int64)
    for _ in range(10):
        _, state = rt.step(tokens, state)
    t0 = time.perf_counter()
    for _ in range(n):
        _, state = rt.step(tokens, state)
    return f"{(time.perf_counter() - t0) / n * 1e6:.0f}"


def row(mid, precision, runtime, report=None, rt=None, status=None, note="", build=""):
    r = {"model": mid, "precision": precision, "runtime": runtime, "build s": build, "note": note,
         "status": status or ("passed" if report["passed"] else "FAILED")}
    if report:
        r.update({"max|dlogits|": f"{report['max_abs_logits']:.1e}", "tol": f"{report['spec']['tol']:g}",
                  "greedy": "identical" if report["greedy_identical"] else "DIVERGED"})
    if rt is not None and r["status"] == "passed":
        r.update({"step us B=1": step_us(rt, 1), "step us B=64": step_us(rt, 64)})
    rows.append(r)


try:
    trt = require_tensorrt()
    trt_missing = ""
except TensorRTUnavailable as e:
    trt, trt_missing = None, str(e)

for i, cell in enumerate(cells):
    torch.manual_seed(i)
    mid = model_id(cell, hidden, 2, 20)
    ckpt = work / "runs" / mid
    write_checkpoint(ckpt, CharRNN(ModelConfig(cell, len(vocab), hidden, 2)), vocab, mid, done=True)
    ref = TorchRuntime(ckpt)
    row(mid, "fp32", "torch cpu (reference)", status="-", rt=None)
    rows[-1].update({"step us B=1": step_us(ref, 1), "step us B=64": step_us(ref, 64)})
    for precision in ("fp32", "fp16"):
        out = work / "exports" / (mid if precision == "fp32" else f"{mid}-fp16")
        result = export_onnx_result(ckpt, out, precision)
        onnx_path = result["path"]
        row(mid, precision, "onnxruntime cpu", result["manifest"]["exports"]["onnx"]["parity"],
            ort_runtime(onnx_path, "cpu"))
        for provider in ("cuda", "tensorrt"):
            try:
                rt = ort_runtime(onnx_path, provider)
            except Skip as e:
                row(mid, precision, f"onnxruntime {provider}", status="skipped", note=str(e))
                continue
            report = check_parity(ref, rt, ParitySpec.for_precision(precision))
            row(mid, precision, f"onnxruntime {provider}", report, rt, note=",".join(rt.providers))
        if trt is None:
            row(mid, precision, "tensorrt engine", status="skipped", note=trt_missing)
            continue
        from export.tensorrt import TensorRTRuntime, export_trt

        try:
            entry = export_trt(ckpt, out, precision, force=True)["manifest"]["exports"]["trt"]
        except Exception as e:  # noqa: BLE001 -- report and go on with the other models
            row(mid, precision, "tensorrt engine", status="FAILED", note=f"{type(e).__name__}: {e}")
            continue
        row(mid, precision, "tensorrt engine", entry["parity"], TensorRTRuntime(out / "model.engine"),
            build=f"{entry['build_seconds']:.1f}", note=f"TensorRT {entry['tensorrt']}, {entry['gpu']}")

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch"
import onnxruntime as ort
print(f"torch {torch.__version__}, onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}), "
      f"TensorRT {trt.__version__ if trt else 'not usable'}, GPU: {gpu}; hidden {hidden}, fc 2, V {len(vocab)}")
print(table(rows, ["model", "precision", "runtime", "status", "max|dlogits|", "tol", "greedy", "build s",
                   "step us B=1", "step us B=64"]))
skipped = {}
for r in rows:
    if r["status"] == "skipped":
        skipped.setdefault(r["note"], set()).add(r["runtime"])
    elif r["status"] == "FAILED":
        print(f"FAILED: {r['model']} {r['precision']} {r['runtime']}: {r['note']}")
for note, runtimes in skipped.items():
    print(f"skipped {', '.join(sorted(runtimes))}: {note}")
sys.exit(1 if any(r["status"] == "FAILED" for r in rows) else 0)
EOF
