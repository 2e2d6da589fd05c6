"""The generation server over real sockets: a real server on an ephemeral loopback port, real gRPC clients.

Every generated text is checked against eager PyTorch (`train.sampling.generate`, carried state):
greedy character for character, and seeded sampling too (the server uses the same sampler with a
per-stream generator, so the same seed must give the same text whatever else is batched).
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import serve.link
import serve.server
from clients import api
from export.runtime import TorchRuntime
from protos.charrnn.v1 import charrnn_pb2 as pb
from serve.batch import Batch, Prefilled, Row
from serve.config import ServerConfig
from serve.errors import NotFound, SessionBusy
from serve.metrics import ModelMetrics
from serve.background import BackgroundServer
from serve.sessions import Session, SessionCache
from serve.types import FinishReason, GenerateRequest, SessionState
from train.checkpoint import load_checkpoint, save_weights
from train.sampling import generate
from train.vocab import Vocab

CELLS = ("rnn", "lstm", "gru")
TEXT = "the quick brown fox jumps over the lazy dog.\nTHE END!\n"
BIG = 100_000  # max_chars of the long streams (the small servers' cap): far longer than any test waits


def make_models(root, cells=CELLS, hidden=32):
    """Random-weight checkpoints, weights scaled x3 so that greedy text varies instead of repeating one char."""
    for i, cell in enumerate(cells):
        ckpt = make_checkpoint(root, cell=cell, hidden=hidden, fc=1, text=TEXT, seed=i + 1)
        model = load_checkpoint(ckpt).model
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
        save_weights(ckpt / "model.safetensors", model)
    return root


def model_name(cell, hidden=32):
    return f"{cell}-h{hidden}-fc1-s16"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def eager(models_dir):
    """Model id -> Checkpoint (the eager PyTorch reference)."""
    return {model_name(c): load_checkpoint(models_dir / model_name(c)) for c in CELLS}


def reference(eager, model, prompt, n, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    ck = eager[model]
    return generate(ck.model, ck.vocab, prompt, n, temperature, top_k, top_p, seed)


class Sealed:
    """Hidden state that refuses to leave its process, as device memory (CUDA tensors, TensorRT buffers) must."""

    def __init__(self, parts):
        self.parts = parts

    def __reduce__(self):
        raise TypeError("this state must never be pickled: it stands for device memory")


class SealedRuntime(TorchRuntime):
    """A real TorchRuntime whose state objects cannot cross a process boundary."""

    def new_state(self, batch):
        return Sealed(super().new_state(batch))

    def step(self, tokens, state):
        logits, parts = super().step(tokens, state.parts)
        return logits, Sealed(parts)

    def take(self, state, rows):
        return Sealed(super().take(state.parts, rows))

    def concat(self, states):
        return Sealed(super().concat([s.parts for s in states]))


def open_sealed(paths, backend, providers, threads):
    """serve.backends.open_runtimes for SealedRuntime: what a worker process calls to open its models."""
    return {p.parent.name: SealedRuntime(p.parent) for p in paths}


@pytest.fixture(scope="module", params=[1, 0, "sealed"], ids=["worker-process", "threads", "sealed-state"])
def server(models_dir, request):
    """The protocol tests run against both homes of the worker: a process (the default) and the server's own
    process (--workers 0); and against a worker process whose runtime's state refuses to be pickled (GPU-safe
    by construction: state never leaves the worker, not for sessions, not at the end of a stream)."""
    sealed = request.param == "sealed"
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, metrics_port=0, max_chars=2000, workers=1 if sealed else request.param)
    with BackgroundServer(cfg, opener=open_sealed if sealed else serve.server.open_runtimes) as bg:
        yield bg


def test_sealed_state_really_refuses_to_be_pickled(models_dir):
    import pickle

    rt = SealedRuntime(models_dir / model_name("lstm"))
    with pytest.raises(TypeError, match="never be pickled"):
        pickle.dumps(rt.new_state(1))


@pytest.fixture(scope="module")
def stub(server):
    return api.stub(server.target)


def run(stub, **kw):
    """(text, message texts, last message) of one Generate call."""
    msgs = list(stub.Generate(api.generate_request(**kw), timeout=60))
    return "".join(m.text for m in msgs), [m.text for m in msgs], msgs[-1]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


# the protocol


def test_list_models(stub, eager):
    models = {m.id: m for m in api.list_models(stub)}
    assert set(models) == set(eager)
    m = models[model_name("lstm")]
    assert (m.cell, m.hidden_size, m.fc_layers, m.backend) == ("lstm", 32, 1, "torch")
    assert m.vocab == eager[m.id].vocab.chars


@pytest.mark.parametrize("cell", CELLS)
def test_greedy_equals_eager(stub, eager, cell):
    model = model_name(cell)
    want = reference(eager, model, "the quick ", 120)
    for chunk in (1, 7):
        text, parts, last = run(stub, model=model, prompt="the quick ", max_chars=120, chunk_chars=chunk)
        assert text == want
        assert all(len(p) == chunk for p in parts[:-1]) and 1 <= len(parts[-1]) <= chunk
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.stats.generated_chars == 120 and last.stats.prompt_chars == 10
        assert 0 < last.stats.time_to_first_char_s <= last.stats.total_s and last.stats.chars_per_second > 0


def test_coalesced_messages_carry_what_was_ready_with_the_same_text(server, eager):
    """coalesce: what the server made while the client was not reading goes out together in the next message
    (chunk_chars or more per message, never split), and the text is the same."""
    model = model_name("lstm")
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]  # grpc holds only ~1 KB
    stub = api.pb_grpc.GeneratorStub(grpc.insecure_channel(server.target, options))
    call = stub.Generate(api.generate_request(model, "the quick ", 2000, chunk_chars=2, coalesce=True), timeout=60)
    first = next(call)
    time.sleep(0.3)  # the client reads nothing: grpc's window fills, and the server's messages wait for it
    msgs = [first, *call]
    parts = [m.text for m in msgs]
    assert "".join(parts) == reference(eager, model, "the quick ", 2000)
    assert all(len(p) % 2 == 0 for p in parts[:-1]) and max(map(len, parts)) > 2
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and msgs[-1].stats.generated_chars == 2000


def test_coalescing_streams_all_get_their_text_and_a_stalled_one_holds_up_no_one(models_dir, eager):
    """Eight coalescing streams at once all get their text; a client that stops reading keeps its stream (its
    credit runs out, it leaves the batch) and another stream, in a batch of one, is served meanwhile."""
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, max_chars=BIG, max_batch=1, max_unsent=4, workers=0)
    with BackgroundServer(cfg) as bg:
        model, prompts = model_name("gru"), ["the ", "a dog ", "over ", "quick ", "lazy ", "fox ", "it ", "and "]
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda p: run(api.stub(bg.target), model=model, prompt=p, max_chars=200,
                                                coalesce=True)[0], prompts))
        assert texts == [reference(eager, model, p, 200) for p in prompts]
        options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        stalled = api.pb_grpc.GeneratorStub(grpc.insecure_channel(bg.target, options))
        call = stalled.Generate(api.generate_request(model, "the ", BIG, coalesce=True), timeout=60)
        next(call)
        time.sleep(0.3)  # its writes now wait for a client that reads nothing
        other = api.stub(bg.target).Generate(api.generate_request(model, "dog", 300, coalesce=True), timeout=20)
        assert "".join(m.text for m in other) == reference(eager, model, "dog", 300)
        call.cancel()


def test_a_batch_gives_each_row_the_text_it_would_have_alone(models_dir):
    """Batch.filter and Batch.concatenate mid-chunk (rows leave and join between steps, as credit and arrivals
    make them) against each row stepped alone in a batch of one: the same messages, finishes and stats."""
    rt = TorchRuntime(models_dir / model_name("lstm"))
    vocab = rt.vocab
    reqs = [GenerateRequest("m", "ab", max_chars=30 + 7 * i, temperature=[0.0, 1.0, 0.7][i % 3], top_k=[0, 3][i % 2],
                            top_p=[1.0, 0.8][i // 3 % 2], seed=i, chunk_chars=1 + i % 5,
                            stop=(("at", "D.") if i % 4 == 1 else ())) for i in range(10)]
    clock = iter(range(1, 10**6))

    def prefilled(i):
        _, state = rt.step(vocab.encode("th")[None], rt.new_state(1))
        return Prefilled(Row(i, reqs[i], SessionState.NONE, 0.0), vocab.encode("e"), state, 10**6)

    def messages(batch_of_rows):
        got = {}
        batch = Batch.from_requests(batch_of_rows, rt)
        while batch is not None:
            for i, text, finish, stats in batch.step(rt, lambda: float(next(clock))):
                got.setdefault(batch.ids[i], []).append((text, finish, stats and stats.generated_chars))
            batch = batch.filter([i for i in range(len(batch)) if not any(e[1] for e in got.get(batch.ids[i], []))], rt)
        return got

    alone = {}
    for i in range(len(reqs)):
        alone.update(messages([prefilled(i)]))
    together, batch, step = {}, None, 0
    joins = {0: range(0, 6), 3: range(6, 8), 40: range(8, 10)}
    while batch is not None or step <= 40:
        if step in joins:
            batch = Batch.concatenate([batch, Batch.from_requests([prefilled(i) for i in joins[step]], rt)], rt)
        if batch is not None:
            for i, text, finish, stats in batch.step(rt, lambda: float(next(clock))):
                together.setdefault(batch.ids[i], []).append((text, finish, stats and stats.generated_chars))
            done = {sid for sid, msgs in together.items() if msgs[-1][1] is not None}
            keep = [i for i, sid in enumerate(batch.ids) if sid not in done]
            if step % 5 == 2 and len(keep) > 1:  # one row leaves mid-chunk and rejoins at the end
                out, keep = batch.filter(keep[:1], rt), keep[1:]
                batch = Batch.concatenate([batch.filter(keep, rt), out], rt)
            else:
                batch = batch.filter(keep, rt)
        step += 1
    assert together == alone
    kinds = {m[1] for msgs in alone.values() for m in msgs}
    assert {None, FinishReason.LENGTH, FinishReason.STOP} <= kinds


@pytest.mark.parametrize("cell", CELLS)
def test_seeded_sampling_equals_eager(stub, eager, cell):
    model = model_name(cell)
    kw = dict(temperature=0.9, top_k=12, top_p=0.95, seed=1234)
    text, _, last = run(stub, model=model, prompt="over the ", max_chars=150, **kw)
    assert text == reference(eager, model, "over the ", 150, **kw)
    assert last.stats.seed == 1234
    unseeded = run(stub, model=model, prompt="over the ", max_chars=40, temperature=1.0)
    assert unseeded[0] == reference(eager, model, "over the ", 40, 1.0, seed=unseeded[2].stats.seed)


@pytest.mark.parametrize("cell", CELLS)
def test_session_continues_where_it_stopped(stub, eager, cell):
    model, sid = model_name(cell), f"cont-{cell}"
    first, _, a = run(stub, model=model, prompt="the ", max_chars=50, session_id=sid)
    second, _, b = run(stub, model=model, max_chars=50, session_id=sid, require_session=True)
    assert first + second == run(stub, model=model, prompt="the ", max_chars=100)[0]
    assert first + second == reference(eager, model, "the ", 100)
    assert (a.stats.session, b.stats.session) == (pb.SESSION_STATE_NEW, pb.SESSION_STATE_CONTINUED)
    third, _, _ = run(stub, model=model, prompt=" and the ", max_chars=30, session_id=sid)  # a new prompt mid-session
    assert third == reference(eager, model, "the " + first + second + " and the ", 30)


def test_predict_top_k_probabilities(stub, eager):
    model = model_name("gru")
    ck = eager[model]
    with torch.inference_mode():
        logits, _ = ck.model(torch.from_numpy(ck.vocab.encode("the lazy ")).unsqueeze(0))
    p = torch.softmax(logits[0, -1].double(), -1).numpy()
    got = api.predict(stub, model, "the lazy ", top_k=4)
    order = np.argsort(-p, kind="stable")[:4]
    assert [c for c, _ in got] == [ck.vocab.chars[i] for i in order]
    np.testing.assert_allclose([q for _, q in got], p[order], rtol=1e-5)
    assert len(api.predict(stub, model, "the lazy ")) == 5  # top_k 0: the default
    assert len(api.predict(stub, model, "the lazy ", top_k=500)) == len(ck.vocab)


def test_stop_sequences(stub, eager):
    model = model_name("rnn")
    full = reference(eager, model, "the ", 200)
    stop = full[40:43]
    end = full.index(stop) + len(stop)
    text, _, last = run(stub, model=model, prompt="the ", max_chars=200, stop=[stop, "never!!"], chunk_chars=5)
    assert text == full[:end]  # the stop sequence is included
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.stats.stop == stop


def test_32_concurrent_streams_all_correct(server, eager):
    """Mixed models, prompts, lengths, chunking, greedy and seeded sampling: each as if it ran alone."""
    stub = api.stub(server.target)
    jobs = []
    for i in range(32):
        model = model_name(CELLS[i % 3])
        prompt = TEXT[i % 20: i % 20 + 1 + i % 7]
        sampling = dict(temperature=0.8, top_k=0, top_p=0.9, seed=100 + i) if i % 2 else {}
        jobs.append(dict(model=model, prompt=prompt, max_chars=60 + 5 * i, chunk_chars=1 + i % 4, **sampling))
    model = model_name("lstm")
    alone = api.predict(stub, model, "the lazy ", top_k=3)
    with ThreadPoolExecutor(40) as pool:
        results = pool.map(lambda kw: run(stub, **kw), jobs)
        predictions = pool.map(lambda _: api.predict(stub, model, "the lazy ", top_k=3), range(8))  # in the same steps
        results, predictions = list(results), list(predictions)
    for kw, (text, _, last) in zip(jobs, results):
        sampling = {k: kw[k] for k in ("temperature", "top_k", "top_p", "seed") if k in kw}
        assert text == reference(eager, kw["model"], kw["prompt"], kw["max_chars"], **sampling), kw
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
    for got in predictions:  # batched with other rows: the same up to float rounding
        assert [c for c, _ in got] == [c for c, _ in alone]
        np.testing.assert_allclose([q for _, q in got], [q for _, q in alone], rtol=1e-5)


def test_seeded_sampling_reproducible_under_load(server):
    stub = api.stub(server.target)
    target = dict(model=model_name("lstm"), prompt="jumps ", max_chars=200, temperature=1.0, seed=77)
    alone = run(stub, **target)[0]
    noise = [dict(model=model_name("lstm"), prompt=TEXT[i:i + 3], max_chars=150, temperature=1.2, seed=i)
             for i in range(15)]
    with ThreadPoolExecutor(18) as pool:
        futures = [pool.submit(run, stub, **target) for _ in range(3)] + [pool.submit(run, stub, **kw) for kw in noise]
        texts = [f.result()[0] for f in futures]
    assert texts[:3] == [alone] * 3


def test_health(server):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    for name in ["", "charrnn.v1.Generator", model_name("rnn")]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)) \
        == grpc.StatusCode.NOT_FOUND


def test_reflection(server):
    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(server.target))
    services = set(db.get_services())
    assert {"charrnn.v1.Generator", "grpc.health.v1.Health"} <= services
    service = DescriptorPool(db).FindServiceByName("charrnn.v1.Generator")  # built from the server's answers
    assert set(service.methods_by_name) == {"ListModels", "Generate", "Predict"}
    method = service.methods_by_name["Generate"]
    assert method.server_streaming and method.output_type.full_name == "charrnn.v1.GenerateResponse"


def test_metrics(server, stub):
    run(stub, model=model_name("gru"), prompt="a", max_chars=20)
    code_of(lambda: run(stub, model="nope", prompt="a"))
    # the count goes up as the handler ends, which can be just after the client has its status
    assert wait_until(lambda: metric(server, 'charrnn_requests_total{code="NOT_FOUND",method="Generate"}') > 0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    for name in ["charrnn_time_to_first_char_seconds_count", "charrnn_inter_char_seconds_bucket",
                 "charrnn_batch_size_count", "charrnn_active_streams", "charrnn_sessions",
                 'charrnn_requests_total{code="OK",method="Generate"}',
                 'charrnn_requests_total{code="NOT_FOUND",method="Generate"}']:
        assert name in body, name


# the onnxruntime backend: the same server on exported step models


@pytest.fixture(scope="module")
def ort_server(models_dir, tmp_path_factory):
    from export.onnx import export_onnx
    from export.parity import ParitySpec

    exports = tmp_path_factory.mktemp("exports")
    quick = ParitySpec(batches=(1, 3), prefills=(5,), steps=20)  # the export's own tests run the full check
    for cell in CELLS:
        export_onnx(models_dir / model_name(cell), exports / model_name(cell), parity=quick)
    cfg = ServerConfig(models=exports, backend="onnxruntime", providers="cpu", threads=1, port=0, http_port=0)
    with BackgroundServer(cfg) as bg:
        yield bg


@pytest.mark.parametrize("cell", CELLS)
def test_onnxruntime_backend_equals_eager(ort_server, eager, cell):
    stub = api.stub(ort_server.target)
    model = model_name(cell)
    assert {m.id: m.backend for m in api.list_models(stub)}[model] == "onnxruntime"
    assert run(stub, model=model, prompt="the quick ", max_chars=120)[0] == reference(eager, model, "the quick ", 120)
    kw = dict(temperature=0.9, top_k=12, top_p=0.95, seed=1234)
    assert run(stub, model=model, prompt="over the ", max_chars=150, **kw)[0] == \
        reference(eager, model, "over the ", 150, **kw)
    sid = f"ort-{cell}"
    halves = [run(stub, model=model, prompt=p, max_chars=50, session_id=sid)[0] for p in ("the ", "")]
    assert "".join(halves) == reference(eager, model, "the ", 100)


def test_a_server_of_exports_never_loads_torch(ort_server):
    """torch costs a process ~1 s to import and ~185 MB; a server of exports (front end, workers) needs none of it."""
    code = "import sys, serve.server, clients.generate, clients.loadgen; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
    workers = ort_server.server.engine.links
    assert workers
    for w in workers:  # what the running worker process has mapped (Linux)
        maps = Path(f"/proc/{w.process.pid}/maps")
        if maps.exists():
            assert "libtorch" not in maps.read_text()
            assert "onnxruntime" in maps.read_text()


def test_the_server_loads_at_start_what_a_first_request_would_load():
    """numpy loads numpy.random lazily (~18 ms), and a worker would load the batch module when it meets its first
    stream: both at start, so the first request's first character is not late (it was by ~15 ms)."""
    for module in ("serve.server", "serve.worker"):
        code = f"import sys, {module}; sys.exit(not {{'numpy.random', 'serve.batch'}} <= set(sys.modules))"
        assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0, module


def test_model_files_name_the_checkpoint_config():
    from serve.backends import MODEL_FILES
    from train.checkpoint import CONFIG

    assert MODEL_FILES["torch"] == CONFIG


# bad requests

GOOD = dict(model=model_name("lstm"), prompt="the ", max_chars=10)
BAD = [
    ("unknown model", dict(GOOD, model="lstm-h9999-fc1-s1"), grpc.StatusCode.NOT_FOUND),
    ("empty model name", dict(GOOD, model=""), grpc.StatusCode.INVALID_ARGUMENT),
    ("character outside the vocabulary", dict(GOOD, prompt="the Zebra"), grpc.StatusCode.INVALID_ARGUMENT),
    ("negative temperature", dict(GOOD, temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT),
    ("NaN temperature", dict(GOOD, temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
    ("top_p 0", dict(GOOD, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT),
    ("top_p above 1", dict(GOOD, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT),
    ("max_chars over the cap", dict(GOOD, max_chars=2001), grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown session when required", dict(GOOD, session_id="never-seen", require_session=True),
     grpc.StatusCode.NOT_FOUND),
    ("nothing to continue", dict(GOOD, prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
    ("empty prompt, unknown session", dict(GOOD, prompt="", session_id="never-seen-2"),
     grpc.StatusCode.NOT_FOUND),
    ("model name too long", dict(GOOD, model="m" * 16384), grpc.StatusCode.INVALID_ARGUMENT),
    ("prompt too long", dict(GOOD, prompt="a" * 4097), grpc.StatusCode.INVALID_ARGUMENT),
    ("too many stop sequences", dict(GOOD, stop=["a"] * 9), grpc.StatusCode.INVALID_ARGUMENT),
    ("empty stop sequence", dict(GOOD, stop=[""]), grpc.StatusCode.INVALID_ARGUMENT),
    ("stop sequence too long", dict(GOOD, stop=["a" * 65]), grpc.StatusCode.INVALID_ARGUMENT),
    ("top_k over the cap", dict(GOOD, top_k=5000), grpc.StatusCode.INVALID_ARGUMENT),
    ("chunk_chars over the cap", dict(GOOD, chunk_chars=5000), grpc.StatusCode.INVALID_ARGUMENT),
    ("session_id too long", dict(GOOD, session_id="s" * 200), grpc.StatusCode.INVALID_ARGUMENT),
    ("require_session without an id", dict(GOOD, require_session=True), grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("what,kw,code", BAD, ids=[b[0] for b in BAD])
def test_bad_request_status(stub, what, kw, code):
    assert code_of(lambda: run(stub, **kw)) == code
    assert run(stub, **GOOD)[2].finish_reason == pb.FINISH_REASON_LENGTH  # and the server keeps serving


def test_bad_predict_and_session_requests(stub):
    assert code_of(lambda: api.predict(stub, model_name("gru"), "")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: api.predict(stub, "nope", "a")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: api.predict(stub, model_name("gru"), "a", top_k=5000)) == grpc.StatusCode.INVALID_ARGUMENT
    run(stub, model=model_name("gru"), prompt="a", max_chars=5, session_id="gru-owned")
    other = dict(model=model_name("rnn"), prompt="a", max_chars=5, session_id="gru-owned")
    assert code_of(lambda: run(stub, **other)) == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_requests_do_not_disturb_other_streams(server, eager):
    stub = api.stub(server.target)
    kw = dict(model=model_name("gru"), prompt="over ", max_chars=1500, temperature=0.7, seed=5)
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(run, stub, **kw)
        for _, bad, code in BAD:
            assert code_of(lambda bad=bad: run(stub, **bad)) == code
        text = long.result()[0]
    assert text == reference(eager, kw["model"], "over ", 1500, 0.7, seed=5)


# limits, cancellation, deadlines, sessions: a server with small limits of its own


@pytest.fixture
def small(models_dir):
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, metrics_port=0, max_streams=1, max_chars=BIG,
                       session_ttl_s=0.5, max_sessions=1)
    with BackgroundServer(cfg) as bg:
        yield bg


def active_streams(bg) -> float:
    return metric(bg, "charrnn_active_streams{")


def wait_until(cond, timeout=5.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True


def test_a_stream_paused_out_of_a_batch_and_back_keeps_its_text(models_dir, eager):
    """Backpressure in a batch big enough for its bookkeeping to be in arrays (GenerationRows): the stalled stream
    leaves the batch with its figures and rejoins it later, Predict jobs regroup the batch mid-chunk meanwhile,
    and every text is still the eager one."""
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, max_chars=BIG, max_unsent=16)
    model, prompts = model_name("gru"), ["a dog ", "over ", "quick ", "lazy ", "fox "]
    started, finished = threading.Barrier(len(prompts) + 1), threading.Event()

    def other(prompt):  # in the batch from before the stall until after the resumed stream has finished
        call = api.stub(bg.target).Generate(api.generate_request(model, prompt, BIG, chunk_chars=7), timeout=60)
        text = next(call).text
        started.wait(timeout=30)
        for m in call:
            text += m.text
            if finished.is_set():
                call.cancel()
                return text

    with BackgroundServer(cfg) as bg, ThreadPoolExecutor(len(prompts)) as pool:
        others = [pool.submit(other, p) for p in prompts]
        try:
            started.wait(timeout=30)
            options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
            stalled = api.pb_grpc.GeneratorStub(grpc.insecure_channel(bg.target, options))
            call = stalled.Generate(api.generate_request(model, "the ", 1500, chunk_chars=3), timeout=60)
            first = next(call).text
            time.sleep(0.2)  # the client reads nothing: its stream pauses and leaves the batch of six
            for _ in range(3):  # a job of another class joins the batch: the streams are grouped anew, mid-chunk
                api.predict(api.stub(bg.target), model, "the lazy ", top_k=3)
            text = first + "".join(m.text for m in call)  # reading again: it rejoins the five
        finally:
            finished.set()
        assert text == reference(eager, model, "the ", 1500)
        for p, f in zip(prompts, others):
            got = f.result()
            assert got == reference(eager, model, p, len(got))


def test_capacity_and_cancelled_stream_frees_its_slot(small):
    stub = api.stub(small.target)
    call = stub.Generate(api.generate_request(model_name("lstm"), "the ", BIG, session_id="cancelled"), timeout=60)
    next(call)  # streaming
    assert active_streams(small) == 1
    assert code_of(lambda: run(stub, **GOOD)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    call.cancel()
    assert wait_until(lambda: active_streams(small) == 0 and not small.server.engine.streams)
    assert small.server.engine.streams == {}  # nothing left behind
    assert run(stub, **GOOD)[2].finish_reason == pb.FINISH_REASON_LENGTH
    # a cancelled stream does not advance (or create) its session
    resume = dict(GOOD, prompt="", session_id="cancelled", require_session=True)
    assert code_of(lambda: run(stub, **resume)) == grpc.StatusCode.NOT_FOUND


def metric(bg, name) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))


def test_a_stalled_client_pauses_its_stream(models_dir, eager):
    """Backpressure: the server runs at most max_unsent messages ahead of a client that stops reading, and the
    paused stream gives up its place in the batch (max_batch 1 here) to others."""
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, metrics_port=0, max_batch=1, max_chars=BIG, max_unsent=16)
    with BackgroundServer(cfg) as bg:
        # a small flow-control window, so that grpc itself holds only a few of the messages
        options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        stalled = api.pb_grpc.GeneratorStub(grpc.insecure_channel(bg.target, options))
        call = stalled.Generate(api.generate_request(model_name("gru"), "the ", BIG), timeout=60)
        first = next(call).text
        time.sleep(0.3)  # the client reads nothing: grpc's window fills, then max_unsent, then the stream pauses
        steps = metric(bg, "charrnn_batch_size_count")
        time.sleep(0.3)
        assert metric(bg, "charrnn_batch_size_count") == steps  # no steps while paused
        other = run(api.stub(bg.target), model=model_name("gru"), prompt="dog", max_chars=300)[0]
        assert other == reference(eager, model_name("gru"), "dog", 300)  # served meanwhile, in the one place
        text = first + "".join(next(call).text for _ in range(2999))  # reading again resumes it
        assert text == reference(eager, model_name("gru"), "the ", 3000)
        call.cancel()


def test_deadline_is_honoured(small):
    stub = api.stub(small.target)
    counted = 'charrnn_requests_total{code="%s",method="Generate"}'
    before = {code: metric(small, counted % code) for code in ("OK", "DEADLINE_EXCEEDED")}
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(api.generate_request(model_name("rnn"), "the ", BIG), timeout=0.3))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
    assert wait_until(lambda: active_streams(small) == 0 and not small.server.engine.streams)
    # counted as what it was, not as OK (as when a cancel landed in grpc's own send, outside the handler)
    assert wait_until(lambda: metric(small, counted % "DEADLINE_EXCEEDED") == before["DEADLINE_EXCEEDED"] + 1), \
        urllib.request.urlopen(f"http://127.0.0.1:{small.server.metrics_port}/metrics", timeout=5).read().decode()
    assert metric(small, counted % "OK") == before["OK"]
    assert small.server.engine.streams == {}  # nothing left behind
    assert run(stub, **GOOD)[2].finish_reason == pb.FINISH_REASON_LENGTH


def test_sessions_are_evicted_and_expire(small, eager):
    stub = api.stub(small.target)
    model = model_name("rnn")
    run(stub, model=model, prompt="the ", max_chars=10, session_id="a")
    run(stub, model=model, prompt="the ", max_chars=10, session_id="b")  # max_sessions 1: evicts a
    text, _, last = run(stub, model=model, prompt="dog", max_chars=20, session_id="a")
    assert last.stats.session == pb.SESSION_STATE_EVICTED
    assert text == reference(eager, model, "dog", 20)  # started fresh, and says so
    time.sleep(0.6)  # past the TTL
    text, _, last = run(stub, model=model, prompt="dog", max_chars=20, session_id="a")
    assert last.stats.session == pb.SESSION_STATE_EXPIRED and text == reference(eager, model, "dog", 20)
    time.sleep(0.6)
    resume = dict(model=model, prompt="", max_chars=5, session_id="a", require_session=True)
    with pytest.raises(grpc.RpcError) as e:
        run(stub, **resume)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in e.value.details()


def test_a_session_serves_one_stream_at_a_time(models_dir):
    with BackgroundServer(ServerConfig(models=models_dir, port=0, http_port=0, max_chars=BIG)) as bg:
        stub = api.stub(bg.target)
        call = stub.Generate(api.generate_request(model_name("gru"), "the ", BIG, session_id="busy"), timeout=60)
        next(call)
        assert code_of(lambda: run(stub, **dict(GOOD, session_id="busy"))) == grpc.StatusCode.ABORTED
        call.cancel()


# continuous batching, seen from the runtime


class CountingRuntime(TorchRuntime):
    """A real TorchRuntime that records the shape of every step, and takes 2 ms a step as a real model might (the
    h32 model's 0.1 ms let the first streams finish before a busy machine's last client threads had started)."""

    def __init__(self, ckpt_dir):
        super().__init__(ckpt_dir)
        self.shapes = []
        self.lock = threading.Lock()

    def step(self, tokens, state):
        with self.lock:
            self.shapes.append(tokens.shape)
        time.sleep(0.002)
        return super().step(tokens, state)


def test_continuous_batching_steps_all_streams_together(models_dir, eager):
    model = model_name("lstm")
    rt = CountingRuntime(models_dir / model)
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, max_batch=8, prefill_chunk=16, workers=0)
    with BackgroundServer(cfg, {model: rt}) as bg:
        stub = api.stub(bg.target)
        jobs = [dict(model=model, prompt=TEXT[i:i + 5], max_chars=40 + i, temperature=1.0, seed=i) for i in range(12)]
        jobs.append(dict(model=model, prompt=TEXT[:40], max_chars=30))  # prefilled in chunks of 16
        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(lambda kw: run(stub, **kw)[0], jobs))
    for kw, text in zip(jobs, texts):
        assert text == reference(eager, **{k: v for k, v in kw.items() if k != "max_chars"}, n=kw["max_chars"])
    batch = [b for b, t in rt.shapes]
    assert max(batch) <= 8  # --max-batch bounds a step
    assert max(batch) == 8  # and the streams did share steps
    decode_chars = sum(b for b, t in rt.shapes if t == 1)
    assert decode_chars == sum(kw["max_chars"] for kw in jobs)  # one decode row per generated character
    assert sum(1 for b, t in rt.shapes if t == 1) < decode_chars / 3  # far fewer steps than characters
    assert all(t <= 16 for _, t in rt.shapes)  # prefill chunks


# sessions, unit-level


def test_session_cache_ttl_lru_and_busy():
    now = [0.0]
    cache = SessionCache(ttl_s=10, capacity=2, clock=lambda: now[0])
    def s():
        return Session("m", None, np.zeros(0, np.int64))

    for sid in "abc":
        assert cache.checkout(sid, "m") == (None, SessionState.NEW)
        cache.checkin(sid, s())
    assert len(cache) == 2 and cache.checkout("a", "m") == (None, SessionState.EVICTED)
    cache.checkin("a", None)
    got, how = cache.checkout("b", "m")
    assert how == SessionState.CONTINUED
    with pytest.raises(SessionBusy):
        cache.checkout("b", "m")
    cache.checkin("b", got)
    now[0] = 10.5
    assert cache.checkout("c", "m") == (None, SessionState.EXPIRED)
    with pytest.raises(NotFound, match="expired"):
        cache.checkout("b", "m", required=True)


# worker processes


def kill_mid_stream(bg, model):
    """Kill the worker running model while one of its streams is running: that stream ends UNAVAILABLE."""
    stub = api.stub(bg.target)
    process = bg.server.engine.routes[model].process
    call = stub.Generate(api.generate_request(model, "the ", BIG), timeout=60)
    next(call)  # streaming
    process.kill()
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "exited" in e.value.details()
    return process


def health_of(bg, *names):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(bg.target))
    serving = health_pb2.HealthCheckResponse.SERVING
    return {n: health.Check(health_pb2.HealthCheckRequest(service=n), timeout=5).status == serving for n in names}


def test_a_worker_that_keeps_dying_is_restarted_with_backoff_and_says_so_meanwhile(models_dir, eager, monkeypatch):
    """No silent outage: a worker killed again and again comes back each time (after a growing delay); while it
    is down, its models' health and the server's say NOT_SERVING, and the other worker's models carry on."""
    monkeypatch.setattr(serve.link, "RESTART_FIRST_S", 1.0)
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, max_chars=BIG, workers=2)  # gru, rnn | lstm
    lstm, gru = model_name("lstm"), model_name("gru")
    with BackgroundServer(cfg) as bg:
        stub = api.stub(bg.target)
        other = bg.server.engine.routes[gru].process
        pids = set()
        for _ in range(5):  # more deaths within a minute than the old limit of 3 restarts
            pids.add(kill_mid_stream(bg, lstm).pid)
            assert health_of(bg, "", lstm, gru) == {"": False, lstm: False, gru: True}
            assert code_of(lambda: run(stub, model=lstm, prompt="the ", max_chars=5)) == grpc.StatusCode.UNAVAILABLE
            assert run(stub, model=gru, prompt="the ", max_chars=60)[0] == reference(eager, gru, "the ", 60)
            assert wait_until(lambda: health_of(bg, lstm)[lstm], timeout=120)  # restarted
            assert health_of(bg, "", "charrnn.v1.Generator") == {"": True, "charrnn.v1.Generator": True}
        assert bg.server.engine.routes[lstm].process.pid not in pids and len(pids) == 5
        assert run(stub, model=lstm, prompt="the ", max_chars=60)[0] == reference(eager, lstm, "the ", 60)
        assert len(api.list_models(stub)) == len(CELLS)
    assert not other.is_alive()  # stopped with the server


def test_a_dead_worker_is_restarted_and_its_models_serve_again(models_dir, eager):
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, max_chars=BIG)
    lstm = model_name("lstm")
    with BackgroundServer(cfg) as bg:
        stub = api.stub(bg.target)
        for sid in ("kept", "required"):
            run(stub, model=lstm, prompt="the ", max_chars=10, session_id=sid)
        kill_mid_stream(bg, lstm)
        assert not health_of(bg, lstm)[lstm]
        assert wait_until(lambda: health_of(bg, lstm)[lstm], timeout=120)
        for cell in CELLS:  # every model of that worker, greedy text exact, sessions fresh
            model = model_name(cell)
            assert run(stub, model=model, prompt="the ", max_chars=60)[0] == reference(eager, model, "the ", 60)
        # its sessions were lost with it, and the next request on one says so
        text, _, last = run(stub, model=lstm, prompt="dog", max_chars=20, session_id="kept")
        assert last.stats.session == pb.SESSION_STATE_EXPIRED and text == reference(eager, lstm, "dog", 20)
        with pytest.raises(grpc.RpcError) as e:
            run(stub, model=lstm, prompt="", max_chars=5, session_id="required", require_session=True)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "lost" in e.value.details()


def test_a_stopping_server_ends_streams_and_its_workers(models_dir):
    bg = BackgroundServer(ServerConfig(models=models_dir, port=0, http_port=0, max_chars=BIG))
    stub = api.stub(bg.target)
    worker = bg.server.engine.routes[model_name("rnn")].process
    call = stub.Generate(api.generate_request(model_name("rnn"), "the ", BIG), timeout=60)
    next(call)
    bg.stop(grace_s=0.0)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert not worker.is_alive() and worker.exitcode == 0


# reliability: what a fault and abuse probe found (issue 13)


def test_a_client_that_stops_reading_loses_its_stream_after_the_stall_timeout(models_dir, eager):
    """A stream whose client takes no message for --stall-timeout-s ends and frees its slot (max_streams 1 here):
    stalled clients cannot lock everyone else out."""
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, metrics_port=0, max_streams=1, max_chars=BIG, max_unsent=4,
                       stall_timeout_s=1.0)
    with BackgroundServer(cfg) as bg:
        options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        stalled = api.pb_grpc.GeneratorStub(grpc.insecure_channel(bg.target, options))
        call = stalled.Generate(api.generate_request(model_name("gru"), "the ", BIG), timeout=60)
        next(call)  # then reads nothing
        stub = api.stub(bg.target)
        assert code_of(lambda: run(stub, **GOOD)) == grpc.StatusCode.RESOURCE_EXHAUSTED  # it holds the one slot
        t0 = time.monotonic()
        assert wait_until(lambda: not bg.server.engine.streams, timeout=20)
        assert time.monotonic() - t0 > 0.5  # not at once: after the timeout
        assert run(stub, **GOOD)[0] == reference(eager, GOOD["model"], GOOD["prompt"], GOOD["max_chars"])
        assert metric(bg, "charrnn_stalled_streams_total") == 1
        with pytest.raises(grpc.RpcError):  # its stream has ended
            for _ in call:
                pass


def test_overload_is_resource_exhausted_and_counted(models_dir):
    """Far more concurrent calls than --max-streams on one channel (and than grpc's default backlog of 1,000, which
    cancelled the rest): each one either succeeds or is refused with RESOURCE_EXHAUSTED, and every refusal is
    counted."""
    cfg = ServerConfig(models=models_dir, port=0, http_port=0, metrics_port=0, max_streams=16, max_chars=BIG, workers=0)
    with BackgroundServer(cfg) as bg:

        async def storm(n):
            async with grpc.aio.insecure_channel(bg.target) as channel:
                stub = api.pb_grpc.GeneratorStub(channel)

                async def one():
                    try:
                        async for _ in stub.Generate(api.generate_request(model_name("rnn"), "the ", 20), timeout=60):
                            pass
                        return grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as e:
                        return e.code()
                return await asyncio.gather(*(one() for _ in range(n)))

        codes = asyncio.run(storm(1500))
        counts = {c: codes.count(c) for c in set(codes)}
        assert set(counts) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, counts
        assert counts.get(grpc.StatusCode.OK, 0) >= 16
        refused = 'charrnn_requests_total{code="RESOURCE_EXHAUSTED",method="Generate"}'
        assert metric(bg, refused) == counts.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0)


def test_a_long_model_name_is_refused_without_echoing_it(stub):
    with pytest.raises(grpc.RpcError) as e:
        run(stub, **dict(GOOD, model="m" * 16384))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(e.value.details()) < 200
    with pytest.raises(grpc.RpcError) as e:  # under the cap but unknown: quoted, cut short
        run(stub, **dict(GOOD, model="x" * 120))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(e.value.details()) < 300


def test_corrupt_request_bodies_are_invalid_argument_and_counted(server):
    channel = grpc.insecure_channel(server.target)
    counted = 'charrnn_requests_total{code="INVALID_ARGUMENT",method="%s"}'
    before = {m: metric(server, counted % m) for m in ("Generate", "Predict")}
    model = model_name("gru").encode()
    bad_utf8 = b"\x0a" + bytes([len(model)]) + model + b"\x12\x02\xc3\x28"  # model, then text = invalid UTF-8
    for body in (b"\xff\xff\xff\xff", bad_utf8):
        for method, kind in (("Predict", channel.unary_unary), ("Generate", channel.unary_stream)):
            call = kind(f"/charrnn.v1.Generator/{method}")
            with pytest.raises(grpc.RpcError) as e:
                result = call(body, timeout=10)
                list(result) if method == "Generate" else None
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, body, e.value.details())
            assert "Error" not in e.value.details()  # no internal class names
    assert wait_until(lambda: all(metric(server, counted % m) == before[m] + 2 for m in before))
    assert run(api.stub(server.target), **GOOD)[2].finish_reason == pb.FINISH_REASON_LENGTH
