"""Stalls: which dependency is stuck now, for `/healthz`, the metrics and `qmpwatch status`.

A part of the daemon that sees a dependency miss a deadline (libvirt, the journal, a SQLite
commit, a file system) calls `STALLS.begin(reason, dependency, detail)`; when the dependency
answers again, `STALLS.end(reason, dependency)`. Each start and each end is one record,
`dependency_stalled` (warning) and `dependency_recovered` (info, with how long it lasted),
logged once per (reason, dependency) however often the stall is seen. `STALLS.current()` is
what the health check reads: reason -> one sentence naming each stuck dependency.

One board per process (the parts that report sit in layers that never see the service's
objects); each entry names its dependency, so two daemons in one process (tests) do not mix.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import structlog

# The degraded reasons a stall can carry (README, "Metrics and health").
STALL_REASONS = (
    "libvirt_unresponsive",
    "journal_blocked",
    "state_store_slow",
    "storage_unresponsive",
)


@dataclass(slots=True)
class _Stall:
    detail: str
    since: float  # epoch seconds


class Stalls:
    """The dependencies stuck now, by (reason, dependency); thread-safe."""

    def __init__(self) -> None:
        self._stalls: dict[tuple[str, str], _Stall] = {}
        self._lock = threading.Lock()

    def begin(self, reason: str, dependency: str, detail: str) -> bool:
        """`dependency` is stuck (for `reason`); True when this starts the stall (then the
        `dependency_stalled` record is written). Call from the event loop."""
        with self._lock:
            key = (reason, dependency)
            stall = self._stalls.get(key)
            if stall is not None:
                stall.detail = detail
                return False
            self._stalls[key] = _Stall(detail, time.time())
        structlog.get_logger().warning(
            "dependency_stalled", reason=reason, dependency=dependency, error=detail
        )
        return True

    def end(self, reason: str, dependency: str) -> bool:
        """`dependency` answers again; True when a stall ended (`dependency_recovered`)."""
        with self._lock:
            stall = self._stalls.pop((reason, dependency), None)
        if stall is None:
            return False
        structlog.get_logger().info(
            "dependency_recovered",
            reason=reason,
            dependency=dependency,
            stalled_s=round(time.time() - stall.since, 3),
        )
        return True

    def stalled(self, reason: str, dependency: str) -> bool:
        return (reason, dependency) in self._stalls

    def current(self, now: float | None = None) -> dict[str, str]:
        """Reason -> what is stuck, in words, for every reason with a stall now."""
        now = time.time() if now is None else now
        with self._lock:
            items = sorted(self._stalls.items())
        found: dict[str, list[str]] = {}
        for (reason, dependency), stall in items:
            found.setdefault(reason, []).append(
                f"{dependency} has not answered for {now - stall.since:.0f} s: {stall.detail}"
            )
        return {reason: "; ".join(words) for reason, words in found.items()}


STALLS = Stalls()
