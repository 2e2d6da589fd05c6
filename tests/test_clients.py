"""The command-line clients against a real server."""
from __future__ import annotations

import json
import socket
import time
from collections import Counter

import pytest
from conftest import make_checkpoint

from clients import generate as generate_cli
from clients import loadgen
from serve import server as server_module
from serve.config import ServerConfig
from serve.background import BackgroundServer
from train.checkpoint import load_checkpoint
from train.sampling import generate


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ckpt = make_checkpoint(root, cell="lstm", hidden=16)
    with BackgroundServer(ServerConfig(models=root, port=0, http_port=0)) as bg:
        yield bg, load_checkpoint(ckpt)


def test_generate_cli_streams_the_text(served, capsys):
    bg, ck = served
    args = ["--target", bg.target, "--model", ck.model_id, "--prompt", "the ", "--max-chars", "40",
            "--temperature", "0.8", "--seed", "3", "--stats", "--session", "cli"]
    assert generate_cli.main(args) == 0
    out, err = capsys.readouterr()
    assert out == generate(ck.model, ck.vocab, "the ", 40, 0.8, seed=3) + "\n"
    assert "finish: length; 40 chars" in err and "seed 3" in err and "session new" in err
    assert generate_cli.main(["--target", bg.target, "--model", ck.model_id, "--session", "cli", "--max-chars",
                              "5", "--stats"]) == 0
    assert "session continued" in capsys.readouterr().err
    assert generate_cli.main(args[:-2] + ["--coalesce"]) == 0  # merged messages print the same text
    assert capsys.readouterr().out == out


def test_generate_cli_list_predict_and_errors(served, capsys):
    bg, ck = served
    assert generate_cli.main(["--target", bg.target, "--list"]) == 0
    assert capsys.readouterr().out.startswith(f"{ck.model_id}\tlstm h16 fc2\t")
    assert generate_cli.main(["--target", bg.target, "--model", ck.model_id, "--prompt", "the", "--predict", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert generate_cli.main(["--target", bg.target, "--model", "nope", "--prompt", "a"]) == 1
    assert "error: NOT_FOUND: unknown model 'nope'" in capsys.readouterr().err


def test_loadgen_reports_and_writes_json(served, tmp_path, capsys):
    bg, ck = served
    out = tmp_path / "load.json"
    assert loadgen.main(["--target", bg.target, "--concurrency", "4", "--requests", "8", "--max-chars", "25",
                         "--coalesce", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["ok"], result["errors"], result["chars"]) == (8, {}, 200)
    assert result["model"] == ck.model_id and result["chars_per_s"] > 0
    assert set(result["ttfc_ms"]) == {"p50", "p90", "p99", "mean"}
    assert set(result["inter_char_ms"]) == {"p50", "p99", "mean"}
    assert 0 < result["client_cpu_s"] and result["coalesce"] and result["chars_per_msg"] >= 1
    printed = capsys.readouterr().out
    assert printed.startswith("timing 8 requests, 4 at a time\n")  # serve.bench reads the server's CPU from here
    assert "aggregate" in printed and "this client used" in printed


def test_loadgen_spreads_the_streams_over_processes(served, tmp_path, capsys, monkeypatch):
    bg, ck = served
    seeds = []  # of the requests the server gets (it runs in this process; the clients in two others)
    from_pb = server_module.generate_request_from_pb
    monkeypatch.setattr(server_module, "generate_request_from_pb", lambda m: seeds.append(m.seed) or from_pb(m))
    out = tmp_path / "load.json"
    assert loadgen.main(["--target", bg.target, "--concurrency", "4", "--requests", "8", "--max-chars", "25",
                         "--seed", "100", "--processes", "2", "--out", str(out)]) == 0
    assert Counter(seeds) == Counter([100, 100] + list(range(100, 108)))  # a warm-up each, then each request once
    result = json.loads(out.read_text())
    assert (result["ok"], result["errors"], result["chars"]) == (8, {}, 200)  # both processes' records, merged
    assert result["processes"] == 2 and result["model"] == ck.model_id and result["client_cpu_s"] > 0
    assert result["chars_per_s"] > 0 and result["client_cpus"]
    printed = capsys.readouterr().out
    assert printed.startswith("timing 8 requests, 4 at a time\n") and printed.count("timing") == 1
    assert "aggregate" in printed and "this client used" in printed and "in 2 processes" in printed


@pytest.mark.parametrize("processes", ["0", "5"])
def test_loadgen_processes_must_be_from_one_to_concurrency(processes, tmp_path):
    with pytest.raises(SystemExit) as e:
        loadgen.main(["--concurrency", "4", "--processes", processes, "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2


@pytest.mark.parametrize("processes", ["1", "2"])
def test_loadgen_says_when_it_cannot_reach_the_server(processes, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(SystemExit, match=f"error: 127.0.0.1:{port}: UNAVAILABLE"):
        loadgen.main(["--target", f"127.0.0.1:{port}", "--requests", "2", "--processes", processes,
                      "--out", str(tmp_path / "x.json")])
    assert time.monotonic() - t0 < 30  # the parent hears from its children, not from a timeout
    assert not (tmp_path / "x.json").exists()


def test_generate_help_shows_defaults_and_greedy_stats_print_no_seed(served, capsys):
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 127.0.0.1:50051)" in help_text and "(default: 0, greedy)" in help_text
    bg, ck = served
    assert generate_cli.main(["--target", bg.target, "--model", ck.model_id, "--prompt", "the ", "--max-chars", "5",
                              "--stats"]) == 0
    err = capsys.readouterr().err
    assert "finish: length; 5 chars" in err and "seed" not in err  # a greedy request draws nothing


def test_loadgen_writes_json_only_when_asked_and_names_the_model_among_several(tmp_path, capsys, monkeypatch):
    make_checkpoint(tmp_path / "models", cell="gru", hidden=8)
    make_checkpoint(tmp_path / "models", cell="rnn", hidden=8)
    monkeypatch.chdir(tmp_path)
    with BackgroundServer(ServerConfig(models=tmp_path / "models", port=0)) as bg:
        with pytest.raises(SystemExit, match="the server has 2 models .*: pass --model"):
            loadgen.main(["--target", bg.target, "--requests", "2", "--max-chars", "5"])
        assert loadgen.main(["--target", bg.target, "--requests", "2", "--concurrency", "2", "--max-chars", "5",
                             "--model", "rnn-h8-fc2-s16"]) == 0
    assert "rnn-h8-fc2-s16" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # nothing written into the working directory
