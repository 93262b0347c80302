"""Incidents: crash loops (enough panics, watchdog expiries and crashes within a window) and
transient states that last too long (`vm_stuck_transient`)."""

from __future__ import annotations

from collections import Counter, deque
from typing import TYPE_CHECKING

from qmpwatch.core.alert import CRASH_KINDS, Severity

if TYPE_CHECKING:
    from qmpwatch.core.watch.vmwatch import VmWatch


class CrashLoop:
    """The latest incidents (time, what), and while vm_crash_loop fires, when it resolves if
    no other incident comes (`quiet_at`)."""

    def __init__(self, count: int) -> None:
        self.recent: deque[tuple[float, str]] = deque(maxlen=count)
        self.quiet_at: float | None = None

    def due(self) -> float | None:
        """When the crash loop's quiet end is due (None: no crash loop firing)."""
        return self.quiet_at

    def resize(self, count: int) -> None:
        """Keep `count` incidents from now on (a reload), the latest ones."""
        self.recent = deque(self.recent, maxlen=count)

    def downgrade(self, kind: str, severity: Severity) -> Severity:
        """The alert book's adjuster: while vm_crash_loop fires, a crash is `info` (the crash
        loop alert is the page)."""
        if kind in CRASH_KINDS and self.quiet_at is not None:
            return "info"
        return severity


class Transient:
    """A transient status (migration, -S, snapshots): since when, and when it is "stuck"."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.due_at: float | None = None

    def due(self) -> float | None:
        """When the state counts as stuck (None: not in a transient state, or already)."""
        return self.due_at


def incident(watch: VmWatch, now: float, what: str) -> None:
    """A crash-like incident (a guest panic, a watchdog expiry, QEMU gone): enough of them
    within the window are a crash loop, one alert that resolves after a quiet time."""
    cfg = watch.lifecycle
    watch.crash_loop.recent.append((now, what))
    if watch.crash_loop.quiet_at is not None:
        watch.crash_loop.quiet_at = now + cfg.crash_loop_quiet_s
        return
    first = watch.crash_loop.recent[0][0]
    if len(watch.crash_loop.recent) < cfg.crash_loop_count or now - first > cfg.crash_loop_window_s:
        return
    watch.crash_loop.quiet_at = now + cfg.crash_loop_quiet_s
    counts = Counter(kind for _, kind in watch.crash_loop.recent)
    words = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    watch.book.fire(
        now,
        "vm_crash_loop",
        "critical",
        f"VM {watch.vm} is in a crash loop: {len(watch.crash_loop.recent)} incidents within "
        f"{now - first:.0f} s ({words})",
        cause="crash_loop",
        details={
            "incidents": len(watch.crash_loop.recent),
            "window_s": cfg.crash_loop_window_s,
            "by_kind": dict(counts),
        },
    )


def loop_quiet(watch: VmWatch, now: float) -> None:
    watch.crash_loop.quiet_at = None
    watch.crash_loop.recent.clear()
    watch.book.resolve(
        now,
        lambda a: a.kind == "vm_crash_loop",
        f"no incident for {watch.lifecycle.crash_loop_quiet_s:g} s",
    )


def stuck(watch: VmWatch, now: float) -> None:
    watch.transient.due_at = None
    since = watch.transient.since if watch.transient.since is not None else now
    watch.book.fire(
        now,
        "vm_stuck_transient",
        "warning",
        f"VM {watch.vm} has been in state {watch.run.status} for {now - since:.0f} s "
        f"(more than {watch.lifecycle.transient_state_max_s:g} s)",
        cause=f"transient:{watch.run.status}",
        details={"status": watch.run.status, "since_s": round(now - since, 3)},
    )
