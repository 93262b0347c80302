"""Follow-ups: the expectations events open (tracker.py), and what their ends mean.

A satisfied expectation may stand for an alert (a disk error or a watchdog pausing the VM);
a missed one is `followup_missing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpwatch.core.alert import stop_alert_firing
from qmpwatch.core.events import BlockIoError, Event, Shutdown, Watchdog
from qmpwatch.core.tracker import Ended
from qmpwatch.core.watch import runstate
from qmpwatch.core.watch.storage import disk_fields, disk_name, io_error_words

if TYPE_CHECKING:
    from qmpwatch.core.watch.vmwatch import VmWatch


def track_followups(watch: VmWatch, event: Event, now: float) -> None:
    """Close the expectations this event satisfies, then open the one it causes."""
    qualified = f"SHUTDOWN:{event.reason}" if isinstance(event, Shutdown) else ""
    satisfied = watch.tracker.satisfy(event.name, now, qualified)
    if satisfied:
        ended(watch, satisfied)
    rule = watch.rules.opened_by(event, watch.no_shutdown, watch.run.stopped is True)
    if rule is not None:
        watch.tracker.open(rule, event, now)


def ended(watch: VmWatch, ended: list[Ended]) -> None:
    for end in ended:
        exp = end.expectation
        rule = exp.rule
        base = {"cause": rule.cause, "expected": rule.expected, "rule": rule.key}
        if end.outcome == "satisfied":
            watch.out.record(
                "followup_satisfied",
                "info",
                end.at,
                {**base, "latency_ms": round(end.latency_s * 1000, 3)},
            )
            if rule.alert is not None:
                alert_for_satisfied(watch, rule.alert, exp.cause, end.at)
            elif rule.expected == "STOP" and rule.cause == "SHUTDOWN":
                runstate.set_status(watch, "shutdown", end.at)
            continue
        watch.out.record(
            "followup_missed",
            "warning",
            end.at,
            {**base, "deadline_s": rule.deadline_s, "reason": end.reason},
        )
        if end.reason == "deadline":
            hung = rule.expected == "SHUTDOWN"
            watch.book.fire(
                end.at,
                "followup_missing",
                "critical" if hung else "warning",
                f"VM {watch.vm}: no {rule.expected} within {rule.deadline_s:g} s after "
                f"{_describe_cause(exp.cause)}" + (" (the guest looks hung)" if hung else ""),
                cause=f"{rule.key}:{exp.cause.seconds}.{exp.cause.microseconds:06d}",
                details={
                    "rule": rule.key,
                    "cause_event": rule.cause,
                    "expected": rule.expected,
                },
                qemu_time=exp.cause.qemu_time,
            )


def alert_for_satisfied(watch: VmWatch, kind: str, cause: Event, now: float) -> None:
    if isinstance(cause, BlockIoError):
        watch.resumer.nospace = cause.nospace
        runstate.set_status(watch, "io-error", now, io_error_words(cause))
        if stop_alert_firing(watch.firing.values(), "io-error", kind):
            return  # the pause found at connect, paused again: one incident, one page
        watch.book.fire(
            now,
            kind,
            "critical",
            f"VM {watch.vm} paused: {io_error_words(cause)}",
            cause=f"BLOCK_IO_ERROR:{disk_name(cause)}",
            details={
                "device": cause.device,
                "operation": cause.operation,
                "status": "io-error",
                "cause_event": "BLOCK_IO_ERROR",
                **{k: cause.data[k] for k in ("node-name", "reason", "nospace") if k in cause.data},
                **disk_fields(watch, cause),
            },
            qemu_time=cause.qemu_time,
        )
    elif isinstance(cause, Watchdog):
        runstate.set_status(
            watch, "watchdog", now, "paused by its watchdog: the guest stopped feeding it"
        )
        watch.book.fire(
            now,
            kind,
            "critical",
            f"VM {watch.vm} paused by its watchdog: the guest stopped feeding it",
            cause="WATCHDOG:pause",
            details={"status": "watchdog", "cause_event": "WATCHDOG", "action": cause.action},
            qemu_time=cause.qemu_time,
        )


def _describe_cause(event: Event) -> str:
    action = getattr(event, "action", None)
    return f"{event.name} (action {action})" if isinstance(action, str) else event.name
