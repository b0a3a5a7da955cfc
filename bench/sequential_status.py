"""Spawn to `ready`, and `status` round trips over 10,000 sequential requests (issue 2's figures).

    python bench/sequential_status.py [server command...]   (default: rlm-server)

Raw pipes, one request at a time, unpinned; the server runs in stub mode (no backend needed).
bench/run measures the same round trip pinned, against a C echo floor and the plugin's server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

REQUESTS = 10_000
STATUS = b'{"jsonrpc":"2.0","id":1,"method":"status"}\n'


def spawn(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None
    assert b'"ready"' in process.stdout.readline()
    return process, time.perf_counter() - started


def main(command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELIZA_RLM_")}
    readies = []
    for _ in range(5):
        process, ready_s = spawn(command, env)
        readies.append(ready_s)
        process.communicate(timeout=30)
    process, _ = spawn(command, env)
    assert process.stdin is not None and process.stdout is not None
    write_fd, read_fd = process.stdin.fileno(), process.stdout.fileno()
    timings = []
    for i in range(500 + REQUESTS):
        started = time.perf_counter_ns()
        os.write(write_fd, STATUS)
        reply = os.read(read_fd, 1 << 16)
        if i >= 500:
            timings.append(time.perf_counter_ns() - started)
        assert reply.endswith(b"\n"), "one status answer per read"
    process.communicate(timeout=30)
    timings.sort()
    p50, p99 = timings[REQUESTS // 2] / 1000, timings[REQUESTS * 99 // 100] / 1000
    print(f"spawn to ready, median of 5: {sorted(readies)[2] * 1000:.1f} ms")
    print(f"status round trip, {REQUESTS:,} in a row: p50 {p50:.1f} us, p99 {p99:.1f} us")


if __name__ == "__main__":
    main(sys.argv[1:] or ["rlm-server"])
