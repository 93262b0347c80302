"""`[[listen]]` peers the daemon cannot identify, made for real: each is refused with its own
reason (`listen_peer_refused`) and the daemon goes on. The kernel produces every one: a peer
gone before it was looked at (`gone`), a peer in a PID namespace the daemon cannot see
(`no_peer`), a /proc that hides other users' processes (`unreadable`, hidepid), and a
seccomp filter that makes pidfd_open fail as on Linux before 5.3 (`no_pidfd`). Also the
`group =` key, and a group that does not exist (`listen_failed`)."""

from __future__ import annotations

import asyncio
import grp
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from tests.support.daemon_harness import DaemonProcess, write_config

NOBODY = 65534
#: Run python (the daemon) with pidfd_open (syscall 434 on x86_64) failing with ENOSYS, as a
#: seccomp filter does (systemd's SystemCallFilter=~pidfd_open with ENOSYS, an old kernel).
NO_PIDFD = """\
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
code = b"".join(struct.pack("HBBI", *i) for i in [
    (0x20, 0, 0, 0),                     # A = seccomp_data.nr
    (0x15, 0, 1, 434),                   # A == pidfd_open ?
    (0x06, 0, 0, 0x00050000 | 38),       #   return ERRNO(ENOSYS)
    (0x06, 0, 0, 0x7FFF0000),            # return ALLOW
])
buf = ctypes.create_string_buffer(code)
prog = struct.pack("HxxxxxxQ", 4, ctypes.addressof(buf))
prog_buf = ctypes.create_string_buffer(prog)
assert libc.prctl(38, 1, 0, 0, 0) == 0                               # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.addressof(prog_buf), 0, 0) == 0      # SECCOMP_MODE_FILTER
os.execv(sys.argv[1], sys.argv[1:])  # the daemon's command, under the filter
"""
CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"


def listen_config(tmp_path: Path, listen: Path, **entry: object) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        arrays={"listen": [{"socket": str(listen), **entry}]},
    )


async def connect_and_exit(listen: Path, *prefix: str) -> int:
    """A process (under `prefix`) that connects to `listen` and exits; its PID, reaped."""
    proc = await asyncio.create_subprocess_exec(*prefix, sys.executable, "-c", CONNECT,
                                                str(listen))  # fmt: skip
    async with asyncio.timeout(30):
        assert await proc.wait() == 0
    return proc.pid


async def test_a_peer_gone_before_it_is_looked_at_is_refused_as_gone(
    tmp_path: Path, sock_dir: Path
) -> None:
    """The daemon is held (SIGSTOP) while a process connects and exits; let go, it finds no
    process behind the connection: `gone`, and it goes on listening."""
    listen = sock_dir / "qw.sock"
    async with DaemonProcess.start(listen_config(tmp_path, listen)) as daemon:
        await daemon.wait_for("listening")
        daemon.send_signal(signal.SIGSTOP)
        try:
            pid = await connect_and_exit(listen)
        finally:
            daemon.send_signal(signal.SIGCONT)
        refused = await daemon.wait_for("listen_peer_refused", reason="gone")
        with socket.socket(socket.AF_UNIX) as peer:  # this test's process: alive, not QEMU
            await asyncio.get_running_loop().sock_connect(peer, str(listen))
            await daemon.wait_for("listen_peer_refused", reason="not_qemu")
    assert refused["socket"] == str(listen)
    assert f"process {pid} went away" in refused["error"]
    assert not daemon.find("internal_error")


async def test_a_peer_in_a_pid_namespace_it_cannot_see_is_refused_as_no_peer(
    tmp_path: Path, sock_dir: Path
) -> None:
    """The daemon runs in a PID namespace of its own (a container); a process outside dials
    in and the kernel names no PID for it: `no_peer`."""
    listen = sock_dir / "qw.sock"
    inside = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM")
    async with DaemonProcess.start(listen_config(tmp_path, listen), prefix=inside) as daemon:
        await daemon.wait_for("listening")
        await connect_and_exit(listen)
        refused = await daemon.wait_for("listen_peer_refused")
    assert refused["reason"] == "no_peer"
    assert "SO_PEERCRED" in refused["error"]


async def test_a_peer_hidden_by_hidepid_is_refused_as_unreadable(
    tmp_path: Path, sock_dir: Path
) -> None:
    """/proc mounted with hidepid=2 (its gid= a group the daemon is not in) and the daemon
    without CAP_SYS_PTRACE: another user's
    process that dials in cannot be read: `unreadable`."""
    listen = sock_dir / "qw.sock"
    os.chmod(sock_dir, 0o755)  # the peer runs as nobody
    hidden = (
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        # gid=: the group that sees everything (0 by default, which root is in)
        'mount -t proc -o hidepid=2,gid=65533 proc /proc && '
        'exec setpriv --bounding-set -sys_ptrace "$@"',
        "hidepid",
    )  # fmt: skip
    # nobody is one of the listen's users: the check that fails is reading its process
    cfg = listen_config(tmp_path, listen, group=grp.getgrgid(NOBODY).gr_name, users=[NOBODY])
    async with DaemonProcess.start(cfg, prefix=hidden) as daemon:
        await daemon.wait_for("listening")
        as_nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        peer = await asyncio.create_subprocess_exec(
            *as_nobody, "/usr/bin/python3", "-c",
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.recv(1)", str(listen),
        )  # fmt: skip
        try:
            refused = await daemon.wait_for("listen_peer_refused")
        finally:
            async with asyncio.timeout(30):
                await peer.wait()  # the daemon hung up
    assert refused["reason"] == "unreadable"
    assert refused["error"].startswith(f"/proc/{peer.pid}/cmdline: ")


async def test_without_pidfd_open_peers_are_refused_as_no_pidfd(
    tmp_path: Path, sock_dir: Path
) -> None:
    """pidfd_open fails with ENOSYS (a seccomp filter, as on Linux before 5.3): no peer can
    be pinned, so each is refused as `no_pidfd`, saying what is missing."""
    listen = sock_dir / "qw.sock"
    seccomp = (sys.executable, "-c", NO_PIDFD)
    async with DaemonProcess.start(listen_config(tmp_path, listen), prefix=seccomp) as daemon:
        await daemon.wait_for("listening")
        await connect_and_exit(listen)
        refused = await daemon.wait_for("listen_peer_refused")
    assert refused["reason"] == "no_pidfd"
    assert "pidfd_open is not available" in refused["error"]


async def test_the_listen_group_key_gives_the_socket_to_that_group(
    tmp_path: Path, sock_dir: Path
) -> None:
    """`group = "nogroup"`: the socket is srw-rw---- root:nogroup, and `listening` says so."""
    listen = sock_dir / "qw.sock"
    group = grp.getgrgid(NOBODY).gr_name
    async with DaemonProcess.start(listen_config(tmp_path, listen, group=group)) as daemon:
        listening = await daemon.wait_for("listening")
        st = os.stat(listen)
    assert listening["group"] == group
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, NOBODY)


async def test_a_group_that_does_not_exist_fails_that_socket_only(
    tmp_path: Path, sock_dir: Path
) -> None:
    """`group` naming no group: `listen_failed` names it; the daemon runs on."""
    listen = sock_dir / "qw.sock"
    cfg = listen_config(tmp_path, listen, group="qw-no-such-group")
    async with DaemonProcess.start(cfg) as daemon:
        failed = await daemon.wait_for("listen_failed")
        with socket.socket(socket.AF_UNIX) as probe:
            assert probe.connect_ex(str(listen)) != 0
    assert failed["socket"] == str(listen)
    assert "qw-no-such-group" in failed["error"]
    assert daemon.proc.returncode == 0
