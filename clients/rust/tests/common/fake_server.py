"""A fake rlm-server for the Rust client's tests: it writes what the test scripts, so that a
test can send the client lines a real server never writes (malformed, oversized) or behave in
ways a real one does not (exit mid-request, answer late).

    fake_server.py [--eof-sleep=S] ANSWER...

It writes a `ready` notification, then answers the n-th request it reads (a message with an
id; notifications are ignored) with the n-th ANSWER, which is one of:

- a template: written as is (it may hold several lines), after `{id}` is replaced by the
  request's id and `{big:N}` by N times `x`;
- `!exit N`: exit with status N without answering;
- `!after S TEMPLATE`: wait S seconds, then answer with TEMPLATE.

Requests past the last ANSWER get no answer. At the end of its input it waits S seconds
(`--eof-sleep`, default 0) and exits 0.
"""

import json
import os
import re
import sys
import time

READY = {
    "jsonrpc": "2.0",
    "method": "ready",
    "params": {
        "server": "rlm-server",
        "version": "0.0.0-fake",
        "protocol": "1",
        "pid": os.getpid(),
        "available": False,
        "stub": True,
        "backend": "fake",
        "model": "fake",
        "environment": "local",
    },
}


def render(template: str, request_id: object) -> str:
    text = template.replace("{id}", json.dumps(request_id))
    return re.sub(r"\{big:(\d+)\}", lambda m: "x" * int(m.group(1)), text)


def main(args: list[str]) -> int:
    eof_sleep = 0.0
    if args and args[0].startswith("--eof-sleep="):
        eof_sleep = float(args.pop(0).split("=", 1)[1])
    answers = iter(args)
    out = sys.stdout
    out.write(json.dumps(READY) + "\n")
    out.flush()
    for line in sys.stdin:
        message = json.loads(line)
        if "id" not in message:
            continue
        answer = next(answers, None)
        if answer is None:
            continue
        if answer.startswith("!exit "):
            return int(answer.split()[1])
        if answer.startswith("!after "):
            _, delay, answer = answer.split(" ", 2)
            time.sleep(float(delay))
        out.write(render(answer, message["id"]) + "\n")
        out.flush()
    time.sleep(eof_sleep)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
