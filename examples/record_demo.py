"""How replay/ was made: the demo's model replies, recorded through the real server.

The replies were written for this demo (no real model was called): a scripted OpenAI-compatible
server (tests/fixtures/openai_fixture.py) answers the root model's two turns and one sub-call
with the code and text below, and rlm-server --record stores every exchange the broker makes.
Run it again after changing the replies, the context, or anything that changes the requests the
server sends (the rlm library's prompts, say):

    python examples/record_demo.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from demo import ask  # noqa: E402
from fixtures.openai_fixture import FixtureServer  # noqa: E402
from make_context import context  # noqa: E402

FIND = """```repl
import re
print(f"{len(context):,} characters, {context.count(chr(10)):,} lines")
hits = [m.start() for m in re.finditer(r"vault code", context)]
print("mentions of 'vault code':", len(hits))
start = context.rfind(chr(10), 0, hits[0]) + 1
line = context[start:context.find(chr(10), hits[0])]
print(line)
```"""

ANSWER = """```repl
code = llm_query("Reply with the vault code in this log line, and nothing else:\\n" + line)
number = context[:start].count(chr(10)) + 1
answer["content"] = f"The vault code is {code.strip()} (log line {number}: {line})"
answer["ready"] = True
```"""

RULES: list[dict[str, Any]] = [
    {"when": "root", "times": 1, "reply": FIND},
    {"when": "sub", "reply": "7-4-1-9"},
    {"when": "root", "reply": ANSWER},
]


def main() -> int:
    tape = HERE / "replay"
    shutil.rmtree(tape, ignore_errors=True)
    fixture = FixtureServer(rules=RULES)
    fixture.start_in_thread()
    try:
        env = {"ELIZA_RLM_BASE_URL": fixture.base_url, "OPENAI_API_KEY": "demo-key-not-real"}
        text = ask(context(), ["--record", str(tape)], env)
    finally:
        fixture.shutdown()
        fixture.server_close()
    print(text)
    print(f"recorded {len(list(tape.glob('*.json')))} exchanges in {tape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
