"""`VmSession`: everything qmpwatch does for one VM, whatever source carries its QEMU.

A session lives as long as qmpwatch watches the VM. Sources hand it one `Link` at a time
(`watch_link`): it resyncs with `query-status`, feeds events to the VM's `VmWatch`, asks for
the status when a STOP needs classifying, runs the core's timers, keeps the last status in
the state store, and tells the core how the link ended. Sources also tell it when QEMU cannot
be reached (`unreachable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import structlog

from qmpwatch.core import agent
from qmpwatch.core.alert import Alert, ClientStopSeverity
from qmpwatch.core.config import FollowupConfig, LifecycleConfig, NoShutdown, RemediateConfig
from qmpwatch.core.crashcause import CrashCause, libvirt_stop_reason
from qmpwatch.core.errors import DecodeError
from qmpwatch.core.events import Control, Event, decode_object
from qmpwatch.core.protection import UNCHECKED, Protection
from qmpwatch.core.watch import VmWatch
from qmpwatch.session.agentports import agent_ports
from qmpwatch.session.deathwatch import Witness, find_cause
from qmpwatch.session.link import (
    CommandFailed,
    EndCause,
    Link,
    LinkCallbacks,
    LinkClosed,
    StatusRefused,
)
from qmpwatch.session.protectionprobe import probe
from qmpwatch.session.storage import disks_of, filling, free_bytes, free_percent

# Failures that mean no QEMU is behind the VM's socket (it went away while nobody watched),
# as opposed to a QEMU that is there but cannot be reached.
ABSENT_REASONS = frozenset({"missing", "refused", "not_reconnected"})
STATVFS_TIMEOUT_S = 5.0
CRASH_CAUSE_WAIT_S = 2.0  # how long a vm_crashed alert waits for the host to say why
SPACE_POLL_S = 0.25  # free space looked at this often while a resume waits on a full disk
COMMANDS_MAX = 16  # commands of the core waiting to be sent (a few: one resume at a time)


class Recorder(Protocol):
    """Where one VM's records, events, alerts and state go (the daemon's log, metrics and
    alert dispatcher); every call returns at once."""

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None: ...

    def qmp_event(self, event: Event, now: float) -> None: ...

    def raise_alert(self, alert: Alert) -> None: ...

    def resolve_alert(self, alert: Alert, now: float) -> None: ...

    def connected(self, connected: bool) -> None: ...

    def status(self, status: str | None) -> None: ...

    def connect_failed(self, reason: str) -> None: ...


class StatusStore(Protocol):
    """The last known run status of every VM, across restarts."""

    def last_status(self, vm: str) -> str | None: ...

    def set_status(self, vm: str, status: str | None) -> None: ...


class RunState(enum.Enum):
    """Where a session is with its current link."""

    IDLE = "idle"  # no link
    RESYNCING = "resyncing"  # a link is up; asking QEMU's status
    WATCHING = "watching"  # events flow to the core
    CLOSING = "closing"  # the link is ending


class _Output:
    """The session's `WatchOutput`: the recorder's calls, plus `query_status` answered by the
    session. The recorder's bound methods are taken as they are, so the per-event path
    crosses no extra call."""

    def __init__(self, recorder: Recorder, session: VmSession) -> None:
        self.record = recorder.record
        self.qmp_event = recorder.qmp_event
        self.raise_alert = recorder.raise_alert
        self.resolve_alert = recorder.resolve_alert
        self.query_status = session.request_status
        self.command = session.request_command


class VmSession:
    """One VM, watched through the links its source hands it."""

    def __init__(
        self,
        name: str,
        recorder: Recorder,
        store: StatusStore,
        *,
        followup: FollowupConfig,
        lifecycle: LifecycleConfig,
        client_stop_severity: ClientStopSeverity,
        no_shutdown: NoShutdown = "auto",
        firing: Sequence[Alert] = (),
        remediate: RemediateConfig | None = None,
    ) -> None:
        """`firing`: the VM's alerts still firing from before a restart."""
        self.name = name
        self.no_shutdown = no_shutdown
        self.recorder = recorder
        self.store = store
        self.log = structlog.get_logger().bind(vm=name)
        self.watch = VmWatch(
            name,
            _Output(recorder, self),
            followup=followup,
            lifecycle=lifecycle,
            remediate=remediate,
            no_shutdown=no_shutdown is True,
            client_stop_severity=client_stop_severity,
            last_status=store.last_status(name),
        )
        self.watch.restore(list(firing), time.time())
        self.watch.presence.start(time.time(), self.watch.status)
        self.state = RunState.IDLE
        self._idle = asyncio.Event()
        self._idle.set()
        self.where = ""  # the socket (or URI) of the latest link, or the one dialed
        self.since = time.time()  # when the session last came up or went down
        self.links = 0  # links watched so far
        # Why qmpwatch ends this VM's link, when a source ends it for good ("" otherwise: the
        # daemon stopping, a reload restarting it): the VM is no longer counted as watched.
        self.stopping_reason = ""
        self._absence_checked = False
        self._status_wanted = asyncio.Event()
        self._space_wanted = asyncio.Event()
        self._commands: asyncio.Queue[tuple[str, Mapping[str, Any]]] = asyncio.Queue(COMMANDS_MAX)
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._deadline_at: float | None = None
        self._changes_at_reply = 0  # watch.run_changes when the latest reply was read
        self.crash_cause_wait_s = CRASH_CAUSE_WAIT_S
        self._witness: Witness | None = None  # the live QEMU's PID, cgroup and unit
        self._block: Any = None  # the latest query-block answer
        self.protection: Protection | None = None  # as found at the latest connect
        self.protection_ignore: tuple[str, ...] = ()  # gaps the operator accepts
        recorder.connected(False)  # every VM has its series from the start

    @property
    def leaving(self) -> bool:
        """A source ends this VM for good; its link is still ending."""
        return bool(self.stopping_reason)

    @property
    def connected(self) -> bool:
        return self.state is not RunState.IDLE

    # -- what sources tell --------------------------------------------------------------------

    def unreachable(self, reason: str, detail: str) -> None:
        """An attempt to reach QEMU failed. The first one, before any link since qmpwatch
        started: a VM last seen alive that has no QEMU now went away while nobody watched."""
        self.attempt_failed(reason, detail)
        if self._absence_checked or self.links:
            return
        self._absence_checked = True
        if reason in ABSENT_REASONS:
            self.absent(reason, detail)

    def attempt_failed(self, reason: str, detail: str) -> None:
        """An attempt to reach QEMU failed (counted, and said by `status`), with no bearing on
        whether QEMU went away while nobody watched."""
        self.recorder.connect_failed(reason)
        self.watch.on_connect_failed(time.time(), reason, detail)
        self._arm_deadline()  # vm_unreachable, if it stays so

    def absent(self, reason: str, detail: str) -> None:
        """QEMU is gone and qmpwatch did not see it end (it was not watching then): a VM
        last seen alive went away while unmonitored."""
        self.watch.on_absent(time.time(), reason, detail)
        self._store_status()
        self._arm_deadline()

    def reconfigure(
        self,
        followup: FollowupConfig,
        lifecycle: LifecycleConfig,
        client_stop_severity: ClientStopSeverity,
    ) -> None:
        """A reload's deadlines, thresholds and severity, for what happens from now on."""
        self.watch.reconfigure(followup, lifecycle, client_stop_severity)

    def note(self, kind: str, level: str, **fields: Any) -> None:
        """A record about this VM from its session or source, like the core's own."""
        self.recorder.record(kind, level, time.time(), fields)

    def forgo_absence_check(self) -> None:
        """The VM was watched until now under another source or socket: a first failure to
        reach it says nothing about qmpwatch's downtime."""
        self._absence_checked = True

    def retire(self, reason: str) -> None:
        """qmpwatch stops watching this VM: its firing alerts resolve, saying why."""
        self._cancel_deadline()
        self.watch.retire(time.time(), reason)

    async def watch_link(self, link: Link) -> None:
        """Watch QEMU through `link` until the link ends (or the task is cancelled)."""
        watch = self.watch
        self.links += 1
        self._absence_checked = True
        self.where = link.info.where
        pid = link.info.pid
        # A monitor served by this very process (a test's fake QEMU) has no QEMU to ask about.
        self._witness = Witness.of(pid) if pid is not None and pid != os.getpid() else None
        if self.no_shutdown == "auto":
            watch.no_shutdown = bool(link.info.no_shutdown)
        else:
            watch.no_shutdown = self.no_shutdown
        self._set_state(RunState.RESYNCING)
        link.start(LinkCallbacks(self._on_event, self._on_bad, self._on_reply))
        cause: EndCause = "closed"
        error = ""
        try:
            resynced, unresponsive, error = await self._resync(link)
            if resynced:
                self._set_state(RunState.WATCHING)
                async with asyncio.TaskGroup() as tg:
                    workers = [
                        tg.create_task(self._status_worker(link)),
                        tg.create_task(self._command_worker(link)),
                        tg.create_task(self._storage_worker(link)),
                        tg.create_task(self._space_worker()),
                    ]
                    cause, error = await link.wait_closed()
                    for worker in workers:
                        worker.cancel()
            else:
                cause, why = await link.close()
                if cause == "closed" and error:
                    cause = "error"  # the resync failed, then the link closed cleanly
                error = error or why
                if unresponsive and cause == "error":
                    cause = "closed"  # qmpwatch hung up; QEMU did not go away
        except asyncio.CancelledError:
            ended: tuple[EndCause, str] = ("closed", self.stopping_reason or "qmpwatch is stopping")
            with contextlib.suppress(Exception):
                closed = await link.close()
                if closed[0] == "eof":
                    ended = closed  # QEMU had gone already (its socket's removal stopped us)
            self._ended(*ended)
            raise
        except Exception as err:  # a bug in one VM's session ends that link, not the daemon
            self.log.error("internal_error", where="session", error=repr(err),
                           then="closes the link; its source connects again")  # fmt: skip
            with contextlib.suppress(Exception):
                await link.close()
            cause, error = "error", f"internal error: {err!r}"
        try:
            crash = await self._crash_cause(cause, error)
        except asyncio.CancelledError:  # stopping while the cause is looked for: the end stands
            self._ended(cause, error)
            raise
        self._ended(cause, error, crash)

    # -- one link ------------------------------------------------------------------------------

    async def _resync(self, link: Link) -> tuple[bool, bool, str]:
        """Ask the status and tell the core the session is up: (resynced, unresponsive,
        error). A monitor that refuses `query-status` is watched with the status unknown."""
        status: str | None = None
        try:
            status = await link.query_status()
        except StatusRefused as err:
            self.note("vm_status_unavailable", "warning", error=str(err))
        except TimeoutError as err:
            # The monitor greeted but does not answer (QEMU frozen, its main loop stuck):
            # not a crash. Say so, hang up, and attach again after the backoff.
            error = f"resync: no answer to query-status {err}".rstrip()
            self.note("vm_unresponsive", "warning", error=error)
            return False, True, error
        except LinkClosed as err:
            return False, False, f"resync failed: {err}"
        as_of = self._changes_at_reply
        await self._learn_disks(link)
        ports = await self._agent_ports(link)
        # Before vm_connected, as query-block: queries racing a peer that hangs up at once
        # could cost the tail of what it sent (a failed write ends qemu.qmp's reader).
        found = await probe(link, self._block)
        info = link.info
        fields: dict[str, Any] = {
            "socket": info.where,
            "qemu_version": info.qemu_version,
            "no_shutdown": self.watch.no_shutdown,
        }
        if info.pid is not None:
            fields["pid"] = info.pid
        if info.extra:
            fields.update(info.extra)
        self.watch.on_connected(time.time(), status, fields, as_of)
        if ports is not None:
            agent.learned(self.watch, ports, time.time())
        if found is not None:
            self.protection = found
            self._note_protection()
        self._store_status()
        self._arm_deadline()
        return True, False, ""

    async def _learn_disks(self, link: Link, *, if_changed: bool = False) -> None:
        """Where the VM's disks live (`query-block`), for the storage of disk alerts (with
        `if_changed`, told to the core only when an image or a size changed)."""
        self._block = None
        try:
            block = await link.execute("query-block", {})
        except (CommandFailed, LinkClosed, TimeoutError):
            return  # a restricted monitor, a link that ends: alerts go without it
        self._block = block
        found = await disks_of(block)  # {} when the paths could not be resolved in time
        if not if_changed or (found and found != self.watch.disks):
            self.watch.on_disks(found, time.time())

    async def _agent_ports(self, link: Link) -> dict[str, bool | None] | None:
        """The VM's guest-agent ports and whether each is open (`agentports`); asked before
        the session counts as up, like the disks, so that nothing is in flight after."""
        try:
            return await agent_ports(link)
        except (CommandFailed, LinkClosed, TimeoutError):
            return None  # a restricted monitor, a link that ends: known from its next change

    def _note_protection(self) -> None:
        view = self.protection_view()
        self.note("vm_protection", "warning" if view["gaps"] else "info", **view)

    def protection_view(self) -> dict[str, Any]:
        """The `protection` of `status --json` (`checked` false before any connect)."""
        if self.protection is None:
            return dict(UNCHECKED)
        return self.protection.view(self.protection_ignore)

    def ignore_gaps(self, ignore: tuple[str, ...]) -> None:
        """The operator's accepted gaps (a reload): a changed set is a new record."""
        if ignore == self.protection_ignore:
            return
        self.protection_ignore = ignore
        if self.protection is not None:
            self._note_protection()

    async def until_idle(self) -> None:
        """Wait until the current link has ended (a crash's cause found and alerted)."""
        await self._idle.wait()

    def _set_state(self, state: RunState) -> None:
        was_connected = self.connected
        self.state = state
        if state is RunState.IDLE:
            self._idle.set()
        else:
            self._idle.clear()
        if self.connected != was_connected:
            self.since = time.time()
            self.recorder.connected(self.connected)

    async def _crash_cause(self, cause: EndCause, error: str) -> CrashCause | None:
        """For a crash, why QEMU died: the host's reports about its PID (or libvirt's
        reason), waited for at most `crash_cause_wait_s` (docs/architecture.md)."""
        if not self.watch.ends_in_crash(cause):
            return None
        self._set_state(RunState.CLOSING)
        try:
            return await find_cause(
                self._witness, self.crash_cause_wait_s, libvirt_stop_reason(error)
            )
        except Exception as err:  # a reader's bug must not lose the crash alert
            self.log.error("internal_error", error=repr(err), where="crash cause")
            return None

    def _ended(self, cause: EndCause, error: str, crash: CrashCause | None = None) -> None:
        self._set_state(RunState.IDLE)
        self.watch.on_disconnected(time.time(), cause, error, crash)
        self._store_status()
        self._arm_deadline()  # a crash loop's quiet time goes on between links

    # -- events, status and deadlines -----------------------------------------------------------

    def _on_event(self, obj: dict[str, Any], now: float) -> None:
        """Reader callback (the event was read at `now`): must not raise or await."""
        watch = self.watch
        try:
            try:
                event = decode_object(obj)
            except DecodeError as err:
                watch.on_decode_error(err, now)
                return
            if isinstance(event, Control):
                return
            before = watch.status
            watch.on_event(event, now)
            if watch.status != before:
                self._store_status()
            if watch.timers_pending or self._deadline_handle is not None:
                self._arm_deadline()
        except Exception as err:  # a bug must not end the session
            self.log.error("internal_error", error=repr(err), where="event handling")

    def _on_bad(self, err: DecodeError) -> None:
        try:
            self.watch.on_decode_error(err, time.time())
        except Exception as bug:
            self.log.error("internal_error", error=repr(bug), where="decode error handling")

    def _on_reply(self) -> None:
        """Reader callback: a reply was read; remember how far the events had got."""
        self._changes_at_reply = self.watch.run_changes

    def request_status(self) -> None:
        self._status_wanted.set()

    async def _status_worker(self, link: Link) -> None:
        """Answer the core's `query_status()` requests, off the reader."""
        while True:
            await self._status_wanted.wait()
            self._status_wanted.clear()
            try:
                status = await link.query_status()
            except LinkClosed:
                return  # the link is ending; on_disconnected classifies what is pending
            except StatusRefused as err:
                self.note("vm_status_unavailable", "warning", error=str(err))
                self.watch.status_unknown(time.time(), str(err))
                continue
            except TimeoutError:
                why = "query-status timed out"
                self.note("vm_unresponsive", "warning", error=why)
                self.watch.status_unknown(time.time(), why)
                continue
            self.watch.on_status(status, time.time(), self._changes_at_reply)
            self._store_status()
            self._arm_deadline()

    def request_command(self, name: str, arguments: Mapping[str, Any]) -> None:
        """The core wants QEMU to act (opt-in remediation): sent by the command worker."""
        try:
            self._commands.put_nowait((name, arguments))
        except asyncio.QueueFull:
            self.watch.on_command_result(name, "too many commands queued", time.time())

    async def _command_worker(self, link: Link) -> None:
        """Send the core's commands, one at a time, each logged as `vm_command_sent`."""
        while True:
            name, arguments = await self._commands.get()
            error = ""
            try:
                await link.execute(name, arguments)
            except CommandFailed as err:
                error = str(err)
            except LinkClosed as err:
                error = f"the link ended: {err}"
            fields: dict[str, Any] = {"command": name, "arguments": dict(arguments)}
            fields["outcome"] = "refused" if error else "done"
            if error:
                fields["error"] = error
            self.note("vm_command_sent", "warning" if error else "info", **fields)
            self.watch.on_command_result(name, error, time.time())
            self._arm_deadline()

    async def _storage_worker(self, link: Link) -> None:
        """Every `storage_check_interval_s`: while a disk fills (`vm_disk_filling`), whether
        its image grew or was replaced (QEMU says neither: `query-block` again); with
        `storage_free_percent`, the free space where the writable images live (statvfs off
        the loop: NFS can hang)."""
        while True:
            config = self.watch.resumer.config
            if filling(self.watch.firing.values()):
                await self._learn_disks(link, if_changed=True)
            if config.storage_free_percent > 0:
                free: dict[str, float] = {}
                for mount in self.watch.storages():
                    share = await free_percent(mount, STATVFS_TIMEOUT_S)
                    if share is not None:  # None: unreachable now, said by the disk's errors
                        free[mount] = share
                self.watch.on_storage_free(free, time.time())
            await asyncio.sleep(config.storage_check_interval_s)

    async def _space_worker(self) -> None:
        """While a resume waits on a full disk, look at the free bytes where the writable
        images live every `SPACE_POLL_S`, so that `cont` follows the space coming back."""
        while True:
            await self._space_wanted.wait()
            self._space_wanted.clear()
            while self.watch.resumer.wants_space():
                free: dict[str, int] = {}
                for mount in self.watch.storages():
                    left = await free_bytes(mount, STATVFS_TIMEOUT_S)
                    if left is not None:  # None: unreachable now, said by the disk's errors
                        free[mount] = left
                if self.watch.on_space(free, time.time()):
                    self._arm_deadline()
                await asyncio.sleep(SPACE_POLL_S)

    def _arm_deadline(self) -> None:
        if self.watch.resumer.wants_space():
            self._space_wanted.set()
        deadline = self.watch.next_deadline()
        if deadline == self._deadline_at:
            return
        self._cancel_deadline()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        self._deadline_at = deadline
        self._deadline_handle = loop.call_later(max(0.0, deadline - time.time()), self._deadline)

    def _deadline(self) -> None:
        self._deadline_handle, self._deadline_at = None, None
        try:
            self.watch.tick(time.time())
            self._arm_deadline()
        except Exception as err:
            self.log.error("internal_error", error=repr(err), where="follow-up deadline")

    def _cancel_deadline(self) -> None:
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
        self._deadline_handle, self._deadline_at = None, None

    def _store_status(self) -> None:
        self.store.set_status(self.name, self.watch.status)
        self.recorder.status(self.watch.status)
