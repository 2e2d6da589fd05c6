"""python -m export --engine onnx|trt|triton --checkpoint PATH [--out DIR]

PATH is a checkpoint directory or a grid run directory (every model in it is exported; one model's
failure is reported without losing the others). Every export is parity-checked against eager
PyTorch before it is marked done in its manifest.json; reruns skip what is up to date.
Exit codes: 0 all done, 1 some export failed (e.g. parity), 2 unusable input or missing TensorRT/GPU.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from export.cli import add_dataclass_options, dataclass_from_args, parity_cells, setup_logging, table
from export.onnx import PRECISIONS, default_out_dir, export_onnx_result
from export.parity import ParityError
from export.tensorrt import EngineBuildError, TensorRTUnavailable, TrtOptions
from export.triton import TritonOptions
from train.checkpoint import CONFIG, CheckpointError, read_config

log = logging.getLogger("export")

ENGINES = ("onnx", "trt", "triton")
DEFAULT_ROOT = {"onnx": Path("exports"), "trt": Path("exports"), "triton": Path("exports/triton")}


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: str = field(default="", metadata={
        "help": "a checkpoint directory, or a grid run directory whose model directories are all exported",
        "required": True, "metavar": "PATH"})
    engine: str = field(default="onnx", metadata={
        "help": "onnx: the step model (runs everywhere); trt: a TensorRT engine beside it (NVIDIA GPU); "
                "triton: a Triton model repository entry", "choices": ENGINES})
    out: str = field(default="", metadata={"metavar": "DIR",
        "help": "root directory of the exports: each model goes to OUT/<model-id>/ (OUT/<model-id>-fp16/ for "
                "fp16); default exports, and for triton exports/triton (the model repository)"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32; fp16 for GPU runtimes (fp16 weights and math, float32 inputs/outputs); int8 for onnxruntime "
                "on CPUs (int8 weights, accepted by held-out loss within 0.01 nats/char of fp32)",
        "choices": PRECISIONS})
    data: str = field(default="", metadata={"metavar": "PATH",
        "help": "int8: the training corpus (file or folder) for the held-out check; default: the one the "
                "checkpoint's config.json names, or CHARRNN_DATA_DIR"})
    force: bool = field(default=False, metadata={"help": "rebuild even when the manifest says it is up to date"})
    json: bool = field(default=False, metadata={"help": "print the results as JSON instead of a table"})
    verbose: bool = field(default=False, metadata={"help": "log each step (parity figures included)"})

    @property
    def root(self) -> Path:
        return Path(self.out) if self.out else DEFAULT_ROOT[self.engine]


def find_checkpoints(path: Path) -> tuple[list[Path], bool]:
    """([checkpoint dirs], is_grid). A checkpoint has config.json; a grid run directory holds checkpoints."""
    if (path / CONFIG).is_file():
        return [path], False
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if (p / CONFIG).is_file())
        if found:
            return found, True
    raise CheckpointError(f"{path}: neither a checkpoint directory (no {CONFIG}) nor a grid run directory "
                          f"(no <model>/{CONFIG} inside)")


def export_one(ckpt_dir: Path, opts: ExportOptions, trt_opts: TrtOptions, triton_opts: TritonOptions) -> dict:
    """Export one checkpoint with the chosen engine; returns the row for the summary."""
    if opts.engine == "triton":
        from export.triton import export_triton

        return export_triton(ckpt_dir, opts.root, opts.precision, triton_opts, force=opts.force,
                             data=opts.data or None)
    out_dir = default_out_dir(ckpt_dir, opts.precision, opts.root)
    if opts.engine == "trt":
        from export.tensorrt import export_trt

        return export_trt(ckpt_dir, out_dir, opts.precision, trt_opts, force=opts.force)
    return export_onnx_result(ckpt_dir, out_dir, opts.precision, force=opts.force, data=opts.data or None)


def run(opts: ExportOptions, trt_opts: TrtOptions, triton_opts: TritonOptions) -> list[dict]:
    ckpts, is_grid = find_checkpoints(Path(opts.checkpoint))
    rows = []
    bar = tqdm(ckpts, desc=f"export {opts.engine}", unit="model", disable=len(ckpts) == 1, file=sys.stderr)
    for ckpt_dir in bar:
        bar.set_postfix_str(ckpt_dir.name)
        row = {"model": ckpt_dir.name, "engine": opts.engine, "precision": opts.precision}
        t0 = time.perf_counter()
        try:
            if is_grid and read_config(ckpt_dir).get("done") is False:
                rows.append({**row, "status": "not trained yet", "message": "config.json says done: false"})
                continue
            result = export_one(ckpt_dir, opts, trt_opts, triton_opts)
        except (CheckpointError, ParityError, EngineBuildError) as e:
            if not is_grid and isinstance(e, CheckpointError):
                raise
            rows.append({**row, "status": "FAILED", "message": str(e)})
            continue
        except Exception as e:  # noqa: BLE001 -- one broken model must not cost the rest of the grid
            if not is_grid:
                raise
            log.debug("export of %s failed", ckpt_dir, exc_info=True)
            rows.append({**row, "status": "FAILED", "message": f"{type(e).__name__}: {e}"})
            continue
        entry = result["manifest"]["exports"][opts.engine]
        rows.append({**row, "model": result["manifest"]["model_id"],
                     "status": "up to date" if result["skipped"] else "exported",
                     "seconds": f"{time.perf_counter() - t0:.1f}", "path": str(result["path"]),
                     "parity": entry.get("parity"), "quality": entry.get("quality"),
                     **parity_cells(entry.get("parity") or entry.get("quality"))})
    return rows


def parse_args(argv: list[str] | None) -> tuple[ExportOptions, TrtOptions, TritonOptions]:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_options(parser, ExportOptions, "export")
    add_dataclass_options(parser, TrtOptions, "TensorRT (--engine trt)")
    add_dataclass_options(parser, TritonOptions, "Triton (--engine triton)")
    args = parser.parse_args(argv)
    if args.engine == "trt" and args.precision == "int8":
        parser.error("--precision int8 is for onnxruntime on CPUs (--engine onnx or triton); TensorRT engines "
                     "are fp32 or fp16")
    try:
        return tuple(dataclass_from_args(cls, args) for cls in (ExportOptions, TrtOptions, TritonOptions))
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    opts, trt_opts, triton_opts = parse_args(argv)
    setup_logging(opts.verbose)
    try:
        if opts.engine == "trt":
            from export.tensorrt import hardware_level, require_tensorrt

            trt = require_tensorrt()  # before any work: say what is missing in one sentence
            if trt_opts.hardware_compatible != "none":
                hardware_level(trt, trt_opts)
        rows = run(opts, trt_opts, triton_opts)
    except (TensorRTUnavailable, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, ["model", "engine", "precision", "status", "max|dlogits|", "greedy", "seconds", "path"]))
        for r in rows:
            if r.get("message"):
                print(f"{r['model']}: {r['message']}", file=sys.stderr)
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
