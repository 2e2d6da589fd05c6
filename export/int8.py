"""int8 step models for CPUs: weights in int8, activations and I/O in float32 (onnxruntime dynamic quantization).

The same contract as every step model (tokens [B, T] + state -> last-position logits + state). At batch 1 a
decode step reads every weight once, so fewer weight bytes are what makes it faster than fp32 can be.

- LSTM: the native LSTM op becomes onnxruntime's DynamicQuantizeLSTM (int8 weights, any T).
- GRU and RNN have no quantized op in onnxruntime: the graph is the cell's equations (a MatMul of the state,
  elementwise gates), so the MatMul quantizes. An If on T picks the decode step (T = 1, the equations once)
  or a Scan of the same equations over T for prompts. Measured at hidden 512, one thread: the int8 Scan
  prefills 256 characters 3-7x faster than onnxruntime's native fp32 GRU/RNN op, and is as fast as the If's
  decode branch for GRU but 2x slower for RNN at T = 1 (docs/performance.md), hence both.
  The input side stays a lookup: the embedding folded with the input weights and bias is a (V, G*H) table
  indexed by the token (Gather), as the one-hot fold is for fp32.
- The head's Linear layers run as MatMul + Add (onnxruntime quantizes MatMul, not Gemm).

Acceptance is by quality, not allclose: the held-out loss (the validation split, 8 streams, state carried,
every character, as training evaluates it) within 0.01 nats/char of the fp32 model's, and greedy agreement
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


def _tensor(a: np.ndarray, name: str):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(a, np.float32 if a.dtype.kind == "f" else a.dtype), name)


def _cell(cell: str, w: dict, gi: str, h: str, out: str, n) -> tuple[list, list]:
    """(nodes, initializers) of one step of the cell: gi (B, G*H) the input side, h (B, H) the state -> out.
    n(name) prefixes names; the recurrent weights are this graph's own initializers (so the quantizer sees them)."""
    from onnx import helper

    H = w["w_hh"].shape[0]
    init = [_tensor(w["w_hh"], n("w_hh")), _tensor(w["b_hh"], n("b_hh"))]
    nodes = [helper.make_node("MatMul", [h, n("w_hh")], [n("hw")]),  # (B, G*H): the weights a step reads
             helper.make_node("Add", [n("hw"), n("b_hh")], [n("gh")])]
    if cell == "gru":  # PyTorch's gate order r, z, n; h' = (1 - z) * n + z * h = n + z * (h - n)
        init.append(_tensor(np.array([H] * 3, np.int64), n("split")))
        nodes += [helper.make_node("Split", [gi, n("split")], [n("xr"), n("xz"), n("xn")], axis=1),
                  helper.make_node("Split", [n("gh"), n("split")], [n("hr"), n("hz"), n("hn")], axis=1),
                  helper.make_node("Add", [n("xr"), n("hr")], [n("ar")]),
                  helper.make_node("Sigmoid", [n("ar")], [n("r")]),
                  helper.make_node("Add", [n("xz"), n("hz")], [n("az")]),
                  helper.make_node("Sigmoid", [n("az")], [n("z")]),
                  helper.make_node("Mul", [n("r"), n("hn")], [n("rhn")]),
                  helper.make_node("Add", [n("xn"), n("rhn")], [n("an")]),
                  helper.make_node("Tanh", [n("an")], [n("nn")]),
                  helper.make_node("Sub", [h, n("nn")], [n("hmn")]),
                  helper.make_node("Mul", [n("z"), n("hmn")], [n("zh")]),
                  helper.make_node("Add", [n("nn"), n("zh")], [out])]
    elif cell == "rnn":
        nodes += [helper.make_node("Add", [gi, n("gh")], [n("a")]),
                  helper.make_node("Tanh", [n("a")], [out])]
    else:
        raise ValueError(f"the cell graph is for GRU and RNN (LSTM has DynamicQuantizeLSTM), not {cell!r}")
    return nodes, init


def _head(w: dict, x: str, out: str, n) -> tuple[list, list]:
    """Linear layers (ReLU between) as MatMul + Add: x (B, H) -> out (B, V)."""
    from onnx import helper

    nodes, init = [], []
    for i, (wt, b) in enumerate(w["head"]):
        init += [_tensor(wt, n(f"head{i}_w")), _tensor(b, n(f"head{i}_b"))]
        y = out if i == len(w["head"]) - 1 else n(f"head{i}")
        nodes += [helper.make_node("MatMul", [x, n(f"head{i}_w")], [n(f"head{i}_mm")]),
                  helper.make_node("Add", [n(f"head{i}_mm"), n(f"head{i}_b")], [y])]
        x = y
        if i < len(w["head"]) - 1:
            nodes.append(helper.make_node("Relu", [x], [n(f"head{i}_relu")]))
            x = n(f"head{i}_relu")
    return nodes, init


def cell_model(model, cell: str, opset: int = 17):
    """The fp32 step model of a GRU or RNN as its cell's equations (an onnx ModelProto, quantized afterwards):
    If T == 1 the equations once, else a Scan of them over T. Same contract as the traced step model."""
    from onnx import TensorProto, helper

    w = _weights(model)
    H, V = w["w_hh"].shape[0], w["head"][-1][1].shape[0]
    info = lambda name, *dims: helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))  # noqa: E731

    dec = lambda s: "dec_" + s  # noqa: E731
    nodes = [helper.make_node("Reshape", ["tokens", "flat"], [dec("tok")]),  # (B,): T = 1
             helper.make_node("Gather", ["table", dec("tok")], [dec("gi")])]  # (B, G*H): the input side, a lookup
    cell_nodes, init = _cell(cell, w, dec("gi"), "h_in", dec("h_out"), dec)
    head_nodes, head_init = _head(w, dec("h_out"), dec("logits"), dec)
    decode = helper.make_graph(nodes + cell_nodes + head_nodes, "decode_step", [],
                               [info(dec("logits"), "B", V), info(dec("h_out"), "B", H)], init + head_init)

    scan = lambda s: "scan_" + s  # noqa: E731
    body_nodes, body_init = _cell(cell, w, scan("gi_t"), scan("h"), scan("h_next"), scan)
    body = helper.make_graph(body_nodes, "cell_step", [info(scan("h"), "B", H), info(scan("gi_t"), "B", "GH")],
                             [info(scan("h_next"), "B", H)], body_init)
    pre = lambda s: "pre_" + s  # noqa: E731
    head_nodes, head_init = _head(w, pre("h_out"), pre("logits"), pre)
    nodes = [helper.make_node("Gather", ["table", "tokens"], [pre("gi")]),  # (B, T, G*H)
             helper.make_node("Scan", ["h_in", pre("gi")], [pre("h_out")], body=body, num_scan_inputs=1,
                              scan_input_axes=[1])]
    prefill = helper.make_graph(nodes + head_nodes, "prefill", [],
                                [info(pre("logits"), "B", V), info(pre("h_out"), "B", H)], head_init)

    top = [helper.make_node("Shape", ["tokens"], ["tokens_shape"]),
           helper.make_node("Gather", ["tokens_shape", "t_axis"], ["T"], axis=0),
           helper.make_node("Equal", ["T", "one"], ["is_decode"]),
           helper.make_node("If", ["is_decode"], ["logits", "h_out"], then_branch=decode, else_branch=prefill,
                            name="decode_or_prefill")]
    graph = helper.make_graph(
        top, "charrnn_step",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["B", "T"]), info("h_in", "B", H)],
        [info("logits", "B", V), info("h_out", "B", H)],
        [_tensor(w["table"], "table"), _tensor(np.array([-1], np.int64), "flat"),
         _tensor(np.array(1, np.int64), "t_axis"), _tensor(np.array(1, np.int64), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="charrnn")


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


def decode_form(cell: str) -> str:
    """How the int8 graph runs a decode step (T = 1), for the manifest."""
    return ("DynamicQuantizeLSTM (int8 weights, any T)" if cell == "lstm" else
            "cell equations with an int8 MatMul: once for T = 1, in a Scan for T > 1")


QUANTIZATION = {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": False,
                "op_types": ["MatMul", "LSTM"], "subgraphs": True}


def build_int8(ckpt, proto):
    """The fp32 step graph (a ModelProto from export.onnx.trace_step; for GRU and RNN only its opset is used)
    -> the int8 ModelProto."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    cell = ckpt.model.cfg.cell
    if cell != "lstm":
        proto = cell_model(ckpt.model, cell, proto.opset_import[0].version)
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
