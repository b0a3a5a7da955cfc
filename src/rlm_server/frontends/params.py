"""Validation into the engine's types, shared by the front ends: each names a bad field as its
own wire spells it (`field`, `prefix`), so no front end renames another's errors.

Unknown names are refused rather than ignored (by the caller that knows which names exist), so a
client that sends `maxDepth` learns at once that nothing read it. Integers must be JSON
integers: `2.0` and `true` are refused. `null` means the same as leaving a value out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from rlm_server import Json
from rlm_server.config import BACKENDS
from rlm_server.engine.api import SUBCALL_ERRORS, InferOptions, Prompt
from rlm_server.engine.broker import budget_from
from rlm_server.errors import InvalidParams

MISSING: Any = object()  # a param that was not given (unlike one given as null)


def given(value: Any) -> bool:
    """Whether an optional param was given: absent and `null` both mean no."""
    return value is not MISSING and value is not None


def refuse_unknown(unknown: Mapping[str, Any], prefix: str = "") -> None:
    for name in unknown:
        raise InvalidParams(prefix + name, "unknown parameter")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def string(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidParams(field, "must be a string")
    return value


@dataclass(frozen=True)
class Rule:
    check: Callable[[Any], bool]
    expect: str

    def apply(self, field: str, value: Any) -> Any:
        """`value` if it passes, else InvalidParams naming `field`."""
        if not self.check(value):
            raise InvalidParams(field, f"must be {self.expect}")
        return value


def _int_between(low: int, high: int | None) -> Rule:
    bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
    return Rule(
        lambda v: is_int(v) and v >= low and (high is None or v <= high), f"an integer {bound}"
    )


_NON_EMPTY = Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
_SECONDS = Rule(lambda v: is_number(v) and v > 0, "a number of seconds above 0")
BOOL = Rule(lambda v: isinstance(v, bool), "true or false")

# InferOptions' fields, as the engine takes them.
OPTION_RULES: Mapping[str, Rule] = {
    "backend": Rule(lambda v: v in BACKENDS, "one of " + ", ".join(BACKENDS)),
    "model": _NON_EMPTY,
    "sub_model": _NON_EMPTY,
    "base_url": _NON_EMPTY,
    "max_iterations": _int_between(1, 1000),
    "max_depth": _int_between(1, 10),
    "timeout_s": _SECONDS,
    "temperature": Rule(lambda v: is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
    "max_tokens": _int_between(1, None),
    "trajectory": BOOL,
    "budget": Rule(lambda v: isinstance(v, dict), "an object"),
    "subcall_errors": Rule(lambda v: v in SUBCALL_ERRORS, "one of fail, model"),
    "tool_timeout_s": _SECONDS,
    "answer_schema": Rule(lambda v: isinstance(v, dict), "a JSON Schema object"),
    "answer_repairs": _int_between(0, 100),
}

BUDGET_RULES: Mapping[str, Rule] = {
    "max_calls": _int_between(1, None),
    "max_input_tokens": _int_between(1, None),
    "max_output_tokens": _int_between(1, None),
    "max_cost_usd": Rule(lambda v: is_number(v) and v > 0, "a number of US dollars above 0"),
    "max_tool_calls": _int_between(1, None),
}


def checked(raw: Any, rules: Mapping[str, Rule], prefix: str) -> Json:
    """The members of an options object that are set, each checked against its rule."""
    if not isinstance(raw, dict):
        raise InvalidParams(prefix.rstrip("."), "must be an object")
    refuse_unknown({k: v for k, v in raw.items() if k not in rules}, prefix)
    return {k: rules[k].apply(prefix + k, v) for k, v in raw.items() if v is not None}


def infer_options(options: Json, prefix: str) -> InferOptions:
    """InferOptions from checked options (`checked` with OPTION_RULES); the budget's members
    and the answer's schema are checked here, named under `prefix`."""
    if "budget" in options:
        budget = checked(options["budget"], BUDGET_RULES, prefix + "budget.")
        options = {**options, "budget": budget_from(budget)}
    if "answer_schema" in options:
        check_schema(prefix + "answer_schema", options["answer_schema"])
    elif "answer_repairs" in options:
        raise InvalidParams(prefix + "answer_repairs", f"only with {prefix}answer_schema")
    return InferOptions(**options)


SCHEMA_BYTES = 64 * 1024  # the largest answer or tool input schema, as compact JSON
SCHEMA_ERROR_CHARS = 300  # of the validator's words on a schema that is not one


def check_schema(field: str, schema: Json) -> None:
    """A schema of a request (an answer schema, a tool's input schema) must be a draft 2020-12
    JSON Schema of at most 64 KiB: refused here, before any model call, rather than failing in
    the worker. jsonschema is imported on the first schema: the server's start never needs it."""
    try:
        size = len(orjson.dumps(schema))
    except orjson.JSONEncodeError:  # a 65-bit integer (surrogate path), or over 254 levels deep
        raise InvalidParams(field, "holds a number out of range or is nested too deeply") from None
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


def _messages(field: str, raw: list[Any]) -> list[dict[str, str]]:
    if not raw:
        raise InvalidParams(field, "must not be empty")
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise InvalidParams(f"{field}.{index}", "must be an object with role and content")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InvalidParams(f"{field}.{index}.{key}", "must be a string")
    return raw


def prompt(prompt: Any, messages: Any) -> Prompt:
    """`prompt` (a string or messages) or its alias `messages`: the long input."""
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
            return _messages("prompt", prompt)
        raise InvalidParams("prompt", "must be a string or a list of messages")
    if not isinstance(messages, list):
        raise InvalidParams("messages", "must be a list of messages")
    return _messages("messages", messages)
