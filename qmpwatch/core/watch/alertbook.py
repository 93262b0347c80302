"""The alert book of one VM: alerts fired, resolved and restored, with adjusters.

An adjuster may change an alert's severity before it is recorded (as structlog applies
processors): the crash-loop downgrade makes a crash `info` while `vm_crash_loop` pages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from qmpwatch.core.alert import (
    RESOLVABLE_KINDS,
    Alert,
    Severity,
    resolved_because,
    resolved_summary,
)

if TYPE_CHECKING:
    from qmpwatch.core.watch.output import WatchOutput

Adjuster = Callable[[str, Severity], Severity]  # (kind, severity) -> the severity recorded


class AlertBook:
    """The alerts firing for one VM (fingerprint -> alert), until resolved."""

    def __init__(self, vm: str, out: WatchOutput, adjusters: tuple[Adjuster, ...] = ()) -> None:
        self.vm = vm
        self.out = out
        self.adjusters = adjusters
        self.firing: dict[str, Alert] = {}

    def fire(
        self,
        now: float,
        kind: str,
        severity: Severity,
        summary: str,
        *,
        cause: str,
        details: Mapping[str, Any],
        qemu_time: str | None = None,
    ) -> Alert:
        """Record and hand on a new alert, or return the same one already firing."""
        full = dict(details)
        if qemu_time is not None:
            full["qemu_time"] = qemu_time
        for adjust in self.adjusters:
            severity = adjust(kind, severity)
        alert = Alert(kind, severity, self.vm, summary, cause, now, full)
        if alert.fingerprint in self.firing:
            return self.firing[alert.fingerprint]  # already firing: one alert, not a duplicate
        self.out.record(
            "alert",
            severity,
            now,
            {
                "alert": kind,
                "severity": severity,
                "summary": summary,
                "fingerprint": alert.fingerprint,
                "details": full,
            },
        )
        if alert.kind in RESOLVABLE_KINDS:
            self.firing[alert.fingerprint] = alert
        self.out.raise_alert(alert)
        return alert

    def resolve(self, now: float, which: Callable[[Alert], bool], reason: str) -> None:
        """Resolve every firing alert `which` selects, saying `reason`."""
        for fingerprint, alert in list(self.firing.items()):
            if which(alert):
                del self.firing[fingerprint]
                self.out.record(
                    "alert_resolved",
                    "info",
                    now,
                    {
                        "alert": alert.kind,
                        "fingerprint": fingerprint,
                        "summary": alert.summary,
                        "reason": reason,
                        "resolved_summary": resolved_summary(alert.summary, reason),
                    },
                )
                self.out.resolve_alert(resolved_because(alert, reason), now)

    def restore(self, alerts: list[Alert]) -> None:
        """Alerts still firing when the daemon last stopped: firing again, unrecorded."""
        for alert in alerts:
            self.firing[alert.fingerprint] = alert
