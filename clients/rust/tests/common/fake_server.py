"""A fake rlm-server for the Rust client's tests: it writes what the test scripts, so that a
test can send the client lines a real server never writes (malformed, oversized) or behave in
ways a real one does not (exit mid-request, answer late).

    fake_server.py [--drain=S] ANSWER...

It writes a `ready` notification, then answers the n-th request it reads (a message with an
id, other than `shutdown`) with the n-th ANSWER, which is one of:

- a template: written as is (it may hold several lines), after `{id}` is replaced by the
  request's id, `{big:N}` by N times `x`, and `{read}` by the line it answers as a JSON
  string (so a test can see how the client answered a request of the server's own, which
  this script takes for a request too: it has an id);
- `!none`: no answer;
- `!exit N`: exit with status N without answering.

Every line it reads is echoed to stderr (its first 200 characters), after
`fake server read: `, so that a test can see what the client sent. Requests past the last
ANSWER get no answer; other notifications are ignored. A `shutdown`
(request or notification) makes it spend S seconds (`--drain`, default 0) on its pretend
in-flight work, answer `{"shutdown": true}` if it was a request, and exit 0; so does the end
of its input, without the wait.
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
        "sandbox": "off",
        "protections": ["private_tmp"],
    },
}


def render(template: str, request_id: object, line: str) -> str:
    text = template.replace("{id}", json.dumps(request_id))
    text = re.sub(r"\{big:(\d+)\}", lambda m: "x" * int(m.group(1)), text)
    return text.replace("{read}", json.dumps(line.strip()))


def main(args: list[str]) -> int:
    drain = 0.0
    if args and args[0].startswith("--drain="):
        drain = float(args.pop(0).split("=", 1)[1])
    answers = iter(args)
    out = sys.stdout
    out.write(json.dumps(READY) + "\n")
    out.flush()
    for line in sys.stdin:
        sys.stderr.write("fake server read: " + line[:200])
        sys.stderr.flush()
        message = json.loads(line)
        if message.get("method") == "shutdown":
            time.sleep(drain)
            if "id" in message:
                answer = {"jsonrpc": "2.0", "result": {"shutdown": True}, "id": message["id"]}
                out.write(json.dumps(answer) + "\n")
            return 0
        if "id" not in message:
            continue
        answer = next(answers, "!none")
        if answer.startswith("!exit "):
            return int(answer.split()[1])
        if answer != "!none":
            out.write(render(answer, message["id"], line) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
