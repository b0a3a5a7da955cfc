"""Structured answers (`options.answer_schema`): through the real `rlm` library, over real HTTP
to the scripted model, with the real server: valid at once, repaired, refused to the end."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import answer_with, repl

from rlm_server.worker.answers import AnswerCheck

SCHEMA = {
    "type": "object",
    "properties": {"code": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["code", "count"],
    "additionalProperties": False,
}
VALID = answer_with('{"code": "ZEBRA-42", "count": 3}')
INVALID = answer_with('{"code": "ZEBRA-42", "count": "three"}')
REPAIRED = [{"when": "root", "reply": INVALID, "times": 1}, {"when": "root", "reply": VALID}]
WHY = "at $.count: 'three' is not of type 'integer'"


def _infer(schema: Any = SCHEMA, **options: Any) -> dict[str, Any]:
    options["answer_schema"] = schema
    return {"prompt": "ctx", "query": "Which code?", "options": options}


def _root_prompts(llm: FixtureServer) -> list[str]:
    return [orjson.dumps(body["messages"]).decode() for body in llm.script.bodies]


def test_a_valid_answer_is_the_value_and_its_compact_json(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn([{"when": "root", "reply": VALID}])
    server.ready()
    result = server.call("infer", _infer())["result"]
    assert result["value"] == {"code": "ZEBRA-42", "count": 3}
    assert result["text"] == '{"code":"ZEBRA-42","count":3}'
    assert result["metadata"]["iterations"] == 1
    system = llm.script.bodies[0]["messages"][0]
    assert system["role"] == "system"
    assert orjson.dumps(SCHEMA).decode() in system["content"], "the root model saw the schema"
    plain = server.call("infer", {"prompt": "ctx"})["result"]
    assert "value" not in plain and plain["text"] == "{'code': 'ZEBRA-42', 'count': 3}"
    assert server.close() == 0


def test_an_invalid_answer_is_repaired_on_the_next_iteration(
    spawn: Spawn, llm: FixtureServer
) -> None:
    server = spawn(REPAIRED)
    server.ready()
    result = server.call("infer", _infer())["result"]
    assert result["value"] == {"code": "ZEBRA-42", "count": 3}
    assert result["metadata"]["iterations"] == 2
    first, second = _root_prompts(llm)
    assert WHY not in first
    assert WHY in second, "the model was told what failed"
    assert server.close() == 0


def test_repairs_exhausted_is_invalid_answer_with_the_error_and_usage(
    spawn: Spawn, llm: FixtureServer
) -> None:
    server = spawn([{"when": "root", "reply": INVALID}])
    server.ready()
    error = server.call("infer", _infer(answer_repairs=1))["error"]
    assert error["code"] == -32006
    assert error["message"] == "Answer does not match the schema"
    assert error["data"]["type"] == "invalid_answer"
    assert error["data"]["validation_error"] == WHY
    assert error["data"]["usage"]["calls"] == 2 == llm.script.stats()["requests"]
    none_left = server.call("infer", _infer(answer_repairs=0))["error"]
    assert none_left["code"] == -32006
    assert llm.script.stats()["requests"] == 3
    status = server.call("status")["result"]
    assert status["metrics"]["failed_requests"] == 2
    assert server.close() == 0


def test_out_of_iterations_the_closing_answer_must_be_valid_json(
    spawn: Spawn, llm: FixtureServer
) -> None:
    server = spawn(
        [
            {"when": "root", "reply": "Still looking.", "times": 1},
            {"when": "root", "reply": '```json\n{"code": "Q", "count": 1}\n```', "times": 1},
            {"when": "root", "reply": "Still looking.", "times": 1},
            {"when": "root", "reply": "The code is Q."},
        ]
    )
    server.ready()
    result = server.call("infer", _infer(max_iterations=1))["result"]
    assert result["value"] == {"code": "Q", "count": 1}
    error = server.call("infer", _infer(max_iterations=1))["error"]
    assert error["data"]["type"] == "invalid_answer"
    assert llm.script.stats()["requests"] == 4
    assert server.close() == 0


def test_a_session_turn_takes_a_schema(spawn: Spawn) -> None:
    server = spawn(REPAIRED)
    server.ready()
    session = server.call("session/open")["result"]["session_id"]
    turn = {"session_id": session, "query": "Which code?", "options": {"answer_schema": SCHEMA}}
    assert server.call("infer", turn)["result"]["value"] == {"code": "ZEBRA-42", "count": 3}
    after = server.call("infer", {"session_id": session, "query": "And now?"})["result"]
    assert "value" not in after
    assert server.close() == 0


@pytest.mark.parametrize(
    ("options", "field", "reason"),
    [
        ({"answer_schema": {"type": "strin"}}, "options.answer_schema", "not a valid JSON Schema"),
        ({"answer_schema": {"pattern": "("}}, "options.answer_schema", "not a valid JSON Schema"),
        ({"answer_schema": True}, "options.answer_schema", "must be a JSON Schema object"),
        (
            {"answer_schema": {"description": "x" * 65_536}},
            "options.answer_schema",
            "at most 65536 bytes",
        ),
        ({"answer_repairs": 1}, "options.answer_repairs", "only with options.answer_schema"),
        ({"answer_schema": SCHEMA, "answer_repairs": -1}, "options.answer_repairs", "integer"),
    ],
)
def test_a_schema_that_is_not_one_is_refused_before_any_call(
    spawn: Spawn, llm: FixtureServer, options: dict[str, Any], field: str, reason: str
) -> None:
    server = spawn([{"when": "root", "reply": VALID}])
    server.ready()
    error = server.call("infer", {"prompt": "ctx", "options": options})["error"]
    assert error["code"] == -32602
    assert error["data"]["field"] == field
    assert reason in error["data"]["reason"]
    assert llm.script.stats()["requests"] == 0
    assert server.close() == 0


def test_the_check_takes_values_json_texts_and_says_why_not() -> None:
    check = AnswerCheck({"type": "array", "items": {"type": "integer"}}, repairs=0)
    assert check.accept((1, 2)) is None and check.value == [1, 2]
    assert check.accept("[3]") is None and check.value == [3]
    assert check.accept("```json\n[4]\n```") is None and check.value == [4]
    not_json = 'answer["content"] is not a JSON value: Type is not JSON serializable: set'
    assert check.accept({1, 2}) == not_json
    assert check.accept("[1, 'x']") == "at $: \"[1, 'x']\" is not of type 'array'"
    assert check.accept('[1, "x"]') == "at $[1]: 'x' is not of type 'integer'"
    text = AnswerCheck({"type": "string"}, repairs=0)
    assert text.accept("42") is None and text.value == "42"
    long_value = AnswerCheck({"type": "integer"}, repairs=0).accept("x" * 5000)
    assert long_value is not None and len(long_value) == 1000


def test_a_schema_read_by_the_second_parser_holds_what_the_first_would(spawn: Spawn) -> None:
    """A lone surrogate sends the line through the standard library's parser, which once kept
    an integer beyond 64 bits that the worker's frames could not carry; it now reads it as
    orjson does (a float), so the schema is the one the same line without the surrogate gives."""
    server = spawn([{"when": "root", "reply": VALID}])
    server.ready()
    schema = '{"description": "\\ud800", "maximum": 123456789012345678901234567890}'
    line = '{"jsonrpc":"2.0","id":1,"method":"infer","params":{"prompt":"ctx","options":'
    server.send_raw(f'{line}{{"answer_schema":{schema}}}}}}}\n'.encode())
    assert server.next_response()["result"]["value"] == {"code": "ZEBRA-42", "count": 3}
    assert server.close() == 0


def _forging(value: str) -> str:
    """Model code that answers validly, then forges the worker's final frame to carry `value`
    (a Python expression) instead: what the server returns must not depend on the worker."""
    return repl(
        "import orjson, types",
        "from rlm_server.worker import frames",
        "def dumps(frame, **options):",
        "    if isinstance(frame, dict) and 'result' in frame:",
        f"        frame['result']['value'] = {value}",
        "    return orjson.dumps(frame, **options)",
        "frames.orjson = types.SimpleNamespace(**{**vars(orjson), 'dumps': dumps})",
        "answer['content'] = {'code': 'ZEBRA-42', 'count': 3}",
        "answer['ready'] = True",
    )


def test_the_server_checks_the_value_a_worker_sends_once_more(spawn: Spawn) -> None:
    server = spawn(
        [
            {"when": "root", "contains": "FORGE-INVALID", "reply": _forging("{'count': 'x'}")},
            {"when": "root", "reply": _forging("{'code': 'FORGED', 'count': 9}")},
        ]
    )
    server.ready()
    error = server.call("infer", {**_infer(), "query": "FORGE-INVALID"})["error"]
    assert (error["code"], error["data"]["type"]) == (-32006, "invalid_answer")
    assert error["data"]["usage"]["calls"] == 1
    forged_valid = server.call("infer", _infer())["result"]  # valid: the text is its JSON
    assert forged_valid["text"] == '{"code":"FORGED","count":9}'
    plain = server.call("infer", {"prompt": "ctx"})["result"]  # no schema: no value at all
    assert "value" not in plain, plain
    assert server.close() == 0
