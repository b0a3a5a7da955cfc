"""Transport: bytes in, lines out; lines in, bytes out. It knows nothing of JSON-RPC.

At start `claim_stdio` moves the protocol onto private descriptors and points fd 1 at stderr and
fd 0 at /dev/null, so nothing any library, child process or model code prints can reach the
protocol stream, and no child inherits our stdin (O_NONBLOCK is shared by every holder of a pipe).

Reading is `os.read` on a non-blocking descriptor after `anyio.wait_readable`: no thread hop per
line, no fixed line cap, and it can be cancelled. `LineReader` frames it without copying long
lines. A line over the limit is reported as `OversizedLine` and skipped without holding more than
the limit in memory. Writing is owned by one task (`ProtocolWriter.run`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from anyio.abc import ByteReceiveStream

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
SMALL_MESSAGE = 1 << 16
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


def set_nonblocking(fd: int) -> int:
    """Make fd non-blocking; return its previous flags so they can be restored."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return flags


def _grow_pipe(fd: int) -> None:
    """Fewer wake-ups per megabyte on a pipe; harmless where it is not one."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)


@dataclass
class StdioClaim:
    """The private protocol descriptors, and what to put back on exit."""

    read_fd: int
    write_fd: int
    read_flags: int
    write_flags: int

    def release(self) -> None:
        for fd, flags in ((self.read_fd, self.read_flags), (self.write_fd, self.write_flags)):
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
                os.close(fd)
            except OSError:
                pass


def claim_stdio() -> StdioClaim:
    read_fd, write_fd = os.dup(0), os.dup(1)  # os.dup: not inherited by children
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    _grow_pipe(read_fd)
    _grow_pipe(write_fd)
    return StdioClaim(read_fd, write_fd, set_nonblocking(read_fd), set_nonblocking(write_fd))


class FdReceiveStream(ByteReceiveStream):
    """A byte stream over a non-blocking descriptor (pipe or socket), read without threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def receive(self, max_bytes: int = READ_CHUNK) -> bytes:
        while True:
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def aclose(self) -> None:
        return None


async def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write everything to a non-blocking descriptor, waiting whenever it is full."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await anyio.wait_writable(fd)
            continue
        view = view[written:]


@dataclass(frozen=True)
class OversizedLine:
    """A line longer than the limit was read and thrown away."""

    limit: int


def _blank(line: bytes | bytearray) -> bool:
    return not line or line.isspace()  # never line.strip(): that copies a 200 MB line


class LineReader:
    """Newline-delimited lines from a byte stream, with a size limit.

    anyio's `BufferedByteReceiveStream.receive_until` returns `bytes(buffer[:index])`: for a
    200 MB line that is the buffer, a slice and a copy alive at once. Here a line that fills
    most of the buffer is handed over as the buffer itself (orjson parses a bytearray), so a
    long context is never copied on its way in; short lines are sliced off the front.
    A method rather than an async generator, so that no suspended frame keeps a long line alive.
    """

    def __init__(self, stream: ByteReceiveStream, max_bytes: int) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already known to hold no newline
        self._ended = False

    async def next_line(self) -> bytes | bytearray | OversizedLine | None:
        """The next non-blank line without its newline, an OversizedLine, or None at the end.

        A final line without a newline counts as a line.
        """
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline >= 0:
                line = self._take(newline)
                if len(line) > self._max_bytes:
                    return OversizedLine(self._max_bytes)
                if not _blank(line):
                    return line
                continue
            if len(self._buffer) > self._max_bytes:
                await self._skip_rest_of_line()
                return OversizedLine(self._max_bytes)
            if self._ended:
                return None if _blank(self._buffer) else self._take(len(self._buffer))
            self._scanned = len(self._buffer)
            await self._fill()

    def _take(self, newline: int) -> bytes | bytearray:
        """Remove the line ending at `newline` (and the newline) from the buffer."""
        self._scanned = 0
        if newline < len(self._buffer) // 2:
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            return line
        rest = self._buffer[newline + 1 :]
        taken, self._buffer = self._buffer, rest
        del taken[newline:]
        return taken

    async def _fill(self) -> None:
        try:
            self._buffer += await self._stream.receive()
        except anyio.EndOfStream:
            self._ended = True

    async def _skip_rest_of_line(self) -> None:
        """Drop bytes up to the next newline, keeping what follows it."""
        self._buffer = bytearray()
        while not self._ended:
            await self._fill()
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                del self._buffer[: newline + 1]
                break
            self._buffer = bytearray()
        self._scanned = 0


class ProtocolWriter:
    """The single owner of the protocol descriptor: every message is queued to one task.

    The task writes whatever has queued up in one `write`, so pipelined responses cost one
    system call per burst rather than one per message.
    """

    def __init__(self, fd: int, on_closed: Callable[[], None]) -> None:
        self._fd = fd
        self._on_closed = on_closed
        self._open = True
        self._send, self._receive = anyio.create_memory_object_stream[bytes](math.inf)

    def send(self, line: bytes) -> None:
        """Queue one encoded message, without its newline. Never blocks."""
        self._send.send_nowait(line)

    def close(self) -> None:
        """No more messages; `run` returns once the queue is written out."""
        self._send.close()

    async def run(self) -> None:
        async with self._receive:
            async for first in self._receive:
                burst = [first]
                while True:
                    try:
                        burst.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                if self._open:
                    await self._write_burst(burst)

    async def _write_burst(self, burst: list[bytes]) -> None:
        try:
            await self._write_lines(burst)
        except OSError as error:  # the reader of our stdout has gone: nobody can be answered
            log.warning("protocol output closed (%s); stopping", error.strerror)
            self._open = False
            self._on_closed()

    async def _write_lines(self, burst: list[bytes]) -> None:
        if len(burst) == 1 and len(burst[0]) > SMALL_MESSAGE:
            await write_all(self._fd, burst[0])  # no copy of a long line just to add b"\n"
            await write_all(self._fd, b"\n")
        else:
            burst.append(b"")
            await write_all(self._fd, b"\n".join(burst))
