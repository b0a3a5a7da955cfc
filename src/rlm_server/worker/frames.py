"""The one framing of the worker boundary: an 8-byte big-endian length, then that many bytes of
one JSON object (orjson). Shared by the server side (executors/local/pool.py), the zygote
(zygote.py) and the worker (completion.py), and deliberately free of heavy imports: the server
must start without importing `rlm`.

On the zygote's control socket (SOCK_SEQPACKET) each frame is one datagram:
- server -> zygote: `{"fork": token, "workdir": path, "context": {"id", "path", "kind"}}`
  (context optional) with the new worker's socket attached; `{"forget": context_id}`.
- zygote (or a context's holder) -> server: `{"ready": true}` once warm, then
  `{"forked": token, "pid": pid}` for each fork.

On a worker's socket (a stream) frames follow one another:
- worker -> server: first `{"pid": pid}` (the process to kill), then `{"event": ...}`,
  `{"call": n, "model", "prompt"}`, `{"tool": n, "name", "arguments"}` (a host tool) and one
  final `{"result": ...}` or `{"failure": ...}` per job.
- server -> worker: a job (`{"query", "rlm", "progress", "trajectory", "context_type", ...}`),
  then, for `context_type` `text` or `json`, one frame whose payload is the context itself
  (raw UTF-8, or JSON), so a long text is never copied into a JSON document; `{"reply": n,
  ...}` for each call and each tool call.
"""

from __future__ import annotations

from typing import Any

import orjson

from rlm_server import Json

HEADER_BYTES = 8
DATAGRAM_BYTES = 1 << 16  # the largest control frame read (a fork names two paths)
CONTEXT_UNAVAILABLE = "ContextUnavailable"  # the failure kind of a worker without its context


def header(length: int) -> bytes:
    return length.to_bytes(HEADER_BYTES, "big")


def length_of(head: bytes | bytearray) -> int:
    return int.from_bytes(head, "big")


def pack(message: Json) -> bytes:
    """One frame: header and payload together."""
    payload = orjson.dumps(message, default=str)
    return header(len(payload)) + payload


def unpack(datagram: bytes | bytearray) -> Json | None:
    """The object one datagram holds, or None when it is not one whole frame of an object."""
    if (
        len(datagram) < HEADER_BYTES
        or length_of(datagram[:HEADER_BYTES]) != len(datagram) - HEADER_BYTES
    ):
        return None
    return loads(datagram[HEADER_BYTES:])


def loads(payload: bytes | bytearray) -> Json | None:
    """A frame's payload as a JSON object, or None when it is not one."""
    try:
        message: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None


# A failure frame's kind when the answer never matched `options.answer_schema`; the frame also
# carries `validation_error`, the last failure in words, at most VALIDATION_ERROR_CHARS long.
INVALID_ANSWER = "InvalidAnswer"
VALIDATION_ERROR_CHARS = 1000
