"""The `listen` source: QEMU dials in to a socket qmpwatch listens on (the qmeventd style).

Each connection is identified before anything else (SO_PEERCRED: its uid must be one of the
entry's `users`; a pidfd pinning the process, its /proc/PID/cmdline must be a QEMU's; the name
is `-name`, else `-uuid`, else `pid-PID`, and a name pinned to another uid is refused), then
negotiated and handed to the VM's session. Refused peers and name conflicts are logged at most
once a minute and dropped; a VM that ends cleanly leaves; one watched before a restart that
does not dial in within `grace_s` is gone. See docs/architecture.md, "The listen source".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import re
import select
import socket
import stat
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from qmpwatch.core.config import Config, ConnectConfig, ListenConfig
from qmpwatch.core.errors import ConnectFailed
from qmpwatch.core.pins import Owner, refusal
from qmpwatch.session.session import CRASH_CAUSE_WAIT_S, RunState
from qmpwatch.sources.base import SessionHost
from qmpwatch.sources.guard import step_failed
from qmpwatch.sources.peer import (
    QemuCommandLine,
    parse_cmdline,
    peer_credentials,
    peer_pid,
    read_cmdline,
)
from qmpwatch.sources.qmp import QmpLink
from qmpwatch.sources.trust import Throttle, allowed_uids

BACKLOG = 128  # QEMUs reconnecting at once after a restart of qmpwatch
SOCKET_MODE = 0o660
HANG_UP_WAIT_S = 5.0  # for a refused QEMU's greeting before its connection is closed
HANGING_UP_MAX = 32  # refused connections waiting so at once; more are closed at once
ACCEPT_RETRY_S = 1.0  # after accept() failed (EMFILE: out of file descriptors)
REPORTED_MAX = 4096  # refused peers remembered (so as not to log them again); then forgotten
_QEMU_PROGRAM = re.compile(r"(qemu|kvm)", re.IGNORECASE)


class PeerRefused(Exception):
    """A connection that is not a QEMU's, or not one qmpwatch can tell apart."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Peer:
    """Who dialed in: the pinned process and what its command line says."""

    pid: int
    name: str
    cmdline: QemuCommandLine
    argv: tuple[str, ...] = ()


def identify(conn: socket.socket) -> Peer:
    """The QEMU process on the other end of an accepted connection, or PeerRefused."""
    pid = peer_pid(conn)
    if pid is None:
        raise PeerRefused("no_peer", "the kernel names no peer process (SO_PEERCRED)")
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as err:
        if err.errno == errno.ENOSYS:  # Linux before 5.3, or valgrind: nothing can pin it
            why = "pidfd_open is not available (Linux 5.3 or later)"
            raise PeerRefused("no_pidfd", why) from None
        raise PeerRefused("gone", f"process {pid} went away ({err.strerror})") from None
    try:
        try:
            argv = read_cmdline(pid)
            cmdline = parse_cmdline(argv)
        except OSError as err:
            raise PeerRefused("unreadable", f"/proc/{pid}/cmdline: {err.strerror}") from None
        if _ended(pidfd):  # the cmdline read may be another process's that got the PID
            raise PeerRefused("gone", f"process {pid} went away while identified")
    finally:
        os.close(pidfd)
    if not _QEMU_PROGRAM.search(os.path.basename(cmdline.program)):
        raise PeerRefused("not_qemu", f"process {pid} ({cmdline.program}) is not QEMU")
    return Peer(pid, cmdline.name or cmdline.uuid or f"pid-{pid}", cmdline, tuple(argv))


def _ended(pidfd: int) -> bool:
    """Whether the process a pidfd pins has ended: its pidfd turns readable. Unlike a signal 0,
    this needs no permission over the process (QEMU runs as another user than qmpwatch)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


class _Listener:
    """One listening socket and the connections it accepted."""

    def __init__(self, entry: ListenConfig, source: ListenSource) -> None:
        self.entry = entry
        self.source = source
        self.log = structlog.get_logger().bind(socket=entry.socket)
        self.sock = _listening_socket(entry)
        self.task: asyncio.Task[None] | None = None

    async def accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    conn = await self.accept(loop)
                except Exception as err:  # EMFILE, ENOBUFS, or a bug: this socket goes on
                    step_failed(err, where="listen: accept", socket=self.entry.socket,
                                then=f"accepts again in {ACCEPT_RETRY_S:g} s")  # fmt: skip
                    await asyncio.sleep(ACCEPT_RETRY_S)
                    continue
                self.source.spawn(self.source.serve(conn, self.entry), "listen:peer")
        finally:
            self.sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.entry.socket)

    async def accept(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """The next connection to this socket (non-blocking)."""
        conn, _ = await loop.sock_accept(self.sock)
        conn.setblocking(False)
        return conn


def _listening_socket(entry: ListenConfig) -> socket.socket:
    """Bind `entry.socket` (replacing a stale socket file, never any other file)."""
    path = entry.socket
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket; not replacing it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        if entry.group:
            gid = grp.getgrnam(entry.group).gr_gid
            if os.stat(path).st_gid != gid:  # not already made in a setgid directory of it:
                os.chown(path, -1, gid)  # the unit's seccomp filter refuses chown (EPERM)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ListenSource:
    """`[[listen]]`: sockets that QEMU processes dial in to."""

    kind = "listen"

    def __init__(self, config: Config, host: SessionHost, tg: asyncio.TaskGroup) -> None:
        self.host = host
        self.connect: ConnectConfig = config.connect
        self.log = structlog.get_logger()
        self._tg = tg
        self.listeners: dict[str, _Listener] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._graced = False
        # What was said about a peer: QEMU dials again every second; a record a minute is enough.
        self._reported = Throttle()
        self._hanging = 0  # refused connections waiting for their greeting (`_hang_up`)

    def reconfigure(self, config: Config) -> None:
        self.connect = config.connect
        wanted = {entry.socket: entry for entry in config.listen}
        for path in list(self.listeners):
            if wanted.get(path) != self.listeners[path].entry:
                listener = self.listeners.pop(path)
                if listener.task is not None:
                    listener.task.cancel()
        for path, entry in wanted.items():
            if path in self.listeners:
                continue
            try:
                listener = _Listener(entry, self)
            except (OSError, KeyError) as err:
                self.log.error("listen_failed", socket=path, error=_words(err))
                continue
            listener.task = self.spawn(listener.accept_forever(), f"listen:{path}")
            self.listeners[path] = listener
            users = sorted(allowed_uids(entry.users))
            self.log.info("listening", socket=path, group=entry.group, users=users)
        if not self._graced and config.listen:
            self._graced = True
            self._expect_returning(min(entry.grace_s for entry in config.listen))

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task of this source, in the daemon's TaskGroup; `stop` cancels it."""
        task = self._tg.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _expect_returning(self, grace_s: float) -> None:
        """VMs that dialed in before qmpwatch restarted: open their sessions now (a pause in
        the gap is reported when they are back); one not back within `grace_s` is gone."""
        for name, status in self.host.known(self.kind).items():
            if status is None or status == "shutdown":
                continue
            session = self.host.open(name, self.kind, no_shutdown="auto")
            if session is None:
                continue

            async def grace(name: str = name) -> None:
                await asyncio.sleep(grace_s)
                held = self.host.open(name, self.kind, no_shutdown="auto")
                if held is not None and not held.links:
                    held.unreachable(
                        "not_reconnected",
                        f"did not dial in within {grace_s:g} s after qmpwatch started",
                    )

            self.spawn(grace(), f"listen:grace:{name}")

    def _refused_for(self, name: str, pid: int, err: ConnectFailed) -> None:
        """A QEMU claiming a VM this source watches (not connected now) was refused: the VM
        is not reached, and `status` says why."""
        if self.host.holder(name) != self.kind:
            return
        held = self.host.open(name, self.kind, no_shutdown="auto")
        if held is not None and not held.connected:
            held.attempt_failed(
                err.reason, f"its QEMU (pid {pid}) dialed in, refused: {err.detail}"
            )

    async def serve(self, conn: socket.socket, entry: ListenConfig) -> None:
        """Serve one accepted connection; an exception it should never raise drops only it."""
        try:
            await self._serve(conn, entry)
        except Exception as err:
            conn.close()
            step_failed(err, where="listen: connection", socket=entry.socket,
                        then="drops this connection (QEMU dials in again)")  # fmt: skip

    async def _serve(self, conn: socket.socket, entry: ListenConfig) -> None:
        """Identify one accepted connection, then watch its VM until it hangs up."""
        cred = peer_credentials(conn)
        uid = cred[1] if cred is not None else -1
        if cred is not None and uid not in allowed_uids(entry.users):
            await self._hang_up(conn)
            pid = cred[0]
            why = f"process {pid} runs as uid {uid}, not one of this socket's users"
            self._once((pid, uid, "user_not_allowed"), "listen_peer_refused", socket=entry.socket,
                       pid=pid, uid=uid, reason="user_not_allowed", error=why)  # fmt: skip
            return
        try:
            peer = identify(conn)
        except PeerRefused as err:
            conn.close()
            self._once(("", uid, str(err)), "listen_peer_refused", socket=entry.socket,
                       pid=cred[0] if cred else None, uid=uid, reason=err.reason,
                       error=str(err))  # fmt: skip
            return
        claim = Owner(uid)
        owned = refusal(self.host.owner(peer.name), claim)
        if owned is not None:
            await self._hang_up(conn)
            pinned = self.host.owner(peer.name)
            why = f"{peer.name} belongs to uid {pinned.uid if pinned else '?'}, not {uid}"
            self._once((peer.pid, uid, owned), "listen_peer_refused", socket=entry.socket,
                       vm=peer.name, pid=peer.pid, uid=uid, reason=owned, error=why)  # fmt: skip
            return
        link = QmpLink(
            peer.name,
            conn,
            where=entry.socket,
            no_shutdown=peer.cmdline.no_shutdown,
            pid=peer.pid,
            argv=peer.argv,
        )
        try:
            await link.negotiate(self.connect.timeout_s)
        except ConnectFailed as err:  # the link has closed the connection
            self._once((peer.pid, uid, err.reason), "listen_peer_refused",
                       socket=entry.socket, vm=peer.name, pid=peer.pid, uid=uid,
                       reason=err.reason, error=err.detail)  # fmt: skip
            self._refused_for(peer.name, peer.pid, err)
            return
        session = self.host.open(
            peer.name, self.kind, no_shutdown=entry.no_shutdown, remediate=entry.remediate
        )
        if session is not None and session.state is RunState.CLOSING:
            # Its previous QEMU died and the crash's cause is being looked for (at most
            # CRASH_CAUSE_WAIT_S): a QEMU restarted at once is that VM back, not a rival.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CRASH_CAUSE_WAIT_S + 1.0):
                    await session.until_idle()
        if session is None or session.connected:
            holder = self.host.holder(peer.name)
            self._once(
                (peer.pid, uid, "conflict"),
                "listen_name_conflict",
                vm=peer.name,
                pid=peer.pid,
                socket=entry.socket,
                held_by=holder if holder != self.kind else "another QEMU connected to qmpwatch",
            )
            await link.close()
            return
        if peer.cmdline.name or peer.cmdline.uuid:  # a pid-PID name is this process's alone
            self.host.pin(peer.name, claim)
        if session.links == 0:
            self.log.info("vm_added", vm=peer.name, socket=entry.socket, pid=peer.pid)
        await session.watch_link(link)
        if not session.connected and session.watch.status == "shutdown":
            self.log.info("vm_removed", vm=peer.name, socket=entry.socket)
            self.host.close(peer.name, "its QEMU shut down")

    async def _hang_up(self, conn: socket.socket) -> None:
        """Close a refused QEMU's connection once its greeting is in (or after
        HANG_UP_WAIT_S): QEMU 7.2 crashes when its dialed monitor is closed while it is still
        writing it. Beyond HANGING_UP_MAX at once (a flood), at once."""
        if self._hanging >= HANGING_UP_MAX:
            conn.close()
            return
        self._hanging += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(HANG_UP_WAIT_S):
                await loop.sock_recv(conn, 4096)
        except (TimeoutError, OSError):
            pass
        finally:
            self._hanging -= 1
            conn.close()

    def _once(self, key: tuple[object, int, str], kind: str, **fields: object) -> None:
        """Log a refused peer at most once a minute: QEMU dials again every second."""
        if self._reported.due(key):
            self.log.warning(kind, **fields)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        self.listeners.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _words(err: BaseException) -> str:
    if isinstance(err, KeyError):
        return f"no such group: {err.args[0]}"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename or ''}: {err.strerror}".lstrip(": ")
    return str(err)
