"""The soak: a long hostile session against one server, then a check that nothing leaked.

`bench/run --only soak` (not part of the default run, and not of CI's): 20,000 fuzzed lines
(arbitrary JSON in every member, malformed bytes, batches, cancels), then 300 infers against the
scripted model with a third of them cancelled and workers SIGKILLed from outside. Most fuzzed
lines are short and hold the bytes `status`, so that they take the server's status path (the
input thread reads such lines itself) with any JSON value in any member; a `status` after the
fuzz must still be answered. Every id must be answered exactly once; afterwards the server's
process count, open descriptors, temporary directories and RSS are compared with what they were
after warm-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from rlmbench.procs import Channel, Fixture, Json, Target, children, repl_reply, status_kib, tree

FUZZ_LINES = 20_000
STATUS_PATH_BYTES = 1024  # lines this short holding `status` take the server's status path
INFERS = 300
SEED = 20261130


def _value(rng: random.Random, depth: int = 0) -> Any:
    """An arbitrary JSON value (integers beyond 64 bits included)."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randrange(-(2**70), 2**70)
    if kind == 3:
        return rng.uniform(-1e9, 1e9)
    if kind in (4, 5):
        if rng.random() < 0.2:
            return "status"
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{rng.randrange(5)}": _value(rng, depth + 1) for _ in range(rng.randrange(4))}


class _Fuzzer:
    """Lines of every kind; valid ids are unique and remembered as owed an answer."""

    METHODS = ("infer", "status", "$/cancelRequest", "nonsense", "")

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.owed: set[Any] = set()
        self._next = 0

    def _id(self) -> Any:
        """A fresh valid id (owed an answer), or now and then one JSON-RPC does not allow
        (answered with a null id, so repeats cannot look like double answers)."""
        if self.rng.random() < 0.2:
            return self.rng.choice([1.5, [], {}, True, 2**70, None])
        self._next += 1
        fresh: Any = self._next if self.rng.random() < 0.5 else f"f{self._next}"
        self.owed.add(fresh)
        return fresh

    def _request(self) -> Json:
        rng = self.rng
        message: Json = {"jsonrpc": "2.0" if rng.random() < 0.8 else _value(rng)}
        if rng.random() < 0.7:
            message["id"] = self._id()
        method = rng.choice(self.METHODS) if rng.random() < 0.85 else _value(rng)
        message["method"] = method
        if rng.random() < 0.8:
            message["params"] = self._params(method)
        if rng.random() < 0.6:
            message["note"] = "status"  # an ignored member: the line takes the status path
        return message

    def _params(self, method: Any) -> Any:
        rng = self.rng
        if method == "infer" and rng.random() < 0.5:
            params: Json = {"prompt": "fuzz " * rng.randrange(1, 20)}
            if rng.random() < 0.3:
                params["options"] = {"max_iterations": rng.choice([1, 2, 0, "x", None])}
            return params
        if method == "$/cancelRequest":
            return {"id": rng.randrange(self._next + 1)}
        return _value(rng)

    def line(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            return _dumps(self._request())
        if roll < 0.75:
            return _dumps([self._request() for _ in range(rng.randrange(5))])
        if roll < 0.9:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(40))).replace(b"\n", b" ")
        return rng.choice([b"", b"  ", b"[]", b"{", b"null", b"[1,2]", b'"\\ud800"'])


def _dumps(value: Any) -> bytes:
    """Compact JSON that, unlike orjson, writes integers beyond 64 bits."""
    return json.dumps(value, separators=(",", ":")).encode()


def _answered(message: Any) -> list[Any]:
    messages = message if isinstance(message, list) else [message]
    return [m.get("id") for m in messages if isinstance(m, dict) and "method" not in m]


def _footprint(pid: int, tmpdir: Path) -> Json:
    return {
        "processes": len(tree(pid)),
        "open_fds": len(os.listdir(f"/proc/{pid}/fd")),
        "temp_entries": sum(1 for _ in tmpdir.rglob("*")),
        "rss_mib": round(status_kib(pid, "VmRSS") / 1024, 1),
    }


def _drain(channel: Channel, owed: set[Any], seen: Counter[Any], timeout: float) -> None:
    """Read until every owed id has been answered."""
    while not owed <= set(seen):
        for request_id in _answered(channel.read_message(timeout)):
            seen[request_id] += 1


def _fuzz(channel: Channel, seen: Counter[Any]) -> Json:
    fuzzer = _Fuzzer(SEED)
    started = time.perf_counter()
    batch: list[bytes] = []
    status_path = 0
    for index in range(FUZZ_LINES):
        line = fuzzer.line()
        if len(line) <= STATUS_PATH_BYTES and b"status" in line:
            status_path += 1
        batch.append(line)
        if len(batch) == 200 or index == FUZZ_LINES - 1:
            channel.write(b"\n".join(batch) + b"\n")
            batch = []
            _drain(channel, fuzzer.owed, seen, timeout=120)
    elapsed = time.perf_counter() - started
    channel.write(b'{"jsonrpc":"2.0","id":"after-fuzz","method":"status"}\n')
    _drain(channel, {"after-fuzz"}, seen, timeout=30)  # alive and serving: raises if not
    return {
        "lines": FUZZ_LINES,
        "status_path_lines": status_path,
        "ids_owed": len(fuzzer.owed),
        "alive_after": True,
        "s": elapsed,
    }


def _infers(target: Target, channel: Channel, fixture: Fixture, seen: Counter[Any]) -> Json:
    """300 infers, a wave of 30 at a time: a third cancelled, some workers killed from outside."""
    slow_ok = repl_reply(
        "import time", "time.sleep(0.2)", "answer['content'] = 'ok'", "answer['ready'] = True"
    )
    fixture.rules([{"when": "root", "reply": slow_ok}])
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    killed = 0
    for wave in range(INFERS // WAVE):
        ids = [f"i{wave}-{n}" for n in range(WAVE)]
        channel.write(b"".join(_infer_line(i) for i in ids))
        cancelled = rng.sample(ids, 10)
        time.sleep(rng.uniform(0.0, 0.15))
        cancels = [
            {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": i}} for i in cancelled
        ]
        channel.write(b"".join(orjson.dumps(c) + b"\n" for c in cancels))
        killed += _kill_some_workers(channel.pid, rng)
        owed = set(ids)
        while not owed <= set(seen):
            message = channel.read_message(120)
            for request_id in _answered(message):
                seen[request_id] += 1
                if request_id in owed:
                    outcomes[_outcome(message)] += 1
    return {"infers": INFERS, "outcomes": dict(outcomes), "workers_killed": killed}


WAVE = 30


def _warm_up(channel: Channel, seen: Counter[Any]) -> None:
    """One wave as wide as the soak's: the server keeps the connections to the model that a
    wave opens (an HTTP keep-alive pool, bounded), and they are not a leak."""
    ids = [f"warm-{n}" for n in range(WAVE)]
    channel.write(b"".join(_infer_line(i) for i in ids))
    owed = set(ids)
    while not owed <= set(seen):
        for request_id in _answered(channel.read_message(120)):
            seen[request_id] += 1


def _infer_line(request_id: str) -> bytes:
    params = {"prompt": "soak"}
    message = {"jsonrpc": "2.0", "id": request_id, "method": "infer", "params": params}
    return orjson.dumps(message) + b"\n"


def _outcome(message: Json) -> str:
    if "result" in message:
        return "ok"
    return str(message.get("error", {}).get("data", {}).get("type", "error"))


def _kill_some_workers(server_pid: int, rng: random.Random) -> int:
    """SIGKILL a few of the server's workers (the zygote's children)."""
    workers = [pid for zygote in children(server_pid) for pid in children(zygote)]
    chosen = rng.sample(workers, min(len(workers), 3))
    for pid in chosen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(chosen)


def run(target: Target, fixture: Fixture) -> Json:
    """The soak figure for one target (ours)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="rlmbench-soak-"))
    channel = target.spawn(env={**target.env, "TMPDIR": str(tmpdir)})
    seen: Counter[Any] = Counter()
    try:
        target.wait_ready(channel)
        fixture.instant()
        _warm_up(channel, seen)  # the broker's HTTP pool at its steady size, as in the soak
        time.sleep(1)
        before = _footprint(channel.pid, tmpdir)
        fuzz = _fuzz(channel, seen)
        infers = _infers(target, channel, fixture, seen)
        time.sleep(2)  # killed workers reaped, their directories removed
        after = _footprint(channel.pid, tmpdir)
        twice = sorted(str(i) for i, n in seen.items() if n > 1 and i is not None)
        code = channel.close(timeout=60)
        return {
            "fuzz": fuzz,
            "infer": infers,
            "answered_twice": twice,
            "before": before,
            "after": after,
            "after_exit_temp_entries": sum(1 for _ in tmpdir.rglob("*")),
            "exit_code": code,
        }
    finally:
        channel.kill()
