"""Model code that prints, writes to fd 1 and 2, loops forever, exits the process, raises or
eats memory never reaches the protocol stream, never takes the server down, and never disturbs
the other requests in flight."""

from __future__ import annotations

from typing import Any

import orjson
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import answer_with, repl

MISBEHAVIOUR = {
    "PRINTS": repl(
        "import sys",
        'print(\'{"jsonrpc": "2.0", "id": 99, "result": "forged"}\')',
        "sys.stdout.write('not protocol\\n')",
        "sys.__stdout__.write('via the real stdout object\\n'); sys.__stdout__.flush()",
        "answer['content'] = 'printed'",
        "answer['ready'] = True",
    ),
    "FDWRITES": repl(
        "import os",
        "os.write(1, b'raw bytes on fd 1 FD1-MARK\\n')",
        "os.write(2, b'raw bytes on fd 2 FD2-MARK\\n')",
        "answer['content'] = 'wrote'",
        "answer['ready'] = True",
    ),
    "LOOPS": repl("while True:", "    pass"),
    "EXITS": repl("import os", "os._exit(3)"),
    "KILLS-PARENT-PIPE": repl("import os, signal", "os.kill(os.getpid(), signal.SIGSEGV)"),
}
RECOVERS = {
    "RAISES": repl("raise ValueError('boom in model code')"),
    "EATS": repl("hog = bytearray(64 * 1024 ** 3)"),
}


def _rules() -> list[dict[str, object]]:
    rules: list[dict[str, object]] = [
        {"when": "root", "contains": "SLOW-NEIGHBOUR", "hold": True, "reply": answer_with("'calm'")}
    ]
    rules += [{"when": "root", "contains": k, "reply": v} for k, v in MISBEHAVIOUR.items()]
    for key, reply in RECOVERS.items():
        # first turn misbehaves; the turn after sees the error and answers
        rules.append({"when": "root", "contains": key, "times": 1, "reply": reply})
        rules.append({"when": "root", "contains": key, "reply": answer_with(f"'{key} survived'")})
    return rules


def test_misbehaving_model_code_is_contained(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(_rules(), env={"ELIZA_RLM_VERBOSE": "true"})  # worker output is logged at info
    server.ready()
    server.request("neighbour", "infer", {"prompt": "ctx", "query": "SLOW-NEIGHBOUR"})

    def infer(query: str, **options: object) -> dict[str, Any]:
        return server.call("infer", {"prompt": "ctx", "query": query, "options": options})

    assert infer("PRINTS")["result"]["text"] == "printed"
    assert infer("FDWRITES")["result"]["text"] == "wrote"
    looped = infer("LOOPS", timeout_s=1)["error"]
    assert looped["code"] == -32001
    for query in ("EXITS", "KILLS-PARENT-PIPE"):
        crashed = infer(query)["error"]
        assert crashed["code"] == -32603, crashed
        assert crashed["data"]["type"] == "worker_crashed"
    for key in RECOVERS:
        result = infer(key)["result"]
        assert result["text"] == f"{key} survived"
        assert result["metadata"]["iterations"] == 2

    llm.script.released.set()
    neighbour = server.next_response()
    assert neighbour == {**neighbour, "id": "neighbour"}
    assert neighbour["result"]["text"] == "calm"
    assert server.call("status")["result"]["metrics"]["failed_requests"] == 2
    assert server.close() == 0  # close() also fails on any non-protocol line seen on stdout
    for mark in ("FD1-MARK", "FD2-MARK", "via the real stdout object"):
        lines = [line for line in server.stderr_lines if mark in line]
        assert lines, f"{mark} did not reach the server's log"
        assert all(": worker of request " in line for line in lines), lines  # never bare


def test_error_messages_carry_no_model_text(spawn: Spawn) -> None:
    server = spawn(
        [{"when": "root", "reply": repl("import os", "print('SECRET-TEXT')", "os._exit(1)")}]
    )
    server.ready()
    response = server.call("infer", {"prompt": "ctx"})
    assert b"SECRET" not in orjson.dumps(response)
    assert response["error"]["message"] == "Worker crashed"
    assert server.close() == 0
