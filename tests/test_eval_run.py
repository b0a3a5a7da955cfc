"""`rlm-server eval` end to end: against the scripted model (examples/eval_fixture.py, the
README's one command) it finishes and writes its rows, table and plot; what it recorded replays
offline, with no model at all, to identical scores (recorded three tasks at a time, replayed one
at a time); --budget-usd stops it before it spends more.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
from fixtures.openai_fixture import FixtureServer
from harness import clean_env, fixture_env, server_command

from rlm_server.config import load_config
from rlm_server.engine.engine import Engine
from rlm_server.errors import BackendError, RpcError

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--sizes", "8k,40k", "--seeds", "2", "--window", "20k"]
RUNS = 4 * 2 * 2 * 2  # tasks x sizes x seeds x methods


def against_fixture(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "eval_fixture.py"), *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def scores(out: Path) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    return {
        (r["task"], r["size"], r["seed"], r["method"]): (r["score"], r["calls"], r["answer"])
        for r in rows(out)
    }


def test_a_fixture_run_writes_its_table_and_plot_and_replays_offline(tmp_path: Path) -> None:
    out, tape = tmp_path / "out", tmp_path / "tape"
    done = against_fixture(*SMALL, "--out", str(out), "--record", str(tape), "--jobs", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    found = rows(out)
    assert len(found) == RUNS and all(r["error"] is None for r in found)
    rlm = [r for r in found if r["method"] == "rlm"]
    assert all(r["score"] == 1.0 and r["calls"] == 1 for r in rlm)  # its code read the context
    base = {(r["task"], r["size"], r["seed"]): r for r in found if r["method"] == "base"}
    assert all(r["cut"] == (r["size"] > 20_000) for r in base.values())
    assert base["aggregate", 8000, 0]["score"] == 0.75**2  # the scripted count is off by two
    assert base["aggregate", 40000, 0]["score"] == 0.0  # cut: the base model cannot tell
    assert 0 < base["pairs", 8000, 1]["score"] < 1  # half the pairs: F1 between
    report = (out / "report.md").read_text()
    assert done.stdout == report
    assert "| pairs | 40k | 100.0 | 0.0 |" in report and "cut to 20k in 2/2" in report
    assert (out / "scores.svg").read_text().count("<polyline") == 2 * 4
    assert f"{RUNS}/{RUNS} done" in done.stderr

    replayed = tmp_path / "replayed"
    offline = subprocess.run(
        [*server_command(), "eval", *SMALL, "--out", str(replayed), "--replay", str(tape)],
        # no key, and a closed port: a call that was not recorded could reach nothing
        env=clean_env(
            {
                "ELIZA_RLM_BACKEND": "openai",
                "ELIZA_RLM_MODEL": "scripted",
                "ELIZA_RLM_BASE_URL": "http://127.0.0.1:9/v1",
            }
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert scores(replayed) == scores(out)


def test_the_budget_stops_the_run_before_it_spends_more(tmp_path: Path) -> None:
    out = tmp_path / "out"
    budget = 0.005  # gpt-4o-mini's price, for the fixture's token counts: a few runs
    done = against_fixture(
        *SMALL, "--out", str(out), "--model", "gpt-4o-mini", "--budget-usd", str(budget)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = rows(out)
    assert 1 < len(found) < RUNS
    *finished, last = found
    assert last["score"] is None and last["error"] == "budget_exceeded"
    assert all(r["score"] is not None and r["cost_usd"] > 0 for r in finished)
    assert sum(r["cost_usd"] or 0 for r in found) <= budget
    assert "Stopped early" in (out / "report.md").read_text()
    assert "stopped: the budget is spent" in done.stderr


def test_a_cost_limit_on_a_model_without_a_price_is_refused(tmp_path: Path) -> None:
    done = against_fixture(*SMALL, "--out", str(tmp_path), "--budget-usd", "1")
    assert done.returncode == 2
    assert "no price is known for model 'scripted'" in done.stderr


def _ask_model(llm: FixtureServer, rules: list[dict[str, Any]], *flags: str) -> Any:
    """engine.ask_model against the fixture, from an engine built as `rlm-server eval` builds
    it; its answer, or the error it raised."""
    llm.script.replace(rules)
    environ = fixture_env(llm.base_url)
    engine = Engine(load_config(list(flags), environ), environ)

    async def ask() -> Any:
        try:
            return await engine.ask_model("Question: what is the code?")
        except RpcError as error:
            return error
        finally:
            await engine.release_models()  # not left to a later test's event loop

    return anyio.run(ask)


def test_ask_model_is_one_plain_call_through_the_broker(llm: FixtureServer) -> None:
    result = _ask_model(llm, [{"when": "sub", "contains": "what is the code", "reply": "42"}])
    assert result.text == "42"
    assert result.usage["calls"] == 1 and result.usage["input_tokens"] > 0
    assert result.metadata.model == "scripted"
    assert llm.script.stats()["by_kind"] == {"root": 0, "sub": 1}  # no system prompt, no REPL


def test_ask_model_retries_then_fails_with_the_usage_spent(llm: FixtureServer) -> None:
    error = _ask_model(llm, [{"status": 503}], "--max-retries", "1")
    assert isinstance(error, BackendError) and error.data["attempts"] == 2
    assert error.data["usage"]["calls"] == 0
    assert llm.script.stats()["requests"] == 2


def test_without_a_usable_backend_it_says_why_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [*server_command(), "eval", "--out", str(out)],
        env=clean_env(),  # the default backend, with no key
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "rlm-server eval: no usable backend: no credentials for backend gemini" in done.stderr
    assert not out.exists()
