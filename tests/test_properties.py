"""Property-based: whatever lines arrive, every request with an id gets exactly one answer.

Hypothesis drives one real server (framing, dispatch, methods, engine and workers, with the
scripted model answering at once) with arbitrary JSON values in every member, malformed bytes,
blank lines, batches, notifications and cancels. The harness validates every line the server
writes against protocol/schema.json; here we check that no exception escapes (the server keeps
answering), and that each valid id is answered once and only once.

Short lines that hold the bytes `status` get a test of their own: a server may read those on a
path of its own (the input thread answers `status` there), and every JSON type in every member
must reach that path too. A line that kills the server fails its example at once, and the next
example gets a new server, so that Hypothesis shrinks to the line that did it.
"""

from __future__ import annotations

import itertools
import json
import queue
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fixtures.openai_fixture import FixtureServer
from harness import ServerProcess, answer_with, fixture_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _dumps(value: Any) -> bytes:
    """Compact JSON that, unlike orjson, writes integers beyond 64 bits (and escapes lone
    surrogates), as other clients may."""
    return json.dumps(value, separators=(",", ":")).encode()


def _with_lone_surrogate(message: Any) -> Any:
    """An escaped lone surrogate (as JavaScript writes one) sends the line to the server's
    second parser, which must read everything else as the first one does."""
    if isinstance(message, dict):
        return {**message, "u": "\ud800"}
    return message


METHODS = ["infer", "status", "$/cancelRequest", "nonsense", "", "shutdown "]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

# Integers just past what an id may be (64 bits, signed or not).
beyond_64_bits = st.sampled_from([2**64, -(2**63) - 1, 2**70])

options = st.dictionaries(
    st.sampled_from(["max_iterations", "timeout_s", "progress", "trajectory", "model", "x"]),
    json_values | st.just(True) | st.just(2),
    max_size=3,
)

params = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=30)},
        optional={"query": json_values | st.text(max_size=10), "options": options},
    ),
    st.fixed_dictionaries({"id": json_values}),
)

request = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0"]) | json_values},
    optional={
        "id": json_values
        | st.integers(min_value=0, max_value=2**40)
        | st.text(max_size=8)
        | beyond_64_bits,
        "method": st.sampled_from(METHODS) | json_values,
        "params": params,
    },
)

STATUS_LINE_BYTES = 1024  # "short": the most a line can be for the server's status path

member = json_values | st.just("status") | beyond_64_bits  # any JSON value, or the word


@st.composite
def status_request(draw: st.DrawFn) -> dict[str, Any]:
    """A request object with any JSON value (or none) in each member and `status` somewhere."""
    message = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "jsonrpc": st.just("2.0") | member,
                "id": member,
                "method": member,
                "params": member | st.fixed_dictionaries({"prompt": st.just("status")}),
            },
        )
    )
    if b"status" not in _dumps(message):
        message["note"] = "status"  # other members are ignored, so it changes no answer
    return message


status_line = st.one_of(
    status_request().map(_dumps),
    status_request().map(_with_lone_surrogate).map(_dumps),
    st.lists(status_request(), min_size=1, max_size=4).map(_dumps),
).filter(lambda raw: len(raw) <= STATUS_LINE_BYTES)

line = st.one_of(
    status_line,
    request.map(_dumps),
    request.map(_with_lone_surrogate).map(_dumps),
    st.lists(request, max_size=4).map(_dumps),
    st.binary(max_size=40).map(lambda raw: raw.replace(b"\n", b" ")),
    st.sampled_from([b"", b"   ", b"[]", b"[[]]", b"{", b"null", b"[1,2,3]", b'"\\ud800"']),
)

_ids = itertools.count(1)


def _unique_ids(message: Any, expected: set[Any]) -> Any:
    """Give every valid id a value never used before (of the same type), and record it."""
    if isinstance(message, list):
        return [_unique_ids(element, expected) for element in message]
    if not isinstance(message, dict) or "id" not in message:
        return message
    value = message["id"]
    if isinstance(value, bool) or not isinstance(value, int | str):
        return message
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return message  # orjson reads it as a float: an invalid id
    fresh: int | str = next(_ids) if isinstance(value, int) else f"{next(_ids)}status"
    expected.add(fresh)
    message = {**message, "id": fresh}
    if message.get("method") == "shutdown":
        message["method"] = "status"  # one server serves every example
    return message


def _prepare(raw: bytes, expected: set[Any]) -> bytes:
    try:
        message = json.loads(raw)  # lone surrogates and integers beyond 64 bits as written
    except ValueError:
        return raw
    if isinstance(message, list) and not message:
        return raw
    return _dumps(_unique_ids(message, expected))


class Servers:
    """One server for every example while it lives; a new one after an example killed it."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.current = self._start()

    def _start(self) -> ServerProcess:
        process = ServerProcess(self._env)
        process.ready()
        return process

    def live(self) -> ServerProcess:
        if self.current.process.poll() is not None:
            self.current.kill()
            self.current = self._start()
        return self.current


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    llm = FixtureServer(rules=[{"when": "root", "reply": answer_with("context[:4]")}])
    llm.start_in_thread()
    held = Servers(fixture_env(llm.base_url, ELIZA_RLM_TIMEOUT="20"))
    yield held
    assert held.current.close() == 0
    llm.shutdown()
    llm.server_close()


def _answered_ids(message: Any) -> list[Any]:
    messages = message if isinstance(message, list) else [message]
    return [m["id"] for m in messages if "method" not in m and m.get("id") is not None]


def _next_while_alive(server: ServerProcess, timeout: float = 30) -> Any:
    """The server's next message; fails at once when the server has exited instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return server.messages.get(timeout=0.2)
        except queue.Empty:
            code = server.process.poll()
            assert code is None, f"the server exited ({code}); stderr: {server.stderr_lines[-5:]}"
    raise AssertionError(f"no message within {timeout}s; stderr: {server.stderr_lines[-5:]}")


def _check_every_id_answered_once(server: ServerProcess, lines: list[bytes]) -> None:
    expected: set[Any] = set()
    payload = b"".join(_prepare(raw, expected) + b"\n" for raw in lines)
    sentinel = f"s{next(_ids)}"
    expected.add(sentinel)
    server.send_raw(payload + orjson.dumps({"jsonrpc": "2.0", "id": sentinel, "method": "status"}))
    server.send_raw(b"\n")
    seen: list[Any] = []
    while not expected <= set(seen):
        seen += _answered_ids(_next_while_alive(server))
    assert len(seen) == len(set(seen)), f"an id answered twice: {seen}"
    assert set(seen) <= expected, f"answers for ids never sent: {set(seen) - expected}"
    assert not server.violations, server.violations


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(lines=st.lists(line, min_size=1, max_size=8))
def test_every_id_is_answered_exactly_once(servers: Servers, lines: list[bytes]) -> None:
    _check_every_id_answered_once(servers.live(), lines)


@SETTINGS
@given(lines=st.lists(status_line, min_size=1, max_size=8))
def test_short_lines_holding_status_of_any_shape(servers: Servers, lines: list[bytes]) -> None:
    _check_every_id_answered_once(servers.live(), lines)
