"""The context store: contexts loaded once (`context/load`) and asked about many times.

Each context is streamed to a private file (mode 0600, in a directory of its own under the
worker pool's per-server directory, not in any worker's) and never held whole in the server's
heap: a text is encoded a slice at a time and each slice is hashed and appended in a thread,
and a chunked load writes each chunk as it arrives. Workers do not read the files: the zygote
does, once per context, and every worker it forks shares what it read (executors/local). So the
server stays small however much is stored, and a question on a stored context costs a fork.

The store is bounded by --context-store-bytes (UTF-8 bytes of a text, bytes of the JSON of a
list). To make room, sealed contexts that no request or session uses are evicted, least recently
used first; when even that would not make room, the load is refused with -32005 and nothing is
evicted. A dropped or evicted context is gone for new requests at once; requests and sessions
that hold it keep it until they end, and only then is its file removed and the zygote told to
forget it (its bytes count until then).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import orjson

from rlm_server.errors import ContextStoreFull, InternalError, InvalidParams
from rlm_server.executors.local.pool import ContextFile

log = logging.getLogger(__name__)

SLICE_CHARS = 1 << 20  # a text is encoded this much at a time, on the loop; written in a thread
Forget = Callable[[str], Awaitable[None]]


def _sha256() -> Any:
    import hashlib  # a context's first chunk is the first use: not before `ready`

    return hashlib.sha256()


@dataclass(eq=False)
class StoredContext:
    """One context: its file, what it holds, and who uses it."""

    id: str
    path: str
    kind: Literal["text", "json"]
    size: int = 0  # bytes written so far
    sealed: bool = False
    sha256: str | None = None  # hex, once sealed
    uses: int = 0  # requests and sessions holding it
    last_used_ms: int = 0  # epoch milliseconds
    recency: int = 0  # the order of last use: what eviction goes by
    dropped: bool = False  # gone for new requests; its file goes with its last use
    digest: Any = field(default_factory=_sha256)
    writing: anyio.Lock = field(default_factory=anyio.Lock)  # one chunk at a time

    @property
    def file(self) -> ContextFile:
        return ContextFile(self.id, self.path, self.kind, self.size)


def _append(path: str, digest: Any, data: bytes) -> None:
    """Append `data` to the file and to the running hash (both let go of the GIL)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    digest.update(data)


class ContextStore:
    def __init__(self, limit_bytes: int, directory: Callable[[], str], forget: Forget) -> None:
        self.limit_bytes = limit_bytes
        self._directory = directory  # made on first use: the worker pool's, once it has started
        self._forget = forget  # tell the zygote to let go of a context
        self._contexts: dict[str, StoredContext] = {}  # by id: sealed ones, and chunked loads
        self._bytes = 0  # every file, dropped ones still in use included
        self.sealed_count = 0  # len(sealed()), kept as a number: `status` reads it often
        self._recency = itertools.count(1)

    # -- what is stored ---------------------------------------------------------------------

    @property
    def bytes_total(self) -> int:
        """Every byte stored, dropped contexts still in use included."""
        return self._bytes

    def sealed(self) -> list[StoredContext]:
        """The contexts that questions may be asked about, in the order they were loaded."""
        return [entry for entry in self._contexts.values() if entry.sealed]

    # -- loading ----------------------------------------------------------------------------

    async def load_text(self, text: str) -> StoredContext:
        entry = self._create("text")
        await self._filled(entry, self._write_text(entry, text))
        return self._seal(entry)

    async def load_json(self, value: Any) -> StoredContext:
        try:
            data = await anyio.to_thread.run_sync(orjson.dumps, value)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, say
            raise InvalidParams("messages", "holds a value that cannot be stored") from None
        entry = self._create("json")
        await self._filled(entry, self._write(entry, data))
        return self._seal(entry)

    async def append(self, context_id: str | None, chunk: str, final: bool) -> StoredContext:
        """One chunk of a chunked load: a new context without `context_id`, else the next
        chunk of that one; `final` seals it."""
        if context_id is None:
            entry = self._create("text")
            self._contexts[entry.id] = entry
        else:
            entry = self._loading(context_id)
        async with entry.writing:
            if entry.dropped or entry.sealed:
                raise InvalidParams("context_id", "no context is being loaded under this id")
            try:
                await self._write_text(entry, chunk)
            except ContextStoreFull:
                if context_id is None:  # a refused first chunk leaves nothing behind
                    await self._drop_now(entry)
                raise
            except OSError:
                await self._drop_now(entry)
                log.exception("writing a context failed; it is dropped")
                raise InternalError() from None
            if final:
                self._seal(entry)
        return entry

    def _loading(self, context_id: str) -> StoredContext:
        entry = self._contexts.get(context_id)
        if entry is None:
            raise InvalidParams("context_id", "no such context (unknown, dropped or evicted)")
        if entry.sealed:
            raise InvalidParams("context_id", "this context is sealed: it takes no more chunks")
        return entry

    def _create(self, kind: Literal["text", "json"]) -> StoredContext:
        directory = os.path.join(self._directory(), "contexts")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        context_id = "ctx-" + os.urandom(16).hex()  # what secrets.token_hex does
        path = os.path.join(directory, context_id)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return StoredContext(context_id, path, kind)

    async def _filled(self, entry: StoredContext, writing: Awaitable[None]) -> None:
        """Await the writing of a one-shot load; if it fails, nothing of it is left."""
        try:
            await writing
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._drop_now(entry)
            if isinstance(exc, OSError):
                log.exception("writing a context failed")
                raise InternalError() from None
            raise

    async def _write_text(self, entry: StoredContext, text: str) -> None:
        for start in range(0, len(text), SLICE_CHARS):
            await self._write(entry, text[start : start + SLICE_CHARS].encode("utf-8", "replace"))

    async def _write(self, entry: StoredContext, data: bytes) -> None:
        evicted = self._reserve(len(data))
        entry.size += len(data)
        try:
            await anyio.to_thread.run_sync(_append, entry.path, entry.digest, data)
        finally:
            with anyio.CancelScope(shield=True):
                for victim in evicted:
                    await self._forget(victim.id)

    def _reserve(self, needed: int) -> list[StoredContext]:
        """Count `needed` more bytes, evicting unused sealed contexts (least recently used
        first) to make room; refuse, evicting nothing, when even that would not. Returns the
        evicted, whom the zygote must forget."""
        room = self.limit_bytes - self._bytes
        victims: list[StoredContext] = []
        if room < needed:
            unused = (e for e in self._contexts.values() if e.sealed and e.uses == 0)
            for entry in sorted(unused, key=lambda e: e.recency):
                victims.append(entry)
                room += entry.size
                if room >= needed:
                    break
        if room < needed:
            raise ContextStoreFull(limit_bytes=self.limit_bytes)
        for victim in victims:
            log.info("evicting context %s (%d bytes) to make room", victim.id, victim.size)
            self._unlist(victim)
            self._remove_file(victim)
        self._bytes += needed
        return victims

    def _seal(self, entry: StoredContext) -> StoredContext:
        entry.sealed = True
        entry.sha256 = entry.digest.hexdigest()
        self._contexts[entry.id] = entry
        self.sealed_count += 1
        self._touch(entry)
        return entry

    def _unlist(self, entry: StoredContext) -> None:
        """Gone for new requests (its file may stay while something holds it)."""
        entry.dropped = True
        if self._contexts.pop(entry.id, None) is not None and entry.sealed:
            self.sealed_count -= 1

    # -- using and dropping -----------------------------------------------------------------

    def acquire(self, context_id: str) -> StoredContext:
        """Hold a sealed context for a request or a session (release it after), or -32602."""
        entry = self._contexts.get(context_id)
        if entry is None:
            raise InvalidParams("context_id", "no such context (unknown, dropped or evicted)")
        if not entry.sealed:
            raise InvalidParams("context_id", "this context is still being loaded (not final)")
        entry.uses += 1
        self._touch(entry)
        return entry

    async def release(self, entry: StoredContext) -> None:
        entry.uses -= 1
        self._touch(entry)
        if entry.dropped and entry.uses == 0:
            with anyio.CancelScope(shield=True):
                await self._let_go(entry)

    @asynccontextmanager
    async def lease(self, context_id: str) -> AsyncIterator[ContextFile]:
        """The context's file for as long as the block runs (it is neither evicted nor removed
        meanwhile, even if dropped)."""
        entry = self.acquire(context_id)
        try:
            yield entry.file
        finally:
            await self.release(entry)

    async def drop(self, context_id: str) -> bool:
        """Forget the context for new requests; those holding it keep it until they end."""
        entry = self._contexts.get(context_id)
        if entry is None:
            return False
        async with entry.writing:  # a chunk being written finishes first
            if entry.dropped:
                return False
            self._unlist(entry)
            if entry.uses == 0:
                await self._let_go(entry)
        return True

    async def _drop_now(self, entry: StoredContext) -> None:
        """A load that failed: its entry and file go at once (nothing can hold it yet)."""
        self._unlist(entry)
        await self._let_go(entry)

    async def _let_go(self, entry: StoredContext) -> None:
        self._remove_file(entry)
        if entry.sealed:  # only a sealed context can have reached the zygote
            await self._forget(entry.id)

    def _remove_file(self, entry: StoredContext) -> None:
        self._bytes -= entry.size
        entry.size = 0
        with suppress(FileNotFoundError):
            os.unlink(entry.path)

    def _touch(self, entry: StoredContext) -> None:
        entry.last_used_ms = int(time.time() * 1000)
        entry.recency = next(self._recency)
