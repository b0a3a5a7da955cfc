"""The Ray executor, server side: completions run on the nodes of a Ray cluster.

The server stays the one front end, the one broker and the one holder of keys. It connects to a
running cluster as a driver (`ray.init(address=...)`: it never starts one, so no Ray process is
ever a child of ours, with our environment), places one node agent (agent.py) on every alive
node with CPUs, and sends each job to the least-loaded agent with a free slot (a node that
already holds the job's stored context first). Every model call a worker makes comes back here
as a frame of the job's stream and is answered by the broker here: no key, no `ELIZA_RLM_*`
setting and no provider URL is ever in a job's arguments, an actor's arguments, a runtime
environment or the object store. Those carry the job (query and model names), the prompt or a
reference to a stored context, and the broker's replies.

A stored context goes into the object store once (`ray.put` of its file) and each node fetches it
once, the first time a job there needs it; a question on a stored context sends only the
reference. Cancelling a job, or its deadline, asks its agent to kill the worker. A node lost
mid-job ends that job with WorkerCrashed (a completion is not idempotent: it is never run again
elsewhere); the node is dropped and the next jobs run on the others, and a node that comes back
gets an agent again at the next look at the cluster. Sessions keep their REPL in a worker on the
server's own machine (the local pool), as does every job when the cluster cannot be reached and
`--executor ray,local` allows it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import anyio

from rlm_server import Json

# Ray starts a whole local cluster, from our environment and so with our keys, when any of its
# calls is made before `ray.init` connected; the server only ever connects to a running one.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"  # read once, as Ray is imported (next line)
import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlm_server.config import Config
from rlm_server.errors import RpcError, WorkerCrashed, first_of
from rlm_server.executors.local.pool import (
    ContextFile,
    Job,
    JobInput,
    LongWorker,
    WorkerPool,
    checked_call,
    checked_event,
    checked_final,
    checked_tool,
)
from rlm_server.executors.ray.agent import NodeAgent
from rlm_server.worker import sandbox

log = logging.getLogger(__name__)

LOOK_EVERY_S = 1.0  # how often, at most, the cluster's node list is read again
AGENT_START_TIMEOUT_S = 120.0  # a node whose agent has not started by then is left out
CANCEL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
REASON_CHARS = 200
LOST = "the Ray node running the request was lost"
NO_NODE = "no Ray node is available"
UNREACHABLE = "the Ray cluster cannot be reached"

RemoteAgent = ray.remote(max_restarts=0)(NodeAgent)  # an async actor: 1000 calls at once


@dataclass(eq=False)
class _Node:
    """A node of the cluster with our agent on it."""

    node_id: str
    address: str
    slots: int
    agent: Any  # the actor handle
    protections: list[str] = field(default_factory=list)
    running: int = 0
    contexts: set[str] = field(default_factory=set)  # stored contexts the node has fetched
    contexts_read: int = 0  # how many times it fetched one from the object store

    def report(self) -> Json:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "slots": self.slots,
            "in_flight": self.running,
            "protections": self.protections,
            "contexts_read": self.contexts_read,
        }


class RayExecutor:
    """Runs jobs on a Ray cluster's nodes; sessions on the local pool it is given."""

    def __init__(self, config: Config, local: WorkerPool) -> None:
        self._config = config
        self._local = local
        self._address = config.ray_address
        self._fallback = config.executor.endswith(",local")
        self._connected: bool | None = None  # None: not tried yet; False: fell back to local
        self._connecting = anyio.Lock()
        self._attempt: Future[None] | None = None
        self._nodes: dict[str, _Node] = {}
        self._looking = anyio.Lock()
        self._looked_at = -LOOK_EVERY_S
        self._freed = anyio.Event()  # set when a slot frees
        self._objects: dict[str, Any] = {}  # stored context id -> its ObjectRef
        self._job_ids = itertools.count(1)

    # -- the Executor interface -------------------------------------------------------------

    @property
    def root(self) -> str:
        return self._local.root

    def start(self) -> None:
        self._local.start()

    def stop(self) -> None:
        """Each agent stops its zygote (its workers die with it) and removes its directory,
        then is killed; an agent that does not answer in time is killed all the same."""
        if self._connected:
            agents = [node.agent for node in self._nodes.values()]
            self._nodes.clear()
            with contextlib.suppress(RayError):
                ray.get([agent.stop.remote() for agent in agents], timeout=STOP_TIMEOUT_S)
            for agent in agents:
                with contextlib.suppress(RayError):
                    ray.kill(agent)
            ray.shutdown()
        self._local.stop()

    async def long_worker(self, context: ContextFile | None) -> LongWorker:
        return await self._local.long_worker(context)

    async def forget(self, context_id: str) -> None:
        await self._local.forget(context_id)
        self._objects.pop(context_id, None)  # the object store frees it once unreferenced
        for node in self._nodes.values():
            if context_id in node.contexts:
                node.contexts.discard(context_id)
                node.agent.forget.remote(context_id)

    def status(self) -> Json:
        nodes = [node.report() for node in list(self._nodes.values())]
        return {"kind": "ray" if self._connected is not False else "local", "nodes": nodes}

    async def run(self, job: Job) -> Json:
        if not await self._connect():
            return await self._local.run(job)
        stored = job.context.id if isinstance(job.context, ContextFile) else None
        chosen = await self._node_for(stored)
        if chosen is None:  # not started anywhere yet, so it may run here if allowed
            if not self._fallback:
                raise WorkerCrashed(reason=NO_NODE)
            log.warning("no Ray node for a job: running it locally (--executor ray,local)")
            return await self._local.run(job)
        source = await self._source(job.context)
        with self._slot(chosen) as node:
            return await self._run_on(node, job, source)

    # -- connecting and looking at the cluster ------------------------------------------------

    async def _connect(self) -> bool:
        """Connect on the first job (so `ready` never waits for the cluster). Ray waits minutes
        for an unreachable cluster, so one attempt at a time runs in a thread of its own and a
        job waits for it at most CONNECT_TIMEOUT_S; a failed attempt is tried again by the next
        job, unless `ray,local` fell back for good."""
        async with self._connecting:
            if self._connected is None:
                attempt = self._attempt
                if attempt is None or (attempt.done() and attempt.exception() is not None):
                    attempt = self._attempt = self._start_attempt()
                try:
                    await anyio.to_thread.run_sync(
                        attempt.result, CONNECT_TIMEOUT_S, abandon_on_cancel=True
                    )
                    self._connected = True
                except Exception as error:  # Ray raises many kinds; each means: not reached
                    log.warning("cannot reach the Ray cluster: %s", type(error).__name__)
                    if not self._fallback:
                        raise WorkerCrashed(reason=UNREACHABLE) from None
                    log.warning("running completions locally (--executor ray,local)")
                    self._connected = False
            return self._connected

    def _start_attempt(self) -> Future[None]:
        attempt: Future[None] = Future()

        def connect() -> None:
            try:
                ray.init(
                    address=self._address,
                    namespace="rlm-server",
                    log_to_driver=False,  # the nodes' logs are theirs: model code writes there
                    configure_logging=False,
                )
                attempt.set_result(None)
            except Exception as error:
                attempt.set_exception(error)

        threading.Thread(target=connect, name="ray-connect", daemon=True).start()
        return attempt

    async def _look(self) -> None:
        """Place an agent on every alive node with CPUs that has none; forget dead nodes.
        Jobs that arrive meanwhile wait for the look to finish."""
        async with self._looking:
            now = time.monotonic()
            if now - self._looked_at < LOOK_EVERY_S:
                return
            alive = {
                n["NodeID"]: n
                for n in await anyio.to_thread.run_sync(ray.nodes)
                if n["Alive"] and n["Resources"].get("CPU", 0) >= 1
            }
            for node_id in list(self._nodes):
                if node_id not in alive:
                    log.warning("Ray node %s is gone", node_id)
                    del self._nodes[node_id]
            with anyio.CancelScope(shield=True):  # an agent once asked for is kept or killed
                async with anyio.create_task_group() as placing:
                    for node_id, info in alive.items():
                        if node_id not in self._nodes:
                            placing.start_soon(self._place, node_id, info)
            self._looked_at = time.monotonic()

    async def _place(self, node_id: str, info: Json) -> None:
        cpus = int(info["Resources"]["CPU"])
        slots = min(cpus, self._config.ray_node_slots or cpus)
        config = self._config
        agent: Any = RemoteAgent.options(
            num_cpus=0,  # its workers are processes of its own, outside Ray's accounting
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(
            config.worker_memory_mb,
            config.worker_disk_mb,
            config.max_message_bytes,
            config.max_calls_in_flight,
            config.sandbox,
        )
        node = _Node(node_id, info.get("NodeManagerAddress", ""), slots, agent)
        try:
            with anyio.fail_after(AGENT_START_TIMEOUT_S):
                started = await agent.start.remote()
            found = started.get("protections") if isinstance(started, dict) else None
            node.protections = [p for p in sandbox.PROTECTIONS if p in (found or ())]
            self._nodes[node_id] = node
        except (RayError, TimeoutError) as error:
            log.warning("no agent on Ray node %s: %s", node_id, type(error).__name__)
            with contextlib.suppress(RayError):
                ray.kill(agent)

    # -- scheduling ---------------------------------------------------------------------------

    async def _node_for(self, stored: str | None) -> _Node | None:
        """The least-loaded node with a free slot (one that holds the context first); waits
        while every node is busy (the engine's --max-concurrency bounds the cluster). None when
        the cluster has no node for us, or cannot be asked."""
        while True:
            try:
                await self._look()
            except Exception as error:  # the connection is lost: Ray raises many kinds
                log.warning("cannot look at the Ray cluster: %s", type(error).__name__)
                self._nodes.clear()
            if not self._nodes:
                return None
            free = [n for n in self._nodes.values() if n.running < n.slots]
            if free:
                holding = [n for n in free if stored in n.contexts]
                return min(holding or free, key=lambda n: (n.running / n.slots, n.running))
            freed = self._freed
            with anyio.move_on_after(LOOK_EVERY_S):  # a new node may have come
                await freed.wait()

    @contextlib.contextmanager
    def _slot(self, node: _Node) -> Iterator[_Node]:
        node.running += 1
        try:
            yield node
        finally:
            node.running -= 1
            self._freed.set()
            self._freed = anyio.Event()

    async def _source(self, context: JobInput) -> Any:
        """What the agent gets: the prompt itself, or a stored context's object reference
        (in a list, so that Ray passes the reference and the node fetches it only if needed)."""
        if not isinstance(context, ContextFile):
            return context
        ref = self._objects.get(context.id)
        if ref is None:
            data = await anyio.to_thread.run_sync(_read, context.path)
            ref = self._objects[context.id] = ray.put(data)
        return {"id": context.id, "kind": context.kind, "ref": [ref]}

    # -- one job --------------------------------------------------------------------------------

    async def _run_on(self, node: _Node, job: Job, source: Any) -> Json:
        """Relay the job's frames; the broker answers its calls. Killed on the node however
        this ends early."""
        job_id = next(self._job_ids)
        run = node.agent.run.options(num_returns="streaming")
        stream = run.remote(job_id, job.frame, source, job.label)
        final: Json | None = None
        crash: RpcError | None = None
        try:
            async with anyio.create_task_group() as calls:
                final = await self._relay(node, job_id, stream, calls, job)
                calls.cancel_scope.cancel()
        except* RayError:  # raised inside the calls' task group, as is WorkerCrashed
            self._lost(node)
            crash = WorkerCrashed(reason=LOST)
        except* WorkerCrashed as crashed:
            crash = first_of(crashed, WorkerCrashed)
        finally:
            if final is None:
                await self._cancel(node, job_id)
        if final is None:
            raise crash or WorkerCrashed(reason=LOST)
        return final

    async def _relay(
        self, node: _Node, job_id: int, stream: Any, calls: anyio.abc.TaskGroup, job: Job
    ) -> Json:
        """The job's frames, each checked as the local executor checks a worker's (the node is
        not trusted either): model and tool calls answered here, events passed on."""
        async for ref in stream:
            kind, body = await ref
            body = body if isinstance(body, dict) or kind in ("read", "crash") else {}
            if kind == "call":
                call = checked_call(body)
                answer = job.on_call(call["model"], call["prompt"])
                calls.start_soon(self._reply, node, job_id, call["call"], answer)
            elif kind == "tool":
                tool = checked_tool(body)
                answer = job.on_tool(tool["name"], tool["arguments"])
                calls.start_soon(self._reply, node, job_id, tool["tool"], answer)
            elif kind == "event":
                event = checked_event(body)
                if event is not None:
                    job.on_event(event)
            elif kind == "read":
                node.contexts.add(str(body))
                node.contexts_read += 1
            elif kind == "final":
                return checked_final(body)
            else:
                reason = str(body)[:REASON_CHARS] if body else None
                raise WorkerCrashed(**({"reason": reason} if reason else {}))
        raise WorkerCrashed(reason=LOST)

    @staticmethod
    async def _cancel(node: _Node, job_id: int) -> None:
        """Kill the job's worker on its node (shielded: the caller may be cancelled)."""
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(CANCEL_TIMEOUT_S),
            contextlib.suppress(RayError),
        ):
            await node.agent.cancel.remote(job_id)

    @staticmethod
    async def _reply(node: _Node, job_id: int, call_id: int, answer: Awaitable[Json]) -> None:
        reply = await answer
        with contextlib.suppress(RayError):
            await node.agent.reply.remote(job_id, call_id, reply)

    def _lost(self, node: _Node) -> None:
        if self._nodes.get(node.node_id) is node:
            log.warning("lost Ray node %s mid-request", node.node_id)
            del self._nodes[node.node_id]
            with contextlib.suppress(RayError):
                ray.kill(node.agent)
        self._looked_at = -LOOK_EVERY_S  # look again at the next job


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()
