"""Long-context tasks made from a seed: nothing is downloaded, and the same seed and size always
make the same input, question and expected answer.

`niah` and `multi-niah` come from hard-needle (PyPI, MIT, no dependencies; the `eval` extra):
needles that look alike (several project codes, several deadlines) in business-text filler,
placed by a seeded generator. Its built-in filler is used, never its PG-19 option (a download).
`aggregate` and `pairs` are ours, in the style of OOLONG and OOLONG-Pairs: one customer message
per line, whose kind (complaint, praise, question, request) is never written down and must be
read from its meaning.

A task's `expected` is plain JSON (a string, a number, a list of pairs) so a JSONL row can
carry it; scoring.py knows how to score each task's answers.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

Expected = str | int | list[list[str]]

TASKS = ("niah", "multi-niah", "aggregate", "pairs")
MULTI_NEEDLES = 4
PAIRS_USERS = (4, 5, 6)  # how many users qualify in a `pairs` task: 6 to 15 pairs

# hard-needle's needle types, as its sentences and questions word them
NEEDLE_PHRASES = {
    "project_code": "special project code",
    "deadline": "internal deadline",
    "budget": "approved budget",
    "lead": "lead engineer",
}

KINDS = ("complaint", "praise", "question", "request")
MESSAGES = {
    "complaint": (
        "The {item} stopped working after {n} days.",
        "I am unhappy: the {item} arrived damaged.",
        "Your support line kept me waiting for {n} minutes.",
        "The {item} is much slower than you advertised.",
    ),
    "praise": (
        "The {item} works perfectly, thank you.",
        "Great service: the {item} arrived {n} days early.",
        "I love the new {item}.",
        "Your support team fixed my {item} in {n} minutes, well done.",
    ),
    "question": (
        "Does the {item} work with older models?",
        "How long is the warranty on the {item}?",
        "Can I pick up the {item} in a store?",
        "Which colours does the {item} come in?",
    ),
    "request": (
        "Please send me the manual for the {item}.",
        "Please change the delivery address for my {item}.",
        "Please add a second {item} to my order.",
        "Please send me an invoice for the {item}.",
    ),
}
ITEMS = ("kettle", "router", "desk lamp", "headset", "backpack", "blender", "monitor", "keyboard")
RECORDS_PREAMBLE = (
    "The context holds customer messages, one per line: date | user | message. "
    "Each message is a complaint, praise, a question or a request."
)


class Task(NamedTuple):
    name: str
    size: int  # the input's length asked for, in characters (the input is about this long)
    seed: int
    context: str
    question: str
    expected: Expected


def generate(name: str, size: int, seed: int) -> Task:
    """One task's input, question and expected answer."""
    context, question, expected = GENERATORS[name](size, seed)
    return Task(name, size, seed, context, question, expected)


# -- needles (hard-needle) ----------------------------------------------------------------------


def _needles(size: int, seed: int, count: int) -> tuple[str, list[dict[str, Any]], str]:
    """hard-needle's haystack, its needles, and its question about one of them."""
    from hard_needle import generate_hard_example

    example = generate_hard_example(num_needles=count, ctx_chars=size, seed=seed)
    prompt: str = example["prompt"]  # "... Document:\n{haystack}\n\nQuestion: ...": ours asks
    start = prompt.index("Document:\n") + len("Document:\n")
    haystack = prompt[start : prompt.rindex("\n\nQuestion: ")]
    return haystack, list(example["needle_records"]), str(example["question"])


def niah(size: int, seed: int) -> tuple[str, str, Expected]:
    haystack, [needle], question = _needles(size, seed, 1)
    return haystack, f"{question} Answer with the value only.", str(needle["value"])


def multi_niah(size: int, seed: int) -> tuple[str, str, Expected]:
    haystack, needles, _ = _needles(size, seed, MULTI_NEEDLES)
    phrase = NEEDLE_PHRASES[needles[0]["type"]]  # hard-needle's needles share one type
    entities = [str(n["entity"]) for n in needles]
    question = (
        f"What is the {phrase} for each of {', '.join(entities[:-1])} and {entities[-1]}? "
        "Answer with one line per project: 'project: value'."
    )
    return haystack, question, [[str(n["entity"]), str(n["value"])] for n in needles]


# -- customer messages (ours) --------------------------------------------------------------------


def _message(rng: random.Random, kind: str, day: int, user: str) -> str:
    text = rng.choice(MESSAGES[kind]).format(item=rng.choice(ITEMS), n=rng.randint(2, 40))
    return f"2025-{1 + day // 28 % 12:02d}-{1 + day % 28:02d} | {user} | {text}"


def _records(
    rng: random.Random, size: int, users: list[str], kind_of: Callable[[str], str]
) -> list[tuple[str, str, str]]:
    """(user, kind, line) records until their lines fill `size` characters."""
    records: list[tuple[str, str, str]] = []
    length = 0
    while length < size:
        user = rng.choice(users)
        kind = kind_of(user)
        line = _message(rng, kind, len(records), user)
        records.append((user, kind, line))
        length += len(line) + 1
    return records


def _users(rng: random.Random, count: int) -> list[str]:
    return [f"U{number:04d}" for number in rng.sample(range(10_000), count)]


def aggregate(size: int, seed: int) -> tuple[str, str, Expected]:
    """Even seeds ask for a count (scored 0.75^|error|), odd ones for the most common kind."""
    rng = random.Random(seed)
    common = rng.choice(KINDS)
    weights = [3 if kind == common else 2 for kind in KINDS]
    users = _users(rng, max(10, size // 2000))
    records = _records(rng, size, users, lambda _user: rng.choices(KINDS, weights)[0])
    counts = Counter(kind for _, kind, _ in records)
    while _tied(counts):  # one more message of a leading kind, so one kind is the most common
        user, kind = rng.choice(users), counts.most_common(1)[0][0]
        records.append((user, kind, _message(rng, kind, len(records), user)))
        counts[kind] += 1
    context = "\n".join(line for _, _, line in records)
    if seed % 2 == 0:
        kind = rng.choice(KINDS)
        plural = "messages of praise" if kind == "praise" else f"{kind}s"
        question = f"{RECORDS_PREAMBLE} How many {plural} are there? Answer with the number only."
        return context, question, counts[kind]
    question = (
        f"{RECORDS_PREAMBLE} Which kind of message is the most common? "
        "Answer with one word: complaint, praise, question or request."
    )
    return context, question, counts.most_common(1)[0][0]


def _tied(counts: Counter[str]) -> bool:
    top = counts.most_common(2)
    return len(top) == 2 and top[0][1] == top[1][1]


def pairs(size: int, seed: int) -> tuple[str, str, Expected]:
    """Only a few users ever praise: every pair of them is the answer."""
    rng = random.Random(seed)
    users = _users(rng, max(12, size // 1500))
    praising = set(rng.sample(users, rng.choice(PAIRS_USERS)))
    others = [kind for kind in KINDS if kind != "praise"]

    def kind_of(user: str) -> str:
        return "praise" if user in praising and rng.random() < 0.3 else rng.choice(others)

    records = _records(rng, size, users, kind_of)
    praised = {user for user, kind, _ in records if kind == "praise"}
    for user in sorted(praising - praised):  # short inputs: each of them praises once
        at = rng.randrange(len(records) + 1)
        records.insert(at, (user, "praise", _message(rng, "praise", at, user)))
    context = "\n".join(line for _, _, line in records)
    question = (
        f"{RECORDS_PREAMBLE} List every pair of users who both sent at least one message of "
        "praise. Write each pair as (U0123, U0456), the smaller ID first, one pair per line."
    )
    return context, question, [list(pair) for pair in itertools.combinations(sorted(praising), 2)]


GENERATORS: dict[str, Callable[[int, int], tuple[str, str, Expected]]] = {
    "niah": niah,
    "multi-niah": multi_niah,
    "aggregate": aggregate,
    "pairs": pairs,
}
