"""`rlm-server mcp`: start, serve MCP over stdio with the SDK, stop.

The protocol stream carries MCP messages only: `claim_stdio` moves it to private descriptors
and points fd 1 at stderr before anything runs, and the SDK's stdio transport is handed those
descriptors (it would otherwise claim fds 0 and 1 itself), so nothing that a library, model
code or a child process prints reaches the host.

Stopping: end of input or SIGTERM refuses new calls and lets running ones finish for
--shutdown-grace, then cancels them; a second SIGTERM, SIGINT or the death of the host cancels
them at once. Then the workers are stopped and the process exits 0.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import anyio

from rlm_server import SERVER_NAME, __version__
from rlm_server.cli import configured, sandboxed
from rlm_server.config import Config
from rlm_server.frontends.lifeline import ParentWatch
from rlm_server.frontends.transport import (
    FdReceiveStream,
    LineReader,
    OversizedLine,
    StdioClaim,
    claim_stdio,
    write_all,
)

log = logging.getLogger(__name__)

WHO = "rlm-server mcp"
MISSING_SDK = f"{WHO}: the MCP front end needs the mcp package: pip install 'rlm-server[mcp]'"
INSTRUCTIONS = (
    "rlm_ask answers questions about inputs far too long to read (large files, whole"
    " directories, long documents) by having a model explore them with code. Store an input"
    " once with rlm_load to ask several questions about it."
)


class _Input:
    """The host's lines, for the SDK's stdio transport: read from the private descriptor on the
    event loop (no thread to outlive a stop), any length up to --max-message-bytes."""

    def __init__(self, fd: int, max_bytes: int, on_end: Callable[[], None]) -> None:
        self._stream = FdReceiveStream(fd, persistent=True)
        self._reader = LineReader(self._stream, max_bytes)
        self._on_end = on_end

    def __aiter__(self) -> _Input:
        return self

    async def __anext__(self) -> str:
        while True:
            line = await self._reader.next_line()
            if line is None:
                await self._stream.aclose()
                self._on_end()
                raise StopAsyncIteration
            if isinstance(line, OversizedLine):
                log.warning("a message over --max-message-bytes (%d) was discarded", line.limit)
                continue
            return bytes(line).decode("utf-8", "replace")


class _Output:
    """The SDK's writes, onto the private descriptor (one writer task: never interleaved)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def write(self, text: str) -> None:
        await write_all(self._fd, text.encode("utf-8", "replace"))

    async def flush(self) -> None:
        """Every write is already on the descriptor."""


class McpServer:
    def __init__(self, config: Config, claim: StdioClaim, environ: Mapping[str, str]) -> None:
        from mcp.server.lowlevel import Server

        from rlm_server.frontends.mcp.bridge import Bridge
        from rlm_server.frontends.mcp.tools import Tools

        self._config = config
        self._claim = claim
        self._bridge = Bridge(config, environ)
        tools = Tools(self._bridge, config)
        self._app: Server[Any] = Server(
            SERVER_NAME,
            version=__version__,
            instructions=INSTRUCTIONS,
            on_list_tools=tools.list_tools,
            on_call_tool=tools.call_tool,
            on_list_resources=tools.list_resources,
            on_read_resource=tools.read_resource,
        )
        self._serving: anyio.CancelScope  # made in `run`: ends when the grace does
        self._stopping = False

    async def run(self) -> int:
        self._serving = anyio.CancelScope(deadline=math.inf)
        self._bridge.start()
        try:
            async with anyio.create_task_group() as watching:
                watching.start_soon(self._watch_signals)
                watching.start_soon(ParentWatch().wait_gone, lambda: self.stop(0))
                with self._serving:
                    await self._serve()
                watching.cancel_scope.cancel()
        finally:
            self._bridge.stop()
        return 0

    async def _serve(self) -> None:
        from mcp.server.stdio import stdio_server

        lines = _Input(
            self._claim.read_fd,
            self._config.max_message_bytes,
            lambda: self.stop(self._config.shutdown_grace_s),
        )
        async with stdio_server(cast(Any, lines), cast(Any, _Output(self._claim.write_fd))) as (
            read_stream,
            write_stream,
        ):
            await self._app.run(
                read_stream, write_stream, self._app.create_initialization_options()
            )

    def stop(self, grace_s: float) -> None:
        """Refuse new calls; cancel the running ones `grace_s` from now at the latest."""
        self._stopping = True
        self._bridge.refuse_new()
        self._serving.deadline = min(self._serving.deadline, anyio.current_time() + grace_s)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                first_term = signum == signal.SIGTERM and not self._stopping
                self.stop(self._config.shutdown_grace_s if first_term else 0)


def main(argv: Sequence[str]) -> int:
    """`rlm-server mcp [flags]`: the same flags and environment as the JSON-RPC mode."""
    try:
        import mcp.server.lowlevel  # noqa: F401  (an optional extra)
    except ImportError:
        print(MISSING_SDK, file=sys.stderr)
        return 2
    environ = dict(os.environ)  # our keys, read once
    started = configured(argv, environ, WHO)
    config = None if started is None else sandboxed(*started, WHO)
    if config is None:
        return 2
    claim = claim_stdio()
    try:
        return anyio.run(McpServer(config, claim, environ).run, backend="asyncio")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # decided to exit; a late SIGTERM agrees
        claim.release()
