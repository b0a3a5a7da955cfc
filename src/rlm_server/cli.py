"""Command line: `rlm-server [flags]` and `python -m rlm_server [flags]`.

Configuration is read and checked before anything else happens: a bad value is one line on
stderr and exit code 2. Then the protocol descriptors are claimed and the server runs until it is
told to stop; it exits 0. `rlm-server view FILE.jsonl` writes a trajectory's HTML report instead,
`rlm-server eval` runs the quality harness (tools/eval), and `rlm-server mcp [flags]` serves the
Model Context Protocol (frontends/mcp).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

import anyio

from rlm_server.config import Config, ConfigError, load_config
from rlm_server.worker.sandbox import NOT_DUMPABLE, Probe, not_dumpable

log = logging.getLogger("rlm_server")


def configured(
    argv: Sequence[str], environ: Mapping[str, str], who: str
) -> tuple[Config, Probe] | None:
    """The configuration, with logging to stderr started, and the sandbox probe started (read
    it with `sandboxed` once the server's modules are imported); None (after one line on
    stderr) when a setting is bad. Then the keys are blanked from the environment block that
    /proc/PID/environ shows (keys.py): `environ` is the copy the server keeps."""
    try:
        config = load_config(argv, environ)
    except ConfigError as error:
        print(f"{who}: configuration error: {error}", file=sys.stderr)
        return None
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if config.verbose else logging.WARNING,
        format="rlm-server[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    from rlm_server.engine.keys import hide_from_proc_environ

    hide_from_proc_environ()
    return config, Probe(config.sandbox)


def sandboxed(config: Config, probe: Probe, who: str) -> Config | None:
    """The configuration with the protections in force; None (after one line on stderr) when
    `--sandbox strict` finds one missing. The server itself is made undumpable, so no worker
    of our uid could read its keys out of its memory."""
    protections, missing = probe.result()
    if missing and config.sandbox == "strict":
        print(
            f"{who}: configuration error: --sandbox strict, but this machine lacks: "
            + ", ".join(missing),
            file=sys.stderr,
        )
        return None
    if missing:
        log.warning("sandbox: this machine lacks %s (--sandbox auto)", ", ".join(missing))
    if NOT_DUMPABLE in protections:
        not_dumpable()
    return config._replace(protections=tuple(protections))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["view"]:  # `rlm-server view FILE.jsonl`: a report, not a server
        from rlm_server.tools.viewer import main as view

        return view(args[1:])
    if args[:1] == ["eval"]:  # `rlm-server eval`: the quality harness, not a server
        from rlm_server.tools.eval.cli import main as evaluate

        return evaluate(args[1:])
    if args[:1] == ["mcp"]:  # `rlm-server mcp`: the same engine behind MCP
        from rlm_server.frontends.mcp.server import main as mcp

        exit_now(mcp(args[1:]))
    gc.disable()  # start-up makes ~300,000 objects that all stay: see `_started`
    environ = dict(os.environ)  # our keys, read once
    started = configured(args, environ, "rlm-server")
    if started is None:
        return 2
    from rlm_server.frontends.jsonrpc.server import (
        Server,  # after the config check: a bad flag costs no imports
    )
    from rlm_server.frontends.transport import claim_stdio

    config = sandboxed(*started, "rlm-server")
    if config is None:
        return 2

    claim = claim_stdio(nonblocking_read=False)  # the server's InputThread blocks in read
    try:
        server = Server(config, claim, environ)
        server.start_reading()
        _started()
        code = anyio.run(server.run, backend="asyncio")
    finally:
        claim.release()
    exit_now(code)


def _started() -> None:
    """Collection resumes once start-up has made what it keeps (modules, classes, tables):
    collecting during it would only walk those objects again and again (about a tenth of the
    time to `ready`), and frozen they are never walked again."""
    gc.freeze()
    gc.enable()


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown. Every answer is written and every child is
    gone by now; what is left, garbage-collecting every module we imported, costs ~40 ms
    between the last answer and the exit a client waits for, and buys nothing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
