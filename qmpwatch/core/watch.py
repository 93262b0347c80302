"""The watch core: everything qmpwatch decides about one VM, as a pure state machine.

`VmWatch` is fed decoded events, run statuses and session changes, with the clock passed in
(`now`, epoch seconds). It writes log records, raises and resolves alerts and asks for
`query-status` through a `WatchOutput`, and does no I/O itself. Per event, every handler the
table `HANDLERS` lists for its name runs in order (docs/architecture.md, "The watch").
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from qmpwatch.core import agent as agent_port
from qmpwatch.core.agent import AgentPort
from qmpwatch.core.alert import (
    CRASH_KINDS,
    RESOLVABLE_KINDS,
    STOPPED_KINDS,
    TRANSIENT_STATUSES,
    Alert,
    ClientStopSeverity,
    Severity,
    classify_status,
    describe_status,
    resolved_because,
    resolved_summary,
    stop_alert_firing,
)
from qmpwatch.core.config import FollowupConfig, LifecycleConfig, RemediateConfig
from qmpwatch.core.crashcause import CrashCause
from qmpwatch.core.errors import DecodeError
from qmpwatch.core.events import (
    BlockIoError,
    Event,
    GuestPanicked,
    Shutdown,
    Watchdog,
)
from qmpwatch.core.presence import UNREACHABLE, Presence
from qmpwatch.core.remedy import SETTLE_S, Resumer
from qmpwatch.core.tracker import QEMU_EXIT, Ended, FollowUpTracker, Rules

RAW_LIMIT = 2048  # characters of a bad message kept in its qmp_decode_error record

# Alerts that say QEMU is not there; its monitor answering again ends them.
ABSENT_KINDS = frozenset({"vm_crashed", "vm_gone_while_unmonitored"})


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """Where one disk's image lives: the file and the mount (file system) holding it."""

    image: str
    node_name: str = ""
    size: int = 0  # the image's virtual size, bytes (0: unknown)
    read_only: bool = False
    storage: str = ""  # the mount point
    storage_source: str = ""  # what is mounted there (a device, host:/export, ...)
    storage_fs: str = ""  # its file system type

    def fields(self) -> dict[str, str]:
        pairs = {
            "image": self.image,
            "storage": self.storage,
            "storage_source": self.storage_source,
            "storage_fs": self.storage_fs,
        }
        return {key: value for key, value in pairs.items() if value}


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

    def command(self, name: str, arguments: Mapping[str, Any]) -> None:
        """Send QEMU a command that acts on the VM (opt-in remediation); the answer comes
        back through `on_command_result`."""


Handler = Callable[["VmWatch", Event, float], None]


class VmWatch:
    """The state qmpwatch keeps about one VM and the rules it applies."""

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
        self.handlers = HANDLERS if handlers is None else handlers
        self.status = last_status  # last known run status (query-status word), None: unknown
        self.status_since: float | None = None  # when it became `status` (None: before start)
        self.status_why = describe_status(last_status)  # why, in words
        # Whether the VM's CPUs are stopped, as the latest STOP/RESUME or status says (None:
        # unknown). A SHUTDOWN or a drained BLOCK_IO_ERROR of a stopped VM expects no STOP.
        self.stopped: bool | None = None
        self.firing: dict[str, Alert] = {}  # fingerprint -> alert, until resolved
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
        # Crash loops: the latest incidents (time, what), and while vm_crash_loop fires, when
        # it resolves if no other incident comes.
        self.incidents: deque[tuple[float, str]] = deque(maxlen=self.lifecycle.crash_loop_count)
        self.loop_quiet_at: float | None = None
        # A transient status (migration, -S, snapshots): since when, and when it is "stuck".
        self.transient_since: float | None = None
        self.transient_due: float | None = None
        self.resumer = Resumer(remediate if remediate is not None else RemediateConfig())
        self.disks: dict[str, DiskInfo] = {}  # device or node-name -> image (query-block)
        self.thresholds: dict[str, float] = {}  # node-name -> write threshold armed, percent
        self.agent = AgentPort(self.lifecycle.agent_absent_after_s)  # the guest agent's port
        self.presence = Presence(self.lifecycle.unreachable_after_s)  # connected, gone, since

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
        return (
            self.tracker.waiting
            or self.loop_quiet_at is not None
            or self.transient_due is not None
            or self.resumer.due() is not None
            or self.agent.due is not None
            or self.presence.due() is not None
        )

    def tick(self, now: float) -> None:
        """Time passes: end the expectations whose deadline is over, and the other timers."""
        if self.tracker.waiting:
            self._ended(self.tracker.expire(now))
        if self.transient_due is not None and self.transient_due <= now:
            self._stuck(now)
        if self.loop_quiet_at is not None and self.loop_quiet_at <= now:
            self._loop_quiet(now)
        due = self.resumer.due()
        if due is not None and due <= now:
            self._remedy(now)
        agent_port.tick(self, now)
        due = self.presence.due()
        if due is not None and due <= now:
            self._unreachable(now)

    def next_deadline(self) -> float | None:
        deadline = self.tracker.next_deadline()
        others = (
            self.loop_quiet_at,
            self.transient_due,
            self.resumer.due(),
            self.agent.due,
            self.presence.due(),
        )
        for other in others:
            if other is not None and (deadline is None or other < deadline):
                deadline = other
        return deadline

    def on_command_result(self, name: str, error: str, now: float) -> None:
        """QEMU answered a command of `command()`: `error` is "" when it was done."""
        resumer = self.resumer
        if name != "cont" or not resumer.sent:
            return
        resumer.sent = False
        if error:
            self._resume_failed(now, "refused", error)
        elif resumer.settle_until is None and resumer.next_at is not None and self.stopped:
            self._resume_failed(now, "not_running", "QEMU accepted cont, and the VM is stopped")

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
            self.incidents = deque(self.incidents, maxlen=lifecycle.crash_loop_count)

    def restore(self, alerts: list[Alert], now: float) -> None:
        """Alerts still firing when the daemon last stopped: they resolve like new ones (a
        crash loop after a quiet time from now)."""
        for alert in alerts:
            self.firing[alert.fingerprint] = alert
            if alert.kind == "vm_crash_loop":
                self.loop_quiet_at = now + self.lifecycle.crash_loop_quiet_s

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
        self._resolve(
            now,
            lambda a: a.kind in ABSENT_KINDS or a.kind == UNREACHABLE,
            "QEMU's monitor answers again",
        )
        if status is None:
            return  # nothing to decide on: a STOP of this session is still classified
        if as_of is not None and as_of != self.run_changes:
            return  # a STOP/RESUME of this session came after the answer: the events are newer
        previous = self.status
        self._set_status(status, now)
        if status == "running":
            self._resolve(now, lambda a: a.kind in STOPPED_KINDS, "query-status says running")
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
        self._set_status(status, now)
        if self.pending_stop is not None:
            self._classify_stop(self.pending_stop, status, now)
        if status == "running":
            self._resolve(now, lambda a: a.kind in STOPPED_KINDS, "query-status says running")

    def status_unknown(self, now: float, why: str) -> None:
        """`query-status` could not be answered: classify a pending stop with no status."""
        if self.pending_stop is not None:
            self._classify_stop(self.pending_stop, None, now, why)

    def on_absent(self, now: float, reason: str, error: str) -> None:
        """qmpwatch (re)started and its first attempt found no QEMU behind the VM's monitor
        (`reason`: "missing", "refused"): if the VM was last seen alive, it went away while
        nobody watched. Logged as `vm_gone` either way; alerted unless it had shut down."""
        last = self.status
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
        self._raise(
            now,
            "vm_gone_while_unmonitored",
            "critical",
            f"VM {self.vm} is gone: its QEMU ended while qmpwatch was not watching "
            f"(last seen {last}, not shut down)",
            cause="gone",
            details={"last_status": last, "reason": reason, "error": error},
        )
        self._set_status(None, now)

    def on_connect_failed(self, now: float, reason: str, detail: str) -> None:
        """An attempt to reach QEMU failed (`reason`: a vm_connect_failed reason)."""
        self.presence.failed(now, reason, detail)

    def retire(self, now: float, reason: str) -> None:
        """qmpwatch stops watching this VM for good: every firing alert resolves, saying why."""
        self._resolve(now, lambda a: True, reason)

    def ends_in_crash(self, cause: str) -> bool:
        """Whether a session ending with `cause` now would be a crash (`vm_crashed`): the
        session asks before it looks for the crash's cause."""
        if cause in ("closed", "exited") or self.saw_shutdown:
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
        self._ended(exited)
        # qmpwatch closing the session says nothing about QEMU, even after a SHUTDOWN (QEMU
        # under -no-shutdown is still there, stopped): only an ending QEMU can exit cleanly.
        clean = cause == "exited" or (cause != "closed" and (self.saw_shutdown or bool(exited)))
        logged_cause = "shutdown" if clean else cause
        level = "info" if clean or cause == "closed" else "warning"
        ending = clean_end_words(cause, self.shutdown_reason, bool(exited)) if clean else ""
        fields = {"cause": logged_cause, "error": error}
        if clean:
            fields["reason"] = ending
        self.out.record("vm_disconnected", level, now, fields)
        self._ended(self.tracker.abandon(now))
        if self.pending_stop is not None and (cause == "closed" or clean):
            # qmpwatch itself closed the session (stopping, reload): nothing happened to the
            # VM; the next session's resync reports the stop if the VM is still stopped. Or
            # the stop was QEMU's on the way out (a panic's poweroff, then SHUTDOWN and exit).
            self.pending_stop = None
        elif self.pending_stop is not None:
            self._classify_stop(self.pending_stop, None, now, "the session ended")
        if cause != "closed":
            if clean and self.shutdown_reason != "guest-panic":  # a panic's end stays one
                self._resolve(
                    now, lambda a: a.kind in STOPPED_KINDS, f"QEMU ended cleanly: {ending}"
                )
            if clean:
                self._set_status("shutdown", now, f"QEMU is gone: {ending}")
            else:
                details = self.presence.crash_details(now, self.status, error)
                self._set_status(None, now)
                self._incident(now, "crash")
                gone = error or "end of file on the monitor"
                if crash is None:
                    summary = f"went away without a SHUTDOWN event (crashed or killed): {gone}"
                else:
                    summary = f"went away without a SHUTDOWN event: {crash.words}"
                    details.update(crash.fields())
                    self.status_why = f"QEMU died: {crash.words}"
                self._raise(
                    now,
                    "vm_crashed",
                    "critical",
                    f"QEMU of VM {self.vm} {summary}",
                    cause="EOF",
                    details=details,
                )
        self.presence.ended(now, ending, f"{cause}: {error}" if error else cause)
        self.saw_shutdown = False
        self.shutdown_reason = ""
        self.stopped = None
        agent_port.ended(self, now, cause)
        self.resumer.stop()  # the next session starts over, if the VM is still paused

    # -- decisions --------------------------------------------------------------------------

    def _set_status(self, status: str | None, now: float, why: str = "") -> None:
        """The VM's run status is now `status` (None: unknown), for the reason `why` (by
        default the status in words); keeps `stopped` and the transient-state timer in line
        with it."""
        if status != self.status or why:
            self.status_since = now
            self.status_why = why or describe_status(status)
        self.status = status
        if status == "io-error":
            self.resumer.start(now)
        elif status != "running" and self.resumer.active:
            self.resumer.stop()  # paused (or ended) for another reason: not ours to resume
        self.stopped = None if status is None else status != "running"
        if status in TRANSIENT_STATUSES:
            if self.transient_since is None:
                self.transient_since = now
                self.transient_due = now + self.lifecycle.transient_state_max_s
            return
        if self.transient_since is not None:
            self.transient_since = self.transient_due = None
            self._resolve(
                now,
                lambda a: a.kind == "vm_stuck_transient",
                f"the VM left the transient state (now {status or 'unknown'})",
            )

    def on_disks(self, disks: dict[str, DiskInfo], now: float) -> None:
        """A session learned where the VM's disks live (`query-block`): a filling alert of a
        disk replaced, shrunk or grown resolves; with `write_threshold_percent`, QEMU's write
        threshold is armed on every writable image of known size."""
        self.disks = disks
        by_node = {info.node_name: info for info in disks.values() if info.node_name}
        for alert in [a for a in self.firing.values() if a.kind == "vm_disk_filling"]:
            info = by_node.get(str(alert.details.get("node-name")))
            if info is None or info.image != alert.details.get("image"):
                reason = "its image was replaced"
            elif info.size < int(alert.details.get("size", 0)):
                reason = "its image shrank"
            elif info.size > int(alert.details.get("size", 0)):
                reason = f"its image grew to {info.size} bytes"  # its threshold is armed anew
            else:
                continue
            self._resolve(now, alert.__eq__, reason)
        percent = self.resumer.config.write_threshold_percent
        self.thresholds.clear()
        if percent:
            for node, info in by_node.items():
                if not info.read_only and info.size > 0:
                    self._arm_threshold(node, info, percent)

    def storages(self) -> dict[str, list[DiskInfo]]:
        """Mount point -> the writable images of this VM on it."""
        found: dict[str, list[DiskInfo]] = {}
        seen: set[str] = set()
        for info in self.disks.values():
            if info.storage and not info.read_only and info.image not in seen:
                seen.add(info.image)
                found.setdefault(info.storage, []).append(info)
        return found

    def on_storage_free(self, free: Mapping[str, float], now: float) -> None:
        """The free space (percent) of the file systems holding the VM's writable images:
        below `storage_free_percent` a warning per file system, resolved above it again."""
        limit = self.resumer.config.storage_free_percent
        storages = self.storages()
        for mount, percent in free.items():
            images = storages.get(mount, [])
            if not images:
                continue
            cause = f"storage:{mount}"
            if percent >= limit:
                self._resolve(
                    now,
                    lambda a, c=cause: a.kind == "storage_space_low" and a.cause == c,  # type: ignore[misc]
                    f"{percent:.1f} % free again",
                )
                continue
            first = images[0]
            self._raise(
                now,
                "storage_space_low",
                "warning",
                f"VM {self.vm}: the file system of its disk {first.image} has {percent:.1f} % "
                f"free (warns below {limit:g} %): QEMU pauses the VM when it is full",
                cause=cause,
                details={
                    "storage": mount,
                    "storage_source": first.storage_source,
                    "storage_fs": first.storage_fs,
                    "free_percent": round(percent, 2),
                    "images": [i.image for i in images],
                },
            )

    def _arm_threshold(self, node: str, info: DiskInfo, percent: float) -> None:
        self.thresholds[node] = percent
        threshold = int(info.size * percent / 100)
        self.out.command(
            "block-set-write-threshold", {"node-name": node, "write-threshold": threshold}
        )

    def _disk_fields(self, event: BlockIoError) -> dict[str, str]:
        """The failing disk's image and storage, when `query-block` told them."""
        node = event.data.get("node-name")
        for key in (event.device, node):
            if isinstance(key, str) and key in self.disks:
                return self.disks[key].fields()
        return {}

    def on_space(self, free: Mapping[str, int], now: float) -> bool:
        """Free bytes where the writable images live, while a resume waits on a full disk:
        True when space came back and `cont` is due now."""
        return self.resumer.space(free, now)

    def _remedy(self, now: float) -> None:
        """The resume plan is due: the VM ran long enough, or give up, or try `cont`."""
        resumer = self.resumer
        attempts = resumer.attempts
        if resumer.settle_until is not None:
            fields = {"attempt": attempts, "outcome": "resumed", "trigger": resumer.trigger}
            resumer.stop()
            self.out.record("vm_resume_attempted", "info", now, fields)
            self._resolve(
                now,
                lambda a: a.kind in STOPPED_KINDS,
                f"resumed by qmpwatch after {attempts} attempt{'s' if attempts != 1 else ''}",
            )
            return
        assert resumer.paused_at is not None
        if resumer.give_up_due(now):
            since = now - resumer.paused_at
            resumer.stop()
            self.out.record(
                "vm_resume_given_up", "warning", now, {"attempts": attempts, "paused_s": since}
            )
            self._raise(
                now,
                "vm_resume_given_up",
                "warning",
                f"VM {self.vm} stays paused on its disk error: qmpwatch gave up resuming it "
                f"after {attempts} attempt(s) in {since:.0f} s",
                cause=f"resume:{now:.6f}",
                details={"attempts": attempts, "paused_s": round(since, 3)},
            )
            return
        resumer.attempts += 1
        resumer.sent = True
        self.out.command("cont", {})

    def _resume_failed(self, now: float, outcome: str, error: str) -> None:
        resumer = self.resumer
        fields: dict[str, Any] = {
            "attempt": resumer.attempts,
            "outcome": outcome,
            "trigger": resumer.trigger,
        }
        if error:
            fields["error"] = error
        resumer.failed(now)
        assert resumer.next_at is not None
        fields["retry_in_s"] = round(resumer.next_at - now, 3)
        self.out.record("vm_resume_attempted", "warning", now, fields)

    def _unreachable(self, now: float) -> None:
        """Not connected for `unreachable_after_s`: a warning with the last failure, unless
        an alert already says QEMU is gone (a crash: one incident, one alert)."""
        presence = self.presence
        presence.fired = True
        if any(a.kind in ABSENT_KINDS for a in self.firing.values()):
            return
        details = presence.unreachable_details(now)
        failure = presence.why() or "no connection made yet"
        self._raise(
            now,
            UNREACHABLE,
            "warning",
            f"VM {self.vm} has not been reachable for {details['unreachable_s']:.0f} s: {failure}",
            cause="unreachable",
            details=details,
        )

    def _stuck(self, now: float) -> None:
        self.transient_due = None
        since = self.transient_since if self.transient_since is not None else now
        self._raise(
            now,
            "vm_stuck_transient",
            "warning",
            f"VM {self.vm} has been in state {self.status} for {now - since:.0f} s "
            f"(more than {self.lifecycle.transient_state_max_s:g} s)",
            cause=f"transient:{self.status}",
            details={"status": self.status, "since_s": round(now - since, 3)},
        )

    def _incident(self, now: float, what: str) -> None:
        """A crash-like incident (a guest panic, a watchdog expiry, QEMU gone): enough of them
        within the window are a crash loop, one alert that resolves after a quiet time."""
        cfg = self.lifecycle
        self.incidents.append((now, what))
        if self.loop_quiet_at is not None:
            self.loop_quiet_at = now + cfg.crash_loop_quiet_s
            return
        first = self.incidents[0][0]
        if len(self.incidents) < cfg.crash_loop_count or now - first > cfg.crash_loop_window_s:
            return
        self.loop_quiet_at = now + cfg.crash_loop_quiet_s
        counts = Counter(kind for _, kind in self.incidents)
        words = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        self._raise(
            now,
            "vm_crash_loop",
            "critical",
            f"VM {self.vm} is in a crash loop: {len(self.incidents)} incidents within "
            f"{now - first:.0f} s ({words})",
            cause="crash_loop",
            details={
                "incidents": len(self.incidents),
                "window_s": cfg.crash_loop_window_s,
                "by_kind": dict(counts),
            },
        )

    def _loop_quiet(self, now: float) -> None:
        self.loop_quiet_at = None
        self.incidents.clear()
        self._resolve(
            now,
            lambda a: a.kind == "vm_crash_loop",
            f"no incident for {self.lifecycle.crash_loop_quiet_s:g} s",
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
        full = dict(details)
        if qemu_time is not None:
            full["qemu_time"] = qemu_time
        if kind in CRASH_KINDS and self.loop_quiet_at is not None:
            severity = "info"  # the crash loop alert is the page
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

    def _resolve(self, now: float, which: Callable[[Alert], bool], reason: str) -> None:
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
                    self._set_status("shutdown", end.at)
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
            self.resumer.nospace = cause.nospace
            self._set_status("io-error", now, _io_error_words(cause))
            if stop_alert_firing(self.firing.values(), "io-error", kind):
                return  # the pause found at connect, paused again: one incident, one page
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
                    **self._disk_fields(cause),
                },
                qemu_time=cause.qemu_time,
            )
        elif isinstance(cause, Watchdog):
            self._set_status(
                "watchdog", now, "paused by its watchdog: the guest stopped feeding it"
            )
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
        firing = self.firing.values()
        if (
            cls is None
            or (status is not None and stop_alert_firing(firing, status))
            or any(
                a.kind == cls.kind or (status is None and a.kind in STOPPED_KINDS) for a in firing
            )
        ):
            return  # no alert due, or the event that stopped the VM raised it: one incident
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


def clean_end_words(cause: str, shutdown_reason: str, exited: bool) -> str:
    """How QEMU ended cleanly, in words: "it shut down (host-signal)"."""
    if cause == "exited":
        return "it ended on purpose, as its manager says"
    if shutdown_reason:
        return f"it shut down ({shutdown_reason})"
    if exited:
        return "it exited, as its watchdog's action poweroff says"
    return "it shut down"


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


def _text(data: Mapping[str, Any], key: str, default: str = "") -> str:
    """A string field of an event the decoder does not type (a newer or unlisted event)."""
    value = data.get(key)
    return value if isinstance(value, str) else default


def _one_shot_cause(event: Event, what: str) -> str:
    """The cause of a one-shot alert: the event itself, so each event is an alert of its own."""
    return f"{event.name}:{what}:{event.seconds}.{event.microseconds:06d}"


# ---------------------------------------------------------------------------------------------
# Handlers: what each event does beyond being logged.


def track_followups(watch: VmWatch, event: Event, now: float) -> None:
    """Close the expectations this event satisfies, then open the one it causes."""
    qualified = f"SHUTDOWN:{event.reason}" if isinstance(event, Shutdown) else ""
    satisfied = watch.tracker.satisfy(event.name, now, qualified)
    if satisfied:
        watch._ended(satisfied)
    rule = watch.rules.opened_by(event, watch.no_shutdown, watch.stopped is True)
    if rule is not None:
        watch.tracker.open(rule, event, now)


def on_stop(watch: VmWatch, event: Event, now: float) -> None:
    """A STOP explains itself through a satisfied expectation, or gets classified."""
    watch.run_changes += 1
    watch.stopped = True
    if watch.resumer.settle_until is not None:  # paused again right after our cont
        watch._resume_failed(now, "paused_again", "")
    satisfied = watch.tracker.satisfy("STOP", now)
    if satisfied:
        watch._ended(satisfied)
        return
    if watch.saw_shutdown:  # SHUTDOWN then STOP with -no-shutdown unknown: status is shutdown
        watch._set_status("shutdown", now)
        return
    watch.pending_stop = event
    watch.out.query_status()


def on_resume(watch: VmWatch, event: Event, now: float) -> None:
    """Running again: a stop not yet classified was a client's pause; stopped alerts resolve,
    and an earlier SHUTDOWN no longer explains the end of the session."""
    watch.run_changes += 1
    watch.saw_shutdown = False
    if watch.pending_stop is not None:
        watch._classify_stop(watch.pending_stop, "paused", now, "resumed before query-status")
    resumer = watch.resumer
    ours = resumer.sent
    if resumer.active and not ours:
        resumer.stop()  # a person (or another client) resumed it
    watch._set_status("running", now)
    if ours:  # resolved once it has run for a while (it may pause again at once)
        resumer.settle_until = now + SETTLE_S
        return
    watch._resolve(now, lambda a: a.kind in STOPPED_KINDS, "the VM resumed (RESUME)")


def on_reset(watch: VmWatch, event: Event, now: float) -> None:
    """A reset of a running VM reboots a guest that panicked and kept running: it runs again."""
    if watch.stopped is not True:
        watch._resolve(now, lambda a: a.kind == "vm_panicked", "the guest was reset (RESET)")


def on_shutdown(watch: VmWatch, event: Event, now: float) -> None:
    """Remember the SHUTDOWN, so that the end of the session is a clean exit."""
    watch.saw_shutdown = True
    watch.shutdown_reason = (event.reason or "") if isinstance(event, Shutdown) else ""


def on_watchdog(watch: VmWatch, event: Event, now: float) -> None:
    """Every watchdog expiry is an alert of its own, whatever follows. It pages unless the
    VM's pause does (action `pause`: vm_stopped_watchdog follows) or QEMU does nothing."""
    assert isinstance(event, Watchdog)
    action = event.action
    severity: Severity = "critical"
    if action in ("none", "debug"):
        severity = "warning"
    elif action == "pause":
        severity = "info"
    watch._incident(now, "watchdog")
    watch._raise(
        now,
        "watchdog_fired",
        severity,
        f"VM {watch.vm}: the guest watchdog expired; QEMU's action: {action}",
        cause=f"WATCHDOG:{action}",
        details={"action": action},
        qemu_time=event.qemu_time,
    )


def on_guest_panicked(watch: VmWatch, event: Event, now: float) -> None:
    """A guest panic is an alert whatever QEMU does next; it resolves when the guest runs
    again (RESUME, a RESET of a VM that kept running, or a status `running`)."""
    assert isinstance(event, GuestPanicked)
    action = event.action
    if action == "pause":
        watch._set_status("guest-panicked", now)
    watch._incident(now, "panic")
    details: dict[str, Any] = {"action": action, "status": "guest-panicked"}
    if "info" in event.data:
        details["info"] = event.data["info"]
    kept = " and kept running" if action == "run" else ""
    watch._raise(
        now,
        "vm_panicked",
        "critical",
        f"VM {watch.vm}: the guest kernel panicked{kept} (QEMU's action: {action})",
        cause="GUEST_PANICKED",
        details=details,
        qemu_time=event.qemu_time,
    )


def on_guest_crashloaded(watch: VmWatch, event: Event, now: float) -> None:
    """The guest loaded its crash kernel after a panic: part of the panic's incident (one
    alert), or the first sign of it when QEMU reported no GUEST_PANICKED."""
    if any(alert.kind == "vm_panicked" for alert in watch.firing.values()):
        return
    details: dict[str, Any] = {"action": _text(event.data, "action"), "cause_event": event.name}
    if "info" in event.data:
        details["info"] = event.data["info"]
    watch._raise(
        now,
        "vm_panicked",
        "critical",
        f"VM {watch.vm}: the guest kernel crashed and loaded its crash kernel",
        cause="GUEST_CRASHLOADED",
        details=details,
        qemu_time=event.qemu_time,
    )


def on_image_corrupted(watch: VmWatch, event: Event, now: float) -> None:
    """A fatal BLOCK_IMAGE_CORRUPTED: QEMU marked the image corrupt and unusable."""
    data = event.data
    if data.get("fatal") is not True:
        return
    disk = _text(data, "device") or _text(data, "node-name") or "a disk"
    message = _text(data, "msg")
    watch._raise(
        now,
        "vm_image_corrupted",
        "critical",
        f"VM {watch.vm}: the image of {disk} is corrupt and QEMU marked it unusable"
        + (f" ({message})" if message else ""),
        cause=_one_shot_cause(event, disk),
        details={k: data[k] for k in ("device", "node-name", "msg", "offset", "size") if k in data},
        qemu_time=event.qemu_time,
    )


def on_memory_failure(watch: VmWatch, event: Event, now: float) -> None:
    """MEMORY_FAILURE: a hardware memory error that QEMU had to act on, or that needs action."""
    data = event.data
    action = _text(data, "action", "unknown")
    recipient = _text(data, "recipient", "unknown")
    flags = data.get("flags")
    required = isinstance(flags, Mapping) and flags.get("action-required") is True
    severity: Severity
    if action in ("fatal", "reset"):
        severity = "critical"
    elif required:
        severity = "warning"
    else:
        return  # ignored by QEMU, nothing required: logged only
    watch._raise(
        now,
        "vm_memory_failure",
        severity,
        f"VM {watch.vm}: a hardware memory error hit the {recipient}; QEMU's action: {action}",
        cause=_one_shot_cause(event, action),
        details={"recipient": recipient, "action": action, "action_required": required},
        qemu_time=event.qemu_time,
    )


def on_block_job_error(watch: VmWatch, event: Event, now: float) -> None:
    """BLOCK_JOB_ERROR: a block job (mirror, backup, stream, commit) hit an I/O error."""
    data = event.data
    device = _text(data, "device", "a block job")
    operation = _text(data, "operation", "I/O")
    action = _text(data, "action", "unknown")
    watch._raise(
        now,
        "block_job_error",
        "warning",
        f"VM {watch.vm}: block job {device} got a {operation} error (QEMU's action: {action})",
        cause=_one_shot_cause(event, device),
        details={"device": device, "operation": operation, "action": action},
        qemu_time=event.qemu_time,
    )


def on_write_threshold(watch: VmWatch, event: Event, now: float) -> None:
    """BLOCK_WRITE_THRESHOLD: a guest wrote past the threshold qmpwatch armed on an image (it
    is filling up): one warning per disk, and the threshold armed again half-way to full."""
    data = event.data
    node = _text(data, "node-name")
    info = next((i for i in watch.disks.values() if i.node_name == node), None)
    percent = watch.thresholds.pop(node, None)
    disk = info.image if info is not None else node or "a disk"
    shown = f" ({percent:g} % of its {info.size / 2**30:.3g} GiB)" if percent and info else ""
    details: dict[str, Any] = {
        k: data[k] for k in ("node-name", "write-threshold", "amount-exceeded") if k in data
    }
    if percent is not None:
        details["percent"] = percent
    if info is not None:
        details.update(info.fields())
        details["size"] = info.size
    watch._raise(
        now,
        "vm_disk_filling",
        "warning",
        f"VM {watch.vm}: its disk {disk} is filling up: written past the threshold{shown}",
        cause=f"filling:{node}",
        details=details,
        qemu_time=event.qemu_time,
    )
    if percent is not None and info is not None and 100 - percent > 0.2:
        watch._arm_threshold(node, info, percent + (100 - percent) / 2)


def on_migration(watch: VmWatch, event: Event, now: float) -> None:
    """MIGRATION with status `failed`: the VM stays where it was (and may be paused)."""
    if event.data.get("status") != "failed":
        return
    watch._raise(
        now,
        "migration_failed",
        "warning",
        f"VM {watch.vm}: a migration failed",
        cause=_one_shot_cause(event, "failed"),
        details={"status": "failed"},
        qemu_time=event.qemu_time,
    )


HANDLERS: dict[str, tuple[Handler, ...]] = {
    "STOP": (on_stop,),
    "RESUME": (on_resume,),
    "BLOCK_IO_ERROR": (track_followups,),
    "SHUTDOWN": (on_shutdown, track_followups),
    "RESET": (on_reset, track_followups),
    "WATCHDOG": (on_watchdog, track_followups),
    "GUEST_PANICKED": (on_guest_panicked, track_followups),
    "GUEST_CRASHLOADED": (on_guest_crashloaded,),
    "BLOCK_IMAGE_CORRUPTED": (on_image_corrupted,),
    "MEMORY_FAILURE": (on_memory_failure,),
    "BLOCK_JOB_ERROR": (on_block_job_error,),
    "MIGRATION": (on_migration,),
    "BLOCK_WRITE_THRESHOLD": (on_write_threshold,),
    "VSERPORT_CHANGE": (agent_port.on_vserport_change,),
}


def with_handlers(extra: Mapping[str, tuple[Handler, ...]]) -> dict[str, tuple[Handler, ...]]:
    """The default table plus `extra` handlers (run after the default ones)."""
    table = dict(HANDLERS)
    for name, handlers in extra.items():
        table[name] = table.get(name, ()) + handlers
    return table
