"""Plugin compatibility mode: our engine behind the elizaOS plugin's own line protocol.

Started as `python -m elizaos_plugin_rlm.server` (the module that `rlm-server-plugin-shim`
writes, see plugin_shim.py), which is how the plugin's published clients start their server.
They wait at most 10 s for `{"ready": true, "available": ...}` and then answer stubs forever,
so that line goes out before anything slow is imported. Then each line is a request
`{"id", "method", "params"}` (no `jsonrpc` member), answered `{"id", "result"}` or
`{"id", "error": "<string>"}`; compat_wire.py does the translating.

Unlike the published server, which answers one request at a time, infers run concurrently on
the shared engine (workers, sandbox, retries, deadlines), and `status` is answered at once.
Both clients give up on a request after 60 s and send it again under a new id: an infer whose
params equal those of one still running joins it instead of running the completion twice.

Stopping (`shutdown`, end of input, SIGTERM) refuses new infers, lets running ones finish until
the shutdown grace, cancels the rest (each answered with an error), answers `shutdown` last
and exits 0. The clients kill us right after that answer, so nothing is left to do by then.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup

from rlm_server import Json, __version__
from rlm_server.cli import configured, sandboxed
from rlm_server.config import Config
from rlm_server.engine.engine import Engine
from rlm_server.errors import InternalError, ParseError, RpcError
from rlm_server.frontends.jsonrpc.wire import decode, leading_id
from rlm_server.frontends.lifeline import ParentWatch
from rlm_server.frontends.transport import (
    FdReceiveStream,
    LineReader,
    OversizedLine,
    ProtocolWriter,
    StdioClaim,
    claim_stdio,
)

log = logging.getLogger(__name__)

OUTPUT_HIGH_WATER = 64 << 20
DECODE_IN_THREAD_BYTES = 1 << 20
YIELD_EVERY_LINES = 64


@dataclass
class _Shared:
    """One running infer, and the answer every request that joined it gets."""

    done: anyio.Event = field(default_factory=anyio.Event)
    answer: Json = field(default_factory=lambda: {"error": "Request cancelled (cancelled)"})


class Joiner:
    """Runs each distinct infer once at a time: a re-sent identical request waits for the one
    already running (the clients re-send after their 60 s timeout) instead of starting a
    second completion; it runs afresh once the first has been answered."""

    def __init__(self) -> None:
        self._running: dict[bytes, _Shared] = {}

    async def run(self, key: bytes, work: Callable[[], Awaitable[Json]]) -> Json:
        shared = self._running.get(key)
        if shared is not None:
            await shared.done.wait()
            return shared.answer
        shared = self._running[key] = _Shared()
        try:
            shared.answer = await work()
        finally:
            del self._running[key]
            shared.done.set()
        return shared.answer

    def __len__(self) -> int:
        return len(self._running)


def request_key(params: Json) -> bytes:
    """What makes two infers identical: their params, key order aside."""
    return hashlib.blake2b(orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).digest()


class CompatServer:
    def __init__(self, config: Config, claim: StdioClaim, environ: Mapping[str, str]) -> None:
        from rlm_server.frontends.plugin.wire import PluginDefaults

        self._config = config
        self._claim = claim
        self._writer = ProtocolWriter(
            claim.write_fd, on_closed=lambda: self.stop(0), high_water=OUTPUT_HIGH_WATER
        )
        self.engine = Engine(config, environ)
        self._defaults = PluginDefaults.from_environ(environ)
        self._joiner = Joiner()
        self._parent = ParentWatch()
        self._lines_read = 0
        self._infers = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._stopping = anyio.Event()
        self._drained = anyio.Event()
        self._grace: anyio.CancelScope
        self._warned: set[str] = set()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> int:
        self._grace = anyio.CancelScope(deadline=math.inf)
        self._send(
            {
                "ready": True,
                "available": self.engine.unavailable_reason is None,
                "server": "rlm-server",
                "version": __version__,
                "stub": self.engine.stub,
            }
        )
        self.engine.workers.start()
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._watch_signals)
                background.start_soon(self._parent.wait_gone, lambda: self.stop(0))
                async with anyio.create_task_group() as writing:
                    writing.start_soon(self._writer.run)
                    await self._serve()
                    self._writer.close()
                # Still watching signals: the TypeScript client sends SIGTERM right after the
                # answer to `shutdown`, and it must find us stopping, not kill us.
                self.engine.workers.stop()
                background.cancel_scope.cancel()
        finally:
            self.engine.workers.stop()
        return 0

    async def _serve(self) -> None:
        async with anyio.create_task_group() as requests:
            reading = anyio.CancelScope()
            requests.start_soon(self._read, requests, reading)
            await self._stopping.wait()
            with self._grace:
                await self._idle.wait()
            self.engine.cancel_all()
            await self._idle.wait()
            reading.cancel()
            self._drained.set()

    async def _read(self, requests: TaskGroup, reading: anyio.CancelScope) -> None:
        stream = FdReceiveStream(self._claim.read_fd, persistent=True)
        reader = LineReader(stream, self._config.max_message_bytes)
        try:
            with reading:
                while True:
                    await self._writer.below_high_water()
                    line = await reader.next_line()
                    if line is None:
                        break
                    self._lines_read += 1
                    if self._lines_read % YIELD_EVERY_LINES == 0:
                        await anyio.lowlevel.checkpoint()  # a flood must not starve the rest
                    self._take(line, requests)
                self.stop(self._config.shutdown_grace_s)
        finally:
            await stream.aclose()

    def _take(self, line: bytes | bytearray | OversizedLine, requests: TaskGroup) -> None:
        if isinstance(line, OversizedLine):
            limit = self._config.max_message_bytes
            self._answer(_leading_id(line.head), error=f"Message too large (over {limit} bytes)")
            return
        if len(line) < DECODE_IN_THREAD_BYTES:
            self._handle(_decoded(line), self._lines_read, requests)
            return
        self._enter()  # counted from now: a stop read behind it must wait for it
        requests.start_soon(self._decode_aside, line, self._lines_read, requests)

    async def _decode_aside(self, line: bytes | bytearray, sequence: int, group: TaskGroup) -> None:
        """A long context is parsed in a thread, so `status` behind it is answered meanwhile."""
        try:
            message = await anyio.to_thread.run_sync(_decoded, line, abandon_on_cancel=True)
            del line
            self._handle(message, sequence, group)
        finally:
            self._leave()

    # -- requests -----------------------------------------------------------------------------

    def _handle(self, message: Any, sequence: int, requests: TaskGroup) -> None:
        if isinstance(message, ParseError):
            self._answer(0, error="Invalid JSON")
            return
        if not isinstance(message, dict):
            self._answer(0, error="Invalid request: expected a JSON object")
            return
        request_id = message.get("id", 0)
        method = message.get("method", "")
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        if method == "status":
            self._answer(request_id, result=self._status())
        elif method == "infer":
            self._enter()
            requests.start_soon(self._infer, request_id, params, sequence)
        elif method == "shutdown":
            requests.start_soon(self._shutdown, request_id, sequence)
        else:
            self._answer(request_id, error=f"Unknown method: {method}")

    def _status(self) -> Json:
        from rlm_server.frontends.plugin.wire import status_result

        return status_result(self.engine.status(), self._config)

    async def _infer(self, request_id: Any, params: Json, sequence: int) -> None:
        try:
            work = functools.partial(self._run_infer, params, sequence)
            self._answer(request_id, **await self._joiner.run(request_key(params), work))
        finally:
            self._leave()

    async def _run_infer(self, params: Json, sequence: int) -> Json:
        """Run one infer and return its answer: {"result": ...} or {"error": "..."}."""
        from rlm_server.frontends.plugin.wire import error_text, infer_result, parse_infer

        started_ms = int(time.time() * 1000)
        try:
            request = parse_infer(params, self._defaults)
            self._warn_not_applied(request.not_applied)
            internal_id = f"plugin-{sequence}"
            result = await self.engine.infer(request.infer, internal_id, _no_progress, sequence)
            return {"result": infer_result(result, request, started_ms)}
        except RpcError as error:
            return {"error": error_text(error)}
        except Exception:
            log.exception("infer failed")
            return {"error": error_text(InternalError())}

    def _warn_not_applied(self, keys: frozenset[str]) -> None:
        """Say once per option that we received it and do not apply it (as the published
        server does not): on stderr, which both clients read or discard without blocking."""
        for key in sorted(keys - self._warned):
            self._warned.add(key)
            log.warning("opts.%s is accepted but not applied to an RLM answer", key)

    async def _shutdown(self, request_id: Any, sequence: int) -> None:
        self.stop(self._config.shutdown_grace_s, sequence)
        await self._drained.wait()
        self._answer(request_id, result={"shutdown": True})

    def stop(self, grace_s: float, sequence: int | None = None) -> None:
        """Refuse infers read after `sequence` (default: the last line read), and bring the
        deadline for running ones to at most `grace_s` from now."""
        self.engine.admit_through(self._lines_read if sequence is None else sequence)
        self._grace.deadline = min(self._grace.deadline, anyio.current_time() + grace_s)
        self._stopping.set()

    # -- bookkeeping --------------------------------------------------------------------------

    def _enter(self) -> None:
        if self._infers == 0:
            self._idle = anyio.Event()
        self._infers += 1

    def _leave(self) -> None:
        self._infers -= 1
        if self._infers == 0:
            self._idle.set()

    def _answer(self, request_id: Any, **member: Any) -> None:
        self._send({"id": request_id, **member})

    def _send(self, message: Json) -> None:
        self._writer.send(orjson.dumps(message))

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                first_term = signum == signal.SIGTERM and not self._stopping.is_set()
                self.stop(self._config.shutdown_grace_s if first_term else 0)


def _no_progress(params: Json) -> None:
    """The plugin's protocol has no notifications."""


def _decoded(line: bytes | bytearray) -> Any:
    """The message, or the ParseError that says it is not JSON."""
    try:
        return decode(line)
    except ParseError as error:
        return error


def _leading_id(head: bytes) -> Any:
    """The id of an over-long line, if it begins with it as both clients write it; else 0, the
    published server's id for what it cannot read."""
    found = leading_id(head)
    return 0 if found is None else found


def main(argv: list[str] | None = None) -> int:
    """`python -m elizaos_plugin_rlm.server`: our engine, the plugin's protocol."""
    from rlm_server.frontends.plugin.wire import plugin_environ

    environ = plugin_environ(os.environ)  # a copy: our keys, read once
    args = sys.argv[1:] if argv is None else argv
    who = "rlm-server (elizaos plugin mode)"
    started = configured(args, environ, who)
    config = None if started is None else sandboxed(*started, who)
    if config is None:
        return 2
    claim = claim_stdio()
    try:
        return anyio.run(CompatServer(config, claim, environ).run, backend="asyncio")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # decided to exit; a late SIGTERM agrees
        claim.release()
