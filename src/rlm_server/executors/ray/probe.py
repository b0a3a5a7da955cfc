"""`python -m rlm_server.executors.ray.probe LEVEL`: the sandbox protections in force on this
node, as one JSON line {"protections": [...], "missing": [...]}.

A node agent runs this as a process of its own: the probe forks, and a Ray worker process has
threads, so it must never fork.
"""

from __future__ import annotations

import sys

import orjson

from rlm_server.worker.sandbox import Probe


def main() -> None:
    protections, missing = Probe(sys.argv[1]).result()
    sys.stdout.write(orjson.dumps({"protections": protections, "missing": missing}).decode())


if __name__ == "__main__":
    main()
