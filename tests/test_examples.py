"""The README's offline demo works from a clean checkout: no key, no network, real REPL work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import clean_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_offline_demo_answers_and_writes_its_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        cwd=tmp_path,
        env=clean_env(),  # no ELIZA_RLM_* setting and no provider key
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "A: The vault code is 7-4-1-9 (log line 25001:" in done.stdout
    report = (tmp_path / "rlm-demo-report.html").read_text()
    assert "What is the new vault code?" in report and "7-4-1-9" in report
