"""The model side: a worker owns its runtimes, each model's running batch and the session state cache.

A worker is one thread (of a process of its own, or with `--workers 0` of the server's process): between
steps it reads the front end's messages, then gives each of its models a turn (admit and prefill,
`Batch.step`) that it answers with one `Generations`. It is the only caller of its runtimes, and hidden
state never leaves it. Models in one worker step in turn; models in different workers, in parallel.
"""
from __future__ import annotations

import logging
import select
import signal
import socket
import time
from collections import defaultdict

import numpy as np

from serve.batch import Batch, Prefilled, Row
from serve.errors import NotFound
from serve.messages import Cancel, Credit, Generations, Predict, Submit, error_of, frame, unframe
from serve.metrics import ModelMetrics
from serve.sessions import Session, SessionCache
from serve.types import ModelInfo, Prediction, SessionState
from train.sampling import log_softmax

log = logging.getLogger(__name__)

METRICS_EVERY_S = 0.1  # a model's metrics go with its generations this often, and whenever streams come or go


class Model:
    """One model in a worker: its runtime, its running batch, the streams on their way in and those parked."""

    def __init__(self, name: str, runtime, sessions: SessionCache, max_batch: int, prefill_chunk: int):
        self.name, self.rt, self.sessions = name, runtime, sessions
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.metrics, self.state_bytes = ModelMetrics(), 4 * runtime.hidden_size * runtime.num_states
        self.waiting: list[Prefilled] = []  # streams not in the batch yet, in order; the first ones are prefilled
        self.batch: Batch | None = None
        self.parked: dict[int, Batch] = {}  # one-row batches without credit
        self.live: dict[int, tuple[str, Session | None]] = {}  # id -> its session id and the session it continues
        self._active, self._metrics_at = 0, 0.0

    def _admitted(self) -> list[Prefilled]:
        """The waiting streams that the batch has room for (`max_batch`): those being prefilled."""
        return self.waiting[:max(0, self.max_batch - len(self.batch or ()))]

    def busy(self) -> bool:
        """Whether a turn has work without new messages: a batch to step, or prompts to feed."""
        return self.batch is not None or bool(self.waiting and self._admitted())

    def turn(self, msgs: list) -> Generations:
        out = Generations(self.name)
        try:
            self._take(msgs, out)
            if self.waiting and self._admitted():
                self._prefill()
            if self.batch is not None:
                self._step(out)
        except Exception as exc:  # a backend failure ends this model's streams, not the server
            log.exception("%s: step failed; ending its %d streams", self.name, len(self.live))
            self._fail_all(exc, out)
        now = time.monotonic()
        if len(self.live) != self._active or out.ends or out.errors or now - self._metrics_at >= METRICS_EVERY_S:
            self._active, self._metrics_at = len(self.live), now
            queued = len(self.waiting) - len(self._admitted())
            self.metrics.active.set(len(self.live) - queued)
            self.metrics.queued.set(queued)
            out.metrics, out.sessions = self.metrics.snapshot(), len(self.sessions)
        return out

    def _take(self, msgs: list, out: Generations) -> None:
        credited = {}  # parked streams that got credit: they rejoin the batch (unless cancelled since)
        for m in msgs:
            kind = type(m)
            if kind is Credit:
                if m.id in self.parked:
                    self.parked[m.id].cols["credit"][0] += m.n
                    credited[m.id] = True
                elif self.batch is not None and m.id in self.batch.ids:  # else it has ended
                    self.batch.cols["credit"][self.batch.ids.index(m.id)] += m.n
            elif kind is Submit:
                self._submit(m, out)
            elif kind is Cancel:
                self._end(m.id, cancelled=True)
            elif kind is Predict:
                try:
                    out.predictions[m.id] = self._predict(m)
                except Exception as exc:
                    log.exception("%s: Predict failed", self.name)
                    out.errors[m.id] = error_of(exc)
        back = [self.parked.pop(sid) for sid in credited if sid in self.parked]
        if back:
            self.batch = Batch.concatenate([self.batch, *back], self.rt)

    def _submit(self, m: Submit, out: Generations) -> None:
        sid = m.req.session_id
        try:
            session, how = self.sessions.checkout(sid, self.name, m.req.require_session, m.lost) if sid else \
                (None, SessionState.NONE)
        except Exception as exc:
            out.errors[m.id] = error_of(exc)
            return
        tokens = np.concatenate([session.pending, m.prompt]) if session else m.prompt
        if len(tokens) == 0:  # the front end refuses an empty prompt without a session_id
            self.sessions.checkin(sid, None)
            out.errors[m.id] = error_of(NotFound(f"session {sid!r} has no state to continue ({how.value}): "
                                                 "give a prompt"))
            return
        self.live[m.id] = (sid, session)
        self.waiting.append(Prefilled(Row(m.id, m.req, how, m.arrived), tokens,
                                      session.state if session else self.rt.new_state(1), m.credit))

    def _end(self, sid: int, cancelled: bool = False, session: Session | None = None) -> None:
        """The stream has gone: its session takes the new state, or (cancelled, failed) the one it had before."""
        if sid not in self.live:
            return
        session_id, before = self.live.pop(sid)
        self.sessions.checkin(session_id, before if cancelled else session)
        if cancelled:
            self.waiting = [e for e in self.waiting if e.row.id != sid]
            self.parked.pop(sid, None)
            if self.batch is not None and sid in self.batch.ids:
                self.batch = self.batch.filter([i for i, x in enumerate(self.batch.ids) if x != sid], self.rt)

    def _fail_all(self, exc: BaseException, out: Generations) -> None:
        """End every stream here with exc, sessions as they were before; no runtime call (it may be what failed)."""
        for sid, (session_id, before) in self.live.items():
            self.sessions.checkin(session_id, before)
            out.errors[sid] = error_of(exc)
        self.live, self.waiting, self.batch, self.parked = {}, [], None, {}

    def _predict(self, m: Predict) -> list[Prediction]:
        """A one-shot call on the runtime: the text from a zero state, the top_k next characters."""
        logits, _ = self.rt.step(m.tokens.reshape(1, -1), self.rt.new_state(1))
        p = np.exp(log_softmax(logits[0]))
        return [Prediction(self.rt.vocab.chars[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:m.top_k]]

    def _prefill(self) -> None:
        """Feed all but the last token of each prompt (a chunk at most per turn), batched by length."""
        admitted, groups = self._admitted(), defaultdict(list)
        for e in admitted:
            if len(e.tokens) > 1:
                groups[min(len(e.tokens) - 1, self.prefill_chunk)].append(e)
        rt = self.rt
        for n, group in groups.items():
            _, state = rt.step(np.stack([e.tokens[:n] for e in group]), rt.concat([e.state for e in group]))
            for i, e in enumerate(group):
                e.tokens, e.state = e.tokens[n:], rt.take(state, [i])
        ready = [e for e in admitted if len(e.tokens) == 1]
        if ready:
            self.waiting = [e for e in admitted if len(e.tokens) > 1] + self.waiting[len(admitted):]
            self.batch = Batch.concatenate([self.batch, Batch.from_requests(ready, rt)], rt)

    def _step(self, out: Generations) -> None:
        batch, credit, leaving = self.batch, self.batch.cols["credit"], set()
        for i, text, finish, stats in batch.step(self.rt, time.perf_counter, self.metrics):
            sid, row = batch.ids[i], batch.rows[i]
            out.ids.append(sid)
            out.texts.append(text)
            if row.logprobs is not None:  # those of this message's characters
                out.logprobs[sid], row.logprobs = tuple(row.logprobs), []
            if finish is not None:  # a stream with a session_id leaves its state in the cache
                self._end(sid, session=Session(self.name, self.rt.take(batch.state, [i]), batch.tokens[i:i + 1].copy(),
                                               self.state_bytes) if row.req.session_id else None)
                out.ends[sid] = (finish, stats)
                leaving.add(i)
            elif credit[i] <= 0:
                self.parked[sid] = batch.filter([i], self.rt)
                leaving.add(i)
        if leaving:
            self.batch = batch.filter([i for i in range(len(batch)) if i not in leaving], self.rt)


def worker_main(sock: socket.socket, opener, settings: dict, own_process: bool = True) -> None:
    """A worker: open the models (opener()), say which, then read messages and give each model a turn until
    the front end closes its end of the socket. In a process of its own, or a thread of the server's."""
    if own_process:
        # Ctrl-C and a service manager's SIGTERM reach the whole process group: the server drains, then stops us
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    with sock:
        try:
            runtimes = opener()
        except Exception as e:
            return sock.sendall(frame(RuntimeError(str(e))))
        sessions = SessionCache(settings["session_ttl_s"], settings["max_sessions"],
                                max_bytes=settings["max_session_bytes"])
        models = [Model(name, rt, sessions, settings["max_batch"], settings["prefill_chunk"])
                  for name, rt in runtimes.items()]
        sock.sendall(frame({name: ModelInfo(name, rt.cell, rt.hidden_size, rt.fc_layers, rt.vocab.chars, rt.backend)
                            for name, rt in runtimes.items()}))
        buf, busy, poller = bytearray(), False, select.poll()
        poller.register(sock, select.POLLIN)
        try:
            while True:
                msgs = []
                if poller.poll(0 if busy else None):  # busy: a look between steps (0.3 us), else a wait
                    data = sock.recv(1 << 16)
                    if not data:
                        return  # the server is stopping (or has gone)
                    buf += data
                    msgs = [m for turn in unframe(buf) for m in turn]
                busy = False
                for model in models:
                    part = [m for m in msgs if m.model == model.name] if msgs else msgs
                    if part or model.busy():
                        busy = True
                        if out := model.turn(part):
                            sock.sendall(frame(out))
        except OSError:  # the front end has gone
            return
