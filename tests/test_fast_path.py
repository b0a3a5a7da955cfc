"""Issue 15's fast path: what each speed-up must keep true. No timings here (bench/ measures);
these pin the behaviour that the shortcuts could break."""

from __future__ import annotations

import asyncio
import math
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from conftest import Spawn
from harness import alive, clean_env, descendants, server_command, wait_until
from test_jsonrpc import dispatch_all

from rlm_server.frontends.jsonrpc.dispatch import Dispatcher
from rlm_server.frontends.transport import Line, LineInput, OversizedLine, ProtocolWriter

# -- dispatch: inline methods without jsonrpcserver ---------------------------------------------


def test_an_inline_method_is_answered_like_jsonrpcserver_would() -> None:
    def echo(ctx: object, /, **params: Any) -> dict[str, Any]:
        return {"params": params}

    def fixed(ctx: object, a: int) -> dict[str, Any]:
        return {"a": a}

    async def main() -> list[Any]:
        dispatcher = Dispatcher({"echo": echo, "fixed": fixed}, {})
        return await dispatch_all(
            dispatcher,
            [
                {"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"x": 1}},
                {"jsonrpc": "2.0", "id": 2, "method": "fixed", "params": {"a": 5}},
                {"jsonrpc": "2.0", "id": 3, "method": "fixed", "params": {"b": 5}},
                {"jsonrpc": "2.0", "id": 4, "method": "fixed"},
                {"jsonrpc": "2.0", "method": "echo"},  # a notification: nothing owed
            ],
        )

    [responses] = anyio.run(main)
    assert responses[:2] == [
        {"jsonrpc": "2.0", "result": {"params": {"x": 1}}, "id": 1},
        {"jsonrpc": "2.0", "result": {"a": 5}, "id": 2},
    ]
    for response, request_id in zip(responses[2:], (3, 4), strict=True):
        assert response["id"] == request_id
        assert response["error"]["code"] == -32602
        assert response["error"]["data"] == {
            "type": "invalid_params",
            "field": "params",
            "reason": "do not match the method's parameters",
        }
    assert len(responses) == 4


def test_status_names_an_unknown_param_and_ignores_being_a_notification(spawn: Spawn) -> None:
    server = spawn()
    server.ready()
    server.send({"jsonrpc": "2.0", "method": "status", "params": {"x": 1}})
    server.send({"jsonrpc": "2.0", "id": 9, "method": "status", "params": {"ctx": 1}})
    response = server.next_response()
    assert response["id"] == 9
    assert response["error"]["data"] == {
        "type": "invalid_params",
        "field": "ctx",
        "reason": "unknown parameter",
    }
    assert server.close() == 0


def test_status_and_the_start_need_no_jsonrpcserver() -> None:
    """Its import costs as much as everything before `ready`; only task methods load it (and
    jsonschema, which it imports and `options.answer_schema` needs)."""
    code = (
        "import sys\n"
        "import rlm_server.frontends.jsonrpc.frontend, rlm_server.frontends.jsonrpc.dispatch\n"
        "import rlm_server.frontends.jsonrpc.methods, rlm_server.frontends.lifecycle\n"
        "sys.exit('jsonrpcserver' in sys.modules or 'jsonschema' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- transport ---------------------------------------------------------------------------------


def test_held_messages_are_written_when_the_block_ends() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    async def main() -> bytes:
        writer = ProtocolWriter(write_fd, on_closed=lambda: None, high_water=1 << 20)
        with writer.held():
            writer.send(b"one")
            writer.send(b"two")
            assert not _readable(read_fd)  # nothing before the block ends
        return os.read(read_fd, 100)  # no turn of the loop in between

    try:
        assert asyncio.run(main()) == b"one\ntwo\n"
    finally:
        os.close(read_fd)
        os.close(write_fd)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_the_lines_of_a_read_come_together_and_a_later_read_still_arrives() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    answers_read, answers_write = os.pipe()
    os.set_blocking(answers_write, False)

    async def main() -> list[Any]:
        writer = ProtocolWriter(answers_write, on_closed=lambda: None, high_water=1 << 20)
        send, receive = anyio.create_memory_object_stream[Line](math.inf)
        os.write(write_fd, b"a\n\n  \nbb\n0123456789\ncc")
        async with anyio.create_task_group() as group:
            group.start_soon(LineInput(read_fd, 8, send.send_nowait, writer).run)
            got: list[Any] = [await receive.receive()]
            got += [receive.receive_nowait(), receive.receive_nowait()]  # with it: no waiting
            os.write(write_fd, b"c\n")  # arrives after that read: waited for, then read
            got.append(await receive.receive())
            os.close(write_fd)  # the end: run returns
        return got

    try:
        got = anyio.run(main)
    finally:
        for fd in (read_fd, answers_read, answers_write):
            os.close(fd)
    assert got == [b"a", b"bb", OversizedLine(8, b"0123456789"), b"ccc"]


# -- end of input --------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["while the zygote imports", "once warm"])
def test_end_of_input_with_nothing_in_flight_leaves_no_process(spawn: Spawn, when: str) -> None:
    server = spawn()
    server.ready()
    if when == "once warm":
        server.call("infer", {"prompt": "x"})
    assert "result" in server.call("status")  # may come before the event loop (and the zygote)
    assert wait_until(lambda: bool(descendants(server.process.pid)), timeout=10)  # the zygote
    family = descendants(server.process.pid)
    assert server.close() == 0
    assert wait_until(lambda: not alive(family), timeout=10), alive(family)


def _cpu_s(pid: int) -> float:
    """User and system time of every thread of `pid` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc/PID/stat")
def test_between_requests_an_idle_server_sleeps(spawn: Spawn) -> None:
    """After a burst of requests, nothing keeps running: an idle server spends no CPU."""
    server = spawn()
    server.ready()
    server.call("infer", {"prompt": "x"})  # everything warm: nothing left to do after this
    for i in range(100):
        assert "result" in server.call("status", request_id=i)
    time.sleep(0.2)
    before = _cpu_s(server.process.pid)
    time.sleep(1.0)
    assert _cpu_s(server.process.pid) - before < 0.2  # polling without end would be ~1 s
    assert server.close() == 0


def test_input_from_a_regular_file_is_read_to_its_end(tmp_path: Path) -> None:
    """A regular file never blocks and cannot be polled: a short read must not mean 'wait'."""
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(
        b'{"jsonrpc":"2.0","id":1,"method":"status"}\n{"jsonrpc":"2.0","id":2,"method":"status"}'
    )
    with requests.open("rb") as stdin:
        done = subprocess.run(
            server_command(), stdin=stdin, capture_output=True, env=clean_env(), timeout=60
        )
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [line.get("id") for line in lines] == [None, 1, 2]  # ready, then both answers
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr
