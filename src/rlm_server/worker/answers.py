"""Structured answers (`options.answer_schema`): the check of an answer against its schema.

Used by the worker, which repairs an invalid answer with the model, and by the engine, which
checks the value a worker returns once more: the worker runs model code, and what it sends is
not trusted.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import jsonschema
import orjson

from rlm_server import Json
from rlm_server.worker import frames


class AnswerRefused(Exception):
    """The answer did not match the schema and no repair is left."""

    def __init__(self, validation_error: str) -> None:
        super().__init__(validation_error)
        self.validation_error = validation_error


def _bounded_error(text: str) -> str:
    limit = frames.VALIDATION_ERROR_CHARS
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_value(value: Any) -> Any:
    """A Python value as the JSON value it writes as (tuples as arrays, ...), or TypeError."""
    return orjson.loads(orjson.dumps(value))


def _unfenced(text: str) -> str:
    """A JSON text without the Markdown fence a model may wrap it in."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and "\n" in stripped:
        return stripped[stripped.index("\n") + 1 : -3]
    return stripped


class AnswerCheck:
    """`options.answer_schema` for one completion: what the root model is told, the check of
    each answer it sets, and how many invalid ones it may still repair.

    `answer["content"]` may be a Python value (a dict, a list, a number...) or a JSON text; a
    string that parses as JSON is taken as that JSON first, then as the string itself, so a
    string schema still accepts "42". An answer that does not match is not returned: the model
    sees why in the REPL's output and gets another iteration, `repairs` times at most.
    """

    def __init__(self, schema: Json, repairs: int) -> None:
        self.schema = schema
        self.repairs_left = repairs
        self.value: Any = None  # the valid answer, once there is one
        self._validator = jsonschema.Draft202012Validator(schema)

    def prompt(self) -> str:
        """The system prompt's section on the answer's shape."""
        return (
            "\n\nThe answer must be a JSON value valid against this JSON Schema "
            f"(draft 2020-12):\n{orjson.dumps(self.schema).decode()}\n"
            'Set answer["content"] to that value as a Python value (a dict, list, str, int, '
            'float, bool or None), not its text, then set answer["ready"] = True. It is checked '
            "against the schema then: an answer that does not match is refused, with the "
            "reason, and you get another turn to fix it."
        )

    def error_of(self, value: Any) -> str | None:
        """Why `value` does not match the schema (the validator's most relevant message)."""
        try:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
        except RecursionError:
            return "the answer is nested too deeply to check"
        if error is None:
            return None
        return _bounded_error(f"at {error.json_path}: {error.message}")

    def accept(self, content: Any) -> str | None:
        """Take `content` as the answer if it matches (then None), else say why not."""
        try:
            value = _json_value(content)
        except TypeError as error:  # orjson.JSONEncodeError: a set, a 65-bit int, ...
            return _bounded_error(f'answer["content"] is not a JSON value: {error}')
        candidates = [value]
        if isinstance(value, str):
            with suppress(orjson.JSONDecodeError):
                candidates.insert(0, orjson.loads(_unfenced(value)))
        problems = []
        for candidate in candidates:
            problem = self.error_of(candidate)
            if problem is None:
                self.value = candidate
                return None
            problems.append(problem)
        return problems[0]

    def refuse(self, error: str) -> str:
        """Spend a repair on an invalid answer: what the model is told, or AnswerRefused."""
        if self.repairs_left == 0:
            raise AnswerRefused(error)
        self.repairs_left -= 1
        return (
            f"\nYour answer was refused: it does not match the answer schema ({error}). "
            'Fix it, set answer["content"] again and answer["ready"] = True.'
        )
