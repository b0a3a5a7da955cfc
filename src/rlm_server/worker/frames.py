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


# A failure frame's kind when the answer never matched `options.answer_schema`; the frame also
# carries `validation_error`, the last failure in words, at most VALIDATION_ERROR_CHARS long.
INVALID_ANSWER = "InvalidAnswer"
VALIDATION_ERROR_CHARS = 1000
