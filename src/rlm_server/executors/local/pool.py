"""Workers, server side: every running completion gets a fresh process, forked from a zygote.

The `rlm` library's local REPL execs model code in-process, swaps the process-wide stdout and
calls `os.chdir` around every cell, and an infinite loop in model code cannot be stopped in a
thread. So each completion runs in its own process that we can kill. Starting Python and
importing `rlm` costs hundreds of milliseconds, so a zygote (`executors.local.zygote`) imports
it once and builds the default model clients; forking from it takes a few milliseconds, and
nothing one request's model code did can be seen by the next.

Everything crosses the boundary in one framing (worker/frames.py, which lists the messages).
The zygote is told to fork over a SOCK_SEQPACKET control socket: a fork message with a token
and the worker's directory, carrying the child's end of a fresh socketpair and the write end of
a pipe that becomes the worker's fds 1 and 2 (SCM_RIGHTS); it answers with the token and the
child's pid. We drain that pipe into our log while the worker runs a job (WorkerOutput). The
message may also name a stored context (its id, file and kind): the zygote hands it to that
context's holder (zygote.py), which read the file once into a `str` (or list), forks the worker
and answers; the worker inherits the context copy-on-write as its `context`, and the server
never sends it. A forget message tells the zygote to let go of a context (its holder exits
after its workers). The handshake is shielded from cancellation, so a fork once asked for is
always answered and its worker always ended; the token matches each answer to its request. The
server then talks to the worker over its socketpair: the pid to kill, then one job frame in;
event frames, model-call frames (each answered by a reply frame, made by the broker), host tool
call frames (each answered by a reply frame, made by the engine's ToolGate: engine/tools.py)
and one final frame out. End of stream without a final frame means the worker died. Every
frame is checked: the worker runs model code, and nothing it sends is trusted. A job has at most
`max_calls_in_flight` model calls in the broker at once: past that the server reads no more of
its frames until one is answered, so a flood of calls waits in the worker's own socket, holds
none of the server's memory, and leaves the providers' connections to the other requests.

The zygote, and so every worker, starts from an environment with nothing but what Python needs:
no provider key and no `ELIZA_RLM_*` setting reaches model code.

Each worker leads its own session, so killing its process group ends whatever model code
started, and works in a private directory (its cwd and TMPDIR) that the server removes when the
worker ends, however it ends, and whatever modes model code left in it (with a disk limit, the
worker sees its own tmpfs instead, and the directory here stays empty).

A session's worker (`LongWorker`) is forked the same way and serves one job after another over
the same socket, so its REPL keeps its variables from one turn to the next.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, NamedTuple

import anyio
import orjson
from anyio.streams.buffered import BufferedByteReceiveStream

from rlm_server import Json
from rlm_server.errors import RpcError, WorkerCrashed, first_of
from rlm_server.fdio import FdReceiveStream, write_all
from rlm_server.worker import frames, sandbox

log = logging.getLogger(__name__)


def _make_dir(prefix: str, parent: str) -> str:
    import tempfile  # imported by WorkerPool.start: not before `ready`

    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def _remove_tree(path: str) -> None:
    """Remove a worker's directory whatever modes model code left in it: when removing
    fails (a directory of mode 0 cannot be listed), make every directory ours again and
    remove it again; say so if even that fails."""
    import shutil  # imported by WorkerPool.start (through tempfile): not before `ready`

    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        _unlock(path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not remove %s: %s", path, error.strerror or type(error).__name__)


def _unlock(path: str) -> None:
    """Every directory under `path` readable, writable and searchable by us, top down (a
    directory is opened after its parent has been fixed); symbolic links are not followed."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for _, directories, _, parent in os.fwalk(path):
        for name in directories:
            with contextlib.suppress(OSError, NotImplementedError):
                os.chmod(name, 0o700, dir_fd=parent, follow_symlinks=False)


TEXT_CHUNK = 1 << 20
HANDSHAKE_TIMEOUT_S = 10.0  # a zygote that does not answer a fork in this time is replaced
LOAD_BYTES_PER_S = 50 << 20  # the slowest the zygote may read a context before a fork
OUTPUT_BYTES = 64 << 10  # what one job's fds 1 and 2 may put in the server's log
OUTPUT_LINE_BYTES = 4096  # a longer line is logged in pieces
OUTPUT_CHUNK = 1 << 16
EventHandler = Callable[[Json], None]
CallHandler = Callable[[str, Any], Awaitable[Json]]  # (model, prompt) -> reply
ToolHandler = Callable[[str, Json], Awaitable[Json]]  # (tool name, arguments) -> reply
WORKER_ENVIRONMENT = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUTF8",
        "PYTHONIOENCODING",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
    }
)


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What of our environment the zygote and its workers may see: an allowlist, so that no
    key (whatever its variable is called) reaches model code."""
    return {
        name: value
        for name, value in environ.items()
        if name in WORKER_ENVIRONMENT or name.startswith("LC_")
    }


class ContextFile(NamedTuple):
    """A stored context as the zygote finds it: a private file of UTF-8 text or of JSON."""

    id: str
    path: str
    kind: Literal["text", "json"]
    size: int  # bytes

    def named(self) -> Json:
        """How a fork message names it."""
        return {"id": self.id, "path": self.path, "kind": self.kind}


# A job's long input: a prompt, a stored context's file, or None (a session turn without one).
JobInput = str | list[Any] | ContextFile | None


class Job(NamedTuple):
    """One job as every executor takes it, and passes it on unchanged to another."""

    # The JSON object the worker is sent first (query, rlm, progress, ...: worker/frames.py).
    # Called `frame`, as on the worker's socket: `job` names this record, and `spec` the
    # engine's RunSpec the frame is made from.
    frame: Json
    context: JobInput  # the job's long input, sent (or inherited) after the frame
    on_event: EventHandler  # the worker's checked progress events
    on_call: CallHandler  # answers its model calls (the broker, in the server)
    on_tool: ToolHandler  # answers its host tool calls (the engine's ToolGate)
    label: str  # names the request in our log, over the worker's own output


class Worker:
    """One worker: its keeper (the zygote's child, leader of its own session), the process
    that runs the job (the keeper itself, or its child in a PID namespace of its own; see
    sandbox.py), and our end of its socket."""

    def __init__(self, pid: int, sock: socket.socket, output: int, max_frame_bytes: int) -> None:
        self.pid = pid
        self.job_pid = 0  # told by the keeper before the job is sent
        self.output = WorkerOutput(output)
        self._sock = sock
        self._fd = sock.fileno()
        self._max_frame_bytes = max_frame_bytes
        self._writing = anyio.Lock()  # replies to concurrent calls must not interleave
        self._stream = BufferedByteReceiveStream(FdReceiveStream(self._fd))  # across jobs
        sock.setblocking(False)

    async def send_job(self, frame: Json, context: JobInput) -> None:
        """The job's JSON frame, then the context in a frame of its own.

        A text context goes as raw UTF-8, streamed in chunks, so a 200 MB context is never
        copied into one JSON document on its way to the worker. A stored context is not sent at
        all: the worker inherited it from the zygote.
        """
        try:
            async with self._writing:
                if context is None or isinstance(context, ContextFile):
                    kind = "none" if context is None else "inherited"
                    await self._write_frame(orjson.dumps({**frame, "context_type": kind}))
                elif isinstance(context, str):
                    await self._write_frame(orjson.dumps({**frame, "context_type": "text"}))
                    await self._write_text(context)
                else:
                    await self._write_frame(orjson.dumps({**frame, "context_type": "json"}))
                    await self._write_frame(orjson.dumps(context))
        except OSError:  # the worker died while we wrote; its frames() will end
            pass

    async def send_frame(self, frame: Json) -> None:
        try:
            async with self._writing:
                await self._write_frame(orjson.dumps(frame))
        except OSError:  # the worker died; its frames() will end
            pass

    async def _write_frame(self, payload: bytes) -> None:
        await write_all(self._fd, frames.header(len(payload)) + payload)

    async def _write_text(self, text: str) -> None:
        if not text.isascii():  # isascii is O(1) on str; only then are characters bytes
            await self._write_frame(text.encode())
            return
        await write_all(self._fd, frames.header(len(text)))
        for start in range(0, len(text), TEXT_CHUNK):
            await write_all(self._fd, text[start : start + TEXT_CHUNK].encode("ascii"))

    async def frames(self) -> AsyncIterator[Json]:
        """The worker's frames until it ends its stream."""
        while (frame := await self._receive_frame()) is not None:
            yield frame

    async def _receive_frame(self) -> Json | None:
        """The next frame, or None at the end of the stream. A frame longer than the limit or
        not a JSON object means the worker cannot be trusted any more: WorkerCrashed."""
        try:
            head = await self._stream.receive_exactly(frames.HEADER_BYTES)
            length = frames.length_of(head)
            if length > self._max_frame_bytes:
                raise WorkerCrashed(reason="the worker sent a frame over the size limit")
            frame = frames.loads(await self._stream.receive_exactly(length))
        except (anyio.IncompleteRead, OSError):
            return None
        if frame is None:
            raise WorkerCrashed(reason="the worker sent a malformed frame")
        return frame

    async def receive_job_pid(self) -> None:
        """The keeper's first words: the pid of the process that will run the job."""
        told = await self._receive_frame()
        if told is None or not _is_count(told.get("pid")):
            raise WorkerCrashed(reason="the worker failed to start")
        self.job_pid = int(told["pid"])

    def kill(self) -> None:
        """End the worker and everything it started: the job's process first (in a PID
        namespace of its own, everything in it dies with it), then the keeper's group."""
        if self.job_pid and self.job_pid != self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.job_pid, signal.SIGKILL)
        _kill_group(self.pid)
        self._sock.close()
        self.output.close()


class WorkerOutput:
    """The read end of a worker's fds 1 and 2. What arrives there while it runs a job goes
    to the server's log (info), line by line, each prefixed with the request it ran for and
    escaped, so no line can pass for the server's own; at most OUTPUT_BYTES per job, then
    how much more there was."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._label, self._left, self._dropped, self._pending = "", 0, 0, b""

    async def drain(self, label: str) -> None:
        """Log what arrives until cancelled (the job is over) or end of stream, then what is
        left in the pipe."""
        self._label, self._left, self._dropped, self._pending = label, OUTPUT_BYTES, 0, b""
        try:
            while self._read():
                await anyio.wait_readable(self._fd)
        finally:
            self._finish()

    def log_now(self, label: str) -> None:
        """Log what the pipe holds now: a worker that failed to start says why there."""
        self._label, self._left, self._dropped, self._pending = label, OUTPUT_BYTES, 0, b""
        self._finish()

    def _finish(self) -> None:
        self._read()
        self._line(self._pending)
        self._pending = b""
        if self._dropped:
            log.info("%s: %d more bytes of output not logged", self._label, self._dropped)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _read(self) -> bool:
        """Take what the pipe holds now; False at its end."""
        while True:
            try:
                chunk = os.read(self._fd, OUTPUT_CHUNK)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        kept = chunk[: self._left]
        self._dropped += len(chunk) - len(kept)
        self._left -= len(kept)
        *lines, self._pending = (self._pending + kept).split(b"\n")
        for line in lines:
            self._line(line)
        if len(self._pending) >= OUTPUT_LINE_BYTES:
            self._line(self._pending)
            self._pending = b""

    def _line(self, line: bytes) -> None:
        if line:
            text = line.decode("utf-8", "replace").encode("unicode_escape").decode("ascii")
            log.info("%s: %s", self._label, text)


class _Zygote:
    """The zygote process and our end of its control socket."""

    def __init__(self, memory_mb: int, env: Mapping[str, str], plan: sandbox.Plan) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control = ours
        argv = [str(theirs.fileno()), str(memory_mb), plan.encode()]
        self.process = subprocess.Popen(
            # -P: the working directory is not on sys.path (nor readable by model code)
            [sys.executable, "-P", "-m", "rlm_server.executors.local.zygote", *argv],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C to our process group is ours to handle, not its
            env=dict(env),
        )
        theirs.close()
        ours.setblocking(False)
        self.ready = False

    async def send(self, message: Json, fds: list[int]) -> None:
        datagram = frames.pack(message)
        while True:
            try:
                socket.send_fds(self.control, [datagram], fds)
                return
            except BlockingIOError:
                await anyio.wait_writable(self.control)

    async def receive(self) -> Json | None:
        """The zygote's next message; None once it has gone."""
        while True:
            try:
                datagram = self.control.recv(frames.DATAGRAM_BYTES)
            except BlockingIOError:
                await anyio.wait_readable(self.control)
                continue
            except OSError:
                return None
            return frames.unpack(datagram) if datagram else None

    def stop(self) -> None:
        """Kill it: it holds nothing worth a clean exit, and a clean one waits out its import
        of `rlm` (when stopped early) and its interpreter's teardown (~150 ms). Its workers
        die with it (PR_SET_PDEATHSIG)."""
        self.control.close()
        self.process.kill()
        self.process.wait()


class WorkerPool:
    """Forks workers from a zygote that is started at once and replaced if it dies."""

    def __init__(
        self,
        memory_mb: int,
        max_frame_bytes: int,
        environ: Mapping[str, str],
        protections: Sequence[str] = sandbox.ALWAYS,
        disk_mb: int = 0,
        *,
        max_calls_in_flight: int,
    ) -> None:
        self._env = worker_environment(environ)
        self._max_calls = max_calls_in_flight
        self._plan = sandbox.Plan(protections, disk_mb)
        self._memory_mb = memory_mb
        self._max_frame_bytes = max_frame_bytes
        self._zygote: _Zygote | None = None
        self._lock = anyio.Lock()
        self._tokens = itertools.count(1)
        self._root: str | None = None  # the parent of every worker's directory

    def start(self) -> None:
        """Start the zygote now, so its import of `rlm` overlaps with the first request (once:
        a second call does nothing)."""
        if self._zygote is not None:
            return
        import tempfile  # here, after `ready`: it imports random, shutil, bz2 and lzma

        self._root = tempfile.mkdtemp(prefix="rlm-server-")
        self._zygote = _Zygote(self._memory_mb, self._env, self._plan)

    @property
    def root(self) -> str:
        """The server's private directory: every worker's directory, and the stored contexts."""
        if self._root is None:
            raise RuntimeError("the worker pool has not started")
        return self._root

    def status(self) -> Json | None:
        """Nothing beyond what `status` says of this machine already."""
        return None

    def stop(self) -> None:
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None
        if self._root is not None:
            _remove_tree(self._root)
            self._root = None

    async def _ready_zygote(self) -> _Zygote:
        zygote = self._zygote
        if zygote is None or zygote.process.poll() is not None:
            if zygote is not None:
                log.warning("zygote exited with %s; starting a new one", zygote.process.returncode)
                zygote.stop()
            zygote = self._zygote = _Zygote(self._memory_mb, self._env, self._plan)
        if not zygote.ready:
            if await zygote.receive() != {"ready": True}:
                raise WorkerCrashed(reason="the worker zygote failed to start")
            zygote.ready = True
        return zygote

    async def forget(self, context_id: str) -> None:
        """Tell the zygote to let go of a stored context (workers that have it keep it). A
        zygote that is not ready yet holds none: a new one reads each again when asked."""
        async with self._lock:
            zygote = self._zygote
            if zygote is not None and zygote.ready and zygote.process.poll() is None:
                with anyio.CancelScope(shield=True):
                    await zygote.send({"forget": context_id}, [])

    async def _fork(self, workdir: str, context: ContextFile | None) -> Worker:
        async with self._lock:
            zygote = await self._ready_zygote()
            ours, theirs = socket.socketpair()
            output, output_end = os.pipe()
            try:
                with anyio.CancelScope(shield=True):
                    pid = await self._handshake(
                        zygote, workdir, context, [theirs.fileno(), output_end]
                    )
            except BaseException:
                ours.close()
                os.close(output)
                raise
            finally:
                theirs.close()
                os.close(output_end)
            return Worker(pid, ours, output, self._max_frame_bytes)

    async def _handshake(
        self,
        zygote: _Zygote,
        workdir: str,
        context: ContextFile | None,
        theirs: list[int],
    ) -> int:
        """Ask for one fork and return its pid; answers to any earlier request are ended. A
        fork that names a context the zygote does not hold yet waits while it reads it."""
        token = next(self._tokens)
        message: Json = {"fork": token, "workdir": workdir}
        timeout = HANDSHAKE_TIMEOUT_S
        if context is not None:
            message["context"] = context.named()
            timeout += context.size / LOAD_BYTES_PER_S
        await zygote.send(message, theirs)
        with anyio.move_on_after(timeout):
            while (reply := await zygote.receive()) is not None and _is_count(reply.get("pid")):
                if reply.get("forked") == token:
                    return int(reply["pid"])
                _kill_group(reply["pid"])  # an answer nobody waits for: its worker must not run
        log.warning("the worker zygote did not fork; replacing it")
        zygote.process.kill()
        raise WorkerCrashed(reason="the worker zygote did not fork")

    @asynccontextmanager
    async def _forked(self, context: ContextFile | None = None) -> AsyncIterator[Worker]:
        """A fresh worker, killed on exit along with everything it started; its directory is
        removed afterwards, whatever happened."""
        workdir = _make_dir("worker-", self.root)
        worker: Worker | None = None
        try:
            worker = await self._fork(workdir, context)
            await _started(worker)
            yield worker
        finally:
            if worker is not None:
                worker.kill()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove_tree, workdir)

    async def run(self, job: Job) -> Json:
        """Run one job in a fresh worker; return its final frame. The worker never outlives it;
        its model calls are answered by `job.on_call` and its host tool calls by `job.on_tool`,
        concurrently. A stored context is named in the fork, so the worker inherits it.
        `job.label` names the request in our log."""
        inherited = job.context if isinstance(job.context, ContextFile) else None
        crash: RpcError | None = None
        async with self._forked(inherited) as worker:
            try:
                final = await _converse(worker, job, self._max_calls)
            except* WorkerCrashed as crashed:  # raised inside the calls' task group
                crash = first_of(crashed, WorkerCrashed)
        if crash is not None:
            raise crash
        return _final(final)

    async def long_worker(self, context: ContextFile | None) -> LongWorker:
        """A worker that serves job after job until it is closed (a session's)."""
        workdir = _make_dir("worker-", self.root)
        worker: Worker | None = None
        try:
            worker = await self._fork(workdir, context)
            await _started(worker)
        except BaseException:
            if worker is not None:
                worker.kill()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove_tree, workdir)
            raise
        return LongWorker(worker, workdir, self._max_calls)


class LongWorker:
    """A session's worker: one process that keeps its REPL from one job to the next.

    Jobs go to it one at a time (the session sees to that). `close` kills it and everything it
    started, and removes its directory.
    """

    def __init__(self, worker: Worker, workdir: str, max_calls_in_flight: int) -> None:
        self._worker, self._workdir = worker, workdir
        self._max_calls = max_calls_in_flight

    async def run(self, job: Job) -> Json:
        """One job (a turn) on this worker; its final frame, or WorkerCrashed."""
        crash: RpcError | None = None
        try:
            turn = job._replace(frame={**job.frame, "session": True})
            final = await _converse(self._worker, turn, self._max_calls)
        except* WorkerCrashed as crashed:  # raised inside the calls' task group
            crash = first_of(crashed, WorkerCrashed)
        if crash is not None:
            raise crash
        return _final(final)

    async def close(self) -> None:
        self._worker.kill()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_remove_tree, self._workdir)

    def kill(self) -> None:
        """At exit: end it and everything it started (the pool removes every directory)."""
        self._worker.kill()


async def _started(worker: Worker) -> None:
    """The keeper's first words (the pid to kill), within the handshake's time."""
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
            await worker.receive_job_pid()
    except TimeoutError:
        worker.output.log_now("a worker that did not start")
        raise WorkerCrashed(reason="the worker did not start") from None
    except WorkerCrashed:
        worker.output.log_now("a worker that failed to start")
        raise


def _final(final: Json | None) -> Json:
    """A job's checked final frame, or WorkerCrashed (it died, or it had no context)."""
    if final is None:
        raise WorkerCrashed()
    final = checked_final(final)
    if final.get("failure", {}).get("kind") == frames.CONTEXT_UNAVAILABLE:
        raise WorkerCrashed(reason="the worker zygote could not read the stored context")
    return final


async def _converse(worker: Worker, job: Job, max_calls: int) -> Json | None:
    """Send the job, then serve the worker's frames until its final one (None: it died),
    while its output goes to our log under `job.label`. At most `max_calls` model calls are
    answered at once, host tool calls among them; the next frame waits for one of them."""
    in_flight = anyio.Semaphore(max_calls)
    async with anyio.create_task_group() as calls:
        calls.start_soon(worker.output.drain, job.label)
        await worker.send_job(job.frame, job.context)
        async for frame in worker.frames():
            if "call" in frame:
                call = checked_call(frame)
                await in_flight.acquire()
                calls.start_soon(_answer, worker, call, job.on_call, in_flight)
            elif "tool" in frame:
                tool = checked_tool(frame)
                await in_flight.acquire()
                calls.start_soon(_answer_tool, worker, tool, job.on_tool, in_flight)
            elif "event" in frame:
                event = checked_event(frame)
                if event is not None:
                    job.on_event(event)
            else:
                calls.cancel_scope.cancel()
                return frame
        calls.cancel_scope.cancel()
    return None


async def _answer(
    worker: Worker, call: Json, on_call: CallHandler, in_flight: anyio.Semaphore
) -> None:
    try:
        reply = await on_call(call["model"], call["prompt"])
        await worker.send_frame({"reply": call["call"], **reply})
    finally:
        in_flight.release()


async def _answer_tool(
    worker: Worker, call: Json, on_tool: ToolHandler, in_flight: anyio.Semaphore
) -> None:
    try:
        reply = await on_tool(call["name"], call["arguments"])
        await worker.send_frame({"reply": call["tool"], **reply})
    finally:
        in_flight.release()


# -- what a worker may say ------------------------------------------------------------------
#
# Model code runs in the worker and can write to its socket, so a frame is only as good as its
# shape: an event carries only known fields (it can never name a request: the server adds the
# id), and a final frame that does not have the shape the engine expects ends the request as a
# crash, never as an exception in the server.

WORKER_EVENTS = frozenset({"iteration", "subcall"})
MESSAGE_CHARS = 1000


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked_event(frame: Json) -> Json | None:
    """The event with only the fields a progress notification may carry, or None."""
    if frame.get("event") not in WORKER_EVENTS:
        return None
    event: Json = {"event": frame["event"]}
    for name in ("iteration", "max_iterations"):
        if _is_count(frame.get(name)):
            event[name] = frame[name]
    if isinstance(frame.get("message"), str):
        event["message"] = frame["message"][:MESSAGE_CHARS]
    return event


def _is_result(result: Any) -> bool:
    trajectory = result.get("trajectory", []) if isinstance(result, dict) else None
    return (
        isinstance(result, dict)
        and isinstance(result.get("text"), str)
        and _is_count(result.get("iterations"))
        and isinstance(trajectory, list)
        and all(isinstance(step, dict) for step in trajectory)
    )


def _is_failure(failure: Any) -> bool:
    return isinstance(failure, dict) and isinstance(failure.get("kind"), str)


MODEL_NAME_CHARS = 200


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    )


def checked_call(frame: Json) -> Json:
    """A model call of the shape the broker takes (it names a model, never an endpoint), or
    WorkerCrashed."""
    model = frame.get("model")
    if (
        _is_count(frame.get("call"))
        and isinstance(model, str)
        and 0 < len(model) <= MODEL_NAME_CHARS
        and _is_prompt(frame.get("prompt"))
    ):
        return frame
    raise WorkerCrashed(reason="the worker sent a malformed model call")


def checked_tool(frame: Json) -> Json:
    """A host tool call of the shape the engine checks further (a name and an object of
    arguments), or WorkerCrashed."""
    name = frame.get("name")
    if (
        _is_count(frame.get("tool"))
        and isinstance(name, str)
        and 0 < len(name) <= MODEL_NAME_CHARS
        and isinstance(frame.get("arguments"), dict)
    ):
        return frame
    raise WorkerCrashed(reason="the worker sent a malformed tool call")


def checked_final(frame: Json) -> Json:
    """A final frame of the shape the engine reads, or WorkerCrashed."""
    if _is_result(frame.get("result")) or _is_failure(frame.get("failure")):
        return frame
    raise WorkerCrashed(reason="the worker sent a malformed final frame")


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)
