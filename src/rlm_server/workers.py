"""Workers, server side: every running completion gets a fresh process, forked from a zygote.

The `rlm` library's local REPL execs model code in-process, swaps the process-wide stdout and
calls `os.chdir` around every cell, and an infinite loop in model code cannot be stopped in a
thread. So each completion runs in its own process that we can kill. Starting Python and
importing `rlm` costs hundreds of milliseconds, so a zygote (`rlm_server.zygote`) imports it once
and builds the default model clients; forking from it takes a few milliseconds, and nothing one
request's model code did can be seen by the next.

The zygote is told to fork over a SOCK_SEQPACKET control socket that carries the child's end of
a fresh socketpair (SCM_RIGHTS); it answers with the child's pid. The server then talks to the
worker over its socketpair in frames (see frames.py): one job frame in, event frames and one
final frame out. End of stream without a final frame means the worker died.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import orjson
from anyio.streams.buffered import BufferedByteReceiveStream

from rlm_server import frames
from rlm_server.errors import WorkerCrashed
from rlm_server.transport import FdReceiveStream, write_all

log = logging.getLogger(__name__)

Json = dict[str, Any]
TEXT_CHUNK = 1 << 20
EventHandler = Callable[[Json], None]


class Worker:
    """One forked worker process and our end of its socket."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._fd = sock.fileno()
        sock.setblocking(False)

    async def send_job(self, job: Json, context: str | list[Any]) -> None:
        """The job as a JSON frame, then the context in a frame of its own.

        A text context goes as raw UTF-8, streamed in chunks, so a 200 MB context is never
        copied into one JSON document on its way to the worker.
        """
        try:
            if isinstance(context, str):
                await self._write_frame(orjson.dumps({**job, "context_type": "text"}))
                await self._write_text(context)
            else:
                await self._write_frame(orjson.dumps({**job, "context_type": "json"}))
                await self._write_frame(orjson.dumps(context))
        except OSError:  # the worker died while we wrote; its frames() will end
            pass

    async def _write_frame(self, payload: bytes) -> None:
        await write_all(self._fd, frames.header(len(payload)))
        await write_all(self._fd, payload)

    async def _write_text(self, text: str) -> None:
        if not text.isascii():  # isascii is O(1) on str; only then are characters bytes
            await self._write_frame(text.encode())
            return
        await write_all(self._fd, frames.header(len(text)))
        for start in range(0, len(text), TEXT_CHUNK):
            await write_all(self._fd, text[start : start + TEXT_CHUNK].encode("ascii"))

    async def frames(self) -> AsyncIterator[Json]:
        stream = BufferedByteReceiveStream(FdReceiveStream(self._fd))
        while True:
            try:
                length = frames.length_of(await stream.receive_exactly(frames.HEADER_BYTES))
                payload = await stream.receive_exactly(length)
            except (anyio.IncompleteRead, OSError):
                return
            yield orjson.loads(payload)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self._sock.close()


class _Zygote:
    """The zygote process and our end of its control socket."""

    def __init__(self, prewarm: Json, memory_mb: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control = ours
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rlm_server.zygote", str(theirs.fileno()), str(memory_mb)],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        theirs.close()
        ours.setblocking(False)
        ours.send(orjson.dumps(prewarm))
        self.ready = False

    async def request(self, message: bytes, fds: list[int] | None = None) -> bytes:
        while True:
            try:
                socket.send_fds(self.control, [message], fds or [])
                break
            except BlockingIOError:
                await anyio.wait_writable(self.control)
        return await self.receive()

    async def receive(self) -> bytes:
        while True:
            try:
                return self.control.recv(64)
            except BlockingIOError:
                await anyio.wait_readable(self.control)
            except OSError:
                return b""

    def stop(self) -> None:
        self.control.close()  # the zygote exits on end of stream; its children follow it
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class WorkerPool:
    """Forks workers from a zygote that is started at once and replaced if it dies."""

    def __init__(self, prewarm: Json, memory_mb: int) -> None:
        self._prewarm = prewarm
        self._memory_mb = memory_mb
        self._zygote: _Zygote | None = None
        self._lock = anyio.Lock()

    def start(self) -> None:
        """Start the zygote now, so its import of `rlm` overlaps with the first request."""
        self._zygote = _Zygote(self._prewarm, self._memory_mb)

    def stop(self) -> None:
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None

    async def _ready_zygote(self) -> _Zygote:
        zygote = self._zygote
        if zygote is None or zygote.process.poll() is not None:
            if zygote is not None:
                log.warning("zygote exited with %s; starting a new one", zygote.process.returncode)
                zygote.stop()
            zygote = self._zygote = _Zygote(self._prewarm, self._memory_mb)
        if not zygote.ready:
            if await zygote.receive() != b"ready":
                raise WorkerCrashed(reason="the worker zygote failed to start")
            zygote.ready = True
        return zygote

    async def fork(self) -> Worker:
        async with self._lock:
            zygote = await self._ready_zygote()
            ours, theirs = socket.socketpair()
            try:
                reply = await zygote.request(b"fork", [theirs.fileno()])
            finally:
                theirs.close()
            if len(reply) != 8:
                ours.close()
                zygote.process.poll()
                raise WorkerCrashed(reason="the worker zygote did not fork")
            return Worker(int.from_bytes(reply, "big"), ours)

    async def run(self, job: Json, context: str | list[Any], on_event: EventHandler) -> Json:
        """Run one job in a fresh worker; return its final frame. The worker never outlives it."""
        worker = await self.fork()
        try:
            await worker.send_job(job, context)
            async for frame in worker.frames():
                if "event" in frame:
                    on_event(frame)
                else:
                    return frame
            raise WorkerCrashed()
        finally:
            worker.kill()
