"""Trajectories, bounded: the one definition of what a trajectory step may hold and how big.

The worker summarises each iteration with `bounded` as it is logged (completion.py); the server
trims what the worker sent again with `trimmed` before it reaches a log or a result, since model
code runs in the worker and can rewrite its steps (a thousand steps of 300 KB each, fields of its
own). Light on purpose: the server imports it without importing `rlm`.
"""

from __future__ import annotations

from typing import Any

import orjson

from rlm_server import Json

TRAJECTORY_CHARS = 4096  # the longest string in a trajectory
TRAJECTORY_TOTAL_CHARS = 8 << 20  # every string of one request's trajectory together
ITEM_CHARS = 64  # what each step, code block and sub-call costs beside its strings


def bounded(value: Any, limit: int = TRAJECTORY_CHARS) -> str:
    """At most `limit` characters of `value` as text, saying how much was left out."""
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    if len(text) <= limit:
        return text
    marker = f"…[truncated {len(text)} chars]"  # a bound on the count, fixed before cutting
    keep = max(0, limit - len(marker))
    return text[:keep] + f"…[truncated {len(text) - keep} chars]"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _dicts(value: Any) -> list[Json]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


class _Budget:
    """The characters a trajectory may still take; an item that finds none is left out."""

    def __init__(self, chars: int) -> None:
        self.left = chars

    def text(self, value: Any) -> str:
        text = bounded(value if isinstance(value, str) else "", min(TRAJECTORY_CHARS, self.left))
        self.left -= len(text)
        return text

    def items(self, values: Any, shape: Any) -> list[Json]:
        kept = []
        for value in _dicts(values):
            if self.left < ITEM_CHARS:
                break
            self.left -= ITEM_CHARS
            kept.append(shape(value, self))
        return kept


def _sub_call(call: Json, budget: _Budget) -> Json:
    return {
        "model": budget.text(call.get("model")),
        "prompt": budget.text(call.get("prompt")),
        "response": budget.text(call.get("response")),
        "input_tokens": _count(call.get("input_tokens")),
        "output_tokens": _count(call.get("output_tokens")),
        "execution_time_s": seconds(call.get("execution_time_s")),
    }


def _tool_call(call: Json, budget: _Budget) -> Json:
    error = call.get("error")
    return {
        "name": budget.text(call.get("name")),
        "arguments_bytes": _count(call.get("arguments_bytes")),
        "result_bytes": _count(call.get("result_bytes")),
        "error": budget.text(error) if isinstance(error, str) else None,
        "time_s": max(0.0, seconds(call.get("time_s")) or 0.0),
    }


def _code_block(block: Json, budget: _Budget) -> Json:
    return {
        "code": budget.text(block.get("code")),
        "stdout": budget.text(block.get("stdout")),
        "stderr": budget.text(block.get("stderr")),
        "execution_time_s": seconds(block.get("execution_time_s")),
        "sub_calls": budget.items(block.get("sub_calls"), _sub_call),
    }


def _step(step: Json, budget: _Budget) -> Json:
    answer = step.get("final_answer")
    return {
        "iteration": 0,  # numbered by `trimmed`
        "response": budget.text(step.get("response")),
        "code_blocks": budget.items(step.get("code_blocks"), _code_block),
        "final_answer": budget.text(answer) if isinstance(answer, str) else None,
        "iteration_time_s": seconds(step.get("iteration_time_s")),
        "tool_calls": budget.items(step.get("tool_calls"), _tool_call),
    }


def trimmed(steps: Any, max_steps: int) -> list[Json]:
    """What a worker sent as its trajectory, in the documented shape only: at most `max_steps`
    steps numbered from 1, every string at most TRAJECTORY_CHARS, all of them together at most
    TRAJECTORY_TOTAL_CHARS (later items are left out), counts and times checked."""
    budget = _Budget(TRAJECTORY_TOTAL_CHARS)
    kept = budget.items(_dicts(steps)[:max_steps], _step)
    for number, step in enumerate(kept, 1):
        step["iteration"] = number
    return kept
