"""`rlm-server mcp`: start, serve MCP over stdio with the SDK, stop.

The protocol stream carries MCP messages only: `claim_stdio` moves it to private descriptors
and points fd 1 at stderr before anything runs, and the SDK's stdio transport is handed those
descriptors (it would otherwise claim fds 0 and 1 itself), so nothing that a library, model
code or a child process prints reaches the host.

Starting and stopping are the lifecycle's (frontends/lifecycle.py), as for every front end:
end of input or SIGTERM refuses new calls (a tool error `shutting_down`), lets the running ones
finish for --shutdown-grace, then cancels the rest (a tool error `cancelled` each); a second
SIGTERM, SIGINT or the death of the host cancels them at once. Only then does the SDK see the
end of its input (it must, to send its last answers); the workers are stopped and the process
exits 0.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import anyio

from rlm_server import SERVER_NAME, __version__
from rlm_server.cli import configured, sandboxed
from rlm_server.config import Config
from rlm_server.engine.engine import Engine
from rlm_server.errors import LineTooLong
from rlm_server.fdio import FdReceiveStream, write_all
from rlm_server.frontends.lifecycle import Lifecycle, run_loop
from rlm_server.frontends.transport import LineReader, OversizedLine, StdioClaim, claim_stdio
from rlm_server.frontends.wire import encode, error_response, leading_id

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
    event loop (no thread to outlive a stop), any length up to --max-message-bytes. A longer
    message never reaches the SDK: it is answered here (-32600 `line_too_long`, under the id
    its line begins with), as the JSON-RPC front end answers it, so the host's request fails
    at once instead of waiting out its timeout. The SDK sees the end of its input only once
    the server has drained (`at_end`): it answers every call still running "Connection
    closed" as soon as it does."""

    def __init__(
        self,
        fd: int,
        max_bytes: int,
        at_end: Callable[[], Awaitable[None]],
        output: _Output,
    ) -> None:
        self._stream = FdReceiveStream(fd)
        self._reader = LineReader(self._stream, max_bytes)
        self._at_end = at_end
        self._output = output
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
                await self._refuse(line)
                continue
            return line  # the SDK parses bytes as they are: a long context is not copied

    async def _refuse(self, line: OversizedLine) -> None:
        log.warning("a message over --max-message-bytes (%d) was refused", line.limit)
        response = error_response(LineTooLong(limit=line.limit), leading_id(line.head))
        await self._output.write(encode(response).decode() + "\n")

    def stop(self) -> None:
        """Read no more: the SDK is told the input ended (once the server has drained)."""
        self._stopped = True
        if self._reading is not None:
            self._reading.cancel()


class _Output:
    """Every write onto the private descriptor: the SDK's (one writer task) and the refusals of
    over-long messages (`_Input`), a whole line at a time, never interleaved. A host that
    closed its end reads nothing more: the server stops at once."""

    def __init__(self, fd: int, on_closed: Callable[[], None]) -> None:
        self._fd = fd
        self._on_closed = on_closed
        self._closed = False
        self._lock = anyio.Lock()

    async def write(self, text: str) -> None:
        async with self._lock:
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
    def __init__(self, config: Config, claim: StdioClaim, lifecycle: Lifecycle) -> None:
        from mcp.server.lowlevel import Server

        from rlm_server.frontends.mcp.bridge import Bridge
        from rlm_server.frontends.mcp.tools import Tools

        self._lifecycle = lifecycle
        self._tools = Tools(Bridge(lifecycle), config, lifecycle.in_flight)
        self._app: Server[Any] = Server(
            SERVER_NAME,
            version=__version__,
            instructions=INSTRUCTIONS,
            on_list_tools=self._tools.list_tools,
            on_call_tool=self._tools.call_tool,
            on_list_resources=self._tools.list_resources,
            on_read_resource=self._tools.read_resource,
        )
        self._output = _Output(claim.write_fd, lifecycle.output_closed)
        self._input = _Input(
            claim.read_fd, config.max_message_bytes, self._at_end_of_input, self._output
        )

    async def run(self) -> int:
        return await self._lifecycle.run(self._serve, end_reading=self._input.stop)

    async def _serve(self) -> None:
        from mcp.server.stdio import stdio_server

        stdio = stdio_server(cast(Any, self._input), cast(Any, self._output))
        async with stdio as (reads, writes):
            await self._app.run(reads, writes, self._app.create_initialization_options())

    async def _at_end_of_input(self) -> None:
        """The host's input ended: stop, and let the SDK see it once everything is answered."""
        self._lifecycle.input_ended()
        await self._lifecycle.drained()


async def _run(config: Config, claim: StdioClaim, environ: Mapping[str, str]) -> int:
    """The workers start first, so the zygote imports `rlm` while this process imports the
    SDK (about a second); the server is made on the event loop, which its scopes need."""
    lifecycle = Lifecycle(Engine(config, environ), config)
    lifecycle.engine.start()
    try:
        return await McpServer(config, claim, lifecycle).run()
    finally:
        lifecycle.engine.close()


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
        return run_loop(_run, config, claim, environ)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # decided to exit; a late SIGTERM agrees
        claim.release()
