"""int8 step models for CPUs: weights in int8, activations and I/O in float32 (onnxruntime dynamic quantization).

The same contract as every step model (tokens [B, T] + state -> last-position logits + state). At batch 1 a
decode step reads every weight once, so fewer weight bytes are what makes it faster than fp32 can be.

- LSTM: the native LSTM op becomes onnxruntime's DynamicQuantizeLSTM (int8 weights, any T).
- GRU and RNN have no quantized op in onnxruntime. Their decode step (T = 1) is written as the cell's equations
  (a MatMul of the state, elementwise gates) so the MatMul quantizes; prefill (T > 1) keeps the native fp32 op.
  One graph holds both behind an If on T. The input side stays a lookup: the embedding folded with the input
  weights and bias is a (V, G*H) table indexed by the token (Gather), as the one-hot fold is for fp32.
- The head's Linear layers run as MatMul + Add (onnxruntime quantizes MatMul, not Gemm).

Acceptance is by quality, not allclose: the held-out loss (the validation split, 8 streams, state carried,
every character, as training evaluates it) within `QUALITY_NATS` of the fp32 model's, and greedy agreement
over 1,000 characters from the corpus's seed prompt recorded beside it (export.quality).
"""
from __future__ import annotations

import logging
import tempfile

import numpy as np
import torch

log = logging.getLogger(__name__)


def _weights(model) -> dict:
    """float64 numpy copies: the folded input table (V, G*H) = E @ W_ih^T + b_ih, W_hh^T (H, G*H), b_hh, head."""
    r = model.rnn
    f = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    table = f(model.embed.weight) @ f(r.weight_ih_l0).T + f(r.bias_ih_l0)  # (V, G*H)
    head = [(f(m.weight).T, f(m.bias)) for m in model.head if isinstance(m, torch.nn.Linear)]  # (in, out), (out,)
    return {"table": table, "w_hh": f(r.weight_hh_l0).T, "b_hh": f(r.bias_hh_l0), "head": head}


def decode_graph(model, cell: str, prefix: str = "dec_"):
    """The T = 1 step as the cell's equations: an onnx GraphProto reading the outer scope's tokens and h_in,
    with its weights as its own initializers (so the quantizer sees them)."""
    from onnx import TensorProto, helper, numpy_helper

    w = _weights(model)
    H = w["w_hh"].shape[0]
    n = lambda s: prefix + s  # noqa: E731
    init = [numpy_helper.from_array(w["table"].astype(np.float32), n("table")),
            numpy_helper.from_array(w["w_hh"].astype(np.float32), n("w_hh")),
            numpy_helper.from_array(w["b_hh"].astype(np.float32), n("b_hh")),
            numpy_helper.from_array(np.array([-1], np.int64), n("flat"))]
    nodes = [helper.make_node("Reshape", ["tokens", n("flat")], [n("tok")]),  # (B,)
             helper.make_node("Gather", [n("table"), n("tok")], [n("gi")]),  # (B, G*H): input side, a lookup
             helper.make_node("MatMul", ["h_in", n("w_hh")], [n("hw")]),  # (B, G*H): the weights a step reads
             helper.make_node("Add", [n("hw"), n("b_hh")], [n("gh")])]
    if cell == "gru":  # PyTorch's gate order r, z, n; h' = (1 - z) * n + z * h = n + z * (h - n)
        init.append(numpy_helper.from_array(np.array([H] * 3, np.int64), n("split")))
        nodes += [helper.make_node("Split", [n("gi"), n("split")], [n("xr"), n("xz"), n("xn")], axis=1),
                  helper.make_node("Split", [n("gh"), n("split")], [n("hr"), n("hz"), n("hn")], axis=1),
                  helper.make_node("Add", [n("xr"), n("hr")], [n("ar")]),
                  helper.make_node("Sigmoid", [n("ar")], [n("r")]),
                  helper.make_node("Add", [n("xz"), n("hz")], [n("az")]),
                  helper.make_node("Sigmoid", [n("az")], [n("z")]),
                  helper.make_node("Mul", [n("r"), n("hn")], [n("rhn")]),
                  helper.make_node("Add", [n("xn"), n("rhn")], [n("an")]),
                  helper.make_node("Tanh", [n("an")], [n("nn")]),
                  helper.make_node("Sub", ["h_in", n("nn")], [n("hmn")]),
                  helper.make_node("Mul", [n("z"), n("hmn")], [n("zh")]),
                  helper.make_node("Add", [n("nn"), n("zh")], [n("h_out")])]
    elif cell == "rnn":
        nodes += [helper.make_node("Add", [n("gi"), n("gh")], [n("a")]),
                  helper.make_node("Tanh", [n("a")], [n("h_out")])]
    else:
        raise ValueError(f"decode_graph is for GRU and RNN (LSTM has DynamicQuantizeLSTM), not {cell!r}")
    x = n("h_out")
    for i, (wt, b) in enumerate(w["head"]):
        init += [numpy_helper.from_array(wt.astype(np.float32), n(f"head{i}_w")),
                 numpy_helper.from_array(b.astype(np.float32), n(f"head{i}_b"))]
        nodes += [helper.make_node("MatMul", [x, n(f"head{i}_w")], [n(f"head{i}_mm")]),
                  helper.make_node("Add", [n(f"head{i}_mm"), n(f"head{i}_b")], [n(f"head{i}")])]
        x = n(f"head{i}")
        if i < len(w["head"]) - 1:
            nodes.append(helper.make_node("Relu", [x], [n(f"head{i}_relu")]))
            x = n(f"head{i}_relu")
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", int(w["head"][-1][1].shape[0])]),
               helper.make_tensor_value_info(n("h_out"), TensorProto.FLOAT, ["B", H])]
    return helper.make_graph(nodes, "decode_step", [], outputs, init)


def gemm_to_matmul(graph) -> None:
    """Gemm(A, B, C) with a constant B -> MatMul(A, B') + Add(C), in place: onnxruntime quantizes MatMul only."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    nodes, replaced = [], set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        replaced.add(node.input[1])
        name = node.input[1] + "_kn"  # (K, N): MatMul's layout
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), name))
        mm = node.output[0] + "_mm" if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [mm], name=(node.name or mm) + "_matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [mm, node.input[2]], [node.output[0]], name=(node.name or mm) + "_add"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for node in graph.node for i in node.input}
    keep = [t for t in graph.initializer if t.name not in replaced or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def with_decode_branch(proto, model, cell: str):
    """The fp32 step graph (native op) as the prefill branch of an If on T == 1 whose other branch is the cell
    graph: one file, any T, a quantizable decode step."""
    from onnx import helper, numpy_helper

    g = proto.graph
    outer_out = [o.name for o in g.output]  # logits, h_out
    rename = {name: f"pre_{name}" for name in outer_out}
    prefill_nodes = []
    for node in g.node:
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        prefill_nodes.append(node)
    prefill_outputs = [helper.make_tensor_value_info(rename[o.name], o.type.tensor_type.elem_type,
                                                     [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
                       for o in g.output]
    prefill = helper.make_graph(prefill_nodes, "prefill", [], prefill_outputs)
    decode = decode_graph(model, cell)
    consts = [numpy_helper.from_array(np.array(1, np.int64), "t_axis"), numpy_helper.from_array(np.array(1, np.int64), "one")]
    top = [helper.make_node("Shape", ["tokens"], ["tokens_shape"]),
           helper.make_node("Gather", ["tokens_shape", "t_axis"], ["T"], axis=0),
           helper.make_node("Equal", ["T", "one"], ["is_decode"]),
           helper.make_node("If", ["is_decode"], outer_out, then_branch=decode, else_branch=prefill, name="decode_or_prefill")]
    del g.node[:]
    g.node.extend(top)
    g.initializer.extend(consts)
    return proto


def decode_form(cell: str) -> str:
    """How the int8 graph runs a decode step (T = 1), for the manifest."""
    return ("DynamicQuantizeLSTM (int8 weights, any T)" if cell == "lstm" else
            "cell equations with an int8 MatMul (T = 1); native fp32 op for T > 1")


QUANTIZATION = {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": False,
                "op_types": ["MatMul", "LSTM"], "subgraphs": True}


def build_int8(ckpt, proto):
    """The fp32 step graph (a ModelProto from export.onnx.trace_step) -> its int8 ModelProto."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    cell = ckpt.model.cfg.cell
    if cell != "lstm":
        with_decode_branch(proto, ckpt.model, cell)
    gemm_to_matmul(proto.graph)
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(proto, f"{tmp}/fp32.onnx")
        root.setLevel(logging.ERROR)  # the quantizer's advice to run its pre-processing (shape inference)
        try:
            quantize_dynamic(f"{tmp}/fp32.onnx", f"{tmp}/int8.onnx", op_types_to_quantize=QUANTIZATION["op_types"],
                             weight_type=QuantType.QInt8, per_channel=QUANTIZATION["per_channel"],
                             extra_options={"EnableSubgraph": QUANTIZATION["subgraphs"]})
        finally:
            root.setLevel(level)
        return onnx.load(f"{tmp}/int8.onnx")
