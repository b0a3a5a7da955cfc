"""`rlm-server mcp`: start, serve MCP over stdio with the SDK, stop.

The protocol stream carries MCP messages only: `claim_stdio` moves it to private descriptors
and points fd 1 at stderr before anything runs, and the SDK's stdio transport is handed those
descriptors (it would otherwise claim fds 0 and 1 itself), so nothing that a library, model
code or a child process prints reaches the host.

Stopping: end of input or SIGTERM refuses new calls (a tool error `shutting_down`), lets the
running ones finish for --shutdown-grace, then cancels the rest (a tool error `cancelled`
each); a second SIGTERM, SIGINT or the death of the host cancels them at once. Only then does
the SDK see the end of its input; the workers are stopped and the process exits 0.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import anyio
from anyio.abc import TaskGroup

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

if TYPE_CHECKING:
    from rlm_server.frontends.mcp.bridge import Bridge

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
    event loop (no thread to outlive a stop), any length up to --max-message-bytes. The SDK
    sees the end of its input only once the server has drained (`at_end`): it answers every
    call still running "Connection closed" as soon as it does."""

    def __init__(self, fd: int, max_bytes: int, at_end: Callable[[], Awaitable[None]]) -> None:
        self._stream = FdReceiveStream(fd, persistent=True)
        self._reader = LineReader(self._stream, max_bytes)
        self._at_end = at_end
        self._stopped = False
        self._reading: anyio.CancelScope | None = None  # the read under way

    def __aiter__(self) -> _Input:
        return self

    async def __anext__(self) -> bytes | bytearray:
        while True:
            line = None
            if not self._stopped:
                with anyio.CancelScope() as self._reading:
                    line = await self._reader.next_line()
                self._reading = None
            if line is None:  # the end of the input, or a stop
                await self._stream.aclose()
                await self._at_end()
                raise StopAsyncIteration
            if isinstance(line, OversizedLine):
                log.warning("a message over --max-message-bytes (%d) was discarded", line.limit)
                continue
            return line  # the SDK parses bytes as they are: a long context is not copied

    def stop(self) -> None:
        """Read no more: the SDK is told the input ended (once the server has drained)."""
        self._stopped = True
        if self._reading is not None:
            self._reading.cancel()


class _Output:
    """The SDK's writes, onto the private descriptor (one writer task: never interleaved). A
    host that closed its end reads nothing more: the server stops at once."""

    def __init__(self, fd: int, on_closed: Callable[[], None]) -> None:
        self._fd = fd
        self._on_closed = on_closed
        self._closed = False

    async def write(self, text: str) -> None:
        if self._closed:
            return
        try:
            await write_all(self._fd, text.encode("utf-8", "replace"))
        except OSError:  # EPIPE and the like: nobody is reading
            self._closed = True
            self._on_closed()

    async def flush(self) -> None:
        """Every write is already on the descriptor."""


class McpServer:
    def __init__(self, config: Config, claim: StdioClaim, bridge: Bridge) -> None:
        from mcp.server.lowlevel import Server

        from rlm_server.frontends.mcp.tools import Tools

        self._config = config
        self._claim = claim
        self._bridge = bridge
        self._tools = Tools(self._bridge, config)
        self._app: Server[Any] = Server(
            SERVER_NAME,
            version=__version__,
            instructions=INSTRUCTIONS,
            on_list_tools=self._tools.list_tools,
            on_call_tool=self._tools.call_tool,
            on_list_resources=self._tools.list_resources,
            on_read_resource=self._tools.read_resource,
        )
        self._input = _Input(claim.read_fd, config.max_message_bytes, self._at_end_of_input)
        self._grace = anyio.CancelScope(deadline=math.inf)  # its deadline ends the grace
        self._watching: TaskGroup  # signals, the host's death, the drain
        self._drained = anyio.Event()
        self._stopping = False

    async def run(self) -> int:
        async with anyio.create_task_group() as self._watching:
            self._watching.start_soon(self._watch_signals)
            self._watching.start_soon(ParentWatch().wait_gone, lambda: self.stop(0))
            await self._serve()
            self._watching.cancel_scope.cancel()
        return 0

    async def _serve(self) -> None:
        from mcp.server.stdio import stdio_server

        output = _Output(self._claim.write_fd, lambda: self.stop(0))
        async with stdio_server(cast(Any, self._input), cast(Any, output)) as (reads, writes):
            await self._app.run(reads, writes, self._app.create_initialization_options())

    def stop(self, grace_s: float) -> None:
        """Refuse new calls; the running ones have `grace_s` from now at most, then they are
        cancelled, and the input ends. Until then the host's other requests (a tools/list
        to check a result, say) are still answered."""
        if not self._stopping:
            self._watching.start_soon(self._drain)
        self._stopping = True
        self._bridge.refuse_new()
        self._grace.deadline = min(self._grace.deadline, anyio.current_time() + grace_s)

    async def _drain(self) -> None:
        """Let the running calls finish within the grace, then cancel the rest (each answered
        as cancelled) and wait for their answers; then end the input."""
        with self._grace:
            await self._tools.running.idle()
        self._bridge.cancel_all()
        await self._tools.running.idle()
        self._drained.set()
        self._input.stop()

    async def _at_end_of_input(self) -> None:
        self.stop(self._config.shutdown_grace_s)
        await self._drained.wait()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                first_term = signum == signal.SIGTERM and not self._stopping
                self.stop(self._config.shutdown_grace_s if first_term else 0)


async def _serve(config: Config, claim: StdioClaim, environ: Mapping[str, str]) -> int:
    """The workers start first, so the zygote imports `rlm` while this process imports the
    SDK (about a second); the server is made on the event loop, which its scopes need."""
    from rlm_server.frontends.mcp.bridge import Bridge

    bridge = Bridge(config, environ)
    bridge.start()
    try:
        return await McpServer(config, claim, bridge).run()
    finally:
        bridge.stop()


def _sdk_installed() -> bool:
    """Whether the optional `mcp` extra is there, without importing it yet (slow)."""
    try:
        return importlib.util.find_spec("mcp") is not None
    except ImportError:  # `mcp` itself is missing, or unimportable
        return False


def main(argv: Sequence[str]) -> int:
    """`rlm-server mcp [flags]`: the same flags and environment as the JSON-RPC mode."""
    if not _sdk_installed():
        print(MISSING_SDK, file=sys.stderr)
        return 2
    environ = dict(os.environ)  # our keys, read once
    started = configured(argv, environ, WHO)
    config = None if started is None else sandboxed(*started, WHO)
    if config is None:
        return 2
    claim = claim_stdio()
    try:
        return anyio.run(_serve, config, claim, environ, backend="asyncio")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # decided to exit; a late SIGTERM agrees
        claim.release()
