"""What `qmpwatch status` and `qmpwatch tail` read from the running daemon.

`snapshot` is the status document (version 1, a contract: keys are only added): every VM's
source, connection, run status, why, since when, and its firing alerts. `RecordTap` copies
the records of VMs to followers (`qmpwatch tail`), each through a queue bounded in records and
bytes: a follower that stops reading is dropped, with a record.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import structlog

from qmpwatch import __version__
from qmpwatch.core.alert import SEVERITIES, Alert
from qmpwatch.core.times import iso_from_epoch
from qmpwatch.session.session import VmSession

STATUS_VERSION = 1
FOLLOWER_QUEUE = 10_000  # records a follower may lag behind before it is dropped
FOLLOWER_BYTES = 4 * 1024 * 1024  # and bytes
FOLLOWERS_MAX = 32
FOLLOWERS_PER_USER = 8  # on the API socket, where SO_PEERCRED tells users apart


class Held(Protocol):
    """A session and the source it belongs to (the supervisor's view)."""

    session: VmSession
    source: str


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else iso_from_epoch(epoch)


def _agent_port(port: dict[str, Any] | None) -> dict[str, Any] | None:
    """The guest agent's port: ``{"open", "since"}``, or None when the VM has none known."""
    return None if port is None else {"open": port["open"], "since": _iso(port["since"])}


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
        "why": why(session, alerts),
        "agent_port": _agent_port(watch.agent.fields()),
        "protection": session.protection_view(),
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


# Alerts that say QEMU is not there: while one fires, it is the reason a VM is not connected.
_ABSENT = ("vm_crashed", "vm_gone_while_unmonitored", "vm_unreachable")


def why(session: VmSession, alerts: list[Alert]) -> str:
    """Why a VM needs attention, in words ("" when it does not): a crash, a clean end, the
    last connect failure, its run status, else its most severe firing alert."""
    watch = session.watch
    if not session.connected:
        gone = [a for a in alerts if a.kind in _ABSENT]
        if gone:
            if gone[0].kind == "vm_crashed" and watch.status_why.startswith("QEMU died:"):
                return watch.status_why  # the crash with its cause, as the host told it
            return gone[0].summary
        presence = watch.presence
        if presence.ended_cleanly:
            return watch.status_why or presence.why()
        if presence.failure:
            return presence.why()
    if watch.status_why:
        return watch.status_why
    if alerts:
        return min(alerts, key=lambda a: SEVERITIES.index(a.severity)).summary
    return "" if session.connected else "not connected yet"


def snapshot(
    host: str,
    sessions: Iterable[tuple[str, Held]],
    now: float,
    followers: int = 0,
    sinks: list[dict[str, Any]] | None = None,
    degraded: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The status document: every VM, whether any needs attention, what is degraded (reason
    -> a sentence, as `/healthz` says it), and `sinks`: how each alert sink fares
    (`AlertDispatcher.sink_report`)."""
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
        "sinks": sinks or [],
        "degraded": dict(degraded or {}),
    }


@dataclass(slots=True)
class Follower:
    """One `qmpwatch tail`: the lines waiting for it, in records and bytes."""

    vm: str  # "" for every VM
    uid: int | None = None  # who follows (SO_PEERCRED), when the socket tells
    lines: collections.deque[bytes] = field(default_factory=collections.deque)
    queued_bytes: int = 0
    dropped: bool = False  # it stopped reading: its stream ends
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Ends the follower's connection at once (its writes may be stuck on a full socket).
    abort: Callable[[], object] | None = None

    async def next_lines(self) -> bytes | None:
        """The records waiting (at least one), as JSON lines; None once dropped."""
        while not self.lines and not self.dropped:
            self.ready.clear()
            await self.ready.wait()
        if self.dropped:
            return None
        batch = b"".join(self.lines)
        self.lines.clear()
        self.queued_bytes = 0
        return batch


class RecordTap:
    """Copies VM records to the followers that asked for them; a follower more than
    FOLLOWER_QUEUE records or FOLLOWER_BYTES behind has stopped reading and is dropped
    (`tail_follower_dropped`)."""

    def __init__(self) -> None:
        self._followers: list[Follower] = []
        self.active = False  # any follower: checked per record before anything is built

    def offer(self, vm: str, record: dict[str, Any]) -> None:
        """A record of `vm` was written (call only while `active`)."""
        line = b""
        for follower in self._followers:
            if (follower.vm and follower.vm != vm) or follower.dropped:
                continue
            line = line or orjson.dumps(record, default=str) + b"\n"
            if (
                len(follower.lines) >= FOLLOWER_QUEUE
                or follower.queued_bytes + len(line) > FOLLOWER_BYTES
            ):
                self._drop(follower)
                continue
            follower.lines.append(line)
            follower.queued_bytes += len(line)
            follower.ready.set()

    @staticmethod
    def _drop(follower: Follower) -> None:
        structlog.get_logger().warning(
            "tail_follower_dropped",
            uid=follower.uid,
            follows=follower.vm or "*",
            queued_records=len(follower.lines),
            queued_bytes=follower.queued_bytes,
            reason="stopped_reading",
        )
        follower.dropped = True
        follower.lines.clear()
        follower.queued_bytes = 0
        follower.ready.set()
        if follower.abort is not None:
            follower.abort()

    @property
    def full(self) -> bool:
        return len(self._followers) >= FOLLOWERS_MAX

    def full_for(self, uid: int | None) -> bool:
        """Whether the user `uid` follows as often as one user may (None: not known)."""
        if uid is None:
            return False
        return sum(1 for f in self._followers if f.uid == uid) >= FOLLOWERS_PER_USER

    @property
    def count(self) -> int:
        return len(self._followers)

    @contextlib.asynccontextmanager
    async def follow(self, vm: str = "", uid: int | None = None) -> AsyncIterator[Follower]:
        """The records of `vm` (all VMs: "") for the block's duration."""
        follower = Follower(vm, uid)
        self._followers.append(follower)
        self.active = True
        try:
            yield follower
        finally:
            self._followers.remove(follower)
            self.active = bool(self._followers)
