"""Methods: `infer`, `status`, `shutdown`, `$/cancelRequest`, `context/load`, `context/drop`,
`context/list`, `session/open` and `session/close`, as jsonrpcserver methods.

Each is a plain function of (context, **params by name) that validates its params into types and
asks the engine or the server to do the work, and shapes what it gets back into its result:
nothing below this layer knows the wire's shapes. `status` and `context/list` never wait, so they
are plain functions that return their JSON result and that the dispatcher answers inline; the
others return a jsonrpcserver `Success`. `infer` and `shutdown` wait, so they
are coroutines that get a task each; so is `$/cancelRequest`, though it never waits: tasks start
in the order their lines arrived, so a cancel that comes in the same read as its `infer` still
finds it registered, where an inline cancel would overtake it and be lost. Invalid params raise
`InvalidParams` naming the field; unknown params are refused rather than ignored, so a client
that sends `maxDepth` learns at once that nothing read it. The context argument is
positional-only, so no param name on the wire can reach it: `{"ctx": 1}` is an unknown param.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from rlm_server.config import BACKENDS
from rlm_server.engine.broker import budget_from
from rlm_server.engine.engine import SUBCALL_ERRORS, InferOptions, InferRequest
from rlm_server.engine.store import StoredContext
from rlm_server.engine.tools import ToolSpec
from rlm_server.errors import InvalidParams
from rlm_server.frontends.jsonrpc.request import RequestContext

if TYPE_CHECKING:
    from jsonrpcserver.result import Result

Json = dict[str, Any]
MISSING: Any = object()


def _success(result: Any) -> Result:
    """jsonrpcserver's `Success`, imported when a task method first answers, not with this
    module: `status` and the server's start never need jsonrpcserver (see dispatch.py)."""
    from jsonrpcserver import Success

    return Success(result)


# ---------------------------------------------------------------------------------------------
# Params


def _refuse_unknown(unknown: Mapping[str, Any], prefix: str = "") -> None:
    for name in unknown:
        raise InvalidParams(prefix + name, "unknown parameter")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass(frozen=True)
class _OptionRule:
    check: Callable[[Any], bool]
    expect: str


def _int_between(low: int, high: int | None) -> _OptionRule:
    bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
    return _OptionRule(
        lambda v: _is_int(v) and v >= low and (high is None or v <= high), f"an integer {bound}"
    )


_NON_EMPTY = _OptionRule(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
_BOOL = _OptionRule(lambda v: isinstance(v, bool), "true or false")
_SECONDS = _OptionRule(lambda v: _is_number(v) and v > 0, "a number of seconds above 0")

OPTION_RULES: Mapping[str, _OptionRule] = {
    "backend": _OptionRule(lambda v: v in BACKENDS, "one of " + ", ".join(BACKENDS)),
    "model": _NON_EMPTY,
    "sub_model": _NON_EMPTY,
    "base_url": _NON_EMPTY,
    "max_iterations": _int_between(1, 1000),
    "max_depth": _int_between(1, 10),
    "timeout_s": _SECONDS,
    "temperature": _OptionRule(lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
    "max_tokens": _int_between(1, None),
    "progress": _BOOL,
    "trajectory": _BOOL,
    "budget": _OptionRule(lambda v: isinstance(v, dict), "an object"),
    "subcall_errors": _OptionRule(lambda v: v in SUBCALL_ERRORS, "one of fail, model"),
    "tool_timeout_s": _SECONDS,
    "answer_schema": _OptionRule(lambda v: isinstance(v, dict), "a JSON Schema object"),
    "answer_repairs": _int_between(0, 100),
}


BUDGET_RULES: Mapping[str, _OptionRule] = {
    "max_calls": _int_between(1, None),
    "max_input_tokens": _int_between(1, None),
    "max_output_tokens": _int_between(1, None),
    "max_cost_usd": _OptionRule(
        lambda v: _is_number(v) and v > 0, "a number of US dollars above 0"
    ),
    "max_tool_calls": _int_between(1, None),
}


def _checked(raw: Any, rules: Mapping[str, _OptionRule], prefix: str) -> Json:
    """The members of an options object that are set, each checked against its rule."""
    if not isinstance(raw, dict):
        raise InvalidParams(prefix.rstrip("."), "must be an object")
    _refuse_unknown({k: v for k, v in raw.items() if k not in rules}, prefix)
    for name, value in raw.items():
        if value is not None and not rules[name].check(value):
            raise InvalidParams(prefix + name, f"must be {rules[name].expect}")
    return {k: v for k, v in raw.items() if v is not None}


SCHEMA_BYTES = 64 * 1024  # the largest answer or tool input schema, as compact JSON
SCHEMA_ERROR_CHARS = 300  # of the validator's words on a schema that is not one


def check_schema(field: str, schema: Json) -> None:
    """A schema of a request (`options.answer_schema`, a tool's `input_schema`) must be a draft
    2020-12 JSON Schema of at most 64 KiB: refused here, before any model call, rather than
    failing in the worker. jsonschema is imported on the first schema: the server's start never
    needs it."""
    try:
        size = len(orjson.dumps(schema))
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, read by the surrogate path
        raise InvalidParams(field, "holds a number out of range") from None
    if size > SCHEMA_BYTES:
        raise InvalidParams(field, "must be at most 65536 bytes as JSON")
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        reason = f"not a valid JSON Schema (draft 2020-12): {error.message}"
        raise InvalidParams(field, reason[:SCHEMA_ERROR_CHARS]) from None
    except RecursionError:
        raise InvalidParams(field, "nested too deeply to check") from None


def parse_options(raw: Any) -> InferOptions:
    if raw is None:
        return InferOptions()
    options = _checked(raw, OPTION_RULES, "options.")
    if "budget" in options:
        options["budget"] = budget_from(
            _checked(options["budget"], BUDGET_RULES, "options.budget.")
        )
    if "answer_schema" in options:
        check_schema("options.answer_schema", options["answer_schema"])
    elif "answer_repairs" in options:
        raise InvalidParams("options.answer_repairs", "only with options.answer_schema")
    return InferOptions(**options)


def _parse_messages(field: str, raw: list[Any]) -> list[dict[str, str]]:
    if not raw:
        raise InvalidParams(field, "must not be empty")
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise InvalidParams(f"{field}.{index}", "must be an object with role and content")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InvalidParams(f"{field}.{index}.{key}", "must be a string")
    return raw


def parse_context(prompt: Any, messages: Any) -> str | list[dict[str, str]]:
    """`prompt` (string or messages) or its alias `messages`: the long input."""
    if prompt is not MISSING and messages is not MISSING:
        raise InvalidParams("messages", "give prompt or messages, not both")
    if prompt is MISSING and messages is MISSING:
        raise InvalidParams(
            "prompt", "is required (a string, or a list of messages), or give context_id"
        )
    if prompt is not MISSING:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list):
            return _parse_messages("prompt", prompt)
        raise InvalidParams("prompt", "must be a string or a list of messages")
    if not isinstance(messages, list):
        raise InvalidParams("messages", "must be a list of messages")
    return _parse_messages("messages", messages)


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
    _refuse_unknown({k: v for k, v in raw.items() if k not in TOOL_FIELDS}, field + ".")
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


# ---------------------------------------------------------------------------------------------
# Methods


def _given(value: Any) -> bool:
    """Whether an optional param was given: absent and `null` both mean no."""
    return value is not MISSING and value is not None


def _string(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidParams(field, "must be a string")
    return value


def parse_infer(
    prompt: Any,
    messages: Any,
    context_id: Any,
    session_id: Any,
    query: Any,
    options: Any,
    tools: Any = None,
) -> InferRequest:
    """Exactly one long input: `prompt` (or `messages`) or `context_id`; a session's turn
    takes no `context_id` nor `tools` (the session has its own) and its `prompt` is optional."""
    if query is not None and not isinstance(query, str):
        raise InvalidParams("query", "must be a string")
    parsed = parse_options(options)
    given_prompt = prompt is not MISSING or messages is not MISSING
    if _given(session_id):
        if _given(context_id):
            raise InvalidParams("context_id", "not with session_id (a session keeps its own)")
        if tools is not None:
            raise InvalidParams("tools", "not with session_id (declare them on session/open)")
        context = parse_context(prompt, messages) if given_prompt else None
        return InferRequest(context, query, parsed, session_id=_string("session_id", session_id))
    declared = parse_tools(tools)
    if _given(context_id):
        if given_prompt:
            raise InvalidParams("context_id", "give prompt or context_id, not both")
        named = _string("context_id", context_id)
        return InferRequest(None, query, parsed, context_id=named, tools=declared)
    return InferRequest(parse_context(prompt, messages), query, parsed, tools=declared)


async def infer(
    ctx: RequestContext,
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
    _refuse_unknown(unknown)
    request = parse_infer(prompt, messages, context_id, session_id, query, options, tools)
    session = ctx.session

    def progress(params: Json) -> None:
        if ctx.request_id is not None:  # progress names its request; a null id names none
            session.notify("$/progress", params)

    host = session.tool_host(ctx.request_id)
    result = await session.engine.infer(request, ctx.request_id, progress, ctx.sequence, host)
    return _success(result)


def status(ctx: RequestContext, /, **unknown: Any) -> Json:
    _refuse_unknown(unknown)
    return ctx.session.engine.status()


async def shutdown(ctx: RequestContext, /, grace_s: Any = None, **unknown: Any) -> Result:
    _refuse_unknown(unknown)
    if grace_s is not None and not (_is_number(grace_s) and grace_s >= 0):
        raise InvalidParams("grace_s", "must be a number of seconds, 0 or more")
    await ctx.session.shutdown(grace_s, ctx.sequence)
    return _success({"shutdown": True})


async def cancel_request(ctx: RequestContext, /, id: Any = MISSING, **unknown: Any) -> Result:
    """A notification: answers nothing itself; the cancelled request answers -32800."""
    _refuse_unknown(unknown)
    if id is MISSING or not (isinstance(id, str) or _is_int(id)):
        raise InvalidParams("id", "must be the id of a request")
    ctx.session.cancel(id)
    return _success(None)


# ---------------------------------------------------------------------------------------------
# Stored contexts and sessions

LOAD_KINDS = ("text", "messages", "chunk")


def _loaded(entry: StoredContext) -> Json:
    return {
        "context_id": entry.id,
        "bytes": entry.size,
        "sha256": entry.sha256,
        "sealed": entry.sealed,
    }


async def context_load(
    ctx: RequestContext,
    /,
    text: Any = MISSING,
    messages: Any = MISSING,
    chunk: Any = MISSING,
    context_id: Any = MISSING,
    final: Any = MISSING,
    **unknown: Any,
) -> Result:
    """One of: a whole text, a whole list (messages or documents), or one chunk of a text."""
    _refuse_unknown(unknown)
    values = (text, messages, chunk)
    given = [name for name, value in zip(LOAD_KINDS, values, strict=True) if _given(value)]
    if not given:
        raise InvalidParams("text", "give one of text, messages or chunk")
    if len(given) > 1:
        raise InvalidParams(given[1], "give only one of text, messages or chunk")
    store = ctx.session.engine.contexts
    if given[0] == "chunk":
        named = _string("context_id", context_id) if _given(context_id) else None
        if _given(final) and not isinstance(final, bool):
            raise InvalidParams("final", "must be true or false")
        entry = await store.append(named, _string("chunk", chunk), final is True)
        return _success(_loaded(entry))
    for name, value in (("context_id", context_id), ("final", final)):
        if _given(value):
            raise InvalidParams(name, "only with chunk")
    if given[0] == "text":
        entry = await store.load_text(_string("text", text))
    elif isinstance(messages, list):
        entry = await store.load_json(messages)
    else:
        raise InvalidParams("messages", "must be an array")
    return _success(_loaded(entry))


async def context_drop(ctx: RequestContext, /, context_id: Any = MISSING, **unknown: Any) -> Result:
    _refuse_unknown(unknown)
    if not _given(context_id):
        raise InvalidParams("context_id", "is required")
    dropped = await ctx.session.engine.contexts.drop(_string("context_id", context_id))
    return _success({"dropped": dropped})


def context_list(ctx: RequestContext, /, **unknown: Any) -> Json:
    _refuse_unknown(unknown)
    store = ctx.session.engine.contexts
    contexts = [
        {
            "id": entry.id,
            "bytes": entry.size,
            "sha256": entry.sha256,
            "uses": entry.uses,
            "last_used_ms": entry.last_used_ms,
        }
        for entry in store.sealed()
    ]
    return {
        "contexts": contexts,
        "bytes_total": store.bytes_total,
        "bytes_limit": store.limit_bytes,
    }


async def session_open(
    ctx: RequestContext, /, context_id: Any = MISSING, tools: Any = None, **unknown: Any
) -> Result:
    _refuse_unknown(unknown)
    named = _string("context_id", context_id) if _given(context_id) else None
    declared = parse_tools(tools)
    ctx.session.engine.check_tools(declared)
    session = ctx.session.engine.sessions.open(named, declared)
    return _success({"session_id": session.id})


async def session_close(
    ctx: RequestContext, /, session_id: Any = MISSING, **unknown: Any
) -> Result:
    _refuse_unknown(unknown)
    if not _given(session_id):
        raise InvalidParams("session_id", "is required")
    closed = await ctx.session.engine.sessions.close(_string("session_id", session_id))
    return _success({"closed": closed})


INLINE_METHODS: Mapping[str, Callable[..., Json]] = {
    "status": status,
    "context/list": context_list,
}
# Sent as a notification, an infer would run a paid completion nobody can receive or cancel, and
# a load or an open would make something that only its answer names.
REQUEST_ONLY_METHODS = frozenset({"infer", "context/load", "session/open"})
# Read counters only: the input thread answers them (context/list walks the store: the loop's).
ANY_THREAD_METHODS = frozenset({"status"})
TASK_METHODS: Mapping[str, Callable[..., Awaitable[Result]]] = {
    "infer": infer,
    "shutdown": shutdown,
    "$/cancelRequest": cancel_request,
    "context/load": context_load,
    "context/drop": context_drop,
    "session/open": session_open,
    "session/close": session_close,
}
