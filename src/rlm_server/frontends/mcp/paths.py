"""Files read for a tool call: only under the directories named by --allow-path.

The server reads them (never model code, which the sandbox keeps from the filesystem) and joins
them into one text, each file under a `==> path <==` header, so model code can split it again.
A path is judged by where it really is (symlinks resolved): anything outside every allowed
directory is refused, naming the path. Inside a directory or a glob, a symlink that leads out
is skipped and named, as are binary files (a NUL byte, or not UTF-8) and the files past
--max-read-bytes: the caller sees what was left out and why.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from rlm_server.errors import InvalidParams

SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB makes a file binary, as git judges it
SKIPPED_LISTED = 100  # the report names this many skipped files, and counts them all
GLOB_MAGIC = ("*", "?", "[")
FIELD = "paths"


class Gathered(NamedTuple):
    """The files' joined text, and what the caller is told about it."""

    text: str
    files: int
    bytes: int
    skipped: list[dict[str, str]]

    def report(self) -> dict[str, Any]:
        """What the caller is told: a long list of skipped files would flood a model's
        context, so the first SKIPPED_LISTED are named and the rest counted."""
        report: dict[str, Any] = {"files": self.files, "bytes": self.bytes}
        report["skipped"] = self.skipped[:SKIPPED_LISTED]
        if len(self.skipped) > SKIPPED_LISTED:
            report["skipped_total"] = len(self.skipped)
        return report


def gather(patterns: Sequence[str], allowed: Sequence[str], limit: int) -> Gathered:
    """Read every file the patterns name, in order; blocking (run it in a thread)."""
    if not allowed:
        raise InvalidParams(
            FIELD, "reading files is off: the server was started without --allow-path"
        )
    parts: list[str] = []
    skipped: list[dict[str, str]] = []
    total = files = 0
    seen: set[str] = set()
    for path, real in _expand(patterns, allowed, skipped):
        if real in seen:
            continue
        seen.add(real)
        content, size, reason = _read_text(real, limit - total)
        if content is None:
            skipped.append({"path": path, "reason": reason})
            continue
        parts.append(f"==> {path} <==\n{content}\n")
        total += size
        files += 1
    if not files:
        raise InvalidParams(FIELD, _nothing_read(skipped))
    return Gathered("".join(parts), files, total, skipped)


def _nothing_read(skipped: list[dict[str, str]]) -> str:
    if not skipped:
        return "no file matched"
    first = skipped[0]
    return f"no file could be read ({first['path']}: {first['reason']})"


def _expand(
    patterns: Sequence[str], allowed: Sequence[str], skipped: list[dict[str, str]]
) -> Iterator[tuple[str, str]]:
    """Each pattern's files, as given and resolved: a file, every file under a directory, or a
    glob's matches."""
    for given in patterns:
        pattern = os.path.expanduser(given)
        if any(magic in pattern for magic in GLOB_MAGIC):
            _require_allowed(_glob_base(pattern), allowed, pattern)
            matches = sorted(glob.glob(pattern, recursive=True))
            yield from _inside(matches, allowed, skipped)
            continue
        real = _require_allowed(pattern, allowed, pattern)
        if os.path.isdir(pattern):
            yield from _inside(_walk(pattern), allowed, skipped)
        elif os.path.isfile(pattern):
            yield pattern, real
        else:
            raise InvalidParams(FIELD, f"{pattern}: no such file or directory")


def _inside(
    paths: Iterator[str] | list[str], allowed: Sequence[str], skipped: list[dict[str, str]]
) -> Iterator[tuple[str, str]]:
    """The regular files among `paths`, as given and resolved; a symlink out of the allowed
    directories is skipped."""
    for path in paths:
        if not os.path.isfile(path):
            continue
        real = os.path.realpath(path)
        if not _is_allowed(real, allowed):
            skipped.append(
                {"path": path, "reason": "a symlink out of the --allow-path directories"}
            )
            continue
        yield path, real


def _walk(directory: str) -> Iterator[str]:
    """Every file under `directory`, in a stable order, not following directory symlinks."""
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            yield os.path.join(root, name)


def _glob_base(pattern: str) -> str:
    """The directory a glob starts from: its leading components without a wildcard."""
    parts = pattern.split(os.sep)
    literal = []
    for part in parts:
        if any(magic in part for magic in GLOB_MAGIC):
            break
        literal.append(part)
    return os.sep.join(literal) or "."


def _is_allowed(real: str, allowed: Sequence[str]) -> bool:
    """Whether a resolved path is one of the allowed directories or under one."""
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in allowed)


def _require_allowed(path: str, allowed: Sequence[str], named: str) -> str:
    """The path resolved; InvalidParams naming it when it is outside every allowed directory."""
    real = os.path.realpath(path)
    if not _is_allowed(real, allowed):
        raise InvalidParams(FIELD, f"{named} is outside every --allow-path directory")
    return real


def _read_text(path: str, room: int) -> tuple[str | None, int, str]:
    """The file's text and its size in bytes, or None and why it was skipped."""
    try:
        size = os.path.getsize(path)
        if size > room:
            why = f"over --max-read-bytes ({size} bytes; {max(room, 0)} left of the limit)"
            return None, 0, why
        with open(path, "rb") as file:
            data = file.read(min(SNIFF_BYTES, room + 1))
            if b"\0" in data:
                return None, 0, "binary"
            data += file.read(room + 1 - len(data))
    except OSError as error:
        return None, 0, f"unreadable ({error.strerror or 'error'})"
    if len(data) > room:
        return None, 0, "over --max-read-bytes (it grew while read)"
    try:
        return data.decode("utf-8"), len(data), ""
    except UnicodeDecodeError:
        return None, 0, "binary (not UTF-8 text)"
