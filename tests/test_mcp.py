"""`rlm-server mcp` against the official MCP SDK's own stdio client, under both protocol eras
the SDK speaks (the 2025-11-25 initialize handshake and the stateless 2026-07-28 one), with
the real `rlm` library over real HTTP to the scripted model."""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
from fixtures.openai_fixture import FixtureServer
from harness import (
    alive,
    answer_with,
    clean_env,
    cmdline_of,
    descendants,
    fixture_env,
    parent_of,
    repl,
    server_command,
    wait_until,
    zygote_of,
)
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult

pytestmark = pytest.mark.anyio

MODES = {"legacy": "2025-11-25", "2026-07-28": "2026-07-28"}  # Client mode: version it speaks
FIND_NEEDLE = repl(
    "import re",
    r'code = re.search(r"vault code is (\w+)", context).group(1)',
    'answer["content"] = code',
    'answer["ready"] = True',
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Connected:
    """A client and the server process behind it."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def ask(self, **arguments: Any) -> CallToolResult:
        return await self.client.call_tool("rlm_ask", arguments)

    def workers(self) -> set[int]:
        """Every process below the zygote: workers and what they started."""
        return alive(descendants(zygote_of(_server_pid())))


def _server_pid() -> int:
    """The `rlm-server mcp` process the client spawned (our child, the only one)."""
    children = [pid for pid in alive(descendants(os.getpid())) if parent_of(pid) == os.getpid()]
    found = [pid for pid in children if b"\0mcp" in cmdline_of(pid)]
    assert len(found) == 1, [cmdline_of(pid) for pid in children]
    return found[0]


@asynccontextmanager
async def connect(
    llm: FixtureServer,
    mode: str,
    rules: list[dict[str, Any]] | None = None,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> AsyncIterator[Connected]:
    """`rlm-server mcp` spawned by the SDK's stdio client, pointed at the scripted model."""
    llm.script.replace(rules or [])
    command = server_command()
    params = StdioServerParameters(
        command=command[0],
        args=[*command[1:], "mcp", *args],
        env=clean_env({**fixture_env(llm.base_url), **(env or {})}),
    )
    unreadable: list[Exception] = []  # what the client could not read as MCP

    async def on_message(message: Any) -> None:
        if isinstance(message, Exception):
            unreadable.append(message)

    with tempfile.TemporaryFile("w+") as errlog:
        transport = stdio_client(params, errlog=errlog)
        async with Client(transport, mode=mode, message_handler=on_message) as client:
            assert client.protocol_version == MODES[mode]
            with anyio.fail_after(60):
                yield Connected(client)
    assert unreadable == []


async def until(predicate: Callable[[], bool]) -> bool:
    """harness.wait_until, off the event loop (the client's tasks go on meanwhile)."""
    return await anyio.to_thread.run_sync(wait_until, predicate, 30)


def _text(result: CallToolResult) -> str:
    [block] = result.content
    assert block.type == "text"
    return block.text


def _error(result: CallToolResult) -> dict[str, Any]:
    """A tool error's `data`: the JSON on the line after the one for people."""
    assert result.is_error and result.structured_content is None, result
    data: dict[str, Any] = json.loads(_text(result).splitlines()[1])
    return data


def _needle() -> tuple[str, str]:
    fact = secrets.token_hex(6).upper()
    return fact, "filler line\n" * 20_000 + f"The vault code is {fact}.\n" + "tail\n" * 100


async def test_tools_are_listed_with_valid_schemas(llm: FixtureServer, mode: str) -> None:
    async with connect(llm, mode) as server:
        tools = {tool.name: tool for tool in (await server.client.list_tools()).tools}
    assert sorted(tools) == ["rlm_ask", "rlm_drop", "rlm_load"]
    for tool in tools.values():
        jsonschema.Draft202012Validator.check_schema(tool.input_schema)
        assert tool.output_schema is not None
        jsonschema.Draft202012Validator.check_schema(tool.output_schema)
        assert tool.input_schema["type"] == tool.output_schema["type"] == "object"
        assert tool.description and len(tool.description) > 100
        assert tool.annotations is not None
    ask = tools["rlm_ask"].annotations
    assert ask is not None and ask.read_only_hint is True and ask.open_world_hint is True
    drop = tools["rlm_drop"].annotations
    assert drop is not None and drop.destructive_hint is True and drop.idempotent_hint is True


async def test_ask_over_text_finds_the_needle_through_the_repl(
    llm: FixtureServer, mode: str
) -> None:
    fact, text = _needle()
    async with connect(llm, mode, [{"when": "root", "reply": FIND_NEEDLE}]) as server:
        result = await server.ask(question="What is the vault code?", text=text)
    assert not result.is_error, result
    assert _text(result) == fact
    structured = result.structured_content
    assert structured["answer"] == fact and structured["stub"] is False
    assert structured["iterations"] == 1 and structured["elapsed_ms"] > 0
    assert structured["usage"]["calls"] == llm.script.stats()["requests"] == 1
    assert fact not in str(list(llm.script.bodies)), "the model was never shown the input"


async def test_ask_over_paths_reads_only_text_files_under_allow_path(
    llm: FixtureServer, mode: str, tmp_path: Path
) -> None:
    fact, text = _needle()
    allowed = tmp_path / "repo"
    (allowed / "logs").mkdir(parents=True)
    (allowed / "logs" / "app.log").write_text(text)
    (allowed / "logs" / "core.bin").write_bytes(b"\x7fELF\0\0binary")
    (tmp_path / "secret.txt").write_text("outside")
    (allowed / "logs" / "leak.txt").symlink_to(tmp_path / "secret.txt")
    rules = [{"when": "root", "reply": FIND_NEEDLE}]
    async with connect(llm, mode, rules, ["--allow-path", str(allowed)]) as server:
        result = await server.ask(question="What is the vault code?", paths=[str(allowed)])
        globbed = await server.ask(question="again", paths=[f"{allowed}/**/*.log"])
    assert not result.is_error, result
    assert _text(result) == fact
    sources = result.structured_content["sources"]
    assert sources["files"] == 1 and sources["bytes"] == len(text)
    skipped = {Path(s["path"]).name: s["reason"] for s in sources["skipped"]}
    assert skipped == {
        "core.bin": "binary",
        "leak.txt": "a symlink out of the --allow-path directories",
    }
    assert _text(globbed) == fact and globbed.structured_content["sources"]["files"] == 1


async def test_a_path_outside_allow_path_is_refused_naming_it(
    llm: FixtureServer, mode: str, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "out").symlink_to("/etc")
    async with connect(llm, mode, [], ["--allow-path", str(allowed)]) as server:
        outside = await server.ask(question="q", paths=["/etc/hostname"])
        through_link = await server.ask(question="q", paths=[str(allowed / "out" / "hostname")])
        up_and_out = await server.ask(question="q", paths=[f"{allowed}/../*"])
    for result, named in (
        (outside, "/etc/hostname"),
        (through_link, str(allowed / "out" / "hostname")),
        (up_and_out, f"{allowed}/../*"),
    ):
        assert _error(result) == {
            "type": "invalid_params",
            "field": "paths",
            "reason": f"{named} is outside every --allow-path directory",
        }
        assert _text(result).startswith("Invalid params (invalid_params): paths: ")
    assert llm.script.stats()["requests"] == 0


async def test_paths_are_refused_without_allow_path(llm: FixtureServer, mode: str) -> None:
    async with connect(llm, mode) as server:
        result = await server.ask(question="q", paths=[str(Path.cwd())])
    assert "started without --allow-path" in _error(result)["reason"]


async def test_the_size_limit_skips_files_and_says_so(
    llm: FixtureServer, mode: str, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_text("The vault code is SMALL.\n")
    (tmp_path / "b.txt").write_text("x" * 5000)
    for i in range(120):
        (tmp_path / f"c{i:03}.bin").write_bytes(b"\0")
    rules = [{"when": "root", "reply": FIND_NEEDLE}]
    args = ["--allow-path", str(tmp_path), "--max-read-bytes", "1000"]
    async with connect(llm, mode, rules, args) as server:
        result = await server.ask(question="code?", paths=[str(tmp_path)])
    assert _text(result) == "SMALL"
    sources = result.structured_content["sources"]
    first, *rest = sources["skipped"]
    assert first["path"].endswith("b.txt")
    assert first["reason"].startswith("over --max-read-bytes (5000 bytes")
    assert len(rest) == 99 and {s["reason"] for s in rest} == {"binary"}
    assert sources["skipped_total"] == 121 and sources["files"] == 1


async def test_a_stored_context_is_asked_listed_read_and_dropped(
    llm: FixtureServer, mode: str
) -> None:
    fact, text = _needle()
    async with connect(llm, mode, [{"when": "root", "reply": FIND_NEEDLE}]) as server:
        loaded = await server.client.call_tool("rlm_load", {"text": text})
        stored = loaded.structured_content
        context_id = stored["context_id"]
        assert stored["bytes"] == len(text.encode()) and len(stored["sha256"]) == 64
        answers = [await server.ask(question="code?", context_id=context_id) for _ in range(2)]
        [resource] = (await server.client.list_resources()).resources
        read = await server.client.read_resource(resource.uri)
        dropped = await server.client.call_tool("rlm_drop", {"context_id": context_id})
        gone = await server.ask(question="code?", context_id=context_id)
        listed_after = (await server.client.list_resources()).resources
    assert [_text(a) for a in answers] == [fact, fact]
    assert resource.name == context_id and resource.size == stored["bytes"]
    assert context_id in read.contents[0].text  # type: ignore[union-attr]
    assert dropped.structured_content == {"dropped": True}
    assert _error(gone)["field"] == "context_id"
    assert listed_after == []


async def test_progress_reports_started_subcall_and_iteration(
    llm: FixtureServer, mode: str
) -> None:
    root = repl('answer["content"] = llm_query("sub question")', 'answer["ready"] = True')
    rules = [{"when": "root", "reply": root}, {"when": "sub", "reply": "from the sub-model"}]
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with connect(llm, mode, rules) as server:
        result = await server.client.call_tool(
            "rlm_ask", {"question": "q", "text": "ctx"}, progress_callback=on_progress
        )
        quiet = await server.ask(question="q", text="ctx")  # no token, no progress
    assert _text(result) == _text(quiet) == "from the sub-model"
    assert [message for _, _, message in seen] == [
        "started",
        "sub-call to scripted",
        "iteration 1 of 4",
    ]
    assert [progress for progress, _, _ in seen] == [1, 2, 3]


async def test_cancel_kills_the_worker_and_the_session_goes_on(
    llm: FixtureServer, mode: str
) -> None:
    held = [{"when": "root", "hold": True, "reply": answer_with("context")}]
    async with connect(llm, mode, held) as server:
        async with anyio.create_task_group() as calls:
            calls.start_soon(functools.partial(server.ask, question="q", text="to cancel"))
            assert await until(lambda: llm.script.stats()["in_flight"] == 1)
            assert server.workers(), "a worker runs the call"
            calls.cancel_scope.cancel()  # the client sends notifications/cancelled
        assert await until(lambda: not server.workers()), "the worker outlived its call"
        llm.script.released.set()
        after = await server.ask(question="q", text="still here")
    assert _text(after) == "still here"


async def test_eight_concurrent_calls_run_at_once(llm: FixtureServer, mode: str) -> None:
    held = [{"when": "root", "hold": True, "reply": answer_with("context")}]
    answers: dict[int, str] = {}
    async with connect(llm, mode, held) as server:

        async def ask(i: int) -> None:
            answers[i] = _text(await server.ask(question="q", text=f"call {i}"))

        async with anyio.create_task_group() as calls:
            for i in range(8):
                calls.start_soon(ask, i)
            assert await until(lambda: llm.script.stats()["in_flight"] == 8)
            llm.script.released.set()
    assert answers == {i: f"call {i}" for i in range(8)}
    assert llm.script.stats()["max_in_flight"] == 8


async def test_failures_are_tool_errors_with_the_contract_types(
    llm: FixtureServer, mode: str
) -> None:
    held = [{"when": "root", "hold": True, "reply": answer_with("context")}]
    async with connect(llm, mode, held) as server:
        late = await server.ask(question="q", text="x", timeout_s=0.5)
        both = await server.ask(question="q", text="x", context_id="ctx-1")
        unknown = await server.ask(question="q", text="x", verbose=True)
        with pytest.raises(MCPError) as no_such_tool:
            await server.client.call_tool("rlm_nothing", {})
        llm.script.released.set()
    assert _error(late) == {"type": "deadline_exceeded", "timeout_s": 0.5}
    assert _text(late).splitlines()[0] == "Deadline exceeded (deadline_exceeded)"
    assert _error(both)["field"] == "context_id" and "exactly one of" in _error(both)["reason"]
    assert _error(unknown) == {
        "type": "invalid_params",
        "field": "verbose",
        "reason": "unknown argument",
    }
    assert no_such_tool.value.code == -32602


async def test_a_message_over_the_size_limit_is_refused_and_the_session_goes_on(
    llm: FixtureServer, mode: str
) -> None:
    fact, text = _needle()
    rules = [{"when": "root", "reply": FIND_NEEDLE}]
    async with connect(llm, mode, rules, args=["--max-message-bytes", "65536"]) as server:
        with anyio.fail_after(10), pytest.raises(MCPError) as too_long:  # not its own timeout
            await server.ask(question="What is the vault code?", text="x" * 131072)
        result = await server.ask(question="What is the vault code?", text=text[-2000:])
    assert too_long.value.code == -32600
    assert too_long.value.error.data == {"type": "line_too_long", "limit": 65536}
    assert not result.is_error and _text(result) == fact


async def test_model_code_printing_never_reaches_the_host(llm: FixtureServer, mode: str) -> None:
    noisy = repl(
        "import os, sys",
        "print('{not json' * 1000)",
        "os.write(1, b'raw bytes on fd 1\\n')",
        "sys.__stdout__.write('more\\n')",
        'answer["content"] = "quiet answer"',
        'answer["ready"] = True',
    )
    async with connect(llm, mode, [{"when": "root", "reply": noisy}]) as server:
        result = await server.ask(question="q", text="x")
        again = await server.ask(question="q", text="x")
    assert _text(result) == _text(again) == "quiet answer"


@pytest.mark.parametrize("grace", ["30", "0.5"])
async def test_sigterm_drains_running_calls_within_the_grace(
    llm: FixtureServer, mode: str, grace: str
) -> None:
    """A running call finishes (30 s of grace), or is cancelled when the grace ends first;
    then the server exits."""
    held = [{"when": "root", "hold": True, "reply": answer_with("context")}]
    results: list[CallToolResult] = []
    async with connect(llm, mode, held, ["--shutdown-grace", grace]) as server:
        await server.client.list_tools()  # the client checks results against the schemas

        async def ask() -> None:
            results.append(await server.ask(question="q", text="finished"))

        async with anyio.create_task_group() as calls:
            calls.start_soon(ask)
            assert await until(lambda: llm.script.stats()["in_flight"] == 1)
            pid = _server_pid()
            os.kill(pid, signal.SIGTERM)
            if grace == "30":
                llm.script.released.set()
        assert await until(lambda: not alive([pid])), "the server exited"
    llm.script.released.set()
    [result] = results
    if grace == "30":
        assert _text(result) == "finished"
    else:
        assert _error(result) == {"type": "cancelled"}


async def test_a_trajectory_is_returned_bounded_when_asked(llm: FixtureServer, mode: str) -> None:
    loud = repl("print('x' * 5000)", 'answer["content"] = "done"', 'answer["ready"] = True')
    async with connect(llm, mode, [{"when": "root", "reply": loud}]) as server:
        plain = await server.ask(question="q", text="x")
        traced = await server.ask(question="q", text="x", trajectory=True)
    assert "trajectory" not in plain.structured_content
    [step] = traced.structured_content["trajectory"]  # the client checked the output schema
    [block] = step["code_blocks"]
    head, _, tail = block["stdout"].partition("… [")
    assert head == "x" * 2000 and tail.endswith(" more]")  # cut at 2,000 characters
    assert step["final_answer"] == "done"


def test_the_host_dying_cancels_everything(llm: FixtureServer) -> None:
    """A host killed mid-call (the SDK's client in a process of its own): nobody is left to
    answer, so the server cancels at once, whatever the grace, and everything below it ends."""
    llm.script.replace([{"when": "root", "hold": True, "reply": answer_with("context")}])
    command = server_command()
    env = clean_env({**fixture_env(llm.base_url), "ELIZA_RLM_SHUTDOWN_GRACE": "600"})
    host = (
        "import anyio\n"
        "from mcp import Client, StdioServerParameters\n"
        f"server = StdioServerParameters(command={command[0]!r}, args={[*command[1:], 'mcp']!r},"
        f" env={env!r})\n"
        "async def main():\n"
        "    async with Client(server, mode='legacy') as client:\n"
        "        await client.call_tool('rlm_ask', {'question': 'q', 'text': 'x'})\n"
        "anyio.run(main)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", host], env=clean_env())
    try:
        assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=60)
        [server_pid] = [p for p in descendants(process.pid) if b"\0mcp" in cmdline_of(p)]
        tree = {server_pid, *descendants(server_pid)}
        process.kill()
        process.wait()
        assert wait_until(lambda: not alive(tree), timeout=20), alive(tree)
    finally:
        process.kill()
        llm.script.released.set()


def test_without_the_sdk_mcp_mode_exits_2_with_one_line() -> None:
    code = (
        "import sys; sys.modules['mcp'] = None;"
        "from rlm_server.cli import main; sys.exit(main(['mcp']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "rlm-server mcp: the MCP front end needs the mcp package: pip install 'rlm-server[mcp]'"
    ]
    assert done.stdout == ""
