"""The `dial` source: `[[vm]]` entries, each a QMP monitor socket that qmpwatch connects to.

One task per VM dials its socket, hands the session a link, and dials again when the link
ends, after a capped, jittered backoff that resets after a healthy session. It connects the
socket itself, so that a missing, refused or forbidden socket is told apart, learns the peer's
command line (`-no-shutdown`), and logs failures as `vm_connect_failed` when the reason
changes and at most once a minute otherwise. `DialSource` keeps one such task per entry;
`qmpwatch.sources.discover` reuses it for the sockets its globs find.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from qmpwatch.core.backoff import Backoff, FailureLog
from qmpwatch.core.config import Config, ConnectConfig, NoShutdown, RemediateConfig
from qmpwatch.core.errors import ConnectFailed
from qmpwatch.session.session import VmSession
from qmpwatch.sources.base import SessionHost
from qmpwatch.sources.guard import step_failed
from qmpwatch.sources.paths import inside
from qmpwatch.sources.peer import (
    QemuCommandLine,
    parse_cmdline,
    peer_credentials,
    peer_pid,
    read_cmdline,
)
from qmpwatch.sources.permission import hint_for
from qmpwatch.sources.qmp import QmpLink

HEALTHY_SESSION_S = 5.0  # a session this long resets the backoff
FAILURE_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class DialTarget:
    """A VM to dial: its name, monitor socket and the -no-shutdown setting."""

    name: str
    socket: str
    no_shutdown: NoShutdown = "auto"
    confine: str = ""  # discovered: the directory the socket's real path must stay in
    users: frozenset[int] = frozenset()  # discovered: the uids whose QEMU may serve it
    # What qmpwatch may do to the VM; a change applies to the running session (no redial).
    remediate: RemediateConfig = field(default_factory=RemediateConfig, compare=False)


class Dialer:
    """Dials one VM's socket for as long as it runs, handing each link to the session."""

    def __init__(
        self,
        target: DialTarget,
        session: VmSession,
        connect: ConnectConfig,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        """`after`: the task of the same VM's previous target, to let end first."""
        self.target = target
        self.session = session
        self.connect = connect
        self.after = after
        self.log = structlog.get_logger().bind(vm=target.name)
        self._cmdline_warned = False

    async def run(self) -> None:
        """Attach, watch, re-attach: until cancelled."""
        if self.after is not None:
            await asyncio.wait([self.after])  # one link at a time per session
            self.after = None
        backoff = Backoff(self.connect.backoff_initial_s, self.connect.backoff_max_s)
        failures = FailureLog(FAILURE_LOG_INTERVAL_S)
        while True:
            try:
                link = await self.attach()
            except Exception as err:
                delay = backoff.next()
                if not isinstance(err, ConnectFailed):
                    step_failed(err, where="dial: connect", vm=self.target.name,
                                then=f"dials again in {delay:g} s")  # fmt: skip
                    await asyncio.sleep(delay)
                    continue
                self.session.unreachable(err.reason, err.detail)
                if failures.failed(err.reason, time.monotonic()):
                    self.session.note(
                        "vm_connect_failed",
                        "warning",
                        socket=self.target.socket,
                        reason=err.reason,
                        error=err.detail,
                        attempts=failures.attempts,
                        retry_in_s=round(delay, 3),
                        **hint_for(err.reason, self.target.socket),
                    )
                await asyncio.sleep(delay)
                continue
            failures.succeeded()
            started = time.monotonic()
            await self.session.watch_link(link)
            if time.monotonic() - started >= HEALTHY_SESSION_S:
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next())

    async def attach(self) -> QmpLink:
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
        timeout = self.connect.timeout_s
        try:
            async with asyncio.timeout(timeout):  # connect, greeting and negotiation
                try:
                    await loop.sock_connect(sock, path)
                except BaseException:
                    sock.close()
                    raise
                self._check_user(sock)
                peer, pid, argv = self._peer(sock)
                link = QmpLink(
                    self.target.name,
                    sock,
                    where=path,
                    no_shutdown=peer.no_shutdown if peer is not None else None,
                    pid=pid if peer is not None else None,
                    argv=argv,
                )
                await link.negotiate(timeout)  # resets the link if the time runs out
        except (TimeoutError, OSError) as err:
            raise _connect_failure(err, path, timeout) from None
        return link

    def _check_user(self, sock: socket.socket) -> None:
        """A discovered socket must be served by a QEMU of its glob's `users` (the file's
        owner was checked when it was found; the process behind it is checked here)."""
        users = self.target.users
        cred = peer_credentials(sock) if users else None
        if cred is not None and cred[1] not in users:
            sock.close()
            raise ConnectFailed(
                "user_not_allowed",
                f"process {cred[0]} serving {self.target.socket} runs as uid {cred[1]}, "
                "not one of the glob's users",
            )

    def _peer(
        self, sock: socket.socket
    ) -> tuple[QemuCommandLine | None, int | None, tuple[str, ...] | None]:
        """QEMU's command line (for `no_shutdown = "auto"`), PID and argv; None when unknown."""
        pid = peer_pid(sock)
        if pid is None:
            return None, None, None
        try:
            argv = read_cmdline(pid)
            return parse_cmdline(argv), pid, tuple(argv)
        except OSError as err:
            if not self._cmdline_warned:
                self._cmdline_warned = True
                self.log.warning(
                    "qemu_cmdline_unreadable",
                    pid=pid,
                    error=err.strerror or str(err),
                    no_shutdown=self.target.no_shutdown is True,
                )
            return None, pid, None


def _connect_failure(err: TimeoutError | OSError, path: str, timeout: float) -> ConnectFailed:
    """What a failed `connect()` of the monitor socket means, as ConnectFailed."""
    if isinstance(err, TimeoutError):
        return ConnectFailed(
            "no_greeting",
            f"no QMP greeting within {timeout:g} s "
            "(another client holds the monitor, or QEMU is not answering)",
        )
    if isinstance(err, FileNotFoundError):
        return ConnectFailed("missing", f"{path} does not exist")
    if isinstance(err, PermissionError):
        return ConnectFailed("permission", f"{path}: {err.strerror}")
    if isinstance(err, ConnectionRefusedError):
        return ConnectFailed("refused", f"{path}: connection refused (no QEMU behind the socket)")
    return ConnectFailed("error", f"{path}: {err.strerror or err}")


@dataclass(slots=True)
class _Running:
    target: DialTarget
    task: asyncio.Task[None]
    session: VmSession


class DialTargets:
    """One dialing task per target, kept in line with a wanted set of targets."""

    def __init__(
        self,
        kind: str,
        host: SessionHost,
        tg: asyncio.TaskGroup,
        leave_reason: str,
    ) -> None:
        self.kind = kind
        self.host = host
        self._tg = tg
        self._leave_reason = leave_reason
        self.connect = ConnectConfig()
        self.running: dict[str, _Running] = {}
        self._ending: set[asyncio.Task[None]] = set()  # cancelled, not yet ended

    def apply(
        self,
        wanted: Mapping[str, DialTarget],
        connect: ConnectConfig,
        on_refused: Callable[[DialTarget], None] | None = None,
    ) -> None:
        """Start, restart (a target that changed) and stop tasks to match `wanted`."""
        self.connect = connect
        moved: dict[str, asyncio.Task[None]] = {}
        for name in list(self.running):
            target = wanted.get(name)
            if target is None:
                self._stop(name, leaving=True)
            elif target != self.running[name].target:
                moved[name] = self._stop(name, leaving=False)
        for name, target in wanted.items():
            session = self.host.open(
                name, self.kind, no_shutdown=target.no_shutdown, remediate=target.remediate
            )
            if name in self.running:
                if session is not None:
                    session.watch.resumer.config = target.remediate
                continue
            if session is None:
                if on_refused is not None:
                    on_refused(target)
                continue
            self._start(target, session, moved.get(name))

    def _start(
        self, target: DialTarget, session: VmSession, after: asyncio.Task[None] | None
    ) -> None:
        session.no_shutdown = target.no_shutdown
        session.where = target.socket
        session.stopping_reason = ""  # watched again (a VM leaving and back at once)
        if after is not None:
            session.forgo_absence_check()  # watched until now, on the old socket
        dialer = Dialer(target, session, self.connect, after)
        task = self._tg.create_task(dialer.run(), name=f"vm:{target.name}")
        self.running[target.name] = _Running(target, task, session)
        structlog.get_logger().info("vm_added", vm=target.name, socket=target.socket)

    def _stop(self, name: str, *, leaving: bool) -> asyncio.Task[None]:
        entry = self.running.pop(name)
        if leaving:  # why its link ends (vm_disconnected.error); no longer counted as watched
            entry.session.stopping_reason = self._leave_reason
        entry.task.cancel()
        self._ending.add(entry.task)
        entry.task.add_done_callback(self._ending.discard)
        structlog.get_logger().info("vm_removed", vm=name, socket=entry.target.socket)

        def ended(_: asyncio.Task[None]) -> None:
            # The cancelled task has recorded its link's end; only then does the VM leave
            # (resolving its alerts), unless it runs again here under the same name.
            if name in self.running:
                return
            if leaving:
                self.host.close(name, self._leave_reason)

        if leaving:
            entry.task.add_done_callback(ended)
        return entry.task

    async def stop(self) -> None:
        """Cancel every task and wait for them, and for those cancelled before (so that the
        VMs that left have resolved their alerts)."""
        tasks = [entry.task for entry in self.running.values()] + list(self._ending)
        self.running.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


class DialSource:
    """`[[vm]]`: the configured monitor sockets."""

    kind = "vm"

    def __init__(self, config: Config, host: SessionHost, tg: asyncio.TaskGroup) -> None:
        self.targets = DialTargets(self.kind, host, tg, "removed from the configuration")

    def reconfigure(self, config: Config) -> None:
        wanted = {
            vm.name: DialTarget(vm.name, vm.socket, vm.no_shutdown, remediate=vm.remediate)
            for vm in config.vms
        }
        self.targets.apply(wanted, config.connect)

    async def stop(self) -> None:
        await self.targets.stop()
