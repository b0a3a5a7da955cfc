"""The Ray executor (--executor ray) on Ray's own multi-node test cluster: a head with no CPUs
and worker nodes on this machine, over loopback. The server is a real subprocess, connected to
the cluster as its driver; the model is the scripted fixture; every model call comes back to the
server's broker. One cluster serves the whole module (Ray's head processes are heavy).

.ci/run installs Ray (`rlm-server[ray]`) so these always run there; elsewhere, without Ray, the
module is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import (
    ServerProcess,
    alive,
    answer_with,
    clean_env,
    cmdline_of,
    descendants,
    fixture_env,
    parent_of,
    repl,
    server_command,
    wait_until,
)

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'rlm-server[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

LOOK_EVERY_S = 1.0  # how often, at most, a server reads the cluster's node list (executor.py)
NODE_CPUS = 8  # a label for Ray's scheduler; the workers share this machine's cores
Json = dict[str, Any]


class RayCluster:
    """The module's cluster and the node objects of its worker nodes. Its processes get a
    TMPDIR of their own (Ray's session directory and the node agents' directories go there),
    so that what they leave behind can be seen."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="rlmray-", dir="/tmp"))  # short: socket paths
        with self._own_tmpdir():
            self.cluster = cluster_utils.Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": 0, "object_store_memory": 80 << 20},
            )
        self.nodes = [self.add() for _ in range(2)]

    @contextlib.contextmanager
    def _own_tmpdir(self) -> Iterator[None]:
        """Ray's processes take their environment from ours as they start."""
        before = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(self.tmp)
        try:
            yield
        finally:
            if before is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = before

    def add(self) -> Any:
        with self._own_tmpdir():
            node = self.cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=80 << 20)
        self.cluster.wait_for_nodes()
        return node

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def session_dir(self) -> str:
        return str(self.cluster.head_node.get_session_dir_path())

    def agent_dirs(self) -> list[Path]:
        """The node agents' private directories (their zygotes' and workers')."""
        return sorted(self.tmp.glob("rlm-server-*"))

    def remove(self, node_id: str) -> None:
        node = next(n for n in self.nodes if n.node_id == node_id)
        self.nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    made = RayCluster()
    yield made
    made.cluster.shutdown()
    shutil.rmtree(made.tmp, ignore_errors=True)


def _ray_server(
    spawn: Spawn, cluster: RayCluster, rules: list[Json], *args: str, **env: str
) -> ServerProcess:
    server = spawn(
        rules,
        env=env,
        args=["--executor", "ray", "--ray-address", cluster.address, *args],
    )
    assert server.ready(timeout=60)["available"]
    return server


def _nodes(server: ServerProcess) -> list[Json]:
    nodes: list[Json] = server.call("status")["result"]["executor"]["nodes"]
    return nodes


def _remote_zygotes(server: ServerProcess) -> set[int]:
    """The node agents' zygotes: below the cluster's processes (children of this test process),
    not below the server. Their holders, keepers and workers share their command line, so:
    those whose parent is not one."""
    cluster = descendants(os.getpid()) - descendants(server.process.pid)
    found = {
        pid for pid in alive(cluster) if b"rlm_server.executors.local.zygote" in cmdline_of(pid)
    }
    return {pid for pid in found if parent_of(pid) not in found}


def _remote_workers(server: ServerProcess) -> set[int]:
    return {pid for zygote in _remote_zygotes(server) for pid in alive(descendants(zygote))}


def test_executor_ray_without_an_address_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [*server_command(), "--executor", "ray"],
        env=clean_env(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "rlm-server: configuration error: --executor ray needs --ray-address or RAY_ADDRESS"
    ]


def test_ray_local_runs_here_when_the_cluster_cannot_be_reached(
    spawn: Spawn, llm: FixtureServer
) -> None:
    """...and, having never connected, it starts no Ray cluster of its own at exit either (Ray
    would start one from the server's environment, its key included, on any call)."""
    key = "sk-fallback-" + secrets.token_hex(8)
    server = spawn(
        [{"when": "root", "reply": answer_with("'ran here'")}],
        env={"OPENAI_API_KEY": key},
        args=["--executor", "ray,local", "--ray-address", "127.0.0.1:1"],  # nothing listens
    )
    server.ready()
    response = server.call("infer", {"prompt": "x"})
    assert response["result"]["text"] == "ran here", response
    assert server.call("status")["result"]["executor"] == {"kind": "local", "nodes": []}
    assert server.close() == 0
    holders = [
        pid
        for pid in alive(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
        if key.encode() in _environ_of(pid)
    ]
    assert holders == [], [cmdline_of(pid)[:100] for pid in holders]


def _environ_of(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


HELD = {"when": "root", "hold": True, "reply": answer_with("'held'")}


def test_requests_spread_over_both_nodes_and_the_needle_is_found(
    spawn: Spawn, llm: FixtureServer, cluster: RayCluster
) -> None:
    server = _ray_server(spawn, cluster, [HELD])
    for i in range(2):
        server.request(i, "infer", {"prompt": f"request {i}"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 2, timeout=120)
    nodes = _nodes(server)
    assert sorted(n["in_flight"] for n in nodes) == [1, 1], nodes
    assert all(n["slots"] == NODE_CPUS and n["protections"] for n in nodes), nodes
    llm.script.released.set()
    assert {i: r["result"]["text"] for i, r in server.responses_by_id(2).items()} == {
        0: "held",
        1: "held",
    }

    llm.script.replace(
        [{"when": "root", "reply": answer_with("context[context.index('NEEDLE'):][:11]")}]
    )
    haystack = "hay " * 200_000 + "NEEDLE=4711 " + "hay " * 200_000
    response = server.call("infer", {"prompt": haystack, "query": "find the needle"})
    assert response["result"]["text"] == "NEEDLE=4711", response
    assert response["result"]["usage"]["calls"] == 1
    assert len(cluster.agent_dirs()) == 2  # one agent per node, each with its directory
    assert server.close() == 0
    assert cluster.agent_dirs() == [], "the node agents left their directories behind"


def test_cancel_and_deadline_kill_the_remote_worker(
    spawn: Spawn, llm: FixtureServer, cluster: RayCluster
) -> None:
    server = _ray_server(spawn, cluster, [HELD])
    server.request("cancelled", "infer", {"prompt": "x"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=120)
    assert _remote_workers(server), "no worker under a node agent's zygote"
    server.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": "cancelled"}})
    response = server.next_response()
    assert response["error"]["data"]["type"] == "cancelled", response
    assert wait_until(lambda: not _remote_workers(server), timeout=30), "the worker outlived it"

    server.request("late", "infer", {"prompt": "x", "options": {"timeout_s": 3}})
    assert wait_until(lambda: _remote_workers(server), timeout=60)
    response = server.next_response(timeout=60)
    assert response["error"]["data"]["type"] == "deadline_exceeded", response
    assert wait_until(lambda: not _remote_workers(server), timeout=30), "the worker outlived it"
    assert all(n["in_flight"] == 0 for n in _nodes(server))
    llm.script.released.set()
    assert server.close() == 0


def test_sixteen_concurrent_requests_are_all_answered(
    spawn: Spawn, llm: FixtureServer, cluster: RayCluster
) -> None:
    server = _ray_server(spawn, cluster, [HELD], "--max-concurrency", "16")
    for i in range(16):
        server.request(i, "infer", {"prompt": f"request {i}"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 16, timeout=180)
    assert sorted(n["in_flight"] for n in _nodes(server)) == [8, 8]
    llm.script.released.set()
    assert len(server.responses_by_id(16, timeout=120)) == 16
    assert server.close() == 0


def test_a_host_tool_call_from_a_node_reaches_the_client(
    spawn: Spawn, llm: FixtureServer, cluster: RayCluster
) -> None:
    code = repl("answer['content'] = lookup(key='alpha')['owner']", "answer['ready'] = True")
    server = _ray_server(spawn, cluster, [{"when": "root", "reply": code}])
    lookup = {
        "name": "lookup",
        "description": "Look a record up by its key.",
        "input_schema": {"type": "object", "properties": {"key": {"type": "string"}}},
    }
    server.request(7, "infer", {"prompt": "ctx", "tools": [lookup]})
    call = server.next_message(timeout=60)
    assert isinstance(call, dict) and call.get("method") == "tool/call", call
    assert call["params"]["arguments"] == {"key": "alpha"}
    server.send({"jsonrpc": "2.0", "id": call["id"], "result": {"owner": "ada"}})
    response = server.next_response(timeout=60)
    assert response["result"]["text"] == "ada", response
    assert server.close() == 0


def test_a_stored_context_is_read_once_per_node(
    spawn: Spawn, llm: FixtureServer, cluster: RayCluster
) -> None:
    server = _ray_server(
        spawn,
        cluster,
        [{"when": "root", "reply": answer_with("context[context.index('KEY'):][:8]")}],
        "--ray-node-slots",
        "1",
    )
    text = "x" * 1_000_000 + "KEY=0042" + "y" * 1_000_000
    context_id = server.call("context/load", {"text": text})["result"]["context_id"]
    for i in range(3):  # one after another: the node that holds it is preferred
        response = server.call("infer", {"context_id": context_id, "query": "key?"}, i)
        assert response["result"]["text"] == "KEY=0042", response
    assert sorted(n["contexts_read"] for n in _nodes(server)) == [0, 1]

    llm.script.replace([HELD])  # two at once: one slot each, so the other node reads it too
    for i in range(2):
        server.request(i, "infer", {"context_id": context_id, "query": "key?"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 2, timeout=120)
    llm.script.released.set()
    assert len(server.responses_by_id(2)) == 2
    assert sorted(n["contexts_read"] for n in _nodes(server)) == [1, 1]
    assert server.close() == 0


def _hunt(needles: list[str], control: str, address: str, session_dir: str) -> str:
    """Model code that looks for each needle (given reversed, so the code that travels through
    Ray does not hold them) everywhere a process on a node can look: its environment, the
    environment, command line, open files (the object store's shared memory among them) of
    every process of the cluster and what they started, the node agents' memory, Ray's session
    files, and the cluster's own key-value store and job table through the Ray API. Processes
    that are not the cluster's (the server, pytest, anything else on this shared machine) are
    the server's machine on a real cluster, and are left out."""
    return repl(
        "import glob, json, os, re",
        f"needles = [n[::-1] for n in {[n[::-1] for n in needles]!r}]",
        f"needles.append({control[::-1]!r}[::-1])",
        "found = {n: [] for n in needles}",
        "def look(place, data):",
        "    if isinstance(data, str):",
        "        data = data.encode(errors='replace')",
        "    for n in needles:",
        "        if n.encode() in data:",
        "            found[n].append(place)",
        "def read(path, limit=1 << 28):",
        "    try:",
        "        with open(path, 'rb') as f:",
        "            return f.read(limit)",
        "    except (OSError, ValueError):",
        "        return b''",
        "look('environment', repr(dict(os.environ)))",
        "RAY = (b'raylet', b'gcs_server', b'ray::', b'ray/_private', b'ray/dashboard')",
        "children = {}",
        "for pid in (p for p in os.listdir('/proc') if p.isdigit()):",
        "    stat = read(f'/proc/{pid}/stat').rsplit(b')', 1)[-1].split()",
        "    if len(stat) > 1:",
        "        children.setdefault(stat[1].decode(), []).append(pid)",
        "pending = [p for ps in children.values() for p in ps",
        "           if any(r in read(f'/proc/{p}/cmdline') for r in RAY)]",
        "pids = set()",  # the cluster's processes and all they started: this 'node'
        "while pending:",
        "    pid = pending.pop()",
        "    if pid not in pids:",
        "        pids.add(pid)",
        "        pending += children.get(pid, [])",
        "found['processes'] = [len(pids)]",
        "seen = set()",
        "for pid in pids:",
        "    look(f'/proc/{pid}/environ', read(f'/proc/{pid}/environ'))",
        "    look(f'/proc/{pid}/cmdline', read(f'/proc/{pid}/cmdline'))",
        "    for fd in glob.glob(f'/proc/{pid}/fd/*'):",
        "        try:",
        "            st = os.stat(fd)",
        "        except OSError:",
        "            continue",
        "        if (st.st_dev, st.st_ino) in seen or not (st.st_mode & 0o100000):",
        "            continue",
        "        seen.add((st.st_dev, st.st_ino))",
        "        look(f'open file of {pid}', read(fd))",  # the object store's shared memory too
        "    if b'NodeAgent' in read(f'/proc/{pid}/cmdline'):",
        "        try:",
        "            mem = open(f'/proc/{pid}/mem', 'rb')",
        "            for line in open(f'/proc/{pid}/maps'):",
        "                span, perms = line.split()[:2]",
        "                if not perms.startswith('r') or '[v' in line:",
        "                    continue",
        "                start, end = (int(x, 16) for x in span.split('-'))",
        "                if end - start > 1 << 30:",
        "                    continue",
        "                try:",
        "                    mem.seek(start)",
        "                    look(f'memory of the node agent {pid}', mem.read(end - start))",
        "                except (OSError, ValueError, OverflowError):",
        "                    pass",
        "        except OSError:",
        "            pass",
        "files = [p for p in glob.glob(" + repr(session_dir) + " + '/**', recursive=True)",
        "         if os.path.isfile(p)]",
        "for path in files:",
        "    look(path, read(path))",
        "found['session_files'] = [len(files)]",
        "try:",
        "    import ray",
        "    from ray.experimental import internal_kv",
        f"    ray.init(address={address!r}, log_to_driver=False)",
        "    for space in (None, 'session', 'fun', 'job', 'cluster', 'runtime_env'):",
        "        for key in internal_kv._internal_kv_list('', namespace=space):",
        "            value = internal_kv._internal_kv_get(key, namespace=space)",
        "            look(f'GCS {space}', value or b'')",
        "    look('Ray jobs', repr(ray._private.state.state.job_table()))",
        "    look('Ray nodes', repr(ray.nodes()))",
        "    ray.shutdown()",
        "    found['ray_api'] = ['reached']",
        "except Exception as error:",
        "    found['ray_api'] = ['unreachable: ' + type(error).__name__]",
        "answer['content'] = json.dumps(found)",
        "answer['ready'] = True",
    )


def test_model_code_on_a_node_finds_no_key(
    spawn: Spawn, llm: FixtureServer, cluster: RayCluster
) -> None:
    key = "sk-ray-hunt-" + secrets.token_hex(8)
    control = "CONTROL-" + secrets.token_hex(8)  # the prompt: the hunt must find this one
    env = fixture_env(llm.base_url, OPENAI_API_KEY=key, ELIZA_RLM_MAX_RETRIES="0")
    needles = [key, llm.base_url, "ELIZA_RLM_BACKEND="]
    hunt = _hunt(needles, control, cluster.address, cluster.session_dir)
    llm.script.replace([{"when": "root", "reply": hunt}])
    server = ServerProcess(
        env, ["--executor", "ray", "--ray-address", cluster.address, "--sandbox", "off"]
    )
    try:
        server.ready(timeout=60)
        response = server.call("infer", {"prompt": control, "query": "hunt"})
        found = json.loads(response["result"]["text"])
        assert found[control], f"the hunt cannot even find the prompt: {found}"
        assert found["ray_api"] == ["reached"], found
        assert found["processes"][0] >= 10, found  # raylets, GCS, agents, zygotes, workers
        assert found["session_files"][0] >= 10, found  # Ray's logs among them
        assert {n: found[n] for n in needles} == {n: [] for n in needles}
        assert server.close() == 0
    finally:
        server.kill()


def test_a_node_lost_mid_request_fails_only_that_request(
    spawn: Spawn, llm: FixtureServer, cluster: RayCluster
) -> None:
    """Last in the module: it removes a node (and adds one back)."""
    asks_sub = repl("answer['content'] = llm_query('SUB-HELD')", "answer['ready'] = True")
    server = _ray_server(
        spawn,
        cluster,
        [
            {"when": "root", "reply": asks_sub},
            {"when": "sub", "hold": True, "reply": "never"},
        ],
    )
    server.request("lost", "infer", {"prompt": "x"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=120)
    busy = [n for n in _nodes(server) if n["in_flight"] == 1]
    assert len(busy) == 1
    working = [z for z in _remote_zygotes(server) if alive(descendants(z))]
    assert len(working) == 1, working  # the busy node's: the other has no worker
    lost = {working[0], *descendants(working[0])}
    cluster.remove(busy[0]["node_id"])
    response = server.next_response(timeout=60)
    assert response["error"]["data"]["type"] == "worker_crashed", response
    assert response["error"]["data"]["usage"]["calls"] == 1, response  # the root call

    llm.script.replace([{"when": "root", "reply": answer_with("'still here'")}])
    for i in range(3):
        assert server.call("infer", {"prompt": "x"}, i)["result"]["text"] == "still here"
    assert [n["node_id"] for n in _nodes(server)] != [busy[0]["node_id"]]
    assert len(_nodes(server)) == 1
    assert wait_until(lambda: not alive(lost), timeout=30), "the lost node left processes"

    cluster.nodes.append(cluster.add())  # a node comes (back): it gets an agent

    def back() -> bool:  # a job looks at the cluster (at most once a second)
        assert server.call("infer", {"prompt": "x"})["result"]["text"] == "still here"
        return len(_nodes(server)) == 2

    assert wait_until(back, timeout=60, interval=0.5)
    assert len(cluster.agent_dirs()) == 2, "the lost agent's directory is still there"
    llm.script.released.set()
    assert server.close() == 0


def test_ray_local_runs_here_when_the_cluster_has_no_node_left(
    spawn: Spawn, llm: FixtureServer, cluster: RayCluster
) -> None:
    """Last: it removes every worker node. A job not yet started anywhere runs locally with
    `ray,local`; with `ray` it fails `worker_crashed`."""
    rules = [{"when": "root", "reply": answer_with("'somewhere'")}]
    args = ["--ray-address", cluster.address]
    fallback = spawn(rules, args=["--executor", "ray,local", *args])
    strict = spawn(rules, args=["--executor", "ray", *args])
    for server in (fallback, strict):
        server.ready(timeout=60)
        assert server.call("infer", {"prompt": "x"})["result"]["text"] == "somewhere"
    for node in list(cluster.nodes):
        cluster.remove(node.node_id)
    cluster.cluster.wait_for_nodes()  # until the cluster itself counts them gone
    time.sleep(LOOK_EVERY_S)  # the servers look at the cluster again at their next job

    response = fallback.call("infer", {"prompt": "x"})
    assert response["result"]["text"] == "somewhere", response
    assert _nodes(fallback) == []
    response = strict.call("infer", {"prompt": "x"})
    assert response["error"]["data"]["type"] == "worker_crashed", response
    assert response["error"]["data"]["reason"] == "no Ray node is available"
    for server in (fallback, strict):
        assert server.close() == 0
