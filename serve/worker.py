"""The model side: a worker owns its runtimes, each model's running batch and the session state cache.

A worker runs one thread per model (the only caller of its `runtime.step`). It takes the front end's
messages (serve.messages) and answers each step with one `Generations`. Hidden state never leaves it:
streams start from a session's state here and leave theirs here. The same `Worker` runs in a process of
its own (`worker_main`, one socket to the front end) or, with `--workers 0`, in the server's process.

Each model thread, every turn: take the messages that came (submit, predict, credit, cancel); admit
waiting streams while the batch has room (`max_batch`); feed one chunk (`prefill_chunk`) of every
prompt, batched by length; move prompts down to their last token into the batch; run `Batch.step`;
send the step's generations. A stream that has used its credit leaves the batch with its state
(parked) and rejoins when credit comes: a client that stops reading holds up no one.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from serve.batch import Batch, Prefilled, Row
from serve.errors import NotFound, Unavailable
from serve.messages import (Cancel, Credit, Generations, Predict, Ready, Stop, Submit, error_of, frame, read_frame)
from serve.metrics import ModelMetrics
from serve.sessions import Session, SessionCache
from serve.types import ModelInfo, Prediction, SessionState

log = logging.getLogger(__name__)

METRICS_EVERY_S = 0.1  # a model's metrics go with its generations this often, and whenever streams come or go


@dataclass
class _Waiting:
    """A stream before it joins the batch: the tokens it still has to feed, from this state."""

    msg: Submit
    tokens: np.ndarray
    state: object
    session: Session | None  # the session it continues (its state back in the cache if the stream fails)
    how: SessionState
    credit: int


class ModelLoop:
    def __init__(self, name: str, runtime, sessions: SessionCache, emit, max_batch: int, prefill_chunk: int):
        self.name, self.rt, self.sessions, self.emit = name, runtime, sessions, emit
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.metrics = ModelMetrics()
        self.state_bytes = 4 * runtime.hidden_size * runtime.num_states
        self._inbox: list = []
        self._cv = threading.Condition()
        self.waiting: deque[_Waiting] = deque()
        self.prefilling: list[_Waiting] = []
        self.batch: Batch | None = None
        self.parked: dict[int, Batch] = {}  # one-row batches without credit
        self._grants: dict[int, int] = defaultdict(int)  # credit for rows of the batch, applied before a step
        self._restore: dict[int, Session | None] = {}  # id -> the session a batch row continued (back if it fails)
        self._active, self._metrics_at = 0, 0.0
        self._thread = threading.Thread(target=self._run, name=f"model:{name}", daemon=True)

    def start(self) -> "ModelLoop":
        self._thread.start()
        return self

    def post(self, msgs: list) -> None:
        with self._cv:
            self._inbox += msgs
            self._cv.notify()

    def join(self) -> None:
        self._thread.join()

    @property
    def active(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.batch or ()) + len(self.parked)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self.prefilling or self.batch or (self.waiting and self._room())):
                    self._cv.wait()
                msgs, self._inbox = self._inbox, []
            out = Generations(self.name)
            stop = any(type(m) is Stop for m in msgs)
            try:
                self._take(msgs, out)
                if stop:
                    self._fail_all(Unavailable("the server stopped"), out)
                else:
                    self._turn(out)
            except Exception as exc:  # a backend failure ends this model's streams, not the server
                log.exception("%s: step failed; ending its %d streams", self.name, self.active)
                self._fail_all(exc, out)
            self._send(out)
            if stop:
                return

    def _room(self) -> int:
        return self.max_batch - len(self.prefilling) - len(self.batch or ())

    def _send(self, out: Generations) -> None:
        now = time.monotonic()
        if self.active != self._active or out.ends or out.errors or now - self._metrics_at >= METRICS_EVERY_S:
            self._active, self._metrics_at = self.active, now
            self.metrics.active.set(self.active - len(self.waiting))
            self.metrics.queued.set(len(self.waiting))
            out.metrics, out.sessions = self.metrics.snapshot(), len(self.sessions)
        if out:
            self.emit(out)

    # messages

    def _take(self, msgs: list, out: Generations) -> None:
        for m in msgs:
            kind = type(m)
            if kind is Credit:
                self._credit(m.id, m.n)
            elif kind is Submit:
                self._submit(m, out)
            elif kind is Cancel:
                self._cancel(m.id)
            elif kind is Predict:
                try:
                    out.predictions[m.id] = self._predict(m)
                except Exception as exc:
                    log.exception("%s: Predict failed", self.name)
                    out.errors[m.id] = error_of(exc)

    def _submit(self, m: Submit, out: Generations) -> None:
        session, how, sid = None, SessionState.NONE, m.req.session_id
        try:
            if sid:
                with self.sessions.lock:
                    session, how = self.sessions.checkout(sid, self.name, m.req.require_session, m.lost)
            tokens = np.concatenate([session.pending, m.prompt]) if session else m.prompt
            if len(tokens) == 0:  # the front end refuses an empty prompt without a session_id
                raise NotFound(f"session {sid!r} has no state to continue ({how.value}): give a prompt")
        except Exception as exc:
            self._end_session(sid, session)
            out.errors[m.id] = error_of(exc)
            return
        state = session.state if session else self.rt.new_state(1)
        self.waiting.append(_Waiting(m, tokens, state, session, how, m.credit))

    def _credit(self, sid: int, n: int) -> None:
        parked = self.parked.pop(sid, None)
        if parked is not None:
            parked.cols["credit"] += n
            self.batch = Batch.concatenate([self.batch, parked], self.rt)
            return
        for w in self.prefilling:
            if w.msg.id == sid:
                w.credit += n
                return
        for w in self.waiting:
            if w.msg.id == sid:
                w.credit += n
                return
        self._grants[sid] += n

    def _cancel(self, sid: int) -> None:
        """Drop the stream wherever it is; its session keeps the state it had before."""
        for queue in (self.waiting, self.prefilling):
            for w in list(queue):
                if w.msg.id == sid:
                    queue.remove(w)
                    self._end_session(w.msg.req.session_id, w.session)
        parked = self.parked.pop(sid, None)
        if self.batch is not None and sid in self.batch.ids:
            self._drop_rows([self.batch.ids.index(sid)])
        for b in ([parked] if parked else []):
            self._end_session(b.rows[0].req.session_id, self._restore.pop(sid, None))

    def _predict(self, m: Predict) -> list[Prediction]:
        """A one-shot call on the runtime: the text from a zero state, the top_k next characters."""
        logits, _ = self.rt.step(m.tokens.reshape(1, -1), self.rt.new_state(1))
        z = logits[0].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")[: m.top_k]
        return [Prediction(self.rt.vocab.chars[i], float(p[i])) for i in order.tolist()]

    # a turn: admit, prefill, step

    def _turn(self, out: Generations) -> None:
        while self.waiting and self._room() > 0:
            self.prefilling.append(self.waiting.popleft())
        if self.prefilling:
            self._prefill()
        if self.batch is not None:
            self._step(out)

    def _prefill(self) -> None:
        """Feed all but the last token of each prompt (a chunk at most per turn), batched by length."""
        groups: dict[int, list[_Waiting]] = defaultdict(list)
        for w in self.prefilling:
            if len(w.tokens) > 1:
                groups[min(len(w.tokens) - 1, self.prefill_chunk)].append(w)
        rt = self.rt
        for n, group in groups.items():
            _, state = rt.step(np.stack([w.tokens[:n] for w in group]), rt.concat([w.state for w in group]))
            for i, w in enumerate(group):
                w.tokens, w.state = w.tokens[n:], rt.take(state, [i])
        ready = [w for w in self.prefilling if len(w.tokens) == 1]
        if not ready:
            return
        self.prefilling = [w for w in self.prefilling if len(w.tokens) > 1]
        for w in ready:
            self._restore[w.msg.id] = w.session
        rows = [Prefilled(Row(w.msg.id, w.msg.req, w.how, w.msg.arrived), int(w.tokens[0]), w.state, w.credit)
                for w in ready]
        self.batch = Batch.concatenate([self.batch, Batch.from_requests(rows, rt)], rt)

    def _step(self, out: Generations) -> None:
        batch = self.batch
        if self._grants:
            for i, sid in enumerate(batch.ids):
                if sid in self._grants:
                    batch.cols["credit"][i] += self._grants.pop(sid)
            self._grants.clear()  # grants for streams that have gone
        leaving = []
        for i, text, finish, stats in batch.step(self.rt, time.perf_counter, self.metrics):
            sid = batch.ids[i]
            out.ids.append(sid)
            out.texts.append(text)
            if finish is not None:
                row = batch.rows[i]
                stored = self._store_session(row, batch, i)
                out.ends[sid] = (finish, stats, stored)
                leaving.append(i)
            elif batch.cols["credit"][i] <= 0:
                self.parked[sid] = batch.filter([i], self.rt)
                leaving.append(i)
        if leaving:
            self._drop_rows(leaving, keep_restore=True)

    def _drop_rows(self, rows: list[int], keep_restore: bool = False) -> None:
        """The batch without these rows; cancelled ones (not keep_restore) give their session back as it was."""
        batch, gone = self.batch, set(rows)
        for i in rows:
            sid = batch.ids[i]
            if not keep_restore:
                self._end_session(batch.rows[i].req.session_id, self._restore.pop(sid, None))
            elif sid not in self.parked:
                self._restore.pop(sid, None)
        self.batch = batch.filter([i for i in range(len(batch)) if i not in gone], self.rt)

    def _store_session(self, row: Row, batch: Batch, i: int) -> bool:
        sid = row.req.session_id
        if not sid:
            return False
        session = Session(self.name, self.rt.take(batch.state, [i]), batch.cols["next"][i:i + 1].copy(),
                          self.state_bytes)
        self._end_session(sid, session)
        return True

    def _end_session(self, sid: str, session: Session | None) -> None:
        if sid:
            with self.sessions.lock:
                self.sessions.checkin(sid, session)

    def _fail_all(self, exc: BaseException, out: Generations) -> None:
        """End every stream here with exc (their sessions keep the state they had before); no runtime call."""
        ended = [(w.msg.id, w.msg.req.session_id, w.session) for w in (*self.waiting, *self.prefilling)]
        for b in [self.batch, *self.parked.values()]:
            ended += [(r.id, r.req.session_id, self._restore.pop(r.id, None)) for r in (b.rows if b else ())]
        for sid, session_id, session in ended:
            self._end_session(session_id, session)
            out.errors[sid] = error_of(exc)
        self.waiting, self.prefilling, self.batch, self.parked = deque(), [], None, {}
        self._grants.clear()


class Worker:
    """A worker's models, their loops and sessions. `handle(msgs)` takes the front end's messages; every
    step's `Generations` goes to `emit` (on the model's thread)."""

    def __init__(self, runtimes: dict, emit, settings: dict):
        self.runtimes = runtimes
        self.sessions = SessionCache(settings["session_ttl_s"], settings["max_sessions"],
                                     max_bytes=settings["max_session_bytes"])
        self.loops = {}
        for name, rt in runtimes.items():
            self.loops[name] = ModelLoop(name, rt, self.sessions, emit, settings["max_batch"],
                                         settings["prefill_chunk"]).start()

    def models(self) -> dict[str, ModelInfo]:
        return {name: ModelInfo(name, rt.cell, rt.hidden_size, rt.fc_layers, rt.vocab.chars, rt.backend)
                for name, rt in self.runtimes.items()}

    def handle(self, msgs: list) -> None:
        by_model: dict[str, list] = defaultdict(list)
        for m in msgs:
            if type(m) is Stop:
                for name in self.loops:
                    by_model[name].append(m)
            else:
                by_model[m.model].append(m)
        for name, batch in by_model.items():
            self.loops[name].post(batch)

    def stop(self) -> None:
        self.handle([Stop()])
        for loop in self.loops.values():
            loop.join()


def worker_main(sock: socket.socket, opener, settings: dict) -> None:
    """A worker process: open the models (opener()), say Ready, then carry out messages until Stop or until
    the front end's end of the socket closes."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the server drains its streams
    # and then stops the workers, which otherwise leave only when the server's end of the socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    try:
        runtimes = opener()
    except Exception as e:
        sock.sendall(frame(Ready(None, str(e))))
        return
    lock = threading.Lock()

    def emit(gens: Generations) -> None:
        data = frame(gens)
        try:
            with lock:
                sock.sendall(data)
        except OSError:  # the front end is gone; the reader below sees it too and stops
            pass

    worker = Worker(runtimes, emit, settings)
    sock.sendall(frame(Ready(worker.models())))
    f = sock.makefile("rb")
    while True:
        try:
            msgs = read_frame(f)
        except (EOFError, OSError):
            msgs = [Stop()]
        if any(type(m) is Stop for m in msgs):
            worker.stop()
            return
        worker.handle(msgs)

