"""The server: wires transport, dispatch, methods, engine and workers into one task group.

One thread reads (transport.InputThread: a blocking read wakes faster than an event loop's
turn) and answers `status` itself, through the dispatcher; it hands every other line of a read
to the event loop, at most BATCHES_AHEAD reads ahead. There a message whose method never waits
(every malformed message, `$/cancelRequest`) is answered on the spot; any other request, batch
elements included, gets a task of its own in the one request task group, so reading never
waits for a handler and a slow `infer` never delays `status`. One task writes. While more than
`OUTPUT_HIGH_WATER` bytes of answers are unsent (a client that stopped reading), no more input
is read.

`ready` is written, and the input thread started, before the event loop exists
(`start_reading`): `status` is answered from then on, while the loop starts (anyio's backend
alone costs ~10 ms to import); other lines wait at the door until the loop opens it. The zygote
starts after `ready`, and jsonrpcserver (whose import pulls in jsonschema and costs as much as
everything before `ready`) is imported only by the first request that needs it (`infer`,
`shutdown`, `$/cancelRequest`; never `status`). The zygote's import of `rlm` runs meanwhile in
its own process. Lines written before `ready` wait in the pipe.

Stopping, whichever way it starts (`shutdown`, end of stdin, SIGTERM), is one sequence: refuse
infers that arrive after the stop, let in-flight infers finish until the stop's deadline, cancel
the rest (each answered -32800), answer any `shutdown` calls, flush, exit 0. There is one
deadline: every stop request can only bring it closer (the shortest grace asked for wins). A
second SIGTERM, SIGINT, or the death of the process that started us, cancels everything at once.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from rlm_server.config import Config
from rlm_server.engine.engine import Engine
from rlm_server.engine.tools import ToolHost
from rlm_server.errors import LineTooLong, ParseError, RpcError
from rlm_server.frontends.jsonrpc.request import RequestContext
from rlm_server.frontends.jsonrpc.tools import ToolCalls, is_response
from rlm_server.frontends.jsonrpc.wire import (
    Json,
    RequestId,
    decode,
    encode,
    error_response,
    leading_id,
)
from rlm_server.frontends.lifeline import ParentWatch
from rlm_server.frontends.transport import (
    HEAD_BYTES,
    InputThread,
    Lines,
    LoopDoor,
    OversizedLine,
    ProtocolWriter,
    StdioClaim,
    StopReading,
)

if TYPE_CHECKING:
    from rlm_server.frontends.jsonrpc.dispatch import ContextFactory, Dispatcher, Response, Spawn

log = logging.getLogger(__name__)

Line = bytes | bytearray | OversizedLine

OUTPUT_HIGH_WATER = 64 << 20  # unsent answer bytes above which we stop reading input
DECODE_IN_THREAD_BYTES = 1 << 20
BATCHES_AHEAD = 4  # reads the input thread may hand the loop before it waits for it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TOO_LARGE_ANSWER = "the tool's answer is longer than the server's --max-message-bytes"


class InFlight:
    """The requests read and not yet answered: what a stop waits for.

    A request counts from the moment its task is spawned (jsonrpcserver reaches the method a
    scheduling step later, and a stop read in the same burst must still wait for it) until its
    answer is sent. A request that only waits for the stop itself (`shutdown`) steps out.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._current: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("request")

    def spawner(self, group: TaskGroup) -> Spawn:
        def spawn(task: Callable[[], Coroutine[Any, Any, None]]) -> None:
            self._enter()
            group.start_soon(self._run, task)

        return spawn

    async def _run(self, task: Callable[[], Coroutine[Any, Any, None]]) -> None:
        counted = [True]  # cleared when this request steps out
        self._current.set(counted)  # this task's own context: seen by the tasks it starts
        try:
            await task()
        finally:
            if counted[0]:
                self._leave()

    def step_out(self) -> None:
        """The calling request no longer counts (it waits for the others)."""
        counted = self._current.get(None)
        if counted is not None and counted[0]:
            counted[0] = False
            self._leave()

    def _enter(self) -> None:
        if self._count == 0:
            self._idle = anyio.Event()
        self._count += 1

    def _leave(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


class Server:
    def __init__(self, config: Config, claim: StdioClaim, environ: Mapping[str, str]) -> None:
        self._config = config
        self._claim = claim
        self._writer = ProtocolWriter(
            claim.write_fd, on_closed=self._output_closed, high_water=OUTPUT_HIGH_WATER
        )
        self.engine = Engine(config, environ)
        self._tool_calls = ToolCalls(self._send)  # our own requests to the client
        self._parent = ParentWatch()
        self._lines_read = 0
        self._in_flight = InFlight()
        self._decoding: collections.Counter[RequestId] = collections.Counter()  # by leading id
        self._stopping = anyio.Event()
        self._grace: anyio.CancelScope  # made in run(), in the event loop; lowered by every stop
        self._drained = anyio.Event()
        self._door = LoopDoor()  # where the input thread hands the loop what it cannot answer
        self._dispatcher: Dispatcher  # loaded by start_reading
        self._spawn: Spawn  # made by _serve, before it opens the door
        self._early_signals: list[int] = []  # received before the loop watched for them

    # -- Session, as methods see it ---------------------------------------------------------

    def notify(self, method: str, params: Json) -> None:
        self._writer.send(encode({"jsonrpc": "2.0", "method": method, "params": params}))

    def tool_host(self, request_id: RequestId) -> ToolHost:
        return self._tool_calls.host(request_id)

    async def shutdown(self, grace_s: float | None, sequence: int) -> None:
        """Start stopping, and return once everything else has been answered."""
        self.stop(self._config.shutdown_grace_s if grace_s is None else grace_s, sequence)
        self._in_flight.step_out()
        await self._drained.wait()

    def stop(self, grace_s: float, sequence: int | None = None) -> None:
        """Refuse infers read after `sequence` (default: after the last line read so far), and
        bring the deadline for in-flight work to at most `grace_s` from now."""
        self.engine.admit_through(self._lines_read if sequence is None else sequence)
        self._grace.deadline = min(self._grace.deadline, anyio.current_time() + grace_s)
        self._stopping.set()

    def _output_closed(self) -> None:
        """Nobody reads our answers any more: stop at once."""
        self.stop(0)

    # -- the loop -----------------------------------------------------------------------------

    def start_reading(self) -> None:
        """Before the event loop: write `ready` and start the input thread. From here `status`
        is answered (in that thread, which needs no loop); every other line waits at the door,
        and a stop signal is noted, until `run` has the loop going (importing anyio's backend
        alone takes ~10 ms)."""
        self._note_signals()
        self._send_ready()
        self._dispatcher = _load_dispatcher()
        self._start_input()

    async def run(self) -> int:
        """After `start_reading`."""
        self._grace = anyio.CancelScope(deadline=math.inf)
        self.engine.workers.start()
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._watch_signals)
                background.start_soon(self._parent.wait_gone, self._parent_gone)
                background.start_soon(self.engine.sessions.expire_idle)
                async with anyio.create_task_group() as writing:
                    writing.start_soon(self._writer.run)
                    await self._serve()
                    self._writer.close()
                background.cancel_scope.cancel()
        finally:
            self.engine.sessions.kill_all()
            self.engine.workers.stop()
        return 0

    def _send_ready(self) -> None:
        """Written at once (there is no loop yet to end a turn)."""
        with self._writer.held():
            self.notify("ready", {**self.engine.describe(), "pid": os.getpid()})

    async def _serve(self) -> None:
        async with anyio.create_task_group() as requests:
            self._spawn = self._in_flight.spawner(requests)
            self._door.open()
            await self._stopping.wait()
            with self._grace:
                await self._in_flight.idle()
            self.engine.cancel_all()
            await self._in_flight.idle()  # each cancelled infer is answered -32800
            self._drained.set()  # `shutdown` calls answer last; the task group waits for them

    def _start_input(self) -> None:
        """Read in the input thread: it answers `status` itself, and hands every other line to
        the loop, at most BATCHES_AHEAD reads ahead of it (the loop bounds what is read)."""
        ahead = threading.BoundedSemaphore(BATCHES_AHEAD)

        def on_lines(lines: Lines) -> bool:
            rest = self._answer_here(lines, self._dispatcher)
            if rest:
                ahead.acquire()
                self._door.call(self._handle_lines, rest, ahead)
            return bool(rest)

        def on_end() -> None:
            with contextlib.suppress(StopReading):
                self._door.call(self._input_ended)

        InputThread(
            self._claim.read_fd,
            self._config.max_message_bytes,
            on_lines,
            on_end,
            self._writer.wait_below_high_water,
        ).start()

    def _answer_here(self, lines: Lines, dispatcher: Dispatcher) -> Lines:
        """In the input thread: answer the lines that are `status` requests (in one write);
        return the others."""
        answers = bytearray()  # not a list: each orjson result keeps 8 KiB of capacity
        rest: Lines = []
        context = self._context_factory(self._lines_read)
        for line in lines:
            message = _maybe_status(line)
            handled, response = (
                (False, None) if message is None else dispatcher.answer_here(message, context)
            )
            if not handled:
                rest.append(line)
            elif response is not None:
                answers += encode(response)
                answers += b"\n"
        if answers:
            self._writer.send_from_thread(answers)
        return rest

    def _handle_lines(self, lines: Lines, ahead: threading.BoundedSemaphore) -> None:
        """In the loop: the lines of one read, answered together (one write for what is
        answered at once)."""
        ahead.release()
        if self._drained.is_set():
            return  # stopped: what arrives now is not read, as after a close of our stdin
        with self._writer.held():
            for line in lines:
                self._handle_line(line, self._dispatcher, self._spawn)

    def _input_ended(self) -> None:
        log.info("end of input; stopping")
        self.stop(self._config.shutdown_grace_s)

    def _handle_line(self, line: Line, dispatcher: Dispatcher, spawn: Spawn) -> None:
        if isinstance(line, OversizedLine):
            request_id = leading_id(line.head)
            if not self._tool_calls.fail(request_id, TOO_LARGE_ANSWER):
                self._send_error(LineTooLong(limit=line.limit), request_id)
            return
        self._lines_read += 1
        context = self._context_factory(self._lines_read)
        if len(line) >= DECODE_IN_THREAD_BYTES:
            spawn(functools.partial(self._decode_aside, line, dispatcher, context, spawn))
        else:
            self._decode_and_dispatch(line, dispatcher, context, spawn)

    def _decode_and_dispatch(
        self, line: bytes | bytearray, dispatcher: Dispatcher, context: ContextFactory, spawn: Spawn
    ) -> None:
        try:
            message = decode(line)
        except ParseError as error:
            self._send_error(error)
            return
        self._route(message, dispatcher, context, spawn)

    async def _decode_aside(
        self, line: bytes | bytearray, dispatcher: Dispatcher, context: ContextFactory, spawn: Spawn
    ) -> None:
        """Parse a long line in a thread while reading goes on, so that `status` and cancels
        behind it are answered meanwhile (a 1 GiB line takes seconds; orjson lets the loop run).
        A cancel for its id that comes first is kept for the request when it arrives."""
        request_id = leading_id(bytes(line[:HEAD_BYTES]))
        self._decoding[request_id] += 1
        try:
            message = await anyio.to_thread.run_sync(decode, line, abandon_on_cancel=True)
        except ParseError as error:
            self.engine.forget_arrival(request_id)
            self._send_error(error)
            return
        finally:
            self._decoding[request_id] -= 1
            if not self._decoding[request_id]:
                del self._decoding[request_id]
        del line
        self._route(message, dispatcher, context, spawn)

    def _route(
        self, message: Any, dispatcher: Dispatcher, context: ContextFactory, spawn: Spawn
    ) -> None:
        """A response answers one of our `tool/call` requests; anything else is dispatched."""
        if is_response(message):
            self._tool_calls.answer(message)
        else:
            dispatcher.dispatch(message, context, spawn, self._send)

    def cancel(self, request_id: RequestId) -> None:
        self.engine.cancel(request_id, arriving=request_id in self._decoding)

    def _context_factory(self, sequence: int) -> ContextFactory:
        return lambda request_id: RequestContext(request_id, sequence, self)

    def _send(self, response: Response | None) -> None:
        if response is not None:
            self._writer.send(encode(response))

    def _send_error(self, error: RpcError, request_id: RequestId = None) -> None:
        self._send(error_response(error, request_id))

    def _note_signals(self) -> None:
        """Until the loop takes them over, SIGTERM and SIGINT are noted, not acted on: a client
        may send one as soon as it sees `ready`, which comes before the loop exists."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, _: self._early_signals.append(signum))

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            for signum in self._early_signals:
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


STATUS_LINE_BYTES = 1024  # a longer line is not a bare `status` request


def _maybe_status(line: Line) -> Any:
    """The decoded message, when `line` may be a `status` request; else None (the loop reads
    it, and answers it whatever it is)."""
    if isinstance(line, OversizedLine) or len(line) > STATUS_LINE_BYTES or b"status" not in line:
        return None
    try:
        return decode(line)
    except ParseError:
        return None


def _load_dispatcher() -> Dispatcher:
    """Import the JSON-RPC layer (after `ready` is out; see the module docstring)."""
    from rlm_server.frontends.jsonrpc.dispatch import Dispatcher
    from rlm_server.frontends.jsonrpc.methods import (
        ANY_THREAD_METHODS,
        INLINE_METHODS,
        REQUEST_ONLY_METHODS,
        TASK_METHODS,
    )

    return Dispatcher(INLINE_METHODS, TASK_METHODS, REQUEST_ONLY_METHODS, ANY_THREAD_METHODS)
