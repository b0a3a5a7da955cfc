"""The offline demo: a question about a 3 MB context, answered with no key and no network.

    python examples/demo.py

The REPL really runs the model's code over the real context (a regex over 40,000 log lines and
a sub-call on the excerpt it found); the model's replies come from replay/, which
record_demo.py made from replies written for this demo (no real model was called). It prints the
answer and writes rlm-demo-report.html, the trajectory as a self-contained page.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "demo-scripted"
QUESTION = "What is the new vault code?"


def server_command() -> list[str]:
    script = shutil.which("rlm-server")
    return [script] if script else [sys.executable, "-m", "rlm_server"]


def environment(extra: dict[str, str]) -> dict[str, str]:
    """Ours with no ELIZA_RLM_* setting or provider key, then the demo's model and `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ELIZA_RLM_") and not k.endswith("_API_KEY")
    }
    return {**env, "ELIZA_RLM_BACKEND": "openai", "ELIZA_RLM_MODEL": MODEL, **extra}


def ask(context: str, args: list[str], extra_env: dict[str, str]) -> str:
    """One infer through a real rlm-server process; its answer (or its error, raised)."""
    request = {"jsonrpc": "2.0", "id": 1, "method": "infer"}
    request["params"] = {"prompt": context, "query": QUESTION}
    done = subprocess.run(
        [*server_command(), *args],
        input=json.dumps(request).encode() + b"\n",
        capture_output=True,
        env=environment(extra_env),
        timeout=120,
        check=False,
    )
    for line in done.stdout.splitlines():
        message = json.loads(line)
        if message.get("id") == 1:
            if "error" in message:
                raise SystemExit(f"the server answered an error: {message['error']}")
            return str(message["result"]["text"])
    raise SystemExit(f"no answer; the server said: {done.stderr.decode()[-2000:]}")


def main() -> int:
    sys.path.insert(0, str(HERE))
    from make_context import context

    logs = Path(tempfile.mkdtemp(prefix="rlm-demo-logs-"))
    # no key; the base URL is a closed port, so a call that was not recorded could go nowhere
    env = {"ELIZA_RLM_BASE_URL": "http://127.0.0.1:9/v1"}
    answer = ask(context(), ["--replay", str(HERE / "replay"), "--log-dir", str(logs)], env)
    print(f"Q: {QUESTION}\nA: {answer}")
    [log] = logs.glob("*.jsonl")
    report = Path("rlm-demo-report.html").resolve()
    subprocess.run([*server_command(), "view", str(log), "-o", str(report)], check=True)
    print(f"trajectory: {log}\nreport: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
