"""End to end through the real `rlm` library, over real HTTP to the scripted model."""

from __future__ import annotations

import secrets

import orjson
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import repl


def test_answer_carries_a_fact_only_the_repl_could_read(spawn: Spawn, llm: FixtureServer) -> None:
    fact = secrets.token_hex(8).upper()
    context = "filler text. " * 100_000 + f"The vault code is {fact}. " + "more filler. " * 1000
    root = repl(
        "import re",
        r'code = re.search(r"vault code is (\w+)", context).group(1)',
        'word = llm_query("Say the magic word")',
        'answer["content"] = code + " " + word',
        'answer["ready"] = True',
    )
    server = spawn([{"when": "root", "reply": root}, {"when": "sub", "reply": "please"}])
    server.ready()
    params = {"prompt": context, "query": "What is the vault code?", "options": {"progress": True}}
    result = server.call("infer", params)["result"]

    assert result["text"] == f"{fact} please"
    sent_to_model = orjson.dumps(list(llm.script.bodies)).decode()
    assert fact not in sent_to_model, "the model was never shown the context"
    stats = llm.script.stats()
    assert stats["by_kind"] == {"root": 1, "sub": 1}
    assert result["usage"]["calls"] == stats["requests"] == 2
    assert result["usage"]["models"]["scripted"]["calls"] == 2
    assert result["usage"]["input_tokens"] > 0 and result["usage"]["output_tokens"] > 0
    assert result["metadata"]["iterations"] == 1
    events = [n["params"] for n in server.notifications if n["method"] == "$/progress"]
    assert [e["event"] for e in events] == ["started", "subcall", "iteration"]
    assert all(e["id"] == "call" for e in events)
    elapsed = [e["elapsed_ms"] for e in events]
    assert elapsed == sorted(elapsed)
    assert server.close() == 0


def test_per_request_options_apply_to_that_request_only(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn([{"when": "root", "reply": "no code, just talk"}])
    server.ready()
    options = {"model": "other-model", "max_iterations": 2, "temperature": 0.25, "max_tokens": 77}
    result = server.call("infer", {"prompt": "ctx", "options": options})["result"]
    assert result["metadata"]["model"] == "other-model"
    # two turns without an answer, then the library's closing "final answer" call
    assert llm.script.stats()["requests"] == 3
    body = llm.script.bodies[0]
    assert body["model"] == "other-model"
    assert body["temperature"] == 0.25
    assert body["max_completion_tokens"] == 77
    status = server.call("status")["result"]
    assert status["model"] == "scripted" and status["max_iterations"] == 4
    after = server.call("infer", {"prompt": "ctx"})["result"]
    assert after["metadata"]["model"] == "scripted"
    assert "temperature" not in llm.script.bodies[-1]
    assert server.close() == 0


def test_sub_model_routes_llm_query(spawn: Spawn, llm: FixtureServer) -> None:
    root = repl('answer["content"] = llm_query("hi")', 'answer["ready"] = True')
    server = spawn([{"when": "root", "reply": root}, {"when": "sub", "reply": "from sub"}])
    server.ready()
    options = {"sub_model": "small-model"}
    result = server.call("infer", {"prompt": "ctx", "options": options})["result"]
    assert result["text"] == "from sub"
    assert [b["model"] for b in llm.script.bodies] == ["scripted", "small-model"]
    assert set(result["usage"]["models"]) == {"scripted", "small-model"}
    assert server.close() == 0


def test_trajectory_only_when_asked(spawn: Spawn) -> None:
    server = spawn(
        [{"when": "root", "reply": repl('answer["content"] = "x"', 'answer["ready"] = True')}]
    )
    server.ready()
    without = server.call("infer", {"prompt": "ctx"})["result"]
    assert "trajectory" not in without
    with_it = server.call("infer", {"prompt": "ctx", "options": {"trajectory": True}})["result"]
    assert len(with_it["trajectory"]) == 1
    assert with_it["trajectory"][0]["final_answer"] == "x"
    assert server.close() == 0
