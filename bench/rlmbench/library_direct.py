"""The `rlm` library called directly, in this one Python process: what a user would otherwise do.

    python -m rlmbench.library_direct infer  BASE_URL N WARMUP
    python -m rlmbench.library_direct needle BASE_URL SIZE_BYTES
    python -m rlmbench.library_direct tools  BASE_URL N

One `rlm.RLM` is built once and reused for every completion (the library's best case); each
`completion` is timed on its own. Prints one JSON object on stdout. The library's own output (it
prints nothing with verbose=False) goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rlmbench.context import NEEDLE_QUERY, make_context


def vm_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def build(base_url: str, **options: Any) -> Any:
    from rlm import RLM

    return RLM(
        backend="openai",
        backend_kwargs={"model_name": "scripted", "base_url": base_url, "api_key": "test-key"},
        environment="local",
        max_iterations=4,
        max_depth=1,
        verbose=False,
        **options,
    )


def infer(base_url: str, n: int, warmup: int) -> dict[str, Any]:
    started = time.perf_counter()
    rlm = build(base_url)
    built_s = time.perf_counter() - started
    times, texts = [], set()
    for i in range(warmup + n):
        t = time.perf_counter()
        completion = rlm.completion("hello", root_prompt="say ok")
        elapsed = time.perf_counter() - t
        texts.add(str(completion.response))
        if i >= warmup:
            times.append(elapsed)
    return {"times_s": times, "texts": sorted(texts), "import_and_build_s": built_s}


def needle(base_url: str, size: int) -> dict[str, Any]:
    rlm = build(base_url)
    rlm.completion("warm up: The secret code is 0123456789abcdef.", root_prompt=NEEDLE_QUERY)
    body, secret = make_context(size)
    context = body.decode("ascii")
    del body
    rss_before = vm_kib("VmRSS")
    t = time.perf_counter()
    completion = rlm.completion(context, root_prompt=NEEDLE_QUERY)
    elapsed = time.perf_counter() - t
    return {
        "time_s": elapsed,
        "found": str(completion.response).strip() == secret,
        "rss_before_kib": rss_before,
        "peak_kib": vm_kib("VmHWM"),
    }


def tools(base_url: str, n: int) -> dict[str, Any]:
    """N completions whose model code times its calls of `ping`, here a plain function given as
    `custom_tools` (the floor for a host tool): each answer is that run's figures."""
    ping = {"tool": lambda **arguments: arguments, "description": "Answers its arguments back."}
    rlm = build(base_url, custom_tools={"ping": ping})
    return {"runs": [json.loads(str(rlm.completion("ctx").response)) for _ in range(n)]}


def main(argv: list[str]) -> int:
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # anything the library prints must not mix with our JSON
    mode, base_url = argv[0], argv[1]
    if mode == "infer":
        result = infer(base_url, int(argv[2]), int(argv[3]))
    elif mode == "needle":
        result = needle(base_url, int(argv[2]))
    elif mode == "tools":
        result = tools(base_url, int(argv[2]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    os.write(real_stdout, json.dumps(result).encode() + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
