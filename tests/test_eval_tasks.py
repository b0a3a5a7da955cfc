"""The eval harness's generators are deterministic per seed and their answers are right; its
scorers give the paper's credit (0.75^|error| for numbers, F1 for pairs, exact match else)."""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations

import pytest

from rlm_server.tools.eval.cli import parse_size
from rlm_server.tools.eval.report import plot, table
from rlm_server.tools.eval.runner import base_prompt
from rlm_server.tools.eval.scoring import each_pair, exact, f1, numeric, score, user_pairs
from rlm_server.tools.eval.tasks import KINDS, MESSAGES, TASKS, generate


def kind_of(message: str) -> str:
    """Which template wrote a message (the generator's ground truth, read back)."""
    for kind, templates in MESSAGES.items():
        for template in templates:
            pattern = re.escape(template).replace(re.escape("{item}"), ".+")
            if re.fullmatch(pattern.replace(re.escape("{n}"), r"\d+"), message):
                return kind
    raise AssertionError(message)


def records(context: str) -> list[tuple[str, str]]:
    """(user, kind) of every line."""
    found = []
    for line in context.splitlines():
        _date, user, message = line.split(" | ")
        found.append((user, kind_of(message)))
    return found


@pytest.mark.parametrize("name", TASKS)
def test_a_seed_makes_the_same_task_and_another_seed_another(name: str) -> None:
    first, again = generate(name, 20_000, 7), generate(name, 20_000, 7)
    assert first == again
    other = generate(name, 20_000, 8)
    assert other.context != first.context
    assert abs(len(first.context) - 20_000) < 500  # about the size asked for


@pytest.mark.parametrize("name", TASKS)
def test_sizes_scale_from_8k_to_4m_characters(name: str) -> None:
    for size in (8_000, 4_000_000):
        task = generate(name, size, 0)
        assert size <= len(task.context) < size * 1.05 + 200


def test_niah_hides_its_one_fact_once() -> None:
    task = generate("niah", 50_000, 3)
    assert isinstance(task.expected, str)
    entity = task.question.split(" for ")[1].split("?")[0]
    assert task.context.count(f" for {entity} is {task.expected}.") == 1
    assert task.question.endswith("Answer with the value only.")


def test_multi_niah_asks_for_every_needle_it_hid() -> None:
    task = generate("multi-niah", 50_000, 4)
    assert isinstance(task.expected, list) and len(task.expected) == 4
    for name, value in task.expected:
        assert name in task.question
        assert f" for {name} is {value}." in task.context


@pytest.mark.parametrize("seed", range(6))
def test_aggregate_answers_are_the_true_count_or_the_most_common_kind(seed: int) -> None:
    task = generate("aggregate", 30_000, seed)
    counts = Counter(kind for _, kind in records(task.context))
    if seed % 2 == 0:
        [asked] = [kind for kind in KINDS if kind in task.question.split("How many")[1]]
        assert task.expected == counts[asked]
    else:
        [(top, n), (_, runner_up)] = counts.most_common(2)
        assert task.expected == top and n > runner_up


@pytest.mark.parametrize("seed", range(4))
def test_pairs_are_every_pair_of_the_users_who_praise(seed: int) -> None:
    for size in (8_000, 200_000):
        task = generate("pairs", size, seed)
        praising = sorted({user for user, kind in records(task.context) if kind == "praise"})
        assert task.expected == [list(pair) for pair in combinations(praising, 2)]
        assert 6 <= len(task.expected) <= 15


def test_exact_match_wants_the_whole_value() -> None:
    assert exact("AUR-4521", "The code is AUR-4521.") == 1.0
    assert exact("AUR-4521", "the code is aur-4521") == 1.0
    assert exact("AUR-4521", "AUR-45210") == 0.0
    assert exact("Dr. Sarah Chen", "It is Dr.  Sarah Chen.") == 1.0
    assert exact("Dr. Sarah Chen", "Dr. Sarah Cheng") == 0.0
    assert exact("$1.2M", "about $1.2M") == 1.0 and exact("$1.2M", "$1.25M") == 0.0


def test_numbers_get_partial_credit() -> None:
    assert numeric(42, "42") == 1.0
    assert numeric(42, "There are 44.") == pytest.approx(0.75**2)
    assert numeric(42, "I counted 1,040 of them") == pytest.approx(0.75**998)
    assert numeric(42, "I count 40, no, 41") == pytest.approx(0.75)  # the last number
    assert numeric(42, "none found") == 0.0


def test_pairs_score_f1_in_any_order_and_layout() -> None:
    gold = [["U0001", "U0002"], ["U0001", "U0003"], ["U0002", "U0003"]]
    assert f1(gold, "(U0001, U0002)\n(U0003, U0001)\n(U0002, U0003)") == 1.0
    assert f1(gold, "(U0001, U0002), (U0001, U0003), (U0002, U0003)") == 1.0
    half = f1(gold, "(U0001, U0002)\n(U0009, U0008)")  # precision 1/2, recall 1/3
    assert half == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert f1(gold, "no pairs") == 0.0
    assert user_pairs("U0001 and U0001\nU0002, U0003, U0004") == set()


def test_multi_niah_credits_each_pair_stated_together() -> None:
    gold = [["Atlas", "AUR-1"], ["Apollo", "APO-2"]]
    assert each_pair(gold, "Atlas: AUR-1\nApollo: APO-2") == 1.0
    assert each_pair(gold, "Atlas: APO-2\nApollo: AUR-1") == 0.0  # swapped
    assert each_pair(gold, "Atlas: AUR-1\nApollo: unknown") == 0.5


def test_each_task_scores_its_own_expected_answer_as_right() -> None:
    for name in TASKS:
        for seed in range(2):
            task = generate(name, 10_000, seed)
            expected = task.expected
            if isinstance(expected, list) and name == "pairs":
                answer = "\n".join(f"({a}, {b})" for a, b in expected)
            elif isinstance(expected, list):
                answer = "\n".join(f"{a}: {b}" for a, b in expected)
            else:
                answer = str(expected)
            assert score(task, answer) == 1.0, (name, seed)
            assert score(task, "") == 0.0


def test_sizes_and_windows_read_as_characters_or_tokens() -> None:
    assert parse_size("8k") == 8_000 and parse_size("4M") == 4_000_000
    assert parse_size("1500") == 1500 and parse_size("100kt") == 400_000


def test_the_base_prompt_is_cut_to_the_window_and_says_so() -> None:
    task = generate("aggregate", 20_000, 0)
    whole, cut = base_prompt(task, 50_000)
    assert not cut and task.context in whole and whole.endswith(task.question)
    short, cut = base_prompt(task, 5_000)
    assert cut and len(short) == 5_000 and short.endswith(task.question)
    kept = short[short.index(task.context[:100]) : short.rindex("\n\nQuestion: ")]
    assert task.context.startswith(kept) and 4_000 < len(kept) < 5_000  # the input's start


def test_the_report_averages_seeds_and_notes_cuts_and_failures() -> None:
    def row(method: str, seed: int, value: float | None, **extra: object) -> dict[str, object]:
        base = {"task": "niah", "size": 8000, "seed": seed, "method": method, "score": value}
        usage = {"calls": 1, "tokens": 110, "cost_usd": 0.01}
        return {**base, **usage, "seconds": 1.0, "cut": False, "error": None, **extra}

    rows = [
        row("rlm", 0, 1.0),
        row("rlm", 1, 0.0, error="backend_error"),
        row("base", 0, 0.5, cut=True),
        row("base", 1, None, error="budget_exceeded"),
    ]
    header = {"backend": "openai", "model": "m<1>", "seeds": 2, "window": 4000, "stopped": True}
    report = table(rows, header)
    assert "| niah | 8k | 50.0 (1 failed) | 50.0 | $0.0100" in report
    assert "cut to 4k in 1/1" in report and "Stopped early" in report
    svg = plot(rows, header)
    assert svg.startswith("<svg") and "m&lt;1&gt;" in svg and svg.count("<circle") == 2
