"""The C library, loaded once: `prctl` and the few calls Python does not wrap.

Used by the server (parent-death signal, keys), the zygote and the worker's sandbox alike.
"""

from __future__ import annotations

import ctypes
import sys

LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


def is_linux() -> bool:
    return sys.platform.startswith("linux")


def prctl(option: int, *args: int) -> int:
    """`prctl(2)` with its unused arguments zero; -1 on failure (errno in ctypes.get_errno)."""
    padded = [ctypes.c_ulong(a) for a in (*args, 0, 0, 0, 0)[:4]]
    return int(LIBC.prctl(option, *padded))


def die_with_parent(signum: int) -> None:
    """Ask the kernel to send `signum` when our parent exits (Linux; elsewhere nothing)."""
    if is_linux():
        prctl(PR_SET_PDEATHSIG, signum)
