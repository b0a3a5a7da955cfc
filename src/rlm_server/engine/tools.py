"""Host tools: functions the client provides, which model code calls by name.

A request (or the session it is a turn of) declares its tools; the worker makes each a Python
function in the REPL. A call from model code leaves the worker as a frame, and the `ToolGate`
of its request checks it here, in the server, before anything reaches the client: the name must
be declared for this request, the arguments must match the tool's JSON Schema, and the request
must not have made `budget.max_tool_calls` calls already (then the request ends with -32004).
It then asks the `ToolHost` of the front end that declared the tools (the JSON-RPC front end
sends `tool/call` and awaits the client's answer), within `options.tool_timeout_s`. With
`--record` the client's answer is stored like a model answer; with `--replay` it is played back
and the client is never asked, so an agent's tests run with no handler and no model.

What model code gets back is a reply frame: `{"value": ...}`, or `{"error": {"message": ...}}`
which it sees as `ToolError(message)`. A message is the client's own (its handler's error), or
one of ours that says what was refused; never a traceback of the server.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import anyio

from rlm_server import Json
from rlm_server.engine.broker import Tape
from rlm_server.errors import BudgetExceeded, ReplayMiss

log = logging.getLogger(__name__)

DEFAULT_TOOL_TIMEOUT_S = 60.0
ERROR_MESSAGE_CHARS = 4096  # of a client's error message, as model code sees it


class ToolSpec(NamedTuple):
    """One declared tool: a Python identifier, what it does, and its arguments' JSON Schema."""

    name: str
    description: str
    input_schema: Json

    def to_job(self) -> Json:
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
        }


class ToolFailed(Exception):
    """The client answered a tool call with an error; `message` is its text, for model code."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message[:ERROR_MESSAGE_CHARS]


class ToolHost(Protocol):
    """The front end that declared a request's tools: runs one call in the client."""

    async def call(self, name: str, arguments: Json) -> Any:
        """The client's value, or ToolFailed. Cancelled: the client is told to stop."""
        ...


def _refused(message: str) -> Json:
    return {"error": {"message": message}}


class ToolGate:
    """One request's tool calls: checked, counted, bounded in time, recorded or replayed."""

    def __init__(
        self,
        tools: Sequence[ToolSpec],
        host: ToolHost | None,
        timeout_s: float,
        max_calls: int | None,
        record: Tape | None = None,
        replay: Tape | None = None,
    ) -> None:
        self._tools = {tool.name: tool for tool in tools}
        self._host = host
        self._timeout_s = timeout_s
        self._max_calls = max_calls
        self._record, self._replay = record, replay
        self._validators: dict[str, Any] = {}
        self.calls = 0

    async def call(self, name: str, arguments: Json) -> Json:
        """Answer one tool call frame from the worker."""
        tool = self._tools.get(name)
        if tool is None:
            return _refused(f"no tool named {name[:200]!r} is declared for this request")
        problem = self._invalid(tool, arguments)
        if problem is not None:
            return _refused(f"the arguments of {name} do not match its input schema: {problem}")
        self.calls += 1
        if self._max_calls is not None and self.calls > self._max_calls:
            raise BudgetExceeded(limit="max_tool_calls", max=self._max_calls, scope="request")
        request = {"tool": name, "arguments": arguments}
        if self._replay is not None:
            return await self._played(request)
        if self._host is None:
            return _refused("this client cannot run host tools")
        reply = await self._asked(self._host, name, arguments)
        if reply is None:
            return _refused(f"{name} timed out after {self._timeout_s:g} s (tool_timeout_s)")
        if self._record is not None:
            await self._record.record(Tape.key(request), request, reply)
        return reply

    def _invalid(self, tool: ToolSpec, arguments: Json) -> str | None:
        """The first way `arguments` break the tool's schema, or None."""
        validator = self._validators.get(tool.name)
        if validator is None:
            import jsonschema  # only for a request that calls a tool

            validator = jsonschema.Draft202012Validator(tool.input_schema)
            self._validators[tool.name] = validator
        try:
            error = next(iter(validator.iter_errors(arguments)), None)
        except RecursionError:
            return "(the arguments): nested too deeply to check"
        if error is None:
            return None
        where = "/".join(str(part) for part in error.absolute_path) or "(the arguments)"
        return f"{where}: {str(error.message)[:500]}"

    async def _asked(self, host: ToolHost, name: str, arguments: Json) -> Json | None:
        """The client's answer as a reply frame; None when it did not come in time."""
        with anyio.move_on_after(self._timeout_s):
            try:
                return {"value": await host.call(name, arguments)}
            except ToolFailed as failed:
                return {"error": {"message": failed.message}}
        return None

    async def _played(self, request: Json) -> Json:
        """The recorded answer; a miss ends the request, as a model call's does."""
        assert self._replay is not None
        key = Tape.key(request)
        answer = await self._replay.play(key)
        if answer is None:
            log.warning("--replay: nothing recorded for tool call %s", key)
            raise ReplayMiss(retryable=False, attempts=1, hash=key)
        return answer
