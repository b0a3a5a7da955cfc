"""Transport: bytes in, lines out; lines in, bytes out. It knows nothing of JSON-RPC.

At start `claim_stdio` moves the protocol onto private descriptors and points fd 1 at stderr and
fd 0 at /dev/null, so nothing any library, child process or model code prints can reach the
protocol stream, and no child inherits our stdin (O_NONBLOCK is shared by every holder of a pipe).

Every line front end reads in the event loop, with `os.read` on the non-blocking descriptor in
the loop's readiness callback (`LineInput`), and frames with `LineFramer`: no fixed line cap,
long lines never copied. A line over the limit is reported as `OversizedLine` and skipped without
holding more than the limit in memory. One writer owns the protocol descriptor
(`ProtocolWriter`): every message, from wherever it comes, goes through its `send`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import stat
from collections.abc import Callable
from typing import NamedTuple

import anyio
from anyio.abc import ByteReceiveStream

from rlm_server.fdio import READ_CHUNK, set_nonblocking

log = logging.getLogger(__name__)

IOV_MAX = 1024  # buffers per writev
HEAD_BYTES = 4096  # what is kept of a line over the limit, to find its id
Buffer = bytes | memoryview
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


def _grow_pipe(fd: int) -> None:
    """Fewer wake-ups per megabyte on a pipe; harmless where it is not one."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)


class StdioClaim(NamedTuple):
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
    """Take fds 0 and 1 for the protocol, both non-blocking (the event loop reads and writes)."""
    read_fd, write_fd = os.dup(0), os.dup(1)  # os.dup: not inherited by children
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    _grow_pipe(read_fd)
    _grow_pipe(write_fd)
    return StdioClaim(read_fd, write_fd, set_nonblocking(read_fd), set_nonblocking(write_fd))


class OversizedLine(NamedTuple):
    """A line longer than the limit was read and thrown away; `head` is its first bytes."""

    limit: int
    head: bytes


def _blank(line: bytes | bytearray) -> bool:
    return not line or line.isspace()  # never line.strip(): that copies a 200 MB line


class LineFramer:
    """Newline-delimited lines out of bytes fed in, with a size limit; no I/O of its own, so
    that it can be tested, and fed by any reader.

    anyio's `BufferedByteReceiveStream.receive_until` returns `bytes(buffer[:index])`: for a
    200 MB line that is the buffer, a slice and a copy alive at once. Here a line that fills
    most of the buffer is handed over as the buffer itself (orjson parses a bytearray), so a
    long context is never copied on its way in; short lines are sliced off the front. A line
    over the limit is reported once as `OversizedLine`, and the rest of it is dropped as it
    arrives, so no more than the limit is ever held.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already known to hold no newline
        self._skipping = False  # inside a line over the limit, already reported

    def feed(self, data: bytes | memoryview) -> None:
        """Take `data` (copied: the caller may reuse its buffer)."""
        if self._skipping:
            newline = bytes(data).find(b"\n")
            if newline < 0:
                return
            data = data[newline + 1 :]
            self._skipping = False
        self._buffer += data

    def next_line(self) -> bytes | bytearray | OversizedLine | None:
        """The next complete non-blank line, an OversizedLine, or None until more is fed."""
        line = self.buffered_line()
        if line is None and len(self._buffer) > self._max_bytes:
            head = bytes(self._buffer[:HEAD_BYTES])
            self._buffer = bytearray()
            self._scanned = 0
            self._skipping = True
            return OversizedLine(self._max_bytes, head)
        return line

    def last_line(self) -> bytes | bytearray | None:
        """At the end of input: what is left, a final line without its newline, if any."""
        if self._skipping or _blank(self._buffer):
            return None
        return self._take(len(self._buffer))

    def buffered_line(self) -> bytes | bytearray | OversizedLine | None:
        """The next complete non-blank line already fed; None if none is."""
        while (newline := self._buffer.find(b"\n", self._scanned)) >= 0:
            line = self._take(newline)
            if len(line) > self._max_bytes:
                return OversizedLine(self._max_bytes, bytes(line[:HEAD_BYTES]))
            if not _blank(line):
                return line
        self._scanned = len(self._buffer)
        return None

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


class LineReader:
    """Lines pulled from an async byte stream, for a front end whose SDK pulls its input (MCP);
    line front ends are pushed theirs by `LineInput`. A method rather than an async generator,
    so that no suspended frame keeps a long line alive."""

    def __init__(self, stream: ByteReceiveStream, max_bytes: int) -> None:
        self._stream = stream
        self._framer = LineFramer(max_bytes)
        self._ended = False

    async def next_line(self) -> bytes | bytearray | OversizedLine | None:
        """The next non-blank line without its newline, an OversizedLine, or None at the end.

        A final line without a newline counts as a line.
        """
        while True:
            line = self._framer.next_line()
            if line is not None:
                return line
            if self._ended:
                return self._framer.last_line()
            try:
                self._framer.feed(await self._stream.receive())
            except (anyio.EndOfStream, OSError):  # an input we cannot read has ended too
                self._ended = True


Line = bytes | bytearray | OversizedLine
LINES_PER_TURN = 64  # a flood of pipelined lines must not starve the rest of the loop


class LineInput:
    """Lines from the non-blocking protocol descriptor, handed to `on_line` straight from the
    event loop's readiness callback, as asyncio's own transports hand data to a protocol: no
    task wakes per read, which is most of what a `status` costs a client that waits for each
    answer. What the lines of one read answer at once goes out in one write (`held`).

    At most LINES_PER_TURN lines are handed over per turn of the loop; nothing more is read
    until every line read is handed over, so no more than one read is ever buffered. While more
    of our output is unsent than the writer's high-water mark (a client that stopped reading),
    nothing is read. A regular file (`rlm-server < requests.jsonl`), which epoll refuses and
    which is always readable, is read a chunk per turn instead.
    """

    def __init__(
        self, fd: int, max_bytes: int, on_line: Callable[[Line], None], writer: ProtocolWriter
    ) -> None:
        self._fd = fd
        self._framer = LineFramer(max_bytes)
        self._chunk = memoryview(bytearray(READ_CHUNK))
        self._on_line = on_line
        self._writer = writer
        self._pollable = not stat.S_ISREG(os.fstat(fd).st_mode)
        self._watching = False
        self._next: asyncio.Handle | None = None  # a read or a take due on the next turn
        self._ended = False
        self._paused = asyncio.Event()  # reading stopped: the end, or too much output unsent

    async def run(self) -> None:
        """Hand over lines until the end of input (a final line without a newline counts)."""
        loop = asyncio.get_running_loop()
        try:
            while not self._ended:
                await self._writer.below_high_water()
                self._paused.clear()
                self._watch(loop)
                await self._paused.wait()
        finally:
            self._unwatch(loop)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pollable:
            self._next = loop.call_soon(self._read, loop)
        elif not self._watching:
            loop.add_reader(self._fd, self._read, loop)
            self._watching = True

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watching:
            loop.remove_reader(self._fd)
            self._watching = False
        if self._next is not None:
            self._next.cancel()
            self._next = None

    def _pause(self, loop: asyncio.AbstractEventLoop) -> None:
        self._unwatch(loop)
        self._paused.set()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read into one reused buffer: `os.read(fd, 1 MiB)` allocates a megabyte (an mmap and
        a munmap) per call, which doubled the server's cost of a `status`."""
        try:
            read = os.readv(self._fd, [self._chunk])
        except BlockingIOError:  # woken for nothing
            return
        except OSError:  # an input we cannot read has ended too
            read = 0
        data = self._chunk[:read]
        if not read:
            self._ended = True
            last = self._framer.last_line()
            if last is not None:
                with self._writer.held():
                    self._on_line(last)
            self._pause(loop)
            return
        self._framer.feed(data)
        del data
        self._take(loop)

    def _take(self, loop: asyncio.AbstractEventLoop) -> None:
        taken = 0
        with self._writer.held():
            while taken < LINES_PER_TURN and (line := self._framer.next_line()) is not None:
                self._on_line(line)
                taken += 1
            line = None  # a long context must not stay alive here while it runs
        if taken == LINES_PER_TURN:  # more may be buffered: the rest on the next turn
            self._unwatch(loop)
            self._next = loop.call_soon(self._take, loop)
        elif self._writer.over_high_water:
            self._pause(loop)
        else:
            self._watch(loop)


class ProtocolWriter:
    """The single owner of the protocol descriptor: every message goes through `send`.

    `send` never blocks: messages sent during one turn of the event loop are written together
    at the end of that turn (one `writev` for a burst of pipelined answers); inside `held`, at
    the end of the block instead, which saves that turn (and works before the loop exists, for
    `ready`). What the pipe does not take is queued, and the writer task (`run`) writes the
    queue out; nothing is written directly while anything is queued, so lines are never cut
    into each other. `below_high_water` lets a reader stop reading while too much is unsent.
    """

    def __init__(self, fd: int, on_closed: Callable[[], None], high_water: int) -> None:
        self._fd = fd
        self._on_closed = on_closed
        self._open = True
        self._pending = 0  # buffers queued or being written by the task
        self._unsent_bytes = 0  # the bytes of those buffers
        self._high_water = high_water
        self._drained: asyncio.Event | None = None  # made in the loop, by the first wait
        self._outbox: list[Buffer] = []  # sent this turn, not yet written or queued
        self._held = False
        self._send, self._receive = anyio.create_memory_object_stream[Buffer](math.inf)

    def send(self, line: bytes) -> None:
        """Write one encoded message (the newline is added here) at the end of this turn."""
        if not self._outbox and not self._held:
            asyncio.get_running_loop().call_soon(self.flush)
        self._outbox += (line, b"\n")

    def held(self) -> ProtocolWriter:
        """`with writer.held():` messages sent inside the block go out when it ends, in one
        write, without waiting for the end of the loop's turn (which costs a turn per request
        of a client that waits for each answer). Only around code that does not await. (A
        plain context manager: contextlib's generator costs a microsecond per read.)"""
        return self

    def __enter__(self) -> None:
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False
        self.flush()

    def flush(self) -> None:
        """Write what `send` holds now if nothing is queued before it; queue what is left."""
        buffers, self._outbox = self._outbox, []
        if not buffers or not self._open:
            return
        if not self._pending:
            try:
                buffers = _advance(buffers, os.writev(self._fd, buffers[:IOV_MAX]))
            except BlockingIOError:
                pass
            except OSError as error:
                self._close(error)
                return
        if buffers:
            self._queue(_compact(buffers))

    def _queue(self, buffers: list[Buffer]) -> None:
        self._pending += len(buffers)
        self._unsent_bytes += sum(len(buffer) for buffer in buffers)
        for buffer in buffers:
            self._send.send_nowait(buffer)

    @property
    def over_high_water(self) -> bool:
        return self._open and self._unsent_bytes > self._high_water

    async def below_high_water(self) -> None:
        """Return once no more than the high-water mark of bytes is waiting to be written."""
        while self._unsent_bytes > self._high_water and self._open:
            self._drained = asyncio.Event()
            await self._drained.wait()

    def close(self) -> None:
        """No more messages; `run` returns once the queue is written out."""
        self.flush()
        self._send.close()

    async def run(self) -> None:
        async with self._receive:
            async for first in self._receive:
                burst = [first]
                while len(burst) < IOV_MAX:
                    try:
                        burst.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                if self._open:
                    try:
                        await _writev_all(self._fd, burst)
                    except OSError as error:
                        self._close(error)
                self._pending -= len(burst)
                self._unsent_bytes -= sum(len(buffer) for buffer in burst)
                if self._unsent_bytes <= self._high_water:
                    self._wake_reader()

    def _wake_reader(self) -> None:
        if self._drained is not None:
            self._drained.set()

    def _close(self, error: OSError) -> None:
        """The reader of our stdout has gone: nobody can be answered any more."""
        if not self._open:
            return
        log.warning("protocol output closed (%s); stopping", error.strerror)
        self._open = False
        self._wake_reader()
        self._on_closed()


COMPACT_BELOW = 64 << 10


def _compact(buffers: list[Buffer]) -> list[Buffer]:
    """Buffers that must wait, with the small ones joined into one. orjson's output keeps its
    working capacity (8 KiB for a 600-byte answer): 100,000 queued answers held 800 MB."""
    compacted: list[Buffer] = []
    small: list[Buffer] = []
    for buffer in buffers:
        if len(buffer) < COMPACT_BELOW:
            small.append(buffer)
            continue
        if small:
            compacted.append(b"".join(small))
            small = []
        compacted.append(buffer)
    if small:
        compacted.append(b"".join(small))
    return compacted


def _advance(buffers: list[Buffer], written: int) -> list[Buffer]:
    """What is left of `buffers` after `written` bytes of them went out."""
    left: list[Buffer] = []
    for buffer in buffers:
        if written >= len(buffer):
            written -= len(buffer)
        else:
            left.append(memoryview(buffer)[written:] if written else buffer)
            written = 0
    return left


async def _writev_all(fd: int, buffers: list[Buffer]) -> None:
    while buffers:
        try:
            buffers = _advance(buffers, os.writev(fd, buffers))
        except BlockingIOError:
            await anyio.wait_writable(fd)
