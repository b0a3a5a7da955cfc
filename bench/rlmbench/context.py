"""The long context of the needle figure: deterministic filler text with one secret in it."""

from __future__ import annotations

import random
from typing import Any

NEEDLE_PREFIX = "The secret code is "
SECRET_CHARS = 16
WORDS = (  # noqa: SIM905 - a word list reads better as one string
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu the of and "
    "to in is was for on with as by at from river stone cloud paper garden window market"
).split()

# The root model's code: find the needle with str.find, answer the 16 characters after it.
_START, _END = len(NEEDLE_PREFIX), len(NEEDLE_PREFIX) + SECRET_CHARS
NEEDLE_CODE = (
    f"i = context.find({NEEDLE_PREFIX!r})",
    f"answer['content'] = context[i + {_START}:i + {_END}]",
    "answer['ready'] = True",
)
NEEDLE_QUERY = "What is the secret code?"


def _layout(size: int, seed: int) -> tuple[bytes, str, bytes, int]:
    """What both makers share: the filler block, the secret, the needle and where it goes."""
    rng = random.Random(seed)
    block = " ".join(rng.choice(WORDS) for _ in range(1200)).encode()[:4096]
    secret = f"{rng.getrandbits(64):016x}"
    needle = f" {NEEDLE_PREFIX}{secret}. ".encode()
    fill = size - len(needle)
    return block, secret, needle, rng.randrange(fill // 10, fill - fill // 10)


def make_context(size: int, seed: int = 5) -> tuple[bytes, str]:
    """`size` bytes of ASCII text (no quotes, backslashes or newlines: it embeds in JSON as it
    is) with the needle somewhere in the middle 80%; returns (text, secret)."""
    block, secret, needle, at = _layout(size, seed)
    fill = size - len(needle)
    filler = block * (fill // len(block) + 1)
    body = b"".join((filler[:at], needle, filler[at:fill]))
    assert len(body) == size
    return body, secret


def context_chunks(size: int, chunk: int, seed: int = 5) -> tuple[list[tuple[int, int]], str, Any]:
    """The text `make_context(size, seed)` makes, as (start, end) pieces of at most `chunk`
    bytes and a function that makes one piece, so a 2 GiB context is never whole in the bench's
    memory; returns (pieces, secret, piece)."""
    block, secret, needle, at = _layout(size, seed)
    period = len(block)
    repeated = block * (chunk // period + 2)

    def filler(start: int, end: int) -> bytes:  # bytes [start, end) of the endless filler
        offset = start % period
        return repeated[offset : offset + end - start]

    def piece(bounds: tuple[int, int]) -> bytes:
        start, end = bounds
        parts = []
        if start < at:
            parts.append(filler(start, min(end, at)))
        if start < at + len(needle) and end > at:
            parts.append(needle[max(0, start - at) : min(len(needle), end - at)])
        if end > at + len(needle):
            lo = max(start, at + len(needle)) - len(needle)
            parts.append(filler(lo, end - len(needle)))
        return b"".join(parts)

    pieces = [(start, min(start + chunk, size)) for start in range(0, size, chunk)]
    return pieces, secret, piece
