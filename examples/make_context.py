"""The demo's context: about 3 MB of made-up service logs with one fact buried in them.

Deterministic (a fixed seed), so the recorded model exchanges in replay/ match it byte for byte:
the requests the server sends the model describe the context (its length, for one), and a
replayed call is found by a hash of the request.

    python examples/make_context.py > context.txt
"""

from __future__ import annotations

import random
import sys

SEED = 2512
LINES = 40_000
FACT = "2026-03-14T09:26:53Z vault-svc INFO rotation complete; the new vault code is 7-4-1-9"
SERVICES = ("auth", "billing", "search", "mailer", "cache", "gateway", "scheduler", "vault-svc")
EVENTS = (
    "request served in {n} ms",
    "cache miss for key user:{n}",
    "retrying upstream call ({n} of 3)",
    "queue depth {n}",
    "health check ok",
    "rotated log file segment {n}",
)


def context() -> str:
    rng = random.Random(SEED)
    lines = []
    for index in range(LINES):
        if index == LINES * 5 // 8:
            lines.append(FACT)
            continue
        minute, second = divmod(index, 60)
        event = rng.choice(EVENTS).format(n=rng.randrange(1, 5000))
        level = rng.choice(("INFO", "INFO", "INFO", "WARN", "DEBUG"))
        stamp = f"2026-03-14T{minute // 60 % 24:02d}:{minute % 60:02d}:{second:02d}Z"
        lines.append(f"{stamp} {rng.choice(SERVICES)} {level} {event}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(context())
