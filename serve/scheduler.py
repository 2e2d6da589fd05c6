"""Continuous batching: one scheduler per model steps all of its active streams together.

Each scheduler owns a thread and its model's runtime (the only caller of `runtime.step`, so runtimes
need not be thread-safe). A stream is anything with tokens to feed and an `advance(logits)` that
consumes the logits after them; the streams of a class in the decode batch advance together through
their class's `Rows`, which streams join and leave between steps; the scheduler never looks at text.
Every scheduler step:

1. drop cancelled streams (their slot is free at once); admit resumed, then waiting streams while fewer
   than `max_batch` are prefilling or decoding;
2. prefill: streams with more than one token to feed run all but the last (at most `prefill_chunk`
   per step, so a long prompt delays the others by one chunk per step), batched by equal length;
3. decode: every stream with exactly one token left (a prompt's last token or the character sampled
   last step) is fed in ONE `runtime.step` on a (B, 1) batch; each stream then `advance`s on its row
   of the logits and either names its next token or is done.

Streams whose prompt is down to its last token join the decode batch (their state is concatenated onto
it); finished and cancelled ones leave it (`runtime.take` of the rest). Membership only changes between
steps. Events that streams produce in a step are handed to `deliver` in one call (an empty one when
streams came or went without an event, so that a process holding the metrics hears of it).

Backpressure: a stream whose consumer has `max_unsent` events not yet taken (a slow or stalled client)
is paused: it leaves the batch with its state (freeing its place for another stream) and rejoins once
half of them are taken (`ack`), so the server never runs ahead of a client by more than `max_unsent`
messages and stalled clients do not hold up the rest.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable

import numpy as np

from export.runtime import Runtime

log = logging.getLogger(__name__)


class Stream:
    """A request inside a scheduler. Subclasses implement `advance` (and may have `rows` advance many at once)."""

    def __init__(self, tokens: np.ndarray, state=None):
        self.tokens = tokens  # (T,) int64 to feed before the next advance; T >= 1
        self.state = state  # state of this stream alone: initial (None: zero), when paused, final once done
        self.cancelled = False  # set via Scheduler.cancel; the scheduler drops the stream at its next step
        self.done = False
        self.paused = False
        self.produced = 0  # events made (written by the scheduler thread only)
        self.consumed = 0  # events taken by the consumer (written by its thread only)

    @property
    def unsent(self) -> int:
        return self.produced - self.consumed

    def advance(self, logits: np.ndarray, now: float):
        """Consume the logits (V,) after `tokens`: set `tokens` to the next one, or `done` and return the last
        event; return an event or None."""
        raise NotImplementedError

    @classmethod
    def rows(cls, streams: list["Stream"]) -> "Rows":
        """These streams of this class, decoding together (see Rows)."""
        return Rows(streams)

    def fail(self, exc: BaseException):
        """The event that ends this stream when the scheduler cannot run it."""
        return exc

    def __getstate__(self) -> dict:
        """What goes to a worker process: everything but the consumer's side (its queue)."""
        return {k: v for k, v in self.__dict__.items() if k != "queue"}


class Rows:
    """Streams of one class in the decode batch: the tokens they feed next and what each step's logits make of
    them. Streams join and leave between steps (`join`, `keep`); `close` hands every stream its figures back
    when the batch is grouped anew. This one advances its streams one by one; a class may keep their figures
    in arrays instead (serve.streams.GenerationRows)."""

    def __init__(self, streams: list[Stream]):
        self.streams = streams

    def tokens(self) -> np.ndarray:
        """(n,) int64: each stream's next input."""
        return np.fromiter((s.tokens[0] for s in self.streams), np.int64, len(self.streams))

    def advance(self, logits: np.ndarray, now: float) -> list[tuple[int, object]]:
        """Each stream on its row of logits (n, V): (row, event) for the rows with an event, in order."""
        out = []
        for i, (s, row) in enumerate(zip(self.streams, logits)):
            event = s.advance(row, now)
            if event is not None:
                out.append((i, event))
        return out

    def join(self, streams: list[Stream]) -> "Rows":
        """These rows and, after them, streams of the same class joining the batch (this group or a new one)."""
        return type(self.streams[0]).rows(self.streams + streams)

    def keep(self, rows: list[int]) -> "Rows":
        """Only these rows (at least one): the others leave the batch, their figures back on them."""
        return type(self.streams[0]).rows([self.streams[i] for i in rows])

    def close(self) -> None:
        """Leave every stream as `advance` alone would have (the batch is about to change)."""


class Scheduler:
    def __init__(self, runtime: Runtime, deliver: Callable[[list], None], max_batch: int = 64,
                 prefill_chunk: int = 256, max_unsent: int = 64, metrics=None):
        self.runtime, self.deliver = runtime, deliver
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.max_unsent, self._resume_at = max_unsent, max_unsent // 2
        self.metrics = metrics  # serve.metrics.ModelMetrics or None
        self._inbox: deque[Stream] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._prefilling: list[Stream] = []  # each holds its own state
        self._decoding: list[Stream] = []  # row i of self._state is stream i's
        self._state = None
        self._groups: list[tuple[np.ndarray | None, Rows]] | None = None  # _decoding by class (rows; None: all)
        self._paused: list[Stream] = []  # each holds its own state
        self._thread = threading.Thread(target=self._run, name=f"scheduler:{runtime.model_id}", daemon=True)

    @property
    def active(self) -> int:
        return len(self._prefilling) + len(self._decoding) + len(self._paused)

    def _room(self) -> int:
        return self.max_batch - len(self._prefilling) - len(self._decoding)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, stream: Stream) -> None:
        with self._cv:
            self._inbox.append(stream)
            self._cv.notify()

    def ack(self, stream: Stream, count: int = 1) -> None:
        """The consumer took `count` more of the stream's events (called on the consumer's thread)."""
        stream.consumed += count
        if stream.paused and stream.unsent <= self._resume_at:
            self._wake()

    def cancel(self, stream: Stream) -> None:
        """Drop the stream at the next step (a no-op once it is done)."""
        stream.cancelled = True
        if stream.paused:
            self._wake()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _has_work(self) -> bool:
        return bool(self._inbox or self._prefilling or self._decoding or self._stopping
                    or any(s.cancelled or s.unsent <= self._resume_at for s in self._paused))

    def stop(self, exc: BaseException) -> None:
        """Stop the thread; streams still inside end with `exc`."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()
        left = list(self._inbox) + self._prefilling + self._decoding + self._paused
        self._inbox.clear()
        self._reset()
        self.deliver([(s, s.fail(exc)) for s in left])

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._has_work():  # paused streams are woken by ack/cancel; the timeout is a backstop
                    self._cv.wait(timeout=1.0)
                if self._stopping:
                    return
            events: list = []
            active = self.active
            try:
                self._step(events)
            except Exception as exc:  # a backend failure ends the streams of this model, not the server
                log.exception("%s: step failed; ending its %d streams", self.runtime.model_id, self.active)
                events += [(s, s.fail(exc)) for s in self._prefilling + self._decoding + self._paused]
                self._reset()
            if events or self.active != active:  # no events but a stream came or went: metrics changed
                self.deliver(events)

    def _reset(self) -> None:
        self._prefilling, self._decoding, self._paused, self._state, self._groups = [], [], [], None, None

    def _step(self, events: list) -> None:
        self._admit()
        if self._prefilling:
            self._prefill()
        if self._decoding:
            self._decode(events)
        if self.metrics:
            self.metrics.active.set(self.active)
            self.metrics.queued.set(len(self._inbox))

    def _admit(self) -> None:
        """Drop cancelled streams, then fill the room: resumed streams first, then new ones (FIFO)."""
        self._prefilling = [s for s in self._prefilling if not s.cancelled]
        self._paused = [s for s in self._paused if not s.cancelled]
        if any(s.cancelled for s in self._decoding):
            self._leave([i for i, s in enumerate(self._decoding) if not s.cancelled])
        for s in [s for s in self._paused if s.unsent <= self._resume_at][: self._room()]:
            s.paused = False
            self._paused.remove(s)
            self._prefilling.append(s)  # one token left: it goes straight on to the decode batch
        with self._cv:
            while self._inbox and self._room() > 0:
                s = self._inbox.popleft()
                if not s.cancelled:
                    self._prefilling.append(s)

    def _prefill(self) -> None:
        """Run all but the last token of each prefilling stream (a chunk at most), batched by length."""
        groups: dict[int, list[Stream]] = defaultdict(list)
        for s in self._prefilling:
            if len(s.tokens) > 1:
                groups[min(len(s.tokens) - 1, self.prefill_chunk)].append(s)
        rt = self.runtime
        for n, group in groups.items():
            tokens = np.stack([s.tokens[:n] for s in group])  # (G, n)
            state = rt.concat([s.state if s.state is not None else rt.new_state(1) for s in group])
            _, state = rt.step(tokens, state)
            for i, s in enumerate(group):
                s.tokens, s.state = s.tokens[n:], rt.take(state, [i])
        ready = [s for s in self._prefilling if len(s.tokens) == 1]
        if ready:
            self._prefilling = [s for s in self._prefilling if len(s.tokens) > 1]
            group = self._one_group()
            if group is not None and all(type(s) is type(self._decoding[0]) for s in ready):
                self._groups = [(None, group.join(ready))]
            else:
                self._regroup()
            states = [s.state if s.state is not None else rt.new_state(1) for s in ready]
            self._state = rt.concat(([self._state] if self._decoding else []) + states)
            self._decoding += ready
            for s in ready:
                s.state = None

    def _decode(self, events: list) -> None:
        """One backend step for every decoding stream; each samples its next token from its row."""
        batch = self._decoding
        if self._groups is None:
            self._groups = self._group(batch)
        if len(self._groups) == 1:
            tokens = self._groups[0][1].tokens()
        else:
            tokens = np.empty(len(batch), np.int64)
            for rows, group in self._groups:
                tokens[rows] = group.tokens()
        logits, self._state = self.runtime.step(tokens.reshape(-1, 1), self._state)  # (B, V)
        if self.metrics:
            self.metrics.batch_size.observe(len(batch))
        now = time.perf_counter()
        leaving = []
        for rows, group in self._groups:
            for j, event in group.advance(logits if rows is None else logits[rows], now):
                i = j if rows is None else int(rows[j])
                s = batch[i]
                s.produced += 1
                events.append((s, event))
                if s.done or s.produced - s.consumed >= self.max_unsent:
                    leaving.append(i)
        if leaving:
            for i in leaving:
                s = batch[i]
                s.state = self.runtime.take(self._state, [i])
                if not s.done:
                    s.paused = True  # before the events go out: see ack
                    self._paused.append(s)
            gone = set(leaving)
            self._leave([i for i in range(len(batch)) if i not in gone])

    @staticmethod
    def _group(batch: list[Stream]) -> list[tuple[np.ndarray | None, Rows]]:
        classes: dict[type, list[int]] = defaultdict(list)
        for i, s in enumerate(batch):
            classes[type(s)].append(i)
        if len(classes) == 1:  # the usual case: all rows, no regrouping
            return [(None, type(batch[0]).rows(batch))]
        return [(np.array(rows), cls.rows([batch[i] for i in rows])) for cls, rows in classes.items()]

    def _one_group(self) -> Rows | None:
        """The group of the whole decode batch, when its streams are all of one class and grouped already."""
        return self._groups[0][1] if self._groups is not None and len(self._groups) == 1 else None

    def _regroup(self) -> None:
        """The decode batch is about to change: its streams take back their figures, to be grouped again."""
        for _, group in self._groups or ():
            group.close()
        self._groups = None

    def _leave(self, keep: list[int]) -> None:
        group = self._one_group()
        if group is not None and keep:
            self._groups = [(None, group.keep(keep))]
        else:
            self._regroup()
        self._decoding = [self._decoding[i] for i in keep]
        self._state = self.runtime.take(self._state, keep) if keep else None
