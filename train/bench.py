"""Benchmarks of the training stage (figures for the README, not tests).

  python -m train.bench objectives [--minutes 10]   time to a held-out loss: objective all vs the seed's last
  python -m train.bench generation                  per-character time: carried state vs the seed's re-feeding

Both sides of each comparison run in the same invocation (objectives: at the same time, one thread
each), since these machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

from train import corpus
from train.model import CharRNN, ModelConfig
from train.sampling import generate, generate_refeed
from train.trainer import Job, TrainConfig, train_one
from train.vocab import Vocab


def _curve(run: Path, model_id: str) -> list[dict]:
    return [json.loads(line) for line in (run / model_id / "metrics.jsonl").read_text().splitlines()]


def time_to(curve: list[dict], key: str, target: float) -> float | None:
    """Training seconds at the first evaluation whose `key` is <= target, None if never."""
    return next((e["train_seconds"] for e in curve if e[key] <= target), None)


def objectives(args) -> None:
    path = str(corpus.resolve("tinyshakespeare", args.data))
    jobs = []
    for objective, evals in (("all", 8), ("last", 40)):  # 'last' epochs are long: evaluate more often
        cfg = TrainConfig(objective=objective, epochs=100, max_minutes=args.minutes, patience=0, threads=1,
                          evals_per_epoch=evals, checkpoint_every=1000)
        jobs.append(Job(f"{args.cell}-h{args.hidden}-{objective}", "tinyshakespeare", path, args.cell,
                        args.seq_len, args.hidden, 1, cfg, str(args.out)))
    with mp.get_context("spawn").Pool(2) as pool:
        pool.starmap(train_one, [(j, 0, True) for j in jobs])
    all_curve, last_curve = (_curve(args.out, j.model_id) for j in jobs)
    print(f"{args.cell.upper()} hidden {args.hidden} seq {args.seq_len}, {args.minutes} min each, 1 thread each, "
          f"run side by side")
    for key in ("val_loss_window", "val_loss"):
        target = min(e[key] for e in last_curve)  # the best the seed's objective reached
        t_last, t_all = time_to(last_curve, key, target), time_to(all_curve, key, target)
        ratio = f"{t_last / t_all:.0f}x" if t_all else "n/a"
        print(f"  {key}: 'last' best {target:.3f} after {t_last:.0f} s; 'all' reached it after "
              f"{t_all if t_all is None else round(t_all, 1)} s -> {ratio} less time; "
              f"'all' best {min(e[key] for e in all_curve):.3f}")


def generation(args) -> None:
    torch.set_num_threads(1)
    text = corpus.load_text(corpus.resolve("tinyshakespeare", args.data))
    vocab, prompt = Vocab.from_text(text), corpus.prompt("tinyshakespeare", text)
    print("| cell | hidden | seq_len | carried us/char | re-feed us/char | speedup |\n|---|---|---|---|---|---|")
    for cell in ("lstm", "gru"):
        for hidden in (128, 256, 512):
            model = CharRNN(ModelConfig(cell, len(vocab), hidden, 1)).eval()
            generate(model, vocab, prompt, 20)  # warm-up
            t0 = time.perf_counter()
            generate(model, vocab, prompt, args.chars)
            carried = (time.perf_counter() - t0) / args.chars
            for seq_len in (20, 50):
                t0 = time.perf_counter()
                generate_refeed(model, vocab, prompt, args.chars, seq_len)
                refeed = (time.perf_counter() - t0) / args.chars
                print(f"| {cell} | {hidden} | {seq_len} | {carried * 1e6:.0f} | {refeed * 1e6:.0f} | {refeed / carried:.1f}x |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="corpus file or folder (as in train.grid)")
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("objectives", help="time to a held-out loss, objective all vs last")
    o.add_argument("--minutes", type=float, default=10.0, help="training budget of each side (default: 10)")
    o.add_argument("--cell", default="lstm", choices=("rnn", "lstm", "gru"))
    o.add_argument("--hidden", type=int, default=256)
    o.add_argument("--seq-len", type=int, default=30)
    o.add_argument("--out", type=Path, default=Path("runs/bench-objectives"))
    g = sub.add_parser("generation", help="per-character generation time, carried state vs re-feeding")
    g.add_argument("--chars", type=int, default=300, help="characters generated per timing (default: 300)")
    args = p.parse_args(argv)
    try:
        objectives(args) if args.what == "objectives" else generation(args)
    except corpus.CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
