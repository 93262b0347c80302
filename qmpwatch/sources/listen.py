"""The `listen` source: QEMU dials in to a socket qmpwatch listens on (the qmeventd style).

Each connection is identified before anything else (SO_PEERCRED, a pidfd pinning the process,
its /proc/PID/cmdline must be a QEMU's; the name is `-name`, else `-uuid`, else `pid-PID`),
then negotiated and handed to the VM's session. Refused peers and name conflicts are logged
once and dropped; a VM that ends cleanly leaves; one watched before a restart that does not
dial in within `grace_s` is gone. See docs/architecture.md, "The listen source".
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
from qmpwatch.sources.base import SessionHost
from qmpwatch.sources.guard import step_failed
from qmpwatch.sources.peer import QemuCommandLine, parse_cmdline, peer_pid, read_cmdline
from qmpwatch.sources.qmp import QmpLink

BACKLOG = 128  # QEMUs reconnecting at once after a restart of qmpwatch
SOCKET_MODE = 0o660
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
            cmdline = parse_cmdline(read_cmdline(pid))
        except OSError as err:
            raise PeerRefused("unreadable", f"/proc/{pid}/cmdline: {err.strerror}") from None
        if _ended(pidfd):  # the cmdline read may be another process's that got the PID
            raise PeerRefused("gone", f"process {pid} went away while identified")
    finally:
        os.close(pidfd)
    if not _QEMU_PROGRAM.search(os.path.basename(cmdline.program)):
        raise PeerRefused("not_qemu", f"process {pid} ({cmdline.program}) is not QEMU")
    return Peer(pid, cmdline.name or cmdline.uuid or f"pid-{pid}", cmdline)


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
        # What was said about a peer: QEMU dials again every second, and one record is enough.
        self._reported: set[tuple[str, int, str]] = set()

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
            self.log.info("listening", socket=path, group=entry.group)
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
        try:
            peer = identify(conn)
        except PeerRefused as err:
            conn.close()
            self._once(("", 0, str(err)), "listen_peer_refused", socket=entry.socket,
                       reason=err.reason, error=str(err))  # fmt: skip
            return
        link = QmpLink(
            peer.name,
            conn,
            where=entry.socket,
            no_shutdown=peer.cmdline.no_shutdown,
            pid=peer.pid,
        )
        try:
            await link.negotiate(self.connect.timeout_s)
        except ConnectFailed as err:  # the link has closed the connection
            self._once((peer.name, peer.pid, err.reason), "listen_peer_refused",
                       socket=entry.socket, vm=peer.name, pid=peer.pid, reason=err.reason,
                       error=err.detail)  # fmt: skip
            return
        session = self.host.open(
            peer.name, self.kind, no_shutdown=entry.no_shutdown, remediate=entry.remediate
        )
        if session is None or session.connected:
            holder = self.host.holder(peer.name)
            self._once(
                (peer.name, peer.pid, "conflict"),
                "listen_name_conflict",
                vm=peer.name,
                pid=peer.pid,
                socket=entry.socket,
                held_by=holder if holder != self.kind else "another QEMU connected to qmpwatch",
            )
            await link.close()
            return
        if session.links == 0:
            self.log.info("vm_added", vm=peer.name, socket=entry.socket, pid=peer.pid)
        await session.watch_link(link)
        if not session.connected and session.watch.status == "shutdown":
            self.log.info("vm_removed", vm=peer.name, socket=entry.socket)
            self.host.close(peer.name, "its QEMU shut down")

    def _once(self, key: tuple[str, int, str], kind: str, **fields: object) -> None:
        """Log a refused peer once: QEMU dials again every second."""
        if key in self._reported:
            return
        if len(self._reported) >= REPORTED_MAX:
            self._reported.clear()
        self._reported.add(key)
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
