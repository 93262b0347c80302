"""Run state: the VM's status, why and since when; STOP, RESUME, RESET and SHUTDOWN.

A STOP the follow-ups do not explain asks `query-status` and is classified by its answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from qmpwatch.core.alert import (
    STOPPED_KINDS,
    TRANSIENT_STATUSES,
    classify_status,
    describe_status,
    stop_alert_firing,
)
from qmpwatch.core.events import Event, Shutdown
from qmpwatch.core.remedy import SETTLE_S
from qmpwatch.core.watch import followups, resume

if TYPE_CHECKING:
    from qmpwatch.core.watch.vmwatch import VmWatch


class RunState:
    """The VM's run state as the events and `query-status` told it."""

    def __init__(self, last_status: str | None) -> None:
        # the last known run status (a query-status word), None: unknown
        self.status: str | None = last_status
        self.status_since: float | None = None  # when it became `status` (None: before start)
        self.status_why = describe_status(last_status)  # why, in words
        # Whether the VM's CPUs are stopped, as the latest STOP/RESUME or status says (None:
        # unknown). A SHUTDOWN or a drained BLOCK_IO_ERROR of a stopped VM expects no STOP.
        self.stopped: bool | None = None
        self.pending_stop: Event | None = None  # an unexplained STOP awaiting its status
        # A SHUTDOWN was seen in this session and the VM has not run since: only then is the
        # end of the session a clean exit (libvirt reboots a -no-shutdown VM with SHUTDOWN,
        # STOP, system_reset and cont, and the VM runs on).
        self.saw_shutdown = False
        self.shutdown_reason = ""  # that SHUTDOWN's reason (host-signal, guest-shutdown, ...)
        # STOP/RESUME events handled so far. An answer to query-status carries the count at
        # the moment it was read (`as_of`); if a STOP/RESUME was handled since, the answer is
        # older than what the events said, and is not applied.
        self.run_changes = 0


T = TypeVar("T")


class RunField(Generic[T]):
    """An attribute of the watch that is its run state's (`watch.status` is `watch.run.status`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, watch: VmWatch, owner: type | None = None) -> T:
        return cast(T, getattr(watch.run, self.name))

    def __set__(self, watch: VmWatch, value: T) -> None:
        setattr(watch.run, self.name, value)


def set_status(watch: VmWatch, status: str | None, now: float, why: str = "") -> None:
    """The VM's run status is now `status` (None: unknown), for the reason `why` (by
    default the status in words); keeps `stopped` and the transient-state timer in line
    with it."""
    if status != watch.run.status or why:
        watch.run.status_since = now
        watch.run.status_why = why or describe_status(status)
    watch.run.status = status
    if status == "io-error":
        watch.resumer.start(now)
    elif status != "running" and watch.resumer.active:
        watch.resumer.stop()  # paused (or ended) for another reason: not ours to resume
    watch.run.stopped = None if status is None else status != "running"
    if status in TRANSIENT_STATUSES:
        if watch.transient.since is None:
            watch.transient.since = now
            watch.transient.due_at = now + watch.lifecycle.transient_state_max_s
        return
    if watch.transient.since is not None:
        watch.transient.since = watch.transient.due_at = None
        watch.book.resolve(
            now,
            lambda a: a.kind == "vm_stuck_transient",
            f"the VM left the transient state (now {status or 'unknown'})",
        )


def classify_stop(
    watch: VmWatch, stop: Event, status: str | None, now: float, why: str = ""
) -> None:
    watch.run.pending_stop = None
    cls = classify_status(status, watch.client_stop_severity)
    firing = watch.firing.values()
    if (
        cls is None
        or (status is not None and stop_alert_firing(firing, status))
        or any(a.kind == cls.kind or (status is None and a.kind in STOPPED_KINDS) for a in firing)
    ):
        return  # no alert due, or the event that stopped the VM raised it: one incident
    details: dict[str, Any] = {"status": status, "cause_event": "STOP"}
    if why:
        details["status_error"] = why
    watch.book.fire(
        now,
        cls.kind,
        cls.severity,
        f"VM {watch.vm} {cls.what}",
        cause=f"STOP:{status}",
        details=details,
        qemu_time=stop.qemu_time,
    )


def on_stop(watch: VmWatch, event: Event, now: float) -> None:
    """A STOP explains itself through a satisfied expectation, or gets classified."""
    watch.run.run_changes += 1
    watch.run.stopped = True
    if watch.resumer.settle_until is not None:  # paused again right after our cont
        resume.resume_failed(watch, now, "paused_again", "")
    satisfied = watch.tracker.satisfy("STOP", now)
    if satisfied:
        followups.ended(watch, satisfied)
        return
    if watch.run.saw_shutdown:  # SHUTDOWN then STOP with -no-shutdown unknown: status is shutdown
        set_status(watch, "shutdown", now)
        return
    watch.run.pending_stop = event
    watch.out.query_status()


def on_resume(watch: VmWatch, event: Event, now: float) -> None:
    """Running again: a stop not yet classified was a client's pause; stopped alerts resolve,
    and an earlier SHUTDOWN no longer explains the end of the session."""
    watch.run.run_changes += 1
    watch.run.saw_shutdown = False
    if watch.run.pending_stop is not None:
        classify_stop(watch, watch.run.pending_stop, "paused", now, "resumed before query-status")
    resumer = watch.resumer
    ours = resumer.sent
    if resumer.active and not ours:
        resumer.stop()  # a person (or another client) resumed it
    set_status(watch, "running", now)
    if ours:  # resolved once it has run for a while (it may pause again at once)
        resumer.settle_until = now + SETTLE_S
        return
    watch.book.resolve(now, lambda a: a.kind in STOPPED_KINDS, "the VM resumed (RESUME)")


def on_reset(watch: VmWatch, event: Event, now: float) -> None:
    """A reset of a running VM reboots a guest that panicked and kept running: it runs again."""
    if watch.run.stopped is not True:
        watch.book.resolve(now, lambda a: a.kind == "vm_panicked", "the guest was reset (RESET)")


def on_shutdown(watch: VmWatch, event: Event, now: float) -> None:
    """Remember the SHUTDOWN, so that the end of the session is a clean exit."""
    watch.run.saw_shutdown = True
    watch.run.shutdown_reason = (event.reason or "") if isinstance(event, Shutdown) else ""


def clean_end_words(cause: str, shutdown_reason: str, exited: bool) -> str:
    """How QEMU ended cleanly, in words: "it shut down (host-signal)"."""
    if cause == "exited":
        return "it ended on purpose, as its manager says"
    if shutdown_reason:
        return f"it shut down ({shutdown_reason})"
    if exited:
        return "it exited, as its watchdog's action poweroff says"
    return "it shut down"
