"""The JSON-RPC 2.0 front end: the adapter between the wire of protocol/ and the engine.

What is JSON-RPC's own lives here and in the modules beside it: decoding each line (dispatch.py
checks every message against the JSON-RPC 2.0 rules and routes it), validating params into the
engine's types (methods.py, with params.py), request ids and the map of requests in flight that
`$/cancelRequest` reaches, `$/progress`, our own `tool/call` requests to the client (tools.py),
and encoding results and errors. Starting, stopping,
signals and reading are the lifecycle's (lifecycle.py), the same for every front end.

A message whose method never waits (every malformed message, `status`, `context/list`) is
answered on the spot, in the read that brought it; any other request, batch elements included,
gets a task of its own, so reading never waits for a handler and a slow `infer` never delays
`status`. jsonrpcserver (whose import pulls in jsonschema and costs as much as everything
before `ready`) is imported by the first request that needs it (dispatch.py), never by `status`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from rlm_server import Json
from rlm_server.engine.api import Event, InferRequest, InferResult, Ticket
from rlm_server.engine.engine import Engine
from rlm_server.errors import LineTooLong, ParseError, RpcError
from rlm_server.frontends.jsonrpc.tools import ToolCalls, is_response
from rlm_server.frontends.lifecycle import Lifecycle
from rlm_server.frontends.transport import OversizedLine, ProtocolWriter
from rlm_server.frontends.wire import RequestId, encode, error_response, leading_id

if TYPE_CHECKING:
    from rlm_server.frontends.jsonrpc.dispatch import Dispatcher, Response

log = logging.getLogger(__name__)

TOO_LARGE_ANSWER = "the tool's answer is longer than the server's --max-message-bytes"


class Call(NamedTuple):
    """jsonrpcserver's `context` argument: the request being served, and its front end."""

    id: RequestId
    ticket: Ticket  # taken when its line was read
    frontend: JsonRpcFrontend

    @property
    def engine(self) -> Engine:
        return self.frontend.engine


class JsonRpcFrontend:
    def __init__(self, lifecycle: Lifecycle, writer: ProtocolWriter) -> None:
        self.engine = lifecycle.engine
        self.lifecycle = lifecycle
        self._writer = writer
        self._dispatcher: Dispatcher | None = None  # loaded by the first message, after `ready`
        self._running: dict[RequestId, list[Ticket]] = {}  # what $/cancelRequest can reach
        self._tool_calls = ToolCalls(self._send)  # our own requests to the client

    # -- LineFrontend -------------------------------------------------------------------------

    def ready(self) -> bytes:
        params = {**self.engine.describe(), "pid": os.getpid()}
        return encode({"jsonrpc": "2.0", "method": "ready", "params": params})

    def oversized(self, line: OversizedLine) -> None:
        request_id = leading_id(line.head)
        if not self._tool_calls.fail(request_id, TOO_LARGE_ANSWER):  # not an answer to a call
            self._send_error(LineTooLong(limit=line.limit), request_id)

    def message(self, message: Any, ticket: Ticket) -> None:
        """A response answers one of our `tool/call` requests; anything else is dispatched."""
        if isinstance(message, ParseError):
            self._send_error(message)
            return
        if is_response(message):
            self._tool_calls.answer(message)
            return
        self._load().dispatch(message, self._calls(ticket), self.lifecycle.spawn, self._send)

    def decoding(self, head: bytes, ticket: Ticket) -> Callable[[], None]:
        """A cancel for the id its line begins with reaches the request while it is parsed."""
        request_id = leading_id(head)
        return self._track(request_id, ticket) if request_id is not None else _nothing

    # -- what methods call --------------------------------------------------------------------

    async def infer(self, call: Call, request: InferRequest, progress: bool) -> InferResult:
        """Run an infer where `$/cancelRequest` can reach it, with its `$/progress` if asked
        for (a null id names no request, so it gets none), its host tools called through
        `tool/call` requests that name it."""
        untrack = self._track(call.id, call.ticket)
        observer = None if call.id is None or not progress else self._progress(call.id)
        host = self._tool_calls.host(call.id)
        try:
            return await self.engine.infer(request, call.ticket, observer, host)
        finally:
            untrack()

    async def shutdown(self, grace_s: float | None, ticket: Ticket) -> None:
        await self.lifecycle.shutdown(grace_s, ticket)

    def cancel(self, request_id: RequestId) -> None:
        for ticket in self._running.get(request_id, ()):
            ticket.cancel()

    # -- inside -------------------------------------------------------------------------------

    def _load(self) -> Dispatcher:
        """The methods and their dispatcher, imported after `ready` is out (they cost a few
        milliseconds of spawn to `ready` otherwise)."""
        if self._dispatcher is None:
            from rlm_server.frontends.jsonrpc.dispatch import Dispatcher
            from rlm_server.frontends.jsonrpc.methods import (
                INLINE_METHODS,
                REQUEST_ONLY_METHODS,
                TASK_METHODS,
            )

            self._dispatcher = Dispatcher(INLINE_METHODS, TASK_METHODS, REQUEST_ONLY_METHODS)
        return self._dispatcher

    def _calls(self, ticket: Ticket) -> Callable[[RequestId], Call]:
        """Each request of a line gets a Call: the first the line's ticket, the others (a
        batch's elements) tickets of their own, admitted alike."""
        issued = [ticket]

        def call(request_id: RequestId) -> Call:
            own = issued.pop() if issued else ticket.sibling()
            return Call(request_id, own, self)

        return call

    def _track(self, request_id: RequestId, ticket: Ticket) -> Callable[[], None]:
        """Put the ticket in the map of requests in flight; the callable takes it out."""
        self._running.setdefault(request_id, []).append(ticket)

        def untrack() -> None:
            tickets = self._running[request_id]
            tickets.remove(ticket)
            if not tickets:
                del self._running[request_id]

        return untrack

    def _progress(self, request_id: RequestId) -> Callable[[Event], None]:
        def observe(event: Event) -> None:
            params: Json = {"id": request_id, "event": event.kind, "elapsed_ms": event.elapsed_ms}
            for name in ("iteration", "max_iterations", "message"):
                value = getattr(event, name)
                if value is not None:
                    params[name] = value
            self._writer.send(encode({"jsonrpc": "2.0", "method": "$/progress", "params": params}))

        return observe

    def _send(self, response: Response | None) -> None:
        if response is not None:
            self._writer.send(encode(response))

    def _send_error(self, error: RpcError, request_id: RequestId = None) -> None:
        self._send(error_response(error, request_id))


def _nothing() -> None:
    pass
