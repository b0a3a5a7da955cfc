"""Frames on a worker's socket: an 8-byte big-endian length, then that many bytes of orjson.

Shared by the server side (workers.py) and the worker side (completion.py), and deliberately
free of heavy imports: the server must start without importing `rlm`.
"""

from __future__ import annotations

HEADER_BYTES = 8


def header(length: int) -> bytes:
    return length.to_bytes(HEADER_BYTES, "big")


def length_of(head: bytes | bytearray) -> int:
    return int.from_bytes(head, "big")


FORGET_TOKEN = bytes(
    8
)  # a zygote message that forgets a context; never a fork's: tokens count from 1
CONTEXT_UNAVAILABLE = "ContextUnavailable"  # the failure kind of a worker without its context
