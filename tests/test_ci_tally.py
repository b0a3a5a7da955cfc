""".ci/tally.py: the last line of .ci/run totals every suite, from each runner's real output
(saved in tests/fixtures/ci: pytest in both forms, node's test runner, cargo test with unit,
integration and doc-test runs, each with a failure or a skip; and the closing line of
tests/inspector/check.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "fixtures" / "ci"


def _tally(*names: str) -> str:
    paths = [str(SAMPLES / name) for name in names]
    command = [sys.executable, str(ROOT / ".ci" / "tally.py"), *paths]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return done.stdout


def test_each_runners_closing_lines_are_read() -> None:
    assert _tally("pytest-mixed.txt") == "2 passed, 1 failed, 1 skipped\n"
    assert _tally("pytest-quiet.txt") == "2 passed, 0 failed\n"  # deselected is not skipped
    assert _tally("node-mixed.txt") == "2 passed, 1 failed, 1 skipped\n"
    assert _tally("cargo-mixed.txt") == "3 passed, 1 failed, 1 skipped\n"  # doc-tests too
    assert _tally("inspector.txt") == "5 passed, 1 failed\n"  # tests/inspector/check.py's form


def test_every_suite_adds_up_in_one_line() -> None:
    every = ("pytest-mixed.txt", "pytest-quiet.txt", "node-mixed.txt", "cargo-mixed.txt")
    assert _tally(*every, "inspector.txt") == "14 passed, 4 failed, 3 skipped\n"


def test_no_log_is_no_test() -> None:
    assert _tally("no-such-log.txt") == "0 passed, 0 failed\n"
