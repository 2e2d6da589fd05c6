"""Training one model: objective, evaluation protocol, checkpoints and exact resume.

Objectives:
- "all" (default): every position predicts its next character. The training text is cut into
  `batch_size` contiguous streams; windows of `seq_len` characters are taken in order along them and
  the hidden state is carried from one window to the next (truncated BPTT, as char-rnn does).
- "last": the seed's method, one target per window: every window of `seq_len` characters, shuffled,
  predicts the single character that follows it, from a zero state.

Evaluation (held-out text only, eval mode):
- stream protocol ("val_loss"): the split is read as a few long streams with the state carried,
  every character predicted; this is how the model generates. It is the headline figure.
- window protocol ("val_loss_window"): the seed's task, the character after a `seq_len` window read
  from a zero state, on evenly spaced held-out windows. Early stopping uses the protocol that matches
  the objective.
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from train import corpus
from train.checkpoint import WEIGHTS, atomic_write, read_config, save_config, save_weights
from train.model import CharRNN, ModelConfig, count_parameters, size_mb
from train.schedule import SEED_LR, Horizon, lr_factor, steps_in_time, tuned
from train.sampling import generate, generate_refeed
from train.vocab import Vocab

log = logging.getLogger(__name__)
STATE_FILE, METRICS_FILE, SAMPLE_FILE = "train_state.pt", "metrics.jsonl", "sample.txt"
# settings a resumed run may change (they bound or place the run; they don't change what it computes)
NOT_IDENTITY = ("epochs", "max_steps", "max_minutes", "patience", "checkpoint_every", "device", "threads")
GEN_CHARS = 1000  # characters generated for samples and the inference timings, as the seed did


def opt(default, help: str, **kw):
    """A config field with its --help text: the CLI is built from these dataclasses."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    objective: str = opt("all", "all: every position predicts its next char (state carried); last: the seed's one target per window",
                         choices=("all", "last"))
    batch_size: int = opt(0, "streams (all) or windows (last) per step; 0 = measured per cell and size for all "
                             "(train/schedule.py), 8192 (the seed's) for last")
    lr: float = opt(0.0, "Adam learning rate; 0 = measured per cell and size for all, 1e-3 (the seed's) for last")
    grad_clip: float = opt(5.0, "clip the gradient norm to this; 0 = off (char-rnn clips at 5)")
    dropout: float = opt(0.0, "dropout on the recurrent output (adds no parameters)")
    schedule: str = opt("auto", "learning-rate schedule: cosine/linear warm up, then decay to --lr-floor when the "
                                "budget (--epochs, --max-steps or --max-minutes) ends; plateau halves it when validation stalls; "
                                "auto = cosine for all, none (the seed's) for last",
                        choices=("auto", "none", "cosine", "linear", "plateau"))
    warmup: float = opt(0.02, "cosine/linear: warm-up as a fraction of the budget's steps")
    lr_floor: float = opt(0.1, "cosine/linear: the learning rate at the end of the budget, as a fraction of --lr")
    epochs: int = opt(20, "maximum passes over the training text")
    max_steps: int = opt(0, "stop after this many optimisation steps: a budget of work, the same model on any machine; 0 = no limit")
    max_minutes: float = opt(0.0, "stop training a model after this many minutes of wall time (machine-dependent); 0 = no limit")
    patience: int = opt(3, "early stopping: evaluations without a better validation loss; 0 = off. Only with --schedule none or plateau: a cosine or linear decay runs its whole budget (the best weights are kept)")
    evals_per_epoch: int = opt(1, "held-out evaluations per epoch (more for big corpora, small budgets)")
    checkpoint_every: int = opt(1, "write a resumable checkpoint every N evaluations")
    eval_windows: int = opt(4096, "held-out windows scored by the window protocol")
    device: str = opt("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    threads: int = opt(0, "CPU threads for torch; 0 = all cores")
    seed: int = opt(0, "random seed (weights, data order, dropout)")

    def batch(self) -> int:
        return self.batch_size or (64 if self.objective == "all" else 8192)

    def resolved(self, cell: str, hidden_size: int) -> "TrainConfig":
        """The settings a model trains with: the "auto" ones (0, "auto") filled in for its cell and size."""
        if self.objective == "all":
            lr, batch = tuned(cell, hidden_size)
            schedule = "cosine"
        else:
            lr, batch, schedule = SEED_LR, 8192, "none"
        return replace(self, lr=self.lr or lr, batch_size=self.batch_size or batch,
                       schedule=schedule if self.schedule == "auto" else self.schedule)


@dataclass(frozen=True)
class Job:
    """One model of a grid: where it trains, on what, and how."""
    model_id: str
    corpus: str  # a key of corpus.CORPORA
    corpus_path: str
    cell: str
    seq_len: int
    hidden_size: int
    fc_layers: int
    train: TrainConfig
    out_dir: str


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def _amp(device: torch.device):
    """(autocast dtype, GradScaler or None): bf16 where supported, else fp16 with a scaler; none on CPU."""
    if device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def _detach(state):
    return tuple(s.detach() for s in state)


# --- data -----------------------------------------------------------------------------------------

def streams(ids: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) -> (n, N // n): n contiguous streams, read in parallel."""
    L = ids.numel() // n
    return ids[: n * L].view(n, L)


def stream_batches(data: torch.Tensor, seq_len: int):
    """Consecutive (x, y) windows along the streams (B, L): x (B, T), y (B, T) shifted by one."""
    L = data.shape[1]
    for t in range(0, L - 1, seq_len):
        T = min(seq_len, L - 1 - t)
        yield data[:, t: t + T], data[:, t + 1: t + 1 + T]


def window_batches(ids: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator | None, starts=None):
    """(x (B, T), y (B,)) for windows ids[i:i+T] -> ids[i+T]; all starts shuffled by gen, or the given ones."""
    wins = ids.unfold(0, seq_len, 1)  # (N - T + 1, T), a view
    if starts is None:
        n = ids.numel() - seq_len
        starts = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for k in range(0, len(starts), batch):
        i = starts[k: k + batch].to(ids.device)
        yield wins[i], ids[i + seq_len]


# --- evaluation -----------------------------------------------------------------------------------

@torch.inference_mode()
def eval_stream(model: CharRNN, ids: torch.Tensor, n_streams: int = 8, chunk: int = 256) -> tuple[float, float]:
    """(mean loss in nats/char, top-1 accuracy) over every character of ids, state carried."""
    model.eval()
    data = streams(ids, n_streams)
    state = model.zero_state(n_streams)
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in stream_batches(data, chunk):
        logits, state = model(x, state)  # (B, T, V)
        loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    return loss_sum / count, correct / count


@torch.inference_mode()
def eval_windows(model: CharRNN, ids: torch.Tensor, seq_len: int, max_windows: int, batch: int = 1024):
    """The seed's task on evenly spaced windows: next char after seq_len chars from a zero state."""
    model.eval()
    n = ids.numel() - seq_len
    starts = torch.linspace(0, n - 1, min(n, max_windows)).long()
    loss_sum, correct = 0.0, 0
    for x, y in window_batches(ids, seq_len, batch, None, starts):
        logits = model(x)[0][:, -1]  # (B, V)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return loss_sum / len(starts), correct / len(starts)


# --- the training run -----------------------------------------------------------------------------

class Trainer:
    def __init__(self, job: Job, position: int = 0, quiet: bool = False):
        self.job, self.cfg = job, job.train.resolved(job.cell, job.hidden_size)
        self.dir = Path(job.out_dir) / job.model_id
        self.position, self.quiet = position, quiet
        self.device = pick_device(self.cfg.device)
        if self.device.type == "cpu" and self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.text = corpus.load_text(Path(job.corpus_path))
        self.vocab = Vocab.from_text(self.text)
        self.corpus_sha256 = corpus.sha256_text(self.text)
        train_text, val_text, test_text = corpus.split(self.text)
        pin = self.device.type == "cuda"
        to = lambda s: (torch.from_numpy(self.vocab.encode(s)).pin_memory() if pin  # noqa: E731
                        else torch.from_numpy(self.vocab.encode(s))).to(self.device, non_blocking=True)
        self.train_ids, self.val_ids, self.test_ids = to(train_text), to(val_text), to(test_text)
        torch.manual_seed(self.cfg.seed)
        self.model = CharRNN(ModelConfig(job.cell, len(self.vocab), job.hidden_size, job.fc_layers,
                                         self.cfg.dropout)).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.amp_dtype, self.scaler = _amp(self.device)
        self.sched = self._scheduler()
        self.horizon: Horizon | None = None  # the decay's end (cosine/linear), planned in fit()
        # progress, restored on resume
        self.epoch, self.step, self.evals = 0, 0, 0
        self.best_loss, self.best_weights, self.bad_evals = math.inf, None, 0
        self.train_seconds, self.elapsed, self.chars_seen = 0.0, 0.0, 0  # step time; wall time incl. evals
        self.eval_seconds = 0.0  # wall time of evaluations and checkpoints, for the time-bounded horizon
        self.train_loss = math.nan
        self.carry = None  # the carried training state between windows (objective "all")
        self._t_start = time.perf_counter()
        self.bar = None  # the model's progress bar: steps, then what evaluation and finish() are doing

    def _scheduler(self):
        if self.cfg.schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, factor=0.5, patience=1)
        return None

    # --- checkpoint metadata ----------------------------------------------------------------------
    def _identity(self) -> dict:
        """What makes a run this run: a train_state.pt from another identity is never resumed."""
        j = self.job
        return {"model_id": j.model_id, "cell": j.cell, "seq_len": j.seq_len, "hidden_size": j.hidden_size,
                "fc_layers": j.fc_layers, "corpus_sha256": self.corpus_sha256,
                "train": {k: v for k, v in asdict(self.cfg).items() if k not in NOT_IDENTITY}}

    def _config(self, metrics: dict | None, done: bool) -> dict:
        j = self.job
        params = count_parameters(self.model)
        return {
            "model_id": j.model_id, "model": self.model.cfg.to_dict(), "vocab": self.vocab.chars,
            "train": {**asdict(self.cfg), "seq_len": j.seq_len, "batch": self.cfg.batch()},
            "corpus": {"name": j.corpus, "path": j.corpus_path, "sha256": self.corpus_sha256,
                       "chars": len(self.text), "split": list(corpus.SPLIT)},
            "parameters": params, "size_mb": size_mb(params), "done": done, "metrics": metrics,
        }

    def save(self, done: bool = False, metrics: dict | None = None) -> None:
        """Best weights -> model.safetensors; everything for an exact resume -> train_state.pt; then config."""
        best = CharRNN(self.model.cfg)
        best.load_state_dict(self.best_weights or self.model.state_dict())
        save_weights(self.dir / WEIGHTS, best)
        state = {
            "identity": json.dumps(self._identity()),
            "model": self.model.state_dict(), "best_weights": self.best_weights, "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched else None,
            "horizon": [self.horizon.steps, self.horizon.warmup] if self.horizon else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": {"epoch": self.epoch, "step": self.step, "evals": self.evals, "best_loss": self.best_loss,
                         "bad_evals": self.bad_evals, "train_seconds": self.train_seconds,
                         "elapsed": self._wall(), "eval_seconds": self.eval_seconds,
                         "chars_seen": self.chars_seen, "train_loss": self.train_loss},
            "carry": list(self.carry) if self.carry is not None else None,  # the state mid-epoch ("all")
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self.dir / STATE_FILE, buf.getvalue())
        save_config(self.dir, self._config(metrics, done))

    def try_resume(self) -> bool:
        path = self.dir / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)  # never unpickle objects
        if state["identity"] != json.dumps(self._identity()):
            raise RuntimeError(f"{self.dir} holds a run with other settings; use another --out or delete it")
        self.model.load_state_dict(state["model"])
        self.best_weights = state["best_weights"]
        self.opt.load_state_dict(state["optimizer"])
        if self.sched and state["scheduler"]:
            self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if state.get("horizon"):
            self.horizon = Horizon(*state["horizon"])
        for k, v in state["progress"].items():
            setattr(self, k, v)
        self.carry = tuple(state["carry"]) if state["carry"] is not None else None
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        log.info("%s: resumed at epoch %d, step %d", self.job.model_id, self.epoch, self.step)
        return True

    # --- one optimisation step ---------------------------------------------------------------------
    def _loss(self, x, y, state):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits, state = self.model(x, state)  # (B, T, V)
            if self.cfg.objective == "last":
                logits = logits[:, -1]  # (B, V): one target per window
            loss = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten())
        return loss, state

    def _update(self, loss):
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()

    def _n_streams(self) -> int:
        """Objective "all": parallel streams, fewer than asked when the text is too short for that many."""
        return max(1, min(self.cfg.batch(), (self.train_ids.numel() - 1) // (self.job.seq_len + 1)))

    def _batches(self):
        """This epoch's (x, y) batches; each epoch's order is fixed by (seed, epoch), so resume repeats it."""
        T = self.job.seq_len
        if self.cfg.objective == "all":
            return stream_batches(streams(self.train_ids, self._n_streams()), T)
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.epoch)
        return window_batches(self.train_ids, T, self.cfg.batch(), gen)

    def steps_per_epoch(self) -> int:
        T, N = self.job.seq_len, self.train_ids.numel()
        if self.cfg.objective == "all":
            return math.ceil((N // self._n_streams() - 1) / T)
        return math.ceil((N - T) / self.cfg.batch())

    # --- the loop ----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        vl, va = eval_stream(self.model, self.val_ids)
        wl, wa = eval_windows(self.model, self.val_ids, self.job.seq_len, self.cfg.eval_windows)
        self.model.train()
        return {"val_loss": vl, "val_acc": va, "val_loss_window": wl, "val_acc_window": wa}

    def _select_loss(self, m: dict) -> float:
        return m["val_loss"] if self.cfg.objective == "all" else m["val_loss_window"]

    def _wall(self) -> float:
        """Wall-clock seconds of training and evaluation, over all resumed sessions."""
        return self.elapsed + time.perf_counter() - self._t_start

    def _out_of_time(self) -> bool:
        return bool(self.cfg.max_minutes) and self._wall() >= self.cfg.max_minutes * 60

    def _out_of_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _status(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=True)

    # --- the learning rate of the budget (cosine/linear) --------------------------------------------
    def _plan(self) -> None:
        """Set the horizon: the budget's steps by --epochs or --max-steps, or fewer by --max-minutes at the
        measured pace."""
        cfg = self.cfg
        if cfg.schedule not in ("cosine", "linear"):
            return
        steps = min(cfg.epochs * self.steps_per_epoch(), cfg.max_steps or math.inf)
        if cfg.max_minutes and self.step:
            steps = min(steps, steps_in_time(self.step, self._wall(), self.eval_seconds, self.evals,
                                             cfg.max_minutes * 60, self.steps_per_epoch() / cfg.evals_per_epoch))
        elif cfg.max_minutes and self.horizon:  # not measured yet: keep the saved estimate
            return
        self.horizon = Horizon.of(steps, cfg.warmup)

    def _set_lr(self) -> None:
        if self.horizon:
            f = lr_factor(self.step, self.horizon.warmup, self.horizon.steps, self.cfg.schedule, self.cfg.lr_floor)
            for g in self.opt.param_groups:
                g["lr"] = self.cfg.lr * f

    def fit(self) -> None:
        cfg, per_epoch = self.cfg, self.steps_per_epoch()
        eval_at = {round(per_epoch * (k + 1) / cfg.evals_per_epoch) for k in range(cfg.evals_per_epoch)}
        total = min(cfg.epochs * per_epoch, cfg.max_steps or math.inf)
        self.bar = bar = tqdm(total=total, initial=self.step, desc=self.job.model_id, unit="step",
                              position=self.position, leave=self.position == 0, disable=self.quiet,
                              dynamic_ncols=True)
        self.model.train()
        self._t_start = time.perf_counter()
        self._plan()
        session_steps = 0
        while self.epoch < cfg.epochs and not self._stopped():
            loss_sum, n_loss = 0.0, 0
            skip = self.step - self.epoch * per_epoch  # resuming mid-epoch at an evaluation boundary
            if skip >= per_epoch:  # the checkpoint was taken at the epoch's last step
                self.epoch, self.carry = self.epoch + 1, None
                continue
            if skip == 0:
                self.carry = None
            for i, (x, y) in enumerate(self._batches(), start=1):
                if i <= skip:
                    continue
                if cfg.max_minutes and (session_steps in (10, 20) or session_steps % 50 == 0 < session_steps):
                    self._plan()  # a time-bounded horizon follows the measured pace (first after 10 steps)
                session_steps += 1
                self._set_lr()
                t0 = time.perf_counter()
                loss, state = self._loss(x, y, self.carry)
                self._update(loss)
                self.carry = _detach(state) if cfg.objective == "all" else None
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.train_seconds += time.perf_counter() - t0
                self.chars_seen += x.numel()
                self.step += 1
                loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1
                bar.update()
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{loss_sum / n_loss:.3f}",
                                chars_s=f"{self.chars_seen / max(self.train_seconds, 1e-9):,.0f}", refresh=False)
                if i in eval_at or self._out_of_time() or self._out_of_steps():
                    self.train_loss = loss_sum / n_loss
                    self._status("evaluating on held-out text")

                    t_eval = time.perf_counter()
                    m = self.evaluate()
                    self.eval_seconds += time.perf_counter() - t_eval
                    self._after_eval(m)
                    loss_sum, n_loss = 0.0, 0
                    if self._stopped():
                        break
            else:
                self.epoch, self.carry = self.epoch + 1, None
        bar.total = bar.n  # stopped early (patience, time): the bar ends full, the summary says why

    def _stopped(self) -> bool:
        # patience stops a run at a constant or plateau-driven rate; a decay to the budget's end runs the budget
        # out (stopped at a high rate, it would end worse the longer its budget: docs/training.md)
        patience = self.cfg.patience if self.horizon is None else 0
        return self._out_of_time() or self._out_of_steps() or bool(patience and self.bad_evals >= patience)

    def _stop_reason(self) -> str:
        if self._out_of_time():
            return "time"
        if self._out_of_steps():
            return "steps"
        return "patience" if self._stopped() else "epochs"

    def _after_eval(self, m: dict) -> None:
        self.evals += 1
        loss = self._select_loss(m)
        if loss < self.best_loss:
            self.best_loss, self.bad_evals = loss, 0
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_evals += 1
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.step(loss)
        if self.cfg.max_minutes:
            self._plan()  # now that an evaluation's cost is measured
        row = {"eval": self.evals, "epoch": self.epoch + 1, "step": self.step, "train_loss": self.train_loss, **m,
               "train_seconds": self.train_seconds, "chars_per_s": self.chars_seen / max(self.train_seconds, 1e-9),
               "lr": self.opt.param_groups[0]["lr"]}
        with open(self.dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.evals % self.cfg.checkpoint_every == 0 or self._stopped():
            self.save()

    def finish(self) -> dict:
        """Final figures with the best weights: held-out, test, training-set, generation timings; sample.txt."""
        if self.best_weights:
            self.model.load_state_dict(self.best_weights)
        T, cfg = self.job.seq_len, self.cfg
        self._status("final evaluation: validation, test and training-set figures")
        vl, va = eval_stream(self.model, self.val_ids)
        wl, wa = eval_windows(self.model, self.val_ids, T, cfg.eval_windows)
        tl, ta = eval_stream(self.model, self.test_ids)
        trl, tra = eval_windows(self.model, self.train_ids, T, cfg.eval_windows)  # the seed's "validation"
        text_prompt = corpus.prompt(self.job.corpus, self.text)
        m = {"train_loss": self.train_loss, "val_loss": vl, "val_acc": va, "val_bpc": vl / math.log(2),
             "val_loss_window": wl, "val_acc_window": wa, "test_loss": tl, "test_acc": ta, "test_bpc": tl / math.log(2),
             "train_set_loss": trl, "train_set_acc": tra, "epochs": self.step / max(self.steps_per_epoch(), 1),
             "steps": self.step, "train_seconds": self.train_seconds,
             "chars_per_s": self.chars_seen / max(self.train_seconds, 1e-9),
             "stopped": self._stop_reason()}
        self._status(f"timing generation of {GEN_CHARS} characters, carried state and the seed's re-feeding")
        t0 = time.perf_counter()
        greedy = generate(self.model, self.vocab, text_prompt, GEN_CHARS)
        m["inference_carried_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generate_refeed(self.model, self.vocab, text_prompt, GEN_CHARS, T)
        m["inference_refeed_s"] = time.perf_counter() - t0
        m["predicted"] = greedy[0]  # the next character after the seed's prompt
        self._status("writing sample.txt")
        sampled = generate(self.model, self.vocab, text_prompt, GEN_CHARS, temperature=0.8, top_k=20, seed=cfg.seed)
        atomic_write(self.dir / SAMPLE_FILE,
                     f"=== prompt ===\n{text_prompt}\n\n=== sampled (temperature 0.8, top-k 20, seed {cfg.seed}) ===\n"
                     f"{sampled}\n\n=== greedy ===\n{greedy}\n")
        self.save(done=True, metrics=m)
        if self.bar is not None:
            self._status(f"done: held-out loss {vl:.3f}")
            self.bar.close()
        return m


def train_one(job: Job, position: int = 0, quiet: bool = False) -> dict:
    """Train (or resume, or skip if finished) one model; returns its config.json contents."""
    ckpt = Path(job.out_dir) / job.model_id
    if (ckpt / "config.json").is_file():
        config = read_config(ckpt)
        if config.get("done"):
            return config
    ckpt.mkdir(parents=True, exist_ok=True)
    tr = Trainer(job, position, quiet)
    if not tr.try_resume():
        (ckpt / METRICS_FILE).unlink(missing_ok=True)
    elif tr.evals:  # drop metric lines written after the checkpoint we resume from
        lines = (ckpt / METRICS_FILE).read_text().splitlines() if (ckpt / METRICS_FILE).is_file() else []
        atomic_write(ckpt / METRICS_FILE, "".join(l + "\n" for l in lines if json.loads(l)["eval"] <= tr.evals))
    tr.fit()
    tr.finish()
    return read_config(ckpt)
