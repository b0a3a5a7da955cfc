"""The shared transcripts in protocol/, replayed against the real server and fixture processes.

The TypeScript and Rust suites replay the same files, so each behaviour here is specified once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transcripts import TRANSCRIPTS, matches, replay, substitute


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


def test_bind_and_ref_carry_a_value_from_an_answer_to_a_request() -> None:
    bound: dict[str, str] = {}
    assert not matches({"id": "$bind:ctx", "n": 2}, {"id": "ctx-1", "n": 1}, bound)
    assert bound == {}  # a failed match binds nothing
    assert matches({"id": "$bind:ctx"}, {"id": "ctx-1"}, bound)
    assert bound == {"ctx": "ctx-1"}
    assert not matches({"id": "$bind:other"}, {"id": 5}, bound)  # only strings bind
    assert matches(["$ref:ctx"], ["ctx-1"], bound)
    assert not matches("$ref:ctx", "ctx-2", bound)
    assert substitute({"params": {"context_id": "$ref:ctx", "x": ["$ref:ctx", "$ctx"]}}, bound) == {
        "params": {"context_id": "ctx-1", "x": ["ctx-1", "$ctx"]}
    }
