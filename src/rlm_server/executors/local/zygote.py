"""The zygote: imports `rlm` once (never reading `.env`), then forks one worker per job.

Run by the server as `python -P -m rlm_server.executors.local.zygote CONTROL_FD MEMORY_MB PLAN`,
in a session of its own (a Ctrl-C meant for the server is the server's to handle). Its stdout is
already the server's stderr and its stdin is /dev/null; each worker's fds 1 and 2 are a pipe of
its own, which the server drains into its log. It stays single-threaded so that fork is
safe. It dies with the server (PR_SET_PDEATHSIG, and end of stream on the control socket), and every
worker dies with the zygote, so no worker outlives the server.

Each worker leads a session of its own (the server kills its whole process group), is confined
by the sandbox plan the server found in force (sandbox.py: namespaces, Landlock, seccomp,
limits), works in the directory the server made for it (its cwd and TMPDIR, so the REPL's files
land there), and exits only when the server closes its socket, so the server always kills a
living group.

Stored contexts: a fork message may name one (id, file, kind). The zygote itself holds none: for
each context it forks a *holder*, a zygote of that context alone, which reads the file once into a
`str` (or, for JSON, a list) and forks the workers that ask for it, each getting it as an argument
(`completion.Inherited`, never a global) and sharing its pages copy-on-write. So a worker's memory
holds its own context and no other: model code steered by one context cannot read another out of its
heap. The zygote relays such fork messages (and their descriptor) to the holder, which answers the
server on the control socket itself, so a context being read never delays other forks. Told to
forget a context, the zygote closes the holder's socket; the holder lets its running workers finish,
then exits. What a zygote or holder holds is frozen (`gc.freeze`) after its warm-up and after its
context is read: a worker's garbage collections then never write to those objects (a list context is
millions of them), so only what a worker itself touches is copied. A zygote that replaces a dead one
has no holders and starts each again when a fork asks for it.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import resource
import signal
import socket
import sys
from typing import NamedTuple

from rlm_server import libc
from rlm_server.worker import frames, library, sandbox

library.without_dotenv()  # before rlm is imported, below

import orjson  # noqa: E402

from rlm_server import Json  # noqa: E402
from rlm_server.worker import completion  # noqa: E402
from rlm_server.worker.completion import Inherited, serve_job, warm_up  # noqa: E402

log = logging.getLogger(__name__)

FORK_FDS = 2  # the worker's socket and the write end of its output pipe


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when our parent exits (Linux); check it has not already."""
    parent = os.getppid()
    libc.die_with_parent(signal.SIGKILL)
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


def _hold(context: Json) -> Inherited:
    """In a holder: read the context a fork message names; every worker it forks inherits it
    (or, when it cannot be read, a marker: the worker then fails its job, and says why)."""
    try:
        held = _read_context(str(context["path"]), str(context["kind"]))
        length = completion.context_length(held) if isinstance(held, list) else None
        gc.freeze()  # the workers' collections must not write to it (see the docstring)
        return Inherited(held, length)
    except (OSError, ValueError, KeyError, TypeError, MemoryError) as exc:
        log.warning("could not read a stored context: %s", type(exc).__name__)
        return Inherited(completion.ContextUnavailable(), None)


def _child(
    job_fd: int,
    output_fd: int,
    workdir: str,
    memory_mb: int,
    plan: sandbox.Plan,
    held: Inherited | None,
) -> None:
    _own_output(output_fd)
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # model code may wait for its own children
    die_with_parent()
    _limit_worker(memory_mb)
    status = 0
    sock = socket.socket(fileno=job_fd)
    try:
        sandbox.keep(plan, sock, lambda: serve_job(sock, held), workdir)
    except sandbox.SandboxError as error:
        print(f"rlm-server worker: sandbox: {error}", file=sys.stderr)
        status = 1
    except BaseException:
        status = 1
    finally:
        sys.stderr.flush()
        os._exit(status)


def _own_output(output_fd: int) -> None:
    """fds 1 and 2 become the pipe the server drains: the server's own stderr (ours until
    now) is never model code's to write, truncate or forge lines in."""
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)


def _serve_forks(
    control: socket.socket,
    inbox: socket.socket,
    memory_mb: int,
    plan: sandbox.Plan,
    held: Inherited,
) -> None:
    """Fork a worker on `held` for each fork message on `inbox` and answer the server on
    `control`, until `inbox` ends."""
    while True:
        datagram, fds, _, _ = socket.recv_fds(inbox, frames.DATAGRAM_BYTES, FORK_FDS)
        if not datagram:
            return
        fork = frames.unpack(datagram) or {}
        _fork_worker(control, fork, fds, Spawning(memory_mb, plan, held), [inbox])


class _Holders:
    """The zygote's holders, one per stored context, each a child with a socket of ours."""

    def __init__(self, control: socket.socket, memory_mb: int, plan: sandbox.Plan) -> None:
        self._control, self._memory_mb, self._plan = control, memory_mb, plan
        self._sockets: dict[str, socket.socket] = {}

    def relay(self, context: Json, datagram: bytes, fds: list[int]) -> None:
        """Hand a fork message to the context's holder, starting one if it has none (or its
        holder has died)."""
        context_id = str(context.get("id"))
        for _ in range(2):
            sock = self._sockets.get(context_id) or self._start(context_id, context, fds)
            try:
                socket.send_fds(sock, [datagram], fds)
                return
            except OSError:  # it died: start another
                self.forget(context_id)
        log.warning("no holder could be started for a stored context")

    def sockets(self) -> list[socket.socket]:
        return list(self._sockets.values())

    def forget(self, context_id: str) -> None:
        """End of input for its holder: it exits once its running workers have."""
        sock = self._sockets.pop(context_id, None)
        if sock is not None:
            sock.close()

    def _start(self, context_id: str, context: Json, fds: list[int]) -> socket.socket:
        """A holder keeps none of our sockets, and not the descriptors of the fork message
        that started it (they reach it again through its inbox): a copy kept in the holder
        would be inherited by every worker it forks, which could then read and write another
        request's socket, and that request would never see its worker's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.fork() == 0:
            ours.close()
            for other in self._sockets.values():
                other.close()
            for fd in fds:
                os.close(fd)
            self._run_holder(theirs, context)
        theirs.close()
        self._sockets[context_id] = ours
        return ours

    def _run_holder(self, inbox: socket.socket, context: Json) -> None:
        status = 0
        try:
            die_with_parent()
            held = _hold(context)
            _serve_forks(self._control, inbox, self._memory_mb, self._plan, held)
            del held  # its running workers keep their copy-on-write pages
            _wait_for_children()
        except BaseException:
            status = 1
        finally:
            os._exit(status)


def _wait_for_children() -> None:
    """Return once every child has exited (they are reaped by the kernel: SIGCHLD ignored)."""
    try:
        while True:
            os.wait()
    except ChildProcessError:
        return


def main(argv: list[str]) -> int:
    die_with_parent()
    control = socket.socket(fileno=int(argv[0]))
    memory_mb = int(argv[1])
    plan = sandbox.Plan.decode(argv[2])
    if plan.has(sandbox.NOT_DUMPABLE):
        sandbox.not_dumpable()
    warm_up()
    sandbox.prepare(plan)
    gc.freeze()  # the workers' collections must not write to what the zygote made
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    holders = _Holders(control, memory_mb, plan)
    spawning = Spawning(memory_mb, plan, None)
    try:
        control.send(frames.pack({"ready": True}))
        while True:
            datagram, fds, _, _ = socket.recv_fds(control, frames.DATAGRAM_BYTES, FORK_FDS)
            if not datagram:
                return 0
            message = frames.unpack(datagram) or {}
            if "forget" in message:
                holders.forget(str(message["forget"]))
                continue
            context = message.get("context")
            if isinstance(context, dict):
                holders.relay(context, datagram, fds)
                for fd in fds:
                    os.close(fd)
                continue
            _fork_worker(control, message, fds, spawning, holders.sockets())
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the server has gone


class Spawning(NamedTuple):
    """What every worker a zygote or holder forks starts with."""

    memory_mb: int
    plan: sandbox.Plan
    held: Inherited | None  # a holder's stored context


def _fork_worker(
    control: socket.socket,
    fork: Json,
    fds: list[int],
    spawning: Spawning,
    ours: list[socket.socket],
) -> None:
    """Fork the worker a fork message asks for (its socket and its output pipe attached) and
    tell the server its pid. The worker keeps none of our sockets (`control` and `ours`): with
    one to a holder, model code could have a worker on another context forked for it, talking
    to a socket of its own."""
    pid = os.fork()
    if pid == 0:
        for sock in (control, *ours):
            sock.close()
        workdir = str(fork.get("workdir"))
        _child(fds[0], fds[1], workdir, spawning.memory_mb, spawning.plan, spawning.held)
    for fd in fds:
        os.close(fd)
    control.send(frames.pack({"forked": fork.get("fork"), "pid": pid}))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
