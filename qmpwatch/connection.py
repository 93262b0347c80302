"""The connection manager of one VM: attach, resync, watch, notice the end, attach again.

`VmConnection.run()` loops for the life of the daemon. Each attempt uses a fresh
`WatchClient` (so no state of a dead session leaks into the next one): connect the unix
socket ourselves (so that a missing, refused or forbidden socket is told apart), learn the
peer's command line (`-no-shutdown`), let qemu.qmp do the greeting and negotiation, all
within `connect.timeout_s` (a monitor held by another client never greets: `no_greeting`),
then `query-status` + `query-version` to resync. Events are decoded and fed to the VM's
`VmWatch` in the reader task; `query-status` for classifying a stop runs in a separate task;
follow-up deadlines are loop timers, not polling. When the session ends, how it ended (EOF
after SHUTDOWN, EOF without, an error) goes to the watch, and the next attempt starts after
a capped, jittered backoff that resets after a healthy session. Failures are logged as
`vm_connect_failed` when the reason changes and at most once a minute otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPError
from qemu.qmp.protocol import Runstate

from qmpwatch.alert import Alert
from qmpwatch.config import ConnectConfig, FollowupConfig, LifecycleConfig, NoShutdown
from qmpwatch.discovery import inside
from qmpwatch.errors import ConnectFailed, DecodeError
from qmpwatch.events import Control, Event, decode_object
from qmpwatch.logs import RecordLogger, qmp_event_fields
from qmpwatch.metrics import Metrics
from qmpwatch.peer import QemuCommandLine, parse_cmdline, peer_pid, read_cmdline
from qmpwatch.qmpclient import WatchClient
from qmpwatch.statestore import StateStore
from qmpwatch.watch import VmWatch

COMMAND_TIMEOUT_S = 5.0  # query-status / query-version
DISCONNECT_TIMEOUT_S = 2.0
HEALTHY_SESSION_S = 5.0  # a session this long resets the backoff
FAILURE_LOG_INTERVAL_S = 60.0
# Failures of the first attempt that mean no QEMU is behind the socket (a VM gone while
# qmpwatch was not running), as opposed to one that is there but cannot be reached.
ABSENT_REASONS = frozenset({"missing", "refused"})


@dataclass(frozen=True, slots=True)
class VmTarget:
    """A VM to watch: its name, monitor socket and the -no-shutdown setting."""

    name: str
    socket: str
    no_shutdown: NoShutdown = "auto"
    confine: str = ""  # discovered: the directory the socket's real path must stay in


class AlertSink(Protocol):
    """Where alerts go (the dispatcher); both calls return at once."""

    def fire(self, alert: Alert) -> None: ...

    def resolve(self, alert: Alert, now: float) -> None: ...


RecordObserver = Callable[[str, str, Mapping[str, Any], float], None]


@dataclass(frozen=True, slots=True)
class Services:
    """What every VM connection shares: the state store, alert sink and record observers."""

    store: StateStore
    alerts: AlertSink | None = None
    observe: RecordObserver | None = None  # (vm, kind, fields, now) of every record
    metrics: Metrics | None = None  # counts the records and events too
    # Told when a session comes up or ends and when an alert fires or resolves: what the
    # daemon's status line (VMs, connected, alerts firing) is made of.
    changed: Callable[[], None] | None = None
    restored: Mapping[str, list[Alert]] = field(default_factory=dict)  # firing at start-up


class Backoff:
    """Capped exponential backoff with jitter: each delay in [d/2, d], d doubling to `cap`."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * 2 ** min(self.failures, 30))
        self.failures += 1
        return float(ceiling / 2 + self._rng.uniform(0, ceiling / 2))

    def reset(self) -> None:
        self.failures = 0


class _Output:
    """The daemon's WatchOutput for one VM: the log, the metrics, the alert dispatcher."""

    def __init__(self, conn: VmConnection) -> None:
        self._conn = conn
        vm = self._vm = conn.target.name
        self._records = RecordLogger(vm)
        self._services = conn.services
        metrics = conn.services.metrics
        # Services is frozen: what runs per event is looked up once, here.
        self._observe = conn.services.observe
        self._observe_record = metrics.observe_record if metrics is not None else None
        self._meter = metrics.event_meter(vm) if metrics is not None else None

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None:
        self._records.record(kind, level, now, fields)
        if self._observe_record is not None:
            self._observe_record(self._vm, kind, fields, now)
        if self._observe is not None:
            self._observe(self._vm, kind, fields, now)

    def qmp_event(self, event: Event, now: float) -> None:
        self._records.qmp_event(event, now)
        if self._meter is not None:
            self._meter.observe(event, now)
        if self._observe is not None:
            self._observe(self._vm, "qmp_event", qmp_event_fields(event), now)

    def raise_alert(self, alert: Alert) -> None:
        if self._services.alerts is not None:
            self._services.alerts.fire(alert)
        if self._services.changed is not None:
            self._services.changed()

    def resolve_alert(self, alert: Alert, now: float) -> None:
        if self._services.alerts is not None:
            self._services.alerts.resolve(alert, now)
        if self._services.changed is not None:
            self._services.changed()

    def query_status(self) -> None:
        self._conn.request_status()


class VmConnection:
    """Owns one VM's monitor socket for the life of the daemon."""

    def __init__(
        self,
        target: VmTarget,
        *,
        connect: ConnectConfig,
        followup: FollowupConfig,
        client_stop_severity: str,
        services: Services,
        lifecycle: LifecycleConfig | None = None,
        firing: list[Alert] | None = None,
        check_absent: bool = True,
    ) -> None:
        """`firing`: the VM's alerts still firing (from before a restart, or from the task
        this one replaces); None: those the daemon restored at start-up. `check_absent`: a
        first attempt that finds no QEMU means the VM went away while nobody watched (not so
        for a task that replaces one that watched it until now)."""
        self.target = target
        self.connect_config = connect
        self.services = services
        self.log = structlog.get_logger().bind(vm=target.name)
        self.watch = VmWatch(
            target.name,
            _Output(self),
            followup=followup,
            lifecycle=lifecycle,
            no_shutdown=target.no_shutdown is True,
            client_stop_severity=client_stop_severity,
            last_status=services.store.last_status(target.name),
        )
        if firing is None:
            firing = list(services.restored.get(target.name, ()))
        self.watch.restore(firing, time.time())
        self.connected = False
        if services.metrics is not None:
            services.metrics.set_connected(target.name, False)  # a series from the start
        self._status_wanted = asyncio.Event()
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._deadline_at: float | None = None
        self._cmdline_warned = False
        self._qemu_pid: int | None = None
        self._changes_at_reply = 0  # watch.run_changes when the latest reply was read
        self._resync_as_of = 0
        self._first_attempt = check_absent  # no attempt made yet: look for a VM gone

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Attach, watch, re-attach: until cancelled."""
        backoff = Backoff(self.connect_config.backoff_initial_s, self.connect_config.backoff_max_s)
        last_reason = ""
        last_logged = 0.0
        attempts = 0
        try:
            while True:
                client = WatchClient(
                    self.target.name,
                    on_event=self._on_event,
                    on_decode_error=self._on_bad,
                    on_reply=self._on_reply,
                )
                try:
                    peer = await self._attach(client)
                except ConnectFailed as err:
                    attempts += 1
                    if self._first_attempt and err.reason in ABSENT_REASONS:
                        self.watch.on_absent(time.time(), err.reason, err.detail)
                        self._store_status()
                        self._arm_deadline()
                    self._first_attempt = False
                    if self.services.metrics is not None:
                        self.services.metrics.connect_failed(self.target.name, err.reason)
                    delay = backoff.next()
                    now = time.monotonic()
                    if err.reason != last_reason or now - last_logged >= FAILURE_LOG_INTERVAL_S:
                        self.log.warning(
                            "vm_connect_failed",
                            socket=self.target.socket,
                            reason=err.reason,
                            error=err.detail,
                            attempts=attempts,
                            retry_in_s=round(delay, 3),
                        )
                        last_reason, last_logged = err.reason, now
                    await asyncio.sleep(delay)
                    continue
                attempts, last_reason = 0, ""
                self._first_attempt = False
                started = time.monotonic()
                await self._session(client, peer)
                if time.monotonic() - started >= HEALTHY_SESSION_S:
                    backoff.reset()
                else:
                    await asyncio.sleep(backoff.next())
        finally:
            self._cancel_deadline()

    async def _attach(self, client: WatchClient) -> QemuCommandLine | None:
        """Connect and negotiate within the timeout; ConnectFailed says why not."""
        path = self.target.socket
        try:
            mode = os.stat(path).st_mode  # one cheap syscall; no thread needed
        except FileNotFoundError:
            raise ConnectFailed("missing", f"{path} does not exist") from None
        except PermissionError as err:
            raise ConnectFailed("permission", f"{path}: {err.strerror}") from None
        except OSError as err:
            raise ConnectFailed("error", f"{path}: {err.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise ConnectFailed("not_a_socket", f"{path} is not a unix socket")
        if self.target.confine and not inside(path, self.target.confine):
            raise ConnectFailed(
                "outside_dir",
                f"{path} now leads out of {self.target.confine}, where it was discovered",
            )
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as err:  # EMFILE: RLIMIT_NOFILE is too low for this many VMs
            reason = "fd_limit" if err.errno in (errno.EMFILE, errno.ENFILE) else "error"
            raise ConnectFailed(reason, f"cannot create a socket: {err.strerror}") from None
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_config.timeout_s) as scope:
                try:
                    await loop.sock_connect(sock, path)
                except FileNotFoundError:
                    raise ConnectFailed("missing", f"{path} does not exist") from None
                except PermissionError as err:
                    raise ConnectFailed("permission", f"{path}: {err.strerror}") from None
                except ConnectionRefusedError:
                    raise ConnectFailed(
                        "refused", f"{path}: connection refused (no QEMU behind the socket)"
                    ) from None
                except OSError as err:
                    raise ConnectFailed("error", f"{path}: {err.strerror or err}") from None
                peer = self._peer(sock)
                await client.connect(sock)
        except TimeoutError:
            await self._reset(client, sock)
            if scope.expired():
                raise ConnectFailed(
                    "no_greeting",
                    f"no QMP greeting within {self.connect_config.timeout_s:g} s "
                    "(another client holds the monitor, or QEMU is not answering)",
                ) from None
            raise
        except ConnectFailed:
            await self._reset(client, sock)
            raise
        except ConnectError as err:
            await self._reset(client, sock)
            raise ConnectFailed(_connect_reason(err.exc), f"{err.exc!s} ({err.exc!r})") from None
        except (asyncio.CancelledError, KeyboardInterrupt):
            await self._reset(client, sock)
            raise
        except Exception as err:  # qemu.qmp can raise a bare AssertionError here
            await self._reset(client, sock)
            raise ConnectFailed("error", f"{type(err).__name__}: {err}") from None
        return peer

    def _peer(self, sock: socket.socket) -> QemuCommandLine | None:
        """Resolve `no_shutdown = "auto"` from QEMU's command line; None when unknown."""
        pid = peer_pid(sock)
        if pid is None:
            return None
        try:
            cmdline = parse_cmdline(read_cmdline(pid))
        except OSError as err:
            if not self._cmdline_warned:
                self._cmdline_warned = True
                self.log.warning(
                    "qemu_cmdline_unreadable",
                    pid=pid,
                    error=err.strerror or str(err),
                    no_shutdown=self.target.no_shutdown is True,
                )
            return None
        self._qemu_pid = pid
        return cmdline

    async def _reset(self, client: WatchClient, sock: socket.socket) -> None:
        """Bring a failed client back to IDLE and close the socket, whatever state it is in."""
        if client.runstate != Runstate.IDLE:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                    await client.disconnect()
        sock.close()

    # -- one session ------------------------------------------------------------------------

    async def _session(self, client: WatchClient, peer: QemuCommandLine | None) -> None:
        watch = self.watch
        if self.target.no_shutdown == "auto":
            watch.no_shutdown = peer.no_shutdown if peer is not None else False
        else:
            watch.no_shutdown = self.target.no_shutdown
        cause, error = "closed", ""
        unresponsive = False
        self._set_connected(True)
        try:
            resynced = False
            try:
                status, version = await self._resync(client)
                resynced = True
            except TimeoutError:
                # The monitor greeted but does not answer (QEMU frozen, its main loop stuck):
                # not a crash. Say so, hang up, and attach again after the backoff.
                status, version, unresponsive = None, "", True
                error = f"resync: no answer to query-status within {COMMAND_TIMEOUT_S:g} s"
                self.log.warning("vm_unresponsive", error=error)
            except (QMPError, OSError, EOFError) as err:
                status, version = None, ""
                error = f"resync failed: {describe_error(err)}"
            if resynced:
                fields: dict[str, Any] = {
                    "socket": self.target.socket,
                    "qemu_version": version,
                    "no_shutdown": watch.no_shutdown,
                }
                if peer is not None:
                    fields["pid"] = self._qemu_pid
                watch.on_connected(time.time(), status, fields, self._resync_as_of)
                self._store_status()
                self._arm_deadline()
                async with asyncio.TaskGroup() as tg:
                    worker = tg.create_task(self._status_worker(client))
                    while client.runstate == Runstate.RUNNING:
                        await client.runstate_changed()
                    worker.cancel()
            cause, error = await self._close(client, error)
            if unresponsive and cause == "error":
                cause = "closed"  # qmpwatch hung up; QEMU did not go away
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._close(client, "")
            self._ended("closed", "qmpwatch is stopping")
            raise
        self._ended(cause, error)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        if self.services.changed is not None:
            self.services.changed()

    def _ended(self, cause: str, error: str) -> None:
        self._set_connected(False)
        self.watch.on_disconnected(time.time(), cause, error)
        self._store_status()
        self._arm_deadline()  # a crash loop's quiet time goes on between sessions

    async def _resync(self, client: WatchClient) -> tuple[str | None, str]:
        """The run status (None: the monitor refused to say) and QEMU's version.

        A command that QEMU answers with an error (a restricted monitor, a QMP proxy,
        qemu-storage-daemon) is not a dead QEMU: the session goes on, with the status unknown
        and the version from the greeting. A timeout or the end of the session raises.
        """
        status: Any = None
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            try:
                status = await client.execute("query-status")
            except ExecuteError as err:
                self.log.warning("vm_status_unavailable", error=describe_error(err))
            self._resync_as_of = self._changes_at_reply
        word = status.get("status") if isinstance(status, dict) else None
        return (word if isinstance(word, str) else None), _version(client)

    async def _close(self, client: WatchClient, error: str) -> tuple[str, str]:
        """Disconnect (bounded); returns (cause, error) from what ended the session."""
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await client.disconnect()
        except EOFError:
            return "eof", error
        except TimeoutError:
            return "error", error or "disconnect timed out"
        except Exception as err:
            return "error", error or f"{type(err).__name__}: {err}"
        return ("error", error) if error else ("closed", "")

    # -- events, status and deadlines -------------------------------------------------------

    def _on_event(self, obj: dict[str, Any], now: float) -> None:
        """Reader-task callback (the event was read at `now`): must not raise or await."""
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
        """Reader-task callback: a reply was read; remember how far the events had got."""
        self._changes_at_reply = self.watch.run_changes

    def request_status(self) -> None:
        self._status_wanted.set()

    async def _status_worker(self, client: WatchClient) -> None:
        """Answer the watch's `query_status()` requests, off the reader task."""
        while True:
            await self._status_wanted.wait()
            self._status_wanted.clear()
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT_S):
                    reply = await client.execute("query-status")
            except ExecInterruptedError:
                return  # the session is ending; on_disconnected classifies what is pending
            except ExecuteError as err:
                why = describe_error(err)
                self.log.warning("vm_status_unavailable", error=why)
                self.watch.status_unknown(time.time(), why)
                continue
            except (QMPError, OSError, TimeoutError) as err:
                why = (
                    "query-status timed out"
                    if isinstance(err, TimeoutError)
                    else describe_error(err)
                )
                self.log.warning("vm_unresponsive", error=why)
                self.watch.status_unknown(time.time(), why)
                continue
            as_of = self._changes_at_reply
            status = reply.get("status") if isinstance(reply, dict) else None
            word = status if isinstance(status, str) else "unknown"
            self.watch.on_status(word, time.time(), as_of)
            self._store_status()
            self._arm_deadline()

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
        self.services.store.set_status(self.target.name, self.watch.status)
        if self.services.metrics is not None:
            self.services.metrics.set_status(self.target.name, self.watch.status)


def describe_error(err: BaseException) -> str:
    """An error as a sentence for a record, never a repr of a library object."""
    if isinstance(err, ExecuteError):
        return f"QEMU answered {err.sent.get('execute', 'a command')} with {err.error_class}: {err}"
    if isinstance(err, TimeoutError):
        return f"no answer within {COMMAND_TIMEOUT_S:g} s"
    if isinstance(err, EOFError):
        return "end of file on the monitor (QEMU closed the connection)"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _version(client: WatchClient) -> str:
    """QEMU's version, from the greeting every QMP server sends first ("" if it has none)."""
    greeting = client.greeting
    qemu = greeting.QMP.version.get("qemu") if greeting is not None else None
    if not isinstance(qemu, Mapping):
        return ""
    return f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}"


def _connect_reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, PermissionError):
        return "permission"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, EOFError | ConnectionResetError | BrokenPipeError):
        return "closed_during_handshake"
    if isinstance(exc, DecodeError | QMPError):
        return "bad_greeting"
    return "error"
