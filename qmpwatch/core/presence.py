"""Whether QEMU is there: connected, gone cleanly, or not reachable (and since when).

Pure: time is passed in. `VmWatch` owns one `Presence` per VM and feeds it the session's
changes (connected, ended, a connect attempt failed). It answers three questions: when the
VM becomes *unreachable* (not connected for `lifecycle.unreachable_after_s`, unless qmpwatch
saw QEMU end cleanly), why a VM that is not connected is so, in words (`qmpwatch status`),
and the plain facts of a crash (`crash_details`: pid, socket, last status, how long it ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNREACHABLE = "vm_unreachable"


@dataclass(slots=True)
class Presence:
    """One VM's connection history, as far as alerts and `status` need it."""

    unreachable_after_s: float
    down_since: float | None = None  # not connected since (None: connected, or ended cleanly)
    ended_cleanly: str = ""  # "" or the words of a clean end ("shut down (host-signal)")
    failure_reason: str = ""  # the latest failed attempt: a vm_connect_failed reason
    failure: str = ""  # ... and its sentence
    attempts: int = 0  # failed attempts since the VM was last connected
    lost: str = ""  # how the last link ended, when not cleanly ("closed: ...")
    fired: bool = False  # vm_unreachable is firing
    connected_at: float | None = None  # when the current (or last) link came up
    where: str = ""  # its socket or URI
    pid: int | None = None  # QEMU's PID behind it, when known

    def start(self, now: float, last_status: str | None) -> None:
        """The VM is watched from `now` on, not connected yet; a VM last known shut down
        (before a restart) ended cleanly as far as anyone can tell."""
        if last_status == "shutdown":
            self.ended_cleanly = "shut down before qmpwatch started"
        else:
            self.down_since = now

    def connected(self, now: float, where: str, pid: int | None) -> None:
        self.down_since = None
        self.ended_cleanly = ""
        self.failure_reason = self.failure = self.lost = ""
        self.attempts = 0
        self.connected_at = now
        self.where = where
        self.pid = pid

    def ended(self, now: float, clean: str, lost: str = "") -> None:
        """The link ended; `clean`: the words of a clean end, "" otherwise; `lost`: how it
        ended otherwise, in words."""
        self.ended_cleanly = clean
        self.lost = "" if clean else lost
        self.down_since = None if clean else now

    def failed(self, now: float, reason: str, detail: str) -> None:
        """An attempt to reach QEMU failed."""
        self.failure_reason, self.failure = reason, detail
        self.attempts += 1
        if self.down_since is None and not self.ended_cleanly:
            self.down_since = now

    def due(self) -> float | None:
        """When vm_unreachable is to be raised (None: not due at all)."""
        if self.fired or self.down_since is None or self.unreachable_after_s <= 0:
            return None
        return self.down_since + self.unreachable_after_s

    def why(self) -> str:
        """Why the VM is not connected, in words ("" when nothing is known)."""
        if self.ended_cleanly:
            return f"QEMU is gone: {self.ended_cleanly}"
        if self.failure:
            return f"cannot connect ({self.failure_reason}): {self.failure}"
        if self.lost:
            return f"not connected since its link ended ({self.lost})"
        return ""

    def unreachable_details(self, now: float) -> dict[str, Any]:
        since = self.down_since if self.down_since is not None else now
        return {
            "reason": self.failure_reason or "not_connected",
            "error": self.failure,
            "attempts": self.attempts,
            "unreachable_s": round(now - since, 3),
            "socket": self.where,
        }

    def crash_details(self, now: float, last_status: str | None, error: str) -> dict[str, Any]:
        """The plain facts of a crash: pid, socket or URI, last status and how long it ran."""
        details: dict[str, Any] = {
            "error": error,
            "socket": self.where,
            "last_status": last_status or "unknown",
        }
        if self.pid is not None:
            details["pid"] = self.pid
        if self.connected_at is not None:
            details["ran_s"] = round(now - self.connected_at, 3)
        return details
