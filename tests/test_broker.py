"""The broker: model calls leave workers only as frames; the server holds the keys, retries each
call, counts every token at every depth and enforces budgets. Real parts throughout: the real
`rlm` library in workers, the scripted OpenAI-compatible fixture over real HTTP.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import ServerProcess, alive, answer_with, descendants, repl, wait_until

from rlm_server.engine.broker import MAX_CLIENTS, Broker, Budget, RetryPolicy, Route

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


# -- what model code can ask of the broker (issue 21) -----------------------------------------
#
# Model code runs in the worker's own process, so it can do whatever the worker can: these
# attacks reach the worker's relay to the broker (or its trajectory) directly, as hostile code
# would, rather than through the library's llm_query.

LINK = (
    "import gc, json",
    "from rlm_server.worker.completion import BrokerLink",
    "link = next(o for o in gc.get_objects() if isinstance(o, BrokerLink))",
)


NEIGHBOUR_RULES = [
    {
        "when": "root",
        "contains": "NEIGHBOUR-Q",
        "reply": answer_with("llm_query('NEIGHBOUR-SUB')"),
    },
    {"when": "sub", "contains": "NEIGHBOUR-SUB", "hold": True, "reply": "neighbour-ok"},
]


@contextmanager
def neighbour_held(server: ServerProcess, llm: FixtureServer) -> Iterator[None]:
    """A neighbour request held mid-call while the attack runs; afterwards it finishes
    normally. Its rules (NEIGHBOUR_RULES) come first in the test's."""
    server.request("neighbour", "infer", {"prompt": "x", "query": "NEIGHBOUR-Q"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=30)
    yield
    assert server.call("status", request_id="during")["result"]["in_flight"] == 1
    llm.script.released.set()
    response = server.next_response()
    assert response["id"] == "neighbour" and response["result"]["text"] == "neighbour-ok"


def _outcome(reply: str) -> str:
    """Model code: what one reply frame says, the text or the error's type."""
    return f"({reply}).get('text') or ({reply})['error']['type']"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_models_model_code_may_name_are_an_allowlist(spawn: Spawn, llm: FixtureServer) -> None:
    probe = repl(
        *LINK,
        "names = ['scripted', 'from-options', 'from-flag', 'from-the-context']",
        "seen = {name: " + _outcome("link.call(name, 'PROBE')") + " for name in names}",
        "answer['content'] = json.dumps(seen)",
        "answer['ready'] = True",
    )
    rules = [{"when": "root", "reply": probe}, {"when": "sub", "reply": "probed"}]
    server = spawn(rules, args=["--allow-model", "from-flag"])
    server.ready()
    options = {"sub_model": "from-options"}
    result = server.call("infer", {"prompt": "x", "options": options})["result"]
    assert json.loads(result["text"]) == {
        "scripted": "probed",
        "from-options": "probed",
        "from-flag": "probed",
        "from-the-context": "model_not_allowed",
    }
    called = [body["model"] for body in llm.script.bodies]
    assert "from-the-context" not in called and called.count("from-flag") == 1
    assert server.close() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_three_hundred_new_model_names_cost_the_server_nothing(
    spawn: Spawn, llm: FixtureServer
) -> None:
    """On main at 58c500c each new name built a provider client (~1.65 MB, one fd) that the
    broker kept forever; now a name outside the allowlist is refused before any client."""
    names = repl(
        *LINK,
        "seen = [" + _outcome("link.call(f'new-model-{i}', 'x')") + " for i in range(300)]",
        "answer['content'] = json.dumps(sorted(set(seen)))",
        "answer['ready'] = True",
    )
    rules = [
        *NEIGHBOUR_RULES,
        {"when": "root", "contains": "NAMES-Q", "reply": names},
        {"when": "root", "reply": answer_with("'fine'")},
    ]
    server = spawn(rules)
    server.ready()
    pid = server.process.pid
    assert server.call("infer", {"prompt": "x"})["result"]["text"] == "fine"  # clients built
    with neighbour_held(server, llm):
        fds, rss = _fds(pid), _rss_kib(pid)
        refused = server.call("infer", {"prompt": "x", "query": "NAMES-Q"}, request_id=2)
        assert json.loads(refused["result"]["text"]) == ["model_not_allowed"]
        assert server.call("infer", {"prompt": "x"}, request_id=3)["result"]["text"] == "fine"
        assert _fds(pid) <= fds + 2, (fds, _fds(pid))
        assert _rss_kib(pid) - rss < 40 * 1024, (rss, _rss_kib(pid))  # 300 clients: ~500 MB
        assert llm.script.stats()["by_kind"]["sub"] == 1  # the neighbour's: no new name's
    assert server.close() == 0


FLOOD = repl(
    *LINK,
    # the worker's own socket, written directly: 1000 calls at once, none of them awaited
    "for number in range(10**6, 10**6 + 1000):",
    "    link._channel.send({'call': number, 'model': 'scripted', 'prompt': 'FLOOD-SUB'})",
    "answer['content'] = 'flooded'",
    "answer['ready'] = True",
)
TIMED = repl(
    "import time",
    "started = time.monotonic()",
    "reply = llm_query('NEIGHBOUR-SUB')",
    "answer['content'] = f'{reply} {time.monotonic() - started}'",
    "answer['ready'] = True",
)


def test_a_flood_of_calls_leaves_a_neighbours_call_on_time(
    spawn: Spawn, llm: FixtureServer
) -> None:
    """One request sends 1,000 calls at once, which the model holds; a neighbour's call is
    answered within a second of the time it takes alone, while the flood is still held (on
    main at 58c500c all 1,000 reached the shared connection pool and the neighbour's call
    waited behind them). Only the request's own --max-calls-in-flight reach the model."""
    rules = [
        {"when": "root", "contains": "FLOOD-Q", "reply": FLOOD},
        {"when": "root", "contains": "NEIGHBOUR-Q", "reply": TIMED},
        {"when": "sub", "contains": "FLOOD-SUB", "hold": True, "reply": "flood"},
        {"when": "sub", "contains": "NEIGHBOUR-SUB", "reply": "neighbour-ok"},
    ]
    server = spawn(rules)
    server.ready()
    neighbour = {"prompt": "x", "query": "NEIGHBOUR-Q"}
    text, alone = server.call("infer", neighbour, request_id="alone")["result"]["text"].split()
    assert text == "neighbour-ok"
    server.request("flood", "infer", {"prompt": "x", "query": "FLOOD-Q"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 16, timeout=60)
    text, during = server.call("infer", neighbour, request_id="during")["result"]["text"].split()
    assert text == "neighbour-ok"
    assert float(during) < float(alone) + 1.0, (alone, during)
    assert llm.script.stats()["in_flight"] == 16  # the flood, still held
    llm.script.released.set()
    flood = server.next_response(timeout=120)
    assert flood["id"] == "flood" and flood["result"]["text"] == "flooded"
    stats = llm.script.stats()
    # every flooded call was made, 16 at a time, but those its final frame found still in flight
    assert stats["by_kind"]["sub"] >= 1000 - 16 + 2
    assert stats["max_in_flight"] <= 16 + 1  # the flood's 16, and the neighbour's one
    assert server.close() == 0


def test_a_cost_limit_refuses_a_model_without_a_price_whoever_names_it(
    spawn: Spawn, llm: FixtureServer
) -> None:
    probe = repl(
        *LINK,
        "seen = {name: "
        + _outcome("link.call(name, 'PRICE-PROBE')")
        + " for name in ['gpt-4o', 'unpriced-model']}",
        "answer['content'] = json.dumps(seen)",
        "answer['ready'] = True",
    )
    server = spawn(
        [*NEIGHBOUR_RULES, {"when": "root", "reply": probe}, {"when": "sub", "reply": "probed"}],
        env={"ELIZA_RLM_MODEL": "gpt-4o-mini"},
        args=["--max-cost-usd", "1", "--allow-model", "gpt-4o,unpriced-model"],
    )
    server.ready()
    with neighbour_held(server, llm):
        response = server.call("infer", {"prompt": "x"})
    called = [body["model"] for body in llm.script.bodies]
    assert "unpriced-model" not in called and "gpt-4o" in called
    error = response["error"]  # a call its cost limit refused ends the request
    assert (error["code"], error["data"]["limit"], error["data"]["scope"]) == (
        -32004,
        "max_cost_usd",
        "request",
    )
    assert server.close() == 0


FORGE = repl(
    "import gc",
    "from rlm_server.worker.completion import Channel, ProgressLogger",
    "logger = next(o for o in gc.get_objects() if isinstance(o, ProgressLogger))",
    "channel = next(o for o in gc.get_objects() if isinstance(o, Channel))",
    "channel.send({'event': 'iteration', 'iteration': 999999, 'max_iterations': 10**6})",
    "big = 'T' * 300_000",
    "calls = [{'model': 'm', 'prompt': 'p', 'input_tokens': -5}] * 2000",
    "block = {'code': big, 'stdout': big, 'stderr': 7, 'sub_calls': calls, 'own': big}",
    "tools = [{'name': 'n' * 5000, 'arguments_bytes': -1, 'time_s': -5, 'own': 1}] * 100",
    "logger.steps.extend({'iteration': 99, 'response': big, 'extra': big,"
    " 'code_blocks': [block], 'tool_calls': tools} for _ in range(50))",
    "logger.completed = 999998",  # the library counts this iteration after it: 999999
    "answer['content'] = 'forged'",
    "answer['ready'] = True",
)
STEP_FIELDS = {
    "iteration",
    "response",
    "code_blocks",
    "final_answer",
    "iteration_time_s",
    "tool_calls",
}
BLOCK_FIELDS = {"code", "stdout", "stderr", "execution_time_s", "sub_calls"}


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_a_forged_trajectory_and_iteration_count_are_cut_to_what_the_server_saw(
    spawn: Spawn, llm: FixtureServer, tmp_path: Path
) -> None:
    rules = [*NEIGHBOUR_RULES, {"when": "root", "reply": FORGE}]
    server = spawn(rules, args=["--log-dir", str(tmp_path)])
    server.ready()
    options = {"trajectory": True, "max_iterations": 3, "progress": True}
    with neighbour_held(server, llm):
        result = server.call("infer", {"prompt": "x", "options": options})["result"]
        assert wait_until(lambda: len(list(tmp_path.iterdir())) == 1)  # the neighbour's later
        (log,) = tmp_path.iterdir()
    assert result["text"] == "forged"
    assert result["metadata"]["iterations"] == 1  # one root call, whatever the worker says
    told = [n["params"] for n in server.notifications if n["params"].get("event") == "iteration"]
    assert told and all(e["iteration"] <= e["max_iterations"] == 3 for e in told), told
    steps = result["trajectory"]
    assert [step["iteration"] for step in steps] == [1, 2, 3]  # max_iterations steps at most
    assert all(set(step) == STEP_FIELDS for step in steps)
    assert all(set(b) == BLOCK_FIELDS for step in steps for b in step["code_blocks"])
    assert max(len(s) for s in _strings(steps)) <= 4096
    calls = [c for step in steps for b in step["code_blocks"] for c in b["sub_calls"]]
    assert calls and all(c["input_tokens"] == 0 for c in calls)
    tools = [t for step in steps for t in step["tool_calls"]]  # and the schema holds (harness)
    assert tools and all(t["arguments_bytes"] == 0 and t["time_s"] == 0 for t in tools)
    assert log.stat().st_size < 4 << 20, log.stat().st_size  # forged: 50 steps of ~1 MB
    assert server.close() == 0


FORGED_VALUE = repl(  # a short answer, and a final frame that carries a 2 MB `value` beside it
    "import orjson, types",
    "from rlm_server.worker import frames",
    "def dumps(frame, **options):",  # the worker's JSON encoder (frames.pack), as the final
    "    if isinstance(frame, dict) and 'result' in frame:",  # frame goes through
    "        frame['result']['value'] = ['v' * 1000] * 2000",
    "    return orjson.dumps(frame, **options)",
    "frames.orjson = types.SimpleNamespace(**{**vars(orjson), 'dumps': dumps})",
    "answer['content'] = 'short'",
    "answer['ready'] = True",
)


def test_an_answer_over_max_answer_bytes_is_refused(spawn: Spawn, llm: FixtureServer) -> None:
    rules = [
        *NEIGHBOUR_RULES,
        {"when": "root", "contains": "ASCII-Q", "reply": answer_with("'x' * 2_000_000")},
        {"when": "root", "contains": "UTF8-Q", "reply": answer_with("'é' * 600_000")},
        {"when": "root", "contains": "VALUE-Q", "reply": FORGED_VALUE},
        {"when": "root", "reply": answer_with("'é' * 400_000")},
    ]
    server = spawn(rules, args=["--max-answer-bytes", "1000000"])
    server.ready()
    status = server.call("status", request_id="s")["result"]
    assert (status["max_answer_bytes"], status["max_calls_in_flight"]) == (1_000_000, 16)
    with neighbour_held(server, llm):
        # 2 MB; 600,000 characters but 1.2 MB of UTF-8; a forged 2 MB value beside short text
        for query in ("ASCII-Q", "UTF8-Q", "VALUE-Q"):
            params = {"prompt": "x", "query": query}
            error = server.call("infer", params, request_id=query)["error"]
            assert (error["code"], error["message"]) == (-32603, "Answer too large")
            assert error["data"]["type"] == "answer_too_large"
            assert error["data"]["limit_bytes"] == 1_000_000
            assert error["data"]["usage"]["calls"] == 1
    assert server.call("infer", {"prompt": "x"}, request_id=3)["result"]["text"] == "é" * 400_000
    assert server.close() == 0


def test_clients_are_per_endpoint_and_bounded(llm: FixtureServer) -> None:
    """The broker itself, in this process, against the fixture over HTTP: one client serves
    every model at an endpoint; arguments that differ (a request's temperature) make clients
    of their own, of which at most MAX_CLIENTS idle ones are kept."""
    llm.script.replace([{"reply": "ok"}])
    models = ("m-1", "m-2", "m-3")
    budget = Budget()

    def route(temperature: float) -> Route:
        kwargs: dict[str, Any] = {"model_name": "m-1", "base_url": llm.base_url, "api_key": "k"}
        kwargs = {**kwargs, "sampling_args": {"temperature": temperature}}
        return Route("openai", kwargs, models, frozenset(models), "openai")

    async def calls() -> int:
        broker = Broker(RetryPolicy(0, 10, 10), lifetime=Budget())
        for model in models:
            reply = await broker.call(route(0.0), broker.account(budget), model, "p", print)
            assert reply["text"] == "ok"
        assert len(broker._clients.built) == 1
        for n in range(MAX_CLIENTS + 8):
            await broker.call(route(n / 100), broker.account(budget), "m-2", "p", print)
        return len(broker._clients.built)

    assert anyio.run(calls) == MAX_CLIENTS
    assert [body["model"] for body in llm.script.bodies][:3] == list(models)
