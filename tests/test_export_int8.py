"""int8 exports: the GRU/RNN decode step as cell equations (exact before quantization), dynamic quantization,
acceptance by held-out loss (not allclose), the manifest, export.check and the server taking them.

Models are trained for a few seconds on a slice of tiny Shakespeare, so that held-out loss means something."""
import json

import numpy as np
import onnx
import pytest

from export import manifest
from export.__main__ import main
from export.int8 import cell_model
from export.onnx import export_onnx_result, stamp
from export.parity import ParitySpec, check_parity
from export.quality import QualityError
from export.runtime import OrtRuntime, TorchRuntime
from train.checkpoint import load_checkpoint

CELLS = ("rnn", "lstm", "gru")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{cell: checkpoint dir}: hidden 64 (the embedding folds: V < H), fc 2, one short epoch on 120k characters."""
    from train import corpus as corpora
    from train.trainer import Job, TrainConfig, train_one

    try:
        text = corpora.load_text(corpora.resolve("tinyshakespeare"))
    except corpora.CorpusError as e:
        pytest.skip(f"tiny Shakespeare not found: {e}")
    root = tmp_path_factory.mktemp("int8")
    corpus = root / "slice.txt"
    corpus.write_text(text[:120_000])
    out = {}
    for cell in CELLS:
        cfg = TrainConfig(epochs=1, batch_size=32, lr=3e-3, evals_per_epoch=1, patience=0, device="cpu", threads=1)
        job = Job(f"{cell}-h64-fc2-s50", "tinyshakespeare", str(corpus), cell, 50, 64, 2, cfg, str(root / "runs"))
        train_one(job, quiet=True)
        out[cell] = root / "runs" / job.model_id
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8-exports")
    return {cell: export_onnx_result(ckpt, root / f"{cell}-int8", "int8") for cell, ckpt in trained.items()}


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_cell_equation_graph_is_exact_before_quantization(trained, tmp_path, cell):
    """The GRU/RNN cell graph (If T == 1: the equations once; else a Scan of them), unquantized, passes fp32
    parity at 1e-5: decode steps and prefills through the step protocol."""
    ckpt = load_checkpoint(trained[cell])
    proto = cell_model(ckpt.model, cell)
    stamp(proto, ckpt, "fp32", "")
    onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / "cells.onnx"
    path.write_bytes(proto.SerializeToString())
    report = check_parity(TorchRuntime(trained[cell]), OrtRuntime(path), ParitySpec(batches=(1, 3), prefills=(1, 9)))
    assert report["passed"] and report["max_abs_logits"] < 1e-5


@pytest.mark.parametrize("cell", CELLS)
def test_int8_export_is_accepted_by_held_out_loss_and_recorded(exported, cell):
    result = exported[cell]
    entry = result["manifest"]["exports"]["onnx"]
    q = entry["quality"]
    assert q["passed"] and q["delta_nats"] <= 0.01 and q["tol_nats"] == 0.01 and "parity" not in entry
    assert q["corpus"] == "tinyshakespeare" and q["held_out_chars"] == 6000 and q["greedy_chars"] == 1000
    assert 0 <= q["greedy_identical_chars"] <= 1000 and abs(q["loss"] - q["fp32_loss"] - q["delta_nats"]) < 1e-4
    assert entry["options"]["quantization"]["weight_type"] == "QInt8" and "decode" in entry["options"]
    assert result["manifest"]["model_id"] == f"{cell}-h64-fc2-s50-int8"
    ops = {n.op_type for n in onnx.load(str(result["path"])).graph.node}
    sub = {n.op_type for node in onnx.load(str(result["path"])).graph.node if node.op_type == "If"
           for a in node.attribute for n in a.g.node}
    if cell == "lstm":
        assert "DynamicQuantizeLSTM" in ops and "MatMulInteger" in ops
    else:
        assert "If" in ops and "MatMulInteger" in sub and "Scan" in sub and cell.upper() not in sub


@pytest.mark.parametrize("cell", CELLS)
def test_int8_runtime_keeps_the_step_contract(exported, trained, cell):
    rt, ref = OrtRuntime(exported[cell]["path"]), TorchRuntime(trained[cell])
    tokens = np.random.default_rng(0).integers(0, len(ref.vocab), (3, 20))
    (li, si), (lr, sr) = rt.step(tokens, rt.new_state(3)), ref.step(tokens, ref.new_state(3))
    assert li.shape == lr.shape and np.abs(li - lr).max() < 0.1  # int8: close, not equal
    nxt = lr.argmax(-1)[:, None]
    (li, si), (lr, sr) = rt.step(nxt, si), ref.step(nxt, sr)  # a decode step on the carried state
    assert np.abs(li - lr).max() < 0.1 and si[0].shape == (3, 64)
    joined = rt.concat([rt.take(si, [2]), rt.new_state(1)])
    assert rt.step(np.zeros((2, 1), np.int64), joined)[0].shape == (2, len(ref.vocab))


def test_int8_is_refused_when_held_out_loss_is_off(trained, tmp_path, monkeypatch):
    from export import quality

    check = quality.check_quality
    monkeypatch.setattr(quality, "check_quality", lambda ckpt, rt, data=None: check(ckpt, rt, data, tol=-1.0))
    with pytest.raises(QualityError, match="quality FAILED.*model.onnx was not written"):
        export_onnx_result(trained["gru"], tmp_path / "out", "int8")
    assert not (tmp_path / "out" / "model.onnx").exists() and manifest.read_manifest(tmp_path / "out") is None


def test_int8_needs_the_corpus(trained, tmp_path, monkeypatch):
    config = json.loads((trained["rnn"] / "config.json").read_text())
    moved = tmp_path / "ckpt"
    moved.mkdir()
    for f in trained["rnn"].iterdir():
        if f.is_file():
            (moved / f.name).write_bytes(f.read_bytes())
    config["corpus"]["path"] = str(tmp_path / "gone.txt")
    (moved / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("CHARRNN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(QualityError, match="pass --data PATH"):
        export_onnx_result(moved, tmp_path / "out", "int8")
    corpus = config["corpus"]
    result = export_onnx_result(moved, tmp_path / "out", "int8", data=trained["rnn"].parent.parent / "slice.txt")
    assert result["manifest"]["exports"]["onnx"]["quality"]["passed"] and corpus["name"] == "tinyshakespeare"


def test_cli_check_and_server_take_int8(trained, tmp_path, capsys):
    from export.check import main as check_main
    from serve.backends import load_runtimes

    out = tmp_path / "exports"
    assert main(["--checkpoint", str(trained["lstm"]), "--precision", "int8", "--out", str(out)]) == 0
    assert "dloss" in capsys.readouterr().out
    model_dir = out / "lstm-h64-fc2-s50-int8"
    assert check_main([str(model_dir), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "passed" and row["precision"] == "int8" and row["quality"]["delta_nats"] <= 0.01
    runtimes = load_runtimes(out, "onnxruntime", "CPU")
    assert list(runtimes) == ["lstm-h64-fc2-s50-int8"]
    with pytest.raises(SystemExit) as e:
        main(["--engine", "trt", "--checkpoint", str(trained["lstm"]), "--precision", "int8"])
    assert e.value.code == 2
