"""Server-side request metrics, as `status` reports them.

Every infer ends in exactly one outcome, recorded in one place (`Metrics.record`), so the counts
always add up: total = successful + failed + cancelled + timed_out + stub. Everything runs in
the event loop: nothing here needs a lock.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

LATENCY_WINDOW = 1000


class Outcome(enum.Enum):
    SUCCESS = "successful_requests"
    FAILURE = "failed_requests"
    CANCELLED = "cancelled_requests"
    TIMED_OUT = "timed_out_requests"
    STUB = "stub_responses"


def _percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Metrics:
    total_requests: int = 0
    total_retries: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in Outcome})
    window: deque[float] = field(default_factory=deque)  # the last latencies, oldest first
    ordered: list[float] = field(default_factory=list)  # the same, sorted: status never sorts
    window_sum: float = 0.0
    cached: dict[str, Any] | None = field(default=None, repr=False)  # snapshot until a change

    def started(self) -> None:
        self.total_requests += 1
        self.cached = None

    def retried(self, calls: int) -> None:
        """Model calls that were tried again (the broker retries each call on its own)."""
        self.total_retries += calls
        self.cached = None

    def record(self, outcome: Outcome, elapsed_ms: float) -> None:
        self.cached = None
        self.outcomes[outcome.value] += 1
        if len(self.window) == LATENCY_WINDOW:
            oldest = self.window.popleft()
            del self.ordered[bisect.bisect_left(self.ordered, oldest)]
            self.window_sum -= oldest
        self.window.append(elapsed_ms)
        bisect.insort(self.ordered, elapsed_ms)
        self.window_sum += elapsed_ms

    def snapshot(self) -> dict[str, Any]:
        """The counts now (computed again only after a change; not to be modified)."""
        if self.cached is None:
            self.cached = self._snapshot()
        return self.cached

    def _snapshot(self) -> dict[str, Any]:
        ordered = self.ordered
        average = self.window_sum / len(ordered) if ordered else 0.0
        return {
            "total_requests": self.total_requests,
            **self.outcomes,
            "total_retries": self.total_retries,
            "latency_ms": {
                "avg": round(average, 3),
                "p50": round(_percentile(ordered, 0.50), 3),
                "p95": round(_percentile(ordered, 0.95), 3),
                "p99": round(_percentile(ordered, 0.99), 3),
            },
        }
