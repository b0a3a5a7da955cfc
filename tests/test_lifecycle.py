"""Start-up, configuration errors, signals, end of input, and no worker outliving the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import (
    alive,
    answer_with,
    clean_env,
    descendants,
    fixture_env,
    server_command,
    wait_until,
    zygote_of,
)

from rlm_server.config import load_config
from rlm_server.engine.engine import Engine
from rlm_server.frontends.lifecycle import Lifecycle

HELD = [{"when": "root", "hold": True, "reply": answer_with("'done'")}]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ELIZA_RLM_MAX_ITERATIONS", "abc"),
        ("ELIZA_RLM_MAX_ITERATIONS", "0"),
        ("ELIZA_RLM_MAX_DEPTH", "-1"),
        ("ELIZA_RLM_MAX_CONCURRENCY", "0"),
        ("ELIZA_RLM_TIMEOUT", "-1"),
        ("ELIZA_RLM_RETRY_DELAY", "abc"),
        ("ELIZA_RLM_STRICT", "maybe"),
        ("ELIZA_RLM_BACKEND", "nonsense"),
        ("ELIZA_RLM_ENV", "moon"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(name: str, value: str) -> None:
    done = subprocess.run(
        server_command(), env=clean_env({name: value}), capture_output=True, timeout=30, input=b""
    )
    assert done.returncode == 2
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert name in lines[0] and value in lines[0]


def test_bad_flag_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [*server_command(), "--max-depth", "0"], env=clean_env(), capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "rlm-server: configuration error: --max-depth must be a positive integer, got '0'"
    ]


def test_executor_ray_without_ray_is_one_line_and_exit_2() -> None:
    """Python's own way to make a module absent (sys.modules[name] = None), so this runs
    whether or not Ray is installed here."""
    blocked = (
        "import sys; sys.modules['ray'] = None; from rlm_server.cli import main; sys.exit(main())"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked, "--executor", "ray", "--ray-address", "127.0.0.1:1"],
        env=clean_env(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "rlm-server: configuration error: --executor ray needs Ray: pip install 'rlm-server[ray]'"
    ]


def test_requests_read_before_end_of_input_are_all_served(spawn: Spawn) -> None:
    server = spawn([{"when": "root", "reply": answer_with("context")}])
    for i in range(5):
        server.request(i, "infer", {"prompt": f"p{i}"})
    assert server.close() == 0
    server.ready()
    answered = server.responses_by_id(5)
    assert {i: r["result"]["text"] for i, r in answered.items()} == {i: f"p{i}" for i in range(5)}


def test_sigterm_drains_and_a_second_signal_cancels(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(HELD, env={"ELIZA_RLM_VERBOSE": "true"})  # logs when it handles the signal
    server.ready()
    server.request(1, "infer", {"prompt": "ctx"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
    server.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: any("received SIGTERM" in x for x in server.stderr_lines))
    server.request(2, "infer", {"prompt": "ctx"})  # read after the signal: refused
    refused = server.next_response()
    assert refused["id"] == 2 and refused["error"]["data"]["type"] == "shutting_down"
    assert server.call("status")["result"]["in_flight"] == 1  # still serving while draining
    llm.script.released.set()
    assert server.next_response()["result"]["text"] == "done"
    assert server.process.wait(timeout=30) == 0

    llm.script.replace(HELD)
    second = spawn(HELD)
    second.ready()
    second.request(1, "infer", {"prompt": "ctx"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
    second.process.send_signal(signal.SIGTERM)
    second.process.send_signal(signal.SIGINT)
    assert second.next_response()["error"]["code"] == -32800
    assert second.process.wait(timeout=30) == 0
    llm.script.released.set()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_right_after_ready_is_a_graceful_stop(spawn: Spawn, signum: int) -> None:
    """`ready` comes before the event loop that handles signals (server.py): one sent at once
    must still stop the server as it would later, answering what it read, and exit 0."""
    for _ in range(5):
        server = spawn()
        server.request(1, "status")
        server.ready()
        server.process.send_signal(signum)
        assert server.process.wait(timeout=30) == 0
        assert server.responses_by_id(1)[1]["result"]["in_flight"] == 0


@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
def test_no_worker_outlives_the_server(spawn: Spawn, llm: FixtureServer, how: str) -> None:
    server = spawn([*HELD, {"when": "root", "reply": answer_with("'x'")}])
    server.ready()
    for i in range(3):
        server.request(i, "infer", {"prompt": "ctx"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 3)
    pid = server.process.pid
    family = descendants(pid)
    assert len(family) >= 4, family  # the zygote and one worker per running request
    if how == "shutdown":
        server.request("bye", "shutdown", {"grace_s": 0})
        responses = server.responses_by_id(4)
        assert responses["bye"]["result"] == {"shutdown": True}
        assert all(responses[i]["error"]["code"] == -32800 for i in range(3))
        assert server.process.wait(timeout=30) == 0
    else:
        os.kill(pid, signal.SIGKILL)
        server.process.wait(timeout=30)
    assert wait_until(lambda: not alive(family), timeout=10), alive(family)
    llm.script.released.set()


def test_stub_mode_reason_and_strict_mode(spawn: Spawn) -> None:
    stub = spawn(raw_env={"ELIZA_RLM_BACKEND": "anthropic"})
    ready = stub.ready()
    assert (ready["available"], ready["stub"]) == (False, True)
    status = stub.call("status")["result"]
    assert "ANTHROPIC_API_KEY" in status["reason"]
    assert stub.call("infer", {"prompt": "x"})["result"]["stub"] is True
    assert stub.close() == 0

    strict = spawn(raw_env={"ELIZA_RLM_BACKEND": "anthropic"}, args=["--strict"])
    assert strict.ready()["stub"] is False
    error = strict.call("infer", {"prompt": "x"})["error"]
    assert error["code"] == -32003 and "ANTHROPIC_API_KEY" in error["data"]["reason"]
    assert strict.close() == 0


def test_a_per_request_backend_without_credentials_is_a_stub(spawn: Spawn) -> None:
    server = spawn([{"when": "root", "reply": answer_with("'real'")}])
    server.ready()
    assert server.call("infer", {"prompt": "x"})["result"]["text"] == "real"
    other = server.call("infer", {"prompt": "x", "options": {"backend": "gemini"}})["result"]
    assert other["stub"] is True and other["metadata"]["backend"] == "gemini"
    assert server.call("status")["result"]["available"] is True
    assert server.close() == 0


def test_a_dead_zygote_is_replaced(spawn: Spawn) -> None:
    server = spawn([{"when": "root", "reply": answer_with("'alive'")}])
    server.ready()
    assert server.call("infer", {"prompt": "ctx"})["result"]["text"] == "alive"
    zygotes = [zygote_of(server.process.pid)]
    os.kill(zygotes[0], signal.SIGKILL)
    assert wait_until(lambda: not alive(zygotes))
    assert server.call("infer", {"prompt": "ctx"})["result"]["text"] == "alive"
    assert server.close() == 0


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_the_client_closing_our_stdout_stops_the_server_cleanly(
    llm: FixtureServer, tmp_path: Path
) -> None:
    llm.script.replace(HELD)
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            server_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=clean_env(fixture_env(llm.base_url)),
        )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert b'"method":"ready"' in process.stdout.readline()
        process.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"infer","params":{"prompt":"x"}}\n')
        process.stdin.flush()
        assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
        process.stdout.close()  # nobody will read the answers now
        process.stdin.write(b'{"jsonrpc":"2.0","id":2,"method":"status"}\n')
        process.stdin.flush()
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        llm.script.released.set()
    logged = stderr_path.read_text()
    assert "protocol output closed" in logged
    assert "Traceback" not in logged


def test_an_output_that_cannot_take_ready_stops_the_server_cleanly(tmp_path: Path) -> None:
    """Our stdout unwritable from the start: the stop is asked for before the event loop runs,
    and still ends in exit 0, without a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: writing `ready` fails at once
    try:
        done = subprocess.run(
            server_command(),
            input=b'{"jsonrpc":"2.0","id":1,"method":"status"}\n',
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=clean_env(),
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert b"protocol output closed" in done.stderr
    assert b"Traceback" not in done.stderr


def test_a_front_end_that_reads_by_itself_runs_inside_the_lifecycle() -> None:
    """What a front end whose SDK owns stdio (MCP) gets: Lifecycle.run around its own reading.
    A request it counts in flight holds a stop until it is answered; then its reading is
    cancelled and run returns the exit code."""
    config = load_config(["--sandbox", "off"], {})
    events: list[str] = []

    async def main() -> int:
        lifecycle = Lifecycle(Engine(config, {}), config)
        finish = anyio.Event()

        async def request() -> None:
            with lifecycle.in_flight():
                await finish.wait()
                events.append("answered")

        async def read() -> None:
            async with anyio.create_task_group() as sdk:
                sdk.start_soon(request)
                await anyio.sleep(0.05)
                lifecycle.stop(30)
                events.append("stopping")
                await anyio.sleep(0.05)
                events.append("still reading")
                finish.set()
                await anyio.sleep_forever()  # the SDK's loop: ended by the lifecycle

        return await lifecycle.run(read)

    assert anyio.run(main) == 0
    assert events == ["stopping", "still reading", "answered"]
