"""Plugin compatibility mode: `python -m elizaos_plugin_rlm.server` through our shim, spoken to
in the elizaOS plugin's own line protocol, against the scripted model."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from fixtures.openai_fixture import FixtureServer
from harness import alive, clean_env, descendants, repl, wait_until

from rlm_server.frontends.plugin import shim as plugin_shim
from rlm_server.frontends.plugin.wire import plugin_environ

Json = dict[str, Any]

FIND_CODE = repl(
    "import re",
    'text = " ".join(m["content"] for m in context)',
    r'answer["content"] = re.search(r"vault code is (\w+)", text).group(1)',
    'answer["ready"] = True',
)


class PluginServer:
    """The server started the way the plugin's clients start theirs, read line by line."""

    def __init__(self, shim: Path, env: Mapping[str, str]) -> None:
        environment = clean_env({**env, "PYTHONPATH": str(shim)})
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "elizaos_plugin_rlm.server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
        )
        self.lines: queue.Queue[Json] = queue.Queue()
        self.stderr = b""
        threading.Thread(target=self._read, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.put(json.loads(raw))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()

    def stderr_after_exit(self) -> str:
        """Everything the server wrote on stderr; call once it has exited."""
        self._stderr_reader.join(timeout=10)
        return self.stderr.decode()

    def next(self, timeout: float = 30) -> Json:
        return self.lines.get(timeout=timeout)

    def send(self, message: Any) -> None:
        assert self.process.stdin is not None
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.process.stdin.write(raw + b"\n")
        self.process.stdin.flush()

    def answers(self, count: int) -> dict[Any, Json]:
        found = [self.next() for _ in range(count)]
        return {answer["id"]: answer for answer in found}


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("shim")
    assert plugin_shim.main(["--target", str(target)]) == 0
    return target


@pytest.fixture
def plugin(shim: Path, llm: FixtureServer) -> Iterator[Any]:
    started: list[PluginServer] = []

    def start(rules: list[Json], **env: str) -> PluginServer:
        llm.script.replace(rules)
        base = {
            "ELIZA_RLM_BACKEND": "openai",
            "ELIZA_RLM_BASE_URL": llm.base_url,
            "ELIZA_RLM_ROOT_MODEL": "scripted",
            "OPENAI_API_KEY": "test-key",
            "ELIZA_RLM_RETRY_DELAY": "0.01",
            "ELIZA_RLM_RETRY_MAX_DELAY": "0.05",
        }
        server = PluginServer(shim, {**base, **env})
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_the_published_clients_exchange_gets_real_answers(plugin: Any) -> None:
    server = plugin([{"when": "root", "reply": FIND_CODE}])
    ready = server.next(timeout=10)
    assert time.monotonic() - server.started < 10
    assert ready["ready"] is True and ready["available"] is True
    context = "filler. " * 20_000 + "The vault code is QX7. " + "more. " * 100
    opts = {"maxIterations": 3, "logTrajectories": True, "trackCosts": True, "stream": False}
    server.send({"id": 1, "method": "infer", "params": {"messages": context, "opts": opts}})
    server.send({"id": 2, "method": "status", "params": {}})
    answers = server.answers(2)

    result = answers[1]["result"]
    assert set(answers[1]) == {"id", "result"}
    assert result["text"] == "QX7"
    assert result["metadata"] == {"stub": False, "iterations": 1, "depth": 1, "error": None}
    assert result["cost"]["root_input_tokens"] > 0 and result["cost"]["total_tokens"] > 0
    trajectory = result["trajectory"]
    assert trajectory["prompt_length"] == len(context)
    assert trajectory["steps"][0]["strategy"] == "grep"
    assert "vault code" in trajectory["steps"][0]["code_executed"]
    status = answers[2]["result"]
    assert {k: status[k] for k in ("available", "backend", "environment")} == {
        "available": True,
        "backend": "openai",
        "environment": "local",
    }
    assert status["max_iterations"] == status["maxIterations"] == 4
    assert status["max_depth"] == status["maxDepth"] == 1


def test_snake_case_opts_from_the_rust_crate_are_applied(plugin: Any, llm: FixtureServer) -> None:
    server = plugin([{"when": "root", "reply": FIND_CODE}])
    server.next()
    opts = {"max_iterations": 2, "root_model": "other-model", "max_tokens": 77, "stream": False}
    opts |= {"top_p": 0.5, "stop_sequences": []}
    messages = [{"role": "user", "content": "The vault code is ABC."}]
    server.send({"id": 0, "method": "infer", "params": {"messages": messages, "opts": opts}})
    answer = server.next()
    assert answer["result"]["text"] == "ABC"
    body = llm.script.bodies[-1]
    assert body["model"] == "other-model"
    assert body["max_completion_tokens"] == 77
    assert "top_p" not in body
    server.process.terminate()
    server.process.wait(timeout=10)
    notes = server.stderr_after_exit()
    assert "opts.top_p is accepted but not applied" in notes
    assert "stream" not in notes and "stop_sequences" not in notes, "false and [] were not set"


def test_errors_are_strings_under_the_requests_id(plugin: Any) -> None:
    server = plugin([])
    server.next()
    server.send({"id": 7, "method": "nope", "params": {}})
    server.send(b"{not json")
    server.send({"id": 8, "method": "infer", "params": {"messages": "x", "opts": {"maxDepth": 0}}})
    server.send({"id": 9, "method": "infer", "params": {"messages": []}})
    answers = server.answers(4)
    assert answers[7] == {"id": 7, "error": "Unknown method: nope"}
    assert answers[0] == {"id": 0, "error": "Invalid JSON"}
    assert answers[8] == {
        "id": 8,
        "error": "Invalid params: opts.maxDepth must be an integer from 1 to 10",
    }
    assert answers[9]["error"].startswith("Invalid params: messages")


def test_a_failed_sub_call_is_an_error_string_unless_model_code_asked_for_it(
    plugin: Any, llm: FixtureServer
) -> None:
    sub_call = repl(
        "s = llm_query('sub')", "answer['content'] = '5 ' + s", "answer['ready'] = True"
    )
    server = plugin(
        [{"when": "root", "reply": sub_call}, {"when": "sub", "status": 500}],
        ELIZA_RLM_MAX_RETRIES="0",
    )
    server.next()
    server.send({"id": 1, "method": "infer", "params": {"messages": "x"}})
    assert server.next() == {"id": 1, "error": "LLM backend failed (backend_error)"}
    opts = {"subcallErrors": "model"}
    server.send({"id": 2, "method": "infer", "params": {"messages": "x", "opts": opts}})
    result = server.next()["result"]
    assert result["text"].startswith("5 ") and "backend_error" in result["text"]
    assert result["metadata"]["failed_calls"] == 1
    assert llm.script.stats()["requests"] == 4  # two root calls, two sub-calls


def test_an_id_past_64_bits_beside_a_lone_surrogate_is_answered(plugin: Any) -> None:
    """The second parser (for lone surrogates) once kept such an id whole, and writing it back
    stopped the server."""
    server = plugin([])
    server.next()
    server.send(b'{"id":18446744073709551616,"method":"status","u":"\\ud800"}')
    server.send({"id": 2, "method": "status"})
    answers = server.answers(2)
    assert answers[2]["result"]["server"] == "rlm-server"
    assert answers[18446744073709551616.0]["result"]["server"] == "rlm-server"  # read as a float


def test_long_lines_are_parsed_aside_and_over_long_ones_refused(plugin: Any) -> None:
    server = plugin([{"when": "root", "reply": FIND_CODE}], ELIZA_RLM_MAX_MESSAGE_BYTES="3000000")
    server.next()
    context = "x" * (2 << 20) + " The vault code is BIG2. "
    server.send({"id": 1, "method": "infer", "params": {"messages": context}})
    server.send({"id": 2, "method": "status", "params": {}})
    server.send({"id": 3, "method": "infer", "params": {"messages": "y" * 3_000_001}})
    answers = server.answers(3)
    assert answers[1]["result"]["text"] == "BIG2"
    assert answers[2]["result"]["available"] is True
    assert answers[3] == {"id": 3, "error": "Message too large (over 3000000 bytes)"}


def test_a_flood_of_pipelined_requests_is_answered_in_full(plugin: Any) -> None:
    server = plugin([])
    server.next()
    requests = ({"id": n, "method": "status", "params": {}} for n in range(1, 1001))
    lines = [json.dumps(request).encode() for request in requests]
    server.send(b"\n".join(lines))
    answers = server.answers(1000)
    assert sorted(answers) == list(range(1, 1001))
    assert all(answer["result"]["max_depth"] == 1 for answer in answers.values())


def test_a_resent_identical_infer_joins_the_running_one(plugin: Any, llm: FixtureServer) -> None:
    server = plugin([{"when": "root", "reply": FIND_CODE, "hold": True}])
    server.next()
    params = {"messages": [{"role": "user", "content": "The vault code is J01."}], "opts": {}}
    server.send({"id": 1, "method": "infer", "params": params})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
    server.send({"id": 2, "method": "infer", "params": params})  # the client's re-send
    server.send({"id": 3, "method": "status", "params": {}})
    assert server.next()["result"]["in_flight"] == 1
    llm.script.released.set()
    answers = server.answers(2)
    assert answers[1]["result"]["text"] == answers[2]["result"]["text"] == "J01"
    assert llm.script.stats()["by_kind"]["root"] == 1


def test_without_a_backend_answers_are_the_plugins_stubs(plugin: Any) -> None:
    server = plugin([], OPENAI_API_KEY="", ELIZA_RLM_BASE_URL="")
    assert server.next() == {
        "ready": True,
        "available": False,
        "server": "rlm-server",
        "version": "0.1.0",
        "stub": True,
    }
    server.send({"id": 1, "method": "infer", "params": {"messages": "hello"}})
    assert server.next()["result"] == {
        "text": "[RLM STUB] RLM backend not available",
        "metadata": {"stub": True, "iterations": None, "depth": None, "error": None},
        "cost": None,
        "trajectory": None,
    }


def test_shutdown_then_sigterm_leaves_no_process(plugin: Any) -> None:
    server = plugin([{"when": "root", "reply": FIND_CODE}])
    server.next()
    params = {"messages": "The vault code is Z9.", "opts": {}}
    server.send({"id": 1, "method": "infer", "params": params})
    assert server.next()["result"]["text"] == "Z9"
    family = descendants(server.process.pid)
    assert family, "the zygote runs below the server"
    server.send({"id": 2, "method": "shutdown", "params": {}})
    assert server.next() == {"id": 2, "result": {"shutdown": True}}
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)  # what the TypeScript client does next
    assert server.process.wait(timeout=10) == 0
    assert wait_until(lambda: not alive(family))


def test_shutdown_cancels_what_outlives_the_grace(plugin: Any, llm: FixtureServer) -> None:
    server = plugin(
        [{"when": "root", "reply": FIND_CODE, "hold": True}], ELIZA_RLM_SHUTDOWN_GRACE="0.2"
    )
    server.next()
    server.send({"id": 1, "method": "infer", "params": {"messages": "held"}})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
    server.send({"id": 2, "method": "shutdown", "params": {}})
    server.send({"id": 3, "method": "infer", "params": {"messages": "too late"}})
    answers = server.answers(3)
    assert answers[1] == {"id": 1, "error": "Request cancelled (cancelled)"}
    assert answers[3] == {"id": 3, "error": "Server shutting down (shutting_down)"}
    assert answers[2] == {"id": 2, "result": {"shutdown": True}}
    assert server.process.wait(timeout=10) == 0
    llm.script.released.set()


def test_plugin_environment_is_read_in_the_plugins_names_and_units() -> None:
    translated = plugin_environ(
        {
            "ELIZA_RLM_ROOT_MODEL": "root",
            "ELIZA_RLM_SUBCALL_MODEL": "sub",
            "ELIZA_RLM_RETRY_DELAY": "1.5",
            "ELIZA_RLM_RETRY_MAX_DELAY": "30",
        }
    )
    assert translated["ELIZA_RLM_MODEL"] == "root"
    assert translated["ELIZA_RLM_SUB_MODEL"] == "sub"
    assert translated["ELIZA_RLM_RETRY_DELAY"] == "1500.0"
    assert translated["ELIZA_RLM_RETRY_MAX_DELAY"] == "30000.0"
    assert float(translated["ELIZA_RLM_TIMEOUT"]) < 60, "answer before the clients give up"
    assert plugin_environ({"ELIZA_RLM_TIMEOUT": "120"})["ELIZA_RLM_TIMEOUT"] == "120"


def test_shim_never_touches_a_real_plugin(tmp_path: Path) -> None:
    real = tmp_path / "elizaos_plugin_rlm"
    real.mkdir()
    (real / "__init__.py").write_text('"""The real elizaOS plugin."""\n')
    assert plugin_shim.main(["--target", str(tmp_path)]) == 1
    assert plugin_shim.main(["--target", str(tmp_path), "--remove"]) == 1
    assert (real / "__init__.py").read_text() == '"""The real elizaOS plugin."""\n'


def test_shim_refuses_an_interpreter_that_imports_the_real_plugin(tmp_path: Path) -> None:
    real = tmp_path / "site" / "elizaos_plugin_rlm"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("")
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\nPYTHONPATH={real.parent} exec {sys.executable} "$@"\n')
    fake_python.chmod(0o755)
    with pytest.raises(plugin_shim.ShimError, match="real elizaos-plugin-rlm"):
        plugin_shim.resolve_target(str(fake_python), removing=False)


def test_shim_says_why_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    assert plugin_shim.main(["--target", str(blocker)]) == 1
    assert "rlm-server-plugin-shim:" in capsys.readouterr().err


def test_shim_installs_updates_and_removes_only_itself(tmp_path: Path) -> None:
    assert plugin_shim.main(["--target", str(tmp_path)]) == 0
    assert plugin_shim.main(["--target", str(tmp_path)]) == 0  # again: updates our own
    server = (tmp_path / "elizaos_plugin_rlm" / "server.py").read_text()
    assert "from rlm_server.frontends.plugin.frontend import main" in server
    assert plugin_shim.main(["--target", str(tmp_path), "--remove"]) == 0
    assert not (tmp_path / "elizaos_plugin_rlm").exists()
    assert os.listdir(tmp_path) == []


def test_plugin_mode_keeps_the_key_out_of_its_proc_environ(plugin: Any) -> None:
    """Plugin mode starts through the same path as `rlm-server`: the key is read once and
    blanked from the environment block that /proc/PID/environ shows to model code."""
    secret = "sk-plugin-mode-7f3a9c"
    server = plugin([], OPENAI_API_KEY=secret)
    assert server.next()["ready"] is True
    environ = Path(f"/proc/{server.process.pid}/environ").read_bytes()
    assert b"OPENAI_API_KEY=" in environ and secret.encode() not in environ
    server.send({"id": 1, "method": "shutdown", "params": {}})
    assert server.next()["result"] == {"shutdown": True}


def test_params_and_ids_nested_deeper_than_json_can_be_written_back_are_answered(
    plugin: Any,
) -> None:
    """orjson reads 1024 levels and writes 254: such an infer's params (hashed to join resent
    infers) and such an id (written back in the answer) once stopped the server."""
    server = plugin([])
    server.next()
    deep = b"[" * 300 + b"]" * 300
    server.send(b'{"id":1,"method":"infer","params":{"messages":"x","x":' + deep + b"}}")
    server.send(b'{"id":' + deep + b',"method":"status"}')
    server.send({"id": 2, "method": "status"})
    answers = server.answers(3)
    assert answers[1] == {"id": 1, "error": answers[1]["error"]}
    assert "nested too deeply" in answers[1]["error"]
    assert answers[0]["result"]["server"] == "rlm-server"  # the id could not be written back
    assert answers[2]["result"]["server"] == "rlm-server"
