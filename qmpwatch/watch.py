"""The watch core: everything qmpwatch decides about one VM, as a pure state machine.

`VmWatch` is fed decoded events, run statuses and session changes, with the clock passed in
(`now`, epoch seconds). It writes log records, raises and resolves alerts and asks for
`query-status` through a `WatchOutput`, and does no I/O itself. The daemon drives it from a
QMP session; `qmpwatch replay` drives it from a captured stream with QEMU's timestamps as the
clock; both therefore log exactly the same records for the same input.

Per event: the `qmp_event` record is written first (`WatchOutput.qmp_event`; its fields are
`logs.qmp_event_fields`), then every handler that the dispatch table `HANDLERS` lists for the
event's name runs in order. Adding behaviour for an event is one entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from qmpwatch.alert import STOPPED_KINDS, Alert, Severity, classify_status
from qmpwatch.config import FollowupConfig
from qmpwatch.errors import DecodeError
from qmpwatch.events import (
    BlockIoError,
    Event,
    GuestPanicked,
    Watchdog,
)
from qmpwatch.tracker import QEMU_EXIT, Ended, FollowUpTracker, Rules

RAW_LIMIT = 2048  # characters of a bad message kept in its qmp_decode_error record


class WatchOutput(Protocol):
    """Where the core's decisions go; the daemon and `replay` each provide one."""

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None:
        """Write one log record (`kind` is the record's `event` name)."""

    def qmp_event(self, event: Event, now: float) -> None:
        """Write the `qmp_event` record of `event`: level info, the fields that
        `logs.qmp_event_fields` gives (`record("qmp_event", "info", now,
        qmp_event_fields(event))`, or a faster equivalent)."""

    def raise_alert(self, alert: Alert) -> None:
        """Hand a new alert to the dispatcher (its `alert` record is already written)."""

    def resolve_alert(self, alert: Alert, now: float) -> None:
        """Hand a resolved alert to the dispatcher (its record is already written)."""

    def query_status(self) -> None:
        """Run `query-status` off the reader task and call `on_status` (or `status_unknown`)."""


Handler = Callable[["VmWatch", Event, float], None]


class VmWatch:
    """The state qmpwatch keeps about one VM and the rules it applies."""

    def __init__(
        self,
        vm: str,
        out: WatchOutput,
        *,
        followup: FollowupConfig,
        no_shutdown: bool = False,
        client_stop_severity: str = "warning",
        last_status: str | None = None,
        handlers: Mapping[str, tuple[Handler, ...]] | None = None,
    ) -> None:
        self.vm = vm
        self.out = out
        self.rules = Rules(followup)
        self.tracker = FollowUpTracker()
        self.no_shutdown = no_shutdown
        self.client_stop_severity = client_stop_severity
        self.handlers = HANDLERS if handlers is None else handlers
        self.status = last_status  # last known run status (query-status word), None: unknown
        self.firing: dict[str, Alert] = {}  # fingerprint -> alert, until resolved
        self.pending_stop: Event | None = None  # an unexplained STOP awaiting its status
        self.saw_shutdown = False  # in this session
        # STOP/RESUME events handled so far. An answer to query-status carries the count at
        # the moment it was read (`as_of`); if a STOP/RESUME was handled since, the answer is
        # older than what the events said, and is not applied.
        self.run_changes = 0

    # -- inputs -----------------------------------------------------------------------------

    def on_event(self, event: Event, now: float) -> None:
        """One event, received at `now`."""
        if self.tracker.waiting:
            self._ended(self.tracker.expire(now))
        self.out.qmp_event(event, now)
        handlers = self.handlers.get(event.name)
        if handlers is not None:
            for handler in handlers:
                handler(self, event, now)

    def on_decode_error(self, err: DecodeError, now: float) -> None:
        """A message that could not be decoded; logged with its raw text, nothing else changes."""
        raw = err.raw if len(err.raw) <= RAW_LIMIT else err.raw[:RAW_LIMIT] + "…"
        self.out.record(
            "qmp_decode_error",
            "warning",
            now,
            {"error": err.error, "raw": raw, "raw_length": len(err.raw)},
        )

    def tick(self, now: float) -> None:
        """Time passes: end the expectations whose deadline is over."""
        if self.tracker.waiting:
            self._ended(self.tracker.expire(now))

    def next_deadline(self) -> float | None:
        return self.tracker.next_deadline()

    def on_connected(
        self, now: float, status: str, fields: Mapping[str, Any], as_of: int | None = None
    ) -> None:
        """A session is up and `query-status` said `status` (read when `run_changes` was
        `as_of`, None: just now); `fields` go into `vm_connected`."""
        self.out.record("vm_connected", "info", now, {**fields, "status": status})
        self._resolve(now, lambda a: a.kind == "vm_crashed")
        if as_of is not None and as_of != self.run_changes:
            return  # a STOP/RESUME of this session came after the answer: the events are newer
        previous = self.status
        self.status = status
        if status == "running":
            self._resolve(now, lambda a: a.kind in STOPPED_KINDS)
            return
        stop = classify_status(status, self.client_stop_severity)
        if stop is None or status == previous:
            return
        before = "unknown" if previous is None else previous
        self._raise(
            now,
            "vm_state_changed_while_unmonitored",
            stop.severity,
            f"VM {self.vm} is {stop.what} (status {status}), "
            f"which qmpwatch did not see happen (last known: {before})",
            cause=f"status:{status}",
            details={"status": status, "previous_status": previous},
        )

    def on_status(self, status: str, now: float, as_of: int | None = None) -> None:
        """A `query-status` answer asked for by `query_status()`, read when `run_changes`
        was `as_of` (None: just now).

        Ignored when a STOP or RESUME was handled after the answer was read: the reader
        passes such events on before the task that asked sees its answer, and they are newer
        (a new STOP asks again).
        """
        if as_of is not None and as_of != self.run_changes:
            return
        self.status = status
        if self.pending_stop is not None:
            self._classify_stop(self.pending_stop, status, now)
        if status == "running":
            self._resolve(now, lambda a: a.kind in STOPPED_KINDS)

    def status_unknown(self, now: float, why: str) -> None:
        """`query-status` could not be answered: classify a pending stop with no status."""
        if self.pending_stop is not None:
            self._classify_stop(self.pending_stop, None, now, why)

    def on_disconnected(self, now: float, cause: str, error: str = "") -> None:
        """The session ended: `cause` is "eof", "error" or "closed" (qmpwatch closed it)."""
        self.tick(now)  # a deadline already over is missed, even if no tick() came in time
        exited = self.tracker.satisfy(QEMU_EXIT, now) if cause != "closed" else []
        self._ended(exited)
        # qmpwatch closing the session says nothing about QEMU, even after a SHUTDOWN (QEMU
        # under -no-shutdown is still there, stopped): only an ending QEMU can exit cleanly.
        clean = cause != "closed" and (self.saw_shutdown or bool(exited))
        logged_cause = "shutdown" if clean else cause
        level = "info" if clean or cause == "closed" else "warning"
        self.out.record("vm_disconnected", level, now, {"cause": logged_cause, "error": error})
        self._ended(self.tracker.abandon(now))
        if self.pending_stop is not None and cause == "closed":
            # qmpwatch itself closed the session (stopping, reload): nothing happened to the
            # VM; the next session's resync reports the stop if the VM is still stopped.
            self.pending_stop = None
        elif self.pending_stop is not None:
            self._classify_stop(self.pending_stop, None, now, "the session ended")
        if cause != "closed":
            if clean:
                self.status = "shutdown"
            else:
                self.status = None
                self._raise(
                    now,
                    "vm_crashed",
                    "critical",
                    f"QEMU of VM {self.vm} went away without a SHUTDOWN event "
                    f"(crashed or killed): {error or 'end of file on the monitor'}",
                    cause="EOF",
                    details={"error": error},
                )
        self.saw_shutdown = False

    # -- decisions --------------------------------------------------------------------------

    def _raise(
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
        full = dict(details)
        if qemu_time is not None:
            full["qemu_time"] = qemu_time
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
        if alert.kind in STOPPED_KINDS or alert.kind == "vm_crashed":
            self.firing[alert.fingerprint] = alert
        self.out.raise_alert(alert)
        return alert

    def _resolve(self, now: float, which: Callable[[Alert], bool]) -> None:
        for fingerprint, alert in list(self.firing.items()):
            if which(alert):
                del self.firing[fingerprint]
                self.out.record(
                    "alert_resolved",
                    "info",
                    now,
                    {"alert": alert.kind, "fingerprint": fingerprint, "summary": alert.summary},
                )
                self.out.resolve_alert(alert, now)

    def _ended(self, ended: list[Ended]) -> None:
        for end in ended:
            exp = end.expectation
            rule = exp.rule
            base = {"cause": rule.cause, "expected": rule.expected, "rule": rule.key}
            if end.outcome == "satisfied":
                self.out.record(
                    "followup_satisfied",
                    "info",
                    end.at,
                    {**base, "latency_ms": round(end.latency_s * 1000, 3)},
                )
                if rule.alert is not None:
                    self._alert_for_satisfied(rule.alert, exp.cause, end.at)
                elif rule.expected == "STOP" and rule.cause == "SHUTDOWN":
                    self.status = "shutdown"
                continue
            self.out.record(
                "followup_missed",
                "warning",
                end.at,
                {**base, "deadline_s": rule.deadline_s, "reason": end.reason},
            )
            if end.reason == "deadline":
                hung = rule.expected == "SHUTDOWN"
                self._raise(
                    end.at,
                    "followup_missing",
                    "critical" if hung else "warning",
                    f"VM {self.vm}: no {rule.expected} within {rule.deadline_s:g} s after "
                    f"{_describe_cause(exp.cause)}" + (" (the guest looks hung)" if hung else ""),
                    cause=f"{rule.key}:{exp.cause.seconds}.{exp.cause.microseconds:06d}",
                    details={
                        "rule": rule.key,
                        "cause_event": rule.cause,
                        "expected": rule.expected,
                    },
                    qemu_time=exp.cause.qemu_time,
                )

    def _alert_for_satisfied(self, kind: str, cause: Event, now: float) -> None:
        if isinstance(cause, BlockIoError):
            self.status = "io-error"
            self._raise(
                now,
                kind,
                "critical",
                f"VM {self.vm} paused: {_io_error_words(cause)}",
                cause=f"BLOCK_IO_ERROR:{_disk_name(cause)}",
                details={
                    "device": cause.device,
                    "operation": cause.operation,
                    "status": "io-error",
                    "cause_event": "BLOCK_IO_ERROR",
                    **{
                        k: cause.data[k]
                        for k in ("node-name", "reason", "nospace")
                        if k in cause.data
                    },
                },
                qemu_time=cause.qemu_time,
            )
        elif isinstance(cause, Watchdog):
            self.status = "watchdog"
            self._raise(
                now,
                kind,
                "critical",
                f"VM {self.vm} paused by its watchdog: the guest stopped feeding it",
                cause="WATCHDOG:pause",
                details={"status": "watchdog", "cause_event": "WATCHDOG", "action": cause.action},
                qemu_time=cause.qemu_time,
            )

    def _classify_stop(self, stop: Event, status: str | None, now: float, why: str = "") -> None:
        self.pending_stop = None
        cls = classify_status(status, self.client_stop_severity)
        if cls is None:
            return
        details: dict[str, Any] = {"status": status, "cause_event": "STOP"}
        if why:
            details["status_error"] = why
        self._raise(
            now,
            cls.kind,
            cls.severity,
            f"VM {self.vm} {cls.what}",
            cause=f"STOP:{status}",
            details=details,
            qemu_time=stop.qemu_time,
        )


def _disk_name(event: BlockIoError) -> str:
    """The failing disk: its device, or (a -blockdev disk reports device "") its node-name."""
    node = event.data.get("node-name")
    return event.device or (node if isinstance(node, str) else "")


def _io_error_words(event: BlockIoError) -> str:
    reason = event.reason or ("No space left on device" if event.nospace else "")
    words = f"{event.operation} error on {_disk_name(event) or 'a disk'}"
    return f"{words} ({reason})" if reason else words


def _describe_cause(event: Event) -> str:
    action = getattr(event, "action", None)
    return f"{event.name} (action {action})" if isinstance(action, str) else event.name


# ---------------------------------------------------------------------------------------------
# Handlers: what each event does beyond being logged.


def track_followups(watch: VmWatch, event: Event, now: float) -> None:
    """Close the expectations this event satisfies, then open the one it causes."""
    satisfied = watch.tracker.satisfy(event.name, now)
    if satisfied:
        watch._ended(satisfied)
    rule = watch.rules.opened_by(event, watch.no_shutdown)
    if rule is not None:
        watch.tracker.open(rule, event, now)


def on_stop(watch: VmWatch, event: Event, now: float) -> None:
    """A STOP explains itself through a satisfied expectation, or gets classified."""
    watch.run_changes += 1
    satisfied = watch.tracker.satisfy("STOP", now)
    if satisfied:
        watch._ended(satisfied)
        return
    if watch.saw_shutdown:  # SHUTDOWN then STOP with -no-shutdown unknown: status is shutdown
        watch.status = "shutdown"
        return
    watch.pending_stop = event
    watch.out.query_status()


def on_resume(watch: VmWatch, event: Event, now: float) -> None:
    """Running again: a stop not yet classified was a client's pause; stopped alerts resolve."""
    watch.run_changes += 1
    if watch.pending_stop is not None:
        watch._classify_stop(watch.pending_stop, "paused", now, "resumed before query-status")
    watch.status = "running"
    watch._resolve(now, lambda a: a.kind in STOPPED_KINDS)


def on_shutdown(watch: VmWatch, event: Event, now: float) -> None:
    """Remember the SHUTDOWN, so that the end of the session is a clean exit."""
    watch.saw_shutdown = True


def on_watchdog(watch: VmWatch, event: Event, now: float) -> None:
    """Every watchdog expiry is an alert of its own, whatever follows."""
    assert isinstance(event, Watchdog)
    watch._raise(
        now,
        "watchdog_fired",
        "critical" if event.action not in ("none", "debug") else "warning",
        f"VM {watch.vm}: the guest watchdog expired; QEMU's action: {event.action}",
        cause=f"WATCHDOG:{event.action}",
        details={"action": event.action},
        qemu_time=event.qemu_time,
    )


def on_guest_panicked(watch: VmWatch, event: Event, now: float) -> None:
    """A guest panic is an alert whatever QEMU does next."""
    assert isinstance(event, GuestPanicked)
    watch.status = "guest-panicked" if event.action == "pause" else watch.status
    watch._raise(
        now,
        "vm_panicked",
        "critical",
        f"VM {watch.vm}: the guest kernel panicked (QEMU's action: {event.action})",
        cause=f"GUEST_PANICKED:{event.action}",
        details={"action": event.action, "status": "guest-panicked"},
        qemu_time=event.qemu_time,
    )


HANDLERS: dict[str, tuple[Handler, ...]] = {
    "STOP": (on_stop,),
    "RESUME": (on_resume,),
    "BLOCK_IO_ERROR": (track_followups,),
    "SHUTDOWN": (on_shutdown, track_followups),
    "RESET": (track_followups,),
    "WATCHDOG": (on_watchdog, track_followups),
    "GUEST_PANICKED": (on_guest_panicked, track_followups),
}


def with_handlers(extra: Mapping[str, tuple[Handler, ...]]) -> dict[str, tuple[Handler, ...]]:
    """The default table plus `extra` handlers (run after the default ones)."""
    table = dict(HANDLERS)
    for name, handlers in extra.items():
        table[name] = table.get(name, ()) + handlers
    return table
