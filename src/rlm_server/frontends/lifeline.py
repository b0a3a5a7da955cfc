"""Noticing that the process that started us has gone.

End of stdin keeps draining for the grace period, because `echo ... | rlm-server` ends its input
and still wants its answer. A client that died is different: nobody is left to receive anything,
so every token spent after that is wasted. On Linux the kernel sends us a signal when our parent
exits (PR_SET_PDEATHSIG); elsewhere, and when the signal is a false alarm (it fires when the
*thread* that started us exits), a change of parent pid says the same thing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import anyio

from rlm_server.libc import die_with_parent

PARENT_DEATH_SIGNAL = signal.SIGUSR2
POLL_S = 1.0


class ParentWatch:
    """Remembers our parent at start; `wait_gone` returns once it has gone."""

    def __init__(self) -> None:
        self._parent = os.getppid()

    def gone(self) -> bool:
        return os.getppid() != self._parent

    async def wait_gone(self, on_gone: Callable[[], None]) -> None:
        """Call `on_gone` when the parent has gone. A server started by init (pid 1, e.g. as a
        container's main process) has no parent to lose and never calls it."""
        if self._parent <= 1:
            return
        with anyio.open_signal_receiver(PARENT_DEATH_SIGNAL) as signals:
            die_with_parent(PARENT_DEATH_SIGNAL)  # after the handler exists, so it cannot kill us
            while not self.gone():
                with anyio.move_on_after(POLL_S):
                    async for _ in signals:
                        break
        on_gone()
