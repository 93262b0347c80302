"""`VmWatch`, the facade of the watch core: everything qmpwatch decides about one VM.

`VmWatch` is fed decoded events, run statuses and session changes, with the clock passed in
(`now`, epoch seconds). It writes log records, raises and resolves alerts and asks for
`query-status` through a `WatchOutput`, and does no I/O itself. Per event, every handler the
table `HANDLERS` lists for its name runs in order (docs/architecture.md, "The watch").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qmpwatch.core import agent as agent_port
from qmpwatch.core.agent import AgentPort
from qmpwatch.core.alert import (
    STOPPED_KINDS,
    Alert,
    ClientStopSeverity,
    Severity,
    classify_status,
)
from qmpwatch.core.config import FollowupConfig, LifecycleConfig, RemediateConfig
from qmpwatch.core.crashcause import CrashCause
from qmpwatch.core.errors import DecodeError
from qmpwatch.core.events import Event
from qmpwatch.core.presence import UNREACHABLE, Presence
from qmpwatch.core.remedy import Resumer
from qmpwatch.core.tracker import QEMU_EXIT, FollowUpTracker, Rules
from qmpwatch.core.watch import followups, incidents, resume, runstate, storage
from qmpwatch.core.watch import handlers as handlers_table
from qmpwatch.core.watch.alertbook import AlertBook
from qmpwatch.core.watch.handlers import Handler
from qmpwatch.core.watch.output import WatchOutput
from qmpwatch.core.watch.runstate import RunField
from qmpwatch.core.watch.storage import DiskInfo
from qmpwatch.core.watch.timers import timers

RAW_LIMIT = 2048  # characters of a bad message kept in its qmp_decode_error record

# Alerts that say QEMU is not there; its monitor answering again ends them.
ABSENT_KINDS = frozenset({"vm_crashed", "vm_gone_while_unmonitored"})


class VmWatch:
    """The state qmpwatch keeps about one VM and the rules it applies."""

    # The run state (runstate.RunState), read and written through the watch as before.
    status = RunField[str | None]()  # the last known run status, None: unknown
    status_since = RunField[float | None]()  # when it became `status`
    status_why = RunField[str]()  # why, in words
    stopped = RunField[bool | None]()  # whether the CPUs are stopped (None: unknown)
    pending_stop = RunField[Event | None]()  # an unexplained STOP awaiting its status
    saw_shutdown = RunField[bool]()  # a SHUTDOWN, and the VM has not run since
    shutdown_reason = RunField[str]()  # that SHUTDOWN's reason
    run_changes = RunField[int]()  # STOP/RESUME events handled so far

    def __init__(
        self,
        vm: str,
        out: WatchOutput,
        *,
        followup: FollowupConfig,
        lifecycle: LifecycleConfig | None = None,
        remediate: RemediateConfig | None = None,
        no_shutdown: bool = False,
        client_stop_severity: ClientStopSeverity = "warning",
        last_status: str | None = None,
        handlers: Mapping[str, tuple[Handler, ...]] | None = None,
    ) -> None:
        self.vm = vm
        self.out = out
        self.rules = Rules(followup)
        self.lifecycle = lifecycle if lifecycle is not None else LifecycleConfig()
        self.tracker = FollowUpTracker()
        self.no_shutdown = no_shutdown
        self.client_stop_severity = client_stop_severity
        self.handlers = handlers_table.HANDLERS if handlers is None else handlers
        self.run = runstate.RunState(last_status)  # status, why, since; stops, shutdowns
        self.crash_loop = incidents.CrashLoop(self.lifecycle.crash_loop_count)
        self.book = AlertBook(vm, out, (self.crash_loop.downgrade,))  # the alerts firing
        self.transient = incidents.Transient()  # a transient status: since, when "stuck"
        self.resumer = Resumer(remediate if remediate is not None else RemediateConfig())
        self.disks_state = storage.Disks()  # the images (query-block), thresholds armed
        self.agent = AgentPort(self.lifecycle.agent_absent_after_s)  # the guest agent's port
        self.presence = Presence(self.lifecycle.unreachable_after_s)  # connected, gone, since
        self.timers = timers(self)  # every part's timer, in timers.ORDER
        self._dues = tuple(timer.due for timer in self.timers)

    # -- inputs -----------------------------------------------------------------------------

    def on_event(self, event: Event, now: float) -> None:
        """One event, received at `now`."""
        if self.timers_pending:
            self.tick(now)
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

    @property
    def timers_pending(self) -> bool:
        """Whether anything waits for a time to pass (`next_deadline()` is not None)."""
        for due in self._dues:  # noqa: SIM110 (a plain loop: faster, and it runs per event)
            if due() is not None:
                return True
        return False

    def tick(self, now: float) -> None:
        """Time passes: run every timer whose time has come, in `timers.ORDER` (follow-ups'
        deadlines, stuck states, crash loops' quiet ends, resumes, the agent port, presence)."""
        for timer in self.timers:
            due = timer.due()
            if due is not None and due <= now:
                timer.tick(now)

    def next_deadline(self) -> float | None:
        """The earliest time a timer is due (None: nothing waits)."""
        dues = [due for timer in self.timers if (due := timer.due()) is not None]
        return min(dues, default=None)

    def on_command_result(self, name: str, error: str, now: float) -> None:
        """QEMU answered a command of `command()`: `error` is "" when it was done."""
        resume.on_command_result(self, name, error, now)

    def reconfigure(
        self,
        followup: FollowupConfig,
        lifecycle: LifecycleConfig,
        client_stop_severity: ClientStopSeverity,
    ) -> None:
        """New deadlines, thresholds and severity (a reload), for what happens from now on:
        open expectations keep the deadline they were opened with."""
        self.rules = Rules(followup)
        self.client_stop_severity = client_stop_severity
        if lifecycle != self.lifecycle:
            self.agent.absent_after_s = lifecycle.agent_absent_after_s  # from its next change
            self.presence.unreachable_after_s = lifecycle.unreachable_after_s
            self.lifecycle = lifecycle
            self.crash_loop.resize(lifecycle.crash_loop_count)

    def restore(self, alerts: list[Alert], now: float) -> None:
        """Alerts still firing when the daemon last stopped: they resolve like new ones (a
        crash loop after a quiet time from now)."""
        self.book.restore(alerts)
        if any(alert.kind == "vm_crash_loop" for alert in alerts):
            self.crash_loop.quiet_at = now + self.lifecycle.crash_loop_quiet_s

    def on_connected(
        self,
        now: float,
        status: str | None,
        fields: Mapping[str, Any],
        as_of: int | None = None,
    ) -> None:
        """A session is up and `query-status` said `status` (read when `run_changes` was
        `as_of`, None: just now; a status of None: the monitor did not tell); `fields` go
        into `vm_connected`."""
        self.out.record("vm_connected", "info", now, {**fields, "status": status or "unknown"})
        pid = fields.get("pid")
        self.presence.connected(
            now, str(fields.get("socket", "")), pid if isinstance(pid, int) else None
        )
        self.presence.fired = False
        self.book.resolve(
            now,
            lambda a: a.kind in ABSENT_KINDS or a.kind == UNREACHABLE,
            "QEMU's monitor answers again",
        )
        if status is None:
            return  # nothing to decide on: a STOP of this session is still classified
        if as_of is not None and as_of != self.run.run_changes:
            return  # a STOP/RESUME of this session came after the answer: the events are newer
        previous = self.run.status
        runstate.set_status(self, status, now)
        if status == "running":
            self.book.resolve(now, lambda a: a.kind in STOPPED_KINDS, "query-status says running")
            return
        stop = classify_status(status, self.client_stop_severity)
        if stop is None or status == previous:
            return
        before = "unknown" if previous is None else previous
        self.book.fire(
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
        if as_of is not None and as_of != self.run.run_changes:
            return
        runstate.set_status(self, status, now)
        if self.run.pending_stop is not None:
            runstate.classify_stop(self, self.run.pending_stop, status, now)
        if status == "running":
            self.book.resolve(now, lambda a: a.kind in STOPPED_KINDS, "query-status says running")

    def status_unknown(self, now: float, why: str) -> None:
        """`query-status` could not be answered: classify a pending stop with no status."""
        if self.run.pending_stop is not None:
            runstate.classify_stop(self, self.run.pending_stop, None, now, why)

    def on_absent(self, now: float, reason: str, error: str) -> None:
        """qmpwatch (re)started and its first attempt found no QEMU behind the VM's monitor
        (`reason`: "missing", "refused"): if the VM was last seen alive, it went away while
        nobody watched. Logged as `vm_gone` either way; alerted unless it had shut down."""
        last = self.run.status
        if last is None:
            return  # never seen, or already known to be gone
        shut_down = last == "shutdown"
        self.out.record(
            "vm_gone",
            "info" if shut_down else "warning",
            now,
            {"last_status": last, "reason": reason, "error": error},
        )
        if shut_down:
            return
        self.book.fire(
            now,
            "vm_gone_while_unmonitored",
            "critical",
            f"VM {self.vm} is gone: its QEMU ended while qmpwatch was not watching "
            f"(last seen {last}, not shut down)",
            cause="gone",
            details={"last_status": last, "reason": reason, "error": error},
        )
        runstate.set_status(self, None, now)

    def on_connect_failed(self, now: float, reason: str, detail: str) -> None:
        """An attempt to reach QEMU failed (`reason`: a vm_connect_failed reason)."""
        self.presence.failed(now, reason, detail)

    def retire(self, now: float, reason: str) -> None:
        """qmpwatch stops watching this VM for good: every firing alert resolves, saying why."""
        self.book.resolve(now, lambda a: True, reason)

    def ends_in_crash(self, cause: str) -> bool:
        """Whether a session ending with `cause` now would be a crash (`vm_crashed`): the
        session asks before it looks for the crash's cause."""
        if cause in ("closed", "exited") or self.run.saw_shutdown:
            return False
        return not any(e.rule.expected == QEMU_EXIT for e in self.tracker.pending)

    def on_disconnected(
        self, now: float, cause: str, error: str = "", crash: CrashCause | None = None
    ) -> None:
        """The session ended: `cause` is "eof", "error", "closed" (qmpwatch closed it) or
        "exited" (QEMU's manager says it ended on purpose: a clean end, SHUTDOWN or not);
        `crash`: why QEMU died, as the host reported it (for a crash)."""
        self.tick(now)  # a deadline already over is missed, even if no tick() came in time
        exited = self.tracker.satisfy(QEMU_EXIT, now) if cause != "closed" else []
        followups.ended(self, exited)
        # qmpwatch closing the session says nothing about QEMU, even after a SHUTDOWN (QEMU
        # under -no-shutdown is still there, stopped): only an ending QEMU can exit cleanly.
        clean = cause == "exited" or (cause != "closed" and (self.run.saw_shutdown or bool(exited)))
        logged_cause = "shutdown" if clean else cause
        level = "info" if clean or cause == "closed" else "warning"
        ending = (
            runstate.clean_end_words(cause, self.run.shutdown_reason, bool(exited)) if clean else ""
        )
        fields = {"cause": logged_cause, "error": error}
        if clean:
            fields["reason"] = ending
        self.out.record("vm_disconnected", level, now, fields)
        followups.ended(self, self.tracker.abandon(now))
        if self.run.pending_stop is not None and (cause == "closed" or clean):
            # qmpwatch itself closed the session (stopping, reload): nothing happened to the
            # VM; the next session's resync reports the stop if the VM is still stopped. Or
            # the stop was QEMU's on the way out (a panic's poweroff, then SHUTDOWN and exit).
            self.run.pending_stop = None
        elif self.run.pending_stop is not None:
            runstate.classify_stop(self, self.run.pending_stop, None, now, "the session ended")
        if cause != "closed":
            if clean and self.run.shutdown_reason != "guest-panic":  # a panic's end stays one
                self.book.resolve(
                    now, lambda a: a.kind in STOPPED_KINDS, f"QEMU ended cleanly: {ending}"
                )
            if clean:
                runstate.set_status(self, "shutdown", now, f"QEMU is gone: {ending}")
            else:
                details = self.presence.crash_details(now, self.run.status, error)
                runstate.set_status(self, None, now)
                incidents.incident(self, now, "crash")
                gone = error or "end of file on the monitor"
                if crash is None:
                    summary = f"went away without a SHUTDOWN event (crashed or killed): {gone}"
                else:
                    summary = f"went away without a SHUTDOWN event: {crash.words}"
                    details.update(crash.fields())
                    self.run.status_why = f"QEMU died: {crash.words}"
                self.book.fire(
                    now,
                    "vm_crashed",
                    "critical",
                    f"QEMU of VM {self.vm} {summary}",
                    cause="EOF",
                    details=details,
                )
        self.presence.ended(now, ending, f"{cause}: {error}" if error else cause)
        self.run.saw_shutdown = False
        self.run.shutdown_reason = ""
        self.run.stopped = None
        agent_port.ended(self, now, cause)
        self.resumer.stop()  # the next session starts over, if the VM is still paused

    @property
    def firing(self) -> dict[str, Alert]:
        """Fingerprint -> alert, for the alerts firing (the alert book's)."""
        return self.book.firing

    # -- storage, presence, and the alert book as core/agent.py reaches it -------------------

    @property
    def disks(self) -> dict[str, DiskInfo]:
        """Device or node-name -> image, as the latest `query-block` told (storage.py)."""
        return self.disks_state.images

    @property
    def thresholds(self) -> dict[str, float]:
        """Node-name -> the write threshold armed there, percent (storage.py)."""
        return self.disks_state.thresholds

    def on_disks(self, disks: dict[str, DiskInfo], now: float) -> None:
        """A session learned where the VM's disks live (`query-block`): see storage.py."""
        storage.on_disks(self, disks, now)

    def storages(self) -> dict[str, list[DiskInfo]]:
        """Mount point -> the writable images of this VM on it."""
        return storage.storages(self)

    def on_storage_free(self, free: Mapping[str, float], now: float) -> None:
        """The free space (percent) of the file systems holding the VM's writable images."""
        storage.on_storage_free(self, free, now)

    def on_space(self, free: Mapping[str, int], now: float) -> bool:
        """Free bytes where the writable images live, while a resume waits on a full disk:
        True when space came back and `cont` is due now."""
        return self.resumer.space(free, now)

    def unreachable(self, now: float) -> None:
        """Not connected for `unreachable_after_s`: a warning with the last failure, unless
        an alert already says QEMU is gone (a crash: one incident, one alert)."""
        presence = self.presence
        presence.fired = True
        if any(a.kind in ABSENT_KINDS for a in self.firing.values()):
            return
        details = presence.unreachable_details(now)
        failure = presence.why() or "no connection made yet"
        self.book.fire(
            now,
            UNREACHABLE,
            "warning",
            f"VM {self.vm} has not been reachable for {details['unreachable_s']:.0f} s: {failure}",
            cause="unreachable",
            details=details,
        )

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
        """`book.fire` (core/agent.py raises through the watch)."""
        return self.book.fire(
            now, kind, severity, summary, cause=cause, details=details, qemu_time=qemu_time
        )

    def _resolve(self, now: float, which: Callable[[Alert], bool], reason: str) -> None:
        """`book.resolve` (core/agent.py resolves through the watch)."""
        self.book.resolve(now, which, reason)
