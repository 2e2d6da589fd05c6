"""Checkpoint -> ONNX step model (DESIGN.md, "Exported step model"), parity-checked before it counts.

    tokens int64 (B, T), h_in (B, H)[, c_in (B, H)]  ->  logits (B, V) at the last position, h_out[, c_out]

B and T are symbolic; state is batch-first. The graph comes from the legacy TorchScript exporter
(`dynamo=False`): measured with torch 2.13 it emits one native RNN/LSTM/GRU op with symbolic B and T
in ~0.1 s, while `dynamo=True` took ~3 s, forced opset 18, and unrolled `nn.RNN` with T frozen to the
trace length. The checks after export (`check_graph`) guard against exactly those regressions.

fp16 models keep float32 inputs and outputs (Cast nodes at the edges) so the state every runtime
carries, and Triton's implicit state, stay float32; weights and arithmetic are fp16 inside.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from export import manifest
from export.parity import ParityError, ParitySpec
from export.runtime import META_KEYS, OrtRuntime
from train.checkpoint import Checkpoint, atomic_write, load_checkpoint, read_config
from train.model import CharRNN

log = logging.getLogger(__name__)

OPSET = 17
PRECISIONS = ("fp32", "fp16", "int8")
STATE_IN, STATE_OUT = ("h_in", "c_in"), ("h_out", "c_out")
FILE = "model.onnx"


class StepModel(nn.Module):
    """CharRNN as the exported step: last-position logits and the new state, float32 at the edges.

    The same layers as CharRNN.forward, except that the head runs on the last position only: a prefill of
    T tokens makes one head matmul per layer instead of T (parity checks it against CharRNN)."""

    def __init__(self, model: CharRNN, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
        m = self.model
        if self.dtype != torch.float32:
            state = tuple(s.to(self.dtype) for s in state)
        x = m.embed(tokens)  # (B, T, H)
        hx = tuple(s.unsqueeze(0).contiguous() for s in state)  # (1, B, H): nn.RNN's layout
        y, hx = m.rnn(x, hx if m.cfg.cell == "lstm" else hx[0])  # y (B, T, H)
        hx = hx if isinstance(hx, tuple) else (hx,)
        # Slice (negative start) + Flatten: squeeze(1) exports as an If on T's size, Gather(-1) as a negative index
        logits = m.head(y[:, -1:].flatten(1))  # (B, V)
        out = (logits, *(s.squeeze(0) for s in hx))  # (B, V), (B, H) ...
        return tuple(t.float() for t in out) if self.dtype != torch.float32 else out


def fold_embedding(model: CharRNN) -> CharRNN:
    """The same function with the embedding folded into the recurrent layer's input weights, when the
    vocabulary is smaller than the hidden size: embedding E (V, H) and input weights W (G*H, H) become a
    one-hot lookup (eye(V)) and W @ E^T (G*H, V), computed in float64. The graph keeps its native
    RNN/LSTM/GRU op and symbolic T, and a step reads G*H*V input weights instead of G*H*H (LSTM h512,
    V = 65: 8.4 MiB of weights per step become 4.9) and does that much less arithmetic at any batch."""
    cfg = model.cfg
    V, H = cfg.vocab_size, cfg.hidden_size
    rnn = model.rnn
    folded = type(rnn)(V, H, batch_first=True)
    with torch.no_grad():
        folded.weight_ih_l0.copy_(rnn.weight_ih_l0.double() @ model.embed.weight.double().T)
        for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(folded, name).copy_(getattr(rnn, name))
        embed = nn.Embedding(V, V)
        embed.weight.copy_(torch.eye(V))
    model.embed, model.rnn = embed, folded
    return model


def folds(cfg) -> bool:
    """Whether the export folds the embedding into the input weights (a smaller vocabulary than hidden size)."""
    return cfg.vocab_size < cfg.hidden_size


def io_names(num_states: int) -> tuple[list[str], list[str]]:
    return ["tokens", *STATE_IN[:num_states]], ["logits", *STATE_OUT[:num_states]]


def default_out_dir(ckpt_dir: Path, precision: str = "fp32", root: Path = Path("exports")) -> Path:
    """exports/<model-id>/ (fp16: exports/<model-id>-fp16/)."""
    return Path(root) / manifest.export_name(read_config(ckpt_dir)["model_id"], precision)


def build_onnx(ckpt: Checkpoint, path: Path, precision: str = "fp32", opset: int = OPSET,
               checkpoint_sha256: str = "") -> None:
    """Trace the step model to `path` (atomically), stamp the metadata and check the graph."""
    if precision == "int8":
        from export.int8 import build_int8

        proto = build_int8(ckpt, trace_step(ckpt, "fp32", opset))
        stamp(proto, ckpt, precision, checkpoint_sha256)
        check_io(proto, ckpt.model.cfg.num_states)
    else:
        proto = trace_step(ckpt, precision, opset)
        stamp(proto, ckpt, precision, checkpoint_sha256)
        check_graph(proto, ckpt.model.cfg.num_states, ckpt.model.cfg.cell)
    atomic_write(path, proto.SerializeToString())


def trace_step(ckpt: Checkpoint, precision: str = "fp32", opset: int = OPSET):
    """The step model as an ONNX ModelProto (fp32 or fp16), traced by the legacy exporter."""
    import onnx

    cfg = ckpt.model.cfg
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    model = CharRNN(cfg).eval()
    model.load_state_dict(ckpt.model.state_dict())  # a private copy: StepModel casts it
    if folds(cfg):
        fold_embedding(model)
    step = StepModel(model, dtype).eval()
    inputs, outputs = io_names(cfg.num_states)
    args = (torch.zeros(2, 3, dtype=torch.int64), *model.zero_state(2, dtype=torch.float32))  # B, T != 1
    axes = {"tokens": {0: "B", 1: "T"}, **{n: {0: "B"} for n in inputs[1:] + outputs}}
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer notes
            warnings.simplefilter("ignore")
            torch.onnx.export(step, args, f"{tmp}/step.onnx", input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
        return onnx.load(f"{tmp}/step.onnx")


def stamp(proto, ckpt: Checkpoint, precision: str, checkpoint_sha256: str) -> None:
    """The metadata every step model carries (DESIGN.md), and a doc string."""
    cfg = ckpt.model.cfg
    meta = {"model_id": manifest.export_name(ckpt.model_id, precision), "cell": cfg.cell,
            "hidden_size": str(cfg.hidden_size), "fc_layers": str(cfg.fc_layers),
            "vocab": json.dumps(ckpt.vocab.chars),  # a JSON string: vocabularies hold newlines
            "checkpoint_sha256": checkpoint_sha256,  # sha256 of the checkpoint's model.safetensors
            "vocab_size": str(cfg.vocab_size), "precision": precision, "format": "charrnn-step/1"}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"charrnn step model {ckpt.model_id} ({precision}): tokens [B, T] + state [B, H] -> "
                        "last-position logits [B, V] + new state")


def check_graph(proto, num_states: int, cell: str) -> None:
    """The contract of DESIGN.md, asserted on the written graph: names, symbolic B and T, one native recurrent op."""
    import onnx

    onnx.checker.check_model(proto, full_check=True)
    check_io(proto, num_states)
    recurrent = [n.op_type for n in proto.graph.node if n.op_type in ("RNN", "LSTM", "GRU")]
    if recurrent != [cell.upper()]:
        raise ParityError(f"exported graph has recurrent ops {recurrent}, expected one native {cell.upper()}")


def check_io(proto, num_states: int) -> None:
    """Names, symbolic B and T, metadata: what every runtime relies on, whatever the graph inside."""
    inputs, outputs = io_names(num_states)
    got = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if got != (inputs, outputs):
        raise ParityError(f"exported graph has inputs/outputs {got}, expected {(inputs, outputs)}")
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        symbolic = [0, 1] if value.name == "tokens" else [0]
        frozen = [i for i in symbolic if not dims[i].dim_param or dims[i].HasField("dim_value")]
        if frozen:
            raise ParityError(f"exported graph froze dims {frozen} of {value.name!r}; B and T must be symbolic")
    if not {p.key for p in proto.metadata_props} >= set(META_KEYS):
        raise ParityError("exported graph lacks metadata keys")


def export_onnx(ckpt_dir: Path, out_dir: Path | None = None, precision: str = "fp32", *, opset: int = OPSET,
                force: bool = False, parity: ParitySpec | None = None, file: str = FILE,
                manifest_dir: Path | None = None, engine: str = "onnx", data: Path | None = None,
                judge: bool = True) -> Path:
    """Export, check parity against eager PyTorch, and only then mark the export done. Returns the .onnx path.

    Skips the work when the manifest says this checkpoint was already exported with these options
    (unless `force`). A failed parity check raises ParityError and leaves any earlier good export intact.
    Errors in the checkpoint are train.checkpoint.CheckpointError.
    """
    return export_onnx_result(ckpt_dir, out_dir, precision, opset=opset, force=force, parity=parity,
                              file=file, manifest_dir=manifest_dir, engine=engine, data=data, judge=judge)["path"]


def export_onnx_result(ckpt_dir: Path, out_dir: Path | None = None, precision: str = "fp32", *,
                       opset: int = OPSET, force: bool = False, parity: ParitySpec | None = None,
                       file: str = FILE, manifest_dir: Path | None = None, engine: str = "onnx",
                       data: Path | None = None, judge: bool = True) -> dict:
    """export_onnx with the details the CLI reports: path, skipped, seconds, parity (int8: quality, judged on
    held-out text of the training corpus, `data` or the one the checkpoint names; `judge=False` skips that for
    random-weight models, which have no corpus: the manifest says so)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    ckpt = load_checkpoint(ckpt_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_dir, precision)
    manifest_dir = Path(manifest_dir) if manifest_dir is not None else out_dir
    path = out_dir / file
    source = manifest.source_of(ckpt)
    options = {"precision": precision, "opset": opset, "exporter": "torch.onnx.export(dynamo=False)",
               "fold_embedding": folds(ckpt.model.cfg), **({} if judge else {"judged": False})}
    if precision == "int8":
        from export.int8 import QUANTIZATION, decode_form

        options.update(quantization=QUANTIZATION, decode=decode_form(ckpt.model.cfg.cell))
    if not force and manifest.is_up_to_date(manifest_dir, engine, source, options):
        log.info("%s: %s is up to date (use --force to rebuild)", ckpt.model_id, path)
        return {"path": path, "skipped": True, "manifest": manifest.read_manifest(manifest_dir)}

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    candidate = path.with_name(f".{path.name}.candidate")  # checked before it takes the real name
    try:
        build_onnx(ckpt, candidate, precision, opset, source["checkpoint_sha256"])
        export_s = time.perf_counter() - t0
        runtime = OrtRuntime(candidate, threads=1)
        if precision == "int8" and not judge:
            manifest.publish(candidate)
            os.replace(candidate, path)
            check = {"quality": {"passed": None, "judged": False, "why": "not judged (random weights, no corpus)"}}
        elif precision == "int8":
            check = {"quality": manifest.publish_if_quality(ckpt, candidate, path, runtime, data)}
        else:
            check = {"parity": manifest.publish_if_parity(ckpt, candidate, path, runtime,
                                                          parity or ParitySpec.for_precision(precision))}
    finally:
        candidate.unlink(missing_ok=True)
    entry = {"file": os.path.relpath(path, manifest_dir), "precision": precision, "options": options,
             "versions": manifest.tool_versions(), "export_seconds": round(export_s, 3), **check}
    written = manifest.record_export(manifest_dir, ckpt, source, engine, entry)
    return {"path": path, "skipped": False, "manifest": written, "seconds": time.perf_counter() - t0}
