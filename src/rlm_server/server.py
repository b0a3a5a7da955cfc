"""The server: wires transport, dispatch, methods, engine and workers into one task group.

One task reads and parses lines. A message whose method never waits (`status`, and every
malformed message) is answered on the spot; any other gets a task of its own, so reading never
waits for a handler and a slow `infer` never delays `status`. One task writes.

`ready` goes out before the dispatch layer is even imported: jsonrpcserver's import pulls in
jsonschema and http.server, and there is no reason a client should wait for that, or for the
zygote's import of `rlm`, which runs meanwhile in its own process. Lines that arrive early wait
in the pipe.

Stopping, whichever way it starts (`shutdown`, end of stdin, SIGTERM), is one sequence: refuse
infers that arrive after the stop, let in-flight work finish within the grace period, cancel the
rest (each answered -32800), answer any `shutdown` calls, flush, exit 0. A second SIGTERM, or
SIGINT, cancels everything at once.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from rlm_server.config import Config
from rlm_server.context import RequestContext
from rlm_server.engine import Engine
from rlm_server.errors import LineTooLong, ParseError, RpcError
from rlm_server.transport import (
    FdReceiveStream,
    LineReader,
    OversizedLine,
    ProtocolWriter,
    StdioClaim,
)
from rlm_server.wire import RequestId, decode, encode, error_response, leading_id

if TYPE_CHECKING:
    from rlm_server.dispatch import ContextFactory, Dispatcher

log = logging.getLogger(__name__)

Json = dict[str, Any]
POLL_S = 0.005


class Server:
    def __init__(self, config: Config, claim: StdioClaim, environ: Mapping[str, str]) -> None:
        self._config = config
        self._claim = claim
        self._writer = ProtocolWriter(claim.write_fd, on_closed=self._output_closed)
        self.engine = Engine(config, environ)
        self._lines_read = 0
        self._active_tasks = 0
        self._stopping = anyio.Event()
        self._grace_s = config.shutdown_grace_s
        self._drained = anyio.Event()
        self._shutdown_calls = 0

    # -- Session, as methods see it ---------------------------------------------------------

    def notify(self, method: str, params: Json) -> None:
        self._writer.send(encode({"jsonrpc": "2.0", "method": method, "params": params}))

    async def shutdown(self, grace_s: float | None, sequence: int) -> None:
        """Start stopping, and return once everything else has been answered."""
        self._shutdown_calls += 1
        self.stop(self._config.shutdown_grace_s if grace_s is None else grace_s, sequence)
        await self._drained.wait()

    def stop(self, grace_s: float, sequence: int | None = None) -> None:
        """Refuse infers read after `sequence` (default: after the last line read so far)."""
        self.engine.admit_through(self._lines_read if sequence is None else sequence)
        if self._stopping.is_set():
            if grace_s == 0:
                self.engine.cancel_all()
            return
        self._grace_s = grace_s
        self._stopping.set()

    def _output_closed(self) -> None:
        """Nobody reads our answers any more: stop at once."""
        self.stop(0)
        self.engine.cancel_all()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> int:
        self._send_ready()  # written at once: nothing is queued yet
        self.engine.workers.start()
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._watch_signals)
                async with anyio.create_task_group() as writing:
                    writing.start_soon(self._writer.run)
                    await self._serve(_load_dispatcher())
                    self._writer.close()
                background.cancel_scope.cancel()
        finally:
            self.engine.workers.stop()
        return 0

    def _send_ready(self) -> None:
        self.notify("ready", {**self.engine.describe(), "pid": os.getpid()})

    async def _serve(self, dispatcher: Dispatcher) -> None:
        async with anyio.create_task_group() as requests:
            reading = anyio.CancelScope()
            requests.start_soon(self._read, dispatcher, requests, reading)
            await self._stopping.wait()
            with anyio.move_on_after(self._grace_s):
                await self._tasks_at_most(self._shutdown_calls)
            self.engine.cancel_all()
            reading.cancel()
            await self._tasks_at_most(self._shutdown_calls)
            self._drained.set()

    async def _tasks_at_most(self, count: int) -> None:
        while self._active_tasks > count:  # noqa: ASYNC110 - shutdown only; no event per task
            await anyio.sleep(POLL_S)

    async def _read(
        self, dispatcher: Dispatcher, requests: TaskGroup, reading: anyio.CancelScope
    ) -> None:
        stream = FdReceiveStream(self._claim.read_fd, persistent=True)
        reader = LineReader(stream, self._config.max_message_bytes)
        try:
            with reading:
                await self._read_lines(reader, dispatcher, requests)
                log.info("end of input; stopping")
                self.stop(self._config.shutdown_grace_s)
        finally:
            await stream.aclose()

    async def _read_lines(
        self, reader: LineReader, dispatcher: Dispatcher, requests: TaskGroup
    ) -> None:
        while True:
            if not reader.has_line():
                self._writer.flush()  # about to wait for input: answers so far go out now
            line = await reader.next_line()
            if line is None:
                return
            if isinstance(line, OversizedLine):
                self._send_error(LineTooLong(limit=line.limit), leading_id(line.head))
                continue
            self._lines_read += 1
            try:
                message = decode(line)
            except ParseError as error:
                self._send_error(error)
                continue
            finally:
                del line  # a long context must not stay alive here while its request runs
            make_context = self._context_factory(self._lines_read)
            if dispatcher.is_inline(message):
                self._send(dispatcher.handle_inline(message, make_context), flush=False)
            else:
                self._active_tasks += 1
                requests.start_soon(self._serve_task, dispatcher, message, make_context)
            del message

    async def _serve_task(
        self, dispatcher: Dispatcher, message: Any, make_context: ContextFactory
    ) -> None:
        try:
            self._send(await dispatcher.handle(message, make_context))
        finally:
            self._active_tasks -= 1

    def _context_factory(self, sequence: int) -> ContextFactory:
        return lambda request_id: RequestContext(request_id, sequence, self)

    def _send(self, line: bytes | None, flush: bool = True) -> None:
        if line is not None:
            self._writer.send(line, flush)

    def _send_error(self, error: RpcError, request_id: RequestId = None) -> None:
        self._writer.send(encode(error_response(error, request_id)), flush=False)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                first_term = signum == signal.SIGTERM and not self._stopping.is_set()
                log.info("received %s", signal.Signals(signum).name)
                self.stop(self._config.shutdown_grace_s if first_term else 0)
                if not first_term:
                    self.engine.cancel_all()


def _load_dispatcher() -> Dispatcher:
    """Import the JSON-RPC layer (after `ready` is out; see the module docstring)."""
    from rlm_server.dispatch import Dispatcher
    from rlm_server.methods import INLINE_METHODS, TASK_METHODS

    return Dispatcher(INLINE_METHODS, TASK_METHODS)
