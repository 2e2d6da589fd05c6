"""Benchmarks of the training stage (figures for docs/, not tests).

  python -m train.bench objectives [--minutes 10]   time to a held-out loss: objective all vs the seed's last
  python -m train.bench generation                  per-character time: carried state vs the seed's re-feeding
  python -m train.bench budget --minutes M          held-out loss after M minutes: our trainer vs a plain TBPTT loop
                                                    (--chars N: after N training characters instead)
  python -m train.bench sweep --minutes M ...       learning rate x streams per step, for the defaults of objective all
                                                    (--steps N: bounded by work instead)

Both sides of each comparison run in the same invocation (at the same time, in one process each with
the same threads), since these machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from train import corpus
from train.model import CharRNN, ModelConfig
from train.sampling import generate, generate_refeed
from train.trainer import Job, TrainConfig, Trainer, eval_stream, train_one
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


# --- budget: our trainer against a plain truncated-BPTT loop at the same wall time -----------------

def plain_tbptt(path: str, cell: str, hidden: int, fc: int, seconds: float, threads: int, lr: float = 2e-3,
                streams: int = 32, T: int = 64, seed: int = 0, chars: int = 0) -> dict:
    """The reference: the loop everyone writes first. Adam, clip 5, state carried along `streams` streams,
    no schedule, no evaluation until the budget (`seconds`, or `chars` training characters) is spent; the
    same model class and held-out split as ours."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    text = corpus.load_text(Path(path))
    vocab = Vocab.from_text(text)
    train_text, val_text, _ = corpus.split(text)
    ids = torch.from_numpy(vocab.encode(train_text))
    L = ids.numel() // streams
    data = ids[: streams * L].view(streams, L)  # (streams, L)
    model = CharRNN(ModelConfig(cell, len(vocab), hidden, fc))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    state, t, steps, t0 = None, 0, 0, time.perf_counter()
    while steps * T * streams < chars if chars else time.perf_counter() - t0 < seconds:
        if t + T + 1 > L:  # the end of the streams: start the next epoch from a zero state
            t, state = 0, None
        x, y = data[:, t: t + T], data[:, t + 1: t + T + 1]  # (B, T)
        logits, state = model(x, state)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        state = tuple(s.detach() for s in state)
        t, steps = t + T, steps + 1
    seconds_run = time.perf_counter() - t0
    val_loss, val_acc = eval_stream(model, torch.from_numpy(vocab.encode(val_text)))
    return {"val_loss": val_loss, "val_acc": val_acc, "steps": steps, "epochs": steps * T * streams / ids.numel(),
            "chars_per_s": steps * T * streams / seconds_run, "wall_s": seconds_run,
            "settings": f"Adam {lr:g}, {streams} streams x {T}, clip 5, no schedule"}


BEFORE = dict(lr=1e-3, batch_size=64, schedule="none")  # this trainer's defaults for "all" before issue 18


def ours(job: Job) -> dict:
    """Our trainer as `python -m train.grid` runs it, less finish()'s test, training-set and generation figures."""
    shutil.rmtree(Path(job.out_dir) / job.model_id, ignore_errors=True)  # a bench run starts fresh
    tr = Trainer(job, quiet=True)
    tr.dir.mkdir(parents=True)
    tr.fit()
    if tr.best_weights:
        tr.model.load_state_dict(tr.best_weights)
    val_loss, val_acc = eval_stream(tr.model, tr.val_ids)
    cfg, curve = tr.cfg, _curve(Path(job.out_dir), job.model_id)
    return {"val_loss": val_loss, "val_acc": val_acc, "steps": tr.step, "epochs": tr.step / tr.steps_per_epoch(),
            "chars_per_s": tr.chars_seen / tr.train_seconds, "wall_s": tr._wall(), "evals": tr.evals,
            "eval_seconds": tr.eval_seconds, "final_lr": curve[-1]["lr"],
            "settings": f"Adam {cfg.lr:g}, {cfg.batch()} streams x {job.seq_len}, clip {cfg.grad_clip:g}, "
                        f"schedule {cfg.schedule}"}


def _run(side):
    fn, args, kw = side
    return fn(*args, **kw)


def _parse_id(model: str) -> tuple[str, int, int, int]:
    cell, h, fc, s = model.split("-")  # lstm-h256-fc1-s50
    return cell, int(h[1:]), int(fc[2:]), int(s[1:])


def budget(args) -> None:
    from train.grid import PRESETS, train_config

    path = str(corpus.resolve("tinyshakespeare", args.data))
    results = []
    budget = f"{args.chars:,} training characters" if args.chars else f"{args.minutes} min of training"
    when = "one after another" if args.one_at_a_time else "at the same time"
    print(f"held-out validation loss (nats/char, stream protocol) after {budget}; sides run "
          f"{when}, one process each, {args.threads} thread(s) each, on {mp.cpu_count()} CPUs")
    print("| model | side | val loss | chars/s | steps | epochs | settings |\n|---|---|---|---|---|---|---|")
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"budget-{time.strftime('%Y-%m-%dT%H:%M:%S')}.json"
    for model in args.model:
        cell, hidden, fc, seq_len = _parse_id(model)
        sides = {}
        for name in args.sides:
            if name == "plain":
                sides[name] = (plain_tbptt, (path, cell, hidden, fc, args.minutes * 60, args.threads),
                               dict(chars=args.chars))
                continue
            overrides = dict(max_minutes=args.minutes, threads=args.threads, epochs=1000,
                             **(BEFORE if name == "before" else {}))
            if args.chars:  # the same work as the plain loop: as many steps as those characters take
                batch = train_config(PRESETS["seed-p23"], "tinyshakespeare", overrides).resolved(cell, hidden).batch()
                overrides.update(max_minutes=0, max_steps=-(-args.chars // (batch * seq_len)))
            cfg = train_config(PRESETS["seed-p23"], "tinyshakespeare", overrides)
            sides[name] = (ours, (Job(f"{model}-{name}", "tinyshakespeare", path, cell, seq_len, hidden, fc, cfg,
                                      str(args.out)),), {})
        with mp.get_context("spawn").Pool(1 if args.one_at_a_time else len(sides)) as pool:
            out = dict(zip(sides, pool.map(_run, sides.values())))
        for name, r in out.items():
            results.append({"model": model, "side": name, "minutes": 0 if args.chars else args.minutes,
                            "chars": args.chars, "threads": args.threads, **r})
            print(f"| {model} | {name} | {r['val_loss']:.3f} | {r['chars_per_s']:,.0f} | {r['steps']} | "
                  f"{r['epochs']:.2f} | {r['settings']} |", flush=True)
        report.write_text(json.dumps(results, indent=1) + "\n")  # after every model: a long run keeps what it did


# --- sweep: learning rate x streams per step at a short budget -------------------------------------

def sweep(args) -> None:
    path = str(corpus.resolve("tinyshakespeare", args.data))
    jobs = []
    for model in args.model:
        cell, hidden, fc, seq_len = _parse_id(model)
        for lr in args.lr:
            for streams in args.streams:
                bound = dict(max_steps=args.steps) if args.steps else dict(max_minutes=args.minutes)
                cfg = TrainConfig(lr=lr, batch_size=streams, schedule=args.schedule, epochs=1000, patience=0,
                                  evals_per_epoch=2, threads=args.threads, dropout=args.dropout, **bound)
                jobs.append(Job(f"{model}-lr{lr:g}-b{streams}", "tinyshakespeare", path, cell, seq_len, hidden, fc,
                                cfg, str(args.out)))
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes} min"
    print(f"{budget} per run, {args.workers} runs at a time, {args.threads} thread(s) each, "
          f"schedule {args.schedule}, dropout {args.dropout:g}")
    print("| model | lr | streams | val loss | chars/s | epochs |\n|---|---|---|---|---|---|")
    rows = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for job, r in zip(jobs, pool.imap(ours, jobs)):
            rows.append({"model_id": job.model_id, "lr": job.train.lr, "streams": job.train.batch_size, **r})
            print(f"| {job.model_id.rsplit('-lr', 1)[0]} | {job.train.lr:g} | {job.train.batch_size} | "
                  f"{r['val_loss']:.3f} | {r['chars_per_s']:,.0f} | {r['epochs']:.2f} |", flush=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sweep-{stamp}.json").write_text(json.dumps(rows, indent=1) + "\n")


def _list(kind):
    return lambda s: [kind(x) for x in s.split(",")]


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
    b = sub.add_parser("budget", help="held-out loss after M minutes: our trainer vs a plain TBPTT loop")
    b.add_argument("--minutes", type=float, default=1.27, help="training budget of each side (default: 1.27, 76 s)")
    b.add_argument("--chars", type=int, default=0, help="bound each side by training characters instead of time: "
                                                        "the same work whatever the machine's load (default: off)")
    b.add_argument("--model", action="append", help="model id(s) of the seed-p23 grid (default: lstm-h256-fc1-s50)")
    b.add_argument("--sides", type=lambda s: s.split(","), default=["ours", "plain"],
                   help="comma list of ours (today's defaults), plain (the reference loop), before (the defaults "
                        "before issue 18: Adam 1e-3, 64 streams, no schedule) (default: ours,plain)")
    b.add_argument("--threads", type=int, default=1, help="torch threads of each side (default: 1)")
    b.add_argument("--one-at-a-time", action="store_true",
                   help="run the sides one after another, each with the machine to itself (default: at the same time)")
    b.add_argument("--out", type=Path, default=Path("runs/bench-budget"))
    w = sub.add_parser("sweep", help="learning rate x streams per step at a short budget (objective all)")
    w.add_argument("--minutes", type=float, default=1.0, help="training budget of each run (default: 1)")
    w.add_argument("--steps", type=int, default=0, help="bound each run by steps instead (the same work whatever "
                                                        "the machine's load; compares learning rates, not streams)")
    w.add_argument("--model", action="append", help="model id(s) (default: lstm-h256-fc1-s50)")
    w.add_argument("--lr", type=_list(float), default=[1e-3, 2e-3, 4e-3], help="comma list (default: 1e-3,2e-3,4e-3)")
    w.add_argument("--streams", type=_list(int), default=[32, 64], help="comma list (default: 32,64)")
    w.add_argument("--schedule", default="cosine", choices=("none", "cosine", "linear"))
    w.add_argument("--dropout", type=float, default=0.0)
    w.add_argument("--workers", type=int, default=2, help="runs at a time (default: 2)")
    w.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    w.add_argument("--out", type=Path, default=Path("runs/bench-sweep"))
    args = p.parse_args(argv)
    if args.what in ("budget", "sweep"):
        args.model = args.model or ["lstm-h256-fc1-s50"]
    try:
        {"objectives": objectives, "generation": generation, "budget": budget, "sweep": sweep}[args.what](args)
    except corpus.CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
