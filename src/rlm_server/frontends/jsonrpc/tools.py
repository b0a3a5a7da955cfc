"""Host tools on the JSON-RPC wire: the server's own requests to the client, and their answers.

The server sends `tool/call` requests with ids of its own: strings `"tool-N"`. JSON-RPC keeps
the two directions' ids apart (the client's responses are to our requests, the server's to its),
and the string form keeps them apart for people reading a log too. The client answers each with
a response (`result`, or `error` whose `message` model code sees), which arrives as a line with
no `method`: `answer` takes it. A call whose request is cancelled, times out or ends tells the
client with `$/cancelRequest` `{"id": "tool-N"}`; an answer that arrives after that is dropped.

One `ToolCalls` per connection; `host(request_id)` is the `ToolHost` (engine/tools.py) of one
request, which names that request in every `tool/call` it sends.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import anyio

from rlm_server.engine.tools import ToolFailed
from rlm_server.frontends.jsonrpc.wire import Json, RequestId

log = logging.getLogger(__name__)

ID_PREFIX = "tool-"
Send = Callable[[Json], None]


class _Pending:
    """One call waiting for the client: its answer, once it has come."""

    __slots__ = ("answer", "arrived")

    def __init__(self) -> None:
        self.arrived = anyio.Event()
        self.answer: Json = {}


def is_response(message: Any) -> bool:
    """Whether `message` is a JSON-RPC response object (an answer to one of our requests)."""
    if not isinstance(message, dict) or "method" in message or message.get("jsonrpc") != "2.0":
        return False
    if "id" not in message or ("result" in message) == ("error" in message):
        return False
    error = message.get("error")
    return error is None or (
        isinstance(error, dict)
        and isinstance(error.get("code"), int)
        and isinstance(error.get("message"), str)
    )


class ToolCalls:
    """The `tool/call` requests in flight on one connection, by id."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}

    def host(self, request_id: RequestId) -> _Host:
        return _Host(self, request_id)

    async def call(self, request_id: RequestId, name: str, arguments: Json) -> Any:
        """Send one `tool/call` and wait for its answer: the result, or ToolFailed."""
        call_id = f"{ID_PREFIX}{next(self._ids)}"
        pending = self._pending[call_id] = _Pending()
        params = {"request_id": request_id, "name": name, "arguments": arguments}
        try:
            self._send({"jsonrpc": "2.0", "id": call_id, "method": "tool/call", "params": params})
            await pending.arrived.wait()
        finally:
            del self._pending[call_id]
            if not pending.arrived.is_set():  # cancelled, timed out, or the request ended
                self._send(
                    {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": call_id}}
                )
        if "error" in pending.answer:
            raise ToolFailed(pending.answer["error"]["message"])
        return pending.answer["result"]

    def answer(self, response: Json) -> None:
        """A response from the client (see `is_response`); one nobody waits for is dropped."""
        pending = self._pending.get(response["id"]) if isinstance(response["id"], str) else None
        if pending is None or pending.arrived.is_set():
            log.info("dropped an answer to %r: no tool call waits for it", response["id"])
            return
        pending.answer = response
        pending.arrived.set()

    def fail(self, call_id: RequestId, message: str) -> bool:
        """Fail the call with this id (its answer could not be read); False: no such call."""
        pending = self._pending.get(call_id) if isinstance(call_id, str) else None
        if pending is None or pending.arrived.is_set():
            return False
        pending.answer = {"error": {"message": message}}
        pending.arrived.set()
        return True


class _Host:
    """One request's `ToolHost`: its calls name it as their `request_id`."""

    __slots__ = ("_calls", "_request_id")

    def __init__(self, calls: ToolCalls, request_id: RequestId) -> None:
        self._calls, self._request_id = calls, request_id

    async def call(self, name: str, arguments: Json) -> Any:
        return await self._calls.call(self._request_id, name, arguments)
