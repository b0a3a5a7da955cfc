"""JSON lines, for every line front end: decoding, encoding, and the id of a line too long to
parse. Kept apart from the JSON-RPC layer, which imports jsonrpcserver when first needed."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from rlm_server.errors import ParseError, RpcError

RequestId = str | int | None  # an id as JSON-RPC and the plugin's protocol both write it


def error_response(error: RpcError, request_id: RequestId) -> dict[str, Any]:
    """A JSON-RPC 2.0 error response (the JSON-RPC and MCP front ends both answer with one)."""
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_wire()}


# `"id"` as the first member of the top-level object, or the second after `"jsonrpc": "2.0"`,
# as clients write it: only there can it not be a key inside `params`.
_LEADING_ID = re.compile(
    rb'\s*\{\s*(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")\s*[,}]'
)


def decode(line: bytes | bytearray) -> Any:
    """Parse one line; raise ParseError (-32700) if it is not JSON (or nests over 1024 deep).

    JSON allows an escaped lone surrogate (`"\\ud800"`, as JavaScript's JSON.stringify writes
    one) but orjson refuses it; only then does the stdlib parser get a turn, and the lone
    surrogates become U+FFFD, so the request is served rather than refused without its id.
    It reads integers as orjson does, so that both give the same values.
    """
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        if not _has_surrogate_escape(line):  # malformed: no slower parser will do better
            raise ParseError() from None
    try:
        return _replace_surrogates(json.loads(line, parse_int=_integer))
    except (ValueError, RecursionError):
        raise ParseError() from None


def _integer(digits: str) -> int | float:
    """An integer as orjson reads it: beyond 64 bits a float, beyond a float's range not JSON.
    No integer past 64 bits ever reaches an encoder (orjson refuses to write one)."""
    value = int(digits)
    if -(2**63) <= value < 2**64:
        return value
    try:
        return float(value)
    except OverflowError:
        raise ValueError("number out of range") from None


SCAN_CHUNK = 8 << 20


def _has_surrogate_escape(line: bytes | bytearray) -> bool:
    """Whether `line` may hold an escaped surrogate (`\\ud800`-`\\udfff`), searched a chunk
    at a time so that, run in a thread, it never holds the interpreter for long."""
    for start in range(0, len(line), SCAN_CHUNK):
        end = start + SCAN_CHUNK + 3  # an escape may straddle two chunks
        if line.find(b"\\ud", start, end) >= 0 or line.find(b"\\uD", start, end) >= 0:
            return True
    return False


def encode(message: Any) -> bytes:
    """One compact JSON line; lone surrogates (which orjson refuses) become U+FFFD."""
    try:
        return orjson.dumps(message)
    except orjson.JSONEncodeError:
        return orjson.dumps(_replace_surrogates(message))


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _replace_surrogates(v) for k, v in value.items()}
    return value


def leading_id(head: bytes) -> RequestId:
    """The id of a request from the first bytes of its line, when it stands first; else None.

    For a line over the size limit, which is never parsed whole: its caller's request can then
    fail at once instead of waiting for its own timeout.
    """
    match = _LEADING_ID.match(head)
    if match is None:
        return None
    try:
        request_id = orjson.loads(match.group(1))
    except orjson.JSONDecodeError:
        return None
    return request_id if isinstance(request_id, str | int) else None
