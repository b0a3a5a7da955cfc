"""Sessions: one REPL that lives across `infer` turns, so a turn can use what an earlier one left.

A session owns one long-lived worker (pool.LongWorker), forked like any other worker (so
whatever confines a worker confines it) when its first turn runs, and killed when it closes.
Each turn is an ordinary request to the engine: admission, its deadline, cancellation, its
budget and a slot apply to it alone. Turns run one at a time, in the order they reach the
session, and a turn waits for the session before it takes a slot, so a waiting turn never holds
a slot its predecessor needs.

A turn that ends without its worker's final frame (cancelled, past its deadline, or the worker
died) may have left the REPL in the middle of a statement: the session is closed and its worker
killed, and later turns are refused (-32602 `session_id`). `session/close` refuses new and
waiting turns at once and lets a running one finish. A session with no turn running or waiting
for --session-idle-s is closed. A session opened on a stored context holds it (it is not
evicted, and a drop takes effect for it only when it closes).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio

from rlm_server import Json
from rlm_server.engine.store import ContextStore, StoredContext
from rlm_server.engine.tools import ToolSpec
from rlm_server.errors import InvalidParams
from rlm_server.executors.base import Executor
from rlm_server.executors.local.pool import Job, LongWorker

log = logging.getLogger(__name__)


class Session:
    def __init__(
        self, session_id: str, stored: StoredContext | None, tools: tuple[ToolSpec, ...] = ()
    ) -> None:
        self.id = session_id
        self.stored = stored  # the stored context it was opened on, held for its lifetime
        self.tools = tools  # the host tools every turn's model code may call
        self.worker: LongWorker | None = None  # forked when the first turn runs
        self.turns = anyio.Lock()  # one turn at a time, first come first served
        self.active = 0  # turns running or waiting: the session is idle at 0
        self.running = False
        self.idle_since = anyio.current_time()
        self.closed = False


class Sessions:
    def __init__(self, idle_s: float, workers: Executor, contexts: ContextStore) -> None:
        self._idle_s = idle_s
        self._workers = workers
        self._contexts = contexts
        self._sessions: dict[str, Session] = {}
        self._changed = anyio.Event()  # a session opened, closed or went idle

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, context_id: str | None, tools: tuple[ToolSpec, ...] = ()) -> Session:
        context = self._contexts.acquire(context_id) if context_id is not None else None
        session = Session("ses-" + os.urandom(16).hex(), context, tools)  # as secrets.token_hex
        self._sessions[session.id] = session
        self._changed.set()
        return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise InvalidParams("session_id", "no such session (unknown, closed or expired)")
        return session

    async def close(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        if session is None:
            return False
        await self._close(session)
        return True

    # -- turns ------------------------------------------------------------------------------

    @contextmanager
    def active(self, session: Session) -> Iterator[None]:
        """A turn is running or waiting for the session: it is not idle."""
        session.active += 1
        try:
            yield
        finally:
            session.active -= 1
            session.idle_since = anyio.current_time()
            self._changed.set()

    @asynccontextmanager
    async def turn(self, session: Session) -> AsyncIterator[None]:
        """The session to this turn alone, once the turns before it are done."""
        async with session.turns:
            if session.closed:
                raise InvalidParams("session_id", "the session was closed while this turn waited")
            yield

    async def run_turn(self, session: Session, job: Job) -> Json:
        """One turn on the session's worker (forked now if it is the first); the final frame.
        A turn that does not get one closes the session. `job.label` names it in our log."""
        session.running = True
        finished = False
        try:
            if session.worker is None:
                held = session.stored.file if session.stored is not None else None
                session.worker = await self._workers.long_worker(held)
            final = await session.worker.run(job)
            finished = True
            return final
        finally:
            session.running = False
            with anyio.CancelScope(shield=True):
                if not finished:
                    log.info("a turn of session %s did not finish; closing it", session.id)
                    await self._close(session)
                elif session.closed:
                    await self._dispose(session)

    # -- closing ----------------------------------------------------------------------------

    async def _close(self, session: Session) -> None:
        """Refuse its new and waiting turns; kill its worker unless a turn is running (then
        the turn's end does)."""
        if not session.closed:
            session.closed = True
            self._sessions.pop(session.id, None)
            self._changed.set()
        if not session.running:
            await self._dispose(session)

    async def _dispose(self, session: Session) -> None:
        worker, session.worker = session.worker, None
        if worker is not None:
            await worker.close()
        stored, session.stored = session.stored, None
        if stored is not None:
            await self._contexts.release(stored)

    async def expire_idle(self) -> None:
        """Close every session that has had no turn for --session-idle-s; runs until cancelled."""
        while True:
            changed = self._changed = anyio.Event()
            now = anyio.current_time()
            wake = math.inf
            for session in list(self._sessions.values()):
                if session.active:
                    continue
                due = session.idle_since + self._idle_s
                if due <= now:
                    log.info("session %s was idle for %.0f s; closing it", session.id, self._idle_s)
                    await self._close(session)
                else:
                    wake = min(wake, due)
            with anyio.move_on_after(wake - anyio.current_time()):
                await changed.wait()

    def kill_all(self) -> None:
        """At exit: end every session's worker and what it started, now."""
        for session in list(self._sessions.values()):
            session.closed = True
            if session.worker is not None:
                session.worker.kill()
        self._sessions.clear()
