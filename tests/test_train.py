"""The trainer and the grid: architectures, honest splits, objectives, checkpoints, resume, errors."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import corpus
from train.checkpoint import CheckpointError, load_checkpoint
from train.grid import PRESETS
from train.model import CharRNN, ModelConfig, count_parameters
from train.sampling import generate, generate_refeed, sample
from train.schedule import Horizon, lr_factor, steps_in_time
from train.trainer import Job, TrainConfig, Trainer, train_one
from train.vocab import Vocab, VocabError

from conftest import ROOT

SEED = ROOT / "train" / "seed"  # the seed report's tables, shipped with the package
PUBLISHED = ROOT.parent / "shared" / "seed"  # the seed itself, beside this repository in the project's layout


def _seed_rows():
    for name, V in (("problem1.csv", 46), ("problem23.csv", 65)):
        for r in csv.DictReader(open(SEED / name, newline="")):
            yield r, V


def test_parameter_counts_match_all_63_seed_rows():
    rows = list(_seed_rows())
    assert len(rows) == 63
    for r, V in rows:
        m = CharRNN(ModelConfig(r["rnn_type"].lower(), V, int(r["hidden_size"]), int(r["fc_layers"])))
        assert count_parameters(m) == int(r["parameters"]), r


def test_shipped_seed_tables_are_the_published_ones():
    if not PUBLISHED.is_dir():
        pytest.skip(f"the published seed is not beside this checkout ({PUBLISHED})")
    for name in ("problem1.csv", "problem23.csv"):
        assert (SEED / name).read_bytes() == (PUBLISHED / name).read_bytes()


def test_seed_preset_covers_the_seed_tables_in_order():
    rows = PRESETS["seed"]["rows"]
    assert len(rows) == 63
    seed = [(r["rnn_type"].lower(), int(r["seq_len"]), int(r["hidden_size"]), int(r["fc_layers"])) for r, _ in _seed_rows()]
    assert [(r["cell"], r["seq_len"], r["hidden_size"], r["fc_layers"]) for r in rows] == seed


def test_dry_run_lists_the_grid_with_seed_parameter_counts():
    out = subprocess.run([sys.executable, "-m", "train.grid", "--preset", "seed", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    rows = list(csv.DictReader(out.splitlines()))
    assert len(rows) == 63
    assert {"model_id", "rnn_type", "seq_len", "hidden_size", "fc_layers", "vocab_size", "parameters",
            "size_mb"} <= set(rows[0])
    for ours, (seed, V) in zip(rows, _seed_rows()):
        assert int(ours["parameters"]) == int(seed["parameters"])
        assert int(ours["vocab_size"]) == V
        assert float(ours["size_mb"]) == pytest.approx(float(seed["size_mb"]), abs=1e-5)


# --- the corpus ---------------------------------------------------------------------------------

def test_split_is_contiguous_90_5_5():
    text = "".join(chr(65 + i % 26) for i in range(10_000))
    tr, va, te = corpus.split(text)
    assert tr + va + te == text
    assert (len(tr), len(va), len(te)) == (9000, 500, 500)


@pytest.mark.parametrize("objective", ["all", "last"])
def test_training_batches_never_contain_held_out_text(tmp_path, objective):
    # held-out 10% of this corpus is written with characters the training 90% never uses
    text = "abcab" * 360 + "x" * 100 + "y" * 100  # 2,000 chars: train 1,800, validation 100, test 100
    path = tmp_path / "c.txt"
    path.write_text(text)
    job = Job("t", "tinyshakespeare", str(path), "gru", 7, 8, 1, TrainConfig(objective=objective, batch_size=4), str(tmp_path))
    tr = Trainer(job, quiet=True)
    held = {tr.vocab.index["x"], tr.vocab.index["y"]}
    seen = 0
    for x, y in tr._batches():
        seen += y.numel()
        assert not held & set(x.flatten().tolist()) and not held & set(y.flatten().tolist())
    assert seen >= (1800 - 7 - 4 * 7) if objective == "all" else seen == 1800 - 7
    assert set(tr.val_ids.tolist()) == {tr.vocab.index["x"]}


def test_grid_data_file_is_any_utf8_text_with_its_own_vocabulary(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("Ça va? Très bien, merci.\n" * 200, encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "train.grid", "--preset", "quick", "--dry-run", "--data", str(text)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {row["vocab_size"] for row in csv.DictReader(r.stdout.splitlines())} == {str(len(set(text.read_text())))}


@pytest.mark.parametrize("make", ["missing", "latin-1"])
def test_unusable_data_is_a_clear_error_exit_2(tmp_path, make):
    path = tmp_path / "corpus.txt"
    if make == "latin-1":
        path.write_bytes("Très bien".encode("latin-1"))
    r = subprocess.run([sys.executable, "-m", "train.grid", "--preset", "quick", "--data", str(path), "--out",
                        str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("no such file" if make == "missing" else "not UTF-8") in r.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_preset_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "train.grid", "--preset", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_embedded_corpora_are_the_default_and_checked(monkeypatch):
    monkeypatch.delenv("CHARRNN_DATA_DIR", raising=False)
    for name, c in corpus.CORPORA.items():
        path = corpus.resolve(name)
        assert path == c.embedded and path.stat().st_size < 500_000
        assert corpus.sha256_text(corpus.load_text(path)) == c.sha256
    text = corpus.load_text(corpus.resolve("prediction"))
    assert corpus.prompt("prediction", text).endswith("next character predic")


def test_data_dir_comes_before_the_embedded_copy_and_is_checked(tmp_path, monkeypatch, shakespeare):
    monkeypatch.setenv("CHARRNN_DATA_DIR", str(tmp_path))
    assert corpus.resolve("tinyshakespeare") == corpus.CORPORA["tinyshakespeare"].embedded  # not there: embedded
    (tmp_path / "tinyshakespeare.txt").write_text(shakespeare)
    assert corpus.resolve("tinyshakespeare") == tmp_path / "tinyshakespeare.txt"
    (tmp_path / "tinyshakespeare.txt").write_text("not shakespeare")
    with pytest.raises(corpus.CorpusError, match="sha256"):  # a wrong file found by name is never used
        corpus.resolve("tinyshakespeare")
    user = tmp_path / "mine.txt"
    user.write_text("any text at all")
    assert corpus.resolve("tinyshakespeare", user) == user  # --data FILE first, used as given
    assert corpus.prompt("tinyshakespeare", "any text at all") == "any text at all"


# --- vocabulary, sampling, generation ------------------------------------------------------------

def test_character_outside_the_vocabulary_is_a_clear_error():
    v = Vocab.from_text("hello world")
    with pytest.raises(VocabError, match=r"'Z' at position 3"):
        v.encode("helZo")
    model = CharRNN(ModelConfig("gru", len(v), 8))
    with pytest.raises(VocabError):
        generate(model, v, "hi Z", 5)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_carried_state_generation_equals_refeeding_the_full_history(cell):
    torch.manual_seed(1)
    v = Vocab.from_text("abcdefgh ")
    model = CharRNN(ModelConfig(cell, len(v), 16, 2))
    ours = generate(model, v, "abc hgf", 60)
    full_history = generate_refeed(model, v, "abc hgf", 60, seq_len=10**9)  # whole history from a zero state
    assert ours == full_history


def test_sampler_filters_and_is_reproducible():
    import numpy as np

    logits = np.array([0.0, 1.0, 5.0, 2.0])
    assert sample(logits) == 2
    draws = lambda **kw: [sample(logits, rng=np.random.default_rng(7), **kw) for _ in range(3)]  # noqa: E731
    assert draws(temperature=1.0) == draws(temperature=1.0)
    rng = np.random.default_rng(0)
    assert {sample(logits, 1.0, top_k=2, rng=rng) for _ in range(200)} == {2, 3}
    assert {sample(logits, 1.0, top_p=0.5, rng=rng) for _ in range(200)} == {2}


# --- training -----------------------------------------------------------------------------------

def _small_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text("the cat sat on the mat. " * 400)
    return path


@pytest.mark.parametrize("objective", ["all", "last"])
def test_both_objectives_lower_the_held_out_loss(tmp_path, objective):
    path = _small_corpus(tmp_path)
    cfg = TrainConfig(objective=objective, epochs=3, batch_size=16 if objective == "all" else 256, lr=1e-2,
                      evals_per_epoch=2, patience=0)
    job = Job("m", "tinyshakespeare", str(path), "lstm", 12, 32, 1, cfg, str(tmp_path / "run"))
    config = train_one(job, quiet=True)
    V = len(config["vocab"])
    evals = [json.loads(l) for l in (tmp_path / "run" / "m" / "metrics.jsonl").read_text().splitlines()]
    key = "val_loss" if objective == "all" else "val_loss_window"
    assert len(evals) == 6
    assert evals[-1][key] < 0.5 * math.log(V)  # far below the uniform guess
    assert config["metrics"][key] == pytest.approx(min(e[key] for e in evals), rel=1e-5)  # best weights kept
    assert config["done"] and (tmp_path / "run" / "m" / "sample.txt").read_text().count("===") == 6


# --- the learning rate of a budget ---------------------------------------------------------------

def test_schedule_warms_up_then_decays_to_its_floor_at_the_horizon():
    assert [lr_factor(s, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 100) == 1.0
    assert lr_factor(52, 4, 101) == pytest.approx(0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert lr_factor(52, 4, 101, "linear") == pytest.approx(0.55)
    assert lr_factor(30, 4, 101, "linear") < lr_factor(30, 4, 101)  # cosine stays high longer
    for shape in ("cosine", "linear"):
        assert lr_factor(99, 4, 100, shape, floor=0.1) == pytest.approx(0.1)  # the last step of the budget
        assert lr_factor(10**6, 4, 100, shape, floor=0.05) == pytest.approx(0.05)  # past the horizon: the floor
    assert lr_factor(0, 0, 1) == 1.0 and Horizon.of(1000, 0.02) == Horizon(1000, 20) and Horizon.of(50, 0).warmup == 0


def test_time_bounded_horizon_counts_the_evaluations_to_come():
    # 100 steps in 10 s of which 2 s went on one evaluation: 0.08 s a step; 30 s left; one evaluation
    # every 200 steps costs 0.01 s a step more -> 30 / 0.09 = 333 steps more
    assert steps_in_time(100, 10.0, 2.0, 1, 40.0, 200) == 100 + int(30 / 0.09)
    assert steps_in_time(100, 10.0, 0.0, 0, 40.0, 200) == 100 + 300  # no evaluation measured yet
    assert steps_in_time(100, 50.0, 0.0, 0, 40.0, 200) == 100  # over time: no more steps


def test_defaults_resolve_per_objective_and_the_seeds_stay_reachable():
    seed = TrainConfig(objective="last").resolved("lstm", 256)
    assert (seed.lr, seed.batch(), seed.schedule) == (1e-3, 8192, "none")
    ours = TrainConfig().resolved("gru", 512)
    assert ours.schedule == "cosine" and ours.lr > 0 and ours.batch_size > 0
    mine = TrainConfig(lr=5e-4, batch_size=7, schedule="none").resolved("lstm", 128)
    assert (mine.lr, mine.batch(), mine.schedule) == (5e-4, 7, "none")


def _lrs(run: Path, mid: str) -> list[float]:
    return [json.loads(l)["lr"] for l in (run / mid / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_epoch_bounded_run_ends_at_the_floor_and_resumes_on_the_same_curve(tmp_path, shape):
    path = _small_corpus(tmp_path)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, schedule=shape, evals_per_epoch=2, patience=0)
    job = Job("m", "tinyshakespeare", str(path), "gru", 10, 16, 1, cfg, str(tmp_path / "ref"))
    train_one(job, quiet=True)
    ref = _lrs(tmp_path / "ref", "m")
    assert ref[-1] == pytest.approx(1e-2 * cfg.lr_floor)  # annealed exactly when the epochs run out
    assert ref == sorted(ref, reverse=True) and len(set(ref)) == len(ref)

    # stop after the 3rd evaluation (mid-run), then resume in a new Trainer
    job = Job("m", "tinyshakespeare", str(path), "gru", 10, 16, 1, cfg, str(tmp_path / "run"))
    tr = Trainer(job, quiet=True)
    tr.dir.mkdir(parents=True)
    tr._stopped = lambda: tr.evals == 3  # as a kill after the checkpoint would
    tr.fit()
    assert tr.evals == 3
    again = Trainer(job, quiet=True)
    assert again.try_resume() and again.horizon == tr.horizon == Horizon(3 * tr.steps_per_epoch(), tr.horizon.warmup)
    again.fit()
    again.finish()
    assert _lrs(tmp_path / "run", "m") == ref
    assert (tmp_path / "run" / "m" / "model.safetensors").read_bytes() == \
        (tmp_path / "ref" / "m" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("schedule", ["none", "cosine"])
def test_patience_stops_a_constant_rate_run_but_a_decay_runs_its_budget_out(tmp_path, schedule):
    path = _small_corpus(tmp_path)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, schedule=schedule, evals_per_epoch=4, patience=1)
    tr = Trainer(Job("m", "tinyshakespeare", str(path), "gru", 10, 16, 1, cfg, str(tmp_path)), quiet=True)
    tr.dir.mkdir(parents=True)
    tr._select_loss = lambda m: 1.0  # the held-out loss never improves after the first evaluation
    tr.fit()
    if schedule == "none":
        assert tr.evals == 2 and tr._stop_reason() == "patience"
    else:  # stopped at a high rate it would end worse than a shorter budget: it anneals to the end instead
        assert tr.step == 2 * tr.steps_per_epoch() and tr.opt.param_groups[0]["lr"] == pytest.approx(1e-2 * cfg.lr_floor)


def test_time_bounded_run_ends_annealed_and_saves_its_horizon(tmp_path):
    path = _small_corpus(tmp_path)
    cfg = TrainConfig(epochs=10**4, max_minutes=0.2, batch_size=8, lr=1e-2, evals_per_epoch=1, patience=0,
                      eval_windows=64, threads=1)
    job = Job("m", "tinyshakespeare", str(path), "gru", 10, 16, 1, cfg, str(tmp_path))
    tr = Trainer(job, quiet=True)
    tr.dir.mkdir(parents=True)
    tr.fit()
    lrs = _lrs(tmp_path, "m")
    assert tr.step > 50 and len(lrs) >= 2 and lrs[0] > lrs[-1]
    assert lrs[-1] <= 0.3e-2  # near the 1e-3 floor when the time ran out (0.12e-2 at 90% of the horizon)
    assert tr.horizon.steps < cfg.epochs * tr.steps_per_epoch()  # the time, not the epochs, set the horizon
    again = Trainer(job, quiet=True)
    assert again.try_resume() and again.horizon == tr.horizon and again.eval_seconds > 0


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    path = _small_corpus(tmp_path)
    job = Job("m", "tinyshakespeare", str(path), "gru", 10, 16, 2, TrainConfig(epochs=1, patience=0), str(tmp_path))
    tr = Trainer(job, quiet=True)
    tr.dir.mkdir(parents=True)
    tr.fit()
    tr.save()
    ckpt = load_checkpoint(tmp_path / "m")
    best = tr.best_weights
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(v, best[k]), k
    assert ckpt.vocab == tr.vocab and ckpt.model.cfg == tr.model.cfg


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, checkpoint_factory):
    ckpt = checkpoint_factory(cell="gru")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def _grid(out: Path, data: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "train.grid", "--preset", "quick", "--only", "rnn-h64-fc1-s50",
            "--only", "gru-h64-fc1-s50", "--out", str(out), "--data", str(data), "--hidden-size", "64",
            "--max-minutes", "0", "--patience", "0", "--eval-windows", "256", *extra]


def test_killed_grid_resumes_exactly_with_one_row_per_model(tmp_path, shakespeare):
    data = tmp_path / "small.txt"
    data.write_text(shakespeare[:20_000])
    args = ["--epochs", "4", "--evals-per-epoch", "2", "--batch-size", "8"]
    ref = subprocess.run(_grid(tmp_path / "ref", data, *args), cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "run"
    proc = subprocess.Popen(_grid(run, data, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "gru-h64-fc1-s50" / "metrics.jsonl"  # the second model: kill it mid-training
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "gru-h64-fc1-s50" / "config.json").is_file() or \
        not json.loads((run / "gru-h64-fc1-s50" / "config.json").read_text())["done"]

    again = subprocess.run(_grid(run, data, *args), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = list(csv.DictReader(open(run / "results.csv", newline="")))
    assert sorted(r["model_id"] for r in rows) == ["gru-h64-fc1-s50", "rnn-h64-fc1-s50"]
    for mid in ("rnn-h64-fc1-s50", "gru-h64-fc1-s50"):
        evals = [json.loads(l)["eval"] for l in (run / mid / "metrics.jsonl").read_text().splitlines()]
        assert evals == list(range(1, 9)), mid
        # the resumed model ends where an uninterrupted run ends, bit for bit
        assert (run / mid / "model.safetensors").read_bytes() == (tmp_path / "ref" / mid / "model.safetensors").read_bytes()

    third = subprocess.run(_grid(run, data, *args), cwd=ROOT, capture_output=True, text=True)
    assert third.returncode == 0 and "2 of 2 models already done" in third.stderr
    assert len(list(csv.DictReader(open(run / "results.csv", newline="")))) == 2


def test_quick_preset_is_bounded_by_work_and_repeats_bit_for_bit(tmp_path):
    assert "max_minutes" not in PRESETS["quick"]["train"]  # the same command, the same models, on any machine
    runs = []
    for name in ("a", "b"):
        r = subprocess.run([sys.executable, "-m", "train.grid", "--preset", "quick", "--only", "rnn-h64-fc1-s50",
                            "--max-steps", "12", "--threads", "1", "--eval-windows", "256", "--out", str(tmp_path / name)],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CHARRNN_DATA_DIR": ""})
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append((tmp_path / name / "rnn-h64-fc1-s50" / "model.safetensors").read_bytes())
    assert runs[0] == runs[1]
    line = next(l for l in r.stderr.splitlines() if "INFO train.grid: rnn-h64-fc1-s50: " in l)
    assert "(12 steps)" in line and "step budget spent" in line and "held-out loss" in line
    for f in ("model.safetensors", "config.json", "sample.txt", "train_state.pt"):
        assert (tmp_path / "b" / "rnn-h64-fc1-s50" / f).stat().st_mode & 0o044 == 0o044, f  # readable like any file
    assert (tmp_path / "b" / "results.csv").stat().st_mode & 0o044 == 0o044


def test_parallel_workers_and_report(tmp_path, shakespeare):
    data = tmp_path / "small.txt"
    data.write_text(shakespeare[:30_000])
    r = subprocess.run(_grid(tmp_path / "run", data, "--epochs", "1", "--workers", "2"), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv", newline="")))
    assert len(rows) == 2 and all(float(r["Validation Loss"]) > 0 for r in rows)
    rep = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path / "run")], cwd=ROOT,
                         capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    for name in ("loss_vs_parameters.png", "train_time_vs_seq_len.png", "learning_curves.png"):
        assert (tmp_path / "run" / "report" / name).read_bytes()[:4] == b"\x89PNG"
    assert "rnn-h64-fc1-s50" in (tmp_path / "run" / "report" / "seed_comparison.md").read_text()


def test_ray_backend_runs_a_two_model_grid(tmp_path, shakespeare):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'charrnn[ray]')")
    data = tmp_path / "small.txt"
    data.write_text(shakespeare[:30_000])
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run(_grid(tmp_path / "run", data, "--epochs", "1", "--backend", "ray", "--threads", "1"),
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv", newline="")))
    assert sorted(r["model_id"] for r in rows) == ["gru-h64-fc1-s50", "rnn-h64-fc1-s50"]


def test_batched_sampler_draws_what_the_single_sampler_draws():
    import numpy as np

    from train.sampling import sample_many

    rng = np.random.default_rng(0)
    B, V = 48, 65
    logits = (rng.normal(size=(B, V)) * 3).astype(np.float32)
    temps = rng.choice([0.0, 0.5, 0.8, 1.0, 1.3], B)
    ks = rng.choice([0, 0, 5, 20, 64, 65, 100], B)
    ps = rng.choice([1.0, 1.0, 0.9, 0.5, 0.99], B)
    for _ in range(20):
        seeds = rng.integers(0, 2**30, B)
        single = [sample(logits[i], temps[i], ks[i], ps[i], np.random.default_rng(seeds[i])) for i in range(B)]
        batch = sample_many(logits, temps, ks, ps, [np.random.default_rng(s) for s in seeds])
        assert batch.tolist() == single
        rows = rng.permutation(B)[:7]  # the same streams in another batch
        sub = sample_many(logits[rows], temps[rows], ks[rows], ps[rows], [np.random.default_rng(seeds[i]) for i in rows])
        assert sub.tolist() == [single[i] for i in rows]


def test_block_drawn_uniforms_are_the_generators_own():
    import numpy as np

    from train.sampling import Uniforms

    u, g = Uniforms(11, block=7), np.random.default_rng(11)
    assert [u.random() for _ in range(30)] == [g.random() for _ in range(30)]  # across block boundaries
    logits = np.random.default_rng(0).normal(size=65).astype(np.float32) * 3
    u, g = Uniforms(5), np.random.default_rng(5)
    assert [sample(logits, 1.0, 0, 0.9, u) for _ in range(50)] == [sample(logits, 1.0, 0, 0.9, g) for _ in range(50)]


def test_bench_reference_loop_and_our_side_train_the_same_model(tmp_path):
    from train.bench import ours, plain_tbptt

    path = _small_corpus(tmp_path)
    plain = plain_tbptt(str(path), "gru", 16, 1, 0, 1, streams=4, T=10, chars=4000)
    assert plain["steps"] == 100 and plain["val_loss"] < math.log(9)  # 9 characters: below the uniform guess
    job = Job("m", "tinyshakespeare", str(path), "gru", 10, 16, 1,
              TrainConfig(max_steps=100, batch_size=4, patience=0, eval_windows=64), str(tmp_path / "run"))
    r = ours(job)
    assert r["steps"] == 100 and r["val_loss"] < math.log(9)
    assert r["final_lr"] == pytest.approx(TrainConfig().resolved("gru", 16).lr * 0.1)  # ended annealed


def test_bench_budget_reports_every_side_of_every_model(tmp_path, capsys):
    from train import bench

    path, out = _small_corpus(tmp_path), tmp_path / "budget"
    bench.main(["--data", str(path), "budget", "--chars", "4000", "--sides", "ours,plain", "--out", str(out),
                "--model", "gru-h128-fc1-s20", "--model", "lstm-h128-fc1-s20"])
    (report,) = out.glob("budget-*.json")  # written after each model: a long run that is cut short keeps its rows
    rows = json.loads(report.read_text())
    assert [(r["model"], r["side"]) for r in rows] == [(m, s) for m in ("gru-h128-fc1-s20", "lstm-h128-fc1-s20")
                                                        for s in ("ours", "plain")]
    assert all(r["chars"] == 4000 and r["val_loss"] < math.log(9) for r in rows)  # 9 characters: below uniform
    assert capsys.readouterr().out.count("| gru-h128-fc1-s20 |") == 2
