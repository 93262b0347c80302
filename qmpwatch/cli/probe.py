"""`qmpwatch check-config --probe`: does the world match a valid configuration?

`probe(config)` checks, with the permissions of the user it runs as, that each socket accepts
a connection (tried once, closed at once), that each `[[listen]]` socket can be made in its
directory and given its group, that each `[[libvirt]]` URI answers a read-only connection
(listing the matching domains), that `daemon.state_dir` is writable, that each sink's host
answers and each exec command is executable. Each problem is one line naming what
it is about. docs/architecture.md ("check-config --probe") says why it probes as it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import grp
import importlib
import os
import pwd
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from qmpwatch.alerts.sinks import redact_url
from qmpwatch.core.config import Config, LibvirtConfig, ListenConfig
from qmpwatch.sources.discover import discover

PROBE_TIMEOUT_S = 3.0  # longest wait for a sink's host to answer a TCP connect
LIBVIRT_TIMEOUT_S = 10.0  # longest wait for libvirtd to connect and list its domains
STATE_FILES = ("state.sqlite3", "outbox.sqlite3", "outbox.lock")  # with -wal and -shm


@dataclass(slots=True)
class ProbeReport:
    """What was checked (`checked`: a few words each) and every problem found."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def probe(config: Config) -> ProbeReport:
    """Check every socket, the state directory and every sink of `config`."""
    report = ProbeReport()
    sockets = [(f"vm[{i}] {vm.name}", vm.socket) for i, vm in enumerate(config.vms)]
    configured = {vm.socket for vm in config.vms}
    for path, (name, rule) in discover(config.discover).items():
        if path not in configured:
            sockets.append((f"discover[{config.discover.index(rule)}] {name}", path))
    for label, path in sockets:
        if (problem := probe_socket(path)) is not None:
            report.problems.append(f"{label}: socket: {problem}")
    report.checked.append(
        f"{len(config.vms)} [[vm]] and {len(sockets) - len(config.vms)} discovered socket(s)"
        if config.discover
        else f"{len(sockets)} [[vm]] socket(s)"
    )
    for i, entry in enumerate(config.listen):
        for problem in probe_listen(entry):
            report.problems.append(f"listen[{i}]: {problem}")
        report.checked.append(f"[[listen]] {entry.socket}")
    for i, lv in enumerate(config.libvirt):
        problem, domains = await probe_libvirt(lv)
        if problem is not None:
            report.problems.append(f"libvirt[{i}]: uri: {problem}")
            report.checked.append(f"[[libvirt]] {lv.uri}")
        else:
            report.checked.append(f"[[libvirt]] {lv.uri}: {len(domains)} domain(s)")

    if (problem := probe_state_dir(Path(config.daemon.state_dir))) is not None:
        report.problems.append(f"daemon.state_dir: {problem}")
    report.checked.append("state_dir")

    alert = config.alert
    hosts = [(f"alert.webhook[{i}]", w.url, w.timeout_s) for i, w in enumerate(alert.webhook)]
    hosts += [
        (f"alert.alertmanager[{i}]", a.url, a.timeout_s) for i, a in enumerate(alert.alertmanager)
    ]
    answers = await asyncio.gather(
        *(probe_tcp(url, min(timeout, PROBE_TIMEOUT_S)) for _, url, timeout in hosts)
    )
    for (label, _, _), problem in zip(hosts, answers, strict=True):
        if problem is not None:
            report.problems.append(f"{label}: url: {problem}")
    for i, e in enumerate(alert.exec):
        if (problem := probe_command(e.command[0])) is not None:
            report.problems.append(f"alert.exec[{i}]: command: {problem}")
    if hosts or alert.exec:
        report.checked.append(f"{len(hosts) + len(alert.exec)} sink(s)")
    return report


def probe_socket(path: str) -> str | None:
    """Why `path` cannot be attached to by this user, or None. Connects once, closes at once."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist (is the VM running?)"
    except OSError as err:
        return f"{path}: cannot look at it: {err.strerror}{_who()}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a unix socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.connect(path)
    except PermissionError:
        return (
            f"{path}: permission denied{_who()}: the socket is {_mode(st)}; connecting needs "
            "write access (run qmpwatch in the socket's group, with group write permission)"
        )
    except ConnectionRefusedError:
        return f"{path}: connection refused: nothing listens on it (QEMU gone, its file left)"
    except BlockingIOError:
        return (
            f"{path}: its listen queue is full: connections wait that QEMU has not accepted "
            "(another client holds the monitor)"
        )
    except OSError as err:
        return f"{path}: cannot connect: {err.strerror}"
    finally:
        sock.close()
    return None


def probe_listen(entry: ListenConfig) -> list[str]:
    """Why the daemon, run as this user, could not make `entry`'s socket (in its directory,
    given its group), or nothing."""
    problems: list[str] = []
    path = Path(entry.socket)
    folder = path.parent
    if not folder.is_dir():
        problems.append(f"socket: the directory {folder} does not exist (create it, or use "
                        "RuntimeDirectory=qmpwatch under systemd)")  # fmt: skip
    elif not os.access(folder, os.W_OK | os.X_OK):
        problems.append(f"socket: cannot create a socket in {folder}{_who()}")
    elif path.exists() and not stat.S_ISSOCK(os.lstat(path).st_mode):
        problems.append(f"socket: {path} exists and is not a socket; qmpwatch will not replace it")
    if entry.group:
        try:
            gid = grp.getgrnam(entry.group).gr_gid
        except KeyError:
            problems.append(f"group: no such group: {entry.group}")
        else:
            if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
                problems.append(
                    f"group: {entry.group}: not a group of this user{_who()}, who cannot give "
                    "the socket to it"
                )
    return problems


async def probe_libvirt(entry: LibvirtConfig) -> tuple[str | None, list[str]]:
    """Connect to `entry.uri` read-only and list the domains `entry.domains` match: (why
    not, or None; their names). libvirt's calls block: they run on a thread of their own,
    given up after LIBVIRT_TIMEOUT_S."""
    try:
        libvirt = importlib.import_module("libvirt")
    except ImportError:
        return "libvirt-python is not installed: pip install 'qmpwatch[libvirt]'", []

    def look() -> list[str]:
        conn = libvirt.openReadOnly(entry.uri)
        try:
            names = [dom.name() for dom in conn.listAllDomains()]
        finally:
            conn.close()
        return sorted(n for n in names if any(fnmatch.fnmatchcase(n, g) for g in entry.domains))

    try:
        async with asyncio.timeout(LIBVIRT_TIMEOUT_S):
            return None, await _on_own_thread(look)
    except TimeoutError:
        return f"{entry.uri}: libvirtd did not answer within {LIBVIRT_TIMEOUT_S:g} s", []
    except libvirt.libvirtError as err:
        words = err.get_error_message() or str(err)
        return f"{entry.uri}: cannot connect read-only{_who()}: {words}", []


async def _on_own_thread(call: Callable[[], list[str]]) -> list[str]:
    """`call()` on a daemon thread (one that hangs does not keep the process alive)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[str]] = loop.create_future()

    def settle(result: list[str] | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)

    def run() -> None:
        try:
            result = call()
        except BaseException as err:  # handed to the awaiting task
            outcome: tuple[list[str] | None, BaseException | None] = (None, err)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="probe-libvirt", daemon=True).start()
    return await future


def probe_state_dir(path: Path) -> str | None:
    """Why the daemon, run as this user, could not keep its state in `path`, or None."""
    if not path.exists():
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{path} cannot be created: {parent} is not a directory"
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".qmpwatch-probe-", dir=parent))
        except OSError as err:
            why = f"{err.strerror}{_who()}"
            return f"{path} does not exist and cannot be created in {parent}: {why}"
        return None
    if not path.is_dir():
        return f"{path} is not a directory"
    try:
        fd, name = tempfile.mkstemp(prefix=".qmpwatch-probe-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        return f"{path} is not writable: {err.strerror}{_who()}"
    for base in STATE_FILES:
        for file in (path / base, path / f"{base}-wal", path / f"{base}-shm"):
            try:
                os.close(os.open(file, os.O_RDWR | os.O_CLOEXEC))
            except FileNotFoundError:
                continue
            except OSError as err:
                return f"{file}: cannot open for writing: {err.strerror}{_who()}"
    return None


async def probe_tcp(url: str, timeout: float) -> str | None:
    """Why `url`'s host does not answer a TCP connect within `timeout`, or None."""
    target = redact_url(url)
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        return f"{target}: {err}"
    if not host:
        return f"{target}: no host"
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return f"{target} did not answer a TCP connect within {timeout:g} s"
    except OSError as err:  # asyncio's own text repeats the address: name the errno
        why = os.strerror(err.errno) if err.errno else err.strerror or str(err)
        return f"{target}: cannot connect: {why}"
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    return None


def probe_command(program: str) -> str | None:
    """Why `program` (argv[0] of an exec sink) cannot be run, or None."""
    if "/" not in program:
        return None if shutil.which(program) else f"{program}: not found in PATH"
    if not os.path.isfile(program):
        return f"{program}: no such file"
    if not os.access(program, os.X_OK):
        return f"{program}: not executable{_who()}"
    return None


def _who() -> str:
    """The words " (as user NAME)", for problems that depend on who runs the probe."""
    uid = os.geteuid()
    with contextlib.suppress(KeyError):
        return f" (as user {pwd.getpwuid(uid).pw_name})"
    return f" (as uid {uid})"


def _mode(st: os.stat_result) -> str:
    """`srwxr-x--- root:kvm`."""
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.filemode(st.st_mode)} {owner}:{group}"
