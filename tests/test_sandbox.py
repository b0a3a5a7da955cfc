"""The sandbox: model code, scripted through the real library and the fixture, tries what a
hostile sentence in its context could steer it to. Each attempt fails or is contained; a
neighbouring request finishes normally; the server answers `status`; nothing is left on disk
or in the process table.

Each check needs one protection; where this machine lacks it (`status.protections`), that
check is skipped with the reason. .ci/run runs this file as root and as an unprivileged user.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer, Rule
from harness import (
    ServerProcess,
    alive,
    answer_with,
    cmdline_of,
    descendants,
    fixture_env,
    repl,
    wait_until,
    zygote_of,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox's protections are Linux's"
)

Report = dict[str, list[str]]
NEIGHBOUR = repl("answer['content'] = llm_query('NEIGHBOUR-SUB')", "answer['ready'] = True")
HELD = {"when": "sub", "contains": "NEIGHBOUR-SUB", "hold": True, "reply": "neighbour-ok"}
DISK_MB = 16  # the attacked server's --worker-disk-mb


def _attack(targets: dict[str, int], port: int, secret: Path, mark: str, unix: Path) -> str:
    """Model code that tries everything at once and reports, for each attempt, `done` with
    what it got or `refused` with the exception's name."""
    return repl(
        "import ctypes, json, os, signal, socket, subprocess, tempfile, time",
        f"DISK_MB = {DISK_MB}",
        "report = {}",
        "def attempt(name, action):",
        "    try:",
        "        report[name] = ['done', repr(action())[:200]]",
        "    except BaseException as error:",
        "        report[name] = ['refused', type(error).__name__]",
        "def kill(pid):",
        "    os.kill(pid, signal.SIGKILL)",
        "def connect(address):",
        "    with socket.create_connection(address, timeout=2):",
        "        return 'connected'",
        "def write(path):",
        "    with open(path, 'w') as f:",
        "        return f.write('escaped')",
        "def forks(bound):",
        "    made = 0",
        "    try:",
        "        for _ in range(bound):",
        "            if os.fork() == 0:",
        "                time.sleep(60)",
        "                os._exit(0)",
        "            made += 1",
        "    except OSError:",
        "        pass",
        "    return made",
        "def unix_connect(path):",
        "    with socket.socket(socket.AF_UNIX) as sock:",
        "        sock.connect(path)",
        "        return 'connected'",
        "def datagram_pair():",
        "    for end in socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM):",
        "        end.close()",
        "def stream_pair():",
        "    for end in socket.socketpair():",
        "        end.close()",
        "    return 'made'",
        "def shared_segment():",
        "    if ctypes.CDLL(None, use_errno=True).shmget(0, 1 << 20, 0o1600) == -1:",
        "        raise PermissionError('shmget refused')",
        "def io_uring():",  # its operations connect sockets out of seccomp's sight
        "    params = ctypes.create_string_buffer(120)",
        "    fd = ctypes.CDLL(None, use_errno=True).syscall(425, 8, params)",
        "    if fd == -1:",
        "        raise PermissionError('io_uring_setup refused')",
        "    return fd",
        "def fill(megabytes):",
        "    written = 0",
        "    try:",
        "        for i in range(megabytes):",
        "            with open(f'fill-{i}', 'wb') as f:",
        "                f.write(b'x' * (1 << 20))",
        "            written += 1",
        "    except OSError:",
        "        pass",
        "    return written",
        "def trap():",
        "    os.makedirs('trap/inner')",
        "    with open('trap/inner/kept', 'w') as f:",
        "        f.write('x' * 1000)",
        "    os.chmod('trap/inner', 0)",
        "    os.chmod('trap', 0)",
        "def keep_death_signal():",
        "    if ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0) != 0:",
        "        raise PermissionError('prctl refused')",
        "attempt('environment', lambda: sorted(os.environ))",
        "attempt('list_proc', lambda: os.listdir('/proc'))",
        f"attempt('server_environ', lambda: open('/proc/{targets['server']}/environ').read())",
        f"attempt('sibling_memory', lambda: open('/proc/{targets['sibling']}/mem', 'rb').read(1))",
        f"attempt('read_secret', lambda: open({str(secret)!r}).read())",
        f"attempt('tcp_fixture', lambda: connect(('127.0.0.1', {port})))",
        "attempt('tcp_outside', lambda: connect(('192.0.2.1', 80)))",
        *(f"attempt('kill_{name}', lambda: kill({pid}))" for name, pid in targets.items()),
        "attempt('kill_parent', lambda: kill(os.getppid()))",
        "attempt('kill_everything', lambda: kill(-1))",
        f"attempt('write_tmp', lambda: write('/tmp/rlm-sandbox-escape-{mark}'))",
        "beside = os.path.join(os.path.dirname(os.environ['TMPDIR']), 'x')",  # the server's root
        "attempt('write_beside', lambda: write(beside))",
        "attempt('write_cwd', lambda: write('mine.txt'))",
        "attempt('write_tempfile', lambda: tempfile.mkstemp()[1])",
        f"attempt('sleeper', lambda: subprocess.Popen(['sleep', '{mark}'],"
        " start_new_session=True).pid)",
        "attempt('forks', lambda: forks(1000))",
        "attempt('death_signal', keep_death_signal)",
        f"attempt('unix_socket', lambda: unix_connect({str(unix)!r}))",
        "attempt('unix_datagram_pair', datagram_pair)",
        "attempt('unix_stream_pair', stream_pair)",
        "attempt('io_uring', io_uring)",
        "attempt('uid', os.getuid)",
        "attempt('memfd', lambda: os.memfd_create('hoard'))",
        "attempt('shm_segment', shared_segment)",
        "attempt('trap', trap)",
        "attempt('fill_disk', lambda: fill(4 * DISK_MB))",
        "attempt('forge_log', lambda: os.write(2, b'\\nFORGED-LOG-LINE all went well\\n'))",
        "attempt('flood_log', lambda: os.write(1, b'FLOOD' * 60000))",
        "attempt('truncate_log', lambda: os.ftruncate(2, 0))",
        "answer['content'] = json.dumps(report)",
        "answer['ready'] = True",
    )


class Attacked:
    """One server, one neighbour held mid-request, one attack; what each side saw."""

    def __init__(
        self, server: ServerProcess, report: Report, protections: list[str], sibling_uid: int
    ) -> None:
        self.server = server
        self.report = report
        self.protections = protections
        self.sibling_uid = sibling_uid  # the neighbour's worker, as the host sees it

    def need(self, protection: str) -> None:
        if protection not in self.protections:
            pytest.skip(f"this machine lacks the {protection} protection (status.protections)")

    def refused(self, name: str) -> None:
        outcome = self.report[name]
        assert outcome[0] == "refused", f"{name}: {outcome}"


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    llm = FixtureServer()
    llm.start_in_thread()
    root = tmp_path_factory.mktemp("sandbox")
    (root / "tmp").mkdir()
    secret = root / "secret.env"
    secret.write_text("OPENAI_API_KEY=sk-never-for-model-code\n")
    secret.chmod(0o600)
    mark = f"{400 + os.getpid() % 1000}.25"
    environment = {
        "TMPDIR": str(root / "tmp"),
        "ELIZA_RLM_WORKER_DISK_MB": str(DISK_MB),
        "ELIZA_RLM_VERBOSE": "true",  # the worker's output is logged at info
    }
    try:
        with _listening_socket() as unix, _server(llm, environment) as server:
            yield _run_attack(server, llm, secret, mark, unix)
        assert list((root / "tmp").iterdir()) == [], "the server left files behind"
        assert not Path(f"/tmp/rlm-sandbox-escape-{mark}").exists()
    finally:
        Path(f"/tmp/rlm-sandbox-escape-{mark}").unlink(missing_ok=True)
        llm.shutdown()
        llm.server_close()


@contextlib.contextmanager
def _listening_socket() -> Iterator[Path]:
    """A socket file of the server's user, mode 0600, listening where model code can name it
    (/dev/shm: not the /tmp that a disk limit hides), as the docker or session-bus socket
    would be."""
    path = Path(f"/dev/shm/rlm-sandbox-{os.getpid()}.sock")
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        path.chmod(0o600)
        listener.listen(8)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


class _server:
    def __init__(self, llm: FixtureServer, env: dict[str, str]) -> None:
        self.process = ServerProcess(fixture_env(llm.base_url, **env))

    def __enter__(self) -> ServerProcess:
        return self.process

    def __exit__(self, *exc: object) -> None:
        self.process.kill()


def _run_attack(
    server: ServerProcess, llm: FixtureServer, secret: Path, mark: str, unix: Path
) -> Attacked:
    protections = server.ready()["protections"]
    llm.script.replace([{"when": "root", "reply": answer_with("'warm'")}])
    assert server.call("infer", {"prompt": "x"})["result"]["text"] == "warm"
    zygote = _zygote(server)
    llm.script.replace([{"when": "root", "contains": "NEIGHBOUR-Q", "reply": NEIGHBOUR}, HELD])
    server.request("neighbour", "infer", {"prompt": "x", "query": "NEIGHBOUR-Q"})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=30)
    sibling = max(descendants(zygote))  # the neighbour's job: the newest process under it
    targets = {"server": server.process.pid, "zygote": zygote, "sibling": sibling}
    sibling_uid = _uid_of(sibling)
    attack = _attack(targets, llm.port, secret, mark, unix)
    with llm.script.lock:  # not replace(): that would forget the neighbour's held call
        llm.script.rules = [Rule.from_json({"when": "root", "reply": attack}), Rule.from_json(HELD)]
    response = server.call("infer", {"prompt": "x", "query": "ATTACK-Q"})
    report: Report = json.loads(response["result"]["text"])
    assert server.call("status")["result"]["in_flight"] == 1  # the neighbour, still running
    llm.script.released.set()
    assert server.next_response()["result"]["text"] == "neighbour-ok"
    assert _zygote(server) == zygote, "the zygote was replaced: something killed it"
    assert wait_until(lambda: not alive(descendants(zygote)), timeout=15), "workers outlived it"
    assert wait_until(lambda: not _running(["sleep", mark])), "model code's sleeper outlived it"
    assert server.close() == 0
    return Attacked(server, report, protections, sibling_uid)


def _uid_of(pid: int) -> int:
    """The real uid of a process as the host sees it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _zygote(server: ServerProcess) -> int:
    return zygote_of(server.process.pid)


def _running(argv: list[str]) -> list[int]:
    wanted = "\0".join(argv).encode() + b"\0"
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if cmdline_of(pid) == wanted]


# -- what the attack found -------------------------------------------------------------------


def test_its_environment_holds_no_key_and_no_setting(attacked: Attacked) -> None:
    names = json.loads(attacked.report["environment"][1].replace("'", '"'))
    assert not [n for n in names if "KEY" in n or n.startswith("ELIZA_RLM_")], names


def test_it_reads_no_proc_and_no_file_outside_the_interpreter(attacked: Attacked) -> None:
    attacked.need("landlock_filesystem")
    for name in ("list_proc", "server_environ", "sibling_memory", "read_secret"):
        attacked.refused(name)


def test_it_has_no_network(attacked: Attacked) -> None:
    attacked.need("network_namespace")
    attacked.refused("tcp_fixture")
    attacked.refused("tcp_outside")


def test_it_can_signal_nothing_outside_its_request(attacked: Attacked) -> None:
    attacked.need("pid_namespace")
    for name in ("kill_server", "kill_zygote", "kill_sibling"):
        attacked.refused(name)
    # its parent is its namespace's init, which ignores it; kill(-1) reaches only its own
    # children: the report arriving at all shows the request survived both


def test_it_writes_only_its_own_directory(attacked: Attacked) -> None:
    assert attacked.report["write_cwd"][0] == "done"
    assert attacked.report["write_tempfile"][0] == "done"
    attacked.need("landlock_filesystem")
    if "disk_limit" in attacked.protections:  # /tmp is its own tmpfs: the host's is untouched
        assert attacked.report["write_tmp"][0] == "done"
    else:
        attacked.refused("write_tmp")
    attacked.refused("write_beside")


def test_its_processes_are_bounded(attacked: Attacked) -> None:
    attacked.need("process_limit")
    made = int(attacked.report["forks"][1])
    assert made < 300, f"{made} forks were allowed"


def test_it_cannot_unbind_itself_from_its_request(attacked: Attacked) -> None:
    attacked.need("seccomp")
    attacked.refused("death_signal")


def test_it_reaches_no_socket_file_of_the_host(attacked: Attacked) -> None:
    attacked.need("no_unix_sockets")
    attacked.refused("unix_socket")
    attacked.refused("unix_datagram_pair")  # a datagram socket could connect again by path
    attacked.refused("io_uring")
    assert attacked.report["unix_stream_pair"] == ["done", "'made'"]  # the library needs them


def test_a_root_server_runs_it_as_nobody(attacked: Attacked) -> None:
    attacked.need("unprivileged_uid")
    assert attacked.report["uid"] == ["done", "65534"]
    assert attacked.sibling_uid == 65534  # what the host, and any socket's peer, sees
    assert attacked.sibling_uid != os.geteuid()  # the server's (the probe tries this as root only)


def test_it_holds_no_memory_outside_its_limit(attacked: Attacked) -> None:
    attacked.need("no_shared_memory")
    attacked.refused("memfd")
    attacked.refused("shm_segment")


def test_its_files_together_are_bounded(attacked: Attacked) -> None:
    attacked.need("disk_limit")
    written = int(attacked.report["fill_disk"][1])
    assert written < DISK_MB, f"{written} MiB written with a {DISK_MB} MiB limit"
    assert attacked.report["trap"][0] == "done"  # and the fixture found nothing left behind


def test_its_output_reaches_the_log_only_prefixed_and_bounded(attacked: Attacked) -> None:
    attacked.refused("truncate_log")  # a pipe, not the server's stderr
    lines = attacked.server.stderr_lines
    forged = [line for line in lines if "FORGED-LOG-LINE" in line]
    assert forged, "the worker's output did not reach the log"
    assert all(" INFO rlm_server.executors.local.pool: worker of request " in f for f in forged)
    flood = sum(len(line) for line in lines if "FLOODFLOOD" in line)
    assert 0 < flood < 80_000, f"{flood} characters of one worker's output logged"
    assert any("more bytes of output not logged" in line for line in lines)


# -- the zygote, the levels ----------------------------------------------------------------


def test_a_zygote_killed_mid_request_fails_only_those_requests(
    spawn: Spawn, llm: FixtureServer
) -> None:
    server = spawn(
        [
            {"when": "root", "contains": "HELD", "reply": NEIGHBOUR},
            {"when": "sub", "hold": True, "reply": "never"},
            {"when": "root", "reply": answer_with("'fresh'")},
        ]
    )
    server.ready()
    server.request("held", "infer", {"prompt": "x", "query": "HELD"})
    assert wait_until(lambda: llm.script.stats()["by_kind"]["sub"] == 1, timeout=30)
    os.kill(_zygote(server), signal.SIGKILL)
    crashed = server.next_response()
    assert crashed["id"] == "held"
    assert crashed["error"]["data"]["type"] == "worker_crashed", crashed
    assert server.call("infer", {"prompt": "x"})["result"]["text"] == "fresh"
    llm.script.released.set()
    assert server.close() == 0


def test_off_applies_nothing_but_a_private_directory_and_output(spawn: Spawn) -> None:
    server = spawn(args=["--sandbox", "off"])
    assert server.ready()["protections"] == ["private_tmp", "private_output"]
    assert server.call("status")["result"]["sandbox"] == "off"
    assert server.close() == 0


TRAP = repl(
    "import os",
    "os.makedirs('trap/inner')",
    "with open('trap/inner/kept', 'w') as f:",
    "    f.write('x' * 100000)",
    "os.chmod('trap/inner', 0)",
    "os.chmod('trap', 0)",
    "answer['content'] = 'trapped'",
    "answer['ready'] = True",
)


def test_nothing_is_left_on_disk_whatever_modes_model_code_set(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Without a disk limit (here `--sandbox off`) its directory is on the host's disk:
    directories it made unreadable are made ours again, then removed."""
    (tmp_path / "tmp").mkdir()
    server = spawn(
        [{"when": "root", "reply": TRAP}],
        env={"TMPDIR": str(tmp_path / "tmp")},
        args=["--sandbox", "off"],
    )
    assert server.call("infer", {"prompt": "x"})["result"]["text"] == "trapped"
    (root,) = (tmp_path / "tmp").iterdir()  # the server's private directory
    assert list(root.iterdir()) == [], "a worker's directory was left behind"
    assert server.close() == 0
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not [line for line in server.stderr_lines if "could not remove" in line]


SECCOMP_NO_UNSHARE = """
import ctypes, os, platform, struct, sys
arch, unshare = {"x86_64": (0xC000003E, 272), "aarch64": (0xC00000B7, 97)}[platform.machine()]
program = [(0x20, 0, 0, 4), (0x15, 1, 0, arch), (0x06, 0, 0, 0x7FFF0000), (0x20, 0, 0, 0),
           (0x15, 0, 1, unshare), (0x06, 0, 0, 0x00050001), (0x06, 0, 0, 0x7FFF0000)]
code = b"".join(struct.pack("HBBI", *i) for i in program)
buf = ctypes.create_string_buffer(code, len(code))
prog = ctypes.create_string_buffer(struct.pack("@HP", len(program), ctypes.addressof(buf)))
libc = ctypes.CDLL(None, use_errno=True)
address = ctypes.c_ulong(ctypes.addressof(prog))
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, address, 0, 0) == 0
os.execv(sys.executable, [sys.executable, "-m", "rlm_server", *sys.argv[1:]])
"""


def _without_namespaces(level: str) -> subprocess.CompletedProcess[str]:
    """The server on a machine whose kernel refuses new namespaces (a seccomp rule makes
    `unshare` fail with EPERM for it and its children)."""
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip(f"the test's seccomp rule knows x86_64 and aarch64, not {platform.machine()}")
    return subprocess.run(
        [sys.executable, "-c", SECCOMP_NO_UNSHARE, "--sandbox", level],
        input='{"jsonrpc":"2.0","id":1,"method":"status"}\n',
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_strict_refuses_to_start_without_a_protection() -> None:
    finished = _without_namespaces("strict")
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sandbox strict" in lines[0], lines
    assert "user_namespace" in lines[0] and "network_namespace" in lines[0]
    assert finished.stdout == ""


def test_auto_starts_with_what_it_has_and_names_the_rest() -> None:
    finished = _without_namespaces("auto")
    assert finished.returncode == 0, finished.stderr
    assert "lacks" in finished.stderr and "pid_namespace" in finished.stderr
    ready, status = (json.loads(line) for line in finished.stdout.splitlines())
    assert "network_namespace" not in ready["params"]["protections"]
    assert status["result"]["protections"] == ready["params"]["protections"]
