"""Descriptor I/O for an event loop: a byte stream over a non-blocking descriptor, and writing
all of a buffer to one. Below both the front ends (stdin, stdout) and the executors (a worker's
socket), so neither imports the other."""

from __future__ import annotations

import fcntl
import os

import anyio
from anyio.abc import ByteReceiveStream

READ_CHUNK = 1 << 20


def set_nonblocking(fd: int) -> int:
    """Make fd non-blocking; return its previous flags so they can be restored."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return flags


class FdReceiveStream(ByteReceiveStream):
    """A byte stream over a non-blocking descriptor (a worker's socket, the MCP front end's
    input), read without threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._drained = False  # the last read emptied the descriptor

    async def receive(self, max_bytes: int = READ_CHUNK) -> bytes:
        """The next bytes. After a read that was short (it emptied the pipe or socket), wait
        before reading again: a read that is sure to fail costs a syscall and an exception,
        once per request of a client that waits for each answer."""
        if self._drained:
            await self._wait()
        while True:
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await self._wait()
                continue
            if not data:
                raise anyio.EndOfStream
            self._drained = len(data) < max_bytes
            return data

    async def _wait(self) -> None:
        await anyio.wait_readable(self._fd)

    async def aclose(self) -> None:
        pass


async def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write everything to a non-blocking descriptor, waiting whenever it is full."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await anyio.wait_writable(fd)
            continue
        view = view[written:]
