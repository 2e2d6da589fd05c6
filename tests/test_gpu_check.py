"""scripts/gpu_check.sh, the one prepared GPU check, run here without a GPU: it must still run every check it
can (the CPU rows), list each GPU check as skipped with the reason, print its table and exit 2 (nothing GPU ran)."""
import os
import subprocess

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real: run it by hand")
def test_gpu_check_without_a_gpu_skips_with_reasons_and_exits_2():
    env = {**os.environ, "HIDDEN": "16", "CELLS": "lstm", "QUICK": "1"}
    env.pop("NVIDIA_TF32_OVERRIDE", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=300)
    out = done.stdout
    assert done.returncode == 2, done.stderr[-3000:]
    assert "TF32 off (NVIDIA_TF32_OVERRIDE=0)" in out and "step us B=64" in out and "prefill us T=256" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("lstm-h16-fc2-s20")]
    status = {" ".join(r[1:r.index(s)]): s for r in rows for s in r if s in ("passed", "FAILED", "skipped", "-")}
    assert status["fp32 onnxruntime cpu"] == status["fp16 onnxruntime cpu"] == "passed"
    for runtime in ("torch cuda graphs", "onnxruntime cuda", "onnxruntime tensorrt", "tensorrt engine"):
        assert status[f"fp32 {runtime}"] == "skipped", runtime
    assert "skipped pytest: TensorRT, CUDA graphs, torch cuda (eager), torch cuda graphs, training, AMP on cuda" in out
    assert "0 failed" in out and "Traceback" not in done.stderr
