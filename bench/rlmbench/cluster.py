"""The Ray executor's figures: `bench/run --only cluster` (not part of the default run).

Ray's multi-node test cluster on this machine (a head with no CPUs, worker nodes over loopback):

- overhead: one instant `infer` at a time, `--executor ray` (three nodes) against `local`;
- wide: 64 concurrent infers against a model that takes 1 s, over three nodes;
- cpu: six jobs whose model code does `CPU_S` seconds of work over its context, on one, two and
  three nodes of one slot each. The nodes share this machine's cores, so beyond its core count
  more nodes cannot help here; on a real cluster each node brings its own cores, and the time
  is jobs / (nodes x slots) x CPU_S plus the overhead.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from rlmbench.procs import Channel, Fixture, Target, repl_reply, spawned

Json = dict[str, Any]
NODES = 3
NODE_STORE_BYTES = 80 << 20
OVERHEAD_N = 30
WIDE_N = 64
WIDE_DELAY_MS = 1000
CPU_JOBS = 6
CPU_S = 2.0
BUSY = repl_reply(  # model code that computes over its context for CPU_S seconds of CPU time
    "import time",
    "end = time.process_time() + " + str(CPU_S),
    "n = 0",
    "while time.process_time() < end:",
    "    n += context.count('x')",
    "answer['content'] = 'ok'",
    "answer['ready'] = True",
)


def run(target: Target, fixture: Fixture, log: Callable[[str], None]) -> Json:
    from ray.cluster_utils import Cluster  # only for this figure: bench/.venv has rlm-server[ray]

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": NODE_STORE_BYTES},
    )
    try:
        nodes = [_add(cluster, WIDE_N) for _ in range(NODES)]
        ray_args = ["--executor", "ray", "--ray-address", str(cluster.address)]
        result: Json = {"cores": len(os.sched_getaffinity(0)), "nodes": NODES}
        result["overhead"] = _overhead(target, fixture, ray_args, log)
        result["wide"] = _wide(target, fixture, ray_args, log)
        for node in nodes:
            cluster.remove_node(node)
        result["cpu"] = {}
        for count in range(1, NODES + 1):
            _add(cluster, 1)
            result["cpu"][str(count)] = _cpu(target, fixture, ray_args, log, count)
        return result
    finally:
        cluster.shutdown()


def _add(cluster: Any, cpus: int) -> Any:
    node = cluster.add_node(num_cpus=cpus, object_store_memory=NODE_STORE_BYTES)
    cluster.wait_for_nodes()
    return node


def _warm(target: Target, channel: Channel) -> None:
    target.wait_ready(channel)
    response = target.call(channel, 0, "infer", target.infer_params("warm up", "say ok"))
    if not target.succeeded(response):
        raise RuntimeError(f"warm-up infer failed: {response}")


def _overhead(
    target: Target, fixture: Fixture, ray_args: list[str], log: Callable[[str], None]
) -> Json:
    fixture.instant()
    result: Json = {}
    for name, args in (("local", []), ("ray", ray_args)):
        with spawned(target, args) as channel:
            _warm(target, channel)
            for i in range(NODES * 2):  # every node's agent started and warm
                target.call(channel, 10 + i, "infer", target.infer_params("hello", "say ok"))
            times = []
            for i in range(OVERHEAD_N):
                started = time.perf_counter()
                response = target.call(
                    channel, 100 + i, "infer", target.infer_params("hello", "say ok")
                )
                times.append(time.perf_counter() - started)
                if not target.succeeded(response):
                    raise RuntimeError(f"{name}: infer failed: {response}")
        result[name] = {"median_s": statistics.median(times), "runs": times}
    result["added_s"] = result["ray"]["median_s"] - result["local"]["median_s"]
    log(
        f"  one infer: local {result['local']['median_s'] * 1000:.1f} ms, "
        f"ray {result['ray']['median_s'] * 1000:.1f} ms"
    )
    return result


def _burst(target: Target, channel: Channel, params: list[Json], base_id: int) -> float:
    payload = b"".join(target.request(base_id + i, "infer", p) for i, p in enumerate(params))
    started = time.perf_counter()
    channel.write(payload)
    pending = set(range(base_id, base_id + len(params)))
    while pending:
        message = channel.read_message(timeout=600)
        if isinstance(message, dict) and message.get("id") in pending:
            if not target.succeeded(message):
                raise RuntimeError(f"infer failed: {str(message)[:500]}")
            pending.discard(message["id"])
    return time.perf_counter() - started


def _wide(
    target: Target, fixture: Fixture, ray_args: list[str], log: Callable[[str], None]
) -> Json:
    fixture.instant()
    with spawned(target, [*ray_args, "--max-concurrency", str(WIDE_N)]) as channel:
        _warm(target, channel)
        fixture.delayed(WIDE_DELAY_MS)
        params = [target.infer_params(f"request {i}", "say ok") for i in range(WIDE_N)]
        elapsed = _burst(target, channel, params, 1000)
        max_in_flight = fixture.stats()["max_in_flight"]
    fixture.instant()
    log(f"  {WIDE_N} x {WIDE_DELAY_MS} ms infers over {NODES} nodes: {elapsed:.2f} s")
    return {
        "n": WIDE_N,
        "model_delay_ms": WIDE_DELAY_MS,
        "wall_s": elapsed,
        "max_in_flight_at_model": max_in_flight,
    }


def _cpu(
    target: Target,
    fixture: Fixture,
    ray_args: list[str],
    log: Callable[[str], None],
    nodes: int,
) -> Json:
    fixture.instant()
    with spawned(target, [*ray_args, "--max-concurrency", str(CPU_JOBS)]) as channel:
        _warm(target, channel)
        for i in range(nodes * 2):
            target.call(channel, 10 + i, "infer", target.infer_params("hello", "say ok"))
        fixture.rules([{"when": "root", "reply": BUSY}])
        params = [target.infer_params("x" * 1_000_000, "work") for _ in range(CPU_JOBS)]
        elapsed = _burst(target, channel, params, 2000)
    fixture.instant()
    log(f"  {CPU_JOBS} CPU-bound jobs of {CPU_S} s on {nodes} node(s): {elapsed:.2f} s")
    return {"jobs": CPU_JOBS, "cpu_s": CPU_S, "wall_s": elapsed}
