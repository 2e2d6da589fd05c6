"""manifest.json: what an export directory holds, where it came from, and whether it is done.

One manifest per export directory (`exports/<model-id>/`). It names the source checkpoint (path and the
sha256 of its weights), the vocabulary and model config, and one entry per engine built there
(`onnx`, `trt`, `triton`) with its file, precision, options, tool versions and parity figures. An entry
is written only after its parity check passed, so "the entry exists and its file matches" is what
"done" means; `is_up_to_date` is the rerun test.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import time
from pathlib import Path

from train.checkpoint import WEIGHTS, Checkpoint, atomic_write, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "charrnn-export/1"
EXPORTER_VERSION = 2  # 2: the head runs on the last position only; bump when the exported graph changes, so reruns rebuild instead of skipping


def publish_if_parity(ckpt: Checkpoint, candidate: Path, path: Path, runtime, spec) -> dict:
    """Check `runtime` (running `candidate`) against eager PyTorch; only if it passes does the candidate
    take its real name. Returns the parity report; a failure is a ParityError and nothing is written."""
    from export.parity import ParityError, check_parity, summary
    from export.runtime import TorchRuntime

    return _publish_if(ckpt, candidate, path, check_parity(TorchRuntime(ckpt.path), runtime, spec), summary,
                       ParityError)


def publish_if_quality(ckpt: Checkpoint, candidate: Path, path: Path, runtime, data=None) -> dict:
    """publish_if_parity for approximate exports (int8): accepted by held-out loss (export.quality)."""
    from export.quality import QualityError, check_quality, summary

    return _publish_if(ckpt, candidate, path, check_quality(ckpt, runtime, data), summary, QualityError)


def _publish_if(ckpt: Checkpoint, candidate: Path, path: Path, report: dict, summary, error) -> dict:
    log.info("%s: %s", ckpt.model_id, summary(report))
    if not report["passed"]:
        raise error(f"{ckpt.model_id}: {summary(report)}; {path.name} was not written")
    publish(candidate)
    os.replace(candidate, path)
    return report


def publish(path: Path, data: bytes | str | None = None) -> None:
    """Write atomically (when data is given) and make the file world-readable like any shared artifact:
    a candidate written by another library may be private, and Triton or a server may run as another user."""
    if data is not None:
        atomic_write(path, data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o644 & ~umask)


def export_name(model_id: str, precision: str) -> str:
    """The id an export is served under: the checkpoint's, plus -fp16 for fp16 (both can be served side by side)."""
    return model_id if precision == "fp32" else f"{model_id}-{precision}"


def tool_versions(*extra: str) -> dict:
    """Versions of the tools that shaped an artifact (absent packages are left out)."""
    versions = {"python": platform.python_version()}
    for dist in ("charrnn", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", *extra):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def source_of(ckpt: Checkpoint) -> dict:
    """The source checkpoint as the manifest and the ONNX metadata name it."""
    return {"checkpoint": str(Path(ckpt.path).resolve()), "checkpoint_sha256": sha256_file(ckpt.path / WEIGHTS)}


def read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_up_to_date(out_dir: Path, engine: str, source: dict, options: dict) -> bool:
    """True when `engine`'s entry was built from this source with these options and its file is intact."""
    manifest = read_manifest(out_dir)
    if not manifest or manifest.get("source", {}).get("checkpoint_sha256") != source["checkpoint_sha256"]:
        return False
    entry = manifest.get("exports", {}).get(engine)
    if not entry or entry.get("options") != options or entry.get("exporter_version") != EXPORTER_VERSION:
        return False
    artifact = Path(out_dir) / entry["file"]
    return artifact.is_file() and sha256_file(artifact) == entry.get("sha256")


def record_export(out_dir: Path, ckpt: Checkpoint, source: dict, engine: str, entry: dict) -> dict:
    """Add or replace one engine's entry. A manifest of another source is started afresh (its entries are stale)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest or manifest.get("source", {}).get("checkpoint_sha256") != source["checkpoint_sha256"]:
        manifest = {"format": FORMAT, "model_id": export_name(ckpt.model_id, entry["precision"]), "source": source,
                    "model": ckpt.model.cfg.to_dict(), "vocab": ckpt.vocab.chars,
                    "corpus": ckpt.config.get("corpus"), "exports": {}}
    manifest["source"] = source  # the same weights may have moved
    artifact = out_dir / entry["file"]
    manifest["exports"][engine] = {
        "engine": engine, **entry, "sha256": sha256_file(artifact), "bytes": artifact.stat().st_size,
        "exporter_version": EXPORTER_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    publish(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest



def annotate(out_dir: Path, engine: str, **fields) -> None:
    """Add fields to an existing entry (e.g. the Triton config options beside its ONNX file)."""
    manifest = read_manifest(out_dir)
    entry = (manifest or {}).get("exports", {}).get(engine)
    if entry is not None and any(entry.get(k) != v for k, v in fields.items()):
        entry.update(fields)
        publish(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
