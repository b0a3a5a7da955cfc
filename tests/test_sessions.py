"""Sessions: session/open, infer with session_id, session/close, against the real server, the
real `rlm` library (in the session's worker) and the scripted model. Nothing here is timed."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import ServerProcess, alive, answer_with, descendants, repl, wait_until

REMEMBER = repl(
    "import re",
    "code = re.search(r'code is (\\S+)\\.', context).group(1)",
    "answer['content'] = 'noted'",
    "answer['ready'] = True",
)
RECALL = answer_with("'the code was ' + code")
# Turn 2's root prompt says that turn 1's history is in the REPL: the library's persistent mode.
TWO_TURNS = [
    {"when": "root", "contains": "prior conversation history", "reply": RECALL},
    {"when": "root", "reply": REMEMBER},
]
APPEND = repl(
    "try:",
    "    log",
    "except NameError:",
    "    log = []",
    "log.append(vars()['context_' + str(len(log))])",  # this turn's input
    "answer['content'] = ','.join(log)",
    "answer['ready'] = True",
)


def _open(server: ServerProcess, **params: Any) -> str:
    response = server.call("session/open", params)
    session_id = response["result"]["session_id"]
    assert isinstance(session_id, str) and session_id.startswith("ses-")
    return session_id


def _turn(server: ServerProcess, session_id: str, **params: Any) -> dict[str, Any]:
    return server.call("infer", {"session_id": session_id, **params})


def _text(response: dict[str, Any]) -> str:
    assert "result" in response, response
    return str(response["result"]["text"])


def _refused(response: dict[str, Any], field: str = "session_id") -> None:
    error = response["error"]
    assert (error["code"], error["data"]["field"]) == (-32602, field), response


def test_turn_two_uses_a_variable_turn_one_set(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(TWO_TURNS)
    server.ready()
    context_id = server.call("context/load", {"text": "... the code is ZEBRA-42. ..."})["result"][
        "context_id"
    ]
    session_id = _open(server, context_id=context_id)
    assert _text(_turn(server, session_id, query="Find the code and remember it.")) == "noted"
    assert _text(_turn(server, session_id, query="What was the code?")) == "the code was ZEBRA-42"
    turn_two = llm.script.bodies[-1]["messages"]
    assert "What was the code?" in turn_two[1]["content"]
    assert "1 prior conversation history" in turn_two[-1]["content"]
    assert server.call("session/close", {"session_id": session_id})["result"] == {"closed": True}
    assert server.call("session/close", {"session_id": session_id})["result"] == {"closed": False}
    _refused(_turn(server, session_id, query="again?"))
    assert server.close() == 0


def test_a_turn_adds_its_prompt_as_the_next_context(spawn: Spawn) -> None:
    show = answer_with(
        "context + '|' + ' '.join(str(v) for k, v in sorted(vars().items())"
        " if k.startswith('context_'))"
    )
    server = spawn([{"when": "root", "reply": show}])
    server.ready()
    session_id = _open(server)
    assert _text(_turn(server, session_id)) == "|"  # no context at all: context is ""
    assert _text(_turn(server, session_id, prompt="first")) == "| first"
    assert _text(_turn(server, session_id, prompt="second")) == "| first second"
    messages = [{"role": "user", "content": "as messages"}]
    assert "as messages" in _text(_turn(server, session_id, messages=messages))
    assert server.close() == 0


def test_turns_run_one_at_a_time_in_order(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn([{"when": "root", "reply": APPEND}], args=["--max-concurrency", "1"])
    server.ready()
    session_id = _open(server)
    for name in "ABCD":  # pipelined: all four sent before the first is answered
        server.request(name, "infer", {"session_id": session_id, "prompt": name})
    answers = server.responses_by_id(4)
    assert {k: _text(r) for k, r in answers.items()} == {
        "A": "A",
        "B": "A,B",
        "C": "A,B,C",
        "D": "A,B,C,D",
    }
    assert llm.script.stats()["max_in_flight"] == 1
    assert server.close() == 0


def test_turns_of_different_sessions_run_at_once(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn([{"when": "root", "hold": True, "reply": answer_with("'done'")}])
    server.ready()
    sessions = [_open(server) for _ in range(3)]
    for session_id in sessions:
        server.request(session_id, "infer", {"session_id": session_id})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 3, timeout=30)
    llm.script.released.set()
    assert {_text(r) for r in server.responses_by_id(3).values()} == {"done"}
    assert server.close() == 0


def _session_workers(server: ServerProcess) -> set[int]:
    """The processes of the session's worker: everything below the zygote."""
    return alive(descendants(server.process.pid)) - _zygotes(server)


def _zygotes(server: ServerProcess) -> set[int]:
    return {p for p in alive(descendants(server.process.pid)) if _parent(p) == server.process.pid}


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_cancelled_turn_closes_its_session(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(
        [
            {"when": "root", "contains": "hang", "hold": True, "reply": RECALL},
            {"when": "root", "reply": answer_with("'ok'")},
        ]
    )
    server.ready()
    session_id = _open(server)
    assert _text(_turn(server, session_id, query="warm")) == "ok"
    worker = _session_workers(server)  # the session's worker stays between turns
    assert worker
    server.request("hung", "infer", {"session_id": session_id, "query": "hang here"})
    server.request("queued", "infer", {"session_id": session_id, "query": "after it"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=30)
    server.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": "hung"}})
    answers = server.responses_by_id(2)
    assert answers["hung"]["error"]["code"] == -32800
    _refused(answers["queued"])  # it waited behind the cancelled turn
    assert wait_until(lambda: not alive(worker))
    _refused(_turn(server, session_id, query="later"))
    assert server.call("status")["result"]["sessions"] == {"count": 0}
    llm.script.released.set()
    assert server.close() == 0


def test_a_turn_past_its_deadline_closes_its_session(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn([{"when": "root", "hold": True, "reply": RECALL}])
    server.ready()
    session_id = _open(server)
    response = _turn(server, session_id, options={"timeout_s": 0.5})
    assert response["error"]["code"] == -32001
    _refused(_turn(server, session_id))
    llm.script.released.set()
    assert server.close() == 0


def test_a_failed_turn_keeps_the_session(spawn: Spawn) -> None:
    """A turn that fails cleanly (a budget, a backend error) leaves the REPL as it was."""
    server = spawn(
        [
            {"when": "root", "contains": "spend", "reply": repl("spent = 1")},
            {"when": "root", "contains": "break", "status": 400, "reply": ""},
            {"when": "root", "contains": "recall", "reply": answer_with("kept")},
            {
                "when": "root",
                "reply": repl(
                    "kept = 'still here'", "answer['content'] = 'set'", "answer['ready'] = True"
                ),
            },
        ]
    )
    server.ready()
    session_id = _open(server)
    assert _text(_turn(server, session_id, query="set it")) == "set"
    assert _turn(server, session_id, query="break it")["error"]["code"] == -32000
    options = {"max_iterations": 2, "budget": {"max_calls": 1}}  # the second root call
    over = _turn(server, session_id, query="spend", options=options)
    assert over["error"]["data"]["type"] == "budget_exceeded"
    assert _text(_turn(server, session_id, query="recall")) == "still here"
    assert server.close() == 0


def test_a_turn_whose_sub_call_is_refused_fails_and_keeps_the_session(
    spawn: Spawn, llm: FixtureServer
) -> None:
    """The refusal ends the turn (-32004, not an answer holding the error); the session's
    worker unwinds instead of being killed, asks for no further call, and keeps its REPL."""
    server = spawn(
        [
            {"when": "root", "contains": "recall", "reply": answer_with("kept")},
            {
                "when": "root",
                "contains": "ask",
                "reply": repl(
                    "kept = 'still here'",
                    "s = llm_query('sub')",
                    "answer['content'] = '7 ' + s",
                    "answer['ready'] = True",
                ),
            },
            {"when": "sub", "reply": "never"},
        ]
    )
    server.ready()
    session_id = _open(server)
    over = _turn(server, session_id, query="ask", options={"budget": {"max_calls": 1}})
    assert (over["error"]["code"], over["error"]["data"]["usage"]["calls"]) == (-32004, 1)
    assert llm.script.stats()["requests"] == 1  # the sub-call was never made
    assert _text(_turn(server, session_id, query="recall")) == "still here"
    assert server.close() == 0


def test_an_idle_session_expires(spawn: Spawn) -> None:
    server = spawn(
        [{"when": "root", "reply": answer_with("'ok'")}], args=["--session-idle-s", "0.3"]
    )
    server.ready()
    session_id = _open(server)
    assert _text(_turn(server, session_id)) == "ok"
    assert wait_until(lambda: server.call("status")["result"]["sessions"]["count"] == 0)
    assert wait_until(lambda: not _session_workers(server))  # killed just after the count
    _refused(_turn(server, session_id))
    assert server.close() == 0


def test_a_session_holds_its_context_until_it_closes(spawn: Spawn) -> None:
    server = spawn([{"when": "root", "reply": answer_with("context")}])
    server.ready()
    context_id = server.call("context/load", {"text": "held by the session"})["result"][
        "context_id"
    ]
    session_id = _open(server, context_id=context_id)
    assert server.call("context/list")["result"]["contexts"][0]["uses"] == 1
    assert server.call("context/drop", {"context_id": context_id})["result"] == {"dropped": True}
    assert _text(_turn(server, session_id)) == "held by the session"
    assert server.call("context/list")["result"]["bytes_total"] == 19
    server.call("session/close", {"session_id": session_id})
    assert server.call("context/list")["result"]["bytes_total"] == 0
    assert server.close() == 0


def test_a_session_worker_is_confined_like_any_worker(spawn: Spawn) -> None:
    """Forked from the zygote, with its address-space limit and no key in its environment."""
    probe = answer_with(
        "str(__import__('resource').getrlimit(__import__('resource').RLIMIT_AS)[0] > 0) + ' '"
        " + str('OPENAI_API_KEY' in __import__('os').environ)"
    )
    server = spawn([{"when": "root", "reply": probe}])
    server.ready()
    session_id = _open(server)
    assert _text(_turn(server, session_id)) == "True False"
    worker = _session_workers(server)  # its keeper, and the job (and init) below it
    assert {_parent(pid) for pid in worker} & _zygotes(server)
    assert server.close() == 0
    assert wait_until(lambda: not alive(worker))


def test_a_turn_in_stub_mode_is_a_stub_answer(spawn: Spawn) -> None:
    server = spawn(raw_env={})
    server.ready()
    session_id = _open(server)
    assert _turn(server, session_id, query="anything")["result"]["stub"] is True
    assert server.close() == 0


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("session/open", {"context_id": 1}, "context_id"),
        ("session/open", {"context_id": "ctx-unknown"}, "context_id"),
        ("session/open", {"context": "x"}, "context"),
        ("session/close", {}, "session_id"),
        ("session/close", {"session_id": 3}, "session_id"),
        ("session/close", {"session_id": ["ses"]}, "session_id"),
        ("session/close", {"session_id": "ses-x", "now": True}, "now"),
        ("infer", {"session_id": "ses-unknown"}, "session_id"),
        ("infer", {"session_id": ""}, "session_id"),
        ("infer", {"session_id": "", "prompt": "x"}, "session_id"),
        ("infer", {"session_id": 1}, "session_id"),
        ("infer", {"session_id": {}}, "session_id"),
        ("infer", {"session_id": "ses-x", "context_id": "ctx-x"}, "context_id"),
        ("infer", {"session_id": "ses-x", "prompt": 5}, "prompt"),
        ("infer", {"session_id": "ses-x", "prompt": "a", "messages": []}, "messages"),
    ],
)
def test_bad_params_get_a_clean_error_and_the_server_keeps_serving(
    spawn: Spawn, method: str, params: Any, field: str
) -> None:
    server = spawn([{"when": "root", "reply": answer_with("'ok'")}])
    server.ready()
    server.send({"jsonrpc": "2.0", "id": "bad", "method": method, "params": params})
    response = server.next_response()
    assert response["id"] == "bad"
    _refused(response, field)
    assert server.call("status")["result"]["sessions"] == {"count": 0}
    assert server.close() == 0


def test_an_open_sent_as_a_notification_is_not_run(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    server.send({"jsonrpc": "2.0", "method": "session/open"})
    assert server.call("status")["result"]["sessions"] == {"count": 0}
    assert server.close() == 0
