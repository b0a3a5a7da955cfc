"""The sandbox around model code: what a worker may see, reach and start (Linux; see README).

Model code is an attacker's (a sentence in the context can steer the model), so before a
worker runs it, the process it runs in is confined with every protection the kernel offers:

- a root server's worker becomes `nobody` first, so that whatever it reaches (a socket's peer,
  a file's owner check) sees that uid, never root's; where the interpreter lives under a
  directory closed to others, a mount namespace of its own binds the interpreter's files back
  under a tmpfs that hides that directory;
- a user namespace of its own (an identity map: root outside keeps no capability over the host),
  and in it a PID namespace (it cannot see or signal the server, the zygote or a sibling, and
  everything it starts dies with it), a network namespace (no network; only its own loopback,
  where the library's LM handler listens), an IPC namespace, and a mount namespace whose /tmp
  is a tmpfs of `--worker-disk-mb`: its directory, all its files bounded together, gone with it;
- no capabilities left, `PR_SET_NO_NEW_PRIVS`, and not dumpable (no process can read its memory
  through /proc, and it cannot read theirs);
- Landlock: it reads only the interpreter's and the system's files and writes only its own
  directory; and it cannot signal anything outside itself;
- seccomp: it cannot clear the parent-death signal that ties it to its request, make an AF_UNIX
  socket other than a connected socketpair (Landlock up to ABI 7 does not govern connecting to
  a socket file), use io_uring, or make memory its address space limit does not count (memfds,
  System V segments);
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
import functools
import os
import resource
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable, Iterable
from typing import NamedTuple

from rlm_server.libc import LIBC, PR_SET_DUMPABLE, PR_SET_PDEATHSIG, is_linux, prctl
from rlm_server.worker import frames

# Every protection, in the order they are applied; `status` reports those in force.
UNPRIVILEGED_UID = "unprivileged_uid"
USER_NAMESPACE = "user_namespace"
PID_NAMESPACE = "pid_namespace"
NETWORK_NAMESPACE = "network_namespace"
IPC_NAMESPACE = "ipc_namespace"
DISK_LIMIT = "disk_limit"
NO_CAPABILITIES = "no_capabilities"
NO_NEW_PRIVS = "no_new_privs"
NOT_DUMPABLE = "not_dumpable"
LANDLOCK_FILESYSTEM = "landlock_filesystem"
LANDLOCK_SIGNALS = "landlock_signals"
SECCOMP = "seccomp"
NO_UNIX_SOCKETS = "no_unix_sockets"
NO_SHARED_MEMORY = "no_shared_memory"
RESOURCE_LIMITS = "resource_limits"
PROCESS_LIMIT = "process_limit"
PRIVATE_TMP = "private_tmp"
PRIVATE_OUTPUT = "private_output"
PROTECTIONS = (
    UNPRIVILEGED_UID,
    USER_NAMESPACE,
    PID_NAMESPACE,
    NETWORK_NAMESPACE,
    IPC_NAMESPACE,
    DISK_LIMIT,
    NO_CAPABILITIES,
    NO_NEW_PRIVS,
    NOT_DUMPABLE,
    LANDLOCK_FILESYSTEM,
    LANDLOCK_SIGNALS,
    SECCOMP,
    NO_UNIX_SOCKETS,
    NO_SHARED_MEMORY,
    RESOURCE_LIMITS,
    PROCESS_LIMIT,
    PRIVATE_TMP,
    PRIVATE_OUTPUT,
)
PORTABLE = (RESOURCE_LIMITS, PRIVATE_TMP, PRIVATE_OUTPUT)  # what every POSIX platform has
ALWAYS = (PRIVATE_TMP, PRIVATE_OUTPUT)  # the server's side: applied even with --sandbox off

# Resource limits of one worker (the address space is --worker-memory-mb).
MAX_PROCESSES = 300  # threads count: the LM handler serves each connection in one
PID_MAX = "/proc/sys/kernel/pid_max"  # per PID namespace since Linux 6.14; at least 301
MAX_OPEN_FILES = 1024
MAX_FILE_BYTES = 4 << 30
MAX_CPU_S = 3600
PROBE_DIRECTORY = "/"  # what the probe's Landlock rules name: it writes nothing, and exits
NOBODY = 65534  # the overflow uid and gid: what a worker of a root server runs as
PRIVATE_TMP_PATH = "/tmp"  # where a worker with a disk limit sees its own tmpfs
INODES_PER_MB = 64  # files on that tmpfs: their inodes are kernel memory beside its size
MIN_INODES = 1024
PROBE_DISK_MB = 1
MS_NOSUID, MS_NODEV, MS_REC, MS_SLAVE = 2, 4, 1 << 14, 1 << 19
OPEN_TREE, MOVE_MOUNT = 428, 429  # the same numbers on every architecture
OPEN_TREE_CLONE, AT_RECURSIVE, MOVE_EMPTY_PATH, AT_FDCWD = 1, 0x8000, 0x4, -100
EXPOSED_MB = 1  # the tmpfs that hides a closed directory holds only mount points

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
    flags |= CLONE_NEWNS if DISK_LIMIT in chosen else 0
    return flags


def become_unprivileged() -> None:
    """As root, before the user namespace: become `nobody`, so that whatever model code
    reaches sees that uid, never the server's (root's files, sockets and processes are not
    its own any more). The credential change clears the parent-death signal: set it again."""
    parent = os.getppid()
    _set_nobody()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _set_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


_READ_MODE = {True: os.R_OK | os.X_OK, False: os.R_OK}  # by: is it a directory


def _readable() -> bool:
    """Can we (`nobody`, in the probe) read the interpreter's files, which model code imports
    from? A virtual environment under /root, exposed or not, may say no."""
    return all(os.access(p, _READ_MODE[os.path.isdir(p)]) for p in readable_paths())


def expose_to_nobody() -> None:
    """As root, before becoming `nobody`: where a directory above the interpreter's files is
    closed to others (a pyenv under /root, mode 0700), hide that directory under a tmpfs in
    a mount namespace of our own (nothing propagates to the host) and put bind mounts of
    the interpreter's files back in it at the same paths. Nothing else under it is seen."""
    hidden = _hidden_from_nobody()
    if not hidden:
        return
    _check(_libc.unshare(ctypes.c_int(CLONE_NEWNS)), "unshare")
    slave = ctypes.c_ulong(MS_REC | MS_SLAVE)
    _check(_libc.mount(b"none", b"/", None, slave, None), "mount --make-rslave /")
    for top, paths in hidden.items():
        clones = [(path, _open_tree(path)) for path in paths]
        flags = ctypes.c_ulong(MS_NOSUID | MS_NODEV)
        options = f"mode=0755,size={EXPOSED_MB}m".encode()
        _check(_libc.mount(b"tmpfs", top.encode(), b"tmpfs", flags, options), "mount tmpfs")
        _put_back(clones)


def _put_back(clones: list[tuple[str, int]]) -> None:
    """Mount each cloned tree (`_open_tree`) at its own path again, under the tmpfs that was
    just mounted over a directory above it."""
    for path, tree in clones:
        if os.path.isdir(f"/proc/self/fd/{tree}"):
            os.makedirs(path, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        moved = _libc.syscall(MOVE_MOUNT, tree, b"", AT_FDCWD, path.encode(), MOVE_EMPTY_PATH)
        os.close(tree)
        _check(moved, f"move_mount {path}")


@functools.cache
def _interpreter_below_private_tmp() -> list[str]:
    """The interpreter's paths under /tmp (a virtual environment made there), outermost only:
    the worker's own /tmp would hide them, so they are mounted back into it. Found once, by the
    zygote (`prepare`), before it forks."""
    paths = sorted({os.path.realpath(p) for p in readable_paths()})
    below = [p for p in paths if p.startswith(PRIVATE_TMP_PATH + os.sep)]
    return [p for p in below if not any(p.startswith(q + os.sep) for q in below)]


def _open_tree(path: str) -> int:
    flags = OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC
    return _check(_libc.syscall(OPEN_TREE, AT_FDCWD, path.encode(), flags), f"open_tree {path}")


@functools.cache
def _hidden_from_nobody() -> dict[str, list[str]]:
    """{a directory closed to others: the interpreter's paths below it}. Found once, by the
    zygote (`prepare`), before it forks."""
    paths = sorted({os.path.realpath(p) for p in readable_paths()})
    tops = [p for p in paths if not any(p.startswith(q + os.sep) for q in paths)]
    hidden: dict[str, list[str]] = {}
    for path in tops:
        parts = path.split(os.sep)[1:-1]
        for depth in range(1, len(parts) + 1):
            ancestor = os.sep + os.sep.join(parts[:depth])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                hidden.setdefault(ancestor, []).append(path)
                break
    return hidden


def mount_private_tmp(megabytes: int) -> None:
    """In the worker's own mount namespace (owned by its user namespace, so nothing mounted
    here reaches the host): a tmpfs of `megabytes` (0: no size) over /tmp, its directory.
    Its files count together against the size and vanish with the namespace, whatever
    modes model code gave them; the host's /tmp is hidden, but for the interpreter's own files
    when they live there."""
    clones = [(path, _open_tree(path)) for path in _interpreter_below_private_tmp()]
    inodes = max(megabytes, MIN_INODES // INODES_PER_MB) * INODES_PER_MB
    options = f"size={megabytes}m,nr_inodes={inodes},mode=0700" if megabytes else "mode=0700"
    flags = ctypes.c_ulong(MS_NOSUID | MS_NODEV)
    target = PRIVATE_TMP_PATH.encode()
    _check(_libc.mount(b"tmpfs", target, b"tmpfs", flags, options.encode()), "mount tmpfs")
    _put_back(clones)


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
FS_RESOLVE_UNIX = 1 << 16  # connect to a socket file (Linux 7.1+)
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
    signal nothing outside our own domain and reach no abstract socket outside it. Where the
    kernel knows it (Linux 7.1+), a socket file outside `workdir` cannot be connected to
    either (the seccomp rule of `no_unix_sockets` stops that everywhere)."""
    abi = landlock_abi()
    if abi < 1:
        raise SandboxError("Landlock is not available")
    handled = _fs_rights(abi) | FS_RESOLVE_UNIX
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if scope_signals and abi >= 6 else 0
    ruleset = _ruleset(handled, scoped)
    if ruleset == -1:  # EINVAL: a kernel without that right
        handled &= ~FS_RESOLVE_UNIX
        ruleset = _check(_ruleset(handled, scoped), "landlock")
    try:
        for path in readable_paths():
            _allow(ruleset, path, FS_READ & handled)
        for path in DEVICES:
            _allow(ruleset, path, (FS_READ_FILE | FS_WRITE_FILE) & handled)
        _allow(ruleset, workdir, handled)
        _check(_libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _ruleset(handled: int, scoped: int) -> int:
    attr = struct.pack("QQQ", handled, 0, scoped) if scoped else struct.pack("Q", handled)
    return int(_libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr), len(attr), 0))


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

BPF_LD_W_ABS, BPF_ALU_AND_K, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x54, 0x15, 0x35, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
EPERM = 1
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 calls: the same arch, other numbers
AF_UNIX, SOCK_DGRAM, SOCK_TYPE_MASK = 1, 2, 0xF
ANY = 0xFFFFFFFF


class Rule(NamedTuple):
    """Refuse (EPERM) a system call, or only when the low word of one argument, masked,
    equals a value."""

    call: str
    argument: int | None = None
    mask: int = ANY
    value: int = 0


# arch, and the numbers of the calls the rules name
AUDIT_ARCH = {
    "x86_64": (
        0xC000003E,
        {"prctl": 157, "socket": 41, "socketpair": 53, "shmget": 29, "memfd_create": 319},
    ),
    "aarch64": (
        0xC00000B7,
        {"prctl": 167, "socket": 198, "socketpair": 199, "shmget": 194, "memfd_create": 279},
    ),
}
SAME_EVERYWHERE = {"io_uring_setup": 425, "memfd_secret": 447}
RULES = {
    # it cannot clear the parent-death signal that ties it to its request
    SECCOMP: (Rule("prctl", 0, ANY, PR_SET_PDEATHSIG),),
    # no socket by path: no AF_UNIX socket but its own socketpairs (connected, and not
    # datagrams, which could connect again), and no io_uring, whose operations make and
    # connect sockets without a system call this filter sees
    NO_UNIX_SOCKETS: (
        Rule("socket", 0, ANY, AF_UNIX),
        Rule("socketpair", 1, SOCK_TYPE_MASK, SOCK_DGRAM),
        Rule("io_uring_setup"),
    ),
    # no memory that its address space limit does not count: memfds, System V segments
    # (/dev/shm is outside what Landlock lets it write)
    NO_SHARED_MEMORY: (Rule("memfd_create"), Rule("memfd_secret"), Rule("shmget")),
}


def _machine() -> str:
    return os.uname().machine


def seccomp_program(protections: Iterable[str]) -> list[tuple[int, int, int, int]]:
    """The filter for these protections: other architectures' calls (i386 and x32 on
    x86_64) are refused whole, then each rule is a block that returns EPERM when it
    matches and falls through to the next when it does not."""
    arch, numbers = AUDIT_ARCH[_machine()]
    numbers = {**numbers, **SAME_EVERYWHERE}
    refuse = (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM)
    program = [
        (BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (BPF_JEQ_K, 1, 0, arch),
        refuse,
        (BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        refuse,
    ]
    chosen = set(protections)
    for rule in (rule for name, rules in RULES.items() if name in chosen for rule in rules):
        test = []
        if rule.argument is not None:
            test.append((BPF_LD_W_ABS, 0, 0, 16 + 8 * rule.argument))  # low word of args[i]
            if rule.mask != ANY:
                test.append((BPF_ALU_AND_K, 0, 0, rule.mask))
            test.append((BPF_JEQ_K, 0, 1, rule.value))
        program += [
            (BPF_LD_W_ABS, 0, 0, 0),
            (BPF_JEQ_K, 0, len(test) + 1, numbers[rule.call]),
            *test,
            refuse,
        ]
    return [*program, (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)]


def install_seccomp(protections: Iterable[str]) -> None:
    program = seccomp_program(protections)
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
    """Which protections to apply, and the disk limit: what the zygote is told."""

    def __init__(self, protections: Iterable[str], disk_mb: int = 0) -> None:
        self.protections = frozenset(protections)
        self.disk_mb = disk_mb

    def has(self, protection: str) -> bool:
        return protection in self.protections

    def encode(self) -> str:
        return f"{self.disk_mb}:" + ",".join(sorted(self.protections))

    @classmethod
    def decode(cls, text: str) -> Plan:
        disk_mb, _, protections = text.partition(":")
        return cls((p for p in protections.split(",") if p), int(disk_mb))


def prepare(plan: Plan) -> None:
    """In the zygote, once: what every worker would otherwise work out again."""
    if plan.has(UNPRIVILEGED_UID):
        _hidden_from_nobody()
    if plan.has(DISK_LIMIT):
        _interpreter_below_private_tmp()


def keep(plan: Plan, sock: socket.socket, serve: Callable[[], None], workdir: str) -> None:
    """In the zygote's child: confine, start the job, tell the server which pid to kill, and
    wait to be killed (never reaping, so that pid stays ours until the server has killed it).
    With a disk limit the worker's directory is its own tmpfs at /tmp, not `workdir`."""
    if plan.has(UNPRIVILEGED_UID):
        expose_to_nobody()
        become_unprivileged()
    _prctl(PR_SET_DUMPABLE, 1)  # not dumpable (inherited), /proc/self/uid_map is not ours
    enter_namespaces(namespace_flags(plan.protections))
    if plan.has(DISK_LIMIT):
        mount_private_tmp(plan.disk_mb)
        workdir = PRIVATE_TMP_PATH
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
        install_seccomp(plan.protections)
    os.chdir(workdir)
    import tempfile  # the zygote's, already imported: not the server's before `ready`

    os.environ["TMPDIR"] = tempfile.tempdir = workdir


# -- what works here -----------------------------------------------------------------------


class Probe:
    """The protections that work on this machine, tried one after another in a throwaway
    child (a fork of us, made before any thread starts) as a worker applies them; a step that
    fails is left out and the rest still tried. A root server tries, at the same time in
    another child, what `nobody` needs (a kernel may refuse `nobody` a user namespace that it
    gives root). Started early, read when needed, so that the server's imports overlap it."""

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
            _probe_child(write)
        os.close(write)
        self._answer = read

    def result(self) -> tuple[list[str], list[str]]:
        """(the protections to apply, the ones this level wants that are missing)."""
        if self.level == "off":
            return list(ALWAYS), []
        working = list(PORTABLE)
        if self._pid:
            working = _answer_of(self._pid, self._answer)
        wanted = PROTECTIONS if is_linux() else PORTABLE
        return [p for p in PROTECTIONS if p in working], [p for p in wanted if p not in working]


def _answer_of(pid: int, answer: int) -> list[str]:
    with os.fdopen(answer, "rb") as f:
        working = f.read().decode().split(",")
    os.waitpid(pid, 0)
    return [p for p in working if p]


def _probe_child(answer: int) -> None:
    """The steps here; for a root server, at the same time, what `nobody` needs in a child."""
    try:
        os.setsid()
        as_nobody = _start_try(_nobody_steps) if os.geteuid() == 0 else None
        working = _probe_steps()
        if as_nobody is not None and _answer_of(*as_nobody) and DISK_LIMIT in working:
            working.append(UNPRIVILEGED_UID)
        os.write(answer, ",".join(working).encode())
    finally:
        os._exit(0)


def _start_try(steps: Callable[[], list[str]]) -> tuple[int, int]:
    """(the child's pid, the pipe it answers on with what worked)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, ",".join(steps()).encode())
        finally:
            os._exit(0)
    os.close(write)
    return pid, read


def _probe_steps() -> list[str]:
    """Each protection in turn, as a worker applies them; what worked."""
    working: list[str] = list(ALWAYS)

    def attempt(protection: str, step: Callable[[], object]) -> None:
        try:
            step()
            working.append(protection)
        except (OSError, SandboxError, ValueError, KeyError):
            pass

    _prctl(PR_SET_DUMPABLE, 1)
    attempt(USER_NAMESPACE, lambda: enter_namespaces(CLONE_NEWUSER))
    attempt(PID_NAMESPACE, lambda: enter_namespaces(CLONE_NEWPID))
    attempt(NETWORK_NAMESPACE, lambda: enter_namespaces(CLONE_NEWNET))
    attempt(IPC_NAMESPACE, lambda: enter_namespaces(CLONE_NEWIPC))
    if USER_NAMESPACE in working:
        attempt(DISK_LIMIT, _disk_limit_probe)
    attempt(PROCESS_LIMIT, lambda: _process_limit_probe(working))
    attempt(RESOURCE_LIMITS, lambda: limit_resources(0))
    attempt(NO_CAPABILITIES, drop_capabilities)
    attempt(NO_NEW_PRIVS, no_new_privs)
    attempt(NOT_DUMPABLE, not_dumpable)
    if NO_NEW_PRIVS in working:
        attempt(LANDLOCK_FILESYSTEM, lambda: landlock(PROBE_DIRECTORY, scope_signals=False))
        if landlock_abi() >= 6:
            attempt(LANDLOCK_SIGNALS, lambda: landlock(PROBE_DIRECTORY, scope_signals=True))
        if _machine() in AUDIT_ARCH:
            with contextlib.suppress(OSError, SandboxError):
                working += _seccomp_probe()
    if LANDLOCK_FILESYSTEM not in working and NO_SHARED_MEMORY in working:
        working.remove(NO_SHARED_MEMORY)  # /dev/shm would be writable: memory by another name
    return working


def _nobody_steps() -> list[str]:
    """What a root server's worker does first to run as `nobody`, then what differs for
    `nobody` from root's try: its user namespace and, in it, its private /tmp (it may not
    reach its directory under the server's). The rest is the same for any uid."""
    try:
        expose_to_nobody()
        become_unprivileged()
        if not _readable():
            return []
        _prctl(PR_SET_DUMPABLE, 1)
        enter_namespaces(CLONE_NEWUSER)
        _disk_limit_probe()
    except (OSError, SandboxError):
        return []
    return [UNPRIVILEGED_UID]


def _disk_limit_probe() -> None:
    """A tmpfs over /tmp in a mount namespace of our own (the interpreter's files put back in
    it when they live there)."""
    enter_namespaces(CLONE_NEWNS)
    mount_private_tmp(PROBE_DISK_MB)
    if not _readable():
        raise SandboxError("the interpreter's files are not readable under the private /tmp")


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


def _seccomp_probe() -> list[str]:
    """The filter with every rule, then what each rule must stop, tried."""
    install_seccomp(RULES)
    working = []
    if prctl(PR_SET_PDEATHSIG, 0) == -1:
        working.append(SECCOMP)
        if _refused(lambda: socket.socket(socket.AF_UNIX).close()):
            for end in socket.socketpair():  # what the library needs still works
                end.close()
            working.append(NO_UNIX_SOCKETS)
        if _refused(lambda: os.close(os.memfd_create("probe"))):
            working.append(NO_SHARED_MEMORY)
    return working


def _refused(step: Callable[[], object]) -> bool:
    try:
        step()
    except PermissionError:
        return True
    return False
