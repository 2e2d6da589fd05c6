"""python -m train.report RUN_DIR: plots and a comparison table from a grid run.

Writes into RUN_DIR/report/: loss_vs_parameters.png, train_time_vs_seq_len.png, learning_curves.png
and seed_comparison.md (our held-out figures beside the seed's reported, training-set ones).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("train.report")
SEED_DIR = Path(__file__).resolve().parent / "seed"  # the seed report's two tables, as published


def read_results(run_dir: Path) -> list[dict]:
    path = run_dir / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a grid run directory?")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_vs_parameters(rows, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_cell = defaultdict(list)
    for r in rows:
        by_cell[r["RNN Type"]].append((int(r["Parameters"]), float(r["Validation Loss"])))
    for cell, pts in sorted(by_cell.items()):
        ax.scatter(*zip(*sorted(pts)), label=cell)
    ax.set(xscale="log", xlabel="parameters", ylabel="held-out validation loss (nats/char)",
           title="Held-out loss vs parameters")
    ax.legend()
    return _save(fig, out / "loss_vs_parameters.png")


def plot_time_vs_seq_len(rows, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = defaultdict(list)
    for r in rows:
        groups[f"{r['RNN Type']} h{r['Hidden Size']}"].append((int(r["Sequence Length"]), float(r["Training time"])))
    for name, pts in sorted(groups.items()):
        agg = defaultdict(list)
        for s, t in pts:
            agg[s].append(t)
        xs = sorted(agg)
        ax.plot(xs, [sum(agg[x]) / len(agg[x]) for x in xs], marker="o", label=name)
    ax.set(xlabel="sequence length", ylabel="training time (s)", title="Training time vs sequence length")
    ax.legend(fontsize=8)
    return _save(fig, out / "train_time_vs_seq_len.png")


def plot_learning_curves(run_dir: Path, rows, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        path = run_dir / r["model_id"] / "metrics.jsonl"
        if not path.is_file():
            continue
        evals = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if evals:
            ax.plot([e["train_seconds"] for e in evals], [e["val_loss"] for e in evals], marker=".", label=r["model_id"])
    ax.set(xlabel="training time (s)", ylabel="held-out validation loss (nats/char)", title="Learning curves")
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, out / "learning_curves.png")


def seed_rows() -> dict[tuple, dict]:
    """The seed's reported rows keyed by (corpus, cell, seq_len, hidden, fc)."""
    table = {}
    for name, corpus_name in (("problem1.csv", "prediction"), ("problem23.csv", "tinyshakespeare")):
        path = SEED_DIR / name
        if not path.is_file():
            continue
        for r in csv.DictReader(open(path, newline="")):
            key = (corpus_name, r["rnn_type"].upper(), int(r["seq_len"]), int(r["hidden_size"]), int(r["fc_layers"]))
            table[key] = r
    return table


def comparison_table(rows) -> str:
    seed = seed_rows()
    lines = [
        "| model | params | seed 'val' loss (training windows) | seed 'val' acc | our held-out val loss | our held-out acc "
        "| our test loss | our training-set acc | seed inference s/1000 chars | our carried s/1000 chars |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = (r["corpus"], r["RNN Type"], int(r["Sequence Length"]), int(r["Hidden Size"]),
               int(r["Fully Connected Layers"]))
        s = seed.get(key, {})
        seed_loss = s.get("val_loss") or s.get("train_loss") or "-"
        f = lambda v: f"{float(v):.3f}" if v not in ("", "-", None) else "-"  # noqa: E731
        lines.append(f"| {r['model_id']} | {r['Parameters']} | {f(seed_loss)} | {f(s.get('val_accuracy'))} "
                     f"| {f(r['Validation Loss'])} | {f(r['Validation Accuracy'])} | {f(r['test_loss'])} "
                     f"| {f(r['train_set_acc'])} | {f(s.get('inference_time_s'))} | {f(r['inference_carried_s'])} |")
    return ("# Our held-out figures beside the seed's\n\nThe seed's 'validation' figures were computed on its "
            "training windows; ours are on held-out text (contiguous 90/5/5 split).\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a grid run directory (holds results.csv)")
    p.add_argument("--out", type=Path, help="where to write (default RUN_DIR/report)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rows = read_results(args.run_dir)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    if not rows:
        log.error("%s has no finished model yet", args.run_dir / "results.csv")
        return 2
    out = args.out or args.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_loss_vs_parameters(rows, out), plot_time_vs_seq_len(rows, out),
               plot_learning_curves(args.run_dir, rows, out)]
    (out / "seed_comparison.md").write_text(comparison_table(rows))
    written.append(out / "seed_comparison.md")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
