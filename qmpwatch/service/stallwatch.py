"""The stall watch: the daemon's own lanes (the log, the SQLite journals) looked at twice a
second; a call that has run for `STALL_AFTER_S` is a stall (`qmpwatch.aio.stalls`: degraded,
with a record when it starts and when it ends).

    journal_blocked    the log lane: a write to stdout, the log file or journald's socket
                       has not returned (nobody reads the log)
    state_store_slow   the SQLite lane: a commit of the alert outbox or the state store has
                       not returned (the disk under state_dir stalls, or another process
                       holds the database's lock)

libvirt watches its own connections (`qmpwatch.sources.libvirtthread`): it also probes them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from qmpwatch.aio.lanes import Lane
from qmpwatch.aio.stalls import STALLS

STALL_AFTER_S = 1.0
TICK_S = 0.25


@dataclass(frozen=True, slots=True)
class Watched:
    lane: Lane
    reason: str  # a degraded reason (`qmpwatch.aio.stalls.STALL_REASONS`)
    dependency: str  # what is stuck, in words: a path, "stdout", "journald"
    what: str  # what the lane does: "a write to the log", "a SQLite commit"


async def watch_lanes(watched: list[Watched]) -> None:
    """Report the lanes' stalls until cancelled (and end those still open then)."""
    try:
        while True:
            await asyncio.sleep(TICK_S)
            for w in watched:
                busy = w.lane.busy_for()
                if busy >= STALL_AFTER_S:
                    STALLS.begin(w.reason, w.dependency, f"{w.what} has run for {busy:.1f} s")
                elif STALLS.stalled(w.reason, w.dependency):
                    STALLS.end(w.reason, w.dependency)
    finally:
        for w in watched:
            if STALLS.stalled(w.reason, w.dependency):
                STALLS.end(w.reason, w.dependency)
