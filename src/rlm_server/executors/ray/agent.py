"""The node agent: one Ray actor per node, holding that node's zygote and its workers.

It runs the local executor's `WorkerPool` on its node: the zygote is a fresh process (started
with fork+exec from the agent's event loop thread, never a fork of the Ray worker itself), and
every worker is forked from it and confined exactly as on the server's own machine. A job comes
in as a streaming call (`run`): the agent yields the worker's frames one by one (its events, its
model calls and host tool calls, one `read` when it fetched a stored context, and the final frame
or a crash), and the server answers each call with `reply`. The agent holds no key and makes no
model call: it does not know where the model is. `cancel` kills a job's worker; a killed agent
(a lost node) takes its zygote with it, and the zygote its workers (PR_SET_PDEATHSIG).

An agent's directory is marked with its pid; an agent that starts removes the directories of
the agents on its node that died without removing theirs (a lost node that comes back, a killed
agent).

A stored context arrives as a reference into Ray's object store; the agent fetches it the first
time a job on this node needs it, writes it to a private file and lets its zygote read it once,
as the local executor does with the server's own file.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from rlm_server import Json
from rlm_server.errors import WorkerCrashed
from rlm_server.executors.local.pool import ContextFile, Job, JobInput, WorkerPool

log = logging.getLogger(__name__)

Frame = tuple[str, Any]  # ("event" | "call" | "tool" | "read" | "final" | "crash", body)
PROBE_TIMEOUT_S = 60.0
AGENT_FAILED = "the node agent could not run the job"
AGENT_MARK = "node-agent.pid"  # in an agent's directory: the pid of the agent that made it


def probe(level: str) -> Json:
    """The protections in force on this node (see probe.py)."""
    found = subprocess.run(
        [sys.executable, "-P", "-m", "rlm_server.executors.ray.probe", level],
        capture_output=True,
        check=True,
        timeout=PROBE_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    answer: Json = orjson.loads(found.stdout)
    return answer


def _claim(root: str) -> None:
    """Mark our directory as an agent's: a later agent on this node removes it if we die
    without removing it ourselves (a node lost, an agent killed)."""
    with open(os.path.join(root, AGENT_MARK), "w") as mark:
        mark.write(str(os.getpid()))


def _remove_abandoned() -> None:
    """Remove the directories of this node's agents that died without removing them."""
    for root in glob.glob(os.path.join(tempfile.gettempdir(), "rlm-server-*")):
        try:
            with open(os.path.join(root, AGENT_MARK)) as mark:
                owner = int(mark.read())
        except (OSError, ValueError):
            continue  # not an agent's (a local server's, say): not ours to touch
        if not _alive(owner):
            shutil.rmtree(root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Job:
    task: asyncio.Task[None] | None = None
    replies: dict[int, asyncio.Future[Json]] = field(default_factory=dict)


class NodeAgent:
    """Made a Ray actor by executor.py (`ray.remote(...)(NodeAgent)`), so this module imports
    without Ray."""

    def __init__(
        self,
        memory_mb: int,
        disk_mb: int,
        max_frame_bytes: int,
        max_calls_in_flight: int,
        sandbox_level: str,
    ) -> None:
        self._memory_mb, self._disk_mb = memory_mb, disk_mb
        self._max_frame_bytes, self._max_calls = max_frame_bytes, max_calls_in_flight
        self._level = sandbox_level
        self._pool: WorkerPool | None = None
        self._jobs: dict[int, _Job] = {}
        self._files: dict[str, ContextFile] = {}  # stored contexts this node has fetched
        self._fetching: dict[str, asyncio.Lock] = {}
        self._call_ids = itertools.count(1)

    async def start(self) -> Json:
        """Probe the sandbox and start the zygote (from the event loop's thread, which lives as
        long as the actor: the zygote dies with the thread that started it). Answers what
        `status` shows of this node; raises when `--sandbox strict` finds one missing."""
        found = await asyncio.to_thread(probe, self._level)
        if found["missing"] and self._level == "strict":
            raise RuntimeError(
                "--sandbox strict, but this node lacks: " + ", ".join(found["missing"])
            )
        self._pool = WorkerPool(
            self._memory_mb,
            self._max_frame_bytes,
            os.environ,
            tuple(found["protections"]),
            self._disk_mb,
            max_calls_in_flight=self._max_calls,
        )
        await asyncio.to_thread(_remove_abandoned)
        self._pool.start()
        _claim(self._pool.root)
        return {"protections": found["protections"]}

    async def run(
        self, job_id: int, job_frame: Json, source: Any, label: str
    ) -> AsyncIterator[Frame]:
        """One job in a fresh worker on this node: its frames, as they come. `job_frame` is
        the `Job.frame` the worker is sent first (not a `Frame` of this stream)."""
        frames: asyncio.Queue[Frame | None] = asyncio.Queue()
        entry = self._jobs[job_id] = _Job()

        def on_event(event: Json) -> None:
            frames.put_nowait(("event", event))

        async def ask(kind: str, body: Json, id_field: str) -> Json:
            """Send a call to the server as a frame; its reply comes back through `reply`."""
            call_id = next(self._call_ids)
            reply: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
            entry.replies[call_id] = reply
            frames.put_nowait((kind, {id_field: call_id, **body}))
            try:
                return await reply
            finally:
                entry.replies.pop(call_id, None)

        async def on_call(model: str, prompt: Any) -> Json:
            return await ask("call", {"model": model, "prompt": prompt}, "call")

        async def on_tool(name: str, arguments: Json) -> Json:
            return await ask("tool", {"name": name, "arguments": arguments}, "tool")

        async def work() -> None:
            try:
                context = await self._context(source, frames)
                pool = self._started()
                final = await pool.run(Job(job_frame, context, on_event, on_call, on_tool, label))
                frames.put_nowait(("final", final))
            except WorkerCrashed as crashed:
                frames.put_nowait(("crash", crashed.data.get("reason")))
            except Exception as error:  # fetching or writing a stored context, say
                log.warning("the job failed on this node: %s", type(error).__name__)
                frames.put_nowait(("crash", AGENT_FAILED))
            finally:
                frames.put_nowait(None)

        entry.task = asyncio.create_task(work())
        try:
            while (frame := await frames.get()) is not None:
                yield frame
        finally:
            entry.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.task
            del self._jobs[job_id]

    async def reply(self, job_id: int, call_id: int, reply: Json) -> None:
        """The server's answer to a model or tool call of a running job (async: it runs on the
        event loop, as the job does)."""
        entry = self._jobs.get(job_id)
        waiting = entry.replies.get(call_id) if entry is not None else None
        if waiting is not None and not waiting.done():
            waiting.set_result(reply)

    async def cancel(self, job_id: int) -> None:
        """Kill the job's worker (and everything it started); its stream then ends."""
        entry = self._jobs.get(job_id)
        if entry is not None and entry.task is not None:
            entry.task.cancel()

    async def forget(self, context_id: str) -> None:
        """A stored context was dropped: the zygote lets go of it and its file goes."""
        self._fetching.pop(context_id, None)
        held = self._files.pop(context_id, None)
        if held is not None and self._pool is not None:
            await self._pool.forget(context_id)
            with contextlib.suppress(OSError):
                os.unlink(held.path)

    async def stop(self) -> None:
        """At the server's exit: the zygote and its workers end, the directory goes."""
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def _started(self) -> WorkerPool:
        if self._pool is None:
            raise WorkerCrashed(reason="the node agent has not started")
        return self._pool

    async def _context(self, source: Any, frames: asyncio.Queue[Frame | None]) -> JobInput:
        """The job's input: a prompt as it came, or a stored context fetched once per node."""
        if not isinstance(source, dict):
            prompt: JobInput = source
            return prompt
        context_id: str = source["id"]
        lock = self._fetching.setdefault(context_id, asyncio.Lock())
        async with lock:
            if context_id not in self._files:
                data: bytes = await source["ref"][0]
                self._files[context_id] = await asyncio.to_thread(
                    self._write, context_id, source["kind"], data
                )
                frames.put_nowait(("read", context_id))
        return self._files[context_id]

    def _write(self, context_id: str, kind: Literal["text", "json"], data: bytes) -> ContextFile:
        path = os.path.join(self._started().root, f"context-{context_id}")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        return ContextFile(context_id, path, kind, len(data))
