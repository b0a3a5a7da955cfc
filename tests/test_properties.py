"""Property-based: whatever lines arrive, every request with an id gets exactly one answer.

Hypothesis drives one real server (framing, dispatch, methods, engine and workers, with the
scripted model answering at once) with arbitrary JSON values in every member, malformed bytes,
blank lines, batches, notifications and cancels. The harness validates every line the server
writes against protocol/schema.json; here we check that no exception escapes (the server keeps
answering), and that each valid id is answered once and only once.
"""

from __future__ import annotations

import itertools
import json
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
        "id": json_values | st.integers(min_value=0, max_value=2**40) | st.text(max_size=8),
        "method": st.sampled_from(METHODS) | json_values,
        "params": params,
    },
)

line = st.one_of(
    request.map(_dumps),
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
    fresh: int | str = next(_ids) if isinstance(value, int) else f"p{next(_ids)}"
    expected.add(fresh)
    message = {**message, "id": fresh}
    if message.get("method") == "shutdown":
        message["method"] = "status"  # one server serves every example
    return message


def _prepare(raw: bytes, expected: set[Any]) -> bytes:
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    if isinstance(message, list) and not message:
        return raw
    return _dumps(_unique_ids(message, expected))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    llm = FixtureServer(rules=[{"when": "root", "reply": answer_with("context[:4]")}])
    llm.start_in_thread()
    process = ServerProcess(fixture_env(llm.base_url, ELIZA_RLM_TIMEOUT="20"))
    process.ready()
    yield process
    assert process.close() == 0
    llm.shutdown()
    llm.server_close()


def _answered_ids(message: Any) -> list[Any]:
    messages = message if isinstance(message, list) else [message]
    return [m["id"] for m in messages if "method" not in m and m.get("id") is not None]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=st.lists(line, min_size=1, max_size=8))
def test_every_id_is_answered_exactly_once(server: ServerProcess, lines: list[bytes]) -> None:
    expected: set[Any] = set()
    payload = b"".join(_prepare(raw, expected) + b"\n" for raw in lines)
    sentinel = f"s{next(_ids)}"
    expected.add(sentinel)
    server.send_raw(payload + orjson.dumps({"jsonrpc": "2.0", "id": sentinel, "method": "status"}))
    server.send_raw(b"\n")
    seen: list[Any] = []
    while not expected <= set(seen):
        seen += _answered_ids(server.next_message(timeout=60))
    assert len(seen) == len(set(seen)), f"an id answered twice: {seen}"
    assert set(seen) <= expected, f"answers for ids never sent: {set(seen) - expected}"
    assert not server.violations, server.violations
