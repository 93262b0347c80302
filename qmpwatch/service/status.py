"""What `qmpwatch status` and `qmpwatch tail` read from the running daemon.

`snapshot` is the status document (version 1, a contract: keys are only added): every VM's
source, connection, run status, why, since when, and its firing alerts. `RecordTap` copies
the records of VMs to followers (`qmpwatch tail`), each through a bounded queue: a follower
that cannot keep up loses its oldest records and is told how many.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from qmpwatch import __version__
from qmpwatch.core.times import iso_from_epoch
from qmpwatch.session.session import VmSession

STATUS_VERSION = 1
FOLLOWER_QUEUE = 10_000  # records a slow follower may lag behind; older ones are dropped
FOLLOWERS_MAX = 32


class Held(Protocol):
    """A session and the source it belongs to (the supervisor's view)."""

    session: VmSession
    source: str


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else iso_from_epoch(epoch)


def vm_status(name: str, held: Held) -> dict[str, Any]:
    """One VM's entry of the status document."""
    session = held.session
    watch = session.watch
    alerts = sorted(watch.firing.values(), key=lambda a: a.raised_at)
    return {
        "vm": name,
        "source": held.source,
        "socket": session.where,
        "connected": session.connected,
        "connected_since" if session.connected else "disconnected_since": _iso(session.since),
        "status": watch.status or "unknown",
        "status_since": _iso(watch.status_since),
        "why": watch.status_why,
        "alerts": [
            {
                "alert": a.kind,
                "severity": a.severity,
                "summary": a.summary,
                "since": _iso(a.raised_at),
                "fingerprint": a.fingerprint,
            }
            for a in alerts
        ],
    }


def snapshot(
    host: str,
    sessions: Iterable[tuple[str, Held]],
    now: float,
    followers: int = 0,
    degraded: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The status document: every VM, whether any needs attention, and what is degraded
    (reason -> a sentence, as `/healthz` says it)."""
    vms = [vm_status(name, held) for name, held in sorted(sessions, key=lambda p: p[0])]
    attention = [
        vm["vm"] for vm in vms if not vm["connected"] or vm["status"] != "running" or vm["alerts"]
    ]
    return {
        "version": STATUS_VERSION,
        "qmpwatch": __version__,
        "host": host,
        "time": iso_from_epoch(now),
        "vms": vms,
        "attention": attention,
        "followers": followers,  # `qmpwatch tail`s following the daemon now
        "degraded": dict(degraded or {}),
    }


@dataclass(slots=True)
class Follower:
    """One `qmpwatch tail`: the records it gets, and how many it lost by lagging."""

    vm: str  # "" for every VM
    queue: asyncio.Queue[dict[str, Any]]
    dropped: int = 0

    async def next_lines(self) -> bytes:
        """The records waiting (at least one), as JSON lines; first, how many were lost."""
        batch = [await self.queue.get()]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        if self.dropped:
            batch.insert(0, {"event": "tail_records_dropped", "dropped": self.dropped})
            self.dropped = 0
        return b"".join(orjson.dumps(record, default=str) + b"\n" for record in batch)


class RecordTap:
    """Copies VM records to the followers that asked for them."""

    def __init__(self) -> None:
        self._followers: list[Follower] = []
        self.active = False  # any follower: checked per record before anything is built

    def offer(self, vm: str, record: dict[str, Any]) -> None:
        """A record of `vm` was written (call only while `active`)."""
        for follower in self._followers:
            if follower.vm and follower.vm != vm:
                continue
            queue = follower.queue
            if queue.full():
                queue.get_nowait()
                follower.dropped += 1
            queue.put_nowait(record)

    @property
    def full(self) -> bool:
        return len(self._followers) >= FOLLOWERS_MAX

    @property
    def count(self) -> int:
        return len(self._followers)

    @contextlib.asynccontextmanager
    async def follow(self, vm: str = "") -> AsyncIterator[Follower]:
        """The records of `vm` (all VMs: "") for the block's duration."""
        follower = Follower(vm, asyncio.Queue(FOLLOWER_QUEUE))
        self._followers.append(follower)
        self.active = True
        try:
            yield follower
        finally:
            self._followers.remove(follower)
            self.active = bool(self._followers)
