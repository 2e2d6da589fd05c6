"""The HTTP edge (serve.http) over real sockets: a real server (gRPC and HTTP on one loop and engine) on free
loopback ports, the official `openai` client, raw SSE bytes, raw sockets, and the playground in headless
Chromium. Texts are checked against gRPC and eager PyTorch: the same request gives the same text everywhere.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_serve import BIG, make_models, model_name, reference

import serve.http
import serve.link
from clients import api
from protos.charrnn.v1 import charrnn_pb2 as pb
from serve.config import ServerConfig
from serve.background import BackgroundServer
from serve.server import StartError
from train.checkpoint import load_checkpoint

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
LSTM, GRU = model_name("lstm"), model_name("gru")


def free_port() -> int:
    """A free loopback port (the HTTP port's 0 means no HTTP): a few tries cover a race with another server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(models, **kw) -> BackgroundServer:
    for attempt in range(3):
        try:
            return BackgroundServer(ServerConfig(models=models, port=0, http_port=free_port(), **kw))
        except StartError:
            if attempt == 2:
                raise


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"), cells=("lstm", "gru"))


@pytest.fixture(scope="module")
def eager(models_dir):
    return {m: load_checkpoint(models_dir / m) for m in (LSTM, GRU)}


@pytest.fixture(scope="module")
def server(models_dir):
    """A worker process (the default home), so logprobs and texts cross the process boundary as in production."""
    with serving(models_dir, max_chars=BIG, metrics_port=0) as bg:
        yield bg


def base(bg) -> str:
    return f"http://127.0.0.1:{bg.server.http_port}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=base(server) + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(bg, path, body, headers=None, raw: bytes | None = None) -> tuple[int, dict | bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(base(bg) + path, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            out = r.read()
            return r.status, json.loads(out) if r.headers.get_content_type() == "application/json" else out
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(bg, path, headers=None, port=None) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{port or bg.server.http_port}{path}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(cond, timeout=5.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)
    return time.monotonic() - t0


# the API, with the official client


def test_models_and_health(server, eager):
    status, body = get(server, "/v1/models")
    models = {m["id"]: m for m in json.loads(body)["data"]}
    assert status == 200 and set(models) == {LSTM, GRU}
    m = models[LSTM]
    assert (m["object"], m["cell"], m["hidden_size"], m["fc_layers"], m["backend"]) == ("model", "lstm", 32, 1, "torch")
    assert m["vocab"] == eager[LSTM].vocab.chars
    assert get(server, "/health") == (200, b'{"status": "serving"}')


def test_a_completion_is_the_text_grpc_and_eager_give(server, client, eager):
    """Same model, prompt, seed and settings: the same text over HTTP, over gRPC and from eager PyTorch."""
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7}, {"temperature": 0.9, "seed": 3, "top_k": 5}):
        top_k = kw.get("top_k", 0)
        r = client.completions.create(model=LSTM, prompt="the quick ", max_tokens=80, temperature=kw["temperature"],
                                      seed=kw.get("seed"), extra_body={"top_k": top_k})
        grpc_text, last = api.generate_text(api.stub(server.target), api.generate_request(
            LSTM, "the quick ", 80, kw["temperature"], top_k, seed=kw.get("seed", 0)))
        want = reference(eager, LSTM, "the quick ", 80, kw["temperature"], top_k, seed=kw.get("seed", 0))
        assert r.choices[0].text == grpc_text == want
        assert r.choices[0].finish_reason == "length" and r.object == "text_completion" and r.model == LSTM
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (10, 80, 90)


def test_streaming_with_usage(client, eager):
    stream = client.completions.create(model=GRU, prompt=["over the "], max_tokens=120, temperature=1.0, seed=11,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == reference(eager, GRU, "over the ", 120, 1.0, seed=11)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (9, 120)
    assert len({c.id for c in chunks}) == 1


def test_sse_framing_is_exact_with_curl(server):
    """curl -N: the bytes on the wire are `data: {json}` events, a blank line after each, and `data: [DONE]`."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": LSTM, "prompt": "the ", "max_tokens": 30, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "-D", "-", base(server) + "/v1/completions", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True, timeout=60).stdout
    head, _, stream = out.partition(b"\r\n\r\n")
    assert b"200 OK" in head.split(b"\r\n")[0] and b"content-type: text/event-stream" in head.lower()
    assert stream.endswith(b"data: [DONE]\n\n")
    events = stream.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(re.fullmatch(rb"data: \{.*\}", e) for e in events[:-2])
    parsed = [json.loads(e[6:]) for e in events[:-2]]
    assert all(p["object"] == "text_completion" and len(p["choices"]) == 1 for p in parsed)
    assert sum(len(p["choices"][0]["text"]) for p in parsed) == 30
    assert parsed[-1]["choices"][0]["finish_reason"] == "length" and parsed[-1]["stats"]["generated_chars"] == 30


def test_stop_sequences_end_the_text_and_are_left_out(client, eager):
    """As in OpenAI's API: the completion stops before the stop sequence; a stream never sends any of it."""
    want = reference(eager, LSTM, "the ", 300)
    stop = want[40:43]
    cut = want.find(stop)
    for stream in (False, True):
        r = client.completions.create(model=LSTM, prompt="the ", max_tokens=300, temperature=0, stop=[stop, "\x00"],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
            assert r.usage.completion_tokens == cut + len(stop)  # the stop sequence was generated all the same
        assert (text, finish) == (want[:cut], "stop")


def test_a_stream_holds_back_only_what_could_begin_a_stop_sequence():
    from serve.types import Chunk, FinishReason, GenerateRequest, GenerateStats, SessionState

    def stats(stop=""):
        return GenerateStats(2, 6, 0.1, 0.2, 30.0, 1, SessionState.NONE, stop)

    def texts(*chunks):
        c = serve.http._Completion(GenerateRequest("m", "ab", stop=("xyz", "q")), usage=False)
        return [[json.loads(e[6:])["choices"][0]["text"] for e in c.event(ch).split(b"\n\n")
                 if e.startswith(b"data: {")] for ch in chunks]

    assert texts(Chunk("abx"), Chunk("y"), Chunk("z", FinishReason.STOP, stats("xyz"))) == [["ab"], [], [""]]
    assert texts(Chunk("abx"), Chunk("xy", FinishReason.LENGTH, stats())) == [["ab"], ["xxy"]]
    assert texts(Chunk("axy"), Chunk("w"), Chunk("q", FinishReason.STOP, stats("q"))) == [["a"], ["xyw"], [""]]


def test_logprobs_are_the_models_and_arrive_with_their_characters(client, eager):
    ck = eager[LSTM]
    r = client.completions.create(model=LSTM, prompt="the ", max_tokens=25, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert lp.tokens == list(text) and len(lp.token_logprobs) == len(lp.top_logprobs) == 25
    assert lp.text_offset == list(range(4, 29))
    # eager: the model's log-softmax after the prompt and each generated character
    state, logits = None, []
    with torch.no_grad():
        x = torch.from_numpy(ck.vocab.encode("the " + text[:-1]))[None]  # (1, T)
        out, _ = ck.model(x, state)
        logits = torch.log_softmax(out[0].double(), -1)[3:]  # (25, V): before each generated character
    for i, ch in enumerate(text):
        want = logits[i]
        assert math.isclose(lp.token_logprobs[i], want[ck.vocab.encode(ch)[0]].item(), abs_tol=1e-4)
        top = sorted(lp.top_logprobs[i].items(), key=lambda kv: -kv[1])
        assert len(top) == 3 and top[0][0] == ch  # greedy: the character is the most likely one
        best = torch.topk(want, 3).values.tolist()
        assert np.allclose([v for _, v in top], best, atol=1e-4)
    stream = client.completions.create(model=LSTM, prompt="the ", max_tokens=25, temperature=0, logprobs=3,
                                       stream=True)
    chunks = [c.choices[0] for c in stream]
    assert sum((c.logprobs.tokens for c in chunks), []) == lp.tokens
    assert sum((c.logprobs.text_offset for c in chunks), []) == lp.text_offset
    assert np.allclose(sum((c.logprobs.token_logprobs for c in chunks), []), lp.token_logprobs)


def test_a_session_continues_over_http(client, eager):
    first = client.completions.create(model=GRU, prompt="the ", max_tokens=50, temperature=0,
                                      extra_body={"session_id": "http-s1"})
    second = client.completions.create(model=GRU, prompt="", max_tokens=50, temperature=0,
                                       extra_body={"session_id": "http-s1"})
    assert first.choices[0].text + second.choices[0].text == reference(eager, GRU, "the ", 100)
    assert (first.model_extra["stats"]["session"], second.model_extra["stats"]["session"]) == ("new", "continued")


# errors


@pytest.mark.parametrize("body, param, words", [
    ({"model": LSTM, "prompt": "the", "n": 2}, "n", "n must be 1"),
    ({"model": LSTM, "prompt": "the", "temperature": -1}, None, "temperature"),
    ({"model": LSTM, "prompt": "the \u00e9"}, None, "vocabulary"),
    ({"model": LSTM, "prompt": "the", "logprobs": 6}, None, "logprobs"),
    ({"model": LSTM, "prompt": "the", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"model": LSTM, "prompt": "the", "max_tokens": "ten"}, "max_tokens", "max_tokens"),
    ({"model": LSTM, "prompt": "the", "max_tokens": 10 ** 4000}, "max_tokens", "between 1 and"),
    ({"model": LSTM, "prompt": "the", "stop": [1]}, "stop", "list of strings"),
    ({"model": LSTM, "prompt": "the", "stream_options": []}, "stream_options", "stream_options"),
    ({"model": LSTM, "prompt": ["a", "b"]}, "prompt", "list of one"),
    ({"model": LSTM, "prompt": "the", "echo": True}, "echo", "echo"),
    ({"model": LSTM, "prompt": "the", "x" * 10_000: 1}, None, "unrecognized"),
    ({"model": LSTM}, None, "empty prompt"),
    ([1, 2], None, "JSON object"),
])
def test_bad_requests_are_400_in_openais_shape(server, body, param, words):
    status, out = post(server, "/v1/completions", body)
    err = out["error"]
    assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"] and len(err["message"]) < 300  # never echoes unbounded client text


def test_errors_through_the_openai_client(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m" * 5000, prompt="a")  # over the model name cap: not echoed
    assert len(str(e.value)) < 500
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="a")
    assert e.value.code == "model_not_found"
    for raw in (b"{not json", b"[" * 50_000, b"\xff\xfe"):
        status, out = post(server, "/v1/completions", None, raw=raw)
        assert status == 400 and "not valid JSON" in out["error"]["message"]
    big = b'{"prompt": "' + b"a" * server.server.http.max_body + b'"}'
    status, out = post(server, "/v1/completions", None, raw=big)
    assert status == 413 and out["error"]["code"] == "request_too_large"
    status, out = get(server, "/nowhere")
    assert status == 404 and json.loads(out)["error"]["message"] == "no such path"


def test_429_past_max_streams_and_503_while_draining(models_dir):
    with serving(models_dir, max_chars=BIG, max_streams=1, workers=0) as bg:
        long = http.client.HTTPConnection("127.0.0.1", bg.server.http_port, timeout=30)
        long.request("POST", "/v1/completions", json.dumps({"model": LSTM, "prompt": "the ", "max_tokens": BIG,
                                                            "stream": True}), {"Content-Type": "application/json"})
        held = long.getresponse()
        held.read1(64)
        status, out = post(bg, "/v1/completions", {"model": LSTM, "prompt": "a"})
        assert status == 429 and out["error"]["type"] == "rate_limit_error"
        long.close()
        bg.call(_drain(bg.server))
        assert get(bg, "/health")[0] == 503
        status, out = post(bg, "/v1/completions", {"model": LSTM, "prompt": "a"})
        assert status == 503 and "shutting down" in out["error"]["message"]


def test_a_worker_that_dies_mid_stream_ends_it_with_an_error_event_and_health_says_503_meanwhile(models_dir,
                                                                                                   monkeypatch):
    monkeypatch.setattr(serve.link, "RESTART_FIRST_S", 1.0)
    with serving(models_dir, max_chars=BIG) as bg:
        conn = http.client.HTTPConnection("127.0.0.1", bg.server.http_port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": LSTM, "prompt": "the ", "max_tokens": BIG,
                                                            "stream": True}), {"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.readline().startswith(b"data: {")
        bg.server.engine.routes[LSTM].process.kill()
        events = [line for line in stream.read().split(b"\n") if line.startswith(b"data: ")]
        error = json.loads(events[-1][6:])["error"]  # the stream's last event, and no [DONE]
        assert error["code"] == "unavailable" and "exited" in error["message"]
        wait_until(lambda: get(bg, "/health") == (503, b'{"status": "not serving: gru-h32-fc1-s16, lstm-h32-fc1-s16"}'),
                   timeout=5)
        assert post(bg, "/v1/completions", {"model": GRU, "prompt": "a"})[0] == 503
        wait_until(lambda: get(bg, "/health")[0] == 200, timeout=30)  # restarted
        assert post(bg, "/v1/completions", {"model": GRU, "prompt": "a", "max_tokens": 3})[0] == 200


def test_a_drain_lets_http_streams_finish_within_the_grace_period_and_cuts_the_rest(models_dir):
    bg = serving(models_dir, max_chars=BIG, workers=0)
    try:
        def open_stream(n):
            conn = http.client.HTTPConnection("127.0.0.1", bg.server.http_port, timeout=30)
            conn.request("POST", "/v1/completions", json.dumps({"model": GRU, "prompt": "the ", "max_tokens": n,
                                                                "temperature": 0, "stream": True}))
            response = conn.getresponse()
            assert response.status == 200
            return response

        long, short = open_stream(BIG), open_stream(300)
        long.readline()
        stopping = asyncio.run_coroutine_threadsafe(bg.server.drain_and_stop(grace_s=1.5), bg._loop)
        wait_until(lambda: bg.server.engine.draining, timeout=5)
        assert get(bg, "/health")[0] == 503 and post(bg, "/v1/completions", {"model": GRU, "prompt": "a"})[0] == 503
        assert short.read().endswith(b"data: [DONE]\n\n")  # finished within the grace period
        t0 = time.monotonic()
        try:
            rest = long.read()
        except http.client.IncompleteRead as e:  # the connection closed mid-chunk
            rest = e.partial
        assert not rest.endswith(b"data: [DONE]\n\n") and time.monotonic() - t0 < 10  # cut after the grace
        stopping.result(30)
    finally:
        bg._close_loop()


async def _drain(server):
    server.engine.draining = True  # what drain_and_stop does first


def test_a_client_that_disconnects_mid_stream_frees_its_slot_at_once(server):
    """A real socket: read part of the stream, close; the stream leaves the engine and the worker's batch."""
    engine = server.server.engine
    with socket.create_connection(("127.0.0.1", server.server.http_port)) as s:
        body = json.dumps({"model": LSTM, "prompt": "the ", "max_tokens": BIG, "stream": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while got.count(b"data: ") < 5:
            got += s.recv(4096)
        assert len(engine.streams) == 1
    took = wait_until(lambda: not engine.streams, timeout=2)
    assert took < 0.5
    wait_until(lambda: server.server.metrics.model(LSTM).active.value == 0, timeout=2)


def test_idle_and_half_sent_connections_are_closed(models_dir, monkeypatch):
    monkeypatch.setattr(serve.http, "IDLE_TIMEOUT_S", 0.5)
    with serving(models_dir, workers=0) as bg:
        with socket.create_connection(("127.0.0.1", bg.server.http_port)) as idle, \
                socket.create_connection(("127.0.0.1", bg.server.http_port)) as half:
            half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            for s in (idle, half):
                s.settimeout(5)
                t0 = time.monotonic()
                assert s.recv(100) == b"" and time.monotonic() - t0 < 3  # closed by the server


def test_300_half_sent_connections_cost_no_thread_and_metrics_still_answer(models_dir):
    """The old metrics port (prometheus_client's server) held a thread per connection: 319 gave 330 threads."""
    with serving(models_dir, workers=0, metrics_port=0) as bg:
        threads = threading.active_count()
        held = []
        try:
            for port in (bg.server.http_port, bg.server.metrics_port):
                for _ in range(150):
                    s = socket.create_connection(("127.0.0.1", port))
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    held.append(s)
            time.sleep(0.3)
            assert threading.active_count() <= threads + 2
            for port in (bg.server.http_port, bg.server.metrics_port):
                status, body = get(bg, "/metrics", port=port)
                assert status == 200 and b"charrnn_requests_total" in body
        finally:
            for s in held:
                s.close()


# auth and CORS, for both front ends


def test_an_api_key_guards_http_and_grpc_but_not_health(models_dir, monkeypatch):
    monkeypatch.setenv("CHARRNN_API_KEY", "s3cret")
    with serving(models_dir, workers=0, metrics_port=0, cors_origin="https://example.org") as bg:
        body = {"model": LSTM, "prompt": "the ", "max_tokens": 5}
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            status, out = post(bg, "/v1/completions", body, headers)
            assert status == 401 and out["error"]["type"] == "authentication_error"
        assert get(bg, "/v1/models")[0] == get(bg, "/metrics")[0] == 401
        assert post(bg, "/v1/completions", body, {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(bg, "/health")[0] == get(bg, "/")[0] == 200  # health, and the page (it asks for the key)
        assert get(bg, "/metrics", port=bg.server.metrics_port)[0] == 200  # the scraper's port is open
        key = openai.OpenAI(base_url=base(bg) + "/v1", api_key="s3cret", max_retries=0)
        assert key.completions.create(model=LSTM, prompt="a", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base(bg) + "/v1", api_key="wrong", max_retries=0).models.list()

        channel = grpc.insecure_channel(bg.target)
        stub = api.pb_grpc.GeneratorStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(api.generate_request(LSTM, "the ", 5), timeout=10,
                               metadata=[("authorization", "Bearer nope")]))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = [("authorization", "Bearer s3cret")]
        assert len("".join(m.text for m in stub.Generate(api.generate_request(LSTM, "the ", 5), timeout=10,
                                                         metadata=good))) == 5
        assert len(api.generate_text(api.stub(bg.target), api.generate_request(LSTM, "the ", 5))[0]) == 5  # $KEY
        with pytest.raises(grpc.RpcError) as e:
            api.list_models(api.stub(bg.target, api_key="nope"))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert 'charrnn_requests_total{code="UNAUTHENTICATED",method="Generate"} 1.0' in \
            get(bg, "/metrics", port=bg.server.metrics_port)[1].decode()

        # CORS: the configured origin, and preflights answered without the key
        req = urllib.request.Request(base(bg) + "/v1/completions", method="OPTIONS",
                                     headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "https://example.org"
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]


def test_no_cors_headers_by_default(server):
    with urllib.request.urlopen(base(server) + "/v1/models", timeout=10) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


def test_metrics_on_the_http_port_are_the_grpc_registry(server, client):
    client.completions.create(model=LSTM, prompt="a", max_tokens=2)
    api.generate_text(api.stub(server.target), api.generate_request(LSTM, "a", 2))
    for port in (server.server.http_port, server.server.metrics_port):
        text = get(server, "/metrics", port=port)[1].decode()
        assert 'charrnn_requests_total{code="OK",method="Generate"}' in text
        assert 'charrnn_http_requests_total{route="/v1/completions",status="200"}' in text
        assert "charrnn_time_to_first_char_seconds_bucket" in text


def test_python_m_serve_serves_http_beside_grpc(tmp_path):
    models = make_models(tmp_path / "models", cells=("gru",))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--models", str(models), "--port", "0", "--http-port",
                             str(port), "--threads", "1"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "serving" in line:
                break
        assert f"HTTP on :{port}" in line
        target = re.search(r"on 127\.0\.0\.1:(\d+)", line).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        grpc_text = api.generate_text(api.stub(f"127.0.0.1:{target}"), api.generate_request(GRU, "the ", 20))[0]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(
            {"model": GRU, "prompt": "the ", "max_tokens": 20, "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["choices"][0]["text"] == grpc_text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()


# the playground


def held_sessions(bg) -> float:
    return float(re.search(rb"^charrnn_sessions (\S+)$", get(bg, "/metrics")[1], re.M).group(1))


def _chromium():
    """A headless Chromium driven by selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def test_the_playground_streams_in_chromium_and_stop_cancels_the_stream(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _chromium()
    engine = server.server.engine
    try:
        browser.get(base(server) + "/")
        wait = WebDriverWait(browser, 20, poll_frequency=0.02)
        wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 2)
        Select(browser.find_element(By.ID, "model")).select_by_value(GRU)
        for field, value in (("prompt", "the "), ("max_tokens", "100000"), ("seed", "5")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "generate").click()
        def shown_chars() -> int:  # all of the text (.text would drop whitespace at its end)
            return browser.execute_script("return [...document.getElementById('output').textContent].length")

        wait.until(lambda b: shown_chars() > 200)  # characters stream in
        wait.until(lambda b: b.find_element(By.ID, "rate").text not in ("", "-"))
        assert float(browser.find_element(By.ID, "ttfc").text.split()[0]) < 5
        assert len(engine.streams) == 1
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text == "stopped")
        wait_until(lambda: not engine.streams, timeout=5)  # the server cancelled it
        shown = shown_chars()
        time.sleep(0.2)
        assert shown_chars() == shown
        browser.find_element(By.ID, "continue").click()  # after a Stop: a new session that re-reads the text
        browser.find_element(By.ID, "prompt").clear()
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("50")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text == "finished (length)")
        assert shown_chars() == shown + 50 and browser.find_element(By.ID, "chars").text == "50"
        sessions = held_sessions(server)
        browser.find_element(By.ID, "generate").click()  # after a finished stream: its session continues
        wait.until(lambda b: b.find_element(By.ID, "status").text == "finished (length)" and
                   shown_chars() == shown + 100)
        assert held_sessions(server) == sessions  # the same session, no new one
        browser.save_screenshot(str(tmp_path / "playground.png"))
        assert (tmp_path / "playground.png").stat().st_size > 10_000
    finally:
        browser.quit()


def test_loadgen_drives_http_as_it_drives_grpc(server):
    """clients.loadgen --http: the same requests over /v1/completions (what the HTTP figures are measured with)."""
    from clients import loadgen

    common = ["--model", LSTM, "--concurrency", "4", "--requests", "8", "--max-chars", "30", "--warmup", "1"]
    over_http = loadgen.run(loadgen.parse_args([*common, "--http", base(server)]))
    over_grpc = loadgen.run(loadgen.parse_args([*common, "--target", server.target, "--coalesce"]))
    for r in (over_http, over_grpc):
        assert (r["ok"], r["errors"], r["chars"]) == (8, {}, 240) and r["ttfc_ms"]["p50"] > 0


def test_a_taken_http_port_is_a_clear_start_error(server, models_dir):
    with pytest.raises(StartError, match=f"HTTP port {server.server.http_port}"):
        BackgroundServer(ServerConfig(models=models_dir, port=0, http_port=server.server.http_port, workers=0))
    assert get(server, "/health")[0] == 200  # the first server serves on
