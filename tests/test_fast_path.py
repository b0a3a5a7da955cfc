"""Issue 15's fast path: what each speed-up must keep true. No timings here (bench/ measures);
these pin the behaviour that the shortcuts could break."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import threading
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
from rlm_server.frontends.transport import (
    FdReceiveStream,
    LineReader,
    LoopDoor,
    OversizedLine,
    ProtocolWriter,
    StopReading,
)

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
        "import rlm_server.frontends.jsonrpc.server, rlm_server.frontends.jsonrpc.dispatch\n"
        "import rlm_server.frontends.jsonrpc.methods\n"
        "from rlm_server.frontends.jsonrpc.server import _load_dispatcher\n"
        "_load_dispatcher()\n"
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


def test_buffered_lines_come_without_waiting_and_reads_after_a_short_one_still_arrive() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)

    async def main() -> list[Any]:
        reader = LineReader(FdReceiveStream(read_fd, persistent=True), max_bytes=8)
        os.write(write_fd, b"a\n\n  \nbb\n0123456789\ncc")
        got: list[Any] = [await reader.next_line()]  # a short read: the pipe is empty after it
        got += [reader.buffered_line(), reader.buffered_line(), reader.buffered_line()]
        os.write(write_fd, b"c\n")  # arrives after the short read: waited for, then read
        got.append(await reader.next_line())
        os.close(write_fd)
        got.append(await reader.next_line())
        return got

    try:
        got = anyio.run(main)
    finally:
        os.close(read_fd)
    assert got[:3] == [b"a", b"bb", OversizedLine(8, b"0123456789")]
    assert got[3:] == [None, b"ccc", None]


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
def test_between_requests_the_input_thread_sleeps(spawn: Spawn) -> None:
    """After an answer the input thread polls for the next line for a moment (transport.py);
    that moment must end: an idle server spends no CPU."""
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


BEFORE_THE_LOOP = """
import os, sys, orjson
from rlm_server.config import load_config
from rlm_server.frontends.jsonrpc.server import Server
from rlm_server.frontends.transport import StdioClaim

requests_read, requests_write = os.pipe()
answers_read, answers_write = os.pipe()
claim = StdioClaim(requests_read, answers_write, 0, 0)
Server(load_config(["--sandbox", "off"], {}), claim, {}).start_reading()  # no event loop, ever
os.write(requests_write, b'{"jsonrpc":"2.0","id":7,"method":"status"}\\n')
lines = []
while len(lines) < 2:
    lines += [orjson.loads(line) for line in os.read(answers_read, 1 << 20).splitlines()]
ready, answer = lines
print(orjson.dumps([ready["method"], answer["id"], "uptime_s" in answer["result"]]).decode())
sys.stdout.flush()
os._exit(0)
"""


def test_status_is_answered_from_ready_on_before_the_event_loop_exists() -> None:
    """ready is written, and the input thread started, before anyio.run (server.py): status
    needs no loop, so it is answered while the loop and what it imports start."""
    done = subprocess.run(
        [sys.executable, "-c", BEFORE_THE_LOOP],
        capture_output=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == ["ready", 7, True]


def test_a_loop_door_holds_calls_until_the_loop_opens_it_then_keeps_their_order() -> None:
    door = LoopDoor()
    called: list[int] = []
    all_in = threading.Event()

    def caller() -> None:  # as the input thread does: one call after another
        for i in range(3):
            door.call(called.append, i)
        door.call(all_in.set)

    thread = threading.Thread(target=caller)
    thread.start()
    time.sleep(0.1)
    assert called == []  # no loop yet: the first call waits at the door

    async def main() -> None:
        door.open()
        await asyncio.to_thread(all_in.wait, 10)

    asyncio.run(main())
    thread.join(timeout=10)
    assert called == [0, 1, 2]
    with pytest.raises(StopReading):  # that loop is closed now
        door.call(called.append, 3)


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
