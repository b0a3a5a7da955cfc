"""One lifecycle for every front end: start, `ready`, signals, parent death, end of input, drain
with one grace, stop, exit code. A front end is the adapter between its wire and the engine; it
brings its `ready` line and its reading, and this module does the rest, the same for all.

Stopping, whichever way it starts (a `shutdown` request, end of input, SIGTERM), is one
sequence: refuse requests read after the stop, let requests in flight finish until the stop's
deadline, cancel the rest (each is answered as cancelled), let `shutdown` requests answer last,
flush, exit 0. There is one deadline: every stop can only bring it closer (the shortest grace
asked for wins). A second SIGTERM, SIGINT, the death of the process that started us, or the
reader of our stdout going away, cancels everything at once.

`Lifecycle` needs no stdio of its own, so a front end that reads stdin itself (an SDK's own
loop) runs inside `Lifecycle.run` as well; `serve_stdio` adds what a line front end shares:
claiming stdio, `ready` written before the event loop exists (so it costs no more than the
imports before it), one writer, and the line reader (`read_lines`). Lines written before `ready`
wait in the pipe.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import logging
import math
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from rlm_server.config import Config
from rlm_server.engine.api import Ticket
from rlm_server.engine.engine import Engine
from rlm_server.errors import ParseError
from rlm_server.frontends.lifeline import ParentWatch
from rlm_server.frontends.transport import (
    HEAD_BYTES,
    Line,
    LineInput,
    OversizedLine,
    ProtocolWriter,
    claim_stdio,
)
from rlm_server.frontends.wire import decode

log = logging.getLogger(__name__)

OUTPUT_HIGH_WATER = 64 << 20  # unsent answer bytes above which we stop reading input
DECODE_ASIDE_BYTES = 1 << 20  # a line this long is parsed in a thread, while reading goes on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Task = Callable[[], Coroutine[Any, Any, None]]


class InFlight:
    """The requests read and not yet answered: what a stop waits for.

    A request counts from the moment its task is spawned (a stop read in the same burst must
    still wait for it) until its answer is sent. A request that only waits for the stop itself
    (`shutdown`) steps out.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._current: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("request")

    def spawn(self, group: TaskGroup, task: Task) -> None:
        self._enter()
        group.start_soon(self._run, task)

    async def _run(self, task: Task) -> None:
        with self.counted(entered=True):
            await task()

    @contextlib.contextmanager
    def counted(self, entered: bool = False) -> Iterator[None]:
        """The enclosed work is a request in flight (`entered`: already counted)."""
        if not entered:
            self._enter()
        counted = [True]  # cleared when this request steps out
        self._current.set(counted)  # this task's own context: seen by the tasks it starts
        try:
            yield
        finally:
            if counted[0]:
                self._leave()

    def _enter(self) -> None:
        if self._count == 0:
            self._idle = anyio.Event()
        self._count += 1

    def step_out(self) -> None:
        """The calling request no longer counts (it waits for the others)."""
        counted = self._current.get(None)
        if counted is not None and counted[0]:
            counted[0] = False
            self._leave()

    def _leave(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


class Lifecycle:
    """Runs a front end's reading around the engine, and stops the one way described above."""

    def __init__(self, engine: Engine, config: Config, output_fd: int | None = None) -> None:
        """With `output_fd`, the one writer of that descriptor is made here (`writer`)."""
        self.engine = engine
        self._config = config
        self.writer = (
            None
            if output_fd is None
            else ProtocolWriter(output_fd, self.output_closed, OUTPUT_HIGH_WATER)
        )
        self._in_flight = InFlight()
        self._parent = ParentWatch()
        self._stopping = anyio.Event()
        self._drained = anyio.Event()
        self._grace: anyio.CancelScope | None = None  # made in run(), in the event loop
        self._early_stops: list[tuple[float, Ticket | None]] = []  # asked for before that
        self._requests: TaskGroup  # made in run(), before reading starts
        self.early_signals: list[int] = []  # received before the loop watched for them

    # -- what front ends call ---------------------------------------------------------------

    def spawn(self, task: Task) -> None:
        """Run a request's work in a task of its own, counted in flight until it ends."""
        self._in_flight.spawn(self._requests, task)

    def in_flight(self) -> contextlib.AbstractContextManager[None]:
        """Count the enclosed work as a request in flight, for a front end whose reading (an
        SDK's own loop) runs each request in a task of its own."""
        return self._in_flight.counted()

    def stop(self, grace_s: float, last: Ticket | None = None) -> None:
        """Refuse requests read after `last` (None: after the last one read so far), and bring
        the deadline for requests in flight to at most `grace_s` from now."""
        if self._grace is None:  # before the loop (our stdout closed before `ready` went out)
            self._early_stops.append((grace_s, last))
            return
        self.engine.close_admission(last)
        self._grace.deadline = min(self._grace.deadline, anyio.current_time() + grace_s)
        self._stopping.set()

    async def shutdown(self, grace_s: float | None, ticket: Ticket) -> None:
        """A `shutdown` request: start stopping, and return once everything else is answered."""
        self.stop(self._config.shutdown_grace_s if grace_s is None else grace_s, ticket)
        self._in_flight.step_out()
        await self._drained.wait()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def drained(self) -> None:
        """Return once every request in flight has been answered (or cancelled) after a stop."""
        await self._drained.wait()

    def input_ended(self) -> None:
        log.info("end of input; stopping")
        self.stop(self._config.shutdown_grace_s)

    def output_closed(self) -> None:
        """Nobody reads our answers any more: stop at once."""
        self.stop(0)

    # -- the loop -----------------------------------------------------------------------------

    async def run(
        self, read: Callable[[], Awaitable[None]], end_reading: Callable[[], None] | None = None
    ) -> int:
        """Serve until stopped: `read` is the front end's reading, cancelled once everything
        is answered (lines still unread are never answered), or, with `end_reading`, told to
        end then (an SDK that must see the end of its input to send its last answers). The
        exit code."""
        self._grace = anyio.CancelScope(deadline=math.inf)
        for grace_s, last in self._early_stops:
            self.stop(grace_s, last)
        self.engine.start()
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._watch_signals)
                background.start_soon(self._parent.wait_gone, self._parent_gone)
                background.start_soon(self.engine.run_background)
                async with anyio.create_task_group() as writing:
                    if self.writer is not None:
                        writing.start_soon(self.writer.run)
                    await self._serve(read, end_reading)
                    if self.writer is not None:
                        self.writer.close()
                # Still watching signals while the engine stops: a client may send SIGTERM
                # right after the answer to `shutdown`, and it must find us stopping.
                self.engine.close()
                background.cancel_scope.cancel()
        finally:
            self.engine.close()
        return 0

    async def _serve(
        self, read: Callable[[], Awaitable[None]], end_reading: Callable[[], None] | None
    ) -> None:
        async with anyio.create_task_group() as requests:
            self._requests = requests
            reading = anyio.CancelScope()
            requests.start_soon(self._read, read, reading)
            await self._stopping.wait()
            assert self._grace is not None  # made by run()
            with self._grace:
                await self._in_flight.idle()
            self.engine.cancel_all()
            await self._in_flight.idle()  # each cancelled request is answered
            if end_reading is None:
                reading.cancel()
            self._drained.set()  # `shutdown` requests answer last; the task group waits for them
            if end_reading is not None:
                end_reading()

    async def _read(self, read: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
        with scope:
            await read()

    def note_signals(self) -> None:
        """Until the loop takes them over, SIGTERM and SIGINT are noted, not acted on: a client
        may send one as soon as it sees `ready`, which comes before the loop exists."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, _: self.early_signals.append(signum))

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            for signum in self.early_signals:
                self._on_signal(signum)
            async for signum in signals:
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        first_term = signum == signal.SIGTERM and not self._stopping.is_set()
        log.info("received %s", signal.Signals(signum).name)
        self.stop(self._config.shutdown_grace_s if first_term else 0)

    def _parent_gone(self) -> None:
        log.warning("the process that started us has gone; cancelling everything")
        self.stop(0)


# -- line front ends ------------------------------------------------------------------------------


class LineFrontend(Protocol):
    """A front end that speaks one message per line on stdio (JSON-RPC, the plugin's)."""

    def ready(self) -> bytes:
        """The first line, written before anything else."""
        ...

    def oversized(self, line: OversizedLine) -> None:
        """Answer a line over the size limit (it was not read whole)."""
        ...

    def message(self, message: Any, ticket: Ticket) -> None:
        """Answer one decoded line (a ParseError if it is not JSON), read with `ticket`."""
        ...

    def decoding(self, head: bytes, ticket: Ticket) -> Callable[[], None]:
        """A long line, read with `ticket`, is being decoded aside; the callable is called
        when it is done (a cancel for it may come meanwhile)."""
        ...


def serve_stdio(
    config: Config,
    environ: Mapping[str, str],
    make_frontend: Callable[[Lifecycle, ProtocolWriter], LineFrontend],
) -> int:
    """Run a line front end on stdio until it stops; the exit code."""
    claim = claim_stdio()
    try:
        lifecycle = Lifecycle(Engine(config, environ), config, claim.write_fd)
        writer = lifecycle.writer
        assert writer is not None
        frontend = make_frontend(lifecycle, writer)
        lifecycle.note_signals()
        with writer.held():  # written at once: there is no loop yet to end a turn
            writer.send(frontend.ready())
        _started()
        read = functools.partial(read_lines, claim.read_fd, config, lifecycle, writer, frontend)
        return run_loop(lifecycle.run, read)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # decided to exit; a late SIGTERM agrees
        claim.release()


def run_loop(main: Callable[..., Awaitable[int]], *args: Any) -> int:
    """Run a front end on uvloop (libuv's event loop) rather than asyncio's own, which is
    written in Python: every message pays a turn of the loop, and on uvloop the server's part
    of a `status` round trip is about a fifth smaller. anyio imports it here, after `ready`."""
    return anyio.run(main, *args, backend="asyncio", backend_options={"use_uvloop": True})


def _started() -> None:
    """Garbage collection resumes once start-up has made what it keeps (modules, classes,
    tables): collecting during it (cli.py disables it) would only walk those objects again and
    again (about a tenth of the time to `ready`), and frozen they are never walked again."""
    gc.freeze()
    gc.enable()


async def read_lines(
    fd: int, config: Config, lifecycle: Lifecycle, writer: ProtocolWriter, frontend: LineFrontend
) -> None:
    """Read lines and hand each, decoded, to the front end, with the ticket taken as it is
    read (transport.LineInput); a long line is decoded in a thread while reading goes on. At
    the end of input, stop."""
    take = functools.partial(_take, lifecycle=lifecycle, frontend=frontend)
    await LineInput(fd, config.max_message_bytes, take, writer).run()
    lifecycle.input_ended()


def _take(line: Line, lifecycle: Lifecycle, frontend: LineFrontend) -> None:
    if isinstance(line, OversizedLine):
        frontend.oversized(line)
        return
    ticket = lifecycle.engine.ticket()
    if len(line) < DECODE_ASIDE_BYTES:
        frontend.message(_decoded(line), ticket)
        return
    done = frontend.decoding(bytes(line[:HEAD_BYTES]), ticket)
    lifecycle.spawn(functools.partial(_decode_aside, line, ticket, frontend, done))


async def _decode_aside(
    line: bytes | bytearray, ticket: Ticket, frontend: LineFrontend, done: Callable[[], None]
) -> None:
    """Parse a long line in a thread, so that lines behind it are answered meanwhile (a 1 GiB
    line takes seconds; orjson lets the loop run)."""
    try:
        message = await anyio.to_thread.run_sync(_decoded, line, abandon_on_cancel=True)
    finally:
        done()
    del line
    frontend.message(message, ticket)


def _decoded(line: bytes | bytearray) -> Any:
    """The message, or the ParseError that says it is not JSON."""
    try:
        return decode(line)
    except ParseError as error:
        return error
