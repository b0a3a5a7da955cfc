"""Plugin compatibility mode: our engine behind the elizaOS plugin's own line protocol.

Started as `python -m elizaos_plugin_rlm.server` (the module that `rlm-server-plugin-shim`
writes, see shim.py), which is how the plugin's published clients start their server.
They wait at most 10 s for `{"ready": true, "available": ...}` and then answer stubs forever,
so that line goes out before anything slow is imported. Then each line is a request
`{"id", "method", "params"}` (no `jsonrpc` member), answered `{"id", "result"}` or
`{"id", "error": "<string>"}`; wire.py does the translating. Starting, reading and stopping are
the lifecycle's (lifecycle.py), as for every front end.

Unlike the published server, which answers one request at a time, infers run concurrently on
the shared engine (workers, sandbox, retries, deadlines), and `status` is answered at once.
Both clients give up on a request after 60 s and send it again under a new id: an infer whose
params equal those of one still running joins it instead of running the completion twice.

The clients kill us right after the answer to `shutdown`, so nothing is left to do by then.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from rlm_server import Json, __version__
from rlm_server.cli import configured, sandboxed
from rlm_server.engine.api import Ticket
from rlm_server.errors import InternalError, InvalidParams, ParseError, RpcError
from rlm_server.frontends.lifecycle import Lifecycle, serve_stdio
from rlm_server.frontends.plugin.wire import (
    PluginDefaults,
    error_text,
    infer_result,
    parse_infer,
    plugin_environ,
    status_result,
)
from rlm_server.frontends.transport import OversizedLine, ProtocolWriter
from rlm_server.frontends.wire import encode, leading_id

log = logging.getLogger(__name__)


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


class PluginFrontend:
    """The adapter between the plugin's protocol and the engine (a lifecycle.LineFrontend)."""

    def __init__(
        self, lifecycle: Lifecycle, writer: ProtocolWriter, environ: Mapping[str, str]
    ) -> None:
        self._engine = lifecycle.engine
        self._lifecycle = lifecycle
        self._writer = writer
        self._defaults = PluginDefaults.from_environ(environ)
        self._joiner = Joiner()
        self._warned: set[str] = set()

    def ready(self) -> bytes:
        return orjson.dumps(
            {
                "ready": True,
                "available": self._engine.unavailable_reason is None,
                "server": "rlm-server",
                "version": __version__,
                "stub": self._engine.stub,
            }
        )

    def oversized(self, line: OversizedLine) -> None:
        limit = line.limit
        self._answer(_leading_id(line.head), error=f"Message too large (over {limit} bytes)")

    def decoding(self, head: bytes, ticket: Ticket) -> Callable[[], None]:
        """The plugin's protocol cannot cancel: nothing to track while a line is parsed."""
        return _nothing

    def message(self, message: Any, ticket: Ticket) -> None:
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
            self._answer(request_id, result=status_result(self._engine.status()))
        elif method == "infer":
            self._lifecycle.spawn(functools.partial(self._infer, request_id, params, ticket))
        elif method == "shutdown":
            self._lifecycle.spawn(functools.partial(self._shutdown, request_id, ticket))
        else:
            self._answer(request_id, error=f"Unknown method: {method}")

    async def _infer(self, request_id: Any, params: Json, ticket: Ticket) -> None:
        try:
            key = request_key(params)
        except orjson.JSONEncodeError:  # read (orjson takes 1024 levels), not writable (254)
            refused = InvalidParams("params", "nested too deeply")
            self._answer(request_id, error=error_text(refused, {}))
            return
        work = functools.partial(self._run_infer, request_id, params, ticket)
        self._answer(request_id, **await self._joiner.run(key, work))

    async def _run_infer(self, request_id: Any, params: Json, ticket: Ticket) -> Json:
        """Run one infer and return its answer: {"result": ...} or {"error": "..."}."""
        started_ms = int(time.time() * 1000)
        opts: Any = params.get("opts")
        try:
            request = parse_infer(params, self._defaults)
            self._warn_not_applied(request.not_applied)
            infer = request.infer._replace(label=str(request_id))
            result = await self._engine.infer(infer, ticket)
            return {"result": infer_result(result, request, started_ms)}
        except RpcError as error:
            return {"error": error_text(error, opts if isinstance(opts, dict) else {})}
        except Exception:
            log.exception("infer failed")
            return {"error": error_text(InternalError(), {})}

    def _warn_not_applied(self, keys: frozenset[str]) -> None:
        """Say once per option that we received it and do not apply it (as the published
        server does not): on stderr, which both clients read or discard without blocking."""
        for key in sorted(keys - self._warned):
            self._warned.add(key)
            log.warning("opts.%s is accepted but not applied to an RLM answer", key)

    async def _shutdown(self, request_id: Any, ticket: Ticket) -> None:
        await self._lifecycle.shutdown(None, ticket)
        self._answer(request_id, result={"shutdown": True})

    def _answer(self, request_id: Any, **member: Any) -> None:
        """The answer under the request's id, or under 0 when that id cannot be written back
        (nested deeper than orjson writes)."""
        try:
            line = encode({"id": request_id, **member})
        except orjson.JSONEncodeError:
            line = encode({"id": 0, **member})
        self._writer.send(line)


def _nothing() -> None:
    pass


def _leading_id(head: bytes) -> Any:
    """The id of an over-long line, if it begins with it as both clients write it; else 0, the
    published server's id for what it cannot read."""
    found = leading_id(head)
    return 0 if found is None else found


def main(argv: list[str] | None = None) -> int:
    """`python -m elizaos_plugin_rlm.server`: our engine, the plugin's protocol."""
    environ = plugin_environ(os.environ)  # a copy: our keys, read once
    args = sys.argv[1:] if argv is None else argv
    who = "rlm-server (elizaos plugin mode)"
    started = configured(args, environ, who)
    config = None if started is None else sandboxed(*started, who)
    if config is None:
        return 2

    def frontend(lifecycle: Lifecycle, writer: ProtocolWriter) -> PluginFrontend:
        return PluginFrontend(lifecycle, writer, environ)

    return serve_stdio(config, environ, frontend)
