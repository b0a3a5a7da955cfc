"""Regression tests for the hardening round: each one failed on the server before it.

A hostile client, a client that stops reading, model code that forges frames or starts
processes, stops that arrive in every order, and long lines: the server answers every request
exactly once, keeps serving, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import (
    alive,
    answer_with,
    clean_env,
    descendants,
    fixture_env,
    repl,
    server_command,
    wait_until,
)

HELD = [{"when": "root", "hold": True, "reply": answer_with("'done'")}]
ECHO = [{"when": "root", "reply": answer_with("context[:8]")}]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- 1, 2: any JSON value in any member --------------------------------------------------------


def _infer(params: Any, request_id: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "infer", "params": params}


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"jsonrpc": "2.0", "id": 1, "method": []}, -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": {}}, -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": None}, -32600),
        ({"jsonrpc": "2.0", "id": [], "method": "status"}, -32600),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "status"}, -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": "status", "params": "x"}, -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": "status", "params": {"ctx": 1}}, -32602),
        (
            {"jsonrpc": "2.0", "id": 1, "method": "infer", "params": {"ctx": 1, "prompt": "x"}},
            -32602,
        ),
        (
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "infer",
                "params": {"prompt": "x", "options": []},
            },
            -32602,
        ),
        ({"jsonrpc": "2.0", "id": 1, "method": "infer", "params": {"prompt": {}}}, -32602),
        ({"jsonrpc": "2.0", "id": 1, "method": "shutdown", "params": {"grace_s": "soon"}}, -32602),
        ({"jsonrpc": "2.0", "id": 1, "method": "$/cancelRequest", "params": {"id": []}}, -32602),
    ],
)
def test_any_value_in_any_member_gets_its_answer(
    spawn: Spawn, message: dict[str, Any], code: int
) -> None:
    server = spawn()
    server.ready()
    server.send(message)
    response = server.next_response()
    assert response["error"]["code"] == code, response
    data = response["error"]["data"]
    assert isinstance(data, dict) and isinstance(data["type"], str), response
    assert "argument" not in orjson.dumps(response).decode()  # no binder text
    if code == -32602:
        assert data["field"] != "", response
    assert server.call("status")["result"]["server"] == "rlm-server"  # still serving
    assert server.close() == 0


def test_a_param_named_like_an_internal_argument_is_just_unknown(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    error = server.call("status", {"ctx": 1})["error"]
    assert error["data"] == {
        "type": "invalid_params",
        "field": "ctx",
        "reason": "unknown parameter",
    }
    assert server.close() == 0


def test_odd_notifications_and_batch_elements_never_crash(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    server.send({"jsonrpc": "2.0", "method": []})  # not a valid request: answered, id null
    invalid = server.next_response()
    assert invalid["id"] is None and invalid["error"]["code"] == -32600
    server.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": {}}})  # nothing
    server.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": []})  # nothing
    batch = [{"jsonrpc": "2.0", "id": 1, "method": [1]}, 7, {"jsonrpc": "2.0", "method": {}}]
    server.send(batch)
    answers = server.next_message()
    assert isinstance(answers, list), answers
    assert [a["error"]["code"] for a in answers] == [-32600] * 3
    assert server.call("status")["result"]["server"] == "rlm-server"
    assert server.close() == 0


# -- 10: an infer sent as a notification -------------------------------------------------------


def test_an_infer_notification_is_not_run(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(ECHO, env={"ELIZA_RLM_VERBOSE": "true"})
    server.ready()
    server.send({"jsonrpc": "2.0", "method": "infer", "params": {"prompt": "paid for nobody"}})
    assert server.call("infer", {"prompt": "answered"})["result"]["text"] == "answered"
    assert llm.script.stats()["requests"] == 1  # only the request with an id reached the model
    assert server.close() == 0
    assert any("notification" in line for line in server.stderr_lines)


# -- 3, 4, 5: workers, their children and their files ------------------------------------------


def test_cancels_during_fork_leave_no_worker_running(spawn: Spawn, llm: FixtureServer) -> None:
    """A cancel landing between `fork` and its pid reply used to shift every later pid by one:
    kills hit the wrong process and spinning workers stayed."""
    server = spawn(ECHO)
    server.ready()
    assert server.call("infer", {"prompt": "warm"})["result"]["text"] == "warm"  # zygote ready
    llm.script.replace([{"when": "root", "reply": repl("while True: pass")}])
    for i in range(20):  # the cancel lands 0-4 ms after its infer: at times mid-handshake
        server.send(_infer({"prompt": "x"}, i))
        time.sleep(i % 5 / 1000)
        server.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": i}})
    answers = server.responses_by_id(20)
    assert {r["error"]["code"] for r in answers.values()} == {-32800}

    def workers() -> set[int]:
        return {pid for child in descendants(server.process.pid) for pid in descendants(child)}

    assert wait_until(lambda: not alive(workers())), alive(workers())
    llm.script.replace(ECHO)
    assert server.call("infer", {"prompt": "still fine"})["result"]["text"] == "still fi"
    assert server.close() == 0


def test_nothing_model_code_starts_outlives_its_request(spawn: Spawn) -> None:
    mark = f"{300 + os.getpid() % 1000}.5"  # a sleep of our own, found by its command line
    code = repl(
        "import subprocess",
        f"child = subprocess.Popen(['sleep', '{mark}'], start_new_session=True)",
        "answer['content'] = 'started'",
        "answer['ready'] = True",
    )
    server = spawn([{"when": "root", "reply": code}])
    server.ready()
    assert server.call("infer", {"prompt": "x"})["result"]["text"] == "started"
    assert wait_until(lambda: not _running(["sleep", mark])), "model code's child outlived it"
    assert server.close() == 0


def _running(argv: list[str]) -> list[int]:
    """Pids whose command line is `argv` (model code sees its own pids, not ours)."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == wanted:
                found.append(int(entry.name))
    return found


def test_a_killed_worker_leaves_no_directory(spawn: Spawn, tmp_path: Path) -> None:
    server = spawn(
        [
            {
                "when": "root",
                "reply": repl("open('mine.txt', 'w').write('x' * 1000)", "while True: pass"),
            }
        ],
        env={"TMPDIR": str(tmp_path)},
    )
    server.ready()
    server.request(1, "infer", {"prompt": "x", "options": {"timeout_s": 1}})
    assert server.next_response()["error"]["code"] == -32001  # its worker was killed
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() or "repl_env" in p.name]
    assert leftovers == []
    assert server.close() == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_is_the_servers(
    spawn: Spawn, llm: FixtureServer, signum: int
) -> None:
    """Ctrl-C in a terminal signals the whole group: the zygote must not die of it."""
    server = spawn(HELD, new_session=True)
    server.ready()
    server.request(1, "infer", {"prompt": "x"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
    os.killpg(server.process.pid, signum)
    if signum == signal.SIGTERM:  # drains: the held request still gets its answer
        assert server.call("status", request_id="s")["result"]["server"] == "rlm-server"
        llm.script.released.set()
        assert server.next_response()["result"]["text"] == "done"
    else:  # SIGINT cancels at once
        assert server.next_response()["error"]["code"] == -32800
    assert server.close() == 0
    assert not any("Traceback" in line for line in server.stderr_lines), server.stderr_lines


# -- 6: stopping ---------------------------------------------------------------------------------


def test_a_second_shutdown_with_a_shorter_grace_wins(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(HELD)
    server.ready()
    server.request(1, "infer", {"prompt": "x"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
    server.request(2, "shutdown", {"grace_s": 600})
    server.request(3, "shutdown", {"grace_s": 0.2})
    answers = server.responses_by_id(3)
    assert answers[1]["error"]["code"] == -32800
    assert answers[2]["result"] == answers[3]["result"] == {"shutdown": True}
    assert server.close() == 0


def test_sigterm_then_a_shorter_shutdown(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(HELD, env={"ELIZA_RLM_SHUTDOWN_GRACE": "600"})
    server.ready()
    server.request(1, "infer", {"prompt": "x"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
    server.process.send_signal(signal.SIGTERM)
    server.request(2, "shutdown", {"grace_s": 0.2})
    answers = server.responses_by_id(2)
    assert answers[1]["error"]["code"] == -32800
    assert answers[2]["result"] == {"shutdown": True}
    assert server.close() == 0


def test_a_batch_of_infer_and_shutdown_grants_the_grace(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(HELD)
    server.ready()
    server.send(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "infer", "params": {"prompt": "x"}},
            {"jsonrpc": "2.0", "id": 2, "method": "shutdown", "params": {"grace_s": 600}},
        ]
    )
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
    llm.script.released.set()
    answers = server.next_message()
    assert isinstance(answers, list)
    by_id = {a["id"]: a for a in answers}
    assert by_id[1]["result"]["text"] == "done"
    assert by_id[2]["result"] == {"shutdown": True}
    assert server.close() == 0


def test_a_cancel_in_the_same_read_as_a_batched_infer(spawn: Spawn) -> None:
    server = spawn(HELD)
    server.ready()
    server.send_raw(
        orjson.dumps([{"jsonrpc": "2.0", "id": 7, "method": "infer", "params": {"prompt": "x"}}])
        + b'\n{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":7}}\n'
    )
    answers = server.next_message()
    assert isinstance(answers, list) and answers[0]["error"]["code"] == -32800
    assert server.close() == 0


def test_the_parent_dying_cancels_everything(llm: FixtureServer, tmp_path: Path) -> None:
    """EOF drains for the grace period; a parent that died is different: nobody is left."""
    llm.script.replace(HELD)
    pid_file = tmp_path / "server.pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen({server_command()!r}, stdin=subprocess.PIPE,"
            " stdout=subprocess.DEVNULL)\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            'p.stdin.write(b\'{"jsonrpc":"2.0","id":1,"method":"infer",'
            '"params":{"prompt":"x"}}\\n\'); p.stdin.flush()\n'
            "time.sleep(600)\n",
        ],
        env=clean_env(fixture_env(llm.base_url, ELIZA_RLM_SHUTDOWN_GRACE="600")),
    )
    try:
        assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=30)
        server_pid = int(pid_file.read_text())
        tree = {server_pid, *descendants(server_pid)}
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not alive(tree), timeout=20), alive(tree)
    finally:
        parent.kill()
        llm.script.released.set()


# -- 7: bounded memory ---------------------------------------------------------------------------


def test_a_client_that_stops_reading_stops_our_reading(llm: FixtureServer) -> None:
    """While our answers are unsent (past a bound), no more input is read: the client's writes
    block, and the server does not buffer without limit."""
    process = subprocess.Popen(
        server_command(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=clean_env(fixture_env(llm.base_url)),
    )
    assert process.stdin is not None and process.stdout is not None
    count, burst = 300_000, 1000  # ~175 MB of answers: well over the bound (64 MiB)
    written = [0]

    def write() -> None:
        assert process.stdin is not None
        for _ in range(count // burst):
            process.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n' * burst)
            process.stdin.flush()
            written[0] += burst
        process.stdin.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        last = -1
        while writer.is_alive() and written[0] != last:  # until the writes stop going through
            last = written[0]
            time.sleep(2)
        assert writer.is_alive(), "every request was read although no answer was"
        peak_kib = _rss_kib(process.pid)
        answers = sum(1 for _ in process.stdout)  # now read: everything flows again
        writer.join()
        assert answers == count + 1  # and ready
        assert process.wait(timeout=30) == 0
        assert peak_kib < 300 * 1024, f"server RSS {peak_kib} KiB while blocked"
    finally:
        process.kill()
        process.wait()


def test_the_admission_queue_is_bounded_by_bytes(spawn: Spawn, llm: FixtureServer) -> None:
    server = spawn(HELD, args=["--max-concurrency", "1", "--max-queue-bytes", "100"])
    server.ready()
    server.request(1, "infer", {"prompt": "x" * 500})  # running: does not count
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1)
    server.request(2, "infer", {"prompt": "y" * 60})  # queued: 60 of 100
    server.request(3, "infer", {"prompt": "z" * 60})  # would make 120
    refused = server.next_response()
    assert refused["id"] == 3
    assert refused["error"]["data"] == {"type": "queue_full", "limit_bytes": 100}
    llm.script.released.set()
    answers = server.responses_by_id(2)
    assert {a["result"]["text"] for a in answers.values()} == {"done"}
    assert server.close() == 0


FORGE = repl(
    "import os, stat, orjson",
    "def frame(obj):",
    "    body = orjson.dumps(obj)",
    "    return len(body).to_bytes(8, 'big') + body",
    "for fd in range(256):",  # /proc/self/fd is not for model code (Landlock)
    "    try:",
    "        if stat.S_ISSOCK(os.fstat(fd).st_mode):",
    "            os.write(fd, frame({'event': 'iteration', 'id': 'victim', 'iteration': 1}))",
    "            os.write(fd, {final})",
    "    except OSError:",
    "        pass",
    "while True: pass",
)


@pytest.mark.parametrize(
    "final",
    [
        "frame({'result': {'text': 5}})",  # the wrong shape
        "b'\\xff' * 8",  # a length of 2^64 - 1
        "frame([1, 2])",  # not an object
        "frame({'tool': 1, 'name': 'x', 'arguments': [1]})",  # a tool call without an object
    ],
)
def test_frames_forged_by_model_code_end_only_its_request(spawn: Spawn, final: str) -> None:
    server = spawn([{"when": "root", "reply": FORGE.replace("{final}", final)}])
    server.ready()
    response = server.call("infer", {"prompt": "x", "options": {"progress": True}})
    assert response["error"]["code"] == -32603
    assert response["error"]["data"]["type"] == "worker_crashed"
    assert all(n["params"]["id"] == "call" for n in server.notifications), server.notifications
    assert server.call("status", request_id="s")["result"]["server"] == "rlm-server"
    assert server.close() == 0


# -- 8: long lines never stall the server --------------------------------------------------------


def test_status_behind_a_long_line_is_answered_while_it_is_parsed(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    long_malformed = b'{"jsonrpc":"2.0","id":1,"method":"infer","params":{"prompt":"' + b"x" * (
        100 << 20
    )  # no closing: a parse error, found only after the whole line is scanned
    server.send_raw(long_malformed + b'\n{"jsonrpc":"2.0","id":2,"method":"status"}\n')
    first, second = server.next_response(), server.next_response()
    assert first["id"] == 2 and "result" in first
    assert second["error"]["code"] == -32700
    assert server.close() == 0


def test_a_cancel_behind_a_long_infer_still_cancels_it(spawn: Spawn) -> None:
    server = spawn(HELD)
    server.ready()
    long_infer = orjson.dumps(
        {"jsonrpc": "2.0", "id": 9, "method": "infer", "params": {"prompt": "x" * (50 << 20)}}
    )
    server.send_raw(
        long_infer + b'\n{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":9}}\n'
    )
    assert server.next_response()["error"]["code"] == -32800
    assert server.close() == 0


# -- 9: trajectories ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1_000_000, 200_000_000])
def test_a_trajectory_never_carries_the_context(spawn: Spawn, size: int) -> None:
    rules = [
        {"when": "root", "times": 1, "reply": repl("x = len(context)", "print(context[:10])")},
        {"when": "root", "reply": answer_with("str(x)")},
    ]
    server = spawn(rules)
    server.ready()
    context = "secret-" + "y" * (size - 7)
    response = server.call("infer", {"prompt": context, "options": {"trajectory": True}})
    del context
    result = response["result"]
    assert result["text"] == str(size)
    line = orjson.dumps(result["trajectory"])
    assert len(line) < 64 * 1024  # far under the 1 MB the contract promises
    assert b"y" * 5000 not in line
    steps = result["trajectory"]
    assert [s["iteration"] for s in steps] == [1, 2]
    assert steps[0]["code_blocks"][0]["stdout"].startswith("secret-yyy")
    assert server.close() == 0


def test_a_shutdown_read_with_the_end_of_input_does_not_wait_out_the_grace(
    spawn: Spawn,
) -> None:
    """The old count of shutdown calls could be read before the call counted itself: the
    server then drained for the whole configured grace with nothing in flight."""
    server = spawn(env={"ELIZA_RLM_SHUTDOWN_GRACE": "600"})
    server.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"shutdown","params":{"grace_s":600}}\n')
    assert server.close(timeout=20) == 0  # nothing in flight: no grace to wait for
    server.ready()
    assert server.next_response()["result"] == {"shutdown": True}
