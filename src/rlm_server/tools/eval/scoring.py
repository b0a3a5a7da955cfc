"""Scores in [0, 1], as the RLM paper scores its tasks: numeric answers get partial credit
0.75^|y - ŷ|, pairs F1, anything else exact match. A model answers in prose, so exact match
means the expected value appears in the answer as a whole (case and spacing aside), and a number
is the last one the answer writes (the questions ask for the number only).
"""

from __future__ import annotations

import re

from rlm_server.tools.eval.tasks import Expected, Task

PARTIAL_BASE = 0.75
USER_ID = re.compile(r"\bU\d{4}\b")
INTEGER = re.compile(r"(?<![\w-])\d[\d,]*")


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def exact(expected: str, answer: str) -> float:
    """1 when the expected value is in the answer, not as part of a longer word or number."""
    pattern = r"(?<![\w.])" + re.escape(_normal(expected)) + r"(?![\w])"
    return 1.0 if re.search(pattern, _normal(answer)) else 0.0


def numeric(expected: int, answer: str) -> float:
    """0.75^|y - ŷ| for the last integer in the answer; 0 when it has none."""
    found = INTEGER.findall(answer)
    if not found:
        return 0.0
    guess = int(found[-1].replace(",", ""))
    return float(PARTIAL_BASE ** abs(expected - guess))


def each_pair(expected: list[list[str]], answer: str) -> float:
    """The share of `[name, value]` pairs that some line of the answer states together."""
    lines = [_normal(line) for line in answer.splitlines()]
    found = sum(
        any(_normal(name) in line and exact(value, line) for line in lines)
        for name, value in expected
    )
    return found / len(expected) if expected else 1.0


def user_pairs(answer: str) -> set[tuple[str, str]]:
    """Each line, or parenthesised group, that names exactly two different user IDs."""
    pieces = answer.splitlines() + re.findall(r"\(([^()]*)\)", answer)
    found = set()
    for piece in pieces:
        ids = USER_ID.findall(piece)
        if len(ids) == 2 and ids[0] != ids[1]:
            first, second = sorted(ids)
            found.add((first, second))
    return found


def f1(expected: list[list[str]], answer: str) -> float:
    """F1 of the user pairs the answer names against the expected ones (order within a pair
    does not matter)."""
    gold = {(min(a, b), max(a, b)) for a, b in expected}
    guessed = user_pairs(answer)
    if not gold and not guessed:
        return 1.0
    right = len(gold & guessed)
    if right == 0:
        return 0.0
    precision, recall = right / len(guessed), right / len(gold)
    return 2 * precision * recall / (precision + recall)


def score(task: Task, answer: str) -> float:
    """The answer's score for this task."""
    return score_expected(task.name, task.expected, answer)


def score_expected(name: str, expected: Expected, answer: str) -> float:
    if name == "pairs":
        assert isinstance(expected, list)
        return f1(expected, answer)
    if name == "multi-niah":
        assert isinstance(expected, list)
        return each_pair(expected, answer)
    if isinstance(expected, int):
        return numeric(expected, answer)
    assert isinstance(expected, str)
    return exact(expected, answer)
