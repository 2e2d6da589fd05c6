#!/usr/bin/env bash
# The one prepared check for a machine with an NVIDIA GPU: everything CI cannot run, in one command and one table.
#
#   bash scripts/gpu_check.sh       (HIDDEN=256 CELLS="rnn lstm gru" QUICK=1 KEEP=1 to keep the files)
#
# For one random-weight model per cell (hidden size HIDDEN, fc 2), in fp32 and fp16:
#   export the ONNX step model (parity on the CPU), re-run parity on onnxruntime's CUDA provider (state in
#   device memory through IOBinding, and once with numpy state for comparison) and TensorRT provider (explicit
#   decode/prefill profiles), build a native TensorRT engine (strongly typed) with its parity check, and time
#   one decode step at B=1 and B=64 and one 256-character prefill on each runtime.
# Then, in fp32: eager PyTorch on the GPU and CUDA graphs (serve.bench) against the CPU reference, the GPU
# tests of the test suite, and AMP training of one quick model on the GPU (loss must fall).
#
# TF32 is off for the whole run (NVIDIA_TF32_OVERRIDE=0): fp32 parity is at 1e-5, and fp32 timings are
# without TF32. Whatever this machine lacks (onnxruntime-gpu, TensorRT) is listed as skipped with the reason.
# Exit 0: every check passed (or was skipped); 1: some check failed; 2: no CUDA GPU visible, nothing GPU ran.
#
# Setup: pip install -e '.[export,trt,dev]' with a CUDA 12 build of torch, and onnxruntime-gpu in place of
# onnxruntime (pip uninstall -y onnxruntime; pip install -e '.[trt]'): both install the `onnxruntime` module.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d "${TMPDIR:-/tmp}/charrnn-gpu-check.XXXXXX")
if [[ -z "${KEEP:-}" ]]; then trap 'rm -rf "$WORK"' EXIT; else echo "files kept in $WORK"; fi
export NVIDIA_TF32_OVERRIDE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 - "$WORK" <<'EOF'
import logging, math, os, subprocess, sys, time, traceback
from pathlib import Path

import numpy as np
import torch

from export.check import Skip, ort_runtime
from export.cli import table
from export.onnx import export_onnx_result
from export.parity import ParitySpec, check_parity
from export.runtime import OrtRuntime, TorchRuntime
from export.tensorrt import TensorRTUnavailable, require_tensorrt
from train.checkpoint import write_checkpoint
from train.model import CharRNN, ModelConfig, model_id
from train.vocab import Vocab

logging.basicConfig(level=logging.WARNING)
work = Path(sys.argv[1])
hidden, cells = int(os.environ.get("HIDDEN", 256)), os.environ.get("CELLS", "rnn lstm gru").split()
quick = dict(batches=(1, 8), prefills=(1, 64), steps=50) if os.environ.get("QUICK") else {}
vocab = Vocab.from_text("".join(map(chr, range(32, 97))) + "\n")  # 66 symbols, like tiny Shakespeare's 65
gpu = torch.cuda.is_available()
no_gpu = f"no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is False)"
rows = []


def spec(precision: str) -> ParitySpec:
    return ParitySpec.for_precision(precision, **quick)


def timed_us(rt, tokens, n: int) -> str:
    state = rt.new_state(tokens.shape[0])
    for _ in range(5):
        rt.step(tokens, state)
    t0 = time.perf_counter()
    for _ in range(n):
        _, new = rt.step(tokens, state)
    return f"{(time.perf_counter() - t0) / n * 1e6:.0f}"


def row(mid, precision, runtime, report=None, rt=None, status=None, note="", build=""):
    r = {"model": mid, "precision": precision, "runtime": runtime, "build s": build, "note": note,
         "status": status or ("passed" if report["passed"] else "FAILED")}
    if report:
        r.update({"max|dlogits|": f"{report['max_abs_logits']:.1e}", "tol": f"{report['spec']['tol']:g}",
                  "greedy": "identical" if report["greedy_identical"] else "DIVERGED"})
    if rt is not None and r["status"] in ("passed", "-"):
        r.update({"step us B=1": timed_us(rt, np.zeros((1, 1), np.int64), 200),
                  "step us B=64": timed_us(rt, np.zeros((64, 1), np.int64), 200),
                  "prefill us T=256": timed_us(rt, np.zeros((1, 256), np.int64), 20)})
    rows.append(r)
    print(f"{r['status']:>8}  {mid} {precision} {runtime} {note}", file=sys.stderr, flush=True)


def attempt(mid, precision, runtime, fn):
    """Run one check; an exception is a FAILED row (skips are Skip or TensorRTUnavailable)."""
    try:
        fn()
    except (Skip, TensorRTUnavailable) as e:
        row(mid, precision, runtime, status="skipped", note=str(e))
    except Exception as e:  # noqa: BLE001 -- report it and go on with the other checks
        traceback.print_exc()
        row(mid, precision, runtime, status="FAILED", note=f"{type(e).__name__}: {e}")


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
    row(mid, "fp32", "torch cpu (reference)", status="-", rt=ref)

    def eager_cuda():
        if not gpu:
            raise Skip(no_gpu)
        rt = TorchRuntime(ckpt, device="cuda")
        row(mid, "fp32", "torch cuda (eager)", check_parity(ref, rt, spec("fp32")), rt)

    def cuda_graphs():
        if not gpu:
            raise Skip(no_gpu)
        from serve.bench.backends import CudaGraphRuntime
        rt = CudaGraphRuntime(ckpt)
        row(mid, "fp32", "torch cuda graphs", check_parity(ref, rt, spec("fp32")), rt)

    attempt(mid, "fp32", "torch cuda (eager)", eager_cuda)
    attempt(mid, "fp32", "torch cuda graphs", cuda_graphs)
    for precision in ("fp32", "fp16"):
        out = work / "exports" / (mid if precision == "fp32" else f"{mid}-fp16")

        def onnx_cpu():
            result = export_onnx_result(ckpt, out, precision, parity=spec(precision))
            row(mid, precision, "onnxruntime cpu", result["manifest"]["exports"]["onnx"]["parity"],
                ort_runtime(result["path"], "cpu"))

        attempt(mid, precision, "onnxruntime cpu", onnx_cpu)
        onnx_path = out / "model.onnx"
        if not onnx_path.is_file():
            continue
        for provider in ("cuda", "tensorrt"):
            def ort_gpu(provider=provider):
                rt = ort_runtime(onnx_path, provider)  # Skip unless the session runs on it
                note = f"{','.join(rt.providers[:2])}; state {'on the device' if rt.bind else 'in numpy'}"
                row(mid, precision, f"onnxruntime {provider}", check_parity(ref, rt, spec(precision)), rt, note=note)
                if provider == "cuda":  # the same session without IOBinding: what keeping state on the device saves
                    plain = OrtRuntime(onnx_path, rt.providers, bind=False, strict=True)
                    row(mid, precision, "onnxruntime cuda, numpy state", status="-", rt=plain)

            attempt(mid, precision, f"onnxruntime {provider}", ort_gpu)

        def engine():
            if trt is None:
                raise TensorRTUnavailable(trt_missing)
            from export.tensorrt import TensorRTRuntime, export_trt
            entry = export_trt(ckpt, out, precision, force=True, parity=spec(precision))["manifest"]["exports"]["trt"]
            row(mid, precision, "tensorrt engine", entry["parity"], TensorRTRuntime(out / "model.engine"),
                build=f"{entry['build_seconds']:.1f}", note=f"TensorRT {entry['tensorrt']}, {entry['network']}")

        attempt(mid, precision, "tensorrt engine", engine)


def gpu_tests():
    if not gpu:
        raise Skip(no_gpu)
    tests = ["tests/test_export_tensorrt.py", "tests/test_bench.py::test_cuda_graph_steps_match_eager_pytorch"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests],
                          capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    print(done.stdout[-3000:], done.stderr[-2000:], file=sys.stderr)
    row("tests", "-", "pytest: TensorRT, CUDA graphs", status="passed" if done.returncode == 0 else "FAILED",
        note=summary)


def amp_training():
    if not gpu:
        raise Skip(no_gpu)
    from train.trainer import Job, TrainConfig, _amp, train_one
    corpus = work / "corpus.txt"
    data = Path(os.environ.get("CHARRNN_DATA_DIR", "")) / "tinyshakespeare.txt"
    corpus.write_text(data.read_text()[:200_000] if data.is_file() else "the cat sat on the mat. " * 8000)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, evals_per_epoch=2, patience=0, device="cuda")
    job = Job("amp-lstm-h128", "tinyshakespeare", str(corpus), "lstm", 50, 128, 1, cfg, str(work / "train"))
    t0 = time.perf_counter()
    m = train_one(job, quiet=True)["metrics"]
    dtype, _ = _amp(torch.device("cuda"))
    uniform = math.log(len(set(corpus.read_text())))
    ok = math.isfinite(m["val_loss"]) and m["val_loss"] < 0.8 * uniform
    row("amp-lstm-h128", str(dtype).replace("torch.", ""), "training, AMP on cuda", status="passed" if ok else "FAILED",
        build=f"{time.perf_counter() - t0:.1f}",
        note=f"held-out loss {m['val_loss']:.3f} nats/char (uniform {uniform:.2f}), {m['chars_per_s']:.0f} chars/s")


attempt("tests", "-", "pytest: TensorRT, CUDA graphs", gpu_tests)
attempt("amp-lstm-h128", "-", "training, AMP on cuda", amp_training)

import onnxruntime as ort
name = torch.cuda.get_device_name(0) if gpu else no_gpu
print(f"\ntorch {torch.__version__}, onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}), "
      f"TensorRT {trt.__version__ if trt else 'not usable'}; GPU: {name}; hidden {hidden}, fc 2, V {len(vocab)}; "
      f"TF32 off (NVIDIA_TF32_OVERRIDE={os.environ.get('NVIDIA_TF32_OVERRIDE')}); {time.strftime('%Y-%m-%d %H:%M')}")
print(table(rows, ["model", "precision", "runtime", "status", "max|dlogits|", "tol", "greedy", "build s",
                   "step us B=1", "step us B=64", "prefill us T=256", "note"]))
skipped = {}
for r in rows:
    if r["status"] == "skipped":
        skipped.setdefault(r["note"], set()).add(r["runtime"])
    elif r["status"] == "FAILED":
        print(f"FAILED: {r['model']} {r['precision']} {r['runtime']}: {r['note']}")
for note, runtimes in skipped.items():
    print(f"skipped {', '.join(sorted(runtimes))}: {note}")
count = lambda status: sum(r["status"] == status for r in rows)  # noqa: E731
failed = count("FAILED")
print(f"{failed} failed, {count('passed')} passed, {count('skipped')} skipped" + ("" if gpu else f"; exit 2: {no_gpu}"))
sys.exit(1 if failed else 0 if gpu else 2)
EOF
