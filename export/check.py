"""python -m export.check PATH: re-run the parity check of exported models against their checkpoints.

PATH is an exported file (.onnx or .engine), an export directory (its manifest.json names the files
and the source checkpoint), a Triton model directory, or a directory of any of these (e.g. exports/).
The reference is eager PyTorch on the source checkpoint, or on --checkpoint; int8 exports are judged as
they were accepted, by held-out loss within 0.01 nats/char of fp32 (export.quality). --provider runs the ONNX
files on ONNX Runtime's CPU, CUDA or TensorRT execution provider; a provider this machine lacks, or one
onnxruntime lists but does not load, is reported as skipped. On a GPU, TF32 is off for the whole run
(NVIDIA_TF32_OVERRIDE=0), as fp32 parity at 1e-5 needs. Exit codes: 0 every check passed (or was skipped), 1 some check failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from export import manifest
from export.cli import parity_cells, setup_logging, table
from export.parity import ParityError, ParitySpec, check_parity, summary
from export.runtime import OrtRuntime, ProviderUnavailable, TorchRuntime, fp32_math, read_onnx_metadata
from train.checkpoint import WEIGHTS, CheckpointError, sha256_file

log = logging.getLogger("export.check")

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    # TF32 off: on Ampere+ GPUs it rounds fp32 matmuls to 10 mantissa bits, far outside 1e-5. use_tf32 covers
    # the CUDA provider's cuBLAS; NVIDIA_TF32_OVERRIDE=0 (fp32_math) covers cuDNN's RNN and TensorRT too.
    "cuda": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
    # a bare name: OrtRuntime gives it explicit decode and prefill profiles
    "tensorrt": ["TensorrtExecutionProvider", ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
}


class Skip(Exception):
    """This check cannot run on this machine (missing provider, TensorRT or GPU)."""


def find_targets(path: Path) -> list[tuple[Path, Path | None]]:
    """[(artifact file, its manifest directory or None)] under PATH."""
    if path.is_file():
        for mdir in (path.parent, path.parent.parent):  # export dir, or Triton's <model>/1/model.onnx
            m = manifest.read_manifest(mdir)
            if m and any((mdir / e["file"]).resolve() == path.resolve() for e in m.get("exports", {}).values()):
                return [(path, mdir)]
        return [(path, None)]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    m = manifest.read_manifest(path)
    if m:
        return [(f, path) for f in dict.fromkeys(path / e["file"] for e in m["exports"].values())]
    targets = [t for sub in sorted(p for p in path.iterdir() if p.is_dir()) for t in _quiet_targets(sub)]
    if not targets:
        raise CheckpointError(f"{path}: no exported models found (no manifest.json, .onnx or .engine)")
    return targets


def _quiet_targets(path: Path) -> list:
    if manifest.read_manifest(path) is None and not any(path.glob("*/manifest.json")):
        return []
    return find_targets(path)


def runtime_for(path: Path, provider: str):
    if path.suffix == ".engine":
        from export.tensorrt import TensorRTRuntime, TensorRTUnavailable

        try:
            return TensorRTRuntime(path)
        except TensorRTUnavailable as e:
            raise Skip(str(e)) from None
    return ort_runtime(path, provider)


def ort_runtime(path: Path, provider: str) -> OrtRuntime:
    """OrtRuntime on `provider` (cpu, cuda, tensorrt); Skip when this onnxruntime lacks it or does not load it
    (it lists CUDA and TensorRT whenever its GPU build is installed, and falls back quietly at run time)."""
    import onnxruntime as ort

    providers = PROVIDERS[provider]
    names = [p if isinstance(p, str) else p[0] for p in providers]
    if names[0] not in ort.get_available_providers():
        raise Skip(f"{names[0]} is not available in this onnxruntime ({', '.join(ort.get_available_providers())})")
    try:
        try:
            return OrtRuntime(path, providers=providers, strict=True)
        except ProviderUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 -- an onnxruntime without the use_tf32 option: run with its defaults
            log.warning("%s with %s failed (%s); retrying without provider options", path, provider, e)
            return OrtRuntime(path, providers=names, strict=True)
    except ProviderUnavailable as e:
        raise Skip(str(e)) from None


def check_one(path: Path, mdir: Path | None, provider: str, checkpoint: Path | None,
              data: Path | None = None) -> dict:
    onnx_meta = path if path.suffix == ".onnx" else path.with_name("model.onnx")
    meta = read_onnx_metadata(onnx_meta)
    row = {"model": meta["model_id"], "file": str(path), "precision": meta.get("precision", "fp32"),
           "provider": "tensorrt-engine" if path.suffix == ".engine" else provider}
    source = checkpoint or (Path(manifest.read_manifest(mdir)["source"]["checkpoint"]) if mdir else None)
    if source is None:
        raise CheckpointError(f"{path}: no manifest.json names its checkpoint; pass --checkpoint")
    if (source / WEIGHTS).is_file() and sha256_file(source / WEIGHTS) != meta["checkpoint_sha256"]:
        row["note"] = f"exported from other weights than {source}"
    try:
        candidate = runtime_for(path, provider)
    except Skip as e:
        return {**row, "status": "skipped", "note": str(e)}
    if row["precision"] == "int8":  # approximate: judged by held-out loss, as the export was
        from export.quality import check_quality, summary as quality_summary
        from train.checkpoint import load_checkpoint

        report = check_quality(load_checkpoint(source), candidate, data)
        log.info("%s: %s", row["model"], quality_summary(report))
        return {**row, "status": "passed" if report["passed"] else "FAILED", "quality": report,
                **parity_cells(report)}
    report = check_parity(TorchRuntime(source), candidate, ParitySpec.for_precision(row["precision"]))
    log.info("%s: %s", row["model"], summary(report))
    return {**row, "status": "passed" if report["passed"] else "FAILED", "parity": report, **parity_cells(report)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.check", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, metavar="PATH",
                        help="exported file, export directory, or a directory of them")
    parser.add_argument("--checkpoint", type=Path, help="reference checkpoint (default: the one the manifest names)")
    parser.add_argument("--data", type=Path, metavar="PATH",
                        help="int8 exports: the training corpus for the held-out check (default: as exporting found it)")
    parser.add_argument("--provider", choices=PROVIDERS, default="cpu",
                        help="ONNX Runtime execution provider (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--verbose", action="store_true", help="log each check")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    rows = []
    try:
        targets = find_targets(args.path)
        if (args.provider != "cpu" or any(p.suffix == ".engine" for p, _ in targets)) and not fp32_math():
            log.warning("NVIDIA_TF32_OVERRIDE=%s: fp32 parity at 1e-5 may fail with TF32 on",
                        os.environ["NVIDIA_TF32_OVERRIDE"])
        for path, mdir in targets:
            try:
                rows.append(check_one(path, mdir, args.provider, args.checkpoint, args.data))
            except (ParityError, CheckpointError, ValueError) as e:
                if len(targets) == 1 and not isinstance(e, ParityError):
                    raise
                rows.append({"model": path.parent.name, "file": str(path), "status": "FAILED", "note": str(e)})
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, ["model", "precision", "provider", "status", "max|dlogits|", "greedy", "file"]))
        for r in rows:
            if r.get("note"):
                print(f"{r['model']}: {r['note']}", file=sys.stderr)
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
