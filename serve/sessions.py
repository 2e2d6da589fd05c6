"""Sessions: the state a stream leaves behind, kept by id so a later request continues from it.

An entry is one stream's runtime state plus its last character, sampled but not yet fed: continuing feeds
it before the new prompt, so two 50-character requests equal one of 100. Entries expire, the least
recently used are evicted, and the next request on a dropped one is told why it started fresh.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from serve.errors import InvalidArgument, NotFound, SessionBusy
from serve.types import SessionState


@dataclass
class Session:
    model: str
    state: object  # runtime state of one stream (opaque)
    pending: np.ndarray  # int64 tokens to feed before the next prompt
    nbytes: int = 0  # what its state holds (fp32 hidden state: 4 x hidden size x states)


class SessionCache:
    def __init__(self, ttl_s: float, capacity: int, clock=time.monotonic, max_bytes: float = float("inf")):
        self.ttl_s, self.capacity, self.clock, self.max_bytes = ttl_s, capacity, clock, max_bytes
        self.nbytes = 0  # of the live entries' states
        self._live: OrderedDict[str, tuple[Session, float]] = OrderedDict()  # id -> (session, expiry); LRU first
        self._gone: OrderedDict[str, SessionState] = OrderedDict()  # id -> EXPIRED | EVICTED
        self._busy: set[str] = set()

    def __len__(self) -> int:
        self._expire()
        return len(self._live)

    def checkout(self, sid: str, model: str, required: bool = False,
                 lost: bool = False) -> tuple[Session | None, SessionState]:
        """Take the session for one stream: (its state or None when starting fresh, what happened).
        lost: the front end knows its state was lost with a worker process that exited."""
        if sid in self._busy:
            raise SessionBusy(f"session {sid!r} is in use by another stream")
        self._expire()
        session, how = self._live.get(sid, (None, 0))[0], SessionState.CONTINUED
        if session is None:
            how = self._gone.get(sid, SessionState.EXPIRED if lost else SessionState.NEW)
            if required:
                detail = "was lost: the worker process that held it exited" if lost else {
                    SessionState.NEW: "does not exist", SessionState.EXPIRED: "has expired",
                    SessionState.EVICTED: "was evicted"}[how]
                raise NotFound(f"session {sid!r} {detail}")
        elif session.model != model:
            raise InvalidArgument(f"session {sid!r} holds the state of model {session.model!r}, not {model!r}")
        else:
            del self._live[sid]
            self.nbytes -= session.nbytes
        self._busy.add(sid)
        return session, how

    def checkin(self, sid: str, session: Session | None) -> None:
        """Return the session after its stream: the new state, or the old one (None: none) when it failed."""
        self._busy.discard(sid)
        if session is None:
            return
        self._gone.pop(sid, None)
        self._live[sid] = (session, self.clock() + self.ttl_s)
        self.nbytes += session.nbytes
        while len(self._live) > self.capacity or (self.nbytes > self.max_bytes and len(self._live) > 1):
            old, (gone, _) = self._live.popitem(last=False)
            self.nbytes -= gone.nbytes
            self._forget(old, SessionState.EVICTED)

    def _expire(self) -> None:
        now = self.clock()
        while self._live:
            sid, (_, expiry) = next(iter(self._live.items()))
            if expiry > now:  # entries are in last-use order, so the rest expire later
                break
            self.nbytes -= self._live.pop(sid)[0].nbytes
            self._forget(sid, SessionState.EXPIRED)

    def _forget(self, sid: str, why: SessionState) -> None:
        self._gone[sid] = why
        while len(self._gone) > self.capacity:
            self._gone.popitem(last=False)
