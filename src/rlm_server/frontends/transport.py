"""Transport: bytes in, lines out; lines in, bytes out. It knows nothing of JSON-RPC.

At start `claim_stdio` moves the protocol onto private descriptors and points fd 1 at stderr and
fd 0 at /dev/null, so nothing any library, child process or model code prints can reach the
protocol stream, and no child inherits our stdin (O_NONBLOCK is shared by every holder of a pipe).

The server reads in a thread of its own (`InputThread`, blocking reads into one reused buffer,
after a short wait awake for the next line where that is cheaper than sleeping: `AwakeWait`);
the elizaOS plugin mode reads with `os.read` on a non-blocking descriptor after the event loop
says it is readable (`LineReader`). Both frame with `LineFramer`: no fixed line cap, long lines
never copied. A line over the limit is reported as `OversizedLine` and skipped without holding
more than the limit in memory. Writing is owned by one task (`ProtocolWriter.run`); the input
thread writes directly only when nothing is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import logging
import math
import os
import resource
import select
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import anyio
from anyio.abc import ByteReceiveStream

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
POLL_AFTER_ANSWER_NS = 100_000  # AwakeWait: how long to wait awake for the next line
SHARED_IN_A_ROW = 3  # AwakeWait: inputs written from its own CPU before it stops polling
NO_POLLS_AFTER_SHARING_NS = 50_000_000  # and for how long
IOV_MAX = 1024  # buffers per writev
HEAD_BYTES = 4096  # what is kept of a line over the limit, to find its id
Buffer = bytes | memoryview
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


def claim_stdio(nonblocking_read: bool = True) -> StdioClaim:
    """Take fds 0 and 1 for the protocol. The input is read without blocking by an event
    loop, or blocking by InputThread (`nonblocking_read=False`)."""
    read_fd, write_fd = os.dup(0), os.dup(1)  # os.dup: not inherited by children
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    _grow_pipe(read_fd)
    _grow_pipe(write_fd)
    read_flags = fcntl.fcntl(read_fd, fcntl.F_GETFL)
    if nonblocking_read:
        set_nonblocking(read_fd)
    else:
        fcntl.fcntl(read_fd, fcntl.F_SETFL, read_flags & ~os.O_NONBLOCK)
    return StdioClaim(read_fd, write_fd, read_flags, set_nonblocking(write_fd))


class FdReceiveStream(ByteReceiveStream):
    """A byte stream over a non-blocking descriptor (pipe or socket), read without threads.

    `anyio.wait_readable` registers the descriptor with the event loop and unregisters it on
    every wait: two `epoll_ctl` calls per request on an idle connection. With `persistent`, the
    descriptor stays registered (asyncio's `add_reader`) until `aclose`, as asyncio's own pipe
    transports do; the server's stdin uses that, workers' sockets (read once) do not.
    """

    def __init__(self, fd: int, persistent: bool = False) -> None:
        self._fd = fd
        self._persistent = persistent
        self._readable: asyncio.Event | None = None
        # A regular file (`rlm-server < requests.jsonl`) never blocks, and epoll refuses it.
        self._pollable = not stat.S_ISREG(os.fstat(fd).st_mode)
        self._drained = False  # the last read emptied the descriptor

    async def receive(self, max_bytes: int = READ_CHUNK) -> bytes:
        """The next bytes. After a read that was short (it emptied the pipe or socket), wait
        before reading again: a read that is sure to fail costs a syscall and an exception,
        once per request of a client that waits for each answer."""
        if self._drained:
            await self._wait()
        while True:
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await self._wait()
                continue
            if not data:
                raise anyio.EndOfStream
            self._drained = self._pollable and len(data) < max_bytes
            return data

    async def _wait(self) -> None:
        if not self._persistent:
            await anyio.wait_readable(self._fd)
            return
        if self._readable is None:
            self._readable = asyncio.Event()
            asyncio.get_running_loop().add_reader(self._fd, self._readable.set)
        self._readable.clear()
        await self._readable.wait()

    async def aclose(self) -> None:
        if self._readable is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._readable = None


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


class OversizedLine(NamedTuple):
    """A line longer than the limit was read and thrown away; `head` is its first bytes."""

    limit: int
    head: bytes


def _blank(line: bytes | bytearray) -> bool:
    return not line or line.isspace()  # never line.strip(): that copies a 200 MB line


class LineFramer:
    """Newline-delimited lines out of bytes fed in, with a size limit; no I/O of its own, so
    that the input thread and the async reader frame alike.

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
    """Lines from an async byte stream (the elizaOS plugin mode reads so; see InputThread).
    A method rather than an async generator, so that no suspended frame keeps a long line
    alive."""

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
            except anyio.EndOfStream:
                self._ended = True

    def buffered_line(self) -> bytes | bytearray | OversizedLine | None:
        """The next complete non-blank line already read, without waiting; None if none is."""
        return self._framer.buffered_line()


Lines = list[bytes | bytearray | OversizedLine]


class InputThread:
    """Blocking reads of the protocol descriptor in a thread of its own.

    A client that waits for each answer pays, per request, for whatever wakes the reader: an
    event loop's turn (epoll, a callback, a task step) costs more than the rest of a `status`
    together. A thread blocked in `read` wakes straight into framing, and hands each read's
    complete lines to `on_lines` in this thread: the server answers what may be answered from
    any thread (`status`) here and passes the rest to its event loop (`on_lines` says whether it
    did). Before each read it waits in `may_read` (the writer's high-water mark). At the end of
    input, `on_end`. The thread is a daemon: the process exits without waiting for a read that
    never returns.

    After a read whose lines were all answered here, the next one is waited for awake
    (`AwakeWait`) before the thread sleeps in `read`; never after handing lines to the loop,
    which then needs the GIL.
    """

    def __init__(
        self,
        fd: int,
        max_bytes: int,
        on_lines: Callable[[Lines], bool],
        on_end: Callable[[], None],
        may_read: Callable[[], None],
    ) -> None:
        self._fd = fd
        self._framer = LineFramer(max_bytes)
        self._chunk = memoryview(bytearray(READ_CHUNK))
        self._on_lines, self._on_end, self._may_read = on_lines, on_end, may_read
        self._awake = AwakeWait(fd) if hasattr(resource, "RUSAGE_THREAD") else None  # Linux
        self._thread = threading.Thread(target=self._run, name="rlm-server-input", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            answered = False
            while data := self._read(answered):
                self._framer.feed(data)
                del data
                lines: Lines = []
                while (line := self._framer.next_line()) is not None:
                    lines.append(line)
                answered = bool(lines) and not self._on_lines(lines)
                del lines, line  # a long context must not stay alive here while it runs
            last = self._framer.last_line()
            if last is not None:
                self._on_lines([last])
        except StopReading:
            return
        except Exception:  # a bug of ours: stop as at the end of input, never hang unread
            log.exception("the input thread failed; stopping as at the end of input")
        self._on_end()

    def _read(self, poll_first: bool) -> bytes | memoryview:
        """The next bytes, read into one reused buffer: `os.read(fd, 1 MiB)` allocates a
        megabyte (an mmap and munmap) per call, 25 µs of a 45-byte `status`."""
        self._may_read()
        awake = self._awake if poll_first else None
        if awake is not None:
            awake.wait()
        while True:
            try:
                read = os.readv(self._fd, [self._chunk])
                break
            except BlockingIOError:  # a descriptor someone else made non-blocking
                select.select([self._fd], [], [])
            except OSError:
                return b""
        if awake is not None:
            awake.arrived()
        return self._chunk[:read]


class AwakeWait:
    """Waits for input on a descriptor without sleeping in the kernel, where that pays.

    A client that waits for each answer sends its next request within microseconds, and waking
    a thread that sleeps on a CPU of its own costs more than that (the idle CPU halts; on a
    virtual machine its wake-up goes through the hypervisor: about 25 µs here, more than a
    whole `status`). So `wait` polls for up to `POLL_AFTER_ANSWER_NS`, yielding the CPU
    (`sched_yield`) between polls, so that a task on the same CPU runs at once; an idle server
    spends at most that window once per line. It pays only for a client that answers within
    the window, and only when that client runs on another CPU:
    - after input that came later than the window (a client that waits between requests, or
      thinks), it does not poll until input comes within it again (`arrived` measures), so a
      paced client costs no CPU, and a busy neighbour on our CPU is not made to wait;
    - when the input came from a task that ran during our first yield (the client, on our CPU),
      a blocking read would have cost no more, and after `SHARED_IN_A_ROW` such waits in a row
      it does not poll for `NO_POLLS_AFTER_SHARING_NS`.
    """

    def __init__(self, fd: int) -> None:
        self._input = select.poll()
        self._input.register(fd, select.POLLIN)
        self._shared_in_a_row = 0
        self._no_polls_until = 0  # perf_counter_ns
        self._since = 0  # perf_counter_ns: when the last wait began
        self._quick = True  # the last input came within the window

    def arrived(self) -> None:
        """The input waited for has been read."""
        self._quick = time.perf_counter_ns() - self._since <= POLL_AFTER_ANSWER_NS

    def wait(self) -> None:
        """Return when input is there, or the window has passed, or polling does not pay."""
        self._since = now = time.perf_counter_ns()
        if not self._quick or now < self._no_polls_until or self._input.poll(0):
            return
        switches = _switches_away()
        os.sched_yield()
        if self._input.poll(0):
            shared = _switches_away() != switches  # what ran meanwhile on this CPU wrote it
            self._shared_in_a_row = self._shared_in_a_row + 1 if shared else 0
            if self._shared_in_a_row >= SHARED_IN_A_ROW:
                self._no_polls_until = time.perf_counter_ns() + NO_POLLS_AFTER_SHARING_NS
            return
        deadline = now + POLL_AFTER_ANSWER_NS
        while not self._input.poll(0) and time.perf_counter_ns() < deadline:
            os.sched_yield()


def _switches_away() -> int:
    """How often the scheduler has taken the CPU from this thread for another task."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


class StopReading(Exception):
    """Raised by a callback of InputThread: read no more (the server is gone)."""


class LoopDoor:
    """Calls into an event loop from another thread, in the context captured when the loop
    opened the door (so anyio, which finds its backend through a context variable, works in
    the callbacks). Made before the loop exists, so that reading can start first: a call
    waits until `open`. StopReading once the loop is closed (the server has stopped)."""

    def __init__(self) -> None:
        self._opened = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: contextvars.Context | None = None

    def open(self) -> None:
        """In the event loop: let the calls in."""
        self._loop = asyncio.get_running_loop()
        self._context = contextvars.copy_context()
        self._opened.set()

    def call(self, callback: Callable[..., None], *args: object) -> None:
        self._opened.wait()
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args, context=self._context)
        except RuntimeError:
            raise StopReading from None


class ProtocolWriter:
    """The single owner of the protocol descriptor; every message goes through `send` (in the
    event loop) or `send_from_thread` (the input thread's answers).

    `send` never blocks: messages sent during one turn of the event loop are written together
    at the end of that turn (one `writev` for a burst of pipelined answers, wherever they came
    from); inside `held`, at the end of the block instead, which saves that turn. What the
    pipe does not take is queued, and the writer task (`run`) writes the queue out; nothing is
    written directly while anything is queued, so lines are never cut into each other. One lock
    keeps the two threads' direct writes and the queue's accounting apart; what the input
    thread cannot write at once is carried into the queue ahead of anything sent after it.
    `below_high_water` (async) and `wait_below_high_water` (blocking) let a reader stop
    reading while too much is unsent.
    """

    def __init__(self, fd: int, on_closed: Callable[[], None], high_water: int) -> None:
        self._fd = fd
        self._on_closed = on_closed
        self._open = True
        self._pending = 0  # buffers queued or being written by the task
        self._unsent_bytes = 0  # the bytes of those buffers
        self._high_water = high_water
        self._drained = asyncio.Event()
        self._outbox: list[Buffer] = []  # sent this turn, not yet written or queued
        self._held = False
        self._send, self._receive = anyio.create_memory_object_stream[Buffer](math.inf)
        self._lock = threading.Lock()
        self._carry: list[Buffer] = []  # from the input thread, to queue before anything else
        self._below = threading.Event()  # set while no more than high water is unsent
        self._below.set()
        self._door = LoopDoor()  # into run()'s loop: where the carry goes

    def send(self, line: bytes) -> None:
        """Write one encoded message (the newline is added here) at the end of this turn."""
        if not self._outbox and not self._held:
            asyncio.get_running_loop().call_soon(self.flush)
        self._outbox += (line, b"\n")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Messages sent inside the block go out when it ends, in one write, without waiting
        for the end of the loop's turn (which costs a turn per request of a client that waits
        for each answer). Only around code that does not await."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self.flush()

    def flush(self) -> None:
        """Write what `send` holds now if nothing is queued before it; queue what is left."""
        buffers, self._outbox = self._outbox, []
        if not buffers or not self._open:
            return
        with self._lock:
            self._queue_carry_locked()
            buffers, error = self._write_now_locked(buffers)
            if error is None:
                self._queue_locked(_compact(buffers))
        if error is not None:
            self._close(error)

    def send_from_thread(self, lines: bytes | bytearray) -> None:
        """Write encoded messages, each with its newline, from the input thread: at once when
        nothing is queued (the usual case), else carried into the queue, in order, by the
        event loop."""
        buffers: list[Buffer] = [memoryview(lines)]
        with self._lock:
            if not self._open:
                return
            if not self._carry:
                buffers, error = self._write_now_locked(buffers)
                if error is not None:
                    self._in_loop(self._close, error)
                    return
            if not buffers:
                return
            carried = _compact(buffers)
            self._carry += carried
            self._count_locked(carried)
        self._in_loop(self._queue_carry)

    def _in_loop(self, callback: Callable[..., None], *args: object) -> None:
        self._door.call(callback, *args)

    def _write_now_locked(self, buffers: list[Buffer]) -> tuple[list[Buffer], OSError | None]:
        """Write what the pipe takes now, if nothing is queued; what is left to queue."""
        if self._pending:
            return buffers, None
        try:
            return _advance(buffers, os.writev(self._fd, buffers[:IOV_MAX])), None
        except BlockingIOError:
            return buffers, None
        except OSError as error:
            return [], error

    def _count_locked(self, buffers: list[Buffer]) -> None:
        self._pending += len(buffers)
        self._unsent_bytes += sum(len(buffer) for buffer in buffers)
        if self._unsent_bytes > self._high_water:
            self._below.clear()

    def _queue_locked(self, buffers: list[Buffer]) -> None:
        self._count_locked(buffers)
        for buffer in buffers:
            self._send.send_nowait(buffer)

    def _queue_carry(self) -> None:
        with self._lock:
            self._queue_carry_locked()

    def _queue_carry_locked(self) -> None:
        """Move what the input thread could not write into the queue (already counted)."""
        carried, self._carry = self._carry, []
        for buffer in carried:
            self._send.send_nowait(buffer)

    def wait_below_high_water(self) -> None:
        """Block (in the input thread) while more than the high-water mark is unsent."""
        self._below.wait()

    async def below_high_water(self) -> None:
        """Return once no more than the high-water mark of bytes is waiting to be written."""
        while self._unsent_bytes > self._high_water and self._open:
            self._drained.clear()
            await self._drained.wait()

    def close(self) -> None:
        """No more messages; `run` returns once the queue is written out."""
        self.flush()
        self._send.close()

    async def run(self) -> None:
        self._door.open()
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
                with self._lock:
                    self._pending -= len(burst)
                    self._unsent_bytes -= sum(len(buffer) for buffer in burst)
                    if self._unsent_bytes <= self._high_water:
                        self._drained.set()
                        self._below.set()

    def _close(self, error: OSError) -> None:
        """The reader of our stdout has gone: nobody can be answered any more."""
        if not self._open:
            return
        log.warning("protocol output closed (%s); stopping", error.strerror)
        self._open = False
        self._drained.set()
        self._below.set()
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
