"""Drive a real `rlm-server` process from tests.

Every line the server writes is parsed and validated against protocol/schema.json as it is read;
a line that is not valid protocol is recorded and fails the test at `close()`. stderr is
collected so that tests can show it and assert on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import orjson

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "protocol" / "schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")

Json = dict[str, Any]


def server_command() -> list[str]:
    """The console script, as a user runs it (falls back to -m when it is not on PATH)."""
    script = shutil.which("rlm-server")
    return [script] if script else [sys.executable, "-m", "rlm_server"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("ELIZA_RLM_") and k not in KEY_VARS
    }
    env.update(extra or {})
    return env


def fixture_env(base_url: str, **extra: str) -> dict[str, str]:
    """Environment that points the server at the scripted fixture, with fast retries."""
    return {
        "ELIZA_RLM_BACKEND": "openai",
        "ELIZA_RLM_BASE_URL": base_url,
        "ELIZA_RLM_MODEL": "scripted",
        "OPENAI_API_KEY": "test-key",
        "ELIZA_RLM_RETRY_DELAY": "10",
        "ELIZA_RLM_RETRY_MAX_DELAY": "50",
        **extra,
    }


class ServerProcess:
    def __init__(
        self, env: Mapping[str, str], args: Sequence[str] = (), new_session: bool = False
    ) -> None:
        self.process = subprocess.Popen(
            [*server_command(), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(env),
            start_new_session=new_session,  # a process group of its own, to signal as a terminal
        )
        self.messages: queue.Queue[Json | list[Json]] = queue.Queue()
        self.violations: list[str] = []
        self.stderr_lines: list[str] = []
        self.notifications: list[Json] = []
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- reading ------------------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                message = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self.violations.append(f"not JSON: {raw[:200]!r}")
                continue
            errors = sorted(VALIDATOR.iter_errors(message), key=lambda e: e.path)
            if errors:
                self.violations.append(f"schema: {errors[0].message[:300]} in {raw[:300]!r}")
            self.messages.put(message)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.stderr_lines.append(raw.decode(errors="replace").rstrip("\n"))

    def next_message(self, timeout: float = 30) -> Json | list[Json]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no message within {timeout}s; stderr tail: {self.stderr_lines[-20:]}"
            ) from None

    def next_response(self, timeout: float = 30) -> Json:
        """The next message that is not a notification (notifications are kept)."""
        while True:
            message = self.next_message(timeout)
            assert isinstance(message, dict), f"expected one response, got {message}"
            if "method" in message:
                self.notifications.append(message)
                continue
            return message

    def ready(self, timeout: float = 30) -> Json:
        message = self.next_message(timeout)
        assert isinstance(message, dict) and message.get("method") == "ready", message
        return message["params"]  # type: ignore[no-any-return]

    # -- writing ------------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send(self, message: Any) -> None:
        self.send_raw(orjson.dumps(message) + b"\n")

    def request(self, request_id: Any, method: str, params: Json | None = None) -> None:
        message: Json = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)

    def call(self, method: str, params: Json | None = None, request_id: Any = "call") -> Json:
        """Send one request and return its response (others must not be pending)."""
        self.request(request_id, method, params)
        response = self.next_response()
        assert response.get("id") == request_id, response
        return response

    def responses_by_id(self, count: int, timeout: float = 60) -> dict[Any, Json]:
        found: dict[Any, Json] = {}
        while len(found) < count:
            response = self.next_response(timeout)
            found[response["id"]] = response
        return found

    # -- ending -------------------------------------------------------------------------------

    def close(self, timeout: float = 30) -> int:
        """End stdin, wait for exit, and fail on any protocol violation seen."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for thread in self._threads:
                thread.join(timeout=5)
        assert not self.violations, self.violations
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_until(predicate: Any, timeout: float = 10, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (children lists are per thread)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def alive(pids: Iterable[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def cmdline_of(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def zygote_of(server_pid: int) -> int:
    """The server's zygote: its child (holders, keepers and workers share its command line)."""
    found = [
        pid
        for pid in alive(descendants(server_pid))
        if b"zygote" in cmdline_of(pid) and parent_of(pid) == server_pid
    ]
    assert len(found) == 1, found
    return found[0]


def repl(*lines: str) -> str:
    """A root-model reply that runs these lines in the REPL."""
    return "```repl\n" + "\n".join(lines) + "\n```"


def answer_with(expression: str) -> str:
    """A root-model reply that sets the final answer to a Python expression."""
    return repl(f"answer['content'] = {expression}", "answer['ready'] = True")
