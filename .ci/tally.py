"""One line totalling every test suite of a CI run: `N passed, N failed` (and `, N skipped`).

.ci/run tees each runner's output to a log; this reads the closing lines each runner writes
(pytest's `1 failed, 2 passed, 1 skipped in 3.7s`, node's test runner's `# pass 2` ... lines,
every `test result:` line of cargo test, and this very form, `5 passed, 0 failed`, which
tests/inspector/check.py writes) and adds them up, so that the last line of a run
counts every suite instead of the last runner's last line (a doc-test run of 0 tests).

    python3 .ci/tally.py LOG...
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PYTEST = re.compile(r"^=* ?((?:\d+ [a-z]+(?:, )?)+) in [\d.]+s\b")
PYTEST_COUNT = re.compile(r"(\d+) ([a-z]+)")
NODE = re.compile(r"^(?:#|\u2139) (pass|fail|cancelled|skipped|todo) (\d+)$")
CARGO = re.compile(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored;")
PLAIN = re.compile(r"^(\d+) passed, (\d+) failed(?:, (\d+) skipped)?$")

# Each runner's word for an outcome, as one of ours.
OUTCOMES = {
    "passed": "passed",
    "xpassed": "passed",
    "pass": "passed",
    "failed": "failed",
    "error": "failed",
    "errors": "failed",
    "fail": "failed",
    "cancelled": "failed",
    "skipped": "skipped",
    "xfailed": "skipped",
    "todo": "skipped",
}


def tally(text: str) -> Counter[str]:
    """The outcomes that one runner's output reports in its closing lines."""
    counts: Counter[str] = Counter()
    for raw in text.splitlines():
        line = ANSI.sub("", raw).rstrip()
        if match := CARGO.match(line):
            passed, failed, ignored = (int(n) for n in match.groups())
            counts.update(passed=passed, failed=failed, skipped=ignored)
        elif match := PLAIN.match(line):
            passed, failed, skipped = (int(n or 0) for n in match.groups())
            counts.update(passed=passed, failed=failed, skipped=skipped)
        elif match := NODE.match(line):
            counts[OUTCOMES[match[1]]] += int(match[2])
        elif match := PYTEST.match(line):
            for number, word in PYTEST_COUNT.findall(match[1]):
                if word in OUTCOMES:  # not `deselected`, `warnings`
                    counts[OUTCOMES[word]] += int(number)
    return counts


def summary(counts: Counter[str]) -> str:
    line = f"{counts['passed']} passed, {counts['failed']} failed"
    return line + (f", {counts['skipped']} skipped" if counts["skipped"] else "")


def main(paths: list[str]) -> int:
    total: Counter[str] = Counter()
    for path in paths:
        file = Path(path)
        if file.is_file():
            total.update(tally(file.read_text(errors="replace")))
    print(summary(total))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
