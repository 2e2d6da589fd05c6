"""python -m train.grid: train the seed report's model grid, honestly, resumably and in parallel.

Presets are plain data: rows of (corpus, cell, seq_len, hidden_size, fc_layers) plus the training
settings that suit them. Every model gets a checkpoint directory under --out; results.csv is rebuilt
from the finished ones after each model, so it never holds a duplicate or half-written row.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import io
import logging
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from train import corpus
from train.checkpoint import CheckpointError, atomic_write, read_config
from train.model import CELLS, CharRNN, ModelConfig, count_parameters, model_id, size_mb
from train.trainer import Job, TrainConfig, train_one

log = logging.getLogger("train.grid")


def _rows(corpus_name, cells, seq_lens, hiddens, fcs):
    """In the order of the seed's tables: sequence length, then cell, hidden size, FC layers."""
    return [dict(corpus=corpus_name, cell=c, seq_len=s, hidden_size=h, fc_layers=f)
            for s in seq_lens for c in cells for h in hiddens for f in fcs]


PRESETS = {
    "seed-p1": dict(rows=_rows("prediction", ("rnn", "lstm", "gru"), (10, 20, 30), (256,), (1,)),
                    train=dict(epochs=100, batch_size=8, patience=10)),  # 2,205 training chars: 8 streams
    "seed-p23": dict(rows=_rows("tinyshakespeare", ("lstm", "gru"), (20, 30, 50), (128, 256, 512), (1, 2, 3)),
                     train=dict(epochs=20, patience=3, evals_per_epoch=2)),
    "quick": dict(rows=[dict(corpus="tinyshakespeare", cell=c, seq_len=50, hidden_size=64, fc_layers=1) for c in CELLS]
                  + [dict(corpus="tinyshakespeare", cell="lstm", seq_len=50, hidden_size=128, fc_layers=2)],
                  train=dict(epochs=2, evals_per_epoch=2)),  # the README demo: bounded by work, ~2 minutes on 2 quiet cores
}
PRESETS["seed"] = dict(rows=PRESETS["seed-p1"]["rows"] + PRESETS["seed-p23"]["rows"],
                       train=PRESETS["seed-p23"]["train"], per_corpus={"prediction": PRESETS["seed-p1"]["train"]})

RESULT_COLUMNS = [  # the seed's table first ("Validation" now held out), then what it lacked
    "Model", "RNN Type", "Sequence Length", "Training Loss", "Validation Loss", "Validation Accuracy",
    "Training time", "Inference Time", "Hidden Size", "Fully Connected Layers", "Parameters", "Size (MB)",
    "model_id", "corpus", "objective", "val_loss_window", "val_acc_window", "val_bpc", "test_loss", "test_acc",
    "test_bpc", "train_set_loss", "train_set_acc", "chars_per_s", "epochs", "stopped", "inference_carried_s",
    "inference_speedup", "predicted",
]


def grid_id(row: dict) -> str:
    mid = model_id(row["cell"], row["hidden_size"], row["fc_layers"], row["seq_len"])
    return mid if row["corpus"] == "tinyshakespeare" else f"{row['corpus']}-{mid}"


def select(rows: list[dict], args) -> list[dict]:
    keep = []
    for r in rows:
        if args.only and not any(fnmatch.fnmatch(grid_id(r), pat) for pat in args.only):
            continue
        if any(getattr(args, k) and r[k] not in getattr(args, k) for k in ("cell", "seq_len", "hidden_size", "fc_layers")):
            continue
        keep.append(r)
    return keep


def train_config(preset: dict, corpus_name: str, overrides: dict) -> TrainConfig:
    base = {**preset["train"], **preset.get("per_corpus", {}).get(corpus_name, {})}
    return TrainConfig(**{**base, **overrides})


def result_row(config: dict) -> dict:
    m, t = config["metrics"], config["train"]
    mc = config["model"]
    return {
        "Model": config["model_id"], "RNN Type": mc["cell"].upper(), "Sequence Length": t["seq_len"],
        "Training Loss": m["train_loss"], "Validation Loss": m["val_loss"], "Validation Accuracy": m["val_acc"],
        "Training time": m["train_seconds"], "Inference Time": m["inference_refeed_s"],
        "Hidden Size": mc["hidden_size"], "Fully Connected Layers": mc["fc_layers"],
        "Parameters": config["parameters"], "Size (MB)": config["size_mb"],
        "model_id": config["model_id"], "corpus": config["corpus"]["name"], "objective": t["objective"],
        **{k: m[k] for k in ("val_loss_window", "val_acc_window", "val_bpc", "test_loss", "test_acc", "test_bpc",
                             "train_set_loss", "train_set_acc", "chars_per_s", "epochs", "stopped",
                             "inference_carried_s")},
        "inference_speedup": m["inference_refeed_s"] / m["inference_carried_s"],
        "predicted": m["predicted"] if config["corpus"]["name"] == "prediction" else "",
    }


def finished(ckpt: Path) -> dict | None:
    """The config.json of a finished model; None while it is absent, unfinished or unreadable."""
    try:
        config = read_config(ckpt)
    except CheckpointError:
        return None
    return config if config.get("done") else None


STOPPED = {"epochs": "all epochs run", "steps": "step budget spent", "time": "--max-minutes reached",
           "patience": "early-stopped (no better held-out loss)"}


def summary(config: dict) -> str:
    """The one line a finished model prints: how far it got, how fast, why it stopped, how good it is."""
    m = config["metrics"]
    return (f"{config['model_id']}: {m['epochs']:.2f} epochs ({m['steps']} steps) at {m['chars_per_s']:,.0f} chars/s, "
            f"{STOPPED.get(m['stopped'], m['stopped'])}; held-out loss {m['val_loss']:.3f} nats/char "
            f"({m['val_bpc']:.2f} bits), accuracy {m['val_acc']:.3f}, test loss {m['test_loss']:.3f}")


def write_results(out: Path, rows: list[dict]) -> int:
    """Rebuild results.csv (atomically) from every finished model of the preset, in grid order."""
    found = [result_row(config) for r in rows if (config := finished(out / grid_id(r)))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows(found)
    atomic_write(out / "results.csv", buf.getvalue())
    return len(found)


def dry_run(rows: list[dict], paths: dict[str, str]) -> None:
    vocab = {name: len(set(corpus.load_text(path))) for name, path in paths.items()}
    w = csv.writer(sys.stdout)
    w.writerow(["model_id", "corpus", "rnn_type", "seq_len", "hidden_size", "fc_layers", "vocab_size",
                "parameters", "size_mb"])
    for r in rows:
        V = vocab[r["corpus"]]
        n = count_parameters(CharRNN(ModelConfig(r["cell"], V, r["hidden_size"], r["fc_layers"])))
        w.writerow([grid_id(r), r["corpus"], r["cell"], r["seq_len"], r["hidden_size"], r["fc_layers"], V, n,
                    f"{size_mb(n):.6f}"])


# --- execution backends: each yields (job, config or exception) as models finish ------------------

def run_local(jobs: list[Job], workers: int):
    if workers == 1:
        for job in jobs:
            try:
                yield job, train_one(job, position=1)
            except Exception as e:  # one model's failure must not lose the others
                log.exception("%s failed", job.model_id)
                yield job, e
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(train_one, job, i % workers + 1): job for i, job in enumerate(jobs)}
        for f in as_completed(futures):
            try:
                yield futures[f], f.result()
            except Exception as e:
                log.error("%s failed: %s", futures[f].model_id, e)
                yield futures[f], e


def run_ray(jobs: list[Job], address: str | None, gpus_per_model: float):
    try:
        import ray
    except ImportError:
        raise SystemExit("--backend ray needs Ray: pip install 'charrnn[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
             **({} if address else {"num_cpus": os.cpu_count()}))
    remote = ray.remote(train_one)
    pending = {remote.options(num_cpus=max(1, job.train.threads), num_gpus=gpus_per_model)
               .remote(job, 0, True): job for job in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            yield job, ray.get(done[0])
        except Exception as e:
            log.error("%s failed: %s", job.model_id, e)
            yield job, e


# --- the command line -----------------------------------------------------------------------------

def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.grid",
        description="Train the seed report's grid of character models (RNN/LSTM/GRU x sequence length x "
                    "hidden size x FC layers), evaluate on held-out text, and tabulate results.csv. "
                    "Rerunning the same command resumes: finished models are skipped, unfinished ones "
                    "continue from their last checkpoint.")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="seed-p1: 9 models on prediction.txt; seed-p23: 54 on tiny Shakespeare; seed: both; "
                        "quick: 4 small models, about two CPU minutes (default: quick)")
    p.add_argument("--out", type=Path, help="run directory (default runs/PRESET)")
    p.add_argument("--data", type=Path, help="any UTF-8 text file to train on (its vocabulary is its own characters), "
                                             "or a folder holding tinyshakespeare.txt / prediction.txt "
                                             "(default: $CHARRNN_DATA_DIR, else the copies shipped in the package)")
    p.add_argument("--dry-run", action="store_true", help="train nothing; print the grid as CSV")
    sel = p.add_argument_group("selecting rows")
    sel.add_argument("--only", action="append", metavar="GLOB", help="model ids to train (glob, repeatable)")
    sel.add_argument("--cell", type=lambda s: s.split(","), help="comma list of rnn,lstm,gru")
    sel.add_argument("--seq-len", type=_int_list, help="comma list of sequence lengths")
    sel.add_argument("--hidden-size", type=_int_list, help="comma list of hidden sizes")
    sel.add_argument("--fc-layers", type=_int_list, help="comma list of FC layer counts")
    run = p.add_argument_group("running")
    run.add_argument("--workers", type=int, default=1, help="models trained at once, in separate processes (default: 1)")
    run.add_argument("--backend", default="local", choices=("local", "ray"), help="where models train (default: local)")
    run.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    run.add_argument("--gpus-per-model", type=float, default=0.0, help="GPUs each Ray task asks for (default: 0)")
    tr = p.add_argument_group("training (defaults come from the preset, then these)")
    for f in dataclasses.fields(TrainConfig):
        kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        tr.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                        help=f"{f.metadata['help']} (default: {f.default})", **kw)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    preset = PRESETS[args.preset]
    rows = select(preset["rows"], args)
    if not rows:
        log.error("no model of preset %s matches the filters", args.preset)
        return 2
    try:
        paths = {name: str(corpus.resolve(name, args.data)) for name in {r["corpus"] for r in rows}}
    except corpus.CorpusError as e:
        log.error("%s", e)
        return 2
    if args.dry_run:
        dry_run(rows, paths)
        return 0
    if args.workers < 1:
        log.error("--workers must be >= 1")
        return 2
    out = args.out or Path("runs") / args.preset
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    if "threads" not in overrides and (args.workers > 1 or args.backend == "ray"):
        # split the cores between concurrent models; a Ray task asks for (and gets) one CPU per thread
        overrides["threads"] = 1 if args.backend == "ray" else max(1, (os.cpu_count() or 1) // args.workers)
    jobs = [Job(grid_id(r), r["corpus"], paths[r["corpus"]], r["cell"], r["seq_len"], r["hidden_size"],
                r["fc_layers"], train_config(preset, r["corpus"], overrides), str(out)) for r in rows]
    todo = [j for j in jobs if finished(out / j.model_id) is None]
    if len(todo) < len(jobs):
        log.info("%d of %d models already done in %s, skipped (another --out trains them afresh)",
                 len(jobs) - len(todo), len(jobs), out)
    out.mkdir(parents=True, exist_ok=True)
    failed, t0 = [], time.perf_counter()
    if todo:
        log.info("training %d models -> %s", len(todo), out)
        runner = (run_ray(todo, args.ray_address, args.gpus_per_model) if args.backend == "ray"
                  else run_local(todo, args.workers))
        with logging_redirect_tqdm(), tqdm(total=len(todo), desc="grid", unit="model", position=0) as bar:
            for job, result in runner:
                if isinstance(result, Exception):
                    failed.append(job.model_id)
                else:
                    log.info("%s", summary(result))
                bar.update()
                write_results(out, preset["rows"])  # after each model, so a crash keeps the rows so far
        log.info("%d trained in %.0f s%s", len(todo) - len(failed), time.perf_counter() - t0,
                 f", {len(failed)} failed" if failed else "")
    else:
        write_results(out, preset["rows"])
    log.info("results in %s", out / "results.csv")
    if failed:
        log.error("failed: %s", ", ".join(failed))
        return 1
    return 0


def cli() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted: finished models and checkpoints are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. --dry-run | head
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(cli())
