"""A host tool round trip: model code -> the client's handler -> model code, median and p99.

Model code (scripted, through the fixture) calls a tool `ping` CALLS times in a row and times
each call itself, with `time.perf_counter_ns` in the REPL; the answer carries the figures. Once
through rlm-server, where `ping` is a `tool/call` answered at once by a trivial handler in this
process (read the line, write the response), and once through the `rlm` library in one process,
where `ping` is a plain function given as `custom_tools`: the floor a host tool can be held to.

    python bench/tool_roundtrip.py [--calls N]

Needs rlm-server importable (`pip install -e .`) and the `rlm` library it pins. Prints one JSON
object: {"server": {...}, "library": {...}, "calls": N}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "openai_fixture.py"
PING = {
    "name": "ping",
    "description": "Answers its arguments back.",
    "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
}


def model_code(calls: int) -> str:
    """The root model's reply: time `calls` tool calls from inside the REPL."""
    lines = [
        "import json, time",
        "ping(n=-1)",
        "samples = []",
        f"for i in range({calls}):",
        "    started = time.perf_counter_ns()",
        "    ping(n=i)",
        "    samples.append(time.perf_counter_ns() - started)",
        "samples.sort()",
        "answer['content'] = json.dumps({",
        "    'median_us': samples[len(samples) // 2] / 1000,",
        "    'p99_us': samples[int(len(samples) * 0.99)] / 1000,",
        "})",
        "answer['ready'] = True",
    ]
    return "```repl\n" + "\n".join(lines) + "\n```"


def start_fixture(calls: int, scratch: Path) -> tuple[subprocess.Popen[bytes], str]:
    rules = scratch / "rules.json"
    rules.write_text(json.dumps([{"when": "root", "reply": model_code(calls)}]))
    fixture = subprocess.Popen(
        [sys.executable, str(FIXTURE), "--rules", str(rules)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert fixture.stdout is not None
    base_url: str = json.loads(fixture.stdout.readline())["base_url"]
    return fixture, base_url


def through_server(base_url: str) -> Any:
    """One infer with `ping` declared; every tool/call answered at once from this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELIZA_RLM_")}
    env.update(
        ELIZA_RLM_BACKEND="openai",
        ELIZA_RLM_BASE_URL=base_url,
        ELIZA_RLM_MODEL="scripted",
        OPENAI_API_KEY="bench",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "rlm_server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert server.stdin is not None and server.stdout is not None
    request = {"prompt": "ctx", "query": "bench", "tools": [PING]}
    send = server.stdin
    infer = {"jsonrpc": "2.0", "id": 1, "method": "infer", "params": request}
    send.write(json.dumps(infer).encode() + b"\n")
    send.flush()
    try:
        for line in server.stdout:
            message = json.loads(line)
            if message.get("method") == "tool/call":  # the trivial handler: its arguments back
                value = message["params"]["arguments"]
                answer = {"jsonrpc": "2.0", "id": message["id"], "result": value}
                send.write(json.dumps(answer).encode() + b"\n")
                send.flush()
            elif message.get("id") == 1:
                if "error" in message:
                    raise SystemExit(f"the infer failed: {message['error']}")
                return json.loads(message["result"]["text"])
        raise SystemExit("the server exited before answering")
    finally:
        send.close()
        server.wait(timeout=30)


def in_process(base_url: str) -> Any:
    """The same completion through the `rlm` library, `ping` a function of this process."""
    from rlm import RLM

    rlm = RLM(
        backend="openai",
        backend_kwargs={"model_name": "scripted", "base_url": base_url, "api_key": "bench"},
        custom_tools={"ping": {"tool": lambda **arguments: arguments, "description": "Echo."}},
        max_iterations=2,
    )
    return json.loads(str(rlm.completion("ctx", root_prompt="bench").response))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        fixture, base_url = start_fixture(args.calls, Path(scratch))
        try:
            figures = {
                "calls": args.calls,
                "server": through_server(base_url),
                "library": in_process(base_url),
            }
        finally:
            fixture.kill()
            fixture.wait()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
