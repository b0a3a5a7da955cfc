"""The shared transcripts in protocol/, replayed against the real server and fixture processes.

The TypeScript and Rust suites replay the same files, so each behaviour here is specified once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transcripts import TRANSCRIPTS, matches, replay


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.stem)
def test_transcript(path: Path) -> None:
    replay(path)


def test_there_are_transcripts() -> None:
    assert len(TRANSCRIPTS) >= 10


def test_matcher_rejects_what_it_should() -> None:
    assert matches({"a": 1}, {"a": 1, "b": 2})
    assert not matches({"a": 1}, {"a": 2})
    assert not matches({"a": "$absent"}, {"a": None})
    assert matches({"a": "$absent"}, {"b": 1})
    assert not matches([1, 2], [1])
    assert not matches("$integer", 1.5)
    assert not matches("$integer", True)
    assert not matches(1, True)
