"""Replay the shared transcripts of protocol/transcripts (format: protocol/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import ROOT, ServerProcess

TRANSCRIPTS = sorted((ROOT / "protocol" / "transcripts").glob("*.json"))
FIXTURE = ROOT / "tests" / "fixtures" / "openai_fixture.py"
ABSENT = object()

TYPE_MATCHERS: dict[str, Callable[[Any], bool]] = {
    "$any": lambda v: True,
    "$string": lambda v: isinstance(v, str),
    "$number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "$integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "$boolean": lambda v: isinstance(v, bool),
    "$object": lambda v: isinstance(v, dict),
    "$array": lambda v: isinstance(v, list),
    "$null": lambda v: v is None,
}


BIND, REF = "$bind:", "$ref:"


def matches(pattern: Any, value: Any, bound: dict[str, str] | None = None) -> bool:
    """Whether `value` matches `pattern`; the strings it binds (`$bind:NAME`) are added to
    `bound` only when the whole of it matches."""
    trial = dict(bound or {})
    if not _matches(pattern, value, trial):
        return False
    if bound is not None:
        bound.update(trial)
    return True


def _matches(pattern: Any, value: Any, bound: dict[str, str]) -> bool:
    if pattern == "$absent":
        return value is ABSENT
    if value is ABSENT:
        return False
    if isinstance(pattern, str) and pattern in TYPE_MATCHERS:
        return bool(TYPE_MATCHERS[pattern](value))
    if isinstance(pattern, str) and pattern.startswith(BIND):
        if not isinstance(value, str):
            return False
        bound[pattern[len(BIND) :]] = value
        return True
    if isinstance(pattern, str) and pattern.startswith(REF):
        return bool(value == bound[pattern[len(REF) :]])
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            _matches(p, value.get(k, ABSENT), bound) for k, p in pattern.items()
        )
    if isinstance(pattern, list):
        return (
            isinstance(value, list)
            and len(pattern) == len(value)
            and all(_matches(p, v, bound) for p, v in zip(pattern, value, strict=True))
        )
    if isinstance(pattern, bool) or isinstance(value, bool):
        return pattern is value
    return bool(pattern == value)


def substitute(value: Any, bound: dict[str, str]) -> Any:
    """`value` with every `$ref:NAME` string replaced by the string bound to NAME."""
    if isinstance(value, str) and value.startswith(REF):
        return bound[value[len(REF) :]]
    if isinstance(value, list):
        return [substitute(v, bound) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, bound) for k, v in value.items()}
    return value


def _is_progress(message: Any) -> bool:
    return isinstance(message, dict) and message.get("method") == "$/progress"


def _next(server: ServerProcess, pattern: Any) -> Any:
    while True:
        message = server.next_message(timeout=30)
        if _is_progress(message) and not _is_progress(pattern):
            continue
        return message


def replay(path: Path) -> None:
    transcript = json.loads(path.read_text())
    with tempfile.NamedTemporaryFile("w", suffix=".json") as rules:
        json.dump(transcript.get("fixture", []), rules)
        rules.flush()
        fixture = subprocess.Popen(
            [sys.executable, str(FIXTURE), "--rules", rules.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert fixture.stdout is not None
            base_url = json.loads(fixture.stdout.readline())["base_url"]
            env = {k: v.replace("{base_url}", base_url) for k, v in transcript["env"].items()}
            server = ServerProcess(env, transcript.get("args", []))
            try:
                _run_steps(server, transcript["steps"])
            finally:
                server.kill()
        finally:
            fixture.kill()
            fixture.wait()


def _run_steps(server: ServerProcess, steps: list[dict[str, Any]]) -> None:
    bound: dict[str, str] = {}  # what `$bind:NAME` patterns have matched, for `$ref:NAME`
    for number, step in enumerate(steps):
        where = f"step {number}: {json.dumps(step)[:200]}"
        if "send" in step:
            server.send(substitute(step["send"], bound))
        elif "send_raw" in step:
            server.send_raw(step["send_raw"].encode() + b"\n")
        elif "expect" in step:
            message = _next(server, step["expect"])
            assert matches(step["expect"], message, bound), f"{where}\ngot: {message}"
        elif "expect_set" in step:
            patterns = list(step["expect_set"])
            while patterns:
                message = _next(server, patterns[0])
                hit = next((p for p in patterns if matches(p, message, bound)), None)
                assert hit is not None, f"{where}\ngot: {message}"
                patterns.remove(hit)
        elif "expect_exit" in step:
            assert server.close() == step["expect_exit"], where
        else:
            raise AssertionError(f"unknown step {where}")
