"""Host tools: model code calls functions the client declared, through `tool/call` requests.

The real server, the real `rlm` library over HTTP to the scripted model, and this test as the
client: it answers (or refuses, or ignores) each `tool/call` it receives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import ServerProcess, answer_with, repl

Json = dict[str, Any]
LOOKUP = {
    "name": "lookup",
    "description": "Look a record up by its key in the agent's own store.",
    "input_schema": {
        "type": "object",
        "properties": {"key": {"type": "string"}},
        "required": ["key"],
        "additionalProperties": False,
    },
}
SEARCH = {
    "name": "search",
    "description": "Search the agent's memory.",
    "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
}
Answer = Callable[[Json], Json | None]  # a tool/call's params -> the response's members, or None


def result(value: Any) -> Answer:
    return lambda params: {"result": value}


def run(
    server: ServerProcess,
    request_id: Any,
    answer: Answer,
    together: int = 1,
    timeout: float = 60,
) -> tuple[Json, list[Json]]:
    """Read until the response to `request_id`, answering each `tool/call` with `answer` once
    `together` of them are waiting (so concurrent calls must all be in flight at once). The
    response, and every other message the server wrote meanwhile."""
    waiting: list[Json] = []
    seen: list[Json] = []
    while True:
        message = server.next_message(timeout)
        assert isinstance(message, dict), message
        if message.get("id") == request_id and "method" not in message:
            return message, seen
        seen.append(message)
        if message.get("method") != "tool/call":
            continue
        waiting.append(message)
        if len(waiting) < together:
            continue
        for call in waiting:
            members = answer(call["params"])
            if members is not None:
                server.send({"jsonrpc": "2.0", "id": call["id"], **members})
        waiting = []


def tool_calls(messages: list[Json]) -> list[Json]:
    return [m for m in messages if m.get("method") == "tool/call"]


def cancels(messages: list[Json]) -> list[Any]:
    return [m["params"]["id"] for m in messages if m.get("method") == "$/cancelRequest"]


def test_two_tools_called_concurrently_and_their_values_reach_the_answer(
    spawn: Spawn, llm: FixtureServer
) -> None:
    code = repl(
        "from concurrent.futures import ThreadPoolExecutor",
        "with ThreadPoolExecutor(2) as pool:",
        "    a = pool.submit(lookup, key='alpha')",
        "    b = pool.submit(search, q='beta')",
        "    record, hits = a.result(), b.result()",
        "answer['content'] = f\"{record['owner']} {hits[0]} {type(hits).__name__}\"",
        "answer['ready'] = True",
    )
    server = spawn([{"when": "root", "reply": code}])
    server.ready()

    def answer(params: Json) -> Json:
        if params["name"] == "lookup":
            return {"result": {"owner": "ada-" + params["arguments"]["key"]}}
        return {"result": ["hit-" + params["arguments"]["q"], 2]}

    server.request(7, "infer", {"prompt": "ctx", "tools": [LOOKUP, SEARCH]})
    response, seen = run(server, 7, answer, together=2)

    assert response["result"]["text"] == "ada-alpha hit-beta list", response
    calls = tool_calls(seen)
    assert sorted(c["params"]["name"] for c in calls) == ["lookup", "search"]
    assert all(c["params"]["request_id"] == 7 for c in calls)
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("tool-") for c in calls)
    system = llm.script.bodies[0]["messages"][0]["content"]
    assert "`lookup`: Look a record up by its key" in system
    assert '"required":["key"]' in system and "ToolError" in system
    assert server.close() == 0


def test_a_handlers_error_reaches_model_code_as_tool_error(spawn: Spawn) -> None:
    code = repl(
        "try:",
        "    lookup(key='missing')",
        "    answer['content'] = 'no error'",
        "except ToolError as error:",
        "    answer['content'] = 'caught: ' + str(error)",
        "answer['ready'] = True",
    )
    server = spawn([{"when": "root", "reply": code}])
    server.ready()
    server.request(1, "infer", {"prompt": "ctx", "tools": [LOOKUP]})
    failing = {"error": {"code": -32000, "message": "no record for key missing"}}
    response, _ = run(server, 1, lambda params: failing)
    assert response["result"]["text"] == "caught: no record for key missing"
    assert server.close() == 0


def test_a_hanging_handler_hits_tool_timeout_and_is_cancelled(spawn: Spawn) -> None:
    code = repl(
        "try:",
        "    lookup(key='slow')",
        "except ToolError as error:",
        "    answer['content'] = str(error)",
        "answer['ready'] = True",
    )
    server = spawn([{"when": "root", "reply": code}])
    server.ready()
    params = {"prompt": "ctx", "tools": [LOOKUP], "options": {"tool_timeout_s": 0.3}}
    server.request(1, "infer", params)
    response, seen = run(server, 1, lambda params: None)  # never answers
    assert response["result"]["text"] == "lookup timed out after 0.3 s (tool_timeout_s)"
    (call,) = tool_calls(seen)
    assert cancels(seen) == [call["id"]]
    server.send({"jsonrpc": "2.0", "id": call["id"], "result": "too late"})  # dropped
    assert server.call("status")["result"]["in_flight"] == 0
    assert server.close() == 0


def test_cancelling_the_infer_cancels_its_pending_tool_call(spawn: Spawn) -> None:
    server = spawn([{"when": "root", "reply": answer_with("lookup(key='x')")}])
    server.ready()
    server.request("job", "infer", {"prompt": "ctx", "tools": [LOOKUP]})
    call = server.next_message()
    assert isinstance(call, dict) and call["method"] == "tool/call", call
    server.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": "job"}})
    response, seen = run(server, "job", lambda params: None)
    assert response["error"]["code"] == -32800
    assert cancels(seen) == [call["id"]]
    server.send({"jsonrpc": "2.0", "id": call["id"], "result": "late"})  # dropped, unanswered
    assert server.call("status", request_id="after")["id"] == "after"
    assert server.close() == 0


def test_undeclared_names_and_invalid_arguments_never_reach_the_client(spawn: Spawn) -> None:
    code = repl(
        "errors = []",
        "for call in (lambda: lookup(key=5), lambda: lookup(key='a', extra=1)):",
        "    try:",
        "        call()",
        "    except ToolError as error:",
        "        errors.append(str(error))",
        "lookup.name = 'delete_everything'",  # model code can rename it: the server checks
        "try:",
        "    lookup(key='a')",
        "except ToolError as error:",
        "    errors.append(str(error))",
        "answer['content'] = ' | '.join(errors)",
        "answer['ready'] = True",
    )
    server = spawn([{"when": "root", "reply": code}])
    server.ready()
    server.request(1, "infer", {"prompt": "ctx", "tools": [LOOKUP]})
    response, seen = run(server, 1, result("should not be asked"))
    first, second, third = response["result"]["text"].split(" | ")
    assert first.startswith("the arguments of lookup do not match its input schema: key:")
    assert second.startswith("the arguments of lookup do not match its input schema")
    assert "extra" in second
    assert third == "no tool named 'delete_everything' is declared for this request"
    assert tool_calls(seen) == []
    assert server.close() == 0


def test_max_tool_calls_ends_the_request_with_budget_exceeded(spawn: Spawn) -> None:
    code = repl("for key in 'abc':", "    lookup(key=key)", "answer['ready'] = True")
    server = spawn([{"when": "root", "reply": code}])
    server.ready()
    options = {"budget": {"max_tool_calls": 2}}
    server.request(1, "infer", {"prompt": "ctx", "tools": [LOOKUP], "options": options})
    response, seen = run(server, 1, result({"ok": True}))
    error = response["error"]
    assert error["code"] == -32004, error
    assert error["data"]["limit"] == "max_tool_calls" and error["data"]["max"] == 2
    assert error["data"]["scope"] == "request"
    assert len(tool_calls(seen)) == 2
    assert server.close() == 0


def test_tool_calls_appear_in_the_trajectory_with_their_sizes(spawn: Spawn) -> None:
    code = repl(
        "try:",
        "    lookup(key='boom')",
        "except ToolError:",
        "    pass",
        "answer['content'] = lookup(key='abc')",
        "answer['ready'] = True",
    )
    server = spawn([{"when": "root", "reply": code}])
    server.ready()
    params = {"prompt": "ctx", "tools": [LOOKUP], "options": {"trajectory": True}}
    server.request(1, "infer", params)

    def answer(params: Json) -> Json:
        if params["arguments"]["key"] == "boom":
            return {"error": {"code": 1, "message": "boom"}}
        return {"result": "0123456789"}

    response, _ = run(server, 1, answer)
    (step,) = response["result"]["trajectory"]
    failed, answered = step["tool_calls"]
    assert failed["name"] == "lookup" and failed["error"] == "boom"
    assert answered["error"] is None
    assert answered["arguments_bytes"] == len(b'{"key":"abc"}')
    assert answered["result_bytes"] == len(b'"0123456789"')
    assert server.close() == 0


def test_a_recorded_run_replays_with_no_handler_and_no_model(
    spawn: Spawn, llm: FixtureServer, tmp_path: Path
) -> None:
    code = answer_with("lookup(key='k')['owner'] + ' ' + llm_query('name a colour')")
    rules = [{"when": "root", "reply": code}, {"when": "sub", "reply": "blue"}]
    recording = spawn(rules, args=["--record", str(tmp_path)])
    recording.ready()
    recording.request(1, "infer", {"prompt": "ctx", "tools": [LOOKUP]})
    recorded, _ = run(recording, 1, result({"owner": "grace"}))
    assert recorded["result"]["text"] == "grace blue"
    assert recording.close() == 0
    tapes = [orjson.loads(path.read_bytes()) for path in tmp_path.iterdir()]
    assert any(tape["request"].get("tool") == "lookup" for tape in tapes)

    llm.script.replace([])  # no model: every call would fail
    replaying = spawn(args=["--replay", str(tmp_path)], env={"OPENAI_API_KEY": ""})
    replaying.ready()
    replaying.request(2, "infer", {"prompt": "ctx", "tools": [LOOKUP]})
    replayed, seen = run(replaying, 2, result({"owner": "not asked"}))
    assert replayed["result"]["text"] == "grace blue"
    assert tool_calls(seen) == []
    assert llm.script.stats()["requests"] == 0
    assert replaying.close() == 0


def test_a_sessions_tools_serve_each_turn(spawn: Spawn) -> None:
    rules = [
        {"when": "root", "times": 1, "reply": answer_with("lookup(key='one')")},
        {"when": "root", "reply": answer_with("lookup(key='two') + '!'")},
    ]
    server = spawn(rules)
    server.ready()
    session = server.call("session/open", {"tools": [LOOKUP]})["result"]["session_id"]
    echo: Answer = lambda params: {"result": params["arguments"]["key"]}  # noqa: E731
    for request_id, query, expected in ((1, "first", "one"), (2, "second", "two!")):
        server.request(request_id, "infer", {"session_id": session, "query": query})
        response, _ = run(server, request_id, echo)
        assert response["result"]["text"] == expected, response
    refused = server.call("infer", {"session_id": session, "tools": [LOOKUP]})
    assert refused["error"]["data"]["field"] == "tools"
    assert server.close() == 0


def test_tool_declarations_are_checked(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    cases = [
        ([{**LOOKUP, "name": "not an identifier"}], "tools.0.name"),
        ([{**LOOKUP, "name": "llm_query"}], "tools.0.name"),
        ([{**LOOKUP, "name": "class"}], "tools.0.name"),
        ([{**LOOKUP, "input_schema": {"type": "no-such-type"}}], "tools.0.input_schema"),
        ([{**LOOKUP, "inputSchema": {}}], "tools.0.inputSchema"),
        ([{**LOOKUP, "input_schema": {"description": "x" * 70_000}}], "tools.0.input_schema"),
        ([LOOKUP, LOOKUP], "tools.1.name"),
        ({"lookup": LOOKUP}, "tools"),
    ]
    for tools, field in cases:
        response = server.call("infer", {"prompt": "ctx", "tools": tools})
        assert response["error"]["code"] == -32602, (tools, response)
        assert response["error"]["data"]["field"] == field, (tools, response)
    bad = {"prompt": "x", "options": {"tool_timeout_s": 0}}
    assert server.call("infer", bad)["error"]["data"]["field"] == "options.tool_timeout_s"
    assert server.close() == 0


def test_responses_that_answer_nothing_are_dropped_and_garbage_is_refused(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    server.send({"jsonrpc": "2.0", "id": "tool-99", "result": 1})  # nobody waits: dropped
    server.send({"jsonrpc": "2.0", "id": 5, "error": {"code": 1, "message": "x"}})  # dropped
    server.send({"jsonrpc": "2.0", "id": 6})  # neither request nor response
    refused = server.next_response()
    assert refused["id"] == 6 and refused["error"]["code"] == -32600, refused
    server.send({"jsonrpc": "2.0", "id": 8, "result": 1, "error": {"code": 1, "message": "x"}})
    assert server.next_response()["error"]["code"] == -32600
    assert server.call("status", request_id="last")["id"] == "last"
    assert server.close() == 0


def test_log_dir_and_the_viewer_show_tool_calls_and_their_sizes(
    spawn: Spawn, tmp_path: Path
) -> None:
    from rlm_server.tools import viewer

    code = repl(
        "try:",
        "    lookup(key='x')",
        "except ToolError:",
        "    pass",
        "answer['content'] = lookup(key='abcd')",
        "answer['ready'] = True",
    )
    server = spawn([{"when": "root", "reply": code}], args=["--log-dir", str(tmp_path)])
    server.ready()
    server.request(1, "infer", {"prompt": "ctx", "tools": [LOOKUP]})

    def answer(params: Json) -> Json:
        if params["arguments"]["key"] == "x":
            return {"error": {"code": 1, "message": "<b>no such key</b>"}}
        return {"result": "value"}

    response, _ = run(server, 1, answer)
    assert response["result"]["text"] == "value"
    assert server.close() == 0
    (log,) = tmp_path.glob("*.jsonl")
    entries = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    (iteration,) = [entry for entry in entries if entry["type"] == "iteration"]
    failed, answered = iteration["tool_calls"]
    assert failed["name"] == "lookup" and failed["error"] == "<b>no such key</b>"
    assert answered["arguments_bytes"] == len(b'{"key":"abcd"}')
    assert answered["result_bytes"] == len(b'"value"') and answered["error"] is None
    page = viewer.render(viewer.load(log))
    assert "2 tool call(s)" in page
    assert "&lt;b&gt;no such key&lt;/b&gt;" in page and "<b>no such key</b>" not in page
    assert page.count('<tr class="toolcall">') == 2


def test_a_client_that_declared_no_tools_never_gets_a_tool_call(spawn: Spawn) -> None:
    forge = repl(  # model code writes a well-formed tool call frame on its own socket
        "import os, stat, orjson",
        "body = orjson.dumps({'tool': 999999, 'name': 'lookup', 'arguments': {'key': 'k'}})",
        "for fd in range(256):",
        "    try:",
        "        if stat.S_ISSOCK(os.fstat(fd).st_mode):",
        "            os.write(fd, len(body).to_bytes(8, 'big') + body)",
        "    except OSError:",
        "        pass",
        "answer['content'] = 'done'",
        "answer['ready'] = True",
    )
    server = spawn([{"when": "root", "reply": forge}])
    server.ready()
    server.request(1, "infer", {"prompt": "ctx"})
    response, seen = run(server, 1, result("never"))
    assert response["result"]["text"] == "done"
    assert tool_calls(seen) == []
    assert server.close() == 0


def test_an_answer_over_the_line_limit_is_a_tool_error(spawn: Spawn) -> None:
    server = spawn(
        [{"when": "root", "reply": caught_answer("lookup(key='big')")}],
        args=["--max-message-bytes", "100000"],
    )
    server.ready()
    server.request(1, "infer", {"prompt": "ctx", "tools": [LOOKUP]})
    response, _ = run(server, 1, result("x" * 200_000))
    assert response["result"]["text"] == (
        "the tool's answer is longer than the server's --max-message-bytes"
    )
    assert server.call("status", request_id="s")["result"]["in_flight"] == 0
    assert server.close() == 0


def caught_answer(call: str) -> str:
    """Model code that answers the ToolError `call` raises, or 'no error'."""
    return repl(
        "try:",
        f"    {call}",
        "    answer['content'] = 'no error'",
        "except ToolError as error:",
        "    answer['content'] = str(error)",
        "answer['ready'] = True",
    )


def test_tools_need_the_local_repl(spawn: Spawn) -> None:
    server = spawn(env={"ELIZA_RLM_ENV": "docker"})
    server.ready()
    for method, params in (("infer", {"prompt": "ctx"}), ("session/open", {})):
        response = server.call(method, {**params, "tools": [LOOKUP]})
        assert response["error"]["data"]["field"] == "tools", response
    assert server.close() == 0
