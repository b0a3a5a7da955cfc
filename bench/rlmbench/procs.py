"""Processes under test: rlm-server, the plugin's server, the C echo; the fixture; memory.

Every server is driven through raw pipes with `os.write`/`os.read` (no buffering layer, no
threads on the round-trip path), so the client's own cost is the same small constant for all
three and cancels out in "overhead above the floor".
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
TMP = BENCH / "results" / "tmp"
KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")
READ_CHUNK = 1 << 20  # what one read of a server's output may take

Json = dict[str, Any]


def repl_reply(*lines: str) -> str:
    """A root-model reply that runs these lines in the REPL."""
    return "```repl\n" + "\n".join(lines) + "\n```"


INSTANT_OK = repl_reply("answer['content'] = 'ok'", "answer['ready'] = True")


# ---------------------------------------------------------------------------------------------
# The fixture (the model)


class Fixture:
    """tests/fixtures/openai_fixture.py as a process; rules are swapped over HTTP."""

    def __init__(self) -> None:
        TMP.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fixtures" / "openai_fixture.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(TMP / "fixture.stderr", "ab"),  # noqa: SIM115
        )
        assert self.process.stdout is not None
        info = json.loads(self.process.stdout.readline())
        self.base_url: str = info["base_url"]
        self.port: int = info["port"]

    def _post(self, path: str, body: Json) -> Json:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def rules(self, rules: list[Json]) -> None:
        self._post("/_fixture/rules", {"rules": rules})

    def stats(self) -> Json:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/_fixture/stats", timeout=30
        ) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def release(self) -> None:
        """Let every held call go."""
        self._post("/_fixture/release", {})

    def instant(self) -> None:
        self.rules([{"when": "root", "reply": INSTANT_OK}, {"when": "sub", "reply": "ok"}])

    def delayed(self, delay_ms: int) -> None:
        self.rules(
            [
                {"when": "root", "reply": INSTANT_OK, "delay_ms": delay_ms},
                {"when": "sub", "reply": "ok", "delay_ms": delay_ms},
            ]
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def model_env(base_url: str) -> dict[str, str]:
    """The same model configuration for ours, the plugin and the library."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("ELIZA_RLM_") and k not in KEY_VARS
    }
    env.update(
        {
            "ELIZA_RLM_BACKEND": "openai",
            "ELIZA_RLM_BASE_URL": base_url,
            "ELIZA_RLM_MODEL": "scripted",
            "OPENAI_API_KEY": "test-key",
        }
    )
    return env


# ---------------------------------------------------------------------------------------------
# A line channel over raw pipes


class Timeout(Exception):
    pass


class Channel:
    """A child process, spoken to in lines over its stdin/stdout pipes."""

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        stderr_name: str,
        cwd: Path = BENCH,
        cpus: set[int] | None = None,
    ) -> None:
        TMP.mkdir(parents=True, exist_ok=True)
        self._stderr = open(TMP / f"{stderr_name}.stderr", "ab")  # noqa: SIM115
        self.spawned_at = time.perf_counter()
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=dict(env),
            cwd=cwd,
            bufsize=0,
            # pinned before exec, so that everything it starts (zygote, workers) is pinned too
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.wfd = self.process.stdin.fileno()
        self.rfd = self.process.stdout.fileno()
        self._buffer = bytearray()
        self._scanned = 0
        self._chunk = memoryview(bytearray(READ_CHUNK))  # reused: see _fill

    @property
    def pid(self) -> int:
        return self.process.pid

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.wfd, view)
            view = view[written:]

    def _fill(self, deadline: float | None) -> None:
        if deadline is not None:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not select.select([self.rfd], [], [], remaining)[0]:
                raise Timeout(f"no output from pid {self.pid} in time")
        # Into one reused buffer: `os.read(fd, 1 MiB)` allocates (and unmaps) a megabyte per
        # call, which cost this client about 10 µs a round trip and put that into the floor.
        read = os.readv(self.rfd, [self._chunk])
        if not read:
            raise EOFError(f"pid {self.pid} closed its stdout (exit {self.process.poll()})")
        self._buffer += self._chunk[:read]

    def readline(self, timeout: float | None = None) -> bytes:
        """The next line, without its newline."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            index = self._buffer.find(b"\n", self._scanned)
            if index >= 0:
                line = bytes(self._buffer[:index])
                del self._buffer[: index + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buffer)
            self._fill(deadline)

    def read_message(self, timeout: float | None = 60) -> Any:
        return orjson.loads(self.readline(timeout))

    def count_lines(self, count: int, timeout: float) -> bytes:
        """Read `count` lines as fast as possible; return the last one."""
        deadline = time.perf_counter() + timeout
        seen = self._buffer.count(b"\n")
        while seen < count:
            before = len(self._buffer)
            self._fill(deadline)
            seen += self._buffer.count(b"\n", before)
        lines = bytes(self._buffer).split(b"\n")
        last = lines[count - 1]
        self._buffer = bytearray(b"\n".join(lines[count:]))
        self._scanned = 0
        return last

    def close(self, timeout: float = 30) -> int | None:
        """End stdin and wait for exit (kill after `timeout`)."""
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        with contextlib.suppress(OSError):
            assert self.process.stdout is not None
            self.process.stdout.close()
        self._stderr.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.close(timeout=5)


# ---------------------------------------------------------------------------------------------
# The three servers: how to start them, and how to speak to each


@dataclass
class Target:
    """One server under test and its dialect."""

    name: str  # "ours", "plugin", "echo"
    argv: list[str]
    jsonrpc: bool  # JSON-RPC 2.0 (ours) or the plugin's {"id","method","params"}
    ready: Callable[[Any], bool] | None  # recognises its ready line; None: it has none
    env: dict[str, str] = field(default_factory=dict)
    label: str = ""

    def spawn(
        self,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cpus: set[int] | None = None,
    ) -> Channel:
        return Channel([*self.argv, *extra_args], env or self.env, self.name, cpus=cpus)

    def request(self, request_id: int, method: str, params: Json | None = None) -> bytes:
        message: Json = {"id": request_id, "method": method}
        if self.jsonrpc:
            message = {"jsonrpc": "2.0", **message}
        if params is not None:
            message["params"] = params
        return orjson.dumps(message) + b"\n"

    def wait_ready(self, channel: Channel, timeout: float = 60) -> float:
        """Seconds from spawn to the ready line (0 for a target without one)."""
        if self.ready is None:
            return 0.0
        while True:
            message = channel.read_message(timeout)
            if self.ready(message):
                return time.perf_counter() - channel.spawned_at

    def call(
        self,
        channel: Channel,
        request_id: int,
        method: str,
        params: Json | None = None,
        timeout: float = 120,
    ) -> Json:
        """Send one request, return its response (notifications are skipped)."""
        channel.write(self.request(request_id, method, params))
        return self.response(channel, request_id, timeout)

    def response(self, channel: Channel, request_id: int, timeout: float = 120) -> Json:
        while True:
            message = channel.read_message(timeout)
            if isinstance(message, dict) and message.get("id") == request_id:
                return message

    def infer_params(self, prompt: str, query: str | None = None) -> Json:
        params: Json = {"prompt": prompt}
        if query is not None and self.jsonrpc:
            params["query"] = query  # the plugin has no separate question
        return params

    @staticmethod
    def succeeded(response: Json) -> bool:
        result = response.get("result")
        if not isinstance(result, dict):
            return False
        return "error" not in response and not (result.get("metadata") or {}).get("error")


def targets(ours_cmd: list[str], plugin_python: str, echo: str, base_url: str) -> dict[str, Target]:
    env = model_env(base_url)
    return {
        "ours": Target(
            "ours",
            ours_cmd,
            jsonrpc=True,
            ready=lambda m: isinstance(m, dict) and m.get("method") == "ready",
            env=env,
            label="rlm-server",
        ),
        "plugin": Target(
            "plugin",
            [plugin_python, str(BENCH / "plugin_server.py")],
            jsonrpc=False,
            ready=lambda m: isinstance(m, dict) and m.get("ready") is True,
            env=env,
            label="plugin server",
        ),
        "echo": Target("echo", [echo], jsonrpc=True, ready=None, env=env, label="C echo"),
    }


# ---------------------------------------------------------------------------------------------
# Memory: the resident set of a process and all its descendants


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
    return found


def tree(pid: int) -> list[int]:
    pids, pending = [pid], [pid]
    while pending:
        for child in children(pending.pop()):
            pids.append(child)
            pending.append(child)
    return pids


def status_kib(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ns(pid: int) -> int:
    """CPU time the process has run, all threads, in ns (/proc/<pid>/task/*/schedstat).

    Unlike wall time this hardly moves with the machine's load, so it is reported beside the
    round-trip figures as the server's own cost per request.
    """
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, ValueError),
                open(f"/proc/{pid}/task/{task}/schedstat") as f,
            ):
                total += int(f.read().split()[0])
    return total


def tree_rss_kib(pid: int) -> int:
    return sum(status_kib(p, "VmRSS") for p in tree(pid))


class RssSampler:
    """Samples the summed VmRSS of a process tree every `period_s`; keeps the peak of the sum,
    and the peaks of the root process alone and of its descendants together (for diagnosis)."""

    def __init__(self, pid: int, period_s: float = 0.01) -> None:
        self._pid, self._period = pid, period_s
        self.peak_kib = 0
        self.peak_root_kib = 0
        self.peak_children_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        root = status_kib(self._pid, "VmRSS")
        below = sum(status_kib(p, "VmRSS") for p in tree(self._pid)[1:])
        self.peak_kib = max(self.peak_kib, root + below)
        self.peak_root_kib = max(self.peak_root_kib, root)
        self.peak_children_kib = max(self.peak_children_kib, below)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def pss_kib(pid: int) -> int:
    """Proportional set size (/proc/<pid>/smaps_rollup): each page shared with other processes
    counts its share, so copy-on-write pages shared by a tree count once in its sum."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_kib(pid: int) -> int:
    return sum(pss_kib(p) for p in tree(pid))


class PssSampler(RssSampler):
    """The same, with PSS: what the tree really occupies when its processes share pages (the
    zygote and the workers it forks share a stored context)."""

    def sample(self) -> None:
        root = pss_kib(self._pid)
        below = sum(pss_kib(p) for p in tree(self._pid)[1:])
        self.peak_kib = max(self.peak_kib, root + below)
        self.peak_root_kib = max(self.peak_root_kib, root)
        self.peak_children_kib = max(self.peak_children_kib, below)
        self.samples += 1


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run this process (the client) on `cpus` for a while; None leaves it as it is."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def spawned(
    target: Target,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cpus: set[int] | None = None,
) -> Iterator[Channel]:
    channel = target.spawn(list(extra_args), env, cpus)
    try:
        yield channel
    finally:
        if channel.process.poll() is None:
            channel.close()
