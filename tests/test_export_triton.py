"""The Triton model repository: config.pbtxt parsed with Triton's own model_config schema."""
import numpy as np
import onnx
import pytest

from conftest import make_checkpoint
from export import manifest
from export.__main__ import main
from export.runtime import OrtRuntime, read_onnx_metadata
from export.triton import TritonOptions, export_triton

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient (the dev extra) ships the schema")
from google.protobuf import text_format  # noqa: E402


def parse(path) -> "pb.ModelConfig":
    return text_format.Parse(path.read_text(), pb.ModelConfig())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_config_parses_against_triton_schema(tmp_path, cell):
    ckpt = make_checkpoint(tmp_path / "runs", cell=cell, hidden=32)
    result = export_triton(ckpt, tmp_path / "repo")
    model_dir = tmp_path / "repo" / f"{cell}-h32-fc2-s16"
    assert result["config"] == model_dir / "config.pbtxt"
    assert (model_dir / "1" / "model.onnx").is_file()
    cfg = parse(model_dir / "config.pbtxt")

    assert cfg.name == model_dir.name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("tokens", pb.TYPE_INT64, [-1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("logits", pb.TYPE_FP32, [35])]
    seq = cfg.sequence_batching
    assert seq.WhichOneof("strategy_choice") == "oldest"  # direct pads every slot to the longest request
    assert seq.oldest.max_candidate_sequences == 256 and seq.oldest.max_queue_delay_microseconds == 0
    assert seq.max_sequence_idle_microseconds == 60_000_000  # well above Triton's 1 s default
    assert len(seq.control_input) == 0  # zero initial state needs no START input (one would have to be a model input)
    pairs = [("h_in", "h_out"), ("c_in", "c_out")][: 2 if cell == "lstm" else 1]
    assert [(s.input_name, s.output_name) for s in seq.state] == pairs
    for s in seq.state:
        assert s.data_type == pb.TYPE_FP32 and list(s.dims) == [32]
        (init,) = s.initial_state
        assert init.zero_data and init.data_type == pb.TYPE_FP32 and list(init.dims) == [32]
    # the state names sort the same way on input and output, and name real tensors of the ONNX graph
    assert sorted(s.input_name for s in seq.state) == [i for i, _ in sorted(pairs)]
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["tokens", *(i for i, _ in pairs)]
    assert [o.name for o in graph.output] == ["logits", *(o for _, o in pairs)]

    entry = manifest.read_manifest(model_dir)["exports"]["triton"]
    assert entry["file"] == "1/model.onnx" and entry["parity"]["passed"] and entry["config"] == "config.pbtxt"
    assert entry["triton"]["strategy"] == "oldest"


def test_oldest_strategy_options_direct_and_fp16(tmp_path):
    ckpt = make_checkpoint(tmp_path / "runs", cell="rnn", hidden=32)
    opts = TritonOptions(max_batch_size=16, strategy="oldest", max_sequence_idle_us=5_000_000,
                         max_candidate_sequences=100, max_queue_delay_us=200)
    export_triton(ckpt, tmp_path / "repo", precision="fp16", opts=opts)
    model_dir = tmp_path / "repo" / "rnn-h32-fc2-s16-fp16"
    cfg = parse(model_dir / "config.pbtxt")
    assert cfg.name == "rnn-h32-fc2-s16-fp16" and cfg.max_batch_size == 16
    seq = cfg.sequence_batching
    assert seq.WhichOneof("strategy_choice") == "oldest"
    assert seq.oldest.max_candidate_sequences == 100 and seq.oldest.max_queue_delay_microseconds == 200
    assert seq.max_sequence_idle_microseconds == 5_000_000
    assert read_onnx_metadata(model_dir / "1" / "model.onnx")["precision"] == "fp16"
    assert [o.data_type for o in cfg.output] == [pb.TYPE_FP32]  # fp16 inside, float32 at the edges
    export_triton(ckpt, tmp_path / "repo", precision="fp16", opts=TritonOptions(strategy="direct"))
    seq = parse(model_dir / "config.pbtxt").sequence_batching  # still there for those who want a slot each
    assert seq.WhichOneof("strategy_choice") == "direct" and seq.direct.max_queue_delay_microseconds == 0


def test_cli_writes_a_repository_and_keeps_config_in_step_with_options(tmp_path):
    ckpt = make_checkpoint(tmp_path / "runs", cell="gru", hidden=32)
    repo = tmp_path / "models"
    assert main(["--engine", "triton", "--checkpoint", str(ckpt), "--out", str(repo)]) == 0
    config = repo / "gru-h32-fc2-s16" / "config.pbtxt"
    assert parse(config).max_batch_size == 64
    onnx_file = repo / "gru-h32-fc2-s16" / "1" / "model.onnx"
    mtime = onnx_file.stat().st_mtime_ns
    assert main(["--engine", "triton", "--checkpoint", str(ckpt), "--out", str(repo), "--max-batch-size", "8"]) == 0
    assert parse(config).max_batch_size == 8  # config rewritten ...
    assert onnx_file.stat().st_mtime_ns == mtime  # ... the parity-checked ONNX file left as it was
    rt = OrtRuntime(onnx_file)  # what Triton's onnxruntime backend will load
    logits, _ = rt.step(np.zeros((2, 4), np.int64), rt.new_state(2))
    assert logits.shape == (2, len(rt.vocab))
