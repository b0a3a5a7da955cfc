"""Methods: `infer`, `status`, `shutdown`, `$/cancelRequest`, `context/load`, `context/drop`,
`context/list`, `session/open` and `session/close`, as jsonrpcserver methods.

Each is a plain function of (call, **params by name) that validates its params into the engine's
types (params.py), asks the engine or the front end to do the work, and shapes what it gets
back into its result: nothing below the front ends knows the wire's shapes. `status` and
`context/list` never wait, so they are plain functions that return their JSON result and that
the dispatcher answers inline; the others return a jsonrpcserver `Success`. `infer` and
`shutdown` wait, so they are coroutines that get a task each; so is `$/cancelRequest`, though
it never waits: tasks start in the order their lines arrived, so a cancel that comes in the
same read as its `infer` still finds it registered, where an inline cancel would overtake it.
Invalid params raise `InvalidParams` naming the field; unknown params are refused rather than
ignored, so a client that sends `maxDepth` learns at once that nothing read it. The call
argument is positional-only, so no param name on the wire can reach it: `{"ctx": 1}` is an
unknown param.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from rlm_server import Json
from rlm_server.engine.api import InferOptions, InferRequest, InferResult, StoredContextInfo
from rlm_server.engine.tools import ToolSpec
from rlm_server.errors import InvalidParams
from rlm_server.frontends.params import (
    BOOL,
    MISSING,
    OPTION_RULES,
    check_schema,
    checked,
    given,
    infer_options,
    is_int,
    is_number,
    prompt,
    refuse_unknown,
    string,
)

if TYPE_CHECKING:
    from jsonrpcserver.result import Result

    from rlm_server.frontends.jsonrpc.frontend import Call


def _success(result: Any) -> Result:
    """jsonrpcserver's `Success`, imported when a task method first answers, not with this
    module: `status` and the server's start never need jsonrpcserver (see dispatch.py)."""
    from jsonrpcserver import Success

    return Success(result)


# ---------------------------------------------------------------------------------------------
# infer

RULES = {**OPTION_RULES, "progress": BOOL}  # progress is this protocol's, not the engine's


def parse_options(raw: Any) -> tuple[InferOptions, bool]:
    """`options`: what the engine takes, and whether to send `$/progress`."""
    if raw is None:
        return InferOptions(), False
    options = checked(raw, RULES, "options.")
    progress = options.pop("progress", False)
    return infer_options(options, "options."), progress


# Names model code already has in the REPL (the library's, and ToolError), and Python's keywords.
RESERVED_TOOL_NAMES = frozenset(
    {
        "llm_query",
        "llm_query_batched",
        "rlm_query",
        "rlm_query_batched",
        "SHOW_VARS",
        "FINAL",
        "FINAL_VAR",
        "answer",
        "context",
        "history",
        "ToolError",
    }
)
MAX_TOOLS = 64
TOOL_FIELDS = ("name", "description", "input_schema")
TOOL_NAME_CHARS = 64
TOOL_DESCRIPTION_CHARS = 4096


def _tool_name(field: str, name: Any) -> str:
    import keyword

    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise InvalidParams(field, "must be a Python identifier")
    if len(name) > TOOL_NAME_CHARS or name in RESERVED_TOOL_NAMES or name.startswith("_"):
        raise InvalidParams(field, "is reserved or too long (a name the REPL has already)")
    return name


def _tool(field: str, raw: Any) -> ToolSpec:
    if not isinstance(raw, dict):
        raise InvalidParams(field, "must be an object with name, description and input_schema")
    refuse_unknown({k: v for k, v in raw.items() if k not in TOOL_FIELDS}, field + ".")
    name = _tool_name(f"{field}.name", raw.get("name"))
    description = raw.get("description")
    if not isinstance(description, str) or len(description) > TOOL_DESCRIPTION_CHARS:
        raise InvalidParams(f"{field}.description", "must be a string of at most 4096 characters")
    schema = raw.get("input_schema")
    if not isinstance(schema, dict):
        raise InvalidParams(f"{field}.input_schema", "must be a JSON Schema object")
    check_schema(f"{field}.input_schema", schema)
    return ToolSpec(name, description, schema)


def parse_tools(raw: Any) -> tuple[ToolSpec, ...]:
    """`tools`: host tools model code may call, each a Python function of keyword arguments."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise InvalidParams("tools", f"must be an array of at most {MAX_TOOLS} tools")
    tools = tuple(_tool(f"tools.{index}", tool) for index, tool in enumerate(raw))
    names = [tool.name for tool in tools]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise InvalidParams(f"tools.{index}.name", "is declared twice")
    return tools


def parse_infer(
    prompt_: Any,
    messages: Any,
    context_id: Any,
    session_id: Any,
    query: Any,
    options: Any,
    tools: Any = None,
) -> tuple[InferRequest, bool]:
    """Exactly one long input: `prompt` (or `messages`) or `context_id`; a session's turn
    takes no `context_id` nor `tools` (the session has its own) and its `prompt` is optional."""
    if query is not None and not isinstance(query, str):
        raise InvalidParams("query", "must be a string")
    parsed, progress = parse_options(options)
    given_prompt = prompt_ is not MISSING or messages is not MISSING
    if given(session_id):
        if given(context_id):
            raise InvalidParams("context_id", "not with session_id (a session keeps its own)")
        if tools is not None:
            raise InvalidParams("tools", "not with session_id (declare them on session/open)")
        context = prompt(prompt_, messages) if given_prompt else None
        session = string("session_id", session_id)
        return InferRequest(context, query, parsed, session_id=session), progress
    declared = parse_tools(tools)
    if given(context_id):
        if given_prompt:
            raise InvalidParams("context_id", "give prompt or context_id, not both")
        stored = string("context_id", context_id)
        return InferRequest(None, query, parsed, context_id=stored, tools=declared), progress
    return InferRequest(prompt(prompt_, messages), query, parsed, tools=declared), progress


async def infer(
    call: Call,
    /,
    prompt: Any = MISSING,
    messages: Any = MISSING,
    context_id: Any = MISSING,
    session_id: Any = MISSING,
    query: Any = None,
    options: Any = None,
    tools: Any = None,
    **unknown: Any,
) -> Result:
    refuse_unknown(unknown)
    request, progress = parse_infer(prompt, messages, context_id, session_id, query, options, tools)
    request = request._replace(label=None if call.id is None else str(call.id))
    return _success(_result(await call.frontend.infer(call, request, progress)))


def _result(outcome: InferResult) -> Json:
    encoded: Json = {"text": outcome.text}
    if outcome.answer is not None:
        encoded["value"] = outcome.answer.value
    encoded |= {
        "stub": outcome.stub,
        "usage": outcome.usage,
        "metadata": outcome.metadata._asdict(),
    }
    if outcome.trajectory is not None:
        encoded["trajectory"] = outcome.trajectory
    return encoded


def status(call: Call, /, **unknown: Any) -> Json:
    refuse_unknown(unknown)
    now = call.engine.status()
    return {
        **({} if now.executor is None else {"executor": now.executor}),
        **now.configuration,
        "in_flight": now.in_flight,
        "queued": now.queued,
        "uptime_s": now.uptime_s,
        "metrics": now.metrics,
        "contexts": {"count": now.stored_contexts, "bytes": now.stored_bytes},
        "sessions": {"count": now.sessions},
    }


async def shutdown(call: Call, /, grace_s: Any = None, **unknown: Any) -> Result:
    refuse_unknown(unknown)
    if grace_s is not None and not (is_number(grace_s) and grace_s >= 0):
        raise InvalidParams("grace_s", "must be a number of seconds, 0 or more")
    await call.frontend.shutdown(grace_s, call.ticket)
    return _success({"shutdown": True})


async def cancel_request(call: Call, /, id: Any = MISSING, **unknown: Any) -> Result:
    """A notification: answers nothing itself; the cancelled request answers -32800."""
    refuse_unknown(unknown)
    if id is MISSING or not (isinstance(id, str) or is_int(id)):
        raise InvalidParams("id", "must be the id of a request")
    call.frontend.cancel(id)
    return _success(None)


# ---------------------------------------------------------------------------------------------
# Stored contexts and sessions

LOAD_KINDS = ("text", "messages", "chunk")


def _loaded(entry: StoredContextInfo) -> Json:
    return {
        "context_id": entry.id,
        "bytes": entry.bytes,
        "sha256": entry.sha256,
        "sealed": entry.sealed,
    }


async def context_load(
    call: Call,
    /,
    text: Any = MISSING,
    messages: Any = MISSING,
    chunk: Any = MISSING,
    context_id: Any = MISSING,
    final: Any = MISSING,
    **unknown: Any,
) -> Result:
    """One of: a whole text, a whole list (messages or documents), or one chunk of a text."""
    refuse_unknown(unknown)
    values = (text, messages, chunk)
    kinds = [name for name, value in zip(LOAD_KINDS, values, strict=True) if given(value)]
    if not kinds:
        raise InvalidParams("text", "give one of text, messages or chunk")
    if len(kinds) > 1:
        raise InvalidParams(kinds[1], "give only one of text, messages or chunk")
    engine = call.engine
    if kinds[0] == "chunk":
        named = string("context_id", context_id) if given(context_id) else None
        if given(final) and not isinstance(final, bool):
            raise InvalidParams("final", "must be true or false")
        entry = await engine.load_chunk(named, string("chunk", chunk), final is True)
        return _success(_loaded(entry))
    for name, value in (("context_id", context_id), ("final", final)):
        if given(value):
            raise InvalidParams(name, "only with chunk")
    if kinds[0] == "text":
        entry = await engine.load_text(string("text", text))
    elif isinstance(messages, list):
        entry = await engine.load_list(messages)
    else:
        raise InvalidParams("messages", "must be an array")
    return _success(_loaded(entry))


async def context_drop(call: Call, /, context_id: Any = MISSING, **unknown: Any) -> Result:
    refuse_unknown(unknown)
    if not given(context_id):
        raise InvalidParams("context_id", "is required")
    dropped = await call.engine.drop_context(string("context_id", context_id))
    return _success({"dropped": dropped})


def context_list(call: Call, /, **unknown: Any) -> Json:
    refuse_unknown(unknown)
    report = call.engine.stored_contexts()
    contexts = [
        {
            "id": entry.id,
            "bytes": entry.bytes,
            "sha256": entry.sha256,
            "uses": entry.uses,
            "last_used_ms": entry.last_used_ms,
        }
        for entry in report.contexts
    ]
    return {
        "contexts": contexts,
        "bytes_total": report.bytes_total,
        "bytes_limit": report.bytes_limit,
    }


async def session_open(
    call: Call, /, context_id: Any = MISSING, tools: Any = None, **unknown: Any
) -> Result:
    refuse_unknown(unknown)
    named = string("context_id", context_id) if given(context_id) else None
    return _success({"session_id": call.engine.open_session(named, parse_tools(tools))})


async def session_close(call: Call, /, session_id: Any = MISSING, **unknown: Any) -> Result:
    refuse_unknown(unknown)
    if not given(session_id):
        raise InvalidParams("session_id", "is required")
    closed = await call.engine.close_session(string("session_id", session_id))
    return _success({"closed": closed})


INLINE_METHODS: Mapping[str, Callable[..., Json]] = {
    "status": status,
    "context/list": context_list,
}
# Sent as a notification, an infer would run a paid completion nobody can receive or cancel, and
# a load or an open would make something that only its answer names.
REQUEST_ONLY_METHODS = frozenset({"infer", "context/load", "session/open"})
TASK_METHODS: Mapping[str, Callable[..., Awaitable[Result]]] = {
    "infer": infer,
    "shutdown": shutdown,
    "$/cancelRequest": cancel_request,
    "context/load": context_load,
    "context/drop": context_drop,
    "session/open": session_open,
    "session/close": session_close,
}
