"""The tools an MCP host sees (`rlm_ask`, `rlm_load`, `rlm_drop`), the stored contexts as
resources, and what a call does with the engine.

A tool that fails answers a tool error (`isError`) whose text carries the same stable `type`
names and `data` as the JSON-RPC contract (`invalid_params`, `deadline_exceeded`, ...), so a
model can read what went wrong and try again; a fixed message, never exception text. An
unknown tool or resource is a protocol error, as MCP says.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import jsonschema
import mcp_types as types
import orjson
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError

from rlm_server.config import Config
from rlm_server.errors import InternalError, InvalidParams, RpcError, first_of
from rlm_server.frontends.mcp import paths
from rlm_server.frontends.mcp.bridge import Bridge, Json

log = logging.getLogger(__name__)

Context = ServerRequestContext[Any, Any]
RESOURCE_PREFIX = "rlm://context/"
TRAJECTORY_STEPS = 50  # at most this many steps of a trajectory are returned
TRAJECTORY_STRING_CHARS = 2000  # and each string in them cut to this many characters

_SOURCE_HELP = (
    "Give the input in exactly one of `text`, `paths` or `context_id`."
    " `paths` are files, directories (read whole, recursively) or globs (`src/**/*.py`), read by"
    " the server, and only under the directories its operator allowed; binary files and files"
    " past the server's size limit are skipped and listed in `sources.skipped`."
)

ASK_DESCRIPTION = (
    "Answer a question about an input far too long to read yourself: a large file, a whole"
    " directory of code or logs, a long document or transcript (megabytes are fine). The input"
    " is never pasted into a prompt. Instead a language model writes and runs Python code that"
    " searches, slices and reads the input piece by piece, and asks helper models about the"
    " pieces, until it can answer (a Recursive Language Model). Ask one precise question"
    ' ("Which function writes the audit log, and where is it called?"); the answer is text.'
    " It takes seconds to minutes and makes model calls, which cost money. "
    + _SOURCE_HELP
    + " To ask several questions about one input, store it once with `rlm_load` and pass its"
    " `context_id`."
)
LOAD_DESCRIPTION = (
    "Store a long input once, to ask `rlm_ask` many questions about it by `context_id`"
    " without sending or reading it again. Returns the `context_id`, its size in bytes and a"
    " SHA-256 digest. Stored inputs are listed as resources; the server may evict the least"
    " recently used one when its store is full. Give exactly one of `text` or `paths` (files,"
    " directories or globs under the directories the operator allowed)."
)
DROP_DESCRIPTION = (
    "Forget an input stored with `rlm_load`, freeing its space. Questions already running on"
    " it finish first. Returns whether it was stored."
)

_TEXT = {"type": "string", "description": "The long input itself."}
_PATHS = {
    "type": "array",
    "items": {"type": "string", "minLength": 1},
    "minItems": 1,
    "description": "Files, directories or globs to read as the input, joined in order, each"
    " file under a `==> path <==` line.",
}
_CONTEXT_ID = {"type": "string", "minLength": 1, "description": "An input stored by `rlm_load`."}
_SOURCES = {
    "type": "object",
    "description": "The files that were read, and those skipped with the reason.",
    "properties": {
        "files": {"type": "integer"},
        "bytes": {"type": "integer"},
        "skipped_total": {
            "type": "integer",
            "description": "How many were skipped, when more than the list names.",
        },
        "skipped": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "reason": {"type": "string"}},
                "required": ["path", "reason"],
            },
        },
    },
    "required": ["files", "bytes", "skipped"],
}
_USAGE = {
    "type": "object",
    "description": "Model calls of the whole run, sub-calls included.",
    "properties": {
        "calls": {"type": "integer"},
        "input_tokens": {"type": "integer"},
        "output_tokens": {"type": "integer"},
        "cost_usd": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "models": {"type": "object"},
    },
    "required": ["calls", "input_tokens", "output_tokens", "cost_usd"],
}

ASK_INPUT: Json = {
    "type": "object",
    "properties": {
        "question": {"type": "string", "minLength": 1, "description": "What to find out."},
        "text": _TEXT,
        "paths": _PATHS,
        "context_id": _CONTEXT_ID,
        "max_iterations": {
            "type": "integer",
            "minimum": 1,
            "maximum": 1000,
            "description": "At most this many rounds of code (default: the server's).",
        },
        "timeout_s": {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "Give up after this many seconds (default: the server's).",
        },
        "trajectory": {
            "type": "boolean",
            "description": "Also return the code run and its output, step by step (bounded).",
        },
    },
    "required": ["question"],
    "additionalProperties": False,
}
ASK_OUTPUT: Json = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "stub": {
            "type": "boolean",
            "description": "True when the server has no usable model and answered a stub.",
        },
        "iterations": {"type": "integer"},
        "elapsed_ms": {"type": "number"},
        "model": {"type": "string"},
        "backend": {"type": "string"},
        "usage": _USAGE,
        "sources": _SOURCES,
        "trajectory": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["answer", "stub", "iterations", "elapsed_ms", "model", "backend", "usage"],
}
LOAD_INPUT: Json = {
    "type": "object",
    "properties": {"text": _TEXT, "paths": _PATHS},
    "additionalProperties": False,
}
LOAD_OUTPUT: Json = {
    "type": "object",
    "properties": {
        "context_id": {"type": "string"},
        "bytes": {"type": "integer", "description": "Size, in UTF-8 bytes."},
        "sha256": {"type": "string"},
        "sources": _SOURCES,
    },
    "required": ["context_id", "bytes", "sha256"],
}
DROP_INPUT: Json = {
    "type": "object",
    "properties": {"context_id": _CONTEXT_ID},
    "required": ["context_id"],
    "additionalProperties": False,
}
DROP_OUTPUT: Json = {
    "type": "object",
    "properties": {"dropped": {"type": "boolean"}},
    "required": ["dropped"],
}

TOOLS = [
    types.Tool(
        name="rlm_ask",
        title="Ask about a long input",
        description=ASK_DESCRIPTION,
        input_schema=ASK_INPUT,
        output_schema=ASK_OUTPUT,
        annotations=types.ToolAnnotations(
            read_only_hint=True, idempotent_hint=False, open_world_hint=True
        ),
    ),
    types.Tool(
        name="rlm_load",
        title="Store a long input",
        description=LOAD_DESCRIPTION,
        input_schema=LOAD_INPUT,
        output_schema=LOAD_OUTPUT,
        annotations=types.ToolAnnotations(
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=False,
        ),
    ),
    types.Tool(
        name="rlm_drop",
        title="Forget a stored input",
        description=DROP_DESCRIPTION,
        input_schema=DROP_INPUT,
        output_schema=DROP_OUTPUT,
        annotations=types.ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    ),
]
_VALIDATORS = {tool.name: jsonschema.Draft202012Validator(tool.input_schema) for tool in TOOLS}


class Running:
    """How many tool calls are running; `idle` waits until none is."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = anyio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        if self._count == 0:
            self._idle = anyio.Event()
        self._count += 1

    def __exit__(self, *exc: object) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


class Tools:
    """The handlers the SDK's server calls."""

    def __init__(self, bridge: Bridge, config: Config) -> None:
        self.running = Running()
        self._bridge = bridge
        self._config = config
        self._labels: dict[str, str] = {}  # context id: what it was loaded from
        self._handlers: dict[str, Callable[[Context, Json], Coroutine[Any, Any, Json]]] = {
            "rlm_ask": self._ask,
            "rlm_load": self._load,
            "rlm_drop": self._drop,
        }

    # -- tools ------------------------------------------------------------------------------

    async def list_tools(
        self, ctx: Context, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=TOOLS)

    async def call_tool(
        self, ctx: Context, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        handler = self._handlers.get(params.name)
        if handler is None:
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")
        arguments = params.arguments or {}
        try:
            with self.running:
                _validate(params.name, arguments)
                structured = await handler(ctx, arguments)
        except RpcError as error:
            return _tool_error(error)
        except Exception:
            log.exception("tool %s failed", params.name)
            return _tool_error(InternalError())
        text = structured["answer"] if params.name == "rlm_ask" else _json(structured)
        return types.CallToolResult(
            content=[types.TextContent(text=text)], structured_content=structured
        )

    async def _ask(self, ctx: Context, arguments: Json) -> Json:
        text, context_id, sources = await self._source(arguments, allow_context=True)
        if _progress_token(ctx) is None:
            result = await self._bridge.ask(
                arguments["question"], text, context_id, arguments, None
            )
            return _answer(result, sources)
        progress = _Progress(ctx)
        failure: RpcError | None = None
        try:
            async with anyio.create_task_group() as forwarding:
                forwarding.start_soon(progress.forward)
                try:
                    result = await self._bridge.ask(
                        arguments["question"], text, context_id, arguments, progress.event
                    )
                finally:
                    progress.close()
        except* RpcError as failed:  # raised inside the task group
            failure = first_of(failed, RpcError)
        if failure is not None:
            raise failure
        return _answer(result, sources)

    async def _load(self, ctx: Context, arguments: Json) -> Json:
        text, _, sources = await self._source(arguments, allow_context=False)
        assert text is not None
        stored = await self._bridge.load(text)
        label = (
            "text"
            if sources is None
            else f"{len(arguments['paths'])} path(s): " + ", ".join(arguments["paths"])
        )
        self._labels[stored.id] = label[:200]
        loaded: Json = {"context_id": stored.id, "bytes": stored.size, "sha256": stored.sha256}
        if sources is not None:
            loaded["sources"] = sources
        return loaded

    async def _drop(self, ctx: Context, arguments: Json) -> Json:
        self._labels.pop(arguments["context_id"], None)
        return {"dropped": await self._bridge.drop(arguments["context_id"])}

    async def _source(
        self, arguments: Json, allow_context: bool
    ) -> tuple[str | None, str | None, Json | None]:
        """The call's input: its text, or a stored context's id; and the report on the files
        read for it, when it named paths."""
        given = [name for name in ("text", "paths", "context_id") if name in arguments]
        if len(given) != 1:
            names = "`text`, `paths` or `context_id`" if allow_context else "`text` or `paths`"
            field = given[1] if given else "text"
            raise InvalidParams(field, f"give exactly one of {names}")
        if "context_id" in arguments:
            return None, arguments["context_id"], None
        if "text" in arguments:
            return arguments["text"], None, None
        gathered = await anyio.to_thread.run_sync(
            paths.gather,
            arguments["paths"],
            self._config.allow_path,
            self._config.max_read_bytes,
        )
        return gathered.text, None, gathered.report()

    # -- resources: the stored contexts -----------------------------------------------------

    async def list_resources(
        self, ctx: Context, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        resources = [
            types.Resource(
                uri=RESOURCE_PREFIX + stored.id,
                name=stored.id,
                title=self._labels.get(stored.id, "stored input"),
                description="An input stored with rlm_load; ask about it with rlm_ask's"
                " context_id. Reading it gives its size and digest, not its text.",
                mime_type="application/json",
                size=stored.size,
            )
            for stored in self._bridge.stored()
        ]
        return types.ListResourcesResult(resources=resources)

    async def read_resource(
        self, ctx: Context, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        stored = self._bridge.find(uri.removeprefix(RESOURCE_PREFIX))
        if not uri.startswith(RESOURCE_PREFIX) or stored is None:
            raise MCPError(types.INVALID_PARAMS, "Resource not found", {"uri": uri})
        about = {
            "context_id": stored.id,
            "bytes": stored.size,
            "sha256": stored.sha256,
            "loaded_from": self._labels.get(stored.id, "text"),
        }
        contents = types.TextResourceContents(
            uri=uri, mime_type="application/json", text=_json(about)
        )
        return types.ReadResourceResult(contents=[contents])


class _Progress:
    """The engine's events for one call, sent on as MCP progress notifications. The engine
    reports synchronously; the SDK sends asynchronously: a queue in between, emptied before
    the call's result goes out."""

    def __init__(self, ctx: Context) -> None:
        self._session = ctx.session
        self._send, self._receive = anyio.create_memory_object_stream[Json](math.inf)
        self._count = 0

    def event(self, params: Json) -> None:
        self._send.send_nowait(params)

    def close(self) -> None:
        self._send.close()

    async def forward(self) -> None:
        async with self._receive:
            async for params in self._receive:
                self._count += 1
                await self._session.report_progress(self._count, None, _describe(params))


def _describe(params: Json) -> str:
    event = params["event"]
    if event == "iteration":
        return f"iteration {params['iteration']} of {params['max_iterations']}"
    if event == "subcall":
        return f"sub-call to {params.get('message', 'a model')}"
    if event == "retry":
        return f"retrying a model call: {params.get('message', '')}".rstrip(": ")
    return str(event)


def _progress_token(ctx: Context) -> Any:
    return None if ctx.meta is None else ctx.meta.get("progress_token")


def _validate(tool: str, arguments: Json) -> None:
    """Arguments against the tool's input schema; the first error names its field."""
    error = next(iter(sorted(_VALIDATORS[tool].iter_errors(arguments), key=str)), None)
    if error is None:
        return
    field = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(arguments) - set(_VALIDATORS[tool].schema["properties"]))
        raise InvalidParams(extra[0], "unknown argument")
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in arguments]
        raise InvalidParams(missing[0], "required")
    raise InvalidParams(
        field or "arguments", f"must match {error.validator} {error.validator_value!r}"
    )


def _answer(result: Json, sources: Json | None) -> Json:
    metadata = result["metadata"]
    answer: Json = {
        "answer": result["text"],
        "stub": result["stub"],
        "iterations": metadata["iterations"],
        "elapsed_ms": metadata["elapsed_ms"],
        "model": metadata["model"],
        "backend": metadata["backend"],
        "usage": result["usage"],
    }
    if sources is not None:
        answer["sources"] = sources
    if "trajectory" in result:
        answer["trajectory"] = _bounded(result["trajectory"])
    return answer


def _bounded(trajectory: list[Json]) -> list[Json]:
    """The first TRAJECTORY_STEPS steps, each string cut to TRAJECTORY_STRING_CHARS: a host
    puts tool results in a model's context, which must not drown in them."""
    steps = [_cut(step) for step in trajectory[:TRAJECTORY_STEPS]]
    if len(trajectory) > TRAJECTORY_STEPS:
        steps.append({"omitted_steps": len(trajectory) - TRAJECTORY_STEPS})
    return steps


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > TRAJECTORY_STRING_CHARS:
        return value[:TRAJECTORY_STRING_CHARS] + f"… [{len(value) - TRAJECTORY_STRING_CHARS} more]"
    if isinstance(value, dict):
        return {key: _cut(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut(item) for item in value]
    return value


def _tool_error(error: RpcError) -> types.CallToolResult:
    """A failed call as MCP says: a result with isError, for the model to read. One line says
    what failed and its stable type; the next is the JSON-RPC contract's `data` (the type, the
    field, the usage spent so far, ...). No structured content: it would have to match the
    output schema, which describes answers."""
    data = error.data
    line = f"{error.message} ({data['type']})"
    if "field" in data:
        line += f": {data['field']}: {data['reason']}"
    return types.CallToolResult(
        content=[types.TextContent(text=line + "\n" + _json(data))], is_error=True
    )


def _json(value: Json) -> str:
    return orjson.dumps(value).decode()
