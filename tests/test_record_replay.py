"""--record, --replay and --log-dir: deterministic runs without a provider, and a trajectory file
per request that the library's tools (and `rlm-server view`) read."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import ServerProcess, answer_with, clean_env, repl, server_command

RULES = [
    {"when": "root", "times": 1, "reply": repl("n = len(context)", "s = llm_query('sub q')")},
    {"when": "sub", "reply": "SUB"},
    {"when": "root", "reply": answer_with("s + ':' + str(n) + ':' + context[:5]")},
]
CONTEXT = "hello world, a context of some length " * 10


def _record(spawn: Spawn, tape: Path) -> str:
    server = spawn(RULES, args=["--record", str(tape)])
    server.ready()
    text = str(server.call("infer", {"prompt": CONTEXT, "query": "what?"})["result"]["text"])
    assert server.close() == 0
    return text


def _replaying(spawn: Spawn, llm: FixtureServer, tape: Path) -> ServerProcess:
    """A server that replays `tape` with no key; its endpoint is the fixture, so a call that
    reached a provider would be counted there."""
    env = {
        "ELIZA_RLM_BACKEND": "openai",
        "ELIZA_RLM_MODEL": "scripted",
        "ELIZA_RLM_BASE_URL": llm.base_url,
    }
    return spawn(raw_env=env, args=["--replay", str(tape)])


def test_a_replay_answers_without_a_provider(
    spawn: Spawn, llm: FixtureServer, tmp_path: Path
) -> None:
    tape = tmp_path / "tape"
    recorded = _record(spawn, tape)
    assert recorded == f"SUB:{len(CONTEXT)}:hello"
    assert len(list(tape.glob("*.json"))) == 3  # two root calls and a sub-call
    replaying = _replaying(spawn, llm, tape)
    assert replaying.ready()["available"] is True
    assert llm.script.stats()["requests"] == 0  # spawn() reset the fixture's counters
    result = replaying.call("infer", {"prompt": CONTEXT, "query": "what?"})["result"]
    assert result["text"] == recorded  # the REPL really ran the recorded code over the context
    assert result["usage"]["calls"] == 3
    assert llm.script.stats()["requests"] == 0
    assert replaying.close() == 0


def test_a_replay_miss_fails_naming_the_call_and_calls_nobody(
    spawn: Spawn, llm: FixtureServer, tmp_path: Path
) -> None:
    tape = tmp_path / "tape"
    _record(spawn, tape)
    replaying = _replaying(spawn, llm, tape)
    replaying.ready()
    error = replaying.call("infer", {"prompt": "another context"})["error"]
    assert error["code"] == -32000
    data = error["data"]
    assert data["type"] == "replay_miss" and data["retryable"] is False
    assert len(data["hash"]) == 64
    assert llm.script.stats()["requests"] == 0  # since spawn() reset the counters
    assert replaying.close() == 0


def test_record_and_replay_together_is_a_configuration_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [*server_command(), "--record", str(tmp_path / "a"), "--replay", str(tmp_path / "b")],
        env=clean_env(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert len(done.stderr.decode().splitlines()) == 1


def test_log_dir_writes_the_librarys_format_without_the_context(
    spawn: Spawn, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    server = spawn(RULES, args=["--log-dir", str(logs)])
    server.ready()
    secret_context = "SECRET-" + "z" * 50_000
    server.call("infer", {"prompt": secret_context, "query": "what?"})
    assert server.close() == 0
    [log] = list(logs.glob("rlm_*.jsonl"))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["type"] for line in lines] == ["metadata", "iteration", "iteration", "result"]
    metadata, first, second, result = lines
    assert (metadata["root_model"], metadata["query"]) == ("scripted", "what?")
    assert first["code_blocks"][0]["code"].startswith("n = len(context)")
    [sub] = first["code_blocks"][0]["result"]["rlm_calls"]
    assert (sub["prompt"], sub["response"]) == ("sub q", "SUB")
    assert second["final_answer"] is not None
    assert result["outcome"] == "success" and result["text"].startswith("SUB:")
    assert result["usage"]["calls"] == 3
    assert "z" * 1000 not in log.read_text()  # never the context
