"""The broker: model calls leave workers only as frames; the server holds the keys, retries each
call, counts every token at every depth and enforces budgets. Real parts throughout: the real
`rlm` library in workers, the scripted OpenAI-compatible fixture over real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import alive, answer_with, descendants, repl, wait_until

SECRET = "sk-test-SECRET-4c0e9d7b2a"

HUNT = repl(
    "import gc, os",
    f"needle = {SECRET[:12]!r} + {SECRET[12:]!r}",  # the whole key never appears in this code
    "found = [k for k, v in os.environ.items() if needle in v]",
    "try:",
    "    pids = os.listdir('/proc')",
    "except OSError:",  # the sandbox's Landlock rules: /proc is not for model code
    "    pids = []",
    "for pid in pids:",
    "    try:",
    "        if needle.encode() in open(f'/proc/{pid}/environ', 'rb').read():",
    "            found.append('environ of ' + pid)",
    "    except (OSError, ValueError):",
    "        pass",
    "for obj in gc.get_objects():",
    "    try:",
    "        if isinstance(obj, (str, bytes)) and obj is not needle and needle in str(obj):",
    "            found.append('memory: ' + type(obj).__name__)",
    "        elif isinstance(obj, dict) and any(needle in str(v) for v in obj.values()):",
    "            found.append('memory: dict')",
    "    except Exception:",
    "        pass",
    "answer['content'] = repr(found)",
    "answer['ready'] = True",
)


@pytest.mark.parametrize("sandbox", ["auto", "off"])
def test_model_code_finds_no_key_anywhere_it_can_look(spawn: Spawn, sandbox: str) -> None:
    env = {"OPENAI_API_KEY": SECRET, "ELIZA_RLM_SANDBOX": sandbox}
    server = spawn([{"when": "root", "reply": HUNT}], env=env)
    server.ready()
    response = server.call("infer", {"prompt": "look around"})
    found = response["result"]["text"]
    # the hunt's own `needle` variable lives in REPL globals, so one dict holds it: that is not
    # a key the worker was given
    assert found in ("[]", "['memory: dict']"), found
    assert server.close() == 0


@pytest.fixture
def attacker() -> Iterator[FixtureServer]:
    server = FixtureServer(rules=[{"reply": "stolen"}])
    server.start_in_thread()
    yield server
    server.shutdown()
    server.server_close()


def test_a_per_request_base_url_never_receives_the_key(
    spawn: Spawn, llm: FixtureServer, attacker: FixtureServer
) -> None:
    other_model = repl(
        "r = llm_query('hello', model='other-model')",
        "answer['content'] = r",
        "answer['ready'] = True",
    )
    server = spawn([{"when": "root", "reply": other_model}, {"when": "sub", "reply": "sub"}])
    server.ready()
    options = {"base_url": attacker.base_url}
    error = server.call("infer", {"prompt": "x", "options": options})["error"]
    assert error["code"] == -32602 and error["data"]["field"] == "options.base_url"
    # model code may name another model; the call still goes to the configured endpoint
    assert server.call("infer", {"prompt": "x"}, request_id=2)["result"]["text"] == "sub"
    assert llm.script.stats()["by_kind"] == {"root": 1, "sub": 1}
    assert attacker.script.stats()["requests"] == 0
    assert server.close() == 0


def test_a_flaky_call_costs_one_call_more_not_a_completion(
    spawn: Spawn, llm: FixtureServer
) -> None:
    rules = [
        {"when": "root", "status": 503, "times": 2},
        {"when": "root", "reply": answer_with("'third time'")},
    ]
    server = spawn(rules)
    server.ready()
    result = server.call("infer", {"prompt": "x"})["result"]
    assert result["text"] == "third time"
    assert llm.script.stats()["requests"] == 3  # two retried calls, one completion
    assert result["metadata"]["attempts"] == 3
    assert result["usage"]["calls"] == 1
    metrics = server.call("status", request_id="s")["result"]["metrics"]
    assert metrics["total_retries"] == 2 and metrics["total_calls"] == 1
    assert server.close() == 0


def test_a_failure_after_our_retries_says_not_retryable_and_what_it_spent(
    spawn: Spawn, llm: FixtureServer
) -> None:
    server = spawn([{"when": "root", "status": 500}], env={"ELIZA_RLM_MAX_RETRIES": "1"})
    server.ready()
    error = server.call("infer", {"prompt": "x"})["error"]
    assert error["code"] == -32000
    assert error["data"]["retryable"] is False
    assert error["data"]["attempts"] == 2 and error["data"]["status"] == 500
    assert error["data"]["usage"]["calls"] == 0  # nothing answered, nothing charged
    assert llm.script.stats()["requests"] == 2
    assert server.close() == 0


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancelled_and_timed_out_requests_say_what_they_spent(
    spawn: Spawn, llm: FixtureServer, how: str
) -> None:
    """The root call is settled and the sub-call held when the request ends: usage counts the
    one call that answered, whatever the machine's speed (the deadline is far past start-up)."""
    sub_call = repl(
        "s = llm_query('sub question')", "answer['content'] = s", "answer['ready'] = True"
    )
    rules = [{"when": "root", "reply": sub_call}, {"when": "sub", "hold": True, "reply": "late"}]
    server = spawn(rules)
    server.ready()
    options = {"timeout_s": 8} if how == "deadline" else {}
    server.request(1, "infer", {"prompt": "x", "options": options})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=30)  # the sub-call
    if how == "cancel":
        server.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 1}})
    error = server.next_response()["error"]
    assert error["code"] == (-32800 if how == "cancel" else -32001)
    assert error["data"]["usage"]["calls"] == 1  # the root call; the held sub-call never answered
    llm.script.released.set()
    assert server.close() == 0


def test_depth_two_usage_includes_the_child_rlm(spawn: Spawn, llm: FixtureServer) -> None:
    rules = [  # the parent's first call asks a child RLM, whose own root call answers
        {"when": "root", "times": 1, "reply": answer_with("rlm_query('a question for a child')")},
        {"when": "root", "reply": answer_with("'from the child'")},
    ]
    server = spawn(rules)
    server.ready()
    result = server.call("infer", {"prompt": "x", "options": {"max_depth": 2}})["result"]
    assert result["text"] == "from the child"
    assert llm.script.stats()["requests"] == 2
    assert result["usage"]["calls"] == 2
    assert result["usage"]["models"]["scripted"]["calls"] == 2
    assert server.close() == 0


def test_a_request_budget_of_calls_stops_the_next_call(spawn: Spawn, llm: FixtureServer) -> None:
    rules = [
        {"when": "root", "times": 1, "reply": repl("x = 1")},
        {"when": "root", "reply": answer_with("'too late'")},
    ]
    server = spawn(rules)
    server.ready()
    options = {"budget": {"max_calls": 1}}
    error = server.call("infer", {"prompt": "x", "options": options})["error"]
    assert error["code"] == -32004
    data = error["data"]
    assert (data["type"], data["limit"], data["max"], data["scope"]) == (
        "budget_exceeded",
        "max_calls",
        1,
        "request",
    )
    assert data["usage"]["calls"] == 1
    assert llm.script.stats()["requests"] == 1  # the second call was never made
    assert server.close() == 0


def test_concurrent_requests_never_overspend_the_servers_limit(
    spawn: Spawn, llm: FixtureServer
) -> None:
    """gpt-4o-mini has a price in the table; every call is reserved before it is made, so the
    calls in flight at once cannot together pass the limit."""
    limit = 0.01
    server = spawn(
        [{"when": "root", "delay_ms": 300, "reply": answer_with("'ok'")}],
        env={"ELIZA_RLM_MODEL": "gpt-4o-mini", "ELIZA_RLM_SPEND_LIMIT_USD": str(limit)},
        args=["--max-concurrency", "16"],
    )
    server.ready()
    for i in range(16):
        server.request(i, "infer", {"prompt": "x"})
    answers = list(server.responses_by_id(16).values())
    answered = [a for a in answers if "result" in a]
    refused = [a["error"] for a in answers if "error" in a]
    assert answered and refused
    assert {(e["code"], e["data"]["scope"], e["data"]["limit"]) for e in refused} == {
        (-32004, "server", "max_cost_usd")
    }
    assert llm.script.stats()["max_in_flight"] > 1  # the calls that fit ran at once
    metrics = server.call("status", request_id="s")["result"]["metrics"]
    assert 0 < metrics["total_cost_usd"] <= limit
    assert metrics["total_calls"] == llm.script.stats()["requests"] == len(answered)
    assert server.close() == 0


def test_a_cost_budget_on_a_model_without_a_price_is_refused(spawn: Spawn) -> None:
    server = spawn([{"when": "root", "reply": answer_with("'ok'")}])
    server.ready()
    options = {"budget": {"max_cost_usd": 1}}
    error = server.call("infer", {"prompt": "x", "options": options})["error"]
    assert error["code"] == -32602
    assert error["data"]["field"] == "options.budget.max_cost_usd"
    assert "scripted" in error["data"]["reason"]
    assert server.close() == 0


def test_usage_is_priced_from_the_table(spawn: Spawn) -> None:
    server = spawn(
        [{"when": "root", "reply": answer_with("'ok'")}], env={"ELIZA_RLM_MODEL": "gpt-4o-mini"}
    )
    server.ready()
    server.call("status", request_id="warm")  # nothing priced yet: no cost limit was asked
    usage = server.call("infer", {"prompt": "x", "options": {"budget": {"max_cost_usd": 1}}})[
        "result"
    ]["usage"]
    assert usage["calls"] == 1 and usage["cost_usd"] is not None and usage["cost_usd"] > 0
    expected = (usage["input_tokens"] * 0.15 + usage["output_tokens"] * 0.6) / 1e6
    assert usage["cost_usd"] == pytest.approx(expected, rel=0.01)
    assert server.close() == 0


# -- a refused or failed call ends its request, at any depth ----------------------------------


def _workers(server_pid: int) -> set[int]:
    """Every process below the zygote (and any holder): the workers and what they started."""
    return alive({pid for child in descendants(server_pid) for pid in descendants(child)})


SUB_CALL_THEN_SPIN = repl(
    "s = llm_query('a sub question')",
    "answer['content'] = '7 ' + s",
    "while True: pass",  # a worker left running would never end by itself
)


def test_a_budget_refusal_of_a_sub_call_ends_the_request_and_its_worker(
    spawn: Spawn, llm: FixtureServer
) -> None:
    server = spawn([{"when": "root", "reply": SUB_CALL_THEN_SPIN}, {"when": "sub", "reply": "x"}])
    server.ready()
    options = {"budget": {"max_calls": 1}, "timeout_s": 60}
    error = server.call("infer", {"prompt": "x", "options": options})["error"]
    assert (error["code"], error["data"]["type"], error["data"]["limit"]) == (
        -32004,
        "budget_exceeded",
        "max_calls",
    )
    assert error["data"]["usage"]["calls"] == 1  # the root call; the sub-call was not made
    assert llm.script.stats()["requests"] == 1
    assert wait_until(lambda: not _workers(server.process.pid)), _workers(server.process.pid)
    assert server.close() == 0


def test_a_budget_refusal_of_a_depth_two_child_call_ends_the_request(
    spawn: Spawn, llm: FixtureServer
) -> None:
    rules = [  # the child's own root call is the second call: over the budget
        {"when": "root", "times": 1, "reply": answer_with("rlm_query('a question for a child')")},
        {"when": "root", "reply": answer_with("'from the child'")},
    ]
    server = spawn(rules)
    server.ready()
    options = {"max_depth": 2, "budget": {"max_calls": 1}}
    error = server.call("infer", {"prompt": "x", "options": options})["error"]
    assert (error["code"], error["data"]["scope"]) == (-32004, "request")
    assert error["data"]["usage"]["calls"] == 1
    assert llm.script.stats()["requests"] == 1
    assert wait_until(lambda: not _workers(server.process.pid)), _workers(server.process.pid)
    assert server.close() == 0


@pytest.mark.parametrize(
    ("variable", "scope"),
    [("ELIZA_RLM_MAX_COST_USD", "request"), ("ELIZA_RLM_SPEND_LIMIT_USD", "server")],
)
def test_the_servers_cost_limits_refuse_a_sub_call_and_end_the_request(
    spawn: Spawn, llm: FixtureServer, variable: str, scope: str
) -> None:
    """gpt-4o-mini has a price. The root call's reservation fits under $0.004; a sub-call
    with a 20,000-byte prompt reserves $0.003 of input on top of 4096 output tokens: it
    does not, and is refused before it is made."""
    big_sub_call = repl("s = llm_query('x' * 20000)", "answer['content'] = '7 ' + s")
    server = spawn(
        [{"when": "root", "reply": big_sub_call}, {"when": "sub", "reply": "x"}],
        env={"ELIZA_RLM_MODEL": "gpt-4o-mini", variable: "0.004"},
    )
    server.ready()
    error = server.call("infer", {"prompt": "x"})["error"]
    data = error["data"]
    assert (error["code"], data["limit"], data["scope"]) == (-32004, "max_cost_usd", scope)
    assert data["usage"]["calls"] == 1 and data["usage"]["cost_usd"] > 0
    assert llm.script.stats()["requests"] == 1
    assert server.close() == 0


TWO_SUB_CALLS = repl(
    "a = llm_query('first')",
    "b = llm_query('second')",
    "answer['content'] = '5 ' + a + ' ' + b",
    "answer['ready'] = True",
)


def test_a_sub_call_that_fails_after_the_retries_ends_the_request(
    spawn: Spawn, llm: FixtureServer
) -> None:
    rules = [{"when": "root", "reply": TWO_SUB_CALLS}, {"when": "sub", "status": 500}]
    server = spawn(rules, env={"ELIZA_RLM_MAX_RETRIES": "1"})
    server.ready()
    error = server.call("infer", {"prompt": "x"})["error"]
    assert error["code"] == -32000 and error["data"]["type"] == "backend_error"
    assert error["data"]["retryable"] is False
    assert (error["data"]["attempts"], error["data"]["status"]) == (2, 500)
    assert error["data"]["usage"]["calls"] == 1  # the root call
    assert llm.script.stats()["requests"] == 3  # the root call, the first sub-call twice
    assert wait_until(lambda: not _workers(server.process.pid)), _workers(server.process.pid)
    assert server.close() == 0


def test_with_subcall_errors_model_the_code_gets_the_failure_and_the_result_counts_it(
    spawn: Spawn, llm: FixtureServer
) -> None:
    rules = [
        {"when": "root", "reply": TWO_SUB_CALLS},
        {"when": "sub", "contains": "first", "status": 500},
        {"when": "sub", "reply": "fine"},
    ]
    server = spawn(rules, env={"ELIZA_RLM_MAX_RETRIES": "1"})
    server.ready()
    options = {"subcall_errors": "model"}
    result = server.call("infer", {"prompt": "x", "options": options})["result"]
    assert result["text"].startswith("5 ") and result["text"].endswith(" fine")
    assert "backend_error" in result["text"]  # what the library gives model code
    assert result["metadata"]["failed_calls"] == 1
    assert result["usage"]["calls"] == 2  # the root call and the second sub-call
    assert llm.script.stats()["requests"] == 4
    clean = server.call("infer", {"prompt": "x", "options": {"subcall_errors": "fail"}})
    assert clean["error"]["code"] == -32000
    assert server.close() == 0


def test_subcall_errors_takes_fail_or_model(spawn: Spawn) -> None:
    server = spawn([{"when": "root", "reply": answer_with("'ok'")}])
    server.ready()
    error = server.call("infer", {"prompt": "x", "options": {"subcall_errors": "ignore"}})["error"]
    assert (error["code"], error["data"]["field"]) == (-32602, "options.subcall_errors")
    result = server.call("infer", {"prompt": "x"}, request_id=2)["result"]
    assert result["metadata"]["failed_calls"] == 0
    assert server.close() == 0
