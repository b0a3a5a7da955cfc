"""One function per figure. Each returns plain data (seconds, counts, bytes) for report.py.

Runs of different servers are interleaved (echo, plugin, ours, echo, plugin, ours, ...) so that
a change in the machine's load during the run touches all of them alike. Every server process
is warmed up (ready, and one `infer` answered, so that its worker zygote or its library imports
are done) before anything on it is timed, except in the spawn figures, which time exactly that.
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from rlmbench import cluster, soak
from rlmbench.context import NEEDLE_CODE, NEEDLE_QUERY, context_chunks, make_context
from rlmbench.procs import (
    BENCH,
    Channel,
    Fixture,
    PssSampler,
    RssSampler,
    Target,
    cpu_ns,
    pinned,
    repl_reply,
    spawned,
    status_kib,
    tree,
    tree_pss_kib,
    tree_rss_kib,
)

Json = dict[str, Any]
GIB = 1 << 30


@dataclass
class Settings:
    """Repetition counts; `quick` shrinks them for a smoke run."""

    rtt_runs: int = 9  # processes per server and placement: each lands in a fast or a slow mode
    rtt_n: int = 2000
    rtt_warmup: int = 200
    pipe_runs: int = 5
    pipe_n: int = 20000
    spawn_runs: int = 10
    first_answer_runs: int = 3
    exit_runs: int = 5
    first_infer_runs: int = 5
    infer_n: int = 30
    library_n: int = 10
    plugin_infer_n: int = 10
    conc_levels: tuple[int, ...] = (1, 4, 16, 64)
    conc_runs: int = 3
    plugin_conc_levels: tuple[int, ...] = (1, 4, 16)
    plugin_conc_runs: int = 1
    model_delay_ms: int = 1000
    needle_bytes: int = 200 << 20
    needle_runs: int = 3
    context_bytes: int = 200 << 20  # the stored-context figures
    chunk_bytes: int = 32 << 20
    reuse_runs: int = 5
    prompt_runs: int = 3
    concurrent_questions: int = 8
    big_context_bytes: int = 2 << 30
    mcp_burst_runs: int = 9  # 8 calls at once, MCP and JSON-RPC in turn
    tool_calls: int = 2000  # host tool calls timed by one infer's model code
    tool_runs: int = 3

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            rtt_runs=2,
            rtt_n=500,
            rtt_warmup=50,
            pipe_runs=2,
            pipe_n=5000,
            spawn_runs=3,
            first_answer_runs=1,
            exit_runs=2,
            first_infer_runs=2,
            infer_n=8,
            library_n=3,
            plugin_infer_n=3,
            conc_levels=(1, 4, 16, 64),
            conc_runs=1,
            plugin_conc_levels=(1, 4),
            needle_bytes=20 << 20,
            needle_runs=1,
            context_bytes=20 << 20,
            chunk_bytes=4 << 20,
            reuse_runs=2,
            prompt_runs=1,
            big_context_bytes=64 << 20,
            mcp_burst_runs=2,
            tool_calls=500,
            tool_runs=1,
        )


MCP_VERSION = "2025-11-25"  # the handshake era: what most hosts speak today
MCP_CONCURRENT = 8


def _mcp_line(request_id: Any, method: str, params: Json | None = None) -> bytes:
    message: Json = {"jsonrpc": "2.0", "method": method}
    if request_id is not None:
        message["id"] = request_id
    if params is not None:
        message["params"] = params
    return orjson.dumps(message) + b"\n"


def _mcp_ask(request_id: int, text: str) -> bytes:
    arguments = {"question": "say ok", "text": text}
    return _mcp_line(request_id, "tools/call", {"name": "rlm_ask", "arguments": arguments})


PING = {
    "name": "ping",
    "description": "Answers its arguments back.",
    "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
}


def _tool_timing_code(calls: int) -> str:
    """Model code that calls the host tool `ping` once, then `calls` times, timing each call
    itself; the answer is the median and p99 in µs."""
    return repl_reply(
        "import json, time",
        "ping(n=-1)",
        "samples = []",
        f"for i in range({calls}):",
        "    started = time.perf_counter_ns()",
        "    ping(n=i)",
        "    samples.append(time.perf_counter_ns() - started)",
        "samples.sort()",
        "answer['content'] = json.dumps({",
        "    'median_us': samples[len(samples) // 2] / 1000,",
        "    'p99_us': samples[int(len(samples) * 0.99)] / 1000,",
        "})",
        "answer['ready'] = True",
    )


def _found(answers: list[Json], secret: str) -> bool:
    return all(a.get("result", {}).get("text") == secret for a in answers)


class Bench:
    def __init__(
        self,
        fixture: Fixture,
        targets: dict[str, Target],
        settings: Settings,
        log: Callable[[str], None],
    ) -> None:
        self.fixture = fixture
        self.t = targets
        self.s = settings
        self.log = log
        self._server_ms: list[float] = []

    # -- helpers ----------------------------------------------------------------------------

    def _warm(self, target: Target, channel: Channel) -> None:
        """Ready, and one infer answered (instant model)."""
        target.wait_ready(channel)
        if target.name == "echo":
            return
        response = target.call(channel, 0, "infer", target.infer_params("warm up", "say ok"))
        if not target.succeeded(response):
            raise RuntimeError(f"{target.name}: warm-up infer failed: {response}")
        time.sleep(0.2)

    def _infer_once(self, target: Target, channel: Channel, request_id: int) -> float:
        started = time.perf_counter()
        response = target.call(channel, request_id, "infer", target.infer_params("hello", "say ok"))
        elapsed = time.perf_counter() - started
        if not target.succeeded(response):
            raise RuntimeError(f"{target.name}: infer failed: {response}")
        server_ms = response["result"].get("metadata", {}).get("elapsed_ms")
        if isinstance(server_ms, (int, float)):
            self._server_ms.append(server_ms / 1000)
        return elapsed

    # -- status round trip ------------------------------------------------------------------

    def soak(self) -> Json:
        """A long hostile session, then a check that nothing leaked (rlmbench/soak.py)."""
        return soak.run(self.t["ours"], self.fixture)

    def cluster(self) -> Json:
        """The Ray executor on a multi-node cluster on this machine (rlmbench/cluster.py)."""
        return cluster.run(self.t["ours"], self.fixture, self.log)

    def placements(self) -> dict[str, tuple[set[int], set[int]]]:
        """Where the client and the server run in the round-trip figure: (client, server) CPUs.

        Unpinned, the floor itself is bimodal (about 13 µs when the scheduler wakes the echo on
        the client's CPU, about 50 µs when it wakes it on the other, idle one, and which happens
        changes from process to process), so each placement is pinned and measured on its own.
        """
        cpus = sorted(os.sched_getaffinity(0))
        places = {"one_cpu": ({cpus[-1]}, {cpus[-1]})}
        if len(cpus) >= 2:
            places["two_cpus"] = ({cpus[0]}, {cpus[-1]})
        return places

    def status_rtt(self) -> Json:
        """p50/p99 of one `status` request and its answer, one at a time, over raw pipes; the
        client and the server pinned to one CPU, and to two different CPUs."""
        self.fixture.instant()
        names = ("echo", "plugin", "ours")
        result: Json = {"n_per_run": self.s.rtt_n}
        places = self.placements()
        runs: dict[str, dict[str, list[Json]]] = {p: {n: [] for n in names} for p in places}
        for run in range(self.s.rtt_runs):
            for place, (client_cpus, server_cpus) in places.items():
                for name in names:
                    runs[place][name].append(self._rtt_run(name, client_cpus, server_cpus))
                    last = runs[place][name][-1]
                    self.log(
                        f"  status rtt run {run + 1} {place} {name}: p50 {last['p50_us']:.1f} us,"
                        f" p99 {last['p99_us']:.1f} us, server CPU "
                        f"{last['cpu_us_per_request']:.1f} us/req"
                    )
        for place, (client_cpus, server_cpus) in places.items():
            summary: Json = {"client_cpus": sorted(client_cpus), "server_cpus": sorted(server_cpus)}
            for name in names:
                summary[name] = {
                    key: statistics.median(r[key] for r in runs[place][name])
                    for key in ("p50_us", "p99_us", "cpu_us_per_request")
                } | {"runs": runs[place][name]}
            floor = summary["echo"]["p50_us"]
            for name in ("ours", "plugin"):
                summary[name]["overhead_us"] = summary[name]["p50_us"] - floor
            result[place] = summary
        return result

    def _rtt_run(self, name: str, client_cpus: set[int], server_cpus: set[int]) -> Json:
        target = self.t[name]
        dialect = self.t["ours"] if name == "echo" else target  # the echo gets ours' line
        line = dialect.request(1, "status")
        with spawned(target, cpus=server_cpus) as channel, pinned(client_cpus):
            self._warm(target, channel)
            read, write, clock = channel.readline, channel.write, time.perf_counter_ns
            for _ in range(self.s.rtt_warmup):
                write(line)
                read()
            samples = []
            cpu_before = cpu_ns(channel.pid)
            for _ in range(self.s.rtt_n):
                t0 = clock()
                write(line)
                read()
                samples.append(clock() - t0)
            cpu_us = (cpu_ns(channel.pid) - cpu_before) / self.s.rtt_n / 1000
        samples_us = [s / 1000 for s in samples]
        return {
            "p50_us": statistics.median(samples_us),
            "p99_us": statistics.quantiles(samples_us, n=100)[98],
            "cpu_us_per_request": cpu_us,
        }

    # -- pipelined status throughput --------------------------------------------------------

    def pipelined(self) -> Json:
        """N `status` requests written without waiting; N answers read. Requests per second,
        with the client and the server pinned to one CPU, and to two different CPUs."""
        self.fixture.instant()
        names = ("echo", "plugin", "ours")
        places = self.placements()
        runs: dict[str, dict[str, list[Json]]] = {p: {n: [] for n in names} for p in places}
        for run in range(self.s.pipe_runs):
            for place, (client_cpus, server_cpus) in places.items():
                for name in names:
                    runs[place][name].append(self._pipe_run(name, client_cpus, server_cpus))
                    last = runs[place][name][-1]
                    self.log(
                        f"  pipelined run {run + 1} {place} {name}: {last['req_per_s']:,.0f} "
                        f"req/s, server CPU {last['cpu_us_per_request']:.1f} us/req"
                    )
        result: Json = {"n_per_run": self.s.pipe_n}
        for place, (client_cpus, server_cpus) in places.items():
            summary: Json = {"client_cpus": sorted(client_cpus), "server_cpus": sorted(server_cpus)}
            for name in names:
                summary[name] = {
                    key: statistics.median(r[key] for r in runs[place][name])
                    for key in ("req_per_s", "cpu_us_per_request")
                } | {"runs": runs[place][name]}
            result[place] = summary
        return result

    def _pipe_run(self, name: str, client_cpus: set[int], server_cpus: set[int]) -> Json:
        n = self.s.pipe_n
        target = self.t[name]
        dialect = self.t["ours"] if name == "echo" else target
        payload = b"".join(dialect.request(i + 1, "status") for i in range(n))
        with spawned(target, cpus=server_cpus) as channel, pinned(client_cpus):
            self._warm(target, channel)
            writer = threading.Thread(target=channel.write, args=(payload,))
            cpu_before = cpu_ns(channel.pid)
            started = time.perf_counter()
            writer.start()  # the thread inherits the client's pinning
            last = channel.count_lines(n, timeout=300)
            elapsed = time.perf_counter() - started
            cpu_us = (cpu_ns(channel.pid) - cpu_before) / n / 1000
            writer.join()
        if orjson.loads(last).get("id") != n:
            raise RuntimeError(f"{name}: last pipelined answer was {last[:200]!r}")
        return {"req_per_s": n / elapsed, "cpu_us_per_request": cpu_us}

    # -- spawn ------------------------------------------------------------------------------

    def spawn_ready(self) -> Json:
        """Seconds from spawn to the ready line, the server on one CPU (the one the client is
        not on) and unpinned; the plugin also with `rlm` hidden (stub mode), unpinned."""
        self.fixture.instant()
        one_cpu = {sorted(os.sched_getaffinity(0))[-1]}
        kinds = {
            "ours": ("ours", [], None),
            "plugin": ("plugin", [], None),
            "plugin_stub": ("plugin", ["--no-rlm"], None),
            "ours_one_cpu": ("ours", [], one_cpu),
            "plugin_one_cpu": ("plugin", [], one_cpu),
        }
        runs: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(self.s.spawn_runs):
            for name, (target_name, extra, cpus) in kinds.items():
                target = self.t[target_name]
                with spawned(target, extra, cpus=cpus) as channel:
                    runs[name].append(target.wait_ready(channel))
        self.log(
            "  spawn to ready: "
            + ", ".join(f"{k} {statistics.median(v) * 1000:.0f} ms" for k, v in runs.items())
        )
        return {name: {"median_s": statistics.median(v), "runs": v} for name, v in runs.items()}

    def first_answers(self) -> Json:
        """On one CPU (client and server, so that anything the server starts competes with its
        own answers): from spawn, one `status` written at once, then one every millisecond
        for two seconds, each waiting for its answer. Spawn to the first answer, and the round
        trips of the first second (ours: while the zygote imports `rlm` and warms up) against
        those of the second."""
        self.fixture.instant()
        cpu = {sorted(os.sched_getaffinity(0))[-1]}
        runs: dict[str, list[Json]] = {"ours": [], "plugin": []}
        for _ in range(self.s.first_answer_runs):
            for name, per_run in runs.items():
                per_run.append(self._first_answers_run(self.t[name], cpu))
        result: Json = {}
        for name, per_run in runs.items():
            result[name] = {
                key: statistics.median(r[key] for r in per_run)
                for key in (
                    "first_answer_s",
                    "early_p50_us",
                    "early_p99_us",
                    "late_p50_us",
                    "late_p99_us",
                )
            } | {"runs": per_run}
            self.log(
                f"  first answers {name}: first after {result[name]['first_answer_s'] * 1000:.0f}"
                f" ms; first second p50 {result[name]['early_p50_us']:.0f} us, p99 "
                f"{result[name]['early_p99_us']:.0f} us; second second p50 "
                f"{result[name]['late_p50_us']:.0f} us, p99 {result[name]['late_p99_us']:.0f} us"
            )
        return result

    def _first_answers_run(self, target: Target, cpus: set[int]) -> Json:
        line = target.request(1, "status")
        early: list[float] = []
        late: list[float] = []
        with spawned(target, cpus=cpus) as channel, pinned(cpus):
            channel.write(line)
            target.response(channel, 1)
            first = time.perf_counter() - channel.spawned_at
            while (since := time.perf_counter() - channel.spawned_at) < 2.0:
                t0 = time.perf_counter_ns()
                channel.write(line)
                channel.readline()
                elapsed_us = (time.perf_counter_ns() - t0) / 1000
                (early if since < 1.0 else late).append(elapsed_us)
                time.sleep(0.001)
        return {
            "first_answer_s": first,
            "early_p50_us": statistics.median(early),
            "early_p99_us": statistics.quantiles(early, n=100)[98],
            "late_p50_us": statistics.median(late),
            "late_p99_us": statistics.quantiles(late, n=100)[98],
            "early_n": len(early),
            "late_n": len(late),
        }

    def exit_eof(self) -> Json:
        """Milliseconds from closing the server's stdin, with nothing in flight (one `status`
        answered), to its exit: right after spawn (ours: the zygote is still importing) and
        once warm (one `infer` answered)."""
        self.fixture.instant()
        runs: dict[str, list[float]] = {
            "ours_cold": [],
            "plugin_cold": [],
            "ours_warm": [],
            "plugin_warm": [],
        }
        for _ in range(self.s.exit_runs):
            for name in runs:
                target_name, when = name.split("_")
                target = self.t[target_name]
                with spawned(target) as channel:
                    if when == "warm":
                        self._warm(target, channel)
                    target.call(channel, 1, "status")
                    started = time.perf_counter()
                    channel.close(timeout=30)
                    runs[name].append(time.perf_counter() - started)
        self.log(
            "  exit after end of stdin: "
            + ", ".join(f"{k} {statistics.median(v) * 1000:.0f} ms" for k, v in runs.items())
        )
        return {name: {"median_s": statistics.median(v), "runs": v} for name, v in runs.items()}

    def spawn_first_infer(self) -> Json:
        """Seconds from spawn to the answer of an `infer` written at once (instant model)."""
        self.fixture.instant()
        runs: dict[str, list[float]] = {"ours": [], "plugin": []}
        for _ in range(self.s.first_infer_runs):
            for name in runs:
                target = self.t[name]
                with spawned(target) as channel:
                    request = target.request(1, "infer", target.infer_params("hello", "say ok"))
                    channel.write(request)
                    response = target.response(channel, 1)
                    elapsed = time.perf_counter() - channel.spawned_at
                if not target.succeeded(response):
                    raise RuntimeError(f"{name}: first infer failed: {response}")
                runs[name].append(elapsed)
        self.log(
            "  spawn to first infer: "
            + ", ".join(f"{k} {statistics.median(v) * 1000:.0f} ms" for k, v in runs.items())
        )
        return {name: {"median_s": statistics.median(v), "runs": v} for name, v in runs.items()}

    # -- the MCP front end beside the JSON-RPC one -------------------------------------------

    @staticmethod
    def _mcp_open(channel: Channel) -> float:
        """The initialize handshake; seconds from spawn to its answer."""
        client = {"name": "rlmbench", "version": "1"}
        params = {"protocolVersion": MCP_VERSION, "capabilities": {}, "clientInfo": client}
        channel.write(_mcp_line("init", "initialize", params))
        while channel.read_message().get("id") != "init":
            pass
        elapsed = time.perf_counter() - channel.spawned_at
        channel.write(_mcp_line(None, "notifications/initialized"))
        return elapsed

    @staticmethod
    def _mcp_burst(channel: Channel, n: int, base_id: int) -> float:
        """Write n `rlm_ask` calls at once; seconds until the last answer."""
        payload = b"".join(_mcp_ask(base_id + i, f"request {i}") for i in range(n))
        started = time.perf_counter()
        channel.write(payload)
        pending = set(range(base_id, base_id + n))
        while pending:
            message = channel.read_message(timeout=600)
            if isinstance(message, dict) and message.get("id") in pending:
                result = message.get("result") or {}
                if result.get("isError") is not False or result["structuredContent"]["stub"]:
                    raise RuntimeError(f"mcp: rlm_ask failed: {str(message)[:500]}")
                pending.discard(message["id"])
        return time.perf_counter() - started

    def mcp(self) -> Json:
        """`rlm-server mcp` beside the JSON-RPC mode, in turn on two warm servers: one
        `rlm_ask` against one `infer` (instant model), 8 of each at once, and spawn to a
        completed `initialize` against spawn to `ready`."""
        self.fixture.instant()
        ours = self.t["ours"]
        spawn: dict[str, list[float]] = {"initialize": [], "ready": []}
        for _ in range(self.s.spawn_runs):
            with spawned(ours, ["mcp"]) as channel:
                spawn["initialize"].append(self._mcp_open(channel))
            with spawned(ours) as channel:
                spawn["ready"].append(ours.wait_ready(channel))
        one: dict[str, list[float]] = {"mcp": [], "jsonrpc": []}
        eight: dict[str, list[float]] = {"mcp": [], "jsonrpc": []}
        with spawned(ours, ["mcp"]) as mcp, spawned(ours) as jsonrpc:
            self._mcp_open(mcp)
            self._warm(ours, jsonrpc)
            base = 1000
            for _ in range(3):  # warm: zygote, broker, first workers
                self._mcp_burst(mcp, 1, base)
                self._burst(ours, jsonrpc, 1, base)
                base += 1
            for _ in range(self.s.infer_n):
                one["mcp"].append(self._mcp_burst(mcp, 1, base))
                one["jsonrpc"].append(self._burst(ours, jsonrpc, 1, base))
                base += 1
            for _ in range(self.s.mcp_burst_runs):
                eight["mcp"].append(self._mcp_burst(mcp, MCP_CONCURRENT, base))
                eight["jsonrpc"].append(self._burst(ours, jsonrpc, MCP_CONCURRENT, base))
                base += MCP_CONCURRENT

        def medians(runs: dict[str, list[float]]) -> Json:
            return {k: {"median_s": statistics.median(v), "runs": v} for k, v in runs.items()}

        result = {"spawn": medians(spawn), "one": medians(one), "concurrent": medians(eight)}
        result["concurrent_n"] = MCP_CONCURRENT
        self.log(
            "  mcp: "
            + "; ".join(
                f"{figure}: "
                + ", ".join(f"{k} {v['median_s'] * 1000:.1f} ms" for k, v in result[figure].items())
                for figure in ("spawn", "one", "concurrent")
            )
        )
        return result

    # -- one infer, instant model -----------------------------------------------------------

    def one_infer(self) -> Json:
        """One `infer` at a time, instant model, one root call: ours, the plugin, the library."""
        self.fixture.instant()
        result: Json = {}
        for name, n in (("ours", self.s.infer_n), ("plugin", self.s.plugin_infer_n)):
            target = self.t[name]
            with spawned(target) as channel:
                self._warm(target, channel)
                for i in range(2):
                    self._infer_once(target, channel, 100 + i)
                self._server_ms = []
                times = [self._infer_once(target, channel, 200 + i) for i in range(n)]
            result[name] = {"median_s": statistics.median(times), "runs": times}
            if self._server_ms:  # ours reports its own elapsed_ms: the rest is pipe and JSON
                result[name]["server_elapsed_median_s"] = statistics.median(self._server_ms)
        library = self._library("infer", str(self.s.library_n), "1")
        if library["texts"] != ["ok"]:
            raise RuntimeError(f"library answered {library['texts']}")
        result["library"] = {
            "median_s": statistics.median(library["times_s"]),
            "runs": library["times_s"],
            "import_and_build_s": library["import_and_build_s"],
        }
        self.log(
            "  one infer: "
            + ", ".join(f"{k} {v['median_s'] * 1000:.1f} ms" for k, v in result.items())
        )
        return result

    def sandbox_cost(self) -> Json:
        """What isolating model code costs one request: ours, one `infer` at a time, instant
        model, with `--sandbox off` and with the default (every protection this machine has),
        in the same run."""
        self.fixture.instant()
        ours = self.t["ours"]
        result: Json = {}
        for level in ("off", "auto"):
            with spawned(ours, ["--sandbox", level]) as channel:
                self._warm(ours, channel)
                status = ours.call(channel, 99, "status")["result"]
                for i in range(2):
                    self._infer_once(ours, channel, 100 + i)
                times = [self._infer_once(ours, channel, 200 + i) for i in range(self.s.infer_n)]
            result[level] = {
                "median_s": statistics.median(times),
                "runs": times,
                "protections": status.get("protections", []),
            }
        result["cost_s"] = result["auto"]["median_s"] - result["off"]["median_s"]
        self.log(
            f"  sandbox cost: off {result['off']['median_s'] * 1000:.1f} ms, auto "
            f"{result['auto']['median_s'] * 1000:.1f} ms ({len(result['auto']['protections'])} "
            "protections)"
        )
        return result

    # -- host tool round trip ---------------------------------------------------------------

    def tool_roundtrip(self) -> Json:
        """Model code -> the client's handler -> model code: the REPL times each call of a host
        tool `ping`. Ours: a `tool/call` answered at once here (its arguments back). The
        library: `ping` a plain function given as `custom_tools`, in one process."""
        ours = self.t["ours"]
        runs: list[Json] = []
        with spawned(ours) as channel:
            self.fixture.instant()
            self._warm(ours, channel)
            self.fixture.rules([{"when": "root", "reply": _tool_timing_code(self.s.tool_calls)}])
            params = {"prompt": "ctx", "query": "bench", "tools": [PING]}
            for run in range(self.s.tool_runs):
                channel.write(ours.request(100 + run, "infer", params))
                while True:
                    message = channel.read_message(timeout=300)
                    if message.get("method") == "tool/call":  # the trivial handler
                        arguments = message["params"]["arguments"]
                        answer = {"jsonrpc": "2.0", "id": message["id"], "result": arguments}
                        channel.write(orjson.dumps(answer) + b"\n")
                    elif message.get("id") == 100 + run:
                        break
                if not ours.succeeded(message):
                    raise RuntimeError(f"the infer with a host tool failed: {message}")
                runs.append(orjson.loads(message["result"]["text"]))
        library = self._library("tools", str(self.s.tool_runs))["runs"]
        self.fixture.instant()
        result: Json = {"calls": self.s.tool_calls}
        for name, per_run in (("ours", runs), ("library", library)):
            result[name] = {
                key: statistics.median(r[key] for r in per_run) for key in ("median_us", "p99_us")
            } | {"runs": per_run}
        self.log(
            f"  tool round trip: ours {result['ours']['median_us']:.1f} us "
            f"(p99 {result['ours']['p99_us']:.1f} us), library "
            f"{result['library']['median_us']:.2f} us"
        )
        return result

    def _library(self, *args: str) -> Json:
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "rlmbench.library_direct",
                args[0],
                self.fixture.base_url,
                *args[1:],
            ],
            cwd=BENCH,
            env=self.t["ours"].env,
            capture_output=True,
            timeout=600,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"library_direct failed: {completed.stderr.decode()[-2000:]}")
        return orjson.loads(completed.stdout)  # type: ignore[no-any-return]

    # -- concurrency ------------------------------------------------------------------------

    def _burst(self, target: Target, channel: Channel, n: int, base_id: int) -> float:
        """Write n infers at once; seconds until the last answer."""
        payload = b"".join(
            target.request(base_id + i, "infer", target.infer_params(f"request {i}", "say ok"))
            for i in range(n)
        )
        started = time.perf_counter()
        channel.write(payload)
        pending = set(range(base_id, base_id + n))
        while pending:
            message = channel.read_message(timeout=600)
            if isinstance(message, dict) and message.get("id") in pending:
                if not target.succeeded(message):
                    raise RuntimeError(f"{target.name}: infer failed: {str(message)[:500]}")
                pending.discard(message["id"])
        return time.perf_counter() - started

    def concurrency(self) -> Json:
        """Wall time of N concurrent infers against a model that takes `model_delay_ms`.

        Ours runs with --max-concurrency 64. The plugin's server reads its next line only after
        answering the last, so its time grows linearly; levels it is not run at are extrapolated
        from its slowest measured level (time per request x N) and marked so.
        """
        delay = self.s.model_delay_ms
        max_level = max(self.s.conc_levels)
        result: Json = {"model_delay_ms": delay, "ours": {}, "plugin": {}}
        self.fixture.instant()
        ours = self.t["ours"]
        with spawned(ours, ["--max-concurrency", str(max(64, max_level))]) as channel:
            self._warm(ours, channel)
            self.fixture.delayed(delay)
            base = 1000
            for n in self.s.conc_levels:
                times = []
                for _ in range(self.s.conc_runs):
                    times.append(self._burst(ours, channel, n, base))
                    base += n
                result["ours"][str(n)] = {"median_s": statistics.median(times), "runs": times}
                self.log(f"  concurrency ours N={n}: {statistics.median(times):.3f} s")
            stats = self.fixture.stats()
            result["ours_max_in_flight_at_model"] = stats["max_in_flight"]
        self.fixture.instant()
        plugin = self.t["plugin"]
        with spawned(plugin) as channel:
            self._warm(plugin, channel)
            self.fixture.delayed(delay)
            base = 1000
            for n in self.s.plugin_conc_levels:
                times = []
                for _ in range(self.s.plugin_conc_runs if n > 4 else max(3, self.s.conc_runs)):
                    times.append(self._burst(plugin, channel, n, base))
                    base += n
                result["plugin"][str(n)] = {
                    "median_s": statistics.median(times),
                    "runs": times,
                    "measured": True,
                }
                self.log(f"  concurrency plugin N={n}: {statistics.median(times):.3f} s")
        slowest = max(self.s.plugin_conc_levels)
        per_request = result["plugin"][str(slowest)]["median_s"] / slowest
        for n in self.s.conc_levels:
            if str(n) not in result["plugin"]:
                result["plugin"][str(n)] = {
                    "median_s": per_request * n,
                    "measured": False,
                    "extrapolated_from": slowest,
                }
        self.fixture.instant()
        return result

    # -- the long context -------------------------------------------------------------------

    def needle(self) -> Json:
        """A needle in a long context, found by model code in the REPL: time and peak memory."""
        size = self.s.needle_bytes
        self.fixture.rules([{"when": "root", "reply": repl_reply(*NEEDLE_CODE)}])
        body, secret = make_context(size)
        ours = self.t["ours"]
        head = (
            b'{"jsonrpc":"2.0","id":ID,"method":"infer","params":{"query":'
            + orjson.dumps(NEEDLE_QUERY)
            + b',"prompt":"'
        )
        tail = b'"}}\n'
        runs = []
        with spawned(ours) as channel:
            ours.wait_ready(channel)
            warm = ours.call(
                channel, 0, "infer", {"prompt": "x The secret code is 0123456789abcdef."}
            )
            if warm.get("result", {}).get("text") != "0123456789abcdef":
                raise RuntimeError(f"needle warm-up failed: {warm}")
            time.sleep(0.3)
            for run in range(self.s.needle_runs):
                idle_kib = tree_rss_kib(channel.pid)
                request_id = 10 + run
                with RssSampler(channel.pid, 0.01) as sampler:
                    started = time.perf_counter()
                    channel.write(head.replace(b"ID", str(request_id).encode()))
                    channel.write(body)
                    channel.write(tail)
                    response = ours.response(channel, request_id, timeout=600)
                    elapsed = time.perf_counter() - started
                text = (response.get("result") or {}).get("text")
                runs.append(
                    {
                        "time_s": elapsed,
                        "found": text == secret,
                        "peak_kib": sampler.peak_kib,
                        "peak_server_kib": sampler.peak_root_kib,
                        "peak_zygote_and_worker_kib": sampler.peak_children_kib,
                        "idle_kib": idle_kib,
                        "samples": sampler.samples,
                        "server_hwm_kib": status_kib(channel.pid, "VmHWM"),
                        "processes": len(tree(channel.pid)),
                    }
                )
                self.log(
                    f"  needle run {run + 1}: {elapsed:.2f} s, found={text == secret}, peak "
                    f"{sampler.peak_kib / 1024:.0f} MiB (idle {idle_kib / 1024:.0f} MiB; server "
                    f"alone {sampler.peak_root_kib / 1024:.0f}, zygote + worker "
                    f"{sampler.peak_children_kib / 1024:.0f})"
                )
                time.sleep(0.3)
        del body
        library = self._library("needle", str(size))
        self.log(
            f"  needle library: {library['time_s']:.2f} s, found={library['found']}, peak "
            f"{library['peak_kib'] / 1024:.0f} MiB"
        )
        self.fixture.instant()
        return {
            "context_bytes": size,
            "ours": {
                "median_s": statistics.median(r["time_s"] for r in runs),
                "peak_kib": statistics.median(r["peak_kib"] for r in runs),
                "peak_server_kib": statistics.median(r["peak_server_kib"] for r in runs),
                "peak_zygote_and_worker_kib": statistics.median(
                    r["peak_zygote_and_worker_kib"] for r in runs
                ),
                "idle_kib": statistics.median(r["idle_kib"] for r in runs),
                "found": all(r["found"] for r in runs),
                "runs": runs,
            },
            "library": library,
        }

    # -- stored contexts (issue 11) -----------------------------------------------------------

    def _load_chunks(
        self, target: Target, channel: Channel, size: int, first_id: int
    ) -> tuple[str, str, Json]:
        """Load the needle context of `size` bytes with context/load chunks; returns its id, the
        secret, and how the load went. The text is made chunk by chunk, never whole here."""
        pieces, secret, piece = context_chunks(size, self.s.chunk_bytes)
        context_id = ""
        started = time.perf_counter()
        peak_server_kib = 0
        for number, bounds in enumerate(pieces):
            params = b'"chunk":"' + piece(bounds) + b'"'
            if context_id:
                params += b',"context_id":' + orjson.dumps(context_id)
            if number == len(pieces) - 1:
                params += b',"final":true'
            request_id = first_id + number
            head = f'{{"jsonrpc":"2.0","id":{request_id},"method":"context/load","params":{{'
            channel.write(head.encode() + params + b"}}\n")
            result = target.response(channel, request_id, timeout=600).get("result")
            if not result:
                raise RuntimeError(f"context/load failed at chunk {number}")
            context_id = result["context_id"]
            peak_server_kib = max(peak_server_kib, status_kib(channel.pid, "VmRSS"))
        if not result or not (result["sealed"] and result["bytes"] == size):
            raise RuntimeError(f"context/load ended unsealed or short: {result}")
        return (
            context_id,
            secret,
            {
                "chunks": len(pieces),
                "chunk_bytes": self.s.chunk_bytes,
                "load_s": time.perf_counter() - started,
                "peak_server_rss_kib_sampled": peak_server_kib,
            },
        )

    def _ask_stored(
        self, target: Target, channel: Channel, context_id: str, request_id: int
    ) -> tuple[Json, float, float]:
        """One question on a stored context: (response, seconds to the model's first call,
        seconds to the answer), both from the moment the request is written."""
        params = {"context_id": context_id, "query": NEEDLE_QUERY}
        sent = time.time()
        started = time.perf_counter()
        channel.write(target.request(request_id, "infer", params))
        response = target.response(channel, request_id, timeout=600)
        answered = time.perf_counter() - started
        arrival = self.fixture.stats()["last_arrival_unix"]
        return response, arrival - sent, answered

    def _ask_prompt(
        self, target: Target, channel: Channel, body: bytes, request_id: int
    ) -> tuple[Json, float, float]:
        """The same question with the context as its prompt (today's path), timed the same."""
        head = (
            (f'{{"jsonrpc":"2.0","id":{request_id},"method":"infer","params":{{"query":').encode()
            + orjson.dumps(NEEDLE_QUERY)
            + b',"prompt":"'
        )
        sent = time.time()
        started = time.perf_counter()
        channel.write(head)
        channel.write(body)
        channel.write(b'"}}\n')
        response = target.response(channel, request_id, timeout=600)
        answered = time.perf_counter() - started
        arrival = self.fixture.stats()["last_arrival_unix"]
        return response, arrival - sent, answered

    def _questions(
        self,
        label: str,
        runs: int,
        secret: str,
        ask: Callable[[int], tuple[Json, float, float]],
        first_id: int,
    ) -> list[Json]:
        """`runs` questions asked one at a time (`ask` takes the request id): when each reached
        the model, when it was answered, and whether the answer was the secret."""
        timed: list[Json] = []
        for run in range(runs):
            response, reach, answer = ask(first_id + run)
            found = response.get("result", {}).get("text") == secret
            timed.append({"reach_s": reach, "answer_s": answer, "found": found})
            self.log(
                f"  {label} {run + 1}: reaches the model in {reach * 1000:.1f} ms, "
                f"answered in {answer * 1000:.1f} ms, found={found}"
            )
        return timed

    def context_reuse(self) -> Json:
        """A question on a loaded context: from the request to the model's first call, against
        the same question with the context as its prompt."""
        size = self.s.context_bytes
        ours = self.t["ours"]
        with spawned(ours) as channel:
            self.fixture.instant()
            self._warm(ours, channel)
            self.fixture.rules([{"when": "root", "reply": repl_reply(*NEEDLE_CODE)}])
            context_id, secret, load = self._load_chunks(ours, channel, size, 1000)
            response, first_reach, first_answer = self._ask_stored(ours, channel, context_id, 10)
            first = {
                "reach_s": first_reach,
                "answer_s": first_answer,
                "found": response.get("result", {}).get("text") == secret,
            }
            self.log(
                f"  first question (its holder reads it): reaches the model in "
                f"{first_reach * 1000:.1f} ms"
            )
            ask_stored = functools.partial(self._ask_stored, ours, channel, context_id)
            stored = self._questions("stored question", self.s.reuse_runs, secret, ask_stored, 20)
            body, secret = make_context(size)
            ask_prompt = functools.partial(self._ask_prompt, ours, channel, body)
            prompt = self._questions("as a prompt", self.s.prompt_runs, secret, ask_prompt, 40)
            del body, ask_prompt
        self.fixture.instant()
        return {
            "context_bytes": size,
            "load": load,
            "first": first,
            "stored": {
                "reach_median_s": statistics.median(r["reach_s"] for r in stored),
                "answer_median_s": statistics.median(r["answer_s"] for r in stored),
                "found": all(r["found"] for r in stored),
                "runs": stored,
            },
            "prompt": {
                "reach_median_s": statistics.median(r["reach_s"] for r in prompt),
                "answer_median_s": statistics.median(r["answer_s"] for r in prompt),
                "found": all(r["found"] for r in prompt),
                "runs": prompt,
            },
        }

    def _concurrent_peak(self, channel: Channel, send: Callable[[], None], n: int) -> Json:
        """Send n questions (the model holds every call), wait until all n are at the model,
        let them go, read the n answers: the tree's peak PSS meanwhile."""
        before = self.fixture.stats()["requests"]
        idle_kib = tree_pss_kib(channel.pid)
        with PssSampler(channel.pid, 0.01) as sampler:
            started = time.perf_counter()
            send()
            deadline = time.monotonic() + 300
            while self.fixture.stats()["requests"] - before < n:
                if time.monotonic() > deadline:
                    raise RuntimeError("the questions did not all reach the model")
                time.sleep(0.02)
            at_model = time.perf_counter() - started
            time.sleep(0.3)  # a few more samples with all n workers alive
            self.fixture.release()
            answers: dict[Any, Json] = {}  # they come in any order
            while len(answers) < n:
                message = channel.read_message(timeout=600)
                if isinstance(message, dict) and "id" in message:
                    answers[message["id"]] = message
        return {
            "peak_kib": sampler.peak_kib,
            "peak_server_kib": sampler.peak_root_kib,
            "peak_children_kib": sampler.peak_children_kib,
            "idle_kib": idle_kib,
            "samples": sampler.samples,
            "all_at_model_s": at_model,
            "answers": list(answers.values()),
        }

    def _stored_concurrent(self, args: list[str]) -> tuple[Json, Json, Json]:
        """A fresh server: the context loaded and asked once, then n questions at once on it;
        (the n questions' peak, the first question's peak, the load)."""
        size, n = self.s.context_bytes, self.s.concurrent_questions
        held = [{"when": "root", "hold": True, "reply": repl_reply(*NEEDLE_CODE)}]
        ours = self.t["ours"]
        with spawned(ours, args) as channel:
            self.fixture.instant()
            self._warm(ours, channel)
            context_id, secret, load = self._load_chunks(ours, channel, size, 1000)
            self.fixture.rules(held)
            first = self._concurrent_peak(
                channel,
                lambda: channel.write(ours.request(500, "infer", {"context_id": context_id})),
                1,
            )
            self.fixture.rules(held)
            params = {"context_id": context_id, "query": NEEDLE_QUERY}
            stored = self._concurrent_peak(
                channel,
                lambda: channel.write(
                    b"".join(ours.request(500 + i, "infer", params) for i in range(n))
                ),
                n,
            )
        stored["found"] = _found(stored.pop("answers"), secret)
        first["found"] = _found(first.pop("answers"), secret)
        self.log(
            f"  stored ({' '.join(args)}): peak {stored['peak_kib'] / 1024:.0f} MiB "
            f"({stored['peak_kib'] * 1024 / size:.2f}x), found={stored['found']}; first "
            f"question alone: {first['peak_kib'] / 1024:.0f} MiB"
        )
        return stored, first, load

    def context_concurrent(self) -> Json:
        """N questions at once on one loaded context: the peak memory of the server's whole
        process tree (PSS), against the same N questions with the context as their prompt; and
        the same without the sandbox, whose keeper and init processes each worker adds."""
        size, n = self.s.context_bytes, self.s.concurrent_questions
        held = [{"when": "root", "hold": True, "reply": repl_reply(*NEEDLE_CODE)}]
        ours = self.t["ours"]
        args = ["--max-concurrency", str(n)]
        stored, first, load = self._stored_concurrent(args)
        unsandboxed, _, _ = self._stored_concurrent([*args, "--sandbox", "off"])
        body, secret = make_context(size)
        head = (
            b'{"jsonrpc":"2.0","id":ID,"method":"infer","params":{"query":'
            + orjson.dumps(NEEDLE_QUERY)
            + b',"prompt":"'
        )

        def send_prompts() -> None:
            for i in range(n):
                channel.write(head.replace(b"ID", str(500 + i).encode()))
                channel.write(body)
                channel.write(b'"}}\n')

        with spawned(ours, args) as channel:
            self.fixture.instant()
            self._warm(ours, channel)
            self.fixture.rules(held)
            prompt = self._concurrent_peak(channel, send_prompts, n)
        prompt["found"] = _found(prompt.pop("answers"), secret)
        self.log(
            f"  as prompts: peak {prompt['peak_kib'] / 1024:.0f} MiB "
            f"({prompt['peak_kib'] * 1024 / size:.2f}x), found={prompt['found']}"
        )
        self.fixture.instant()
        return {
            "context_bytes": size,
            "questions": n,
            "load": load,
            "first": first,
            "stored": stored,
            "stored_sandbox_off": unsandboxed,
            "prompt": prompt,
        }

    def context_2g(self) -> Json:
        """A context bigger than a line may be (2 GiB), loaded in chunks and asked about: the
        needle found, and the server's own peak RSS."""
        size = self.s.big_context_bytes
        ours = self.t["ours"]
        with spawned(ours) as channel:
            self.fixture.instant()
            self._warm(ours, channel)
            self.fixture.rules([{"when": "root", "reply": repl_reply(*NEEDLE_CODE)}])
            with PssSampler(channel.pid, 0.05) as loading:
                context_id, secret, load = self._load_chunks(ours, channel, size, 1000)
            with PssSampler(channel.pid, 0.05) as asking:
                response, reach, answer = self._ask_stored(ours, channel, context_id, 10)
            found = response.get("result", {}).get("text") == secret
            server_hwm_kib = status_kib(channel.pid, "VmHWM")
        self.log(
            f"  {size >> 20} MiB loaded in {load['load_s']:.1f} s; question answered in "
            f"{answer:.2f} s, found={found}; server VmHWM {server_hwm_kib / 1024:.0f} MiB"
        )
        self.fixture.instant()
        return {
            "context_bytes": size,
            "load": load,
            "found": found,
            "answer_s": answer,
            "reach_s": reach,
            "server_hwm_kib": server_hwm_kib,
            "loading_peak_tree_pss_kib": loading.peak_kib,
            "asking_peak_tree_pss_kib": asking.peak_kib,
            "max_message_bytes": 1 << 30,
        }

    # -- line limits ------------------------------------------------------------------------

    def _padded_status(self, target: Target, request_id: int, size: int) -> tuple[bytes, int]:
        """A `status` request of exactly `size` bytes (before the newline): JSON whitespace."""
        head = target.request(request_id, "status").rstrip(b"\n")[:-1]  # drop the closing }
        pad = size - len(head) - 1
        if pad < 0:
            raise ValueError("size too small")
        return head, pad

    def _send_padded(self, channel: Channel, head: bytes, pad: int) -> None:
        chunk = b" " * (1 << 20)
        channel.write(head)
        while pad > 0:
            step = min(pad, len(chunk))
            channel.write(memoryview(chunk)[:step])
            pad -= step
        channel.write(b"}\n")

    def line_ours(self) -> Json:
        """Lines of exactly 1 GiB and 1 GiB + 1 byte (not counting the newline)."""
        ours = self.t["ours"]
        probes = []
        with spawned(ours) as channel:
            ours.wait_ready(channel)
            for request_id, size in ((1, GIB), (2, GIB + 1)):
                head, pad = self._padded_status(ours, request_id, size)
                with RssSampler(channel.pid, 0.02) as sampler:
                    started = time.perf_counter()
                    writer = threading.Thread(target=self._send_padded, args=(channel, head, pad))
                    writer.start()
                    message = channel.read_message(timeout=300)
                    elapsed = time.perf_counter() - started
                    writer.join()
                accepted = message.get("id") == request_id and "result" in message
                error = message.get("error", {})
                refused = (  # the server names the request when the line starts with its id
                    message.get("id") in (None, request_id)
                    and error.get("code") == -32600
                    and error.get("data", {}).get("type") == "line_too_long"
                )
                alive = ours.call(channel, 100 + request_id, "status", timeout=60)
                probes.append(
                    {
                        "bytes": size,
                        "accepted": accepted,
                        "refused_32600": refused,
                        "answer": str(message)[:200] if not accepted else "status result",
                        "alive_after": "result" in alive,
                        "time_s": elapsed,
                        "peak_kib": sampler.peak_kib,
                    }
                )
                outcome = "accepted" if accepted else "refused" if refused else str(message)[:200]
                self.log(
                    f"  ours line of {size} bytes: {outcome} in {elapsed:.2f} s, peak "
                    f"{sampler.peak_kib / 1024:.0f} MiB, alive after: {'result' in alive}"
                )
        largest = max((p["bytes"] for p in probes if p["accepted"]), default=0)
        return {"largest_accepted_bytes": largest, "probes": probes}

    def line_plugin(self) -> Json:
        """Binary search for the longest line the plugin's server answers."""
        plugin = self.t["plugin"]
        next_id = [10]

        def accepts(size: int) -> bool:
            request_id, sync_id = next_id[0], next_id[0] + 1
            next_id[0] += 2
            head, pad = self._padded_status(plugin, request_id, size)
            self._send_padded(channel, head, pad)
            channel.write(plugin.request(sync_id, "status"))
            ok = False
            while True:
                message = channel.read_message(timeout=60)
                if message.get("id") == request_id and "result" in message:
                    ok = True
                if message.get("id") == sync_id:
                    return ok

        with spawned(plugin) as channel:
            plugin.wait_ready(channel)
            low, high = 1024, 1 << 20  # accepted, refused
            if not accepts(low) or accepts(high):
                raise RuntimeError("plugin line limit is outside 1 KiB .. 1 MiB")
            while high - low > 1:
                middle = (low + high) // 2
                if accepts(middle):
                    low = middle
                else:
                    high = middle
            alive = "result" in plugin.call(channel, 99999, "status")
        self.log(f"  plugin largest line: {low} bytes (alive after: {alive})")
        return {"largest_accepted_bytes": low, "alive_after": alive}
