"""Keeping the server's keys out of its /proc/PID/environ.

/proc/PID/environ shows a process's initial environment block, whatever it later does to
`os.environ`, and a process of the same user can read it: model code could find a provider key
there. The server reads its keys once (Python's `os.environ` is a copy made at start) and then
overwrites their values in that block. A worker's own environment never held a key
(pool.worker_environment); reading the server's memory itself is what the sandbox prevents.
"""

from __future__ import annotations

import ctypes
import re
import sys

from rlm_server.libc import LIBC

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def hide_from_proc_environ() -> int:
    """Blank the value of every variable whose name says it is a secret, in the environment
    block the kernel shows; return how many were blanked (Linux; elsewhere nothing to do)."""
    if not sys.platform.startswith("linux"):
        return 0
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(LIBC, "environ")
    hidden = 0
    index = 0
    while address := environ[index]:
        name, _, value = ctypes.string_at(address).partition(b"=")
        if value and SECRET_NAME.search(name.decode(errors="replace")):
            ctypes.memset(address + len(name) + 1, 0, len(value))
            hidden += 1
        index += 1
    return hidden
