"""--log-dir: one JSONL file per request, in the `rlm` library's own logger format.

So the library's visualizer opens it, and so does `rlm-server view`. Line 1 is the library's
`metadata` entry (with our `query` and `request_id` added), then one `iteration` entry per
iteration, built from the bounded trajectory (strings cut to 4096 characters, no REPL variables,
never the context; our `tool_calls` added: each host tool call's name, sizes and time, never
its arguments or value), then our `result` line: the answer or the error, usage and metadata.
The steps come from a worker, which runs model code: every field is read defensively.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import orjson

if TYPE_CHECKING:
    from pathlib import Path

Json = dict[str, Any]


@dataclass(frozen=True)
class Entry:
    """What the log of one request is made from."""

    request_id: str | int | None
    query: str | None
    rlm_kwargs: Json  # what the worker was told (model names and loop settings only)
    steps: list[Json]


def _now() -> str:
    return datetime.datetime.now().isoformat()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _list(value: Any) -> list[Json]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _sub_call(call: Json) -> Json:
    model = _text(call.get("model")) or "unknown"
    return {
        "root_model": model,
        "prompt": _text(call.get("prompt")),
        "response": _text(call.get("response")),
        "usage_summary": {
            "model_usage_summaries": {
                model: {
                    "total_calls": 1,
                    "total_input_tokens": _count(call.get("input_tokens")),
                    "total_output_tokens": _count(call.get("output_tokens")),
                    "total_cost": None,
                }
            }
        },
        "execution_time": _number(call.get("execution_time_s")),
    }


def _code_block(block: Json) -> Json:
    return {
        "code": _text(block.get("code")),
        "result": {
            "stdout": _text(block.get("stdout")),
            "stderr": _text(block.get("stderr")),
            "locals": {},
            "execution_time": _number(block.get("execution_time_s")),
            "rlm_calls": [_sub_call(call) for call in _list(block.get("sub_calls"))],
            "final_answer": None,
        },
    }


def _tool_call(call: Json) -> Json:
    """A host tool call: its name, sizes and time; the error model code got, if any."""
    error = call.get("error")
    return {
        "name": _text(call.get("name")),
        "arguments_bytes": _count(call.get("arguments_bytes")),
        "result_bytes": _count(call.get("result_bytes")),
        "error": error if isinstance(error, str) else None,
        "time_s": _number(call.get("time_s")),
    }


def iteration_line(number: int, step: Json) -> Json:
    answer = step.get("final_answer")
    return {
        "type": "iteration",
        "iteration": number,
        "timestamp": _now(),
        "prompt": [],
        "response": _text(step.get("response")),
        "code_blocks": [_code_block(block) for block in _list(step.get("code_blocks"))],
        "final_answer": answer if isinstance(answer, str) else None,
        "iteration_time": _number(step.get("iteration_time_s")),
        "tool_calls": [_tool_call(call) for call in _list(step.get("tool_calls"))],
    }


def metadata_line(entry: Entry) -> Json:
    spec = entry.rlm_kwargs
    return {
        "type": "metadata",
        "timestamp": _now(),
        "root_model": spec["backend_kwargs"]["model_name"],
        "max_depth": spec["max_depth"],
        "max_iterations": spec["max_iterations"],
        "backend": spec["backend"],
        "backend_kwargs": dict(spec["backend_kwargs"]),
        "environment_type": spec["environment"],
        "environment_kwargs": {},
        "other_backends": spec.get("other_backends"),
        "query": entry.query,
        "request_id": entry.request_id,
    }


def result_line(ending: Json, usage: Json) -> Json:
    """`ending` is the infer's result, or {"error": <error object>}."""
    error = ending.get("error")
    return {
        "type": "result",
        "timestamp": _now(),
        "outcome": "error" if error is not None else "success",
        "text": ending.get("text"),
        "error": error,
        "usage": ending.get("usage", usage),
        "metadata": ending.get("metadata"),
    }


def lines(entry: Entry, ending: Json, usage: Json) -> bytes:
    entries = [metadata_line(entry)]
    entries += [iteration_line(n, step) for n, step in enumerate(entry.steps, 1)]
    entries.append(result_line(ending, usage))
    return b"".join(orjson.dumps(line, default=str) + b"\n" for line in entries)


async def write(directory: str, entry: Entry, ending: Json, usage: Json) -> Path:
    """Write one request's log (in a thread: the event loop never waits on the disk)."""
    import uuid  # only with --log-dir: not before `ready`
    from pathlib import Path

    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path = Path(directory) / f"rlm_{stamp}_{uuid.uuid4().hex[:8]}.jsonl"
    await anyio.to_thread.run_sync(path.write_bytes, lines(entry, ending, usage))
    return path
