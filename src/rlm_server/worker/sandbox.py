"""The sandbox around model code: what a worker may see, reach and start (Linux; see README).

Model code is an attacker's (a sentence in the context can steer the model), so before a
worker runs it, the process it runs in is confined with every protection the kernel offers:

- a user namespace of its own (an identity map: root outside keeps no capability over the host),
  and in it a PID namespace (it cannot see or signal the server, the zygote or a sibling, and
  everything it starts dies with it), a network namespace (no network; only its own loopback,
  where the library's LM handler listens) and an IPC namespace;
- no capabilities left, `PR_SET_NO_NEW_PRIVS`, and not dumpable (no process can read its memory
  through /proc, and it cannot read theirs);
- Landlock: it reads only the interpreter's and the system's files and writes only its own
  directory; and it cannot signal anything outside itself;
- seccomp: it cannot clear the parent-death signal that ties it to its request;
- resource limits: open files, file size, CPU time, no core files (the address space limit is
  the zygote's `--worker-memory-mb`), and processes: its PID namespace's own `pid_max` (Linux
  6.14+), which binds root too, where `RLIMIT_NPROC` does not (uid 0 is exempt from it even in
  a user namespace); without a PID namespace, `RLIMIT_NPROC`, which a user namespace makes
  per-worker for an ordinary user. A pids cgroup would also bind root, but joining one costs
  ~25 ms per worker (cgroup v1 waits for an RCU grace period).

Three processes make one worker: the zygote's child (the *keeper*, trusted, group leader of its
own session) creates the namespaces and forks PID 1 of the new PID namespace (the *init*, ours
too), which forks the *job* that runs model code. When the init dies the kernel kills
everything in its namespace, and it dies with the job, with the keeper, or when the server
kills it. The keeper writes the init's pid (as the server sees it) on the worker's socket before
the job is read, and never reaps it, so the server can kill it by pid without racing pid reuse.

`probe()` runs the same steps once in a throwaway child at start-up and says which of them work
here; the zygote then applies exactly those. Nothing in this module imports anything beyond the
standard library: the zygote imports it before it forks.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import resource
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterable

from rlm_server.libc import LIBC, PR_SET_DUMPABLE, PR_SET_PDEATHSIG, is_linux, prctl
from rlm_server.worker import frames

# Every protection, in the order they are applied; `status` reports those in force.
USER_NAMESPACE = "user_namespace"
PID_NAMESPACE = "pid_namespace"
NETWORK_NAMESPACE = "network_namespace"
IPC_NAMESPACE = "ipc_namespace"
NO_CAPABILITIES = "no_capabilities"
NO_NEW_PRIVS = "no_new_privs"
NOT_DUMPABLE = "not_dumpable"
LANDLOCK_FILESYSTEM = "landlock_filesystem"
LANDLOCK_SIGNALS = "landlock_signals"
SECCOMP = "seccomp"
RESOURCE_LIMITS = "resource_limits"
PROCESS_LIMIT = "process_limit"
PRIVATE_TMP = "private_tmp"
PROTECTIONS = (
    USER_NAMESPACE,
    PID_NAMESPACE,
    NETWORK_NAMESPACE,
    IPC_NAMESPACE,
    NO_CAPABILITIES,
    NO_NEW_PRIVS,
    NOT_DUMPABLE,
    LANDLOCK_FILESYSTEM,
    LANDLOCK_SIGNALS,
    SECCOMP,
    RESOURCE_LIMITS,
    PROCESS_LIMIT,
    PRIVATE_TMP,
)
PORTABLE = (RESOURCE_LIMITS, PRIVATE_TMP)  # what every POSIX platform has

# Resource limits of one worker (the address space is --worker-memory-mb).
MAX_PROCESSES = 300  # threads count: the LM handler serves each connection in one
PID_MAX = "/proc/sys/kernel/pid_max"  # per PID namespace since Linux 6.14; at least 301
MAX_OPEN_FILES = 1024
MAX_FILE_BYTES = 4 << 30
MAX_CPU_S = 3600
PROBE_DIRECTORY = "/"  # what the probe's Landlock rules name: it writes nothing, and exits

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CAPABILITY_VERSION_3 = 0x20080522

_libc = LIBC


class SandboxError(Exception):
    """A protection could not be applied."""


def _check(result: int, what: str) -> int:
    if result == -1:
        errno = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(errno)}")
    return result


def _prctl(option: int, *args: int) -> None:
    _check(prctl(option, *args), f"prctl({option})")


# -- namespaces ----------------------------------------------------------------------------


def namespace_flags(protections: Iterable[str]) -> int:
    chosen = set(protections)
    flags = CLONE_NEWUSER if USER_NAMESPACE in chosen else 0
    flags |= CLONE_NEWPID if PID_NAMESPACE in chosen else 0
    flags |= CLONE_NEWNET if NETWORK_NAMESPACE in chosen else 0
    flags |= CLONE_NEWIPC if IPC_NAMESPACE in chosen else 0
    return flags


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(flags: int) -> None:
    """Unshare them (a new PID namespace holds our next child, not us); in a new user namespace
    map our own uid and gid to themselves, so files keep their owners and root stays uid 0 but
    holds no capability over anything outside."""
    if not flags:
        return
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
    if flags & CLONE_NEWUSER:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    if flags & CLONE_NEWNET:
        _loopback_up()


def _loopback_up() -> None:
    """A new network namespace has only `lo`, and it is down; the library's LM handler listens
    on 127.0.0.1 inside the worker."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


# -- capabilities, privileges, dumpable ----------------------------------------------------


def drop_capabilities() -> None:
    """Nothing left in any set: the bounding set (no exec can bring one back), the ambient
    set, and effective, permitted and inheritable."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        with contextlib.suppress(SandboxError):  # EINVAL for a cap this kernel lacks
            _prctl(PR_CAPBSET_DROP, cap)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = ctypes.create_string_buffer(struct.pack("Ii", CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)  # two zeroed {effective, permitted, inheritable}
    _check(_libc.capset(header, data), "capset")


def no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def not_dumpable() -> None:
    """Nobody of our uid may read our memory through /proc/PID/mem or ptrace us."""
    _prctl(PR_SET_DUMPABLE, 0)


# -- Landlock ------------------------------------------------------------------------------

LANDLOCK_CREATE_RULESET = 444  # the same numbers on every architecture
LANDLOCK_ADD_RULE = 445
LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE = 1 << 14
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | (1 << 15)
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


def landlock_abi() -> int:
    if not is_linux():
        return 0
    version = _libc.syscall(LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


def _fs_rights(abi: int) -> int:
    return FS_RIGHTS_BY_ABI.get(abi, (1 << 16) - 1)


def readable_paths() -> list[str]:
    """The interpreter, its packages (and any source tree on sys.path) and the system's
    libraries: all that Python needs to import a module model code asks for."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *SYSTEM_READ}
    paths.update(p for p in sys.path if p)
    return sorted(p for p in paths if os.path.exists(p))


def landlock(workdir: str, scope_signals: bool) -> None:
    """Read the interpreter and the system, write only `workdir`; with `scope_signals` (ABI 6),
    signal nothing outside our own domain and reach no abstract socket outside it."""
    abi = landlock_abi()
    if abi < 1:
        raise SandboxError("Landlock is not available")
    handled = _fs_rights(abi)
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if scope_signals and abi >= 6 else 0
    attr = struct.pack("QQQ", handled, 0, scoped) if scoped else struct.pack("Q", handled)
    ruleset = _check(
        _libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr), len(attr), 0), "landlock"
    )
    try:
        for path in readable_paths():
            _allow(ruleset, path, FS_READ & handled)
        for path in DEVICES:
            _allow(ruleset, path, (FS_READ_FILE | FS_WRITE_FILE) & handled)
        _allow(ruleset, workdir, handled)
        _check(_libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _allow(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # not on this system
    try:
        if not os.path.isdir(path):
            rights &= FILE_RIGHTS
        rule = struct.pack("=Qi", rights, fd)  # rights within what the ruleset handles
        _check(
            _libc.syscall(LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0),
            f"landlock rule for {path}",
        )
    finally:
        os.close(fd)


# -- seccomp -------------------------------------------------------------------------------

AUDIT_ARCH = {"x86_64": (0xC000003E, 157), "aarch64": (0xC00000B7, 167)}  # arch, __NR_prctl
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
EPERM = 1


def _machine() -> str:
    return os.uname().machine


def seccomp_keep_death_signal() -> None:
    """Refuse `prctl(PR_SET_PDEATHSIG)`: the worker dies with its keeper, and model code may
    not undo that to outlive its request and the server. Other architectures' calls (i386 on
    x86_64) are refused whole."""
    arch, prctl_nr = AUDIT_ARCH[_machine()]
    refuse = SECCOMP_RET_ERRNO | EPERM
    program = [
        (BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (BPF_JEQ_K, 1, 0, arch),
        (BPF_RET_K, 0, 0, refuse),
        (BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (BPF_JEQ_K, 0, 3, prctl_nr),
        (BPF_LD_W_ABS, 0, 0, 16),  # low word of args[0]
        (BPF_JEQ_K, 0, 1, PR_SET_PDEATHSIG),
        (BPF_RET_K, 0, 0, refuse),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    filters = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(filters, len(filters))
    fprog = ctypes.create_string_buffer(struct.pack("@HP", len(program), ctypes.addressof(buffer)))
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


# -- resource limits -----------------------------------------------------------------------


def limit_resources(processes: int) -> None:
    limits = {
        resource.RLIMIT_NOFILE: MAX_OPEN_FILES,
        resource.RLIMIT_FSIZE: MAX_FILE_BYTES,
        resource.RLIMIT_CPU: MAX_CPU_S,
        resource.RLIMIT_CORE: 0,
    }
    if processes:
        limits[resource.RLIMIT_NPROC] = processes
    for which, value in limits.items():
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def limit_pids(processes: int) -> None:
    """As PID 1 of a new PID namespace (before its capabilities go): no pid above
    `processes` in it, so no more than that many processes and threads at once."""
    _write(PID_MAX, str(processes + 1))


# -- one worker ----------------------------------------------------------------------------


class Plan:
    """Which protections to apply: what the zygote is told."""

    def __init__(self, protections: Iterable[str]) -> None:
        self.protections = frozenset(protections)

    def has(self, protection: str) -> bool:
        return protection in self.protections

    def encode(self) -> str:
        return ",".join(sorted(self.protections))

    @classmethod
    def decode(cls, text: str) -> Plan:
        return cls(p for p in text.split(",") if p)


def keep(plan: Plan, sock: socket.socket, serve: Callable[[], None], workdir: str) -> None:
    """In the zygote's child: confine, start the job, tell the server which pid to kill, and
    wait to be killed (never reaping, so that pid stays ours until the server has killed it)."""
    _prctl(PR_SET_DUMPABLE, 1)  # not dumpable (inherited), /proc/self/uid_map is not ours
    enter_namespaces(namespace_flags(plan.protections))
    if plan.has(NOT_DUMPABLE):
        not_dumpable()
    if not plan.has(PID_NAMESPACE):
        sock.sendall(frames.pack({"pid": os.getpid()}))
        confine(plan, workdir)
        serve()
        return
    init = os.fork()
    if init == 0:
        _init(plan, sock, serve, workdir)
        return
    sock.sendall(frames.pack({"pid": init}))
    sock.close()
    while True:
        signal.pause()


def _init(plan: Plan, sock: socket.socket, serve: Callable[[], None], workdir: str) -> None:
    """PID 1 of the worker's namespace: runs the job in a child (so that model code keeps a
    normal process's signals: PID 1 ignores those it sends itself), reaps whatever is
    orphaned, and exits when the job does, which makes the kernel kill everything left."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if plan.has(PROCESS_LIMIT):
        limit_pids(MAX_PROCESSES)
    job = os.fork()
    if job == 0:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        confine(plan, workdir)
        serve()
        return
    sock.close()
    while True:
        try:
            if os.wait()[0] == job:
                os._exit(0)
        except ChildProcessError:
            os._exit(0)


def confine(plan: Plan, workdir: str) -> None:
    """In the worker, before any model code: everything but the namespaces (already entered)."""
    if plan.has(RESOURCE_LIMITS):
        by_uid = plan.has(PROCESS_LIMIT) and not plan.has(PID_NAMESPACE)  # else limit_pids
        limit_resources(MAX_PROCESSES if by_uid else 0)
    if plan.has(NO_CAPABILITIES):
        drop_capabilities()
    if plan.has(NO_NEW_PRIVS) or plan.has(LANDLOCK_FILESYSTEM) or plan.has(SECCOMP):
        no_new_privs()
    if plan.has(NOT_DUMPABLE):
        not_dumpable()
    if plan.has(LANDLOCK_FILESYSTEM):
        landlock(workdir, plan.has(LANDLOCK_SIGNALS))
    if plan.has(SECCOMP):
        seccomp_keep_death_signal()
    os.chdir(workdir)
    import tempfile  # the zygote's, already imported: not the server's before `ready`

    os.environ["TMPDIR"] = tempfile.tempdir = workdir


# -- what works here -----------------------------------------------------------------------


class Probe:
    """The protections that work on this machine, tried one after another in one throwaway
    child (a fork of us, made before any thread starts) as a worker applies them; a step that
    fails is left out and the rest still tried. Started early, read when needed, so that the
    server's imports overlap it."""

    def __init__(self, level: str) -> None:
        self.level = level
        self._pid = 0
        self._answer = -1
        if level != "off" and is_linux():
            self._start()

    def _start(self) -> None:
        read, write = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:
            os.close(read)
            _probe_child(write, PROBE_DIRECTORY)
        os.close(write)
        self._answer = read

    def result(self) -> tuple[list[str], list[str]]:
        """(the protections to apply, the ones this level wants that are missing)."""
        if self.level == "off":
            return [PRIVATE_TMP], []
        working = list(PORTABLE)
        if self._pid:
            with os.fdopen(self._answer, "rb") as answer:
                working = answer.read().decode().split(",")
            os.waitpid(self._pid, 0)
        wanted = PROTECTIONS if is_linux() else PORTABLE
        return [p for p in PROTECTIONS if p in working], [p for p in wanted if p not in working]


def _probe_child(answer: int, workdir: str) -> None:
    working: list[str] = [PRIVATE_TMP]

    def attempt(protection: str, step: Callable[[], object]) -> None:
        try:
            step()
            working.append(protection)
        except (OSError, SandboxError, ValueError, KeyError):
            pass

    try:
        os.setsid()
        _prctl(PR_SET_DUMPABLE, 1)
        attempt(USER_NAMESPACE, lambda: enter_namespaces(CLONE_NEWUSER))
        attempt(PID_NAMESPACE, lambda: enter_namespaces(CLONE_NEWPID))
        attempt(NETWORK_NAMESPACE, lambda: enter_namespaces(CLONE_NEWNET))
        attempt(IPC_NAMESPACE, lambda: enter_namespaces(CLONE_NEWIPC))
        attempt(PROCESS_LIMIT, lambda: _process_limit_probe(working))
        attempt(RESOURCE_LIMITS, lambda: limit_resources(0))
        attempt(NO_CAPABILITIES, drop_capabilities)
        attempt(NO_NEW_PRIVS, no_new_privs)
        attempt(NOT_DUMPABLE, not_dumpable)
        if NO_NEW_PRIVS in working:
            attempt(LANDLOCK_FILESYSTEM, lambda: landlock(workdir, scope_signals=False))
            if landlock_abi() >= 6:
                attempt(LANDLOCK_SIGNALS, lambda: landlock(workdir, scope_signals=True))
            if _machine() in AUDIT_ARCH:
                attempt(SECCOMP, _seccomp_probe)
        os.write(answer, ",".join(working).encode())
    finally:
        os._exit(0)


def _process_limit_probe(working: list[str]) -> None:
    """In a PID namespace, its own pid_max (tried by a child, its PID 1); without one,
    RLIMIT_NPROC, which binds per worker only in a user namespace and never binds root."""
    if PID_NAMESPACE in working:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                limit_pids(MAX_PROCESSES)
                code = 0
            finally:
                os._exit(code)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            raise SandboxError(f"{PID_MAX} is not per PID namespace here")
    elif USER_NAMESPACE in working and os.geteuid() != 0:
        limit_resources(MAX_PROCESSES)
    else:
        raise SandboxError("nothing bounds this worker's processes")


def _seccomp_probe() -> None:
    seccomp_keep_death_signal()
    if prctl(PR_SET_PDEATHSIG, 0) != -1:
        raise SandboxError("the seccomp filter let prctl(PR_SET_PDEATHSIG) through")
