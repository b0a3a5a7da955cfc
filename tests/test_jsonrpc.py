"""JSON-RPC 2.0 conformance beyond the shared transcripts: what only bytes can express
(invalid UTF-8, huge lines, 64-bit ids), framing edge cases, and concurrency inside a batch."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from conftest import Spawn
from harness import answer_with

from rlm_server.frontends.jsonrpc.dispatch import Dispatcher


async def dispatch_all(dispatcher: Dispatcher, message: Any) -> list[Any]:
    """Everything the dispatcher answers to one message, its tasks run to the end."""
    sent: list[Any] = []
    async with anyio.create_task_group() as group:
        dispatcher.dispatch(message, lambda request_id: None, group.start_soon, sent.append)
    return [response for response in sent if response is not None]


def _error(response: object, code: int, kind: str) -> None:
    assert isinstance(response, dict), response
    assert response["error"]["code"] == code, response
    assert response["error"]["data"]["type"] == kind, response


def test_bytes_that_are_not_json(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    for raw in (b'{"jsonrpc": "2.0", "id": 1, "method": "st\xffatus"}', b"[" * 2000, b"\x00\x01"):
        server.send_raw(raw + b"\n")
        response = server.next_response()
        _error(response, -32700, "parse_error")
        assert response["id"] is None
    for value in (1, "text", True, None):
        server.send(value)
        _error(server.next_response(), -32600, "invalid_request")
    assert server.call("status")["result"]["server"] == "rlm-server"
    assert server.close() == 0


def test_ids_round_trip_exactly(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    for request_id in (0, -1, 2**63 - 1, "", "ä-ß-🙂", "x" * 1000):
        assert server.call("status", request_id=request_id)["id"] == request_id
    server.send_raw(b'{"jsonrpc": "2.0", "id": 18446744073709551617, "method": "status"}\n')
    _error(server.next_response(), -32600, "invalid_request")  # above 64 bits: not an id we keep
    # the same where a lone surrogate has the line read by the second parser, which once kept
    # the integer whole, answered with it, and the encoder's refusal stopped the server
    server.send_raw(
        b'{"jsonrpc":"2.0","id":18446744073709551617,"method":"status","u":"\\ud800"}\n'
    )
    response = server.next_response()
    _error(response, -32600, "invalid_request")
    assert response["id"] is None
    server.send_raw(b'{"jsonrpc":"2.0","id":7,"u":"\\ud800","n":1' + b"0" * 400 + b"}\n")
    _error(server.next_response(), -32700, "parse_error")  # as orjson: beyond a double's range
    assert server.call("status", request_id="alive")["id"] == "alive"
    for bad in (True, [1], {"a": 1}):
        server.send({"jsonrpc": "2.0", "id": bad, "method": "status"})
        response = server.next_response()
        _error(response, -32600, "invalid_request")
        assert response["id"] is None
    assert server.close() == 0


def test_params_null_is_no_params_and_blank_lines_are_skipped(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    server.send_raw(b"\n   \n\r\n")
    server.send({"jsonrpc": "2.0", "id": 1, "method": "status", "params": None})
    assert server.next_response()["result"]["server"] == "rlm-server"
    assert server.close() == 0


def test_final_line_without_newline_is_served_before_exit(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    server.send_raw(b'{"jsonrpc": "2.0", "id": 7, "method": "status"}')
    assert server.close() == 0
    assert server.next_response()["id"] == 7


def test_line_over_the_limit_is_refused_and_the_next_line_is_served(spawn: Spawn) -> None:
    server = spawn(args=["--max-message-bytes", "100000"])
    server.ready()
    big = orjson.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "infer", "params": {"prompt": "x" * 500_000}}
    )
    follow = orjson.dumps({"jsonrpc": "2.0", "id": 2, "method": "status"})
    server.send_raw(big + b"\n" + follow + b"\n")
    answers = server.responses_by_id(2)  # `status` may overtake the error: it is answered on read
    response = answers[1]  # the id stood first on the line, so the caller hears it
    _error(response, -32600, "line_too_long")
    assert response["error"]["data"]["limit"] == 100_000
    assert "result" in answers[2]
    id_last = {"jsonrpc": "2.0", "method": "infer", "params": {"prompt": "x" * 500_000}, "id": 4}
    server.send(id_last)
    response = server.next_response()
    _error(response, -32600, "line_too_long")
    assert response["id"] is None  # the id was not among the bytes the server keeps
    just_under = {"jsonrpc": "2.0", "id": 3, "method": "status", "params": {"pad": "y" * 90_000}}
    server.send(just_under)
    _error(server.next_response(), -32602, "invalid_params")  # read whole, then judged
    assert server.close() == 0


def test_a_200_mb_prompt_line(spawn: Spawn) -> None:
    needle = "NEEDLE-7Q2"
    context = "a" * 100_000_000 + needle + "b" * 100_000_000
    server = spawn([{"when": "root", "reply": answer_with("str(context.find('NEEDLE'))")}])
    server.ready()
    result = server.call("infer", {"prompt": context, "query": "where is the needle?"})["result"]
    assert result["text"] == "100000000"
    assert server.close() == 0


def test_batch_elements_run_concurrently() -> None:
    """Each element waits for the other: a dispatcher that ran them in turn would hang."""
    from jsonrpcserver import Success
    from jsonrpcserver.result import Result

    first, second = anyio.Event(), anyio.Event()

    async def ping(ctx: object) -> Result:
        first.set()
        await second.wait()
        return Success("ping")

    async def pong(ctx: object) -> Result:
        await first.wait()
        second.set()
        return Success("pong")

    async def main() -> list[Any]:
        dispatcher = Dispatcher({}, {"ping": ping, "pong": pong})
        batch = [{"jsonrpc": "2.0", "id": i, "method": m} for i, m in ((1, "ping"), (2, "pong"))]
        with anyio.fail_after(5):
            return await dispatch_all(dispatcher, batch)

    [response] = anyio.run(main)
    assert [r["result"] for r in response] == ["ping", "pong"]


@pytest.mark.parametrize("text", ["lone \ud800 surrogate", "fine"])
def test_encode_never_fails_on_strings(text: str) -> None:
    from rlm_server.frontends.wire import encode

    assert orjson.loads(encode({"text": text}))["text"].startswith(text[:4])


def test_internal_errors_carry_no_exception_text() -> None:
    async def broken(ctx: object) -> None:
        raise RuntimeError("secret internal detail")

    def broken_inline(ctx: object) -> dict[str, Any]:
        raise KeyError("another secret")

    async def main() -> list[Any]:
        dispatcher = Dispatcher({"b": broken_inline}, {"broken": broken})
        return await dispatch_all(
            dispatcher,
            [
                {"jsonrpc": "2.0", "id": 1, "method": "broken"},
                {"jsonrpc": "2.0", "id": 2, "method": "b"},
            ],
        )

    [responses] = anyio.run(main)
    assert b"secret" not in orjson.dumps(responses)
    assert [r["error"]["code"] for r in responses] == [-32603, -32603]


def test_an_escaped_lone_surrogate_is_served_not_refused(spawn: Spawn) -> None:
    server = spawn([{"when": "root", "reply": answer_with("context")}])
    server.ready()
    server.send_raw(
        b'{"jsonrpc":"2.0","id":"s","method":"infer","params":{"prompt":"a\\ud800b"}}\n'
    )
    assert server.next_response()["result"]["text"] == "a\ufffdb"
    assert server.close() == 0
