"""The exporter: ONNX step models checked against eager PyTorch, manifests, the CLI, Triton and TensorRT.

Real files and real ONNX Runtime sessions throughout; models are tiny (hidden 32) random-weight checkpoints.
"""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import ROOT, make_checkpoint
from export import manifest
from export.__main__ import main
from export.onnx import StepModel, export_onnx, export_onnx_result
from export.parity import ParityError, ParitySpec, check_parity
from export.runtime import OrtRuntime, TorchRuntime, read_onnx_metadata
from train.checkpoint import WEIGHTS, CheckpointError, sha256_file
from train.sampling import generate
from train.checkpoint import load_checkpoint

CELLS = ("rnn", "lstm", "gru")
QUICK = ParitySpec(batches=(2,), prefills=(5,), steps=10)  # for tests about something other than parity


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{cell: (checkpoint dir, model.onnx)}, exported once with the full parity check of the contract."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for i, cell in enumerate(CELLS):
        ckpt = make_checkpoint(root / "runs", cell=cell, hidden=32, fc=2, seed=i)
        out[cell] = (ckpt, export_onnx(ckpt, root / "exports" / ckpt.name))
        # 35 characters, 48 hidden units: the export folds the embedding into the input weights
        ckpt = make_checkpoint(root / "runs", cell=cell, hidden=48, fc=2, seed=i)
        out[f"{cell}-folded"] = (ckpt, export_onnx(ckpt, root / "exports" / ckpt.name))
    return out


FOLDED = tuple(f"{cell}-folded" for cell in CELLS)


# --- parity: the backbone ----------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS + FOLDED)
def test_export_passes_the_contract_parity_check(exported, cell):
    ckpt, path = exported[cell]
    report = manifest.read_manifest(path.parent)["exports"]["onnx"]["parity"]
    assert report["passed"] and report["greedy_identical"]
    assert report["max_abs_logits"] < 1e-5
    assert report["spec"]["steps"] >= 200 and report["spec"]["tol"] == 1e-5
    assert {(c["batch"], c["prefill"]) for c in report["cases"]} == {(b, t) for b in (1, 3, 8) for t in (1, 17, 64)}
    assert all(c["calls"] == 202 for c in report["cases"])


@pytest.mark.parametrize("bind", [False, True], ids=["numpy-state", "iobinding"])
@pytest.mark.parametrize("cell", CELLS + FOLDED)
def test_onnx_runtime_matches_eager_torch_through_the_step_protocol(exported, cell, bind):
    """Independently of the built-in check: carried state, mixed batches via take/concat, a greedy decode.
    iobinding: the state as OrtValues between steps, as on CUDA (here on the CPU device)."""
    ckpt, path = exported[cell]
    ref, ort = TorchRuntime(ckpt), OrtRuntime(path, bind=bind)
    assert isinstance(ort.new_state(2)[0], np.ndarray) != bind
    rng = np.random.default_rng(1)
    for B, T in [(1, 1), (3, 17), (8, 64), (5, 2)]:
        tokens = rng.integers(0, len(ref.vocab), (B, T))
        (lr, sr), (lo, so) = ref.step(tokens, ref.new_state(B)), ort.step(tokens, ort.new_state(B))
        for _ in range(30):
            np.testing.assert_allclose(lo, lr, atol=1e-5, rtol=1e-5)
            nxt = lr.argmax(-1)[:, None]
            assert (lo.argmax(-1)[:, None] == nxt).all()
            (lr, sr), (lo, so) = ref.step(nxt, sr), ort.step(nxt, so)
        # streams regrouped the way the server's scheduler does it
        rows = list(range(B))[::-1]
        sr2 = ref.concat([ref.take(sr, rows), ref.new_state(1)])
        so2 = ort.concat([ort.take(so, rows), ort.new_state(1)])
        tokens = rng.integers(0, len(ref.vocab), (B + 1, 3))
        np.testing.assert_allclose(ort.step(tokens, so2)[0], ref.step(tokens, sr2)[0], atol=1e-5, rtol=1e-5)

    # greedy text, character for character, against train.sampling.generate (prefill + carried steps)
    model = load_checkpoint(ckpt).model
    prompt = "the quick brown"
    expected = generate(model, ref.vocab, prompt, 200, temperature=0.0)
    logits, state = ort.step(ort.vocab.encode(prompt)[None, :], ort.new_state(1))
    text = []
    for _ in range(200):
        nxt = int(logits[0].argmax())
        text.append(nxt)
        logits, state = ort.step(np.array([[nxt]]), state)
    assert ort.vocab.decode(text) == expected


def test_parity_check_catches_a_wrong_model(exported):
    ckpt_lstm, _ = exported["lstm"]
    _, other = exported["gru"]
    report = check_parity(TorchRuntime(ckpt_lstm), OrtRuntime(exported["lstm"][1]), QUICK)
    assert report["passed"]
    with pytest.raises(ParityError):  # a different cell is refused before any call
        check_parity(TorchRuntime(ckpt_lstm), OrtRuntime(other), QUICK)


class Nudged(TorchRuntime):
    """A candidate whose logits are off by a little: parity must fail on tolerance, not on greedy luck."""

    backend = "nudged"

    def step(self, tokens, state):
        logits, state = super().step(tokens, state)
        return logits + 1e-3, state


def test_parity_fails_beyond_tolerance(exported):
    ckpt, _ = exported["rnn"]
    report = check_parity(TorchRuntime(ckpt), Nudged(ckpt), QUICK)
    assert not report["passed"] and report["greedy_identical"]
    assert report["max_abs_logits"] == pytest.approx(1e-3, rel=1e-3)
    assert check_parity(TorchRuntime(ckpt), Nudged(ckpt), ParitySpec.for_precision("fp16", steps=5))["passed"]


def test_failed_parity_writes_nothing_and_keeps_an_earlier_export(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path, cell="gru")
    out = tmp_path / "out"
    forward = StepModel.forward

    def off_by_a_little(self, tokens, *state):
        logits, *rest = forward(self, tokens, *state)
        return (logits + 1e-3, *rest)

    monkeypatch.setattr(StepModel, "forward", off_by_a_little)
    with pytest.raises(ParityError, match="parity FAILED"):
        export_onnx(ckpt, out, parity=QUICK)
    assert not (out / "model.onnx").exists() and not (out / "manifest.json").exists()
    assert list(out.iterdir()) == []  # no candidate left behind

    monkeypatch.setattr(StepModel, "forward", forward)
    good = export_onnx(ckpt, out, parity=QUICK)
    digest = sha256_file(good)
    monkeypatch.setattr(StepModel, "forward", off_by_a_little)
    with pytest.raises(ParityError):
        export_onnx(ckpt, out, parity=QUICK, force=True)
    assert sha256_file(good) == digest and manifest.is_up_to_date(out, "onnx", manifest.source_of(
        load_checkpoint(ckpt)), manifest.read_manifest(out)["exports"]["onnx"]["options"])
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "cli"), "--force"]) == 1


# --- the graph and its metadata -----------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_graph_has_symbolic_batch_and_time_and_native_recurrent_op(exported, cell):
    _, path = exported[cell]
    model = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)}
    states = 2 if cell == "lstm" else 1
    expected = {"tokens": ["B", "T"], "logits": ["B", 35],
                **{n: ["B", 32] for n in ["h_in", "c_in"][:states] + ["h_out", "c_out"][:states]}}
    assert dims == expected
    assert [i.name for i in model.graph.input] == ["tokens", "h_in", "c_in"][: 1 + states]
    assert [o.name for o in model.graph.output] == ["logits", "h_out", "c_out"][: 1 + states]
    assert [n.op_type for n in model.graph.node if n.op_type in ("RNN", "LSTM", "GRU")] == [cell.upper()]
    assert model.opset_import[0].version == 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    ort = OrtRuntime(path)  # shapes never seen at export time
    logits, state = ort.step(np.zeros((11, 97), np.int64), ort.new_state(11))
    assert logits.shape == (11, 35) and logits.dtype == np.float32 and state[0].shape == (11, 32)


@pytest.mark.parametrize("cell", CELLS + FOLDED)
def test_the_head_runs_on_the_last_position_only(exported, cell):
    """Slice the last position before the head: one Gemm per head layer on (B, H), no MatMul over (B, T, H)."""
    ckpt, path = exported[cell]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gemm") == 2 and "MatMul" not in ops and "If" not in ops  # fc_layers = 2
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info}
    assert all(ranks[n.input[0]] == 2 for n in model.graph.node if n.op_type == "Gemm")
    tokens = np.random.default_rng(0).integers(0, 35, (2, 300))  # a long prefill: still its last position
    ref, rt = TorchRuntime(ckpt), OrtRuntime(path)
    np.testing.assert_allclose(rt.step(tokens, rt.new_state(2))[0], ref.step(tokens, ref.new_state(2))[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_a_small_vocabulary_is_folded_into_the_input_weights(exported, cell):
    """V = 35 < H = 48: the recurrent op's input weights are G*H x V (one-hot input); V >= H: as trained."""
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
    for key, hidden, width in ((cell, 32, 32), (f"{cell}-folded", 48, 35)):
        _, path = exported[key]
        model = onnx.load(str(path))
        (op,) = [n for n in model.graph.node if n.op_type == cell.upper()]
        weights = {t.name: list(t.dims) for t in model.graph.initializer}
        assert weights[op.input[1]] == [1, gates * hidden, width]
        options = manifest.read_manifest(path.parent)["exports"]["onnx"]["options"]
        assert options["fold_embedding"] == (width < hidden)


def test_metadata_round_trip(exported):
    ckpt, path = exported["lstm"]
    meta = read_onnx_metadata(path)
    loaded = load_checkpoint(ckpt)
    assert meta["model_id"] == "lstm-h32-fc2-s16" and meta["cell"] == "lstm"
    assert meta["hidden_size"] == 32 and meta["fc_layers"] == 2
    assert meta["vocab"] == loaded.vocab.chars and "\n" in meta["vocab"]
    assert meta["checkpoint_sha256"] == sha256_file(ckpt / WEIGHTS)
    assert meta["precision"] == "fp32"
    assert OrtRuntime(path).describe() == {**TorchRuntime(ckpt).describe(), "backend": "onnxruntime"}


@pytest.mark.parametrize("hidden", [32, 48], ids=["as-trained", "folded"])
def test_fp16_export_keeps_float32_io_and_passes_its_tolerance(tmp_path, hidden):
    ckpt = make_checkpoint(tmp_path, cell="lstm", hidden=hidden)
    result = export_onnx_result(ckpt, tmp_path / "fp16", precision="fp16")
    model = onnx.load(str(result["path"]))
    io = (*model.graph.input[1:], *model.graph.output)
    assert {v.type.tensor_type.elem_type for v in io} == {onnx.TensorProto.FLOAT}
    assert {t.data_type for t in model.graph.initializer if t.dims} == {onnx.TensorProto.FLOAT16}
    parity = result["manifest"]["exports"]["onnx"]["parity"]
    assert parity["passed"] and parity["spec"]["tol"] == 1e-2 and 1e-6 < parity["max_abs_logits"] < 1e-2
    meta = read_onnx_metadata(result["path"])
    assert meta["precision"] == "fp16" and meta["model_id"] == f"lstm-h{hidden}-fc2-s16-fp16"  # beside the fp32 one


# --- manifest, reruns, the CLI ----------------------------------------------------------------------

def test_manifest_contents(exported):
    ckpt, path = exported["gru"]
    m = manifest.read_manifest(path.parent)
    assert m["model_id"] == "gru-h32-fc2-s16"
    assert m["source"] == {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": sha256_file(ckpt / WEIGHTS)}
    assert m["vocab"] == load_checkpoint(ckpt).vocab.chars
    assert m["model"] == {"cell": "gru", "vocab_size": 35, "hidden_size": 32, "fc_layers": 2, "dropout": 0.0}
    entry = m["exports"]["onnx"]
    assert entry["engine"] == "onnx" and entry["precision"] == "fp32" and entry["file"] == "model.onnx"
    assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(entry["versions"])
    assert entry["options"]["exporter"] == "torch.onnx.export(dynamo=False)" and entry["export_seconds"] > 0
    assert oct(path.stat().st_mode & 0o444) == oct(0o444)  # readable by a server running as someone else


def test_rerun_skips_up_to_date_force_rebuilds_and_new_weights_rebuild(tmp_path):
    ckpt = make_checkpoint(tmp_path, cell="rnn")
    out = tmp_path / "out"
    first = export_onnx_result(ckpt, out, parity=QUICK)
    assert not first["skipped"]
    assert export_onnx_result(ckpt, out, parity=QUICK)["skipped"]
    assert not export_onnx_result(ckpt, out, parity=QUICK, force=True)["skipped"]
    fp16 = ParitySpec.for_precision("fp16", batches=(2,), prefills=(5,), steps=10)
    assert not export_onnx_result(ckpt, out, "fp16", parity=fp16)["skipped"]  # other options
    make_checkpoint(tmp_path, cell="rnn", seed=7)  # retrained: new weights in the same directory
    again = export_onnx_result(ckpt, out, parity=QUICK)
    assert not again["skipped"]
    assert read_onnx_metadata(again["path"])["checkpoint_sha256"] == sha256_file(ckpt / WEIGHTS)
    (out / "model.onnx").write_bytes(b"damaged")
    assert not export_onnx_result(ckpt, out, parity=QUICK)["skipped"]


def test_cli_exports_a_grid_run_directory_and_reports_each_model(tmp_path):
    runs = tmp_path / "runs" / "quick"
    make_checkpoint(runs, cell="gru")
    make_checkpoint(runs, cell="rnn")
    broken = make_checkpoint(runs, cell="lstm")
    (broken / WEIGHTS).write_bytes(b"\x00garbage")
    pending = make_checkpoint(runs, cell="gru", hidden=16)
    cfg = json.loads((pending / "config.json").read_text())
    (pending / "config.json").write_text(json.dumps({**cfg, "done": False}))
    (runs / "results.csv").write_text("Model\n")

    r = cli("export", "--checkpoint", str(runs), "--out", str(tmp_path / "exports"), "--json", cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # one model failed
    rows = {row["model"]: row for row in json.loads(r.stdout)}
    assert rows["gru-h32-fc2-s16"]["status"] == rows["rnn-h32-fc2-s16"]["status"] == "exported"
    assert rows["lstm-h32-fc2-s16"]["status"] == "FAILED" and "corrupted" in rows["lstm-h32-fc2-s16"]["message"]
    assert rows["gru-h16-fc2-s16"]["status"] == "not trained yet"
    for mid in ("gru-h32-fc2-s16", "rnn-h32-fc2-s16"):
        assert (tmp_path / "exports" / mid / "model.onnx").is_file()
        assert rows[mid]["parity"]["passed"] and rows[mid]["parity"]["max_abs_logits"] < 1e-5
    assert not (tmp_path / "exports" / "lstm-h32-fc2-s16").exists()
    assert "Traceback" not in r.stderr

    (broken / WEIGHTS).unlink()
    again = cli("export", "--checkpoint", str(runs), "--out", str(tmp_path / "exports"), cwd=tmp_path)
    assert "up to date" in again.stdout and again.returncode == 1


@pytest.mark.parametrize("damage", ["missing", "corrupted", "foreign"])
def test_bad_checkpoint_is_a_clear_error(tmp_path, damage):
    ckpt = make_checkpoint(tmp_path, cell="lstm")
    if damage == "missing":
        ckpt = tmp_path / "nope"
    elif damage == "corrupted":
        (ckpt / WEIGHTS).write_bytes(b"not safetensors")
    else:  # some other project's checkpoint
        (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError):
        export_onnx(ckpt, tmp_path / "out")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2


def test_cli_bad_checkpoint_exits_2_without_traceback(tmp_path):
    ckpt = make_checkpoint(tmp_path, cell="gru")
    (ckpt / WEIGHTS).write_bytes(b"\x01\x02")
    r = cli("export", "--checkpoint", str(ckpt), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "corrupted weights" in r.stderr


def _tensorrt_usable() -> bool:
    try:
        from export.tensorrt import require_tensorrt

        require_tensorrt()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(_tensorrt_usable(), reason="TensorRT and a GPU are present: the missing-TensorRT path cannot run")
def test_engine_trt_without_tensorrt_exits_2_with_one_sentence(tmp_path):
    ckpt = make_checkpoint(tmp_path, cell="lstm")
    r = cli("export", "--engine", "trt", "--checkpoint", str(ckpt), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[trt]'" in lines[0]
    assert ("TensorRT is not installed" in lines[0]) or ("no NVIDIA GPU" in lines[0])
    assert not (tmp_path / "exports").exists()  # failed before doing any work


def test_export_check_cli(exported, tmp_path):
    ckpt, path = exported["rnn"]
    ok = cli("export.check", str(path.parent), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "passed" in ok.stdout and "rnn-h32-fc2-s16" in ok.stdout
    # a copy whose weights came from another checkpoint of the same shape fails against this one
    impostor = tmp_path / "impostor"
    export_onnx(make_checkpoint(tmp_path / "other", cell="rnn", seed=99), impostor, parity=QUICK)
    bad = cli("export.check", str(impostor / "model.onnx"), "--checkpoint", str(ckpt), cwd=tmp_path)
    assert bad.returncode == 1 and "FAILED" in bad.stdout
    missing = cli("export.check", str(tmp_path / "nothing"), cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
