"""The server: wires transport, dispatch, methods, engine and workers into one task group.

One task reads lines; every line gets a task of its own (so reading never waits for a handler
and a slow `infer` never delays `status`); one task writes. Stopping, whichever way it starts
(`shutdown`, end of stdin, SIGTERM), is the same sequence: refuse new work, let in-flight work
finish within the grace period, cancel the rest (each answered -32800), answer any `shutdown`
calls, flush, exit 0. A second SIGTERM, or SIGINT, cancels everything at once.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import anyio
from anyio.abc import TaskGroup

from rlm_server import PROTOCOL_VERSION, SERVER_NAME, __version__
from rlm_server.config import Config
from rlm_server.dispatch import Dispatcher, decode, encode, error_response
from rlm_server.engine import Engine, InferOptions, RunSpec
from rlm_server.errors import LineTooLong, ParseError
from rlm_server.methods import METHODS, RequestContext
from rlm_server.transport import (
    FdReceiveStream,
    LineReader,
    OversizedLine,
    ProtocolWriter,
    StdioClaim,
)
from rlm_server.workers import WorkerPool

log = logging.getLogger(__name__)

Json = dict[str, Any]
POLL_S = 0.005


class Server:
    def __init__(self, config: Config, claim: StdioClaim, environ: Mapping[str, str]) -> None:
        self._config = config
        self._claim = claim
        self._writer = ProtocolWriter(claim.write_fd)
        default = RunSpec.resolve(config, InferOptions(), environ)
        self._pool = WorkerPool(default.prewarm(), config.worker_memory_mb)
        self.engine = Engine(config, self._pool, environ)
        self._dispatcher = Dispatcher(METHODS)
        self._lines_read = 0
        self._stopping = anyio.Event()
        self._grace_s = config.shutdown_grace_s
        self._drained = anyio.Event()
        self._active_lines = 0
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

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> int:
        self.notify("ready", self._ready_params())
        self._pool.start()
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._watch_signals)
                async with anyio.create_task_group() as writing:
                    writing.start_soon(self._writer.run)
                    await self._serve()
                    self._writer.close()
                background.cancel_scope.cancel()
        finally:
            self._pool.stop()
        return 0

    def _ready_params(self) -> Json:
        identity = {"server": SERVER_NAME, "version": __version__, "protocol": PROTOCOL_VERSION}
        return {**identity, "pid": os.getpid(), **self.engine.describe()}

    async def _serve(self) -> None:
        async with anyio.create_task_group() as requests:
            reading = anyio.CancelScope()
            requests.start_soon(self._read, requests, reading)
            await self._stopping.wait()
            with anyio.move_on_after(self._grace_s):
                await self._lines_at_most(self._shutdown_calls)
            self.engine.cancel_all()
            reading.cancel()
            await self._lines_at_most(self._shutdown_calls)
            self._drained.set()

    async def _lines_at_most(self, count: int) -> None:
        while self._active_lines > count:  # noqa: ASYNC110 - shutdown only; no event per line
            await anyio.sleep(POLL_S)

    async def _read(self, requests: TaskGroup, reading: anyio.CancelScope) -> None:
        with reading:
            reader = LineReader(
                FdReceiveStream(self._claim.read_fd), self._config.max_message_bytes
            )
            while (line := await reader.next_line()) is not None:
                if isinstance(line, OversizedLine):
                    error = LineTooLong(limit=line.limit)
                    self._writer.send(encode(error_response(error, None)))
                else:
                    self._lines_read += 1
                    self._active_lines += 1
                    requests.start_soon(self._serve_line, line, self._lines_read)
                del line  # a long context must not stay alive here while its request runs
            log.info("end of input; stopping")
            self.stop(self._config.shutdown_grace_s)

    async def _serve_line(self, line: bytes, sequence: int) -> None:
        try:
            try:
                message = decode(line)
            except ParseError as error:
                self._writer.send(encode(error_response(error, None)))
                return
            del line  # the parsed message is all we need; free the raw bytes now
            response = await self._dispatcher.handle(
                message, lambda request_id: RequestContext(request_id, sequence, self)
            )
            if response is not None:
                self._writer.send(response)
        finally:
            self._active_lines -= 1

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                first_term = signum == signal.SIGTERM and not self._stopping.is_set()
                log.info("received %s", signal.Signals(signum).name)
                self.stop(self._config.shutdown_grace_s if first_term else 0)
                if not first_term:
                    self.engine.cancel_all()
