"""Command line: `rlm-server [flags]` and `python -m rlm_server [flags]`.

Configuration is read and checked before anything else happens: a bad value is one line on
stderr and exit code 2. Then the protocol descriptors are claimed and the server runs until it is
told to stop; it exits 0. `rlm-server view FILE.jsonl` writes a trajectory's HTML report instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import anyio

from rlm_server.config import ConfigError, load_config


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["view"]:  # `rlm-server view FILE.jsonl`: a report, not a server
        from rlm_server.viewer import main as view

        return view(args[1:])
    try:
        config = load_config(args, os.environ)
    except ConfigError as error:
        print(f"rlm-server: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if config.verbose else logging.WARNING,
        format="rlm-server[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    from rlm_server.keys import hide_from_proc_environ
    from rlm_server.server import Server  # after the config check: a bad flag costs no imports
    from rlm_server.transport import claim_stdio

    environ = dict(os.environ)  # our keys, read once: the block the kernel shows is blanked
    hide_from_proc_environ()
    claim = claim_stdio()
    try:
        code = anyio.run(Server(config, claim, environ).run, backend="asyncio")
    finally:
        claim.release()
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown. Every answer is written and every child is
    gone by now; what is left, garbage-collecting every module we imported, costs ~40 ms
    between the last answer and the exit a client waits for, and buys nothing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
