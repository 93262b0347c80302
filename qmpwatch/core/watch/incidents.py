"""Incidents: crash loops (enough panics, watchdog expiries and crashes within a window) and
transient states that last too long (`vm_stuck_transient`)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmpwatch.core.watch.vmwatch import VmWatch


def incident(watch: VmWatch, now: float, what: str) -> None:
    """A crash-like incident (a guest panic, a watchdog expiry, QEMU gone): enough of them
    within the window are a crash loop, one alert that resolves after a quiet time."""
    cfg = watch.lifecycle
    watch.incidents.append((now, what))
    if watch.loop_quiet_at is not None:
        watch.loop_quiet_at = now + cfg.crash_loop_quiet_s
        return
    first = watch.incidents[0][0]
    if len(watch.incidents) < cfg.crash_loop_count or now - first > cfg.crash_loop_window_s:
        return
    watch.loop_quiet_at = now + cfg.crash_loop_quiet_s
    counts = Counter(kind for _, kind in watch.incidents)
    words = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    watch.book.fire(
        now,
        "vm_crash_loop",
        "critical",
        f"VM {watch.vm} is in a crash loop: {len(watch.incidents)} incidents within "
        f"{now - first:.0f} s ({words})",
        cause="crash_loop",
        details={
            "incidents": len(watch.incidents),
            "window_s": cfg.crash_loop_window_s,
            "by_kind": dict(counts),
        },
    )


def loop_quiet(watch: VmWatch, now: float) -> None:
    watch.loop_quiet_at = None
    watch.incidents.clear()
    watch.book.resolve(
        now,
        lambda a: a.kind == "vm_crash_loop",
        f"no incident for {watch.lifecycle.crash_loop_quiet_s:g} s",
    )


def stuck(watch: VmWatch, now: float) -> None:
    watch.transient_due = None
    since = watch.transient_since if watch.transient_since is not None else now
    watch.book.fire(
        now,
        "vm_stuck_transient",
        "warning",
        f"VM {watch.vm} has been in state {watch.status} for {now - since:.0f} s "
        f"(more than {watch.lifecycle.transient_state_max_s:g} s)",
        cause=f"transient:{watch.status}",
        details={"status": watch.status, "since_s": round(now - since, 3)},
    )
