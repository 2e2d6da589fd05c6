"""The latency benchmark (python -m serve.bench): its arithmetic on known timings, its model choice, its
report's schema, and one --quick run on the smallest model that must produce every file."""
from __future__ import annotations

import copy
import json
import os

import grpc
import numpy as np
import pytest
import torch
from conftest import make_checkpoint

from clients import api
from protos.charrnn.v1 import charrnn_pb2 as pb
from protos.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from serve.bench import floor, report
from serve.bench.backends import BACKENDS, CudaGraphRuntime, unavailable
from serve.bench.cli import BenchConfig, main, parse_args
from serve.bench.grpc import FloorProcess, client_processes
from serve.bench.measure import Subject, summary_us, time_steps
from serve.bench.models import BenchModel, find_models
from train.checkpoint import CheckpointError

MODEL = BenchModel(path=None, model_id="lstm-h512-fc1-s50", cell="lstm", hidden_size=512, fc_layers=1, vocab_size=65,
                   seq_len=50, weights="random")


def rec(backend="torch", mode="step", p50=100.0, batch=1, concurrency=None, cps=None, model=MODEL, **details):
    us = {"p50": p50, "p90": p50 and p50 * 1.1, "p99": p50 and p50 * 1.5, "mean": p50}
    return report.record(model, backend, mode, batch=batch, concurrency=concurrency, threads=1, samples=10, us=us,
                         chars_per_s=cps if cps is not None else (p50 and batch * 1e6 / p50), **details)


# --- arithmetic on known timings ------------------------------------------------------------------

def test_speedups_are_computed_from_the_same_runs_eager_records():
    records = [rec("torch", p50=120.0), rec("ort-cpu", p50=30.0),  # step, batch 1
               rec("torch", p50=20.0, batch=64), rec("ort-cpu", p50=16.0, batch=64),
               rec("ort-cpu", p50=50.0, batch=8),  # no eager record at batch 8: no speedup
               rec("torch", "grpc", p50=None, batch=None, concurrency=8, cps=1000.0),
               rec("ort-cpu", "grpc", p50=None, batch=None, concurrency=8, cps=2500.0),
               rec("torch", "carried", p50=400.0), rec("torch", "refeed", p50=8000.0, window=50),
               rec("torch", "refeed", p50=2000.0, window=20)]
    report.add_speedups(records)
    got = [r["speedup_vs_eager"] for r in records]
    assert got[:5] == [1.0, 4.0, 1.0, 1.25, None]
    assert got[5:7] == [1.0, 2.5]  # gRPC: aggregate characters per second
    assert records[1]["baseline"].startswith("torch step")
    assert records[8]["details"]["carried_speedup"] == 20.0 and records[9]["details"]["carried_speedup"] == 5.0
    assert records[8]["details"]["step_speedups"] == {"torch": 8000 / 120, "ort-cpu": 8000 / 30}
    assert got[7:] == [None, None, None]  # decodings are eager: their comparison is carried_speedup
    sized = [rec(b, "grpc", p50=None, batch=None, concurrency=8, cps=cps, chunk_chars=k)
             for b, cps, k in (("torch", 1000.0, 1), ("torch", 4000.0, 16), ("ort-cpu", 2000.0, 1),
                               ("ort-cpu", 6000.0, 16))]
    report.add_speedups(sized)  # gRPC at several message sizes: against eager at the same size
    assert [r["speedup_vs_eager"] for r in sized] == [1.0, 1.0, 2.0, 1.5]


def test_thread_counts_compare_like_for_like_and_targets_also_take_each_sides_best():
    def at(backend, p50, threads):
        r = rec(backend, p50=p50)
        r["threads"] = threads
        return r
    records = [at("torch", 300.0, 1), at("torch", 450.0, 2), at("ort-cpu", 140.0, 1), at("ort-cpu", 80.0, 2)]
    report.add_speedups(records)
    assert [r["speedup_vs_eager"] for r in records] == [1.0, 1.0, 300 / 140, 450 / 80]
    assert records[3]["baseline"].startswith("torch t2 step")
    rows = [t for t in report.evaluate_targets(records, []) if t["target"] == "ort_cpu_3x"]
    assert [(t["backend"], t["measured"]) for t in rows] == [
        ("ort-cpu", 300 / 140), ("ort-cpu t2", 450 / 80), ("ort-cpu t2 vs torch", 300 / 80)]


def test_gpu_backends_compare_with_eager_on_the_gpu_when_measured():
    records = [rec("torch", p50=100.0), rec("torch-cuda", p50=60.0), rec("torch-cudagraph", p50=15.0),
               rec("tensorrt", p50=10.0)]
    report.add_speedups(records)
    assert [r["speedup_vs_eager"] for r in records] == [1.0, 1.0, 4.0, 6.0]
    alone = [rec("torch", p50=100.0), rec("tensorrt", p50=10.0)]  # no eager GPU run: the CPU one
    report.add_speedups(alone)
    assert alone[1]["speedup_vs_eager"] == 10.0 and alone[1]["baseline"].startswith("torch ")


def test_limit_is_the_slower_of_memory_and_compute():
    assert report.limit_us(8e6, 4e6, 1e11, 1e11) == {"memory_us": 80.0, "compute_us": 40.0, "limit_us": 80.0,
                                                     "bound": "memory"}
    assert report.limit_us(1e6, 2e9, 1e11, 1e11)["bound"] == "compute"
    # the bandwidth of a working set: the fastest probe at least as large (small probes understate caches)
    probes = {"1000": {"best": 5e10}, "4000": {"best": 9e10}, "100000": {"best": 2e10}}
    assert report.bandwidth_for(probes, 900) == 9e10
    assert report.bandwidth_for(probes, 5000) == 2e10


def test_model_arithmetic_matches_the_parameter_count():
    from train.model import CharRNN, ModelConfig
    for cell in ("rnn", "lstm", "gru"):
        G = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
        m = BenchModel(None, "x", cell, 32, 3, 40, 50, "random")  # V = 40 >= H = 32: as trained
        net = CharRNN(ModelConfig(cell, 40, 32, 3))
        no_embedding = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("embed"))
        assert m.weight_bytes(1) == 4 * (no_embedding + 32)  # plus one embedding row
        assert m.weight_bytes(1000) == 4 * (no_embedding + 40 * 32)  # at most V rows
        assert m.flops(2) == 2 * 2 * (2 * G * 32 * 32 + 2 * 32 * 32 + 32 * 40)
        m = BenchModel(None, "x", cell, 64, 3, 40, 50, "random")  # V = 40 < H = 64: the embedding folded
        net = CharRNN(ModelConfig(cell, 40, 64, 3))
        no_embedding = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("embed"))
        folded = no_embedding - G * 64 * 64 + G * 64 * 40  # input weights G*H x V instead of G*H x H
        assert m.weight_bytes(1) == m.weight_bytes(1000) == 4 * folded
        assert m.flops(2) == 2 * 2 * (G * 64 * 40 + G * 64 * 64 + 2 * 64 * 64 + 64 * 40)


def test_add_limits_marks_each_step_with_its_fraction_of_the_limit():
    wb = MODEL.weight_bytes(1)
    limits = {"cpu t1": {"threads": 1, "matmul_n": 1024, "matmul_flops": {"fp32": {"torch": 5e10, "best": 1e11}},
                      "bandwidth": {str(wb): {"copy": 8e10, "read": 1e11, "best": 1e11}},
                      "dram": {"working_set": 1 << 28, "copy": 2e10, "read": 2.5e10, "best": 2.5e10}}}
    step = rec("ort-cpu", p50=170.0)
    out = report.add_limits([step, rec("ort-cpu", "grpc", p50=None, batch=None, concurrency=1, cps=10.0)],
                            [MODEL], limits)
    memory = wb / 1e11 * 1e6
    assert step["limit_us"] == pytest.approx(memory) and step["x_limit"] == pytest.approx(170.0 / memory)
    [lim] = out
    assert (lim["mode"], lim["backend"], lim["batch"], lim["details"]["bound"]) == ("limit", "machine", 1, "memory")
    assert lim["p50_us"] == pytest.approx(memory)


def test_targets_are_judged_on_this_runs_records():
    ort = rec("ort-cpu", p50=25.0)
    records = [rec("torch", p50=100.0), ort, rec("torch", "carried", p50=300.0),
               rec("torch", "refeed", p50=9000.0, window=50)]
    report.add_speedups(records)
    ort["x_limit"], ort["limit_us"] = 1.4, 18.0
    skipped = [{"what": "backend tensorrt (fp32)", "backend": "tensorrt", "precision": "fp32", "model": None,
                "mode": None, "reason": "TensorRT is not installed."}]
    targets = {(t["target"], t["backend"]): t for t in report.evaluate_targets(records, skipped)}
    assert targets[("ort_cpu_3x", "ort-cpu")]["passed"] and targets[("ort_cpu_3x", "ort-cpu")]["measured"] == 4.0
    assert targets[("carried_20x", "torch")]["measured"] == 30.0 and targets[("carried_20x", "torch")]["passed"]
    assert targets[("carried_20x", "ort-cpu")]["measured"] == 360.0  # the fastest batch-1 step against re-feeding
    assert targets[("limit_3x", "ort-cpu")]["passed"]
    gpu = targets[("gpu_3x", "")]
    assert gpu["passed"] is None and "TensorRT is not installed" in gpu["note"]


def test_int8_targets_compare_with_fp32_and_its_limit():
    fp32_1, fp32_64 = rec("ort-cpu", p50=150.0), rec("ort-cpu", p50=20.0, batch=64)
    int8_1, int8_64 = rec("ort-cpu-int8", p50=60.0), rec("ort-cpu-int8", p50=18.0, batch=64)
    for r in (int8_1, int8_64):
        r["precision"] = "int8"
    limit = rec("machine", "limit", p50=80.0)
    limit["limit_us"] = 80.0
    targets = {t["target"]: t for t in report.evaluate_targets([fp32_1, fp32_64, int8_1, int8_64, limit], [])}
    assert targets["int8_1.5x"]["measured"] == 2.5 and targets["int8_1.5x"]["passed"]
    assert targets["int8_64_1.3x"]["measured"] == pytest.approx(20 / 18) and targets["int8_64_1.3x"]["passed"] is False
    assert targets["int8_under_fp32_limit"]["measured"] == 0.75 and targets["int8_under_fp32_limit"]["passed"]
    assert targets["int8_1.5x"]["backend"] == "ort-cpu-int8"  # its label names the precision once
    assert report.evaluate_targets([fp32_1], []) and all(
        t["passed"] is None for t in report.evaluate_targets([fp32_1], []) if t["target"].startswith("int8"))


def test_summary_divides_calls_into_characters():
    s = summary_us(np.array([1e-3, 2e-3, 3e-3]), per=10)
    assert s["p50"] == pytest.approx(200.0) and s["mean"] == pytest.approx(200.0)


# --- models, options, backends --------------------------------------------------------------------

def test_grid_runs_give_one_finished_model_per_cell_and_hidden_size(tmp_path):
    grid = tmp_path / "grid"
    for seq, fc in ((20, 1), (50, 2), (50, 3)):
        make_checkpoint(grid, "lstm", 16, fc, seq)
    make_checkpoint(grid, "gru", 16, 1, 30)
    unfinished = make_checkpoint(grid, "gru", 24, 1, 50)
    cfg = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**cfg, "done": False}))
    chosen = find_models([grid])
    assert [m.model_id for m in chosen] == ["gru-h16-fc1-s30", "lstm-h16-fc2-s50"]  # seq 50 first, then fewest fc
    assert [m.model_id for m in find_models([grid], cells=("lstm",))] == ["lstm-h16-fc2-s50"]
    direct = find_models([grid / "lstm-h16-fc1-s20"])  # named directly: taken as it is
    assert [(m.model_id, m.seq_len, m.weights) for m in direct] == [("lstm-h16-fc1-s20", 20, "trained")]
    with pytest.raises(CheckpointError, match="not a finished checkpoint"):
        find_models([unfinished])
    with pytest.raises(CheckpointError, match="no finished checkpoints"):
        find_models([tmp_path / "grid"], hidden_sizes=(999,))


def test_options_and_presets():
    quick = parse_args(["--quick", "--batches", "1,4", "--seconds", "0.5"])
    assert quick.batches == (1, 4) and quick.seconds == 0.5 and quick.cells == ("lstm", "gru")
    assert quick.hidden_sizes == (128, 512) and quick.explicit == {"seconds"}
    assert BenchConfig().cells == ("rnn", "lstm", "gru") and BenchConfig().threads == (1,)
    assert parse_args(["--threads", "1,2"]).threads == (1, 2)
    assert BenchConfig().chunk_chars == quick.chunk_chars == (1, 16)
    assert parse_args(["--chunk-chars", "1,4"]).chunk_chars == (1, 4)
    for bad in (["--backends", "torch,nope"], ["--modes", "step,fast"], ["--batches", "0"], ["--threads", "0"],
                ["--threads", "2,2"], ["--chunk-chars", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_backends_that_cannot_run_say_why():
    assert unavailable("torch") is None and unavailable("ort-cpu") is None
    assert "fp32" in unavailable("torch", "fp16")
    if not torch.cuda.is_available():
        for name in ("torch-cuda", "torch-cudagraph", "ort-cuda", "ort-trt", "tensorrt"):
            assert unavailable(name), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU (torch.cuda.is_available())")
def test_cuda_graph_steps_match_eager_pytorch(tmp_path):
    from export.runtime import TorchRuntime
    ckpt = make_checkpoint(tmp_path, "gru", 32, 2)
    eager, graphed = TorchRuntime(ckpt, device="cuda"), CudaGraphRuntime(ckpt)
    for B in (1, 3):
        tokens = np.random.default_rng(B).integers(0, len(eager.vocab), (B, 1))
        se, sg = eager.new_state(B), graphed.new_state(B)
        for _ in range(20):
            le, se = eager.step(tokens, se)
            lg, sg = graphed.step(tokens, sg)
            np.testing.assert_allclose(lg, le, atol=1e-5, rtol=1e-5)


def test_step_timer_interleaves_backends_and_counts_calls(tmp_path):
    from export.runtime import TorchRuntime
    ckpt = make_checkpoint(tmp_path, "rnn", 16, 1)
    threads = torch.get_num_threads()
    subjects = [Subject("torch", "cpu", "fp32", TorchRuntime(ckpt)),
                Subject("torch", "cpu", "fp16", TorchRuntime(ckpt)),
                Subject("torch", "cpu", "fp32", TorchRuntime(ckpt), threads=2)]
    try:
        times = time_steps(subjects, 2, seconds=0.01, max_calls=12, min_calls=12, rounds=4)
    finally:
        torch.set_num_threads(threads)
    assert set(times) == {"torch fp32 t1", "torch fp16 t1", "torch fp32 t2"}
    assert all(len(t) == 12 and (t > 0).all() for t in times.values())


def test_grpc_targets_compare_64_streams_with_one_and_one_stream_with_the_in_process_loop():
    def grpc(concurrency, cps, chunk_chars, mean_us=None):
        r = rec("ort-cpu", "grpc", p50=None, batch=None, concurrency=concurrency, cps=cps, chunk_chars=chunk_chars,
                server_cpus=[0, 1], client_cpus=[2, 3], max_chars=500, wall_s=2.0,
                server_cpu_s={"front": 1.0, "workers": 1.8}, client_cpu_s=0.9)
        r["mean_us"] = mean_us
        return r

    records = [rec("ort-cpu", "loop", p50=40.0), rec("ort-cpu", "loop", p50=4.0, batch=64, cps=250000.0),
               grpc(1, 5000.0, 1, mean_us=200.0), grpc(64, 60000.0, 1),
               grpc(1, 10000.0, 16, mean_us=70.0), grpc(64, 90000.0, 16)]
    targets = [t for t in report.evaluate_targets(records, []) if t["target"].startswith("grpc")]
    batching = {t["note"].split(" ")[0]: t for t in targets if t["target"] == "grpc_batching_10x"}
    assert batching["1"]["measured"] == 12.0 and batching["1"]["passed"]
    assert batching["16"]["measured"] == 9.0 and batching["16"]["passed"] is False
    latency = {t["note"].split(" ")[0]: t for t in targets if t["target"] == "grpc_one_stream_2x"}
    assert latency["1"]["measured"] == 5.0 and latency["1"]["passed"] is False
    assert latency["16"]["measured"] == 1.75 and latency["16"]["passed"]
    assert all("500 per request" in t["note"] and "server on CPUs 0,1, load generator on CPUs 2,3" in t["note"]
               for t in targets)
    assert all("CPU cores busy: server 0.50 (front end) + 0.90 (workers), load generator 0.45, of 4" in t["note"]
               for t in targets)
    assert "in-process 10.0x" in batching["1"]["note"]  # the loop: 64 / 4 us per character against 1 / 40 us
    # the gRPC floor (no model) at the same chars/msg goes beside each; coalesced points have none
    floor = [{"concurrency": c, "chunk_chars": 1, "chars_per_s": cps, "mean_us": c / cps * 1e6,
              "details": {"coalesce": False}} for c, cps in ((1, 8000.0), (64, 14000.0))]
    with_floor = [t for t in report.evaluate_targets(records, [], floor) if t["target"].startswith("grpc")]
    notes = {(t["target"], t["note"].split(" ")[0]): t["note"] for t in with_floor}
    assert "the gRPC floor (no model) 1.8x: 14,000 vs 8,000 chars/s" in notes["grpc_batching_10x", "1"]
    assert "200 vs 40.0 us per character (the gRPC floor, no model: 125)" in notes["grpc_one_stream_2x", "1"]
    assert "floor" not in notes["grpc_batching_10x", "16"] + notes["grpc_one_stream_2x", "16"]
    missing = {t["target"]: t for t in report.evaluate_targets([rec("ort-cpu", p50=40.0)], [])}
    assert missing["grpc_batching_10x"]["passed"] is None
    assert "concurrency 1 and 64" in missing["grpc_batching_10x"]["note"]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="this system cannot restrict a process's CPUs")
def test_the_http_target_compares_sse_with_coalesced_grpc_at_64_streams_on_the_same_server():
    def served(mode, concurrency, cps, coalesce=True):
        return rec("ort-cpu", mode, p50=None, batch=None, concurrency=concurrency, cps=cps, chunk_chars=1,
                   coalesce=coalesce, max_chars=200, server_cpus=[0, 1], client_cpus=[0, 1], wall_s=2.0,
                   server_cpu_s={"front": 1.0, "workers": 1.0}, client_cpu_s=0.5)

    records = [served("grpc", 64, 30000.0), served("grpc", 64, 50000.0, coalesce=False), served("http", 64, 24000.0),
               served("grpc", 1, 2000.0), served("http", 1, 1000.0)]
    (t,) = [t for t in report.evaluate_targets(records, []) if t["target"] == "http_1_5x"]
    assert t["measured"] == pytest.approx(1.25) and t["passed"] and "gRPC 30,000 vs HTTP 24,000" in t["note"]
    (t,) = [t for t in report.evaluate_targets(records[:2], []) if t["target"] == "http_1_5x"]
    assert t["passed"] is None and "http modes at concurrency 64" in t["note"]


def test_cpu_lists_are_parsed_and_checked():
    usable = sorted(os.sched_getaffinity(0))
    cfg = parse_args(["--server-cpus", f"{usable[0]}-{usable[0]}", "--client-cpus", f"{usable[-1]}"])
    assert cfg.server_cpus == (usable[0],) and cfg.client_cpus == (usable[-1],)
    with pytest.raises(SystemExit):  # a CPU this process may not use
        parse_args(["--server-cpus", str(max(usable) + 1)])


def test_the_load_generator_takes_a_process_per_cpu_of_its_own():
    assert client_processes((2, 3, 4, 5), (0, 1), 64) == 4
    assert client_processes((2, 3, 4, 5), (0, 1), 2) == 2  # no process without a stream
    assert client_processes((1, 2), (0, 1), 64) == 1  # sharing a CPU with the server
    assert client_processes((2, 3), (), 64) == 1  # the server may run anywhere
    assert client_processes((), (0, 1), 64) == 1


def test_the_grpc_floor_streams_text_in_the_asked_chunks_and_bounds_requests(tmp_path):
    with FloorProcess(tmp_path) as target, grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        (model,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        replies = list(stub.Generate(api.generate_request(model.id, "a", max_chars=25, chunk_chars=4), timeout=10))
        assert [len(r.text) for r in replies] == [4, 4, 4, 4, 4, 4, 1]
        assert "".join(r.text for r in replies) == floor.TEXT[:25]
        assert replies[-1].finish_reason == pb.FINISH_REASON_LENGTH and replies[-1].stats.generated_chars == 25
        assert not any(r.finish_reason for r in replies[:-1])
        for request, code in [(api.generate_request("nope"), grpc.StatusCode.NOT_FOUND),
                              (api.generate_request(model.id, max_chars=floor.MAX_CHARS + 1),
                               grpc.StatusCode.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(request, timeout=10))
            assert e.value.code() == code


# --- the report: schema and a whole --quick run ---------------------------------------------------

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
PIN = ["--server-cpus", str(CPUS[0]), "--client-cpus", str(CPUS[1])] if len(CPUS) >= 2 else []

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """--quick on the smallest model, few iterations: every mode, every file."""
    out = tmp_path_factory.mktemp("reports")
    argv = ["--quick", "--cells", "lstm", "--hidden-sizes", "16", "--batches", "1,8", "--concurrency", "1,8",
            "--chunk-chars", "1,4", "--max-calls", "20", "--seconds", "0.02", "--refeed-chars", "25",
            "--grpc-chars", "8", "--out", str(out), *PIN]
    assert main(argv) == 0
    return out, json.loads((out / "latency.json").read_text())


def test_quick_run_writes_every_file(quick_run):
    out, rep = quick_run
    names = {p.name for p in out.iterdir()}
    assert {"latency.json", "latency.md", "step_batch1.png", "step_batches.png", "decoding.png", "grpc.png",
            "limit.png"} <= names
    md = (out / "latency.md").read_text()
    for heading in ("## Targets", "## Step: one character", "## Step: batch sweep", "## Carried state",
                    "## gRPC end to end", "## Limit", "## Not measured"):
        assert heading in md
    assert "| concurrency | chars/msg |" in md and "| of floor |" in md
    assert md.count("| gRPC floor | no model |") == 4
    assert rep["machine"]["cpu"] and rep["machine"]["versions"]["torch"] == torch.__version__


def test_quick_run_validates_against_its_schema_and_covers_every_mode(quick_run):
    jsonschema = pytest.importorskip("jsonschema")  # a dev dependency; the other tests run without it
    _, rep = quick_run
    jsonschema.validate(rep, report.schema())
    modes = {(r["mode"], r["backend"]) for r in rep["records"]}
    assert {("step", "torch"), ("step", "ort-cpu"), ("carried", "torch"), ("refeed", "torch"), ("grpc", "torch"),
            ("grpc", "ort-cpu"), ("http", "torch"), ("http", "ort-cpu"), ("limit", "machine")} <= modes
    grpc = [r for r in rep["records"] if r["mode"] == "grpc"]
    http = [r for r in rep["records"] if r["mode"] == "http"]  # beside each coalesced gRPC point, on each server
    coalesced = sorted((r["backend"], r["concurrency"], report.msg_label(r)) for r in grpc if r["details"]["coalesce"])
    assert sorted((r["backend"], r["concurrency"], report.msg_label(r)) for r in http) == coalesced
    assert {(b, c) for b, c, _ in coalesced} >= {(b, c) for b in ("ort-cpu", "torch") for c in (1, 8)}
    assert all(r["details"]["errors"] == {} and r["chars_per_s"] > 0 for r in http)
    assert {r["batch"] for r in rep["records"] if r["mode"] == "step"} == {1, 8}
    for backend in ("torch", "ort-cpu"):  # every (concurrency, chars per message) asked for, on each server
        assert sorted((r["concurrency"], report.msg_label(r)) for r in grpc if r["backend"] == backend) == [
            (1, "1"), (1, "1+"), (1, "4"), (8, "1"), (8, "1+"), (8, "4")]
    assert all(r["details"]["loadgen"]["chunk_chars"] == r["chunk_chars"] for r in grpc)
    assert all(r["details"]["chars_per_msg"] == r["chunk_chars"] for r in grpc if not r["details"]["coalesce"])
    assert all(r["details"]["chars_per_msg"] >= 1 for r in grpc if r["details"]["coalesce"])
    assert rep["settings"]["chunk_chars"] == [1, 4] and rep["settings"]["coalesce"] == [1]
    assert all(r["details"]["errors"] == {} for r in rep["records"] if r["mode"] == "grpc")
    assert all(r["details"]["client_cpu_s"] > 0 for r in grpc)  # what each side of the run kept busy
    # the gRPC floor at every point but the coalesced ones, once for the run
    assert sorted((f["concurrency"], f["chunk_chars"]) for f in rep["grpc_floor"]) == [(1, 1), (1, 4), (8, 1), (8, 4)]
    assert all(f["details"]["errors"] == {} and f["chars_per_s"] > 0 for f in rep["grpc_floor"])
    if os.path.exists("/proc/self/stat"):
        servers = [r["details"]["server_cpu_s"] for r in grpc]
        assert all(s["front"] >= 0 and s["workers"] >= 0 for s in servers)
        assert sum(s["workers"] for s in servers) > 0  # the model steps in the worker processes
    # int8: its own backend, timed at int8 whatever --precisions, with a limit at one byte per weight
    int8 = [r for r in rep["records"] if r["backend"] == "ort-cpu-int8" and r["mode"] == "step"]
    assert {r["batch"] for r in int8} == {1, 8} and all(r["precision"] == "int8" for r in int8)
    limits = {(r["model"], r["precision"], r["batch"]): r for r in rep["records"] if r["mode"] == "limit"}
    for r in int8:
        lim32, lim8 = limits[(r["model"], "fp32", r["batch"])], limits[(r["model"], "int8", r["batch"])]
        assert lim8["details"]["weight_bytes"] * 4 == lim32["details"]["weight_bytes"]
    assert "ort-cpu-int8 |" in (quick_run[0] / "latency.md").read_text()
    measured = {r["backend"] for r in rep["records"]}
    for name in BACKENDS:  # every backend is either measured or listed with its reason
        assert name in measured or any(s["backend"] == name and s["reason"] for s in rep["skipped"]), name


def test_quick_run_kept_the_server_and_the_load_generator_on_their_cpus(quick_run):
    if not PIN:
        pytest.skip("needs two usable CPUs")
    out, rep = quick_run
    grpc = [r for r in rep["records"] if r["mode"] == "grpc"]
    assert grpc and all(r["details"]["server_cpus"] == [CPUS[0]] and r["details"]["client_cpus"] == [CPUS[1]]
                        for r in grpc)
    assert f"server on CPUs {CPUS[0]}, load generator on CPUs {CPUS[1]}" in (out / "latency.md").read_text()
    one_stream = [t for t in rep["targets"] if t["target"] == "grpc_one_stream_2x"]
    assert one_stream and all(t["measured"] > 0 for t in one_stream)  # judged on this run's loop and grpc records
    loops = [r for r in rep["records"] if r["mode"] == "loop"]
    assert {(r["backend"], r["batch"]) for r in loops} == {(b, c) for b in ("torch", "ort-cpu", "ort-cpu-int8")
                                                           for c in (1, 8)}
    assert all(r["samples"] == 8 for r in loops)


def test_quick_run_speedups_are_its_own_records_ratios(quick_run):
    _, rep = quick_run
    step = {(r["backend"], r["batch"]): r for r in rep["records"] if r["mode"] == "step"}
    for (_, batch), r in step.items():
        assert r["speedup_vs_eager"] == pytest.approx(step[("torch", batch)]["p50_us"] / r["p50_us"])
        assert r["x_limit"] == pytest.approx(r["p50_us"] / r["limit_us"])
        assert r["details"]["call_us"]["p50"] == pytest.approx(r["p50_us"] * batch)


def test_schema_rejects_a_malformed_report(quick_run):
    jsonschema = pytest.importorskip("jsonschema")
    _, rep = quick_run
    for damage in (lambda r: r["records"][0].pop("p50_us"), lambda r: r["records"][0].update(mode="fast"),
                   lambda r: r["records"][0].update(extra=1), lambda r: r.pop("machine"),
                   lambda r: r["skipped"].append({"what": "x", "reason": ""})):
        bad = copy.deepcopy(rep)
        damage(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, report.schema())


def test_named_models_that_do_not_exist_fail_cleanly(tmp_path, caplog):
    assert main(["--models", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such checkpoint or grid run directory" in caplog.text
