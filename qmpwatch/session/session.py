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
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import structlog

from qmpwatch.core.alert import Alert, ClientStopSeverity
from qmpwatch.core.config import FollowupConfig, LifecycleConfig, NoShutdown, RemediateConfig
from qmpwatch.core.errors import DecodeError
from qmpwatch.core.events import Control, Event, decode_object
from qmpwatch.core.watch import VmWatch
from qmpwatch.session.link import (
    CommandFailed,
    EndCause,
    Link,
    LinkCallbacks,
    LinkClosed,
    StatusRefused,
)
from qmpwatch.session.storage import disks_of, free_percent

# Failures that mean no QEMU is behind the VM's socket (it went away while nobody watched),
# as opposed to a QEMU that is there but cannot be reached.
ABSENT_REASONS = frozenset({"missing", "refused", "not_reconnected"})
STATVFS_TIMEOUT_S = 5.0
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
        self.state = RunState.IDLE
        self.where = ""  # the socket (or URI) of the latest link, or the one dialed
        self.since = time.time()  # when the session last came up or went down
        self.links = 0  # links watched so far
        self._absence_checked = False
        self._status_wanted = asyncio.Event()
        self._commands: asyncio.Queue[tuple[str, Mapping[str, Any]]] = asyncio.Queue(COMMANDS_MAX)
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._deadline_at: float | None = None
        self._changes_at_reply = 0  # watch.run_changes when the latest reply was read
        recorder.connected(False)  # every VM has its series from the start

    @property
    def connected(self) -> bool:
        return self.state is not RunState.IDLE

    # -- what sources tell --------------------------------------------------------------------

    def unreachable(self, reason: str, detail: str) -> None:
        """An attempt to reach QEMU failed. The first one, before any link since qmpwatch
        started: a VM last seen alive that has no QEMU now went away while nobody watched."""
        self.recorder.connect_failed(reason)
        if self._absence_checked or self.links:
            return
        self._absence_checked = True
        if reason in ABSENT_REASONS:
            self.absent(reason, detail)

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
                        tg.create_task(self._storage_worker()),
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
            ended: tuple[EndCause, str] = ("closed", "qmpwatch is stopping")
            with contextlib.suppress(Exception):
                closed = await link.close()
                if closed[0] == "eof":
                    ended = closed  # QEMU had gone already (its socket's removal stopped us)
            self._ended(*ended)
            raise
        self._ended(cause, error)

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
        self._store_status()
        self._arm_deadline()
        return True, False, ""

    async def _learn_disks(self, link: Link) -> None:
        """Where the VM's disks live (`query-block`), for the storage of disk alerts."""
        try:
            block = await link.execute("query-block", {})
        except (CommandFailed, LinkClosed, TimeoutError):
            return  # a restricted monitor, a link that ends: alerts go without it
        self.watch.on_disks(await disks_of(block), time.time())

    def _set_state(self, state: RunState) -> None:
        was_connected = self.connected
        self.state = state
        if self.connected != was_connected:
            self.since = time.time()
            self.recorder.connected(self.connected)

    def _ended(self, cause: EndCause, error: str) -> None:
        self._set_state(RunState.IDLE)
        self.watch.on_disconnected(time.time(), cause, error)
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

    async def _storage_worker(self) -> None:
        """With `storage_free_percent`, look at the free space where the writable images
        live every `storage_check_interval_s` (statvfs off the loop: NFS can hang)."""
        while True:
            config = self.watch.resumer.config
            if config.storage_free_percent > 0:
                free: dict[str, float] = {}
                for mount in self.watch.storages():
                    share = await free_percent(mount, STATVFS_TIMEOUT_S)
                    if share is not None:  # None: unreachable now, said by the disk's errors
                        free[mount] = share
                self.watch.on_storage_free(free, time.time())
            await asyncio.sleep(config.storage_check_interval_s)

    def _arm_deadline(self) -> None:
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
