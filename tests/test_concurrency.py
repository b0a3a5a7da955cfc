"""Many requests in flight at once, observed at the model (no wall-clock assertions)."""

from __future__ import annotations

from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import answer_with, wait_until


def test_sixteen_infers_are_at_the_model_at_once_and_status_overtakes_them(
    spawn: Spawn, llm: FixtureServer
) -> None:
    server = spawn(
        [{"when": "root", "hold": True, "reply": answer_with("context")}],
        args=["--max-concurrency", "16"],
    )
    server.ready()
    for i in range(16):
        server.request(i, "infer", {"prompt": f"request {i}"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 16, timeout=60), llm.script.stats()

    server.request("status", "status")
    status = server.next_response()
    assert status["id"] == "status", "status was answered after an infer"
    assert status["result"]["in_flight"] == 16

    llm.script.released.set()
    responses = server.responses_by_id(16)
    assert {i: r["result"]["text"] for i, r in responses.items()} == {
        i: f"request {i}" for i in range(16)
    }
    assert llm.script.stats()["max_in_flight"] == 16
    assert server.close() == 0


def test_past_max_concurrency_requests_wait_their_turn(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(
        [{"when": "root", "hold": True, "reply": answer_with("context")}],
        args=["--max-concurrency", "2"],
    )
    server.ready()
    for i in range(5):
        server.request(i, "infer", {"prompt": f"r{i}"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 2, timeout=30)
    status = server.call("status")["result"]
    assert (status["in_flight"], status["queued"]) == (2, 3)
    llm.script.released.set()
    assert len(server.responses_by_id(5)) == 5
    assert llm.script.stats()["max_in_flight"] == 2
    assert server.close() == 0


def test_cancelling_one_request_leaves_the_others_alone(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn([{"when": "root", "hold": True, "reply": answer_with("context")}])
    server.ready()
    for name in ("keep-1", "drop", "keep-2"):
        server.request(name, "infer", {"prompt": name})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 3, timeout=30)
    server.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": "drop"}})
    cancelled = server.next_response()
    assert cancelled["id"] == "drop" and cancelled["error"]["code"] == -32800
    llm.script.released.set()
    responses = server.responses_by_id(2)
    assert {k: r["result"]["text"] for k, r in responses.items()} == {
        "keep-1": "keep-1",
        "keep-2": "keep-2",
    }
    assert server.close() == 0


def test_a_cancel_in_the_same_read_as_its_infer_is_not_lost(
    spawn: Spawn, llm: FixtureServer
) -> None:
    server = spawn([{"when": "root", "hold": True, "reply": answer_with("context")}])
    infer = b'{"jsonrpc":"2.0","id":"both","method":"infer","params":{"prompt":"x"}}\n'
    cancel = b'{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":"both"}}\n'
    server.send_raw(infer + cancel)  # before ready, one write: the server reads them together
    server.ready()
    response = server.next_response()
    assert response["id"] == "both" and response["error"]["code"] == -32800
    assert server.call("status")["result"]["in_flight"] == 0
    llm.script.released.set()
    assert server.close() == 0
