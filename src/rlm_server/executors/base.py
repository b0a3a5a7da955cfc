"""The one interface the engine runs completions through, whichever executor is behind it.

`executors.local.pool.WorkerPool` runs each completion in a worker forked on this machine;
`executors.ray.executor.RayExecutor` runs it in a worker forked on a node of a Ray cluster. Both
take the same job (a `Job`: the worker's first frame, its input, the engine's callbacks and a
label for the log), relay the worker's events and model calls to the job's callbacks (the
broker answers every call, in the server), kill the worker when the caller is cancelled, and
answer the worker's final frame or raise WorkerCrashed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from rlm_server import Json
from rlm_server.config import Config

# Job is defined beside the types of its fields: pool.py cannot import this module back.
from rlm_server.executors.local.pool import ContextFile, Job, LongWorker, WorkerPool

LOCAL = "local"


class Executor(Protocol):
    @property
    def root(self) -> str:
        """The server's private directory: stored contexts and local workers' directories."""
        ...

    def start(self) -> None:
        """Begin starting up (a zygote, a connection), so it overlaps the first request."""

    def stop(self) -> None:
        """At exit: end every worker and remove every private directory."""

    async def run(self, job: Job) -> Json:
        """One job in a fresh worker; its final frame, or WorkerCrashed. Its model calls are
        answered by `job.on_call`, its host tool calls by `job.on_tool`, both in the server.
        Cancelling the caller kills the worker and everything it started. `job.label` names
        the request in logs."""
        ...

    async def long_worker(self, context: ContextFile | None) -> LongWorker:
        """A session's worker, serving one job after another."""
        ...

    async def forget(self, context_id: str) -> None:
        """A stored context was dropped or evicted: let go of every copy of it."""

    def status(self) -> Json | None:
        """What `status` reports as `executor` (None: nothing beyond the local machine)."""
        ...


def make_executor(config: Config, environ: Mapping[str, str]) -> Executor:
    """The executor that --executor names. Ray is imported only when it is asked for."""
    local = WorkerPool(
        config.worker_memory_mb,
        config.max_message_bytes,
        environ,
        config.protections,
        config.worker_disk_mb,
        max_calls_in_flight=config.max_calls_in_flight,
    )
    if config.executor == LOCAL:
        return local
    from rlm_server.executors.ray.executor import RayExecutor

    return RayExecutor(config, local)
