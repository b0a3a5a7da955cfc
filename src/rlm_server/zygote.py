"""The zygote: imports `rlm` once (never reading `.env`), then forks one worker per job.

Run by the server as `python -P -m rlm_server.zygote CONTROL_FD MEMORY_MB PLAN`, in a session of its
own (a Ctrl-C meant for the server is the server's to handle). Its stdout is already the
server's stderr and its stdin is /dev/null. It stays single-threaded so that fork is safe.
It dies with the server (PR_SET_PDEATHSIG, and end of stream on the control socket), and every
worker dies with the zygote, so no worker outlives the server.

Each worker leads a session of its own (the server kills its whole process group), is confined
by the sandbox plan the server found in force (sandbox.py: namespaces, Landlock, seccomp,
limits), works in the directory the server made for it (its cwd and TMPDIR, so the REPL's files
land there), and exits only when the server closes its socket, so the server always kills a
living group.

Stored contexts: a fork message may name one (id, file, kind). The zygote reads the file once
into a `str` (or, for JSON, a list) and keeps it until told to forget it; every worker forked
after that gets it as `completion.inherited`, sharing its pages copy-on-write (a `str` is not
tracked by the garbage collector, so only its header's refcount is ever written). A zygote that
replaces a dead one holds nothing and reads each context again when a fork asks for it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import resource
import signal
import socket
import sys

from rlm_server import library, sandbox

library.without_dotenv()  # before rlm is imported, below

import orjson  # noqa: E402

from rlm_server import completion  # noqa: E402
from rlm_server.completion import serve_job, warm_up  # noqa: E402

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
FORGET_TOKEN = bytes(8)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when our parent exits (Linux); check it has not already."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _limit_worker(memory_mb: int) -> None:
    """A runaway worker is the one the kernel kills, never the server."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if memory_mb > 0:  # on top of what the child starts with: the zygote's stored contexts
        limit = memory_mb * 1024 * 1024 + _mapped_bytes()
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _mapped_bytes() -> int:
    """The address space this process maps now (VmSize), 0 where /proc does not say."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


_contexts: dict[str, object] = {}  # the stored contexts this zygote holds, by id


def _read_context(path: str, kind: str) -> object:
    """The file as a `str` (text) or a Python value (JSON), decoded straight from a mapping of
    it, so the bytes are never copied into our heap beside what they decode to."""
    with open(path, "rb") as f:
        if kind == "text" and os.fstat(f.fileno()).st_size == 0:
            return ""  # mmap refuses an empty file
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return str(view, "utf-8") if kind == "text" else orjson.loads(view)
            finally:
                view.release()


def _held_context(spec: bytes) -> object:
    """The context a fork message names, read now if this zygote does not hold it yet; what
    the worker gets when it cannot be read (the worker then fails its job, and says why)."""
    try:
        named = orjson.loads(spec)
        held = _contexts.get(named["id"])
        if held is None:
            held = _contexts[named["id"]] = _read_context(named["path"], named["kind"])
        return held
    except (OSError, ValueError, KeyError, TypeError, MemoryError) as exc:
        log.warning("could not read a stored context: %s", type(exc).__name__)
        return completion.ContextUnavailable()


def _forget(message: bytes) -> None:
    _contexts.pop(message[len(FORGET_TOKEN) :].decode(errors="replace"), None)


def _child(job_fd: int, workdir: str, memory_mb: int, plan: sandbox.Plan) -> None:
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # model code may wait for its own children
    die_with_parent()
    _limit_worker(memory_mb)
    status = 0
    sock = socket.socket(fileno=job_fd)
    try:
        sandbox.keep(plan, sock, lambda: serve_job(sock), workdir)
    except sandbox.SandboxError as error:
        print(f"rlm-server worker: sandbox: {error}", file=sys.stderr)
        status = 1
    except BaseException:
        status = 1
    finally:
        sys.stderr.flush()
        os._exit(status)


def main(argv: list[str]) -> int:
    die_with_parent()
    control = socket.socket(fileno=int(argv[0]))
    memory_mb = int(argv[1])
    plan = sandbox.Plan.decode(argv[2])
    if plan.has(sandbox.NOT_DUMPABLE):
        sandbox.not_dumpable()
    warm_up()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    try:
        control.send(b"ready")
        while True:
            message, fds, _, _ = socket.recv_fds(control, 4096, 1)
            if not message:
                return 0
            if message.startswith(FORGET_TOKEN):
                _forget(message)
                continue
            token, rest = message[:8], message[8:]
            directory, _, spec = rest.partition(b"\0")
            workdir = os.fsdecode(directory)
            completion.inherited = _held_context(spec) if spec else None
            pid = os.fork()
            if pid == 0:
                control.close()
                _contexts.clear()  # the worker keeps only its own context (`inherited`)
                _child(fds[0], workdir, memory_mb, plan)
            completion.inherited = None
            for fd in fds:
                os.close(fd)
            control.send(token + pid.to_bytes(8, "big"))
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the server has gone


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
