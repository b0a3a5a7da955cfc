"""The MCP inspector's command-line mode (`mcp-inspector --cli`, from npm) against the real
`rlm-server mcp`, configured the way a host is: an `mcp.json` with an `mcpServers` entry.

It lists the tools (with --strict: their schemas must be portable), asks `rlm_ask` about a
file under `--allow-path` under both protocol eras (the scripted model's code finds the answer
in it through the REPL) and checks that a path outside is refused.
Run by .ci/run after `npm ci` in this folder; prints what the inspector printed, and a
closing `N passed, N failed` line; exits 1 on any failure.

    python tests/inspector/check.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]  # tests/: the fixture and the harness

from fixtures.openai_fixture import FixtureServer  # noqa: E402
from harness import fixture_env, repl  # noqa: E402

INSPECTOR = HERE / "node_modules" / ".bin" / "mcp-inspector"
CODE = "TANGO-7719"
FIND_CODE = repl(
    "import re",
    r'answer["content"] = re.search(r"vault code is ([\w-]+)", context).group(1)',
    'answer["ready"] = True',
)


def rlm_server() -> str:
    """The console script next to this interpreter, as a host would name it."""
    beside = Path(sys.executable).parent / "rlm-server"
    found = str(beside) if beside.exists() else shutil.which("rlm-server")
    if found is None:
        raise SystemExit("check.py: rlm-server is not installed beside this Python")
    return found


def host_config(directory: Path, base_url: str) -> Path:
    """An mcp.json as Cursor, Claude Desktop or the inspector read it."""
    env = {**fixture_env(base_url), "PATH": os.environ.get("PATH", "")}
    entry = {"command": rlm_server(), "args": ["mcp", "--allow-path", str(directory)], "env": env}
    path = directory.parent / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"rlm": entry}}, indent=2))
    return path


def inspect(config: Path, *args: str) -> tuple[int, Any, str]:
    """One inspector call: its exit code, the JSON it printed (None if it printed none) and
    what it said on stderr."""
    done = subprocess.run(
        [str(INSPECTOR), "--cli", "--config", str(config), "--server", "rlm", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MCP_INSPECTOR_SECRET_STORE": "memory"},
    )
    print(f"$ mcp-inspector --cli --config mcp.json --server rlm {' '.join(args)}")
    print(done.stdout.strip() or done.stderr.strip())
    try:
        return done.returncode, json.loads(done.stdout), done.stderr
    except json.JSONDecodeError:
        return done.returncode, None, done.stderr


def main() -> int:
    if not INSPECTOR.exists():
        print("check.py: run `npm ci` in tests/inspector first", file=sys.stderr)
        return 1
    model = FixtureServer(rules=[{"when": "root", "reply": FIND_CODE}])
    model.start_in_thread()
    failures: list[str] = []
    checks = 0

    def check(ok: bool, what: str) -> None:
        nonlocal checks
        checks += 1
        if not ok:
            failures.append(what)

    try:
        with tempfile.TemporaryDirectory() as work:
            project = Path(work) / "project"
            project.mkdir()
            (project / "notes.txt").write_text("lines\n" * 1000 + f"The vault code is {CODE}.\n")
            config = host_config(project, model.base_url)

            code, listed, said = inspect(config, "--method", "tools/list", "--strict")
            names = sorted(tool["name"] for tool in (listed or {}).get("tools", []))
            check(code == 0 and names == ["rlm_ask", "rlm_drop", "rlm_load"], "tools/list")
            problems = [line for line in said.splitlines() if line.startswith(("Warning", "Error"))]
            print("\n".join(problems))
            check(not problems, "portable tool schemas (--strict: no warning, no error)")

            ask = ["--method", "tools/call", "--tool-name", "rlm_ask"]
            question = "--tool-arg", "question=What is the vault code?"
            for era in ("legacy", "modern"):  # the initialize handshake, and 2026-07-28
                paths = "--tool-arg", f'paths=["{project}"]'
                code, answer, _ = inspect(config, "--protocol-era", era, *ask, *question, *paths)
                structured = (answer or {}).get("structuredContent", {})
                found = code == 0 and structured.get("answer") == CODE
                check(found and structured.get("stub") is False, f"rlm_ask over paths ({era})")

            code, refused, _ = inspect(config, *ask, *question, "--tool-arg", 'paths=["/etc"]')
            text = ((refused or {}).get("content") or [{}])[0].get("text", "")
            named = "paths: /etc is outside every --allow-path directory" in text
            check((refused or {}).get("isError") is True and named, "a path outside is refused")
    finally:
        model.shutdown()
        model.server_close()
    for failure in failures:
        print(f"FAILED: {failure}")
    print(f"{checks - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
