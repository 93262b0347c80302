"""Who may speak for a VM: real QEMUs run as two local users (uids the test makes up, no
passwd entry needed), one believed and one not; a name stays with its first owner.

The daemon runs as root, as the tests do; the QEMUs of the other users dial in to its
`[[listen]]` socket (mode 0660, group root, which they are in: the attacker is a member of
the socket's group) or make the sockets a `[[discover]]` glob finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config
from tests.support.fake_qmp import FakeQmp

pytestmark = pytest.mark.qemu

OWNER = 64021  # runs the real VMs
ATTACKER = 64022  # another local user, in the sockets' group
STRANGER = 64023  # a third one, never believed

# A program that is not QEMU but calls itself QEMU, sending forged critical events.
FORGER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.connect(sys.argv[1])\n"
    's.sendall(b\'{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, '
    '"package": ""}, "capabilities": []}}\\r\\n\')\n'
    "s.recv(4096)\n"
    's.sendall(b\'{"return": {}}\\r\\n{"event": "GUEST_PANICKED", "data": {"action": "pause"}, '
    '"timestamp": {"seconds": 1, "microseconds": 0}}\\r\\n\')\n'
    "s.recv(4096)\n"
)


# A Python other users may run (the test's own may live under /root).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def shared(sock_dir: Path) -> Path:
    """`sock_dir`, searchable by the other users (their QEMUs' run directories are inside)."""
    sock_dir.chmod(0o755)
    return sock_dir


def listen_config(tmp_path: Path, listen: Path, **entry: object) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        arrays={"listen": [{"socket": str(listen), **entry}]},
    )


def as_user(name: str, user: int, dial_in: Path | None = None) -> LabSpec:
    """A lab VM run by `user` (TCG: /dev/kvm is root's here, and QEMU 7.2 crashes falling
    back to TCG after KVM refused it)."""
    return LabSpec(name, dial_in=dial_in, user=user, accel="tcg")


def dialing(name: str, listen: Path, user: int) -> LabSpec:
    return as_user(name, user, dial_in=listen)


def index(daemon: DaemonProcess, event: str, **match: Any) -> int:
    """Where the first record of kind `event` matching `match` is in the daemon's log."""
    found = daemon.find(event, **match)
    assert found, f"no {event} {match}"
    return daemon.records.index(found[0])


async def test_listen_believes_only_its_users(tmp_path: Path, sock_dir: Path) -> None:
    """After web01 crashed, another user's QEMU named web01, one with a new name and a forger
    calling itself QEMU are each refused with their pid, uid and reason: no session, and the
    crash alert is resolved only by the owner's web01 coming back."""
    work = shared(sock_dir)
    listen = work / "qw.sock"
    posing = work / "qemu-system-x86_64"
    posing.symlink_to(SYSTEM_PYTHON)
    async with DaemonProcess.start(listen_config(tmp_path, listen, users=[OWNER])) as daemon:
        async with LabVM.start(dialing("web01", listen, OWNER), work) as web:
            await daemon.wait_for("vm_connected", vm="web01", pid=web.pid)
            await web.kill()
        crashed = await daemon.wait_for("alert", vm="web01", alert="vm_crashed")
        async with (
            LabVM.start(dialing("web01", listen, ATTACKER), work) as impostor,
            LabVM.start(dialing("evil01", listen, ATTACKER), work) as newcomer,
        ):
            forger = await asyncio.create_subprocess_exec(
                posing, "-c", FORGER, str(listen), user=ATTACKER
            )
            refusals = [
                await daemon.wait_for("listen_peer_refused", pid=pid)
                for pid in (impostor.pid, newcomer.pid, forger.pid)
            ]
            with contextlib.suppress(ProcessLookupError):  # hung up on, it may have ended
                forger.kill()
            await forger.wait()
            async with LabVM.start(dialing("web01", listen, OWNER), work) as back:
                await daemon.wait_for("vm_connected", vm="web01", pid=back.pid)
                await daemon.wait_for("alert_resolved", fingerprint=crashed["fingerprint"])
    assert daemon.find("listening")[0]["users"] == [OWNER]
    for refused in refusals:
        assert (refused["uid"], refused["reason"]) == (ATTACKER, "user_not_allowed"), refused
    impostors = {impostor.pid, newcomer.pid, forger.pid}
    assert not daemon.find("vm_connected", where=lambda r: r.get("pid") in impostors)
    assert not daemon.find("vm_added", vm="evil01")
    assert not daemon.find("alert", where=lambda r: r["alert"] != "vm_crashed")
    assert index(daemon, "alert_resolved") > index(daemon, "vm_connected", pid=back.pid)
    for pid in impostors:  # QEMU redials every second: one record a minute
        assert len(daemon.find("listen_peer_refused", pid=pid)) == 1


async def test_a_name_stays_with_its_first_owner_across_restarts(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Both users are believed, but db01 was first seen from the owner: its QEMU dies while
    qmpwatch restarts, and the other user's db01 is refused (name_owned, the pin survives the
    restart); db01 is reported gone, and only the owner's db01 resolves that."""
    work = shared(sock_dir)
    listen = work / "qw.sock"
    cfg = listen_config(tmp_path, listen, users=[OWNER, ATTACKER], grace_s=3.0)
    async with LabVM.start(dialing("db01", listen, OWNER), work) as db:
        async with DaemonProcess.start(cfg) as first:
            await first.wait_for("vm_connected", vm="db01")
        await db.kill()
    async with DaemonProcess.start(cfg) as second:
        async with LabVM.start(dialing("db01", listen, ATTACKER), work) as impostor:
            refused = await second.wait_for("listen_peer_refused", pid=impostor.pid)
            gone = await second.wait_for("alert", vm="db01", timeout=20)
        async with LabVM.start(dialing("db01", listen, OWNER), work) as back:
            await second.wait_for("vm_connected", vm="db01", pid=back.pid)
            resolved = await second.wait_for("alert_resolved", vm="db01")
    assert (refused["reason"], refused["uid"], refused["vm"]) == ("name_owned", ATTACKER, "db01")
    assert not second.find("vm_connected", pid=impostor.pid)
    assert gone["alert"] == "vm_gone_while_unmonitored"
    assert resolved["fingerprint"] == gone["fingerprint"]
    assert index(second, "alert_resolved") > index(second, "vm_connected", pid=back.pid)


async def test_discover_keeps_a_name_with_the_socket_it_watches(
    tmp_path: Path, sock_dir: Path
) -> None:
    """glob run/*/*.qmp over directories of three users: the attacker's aa/web07.qmp (sorted
    first) does not take web07 from the owner's zz/web07.qmp, and a socket of a user not in
    `users` is refused."""
    work = shared(sock_dir)
    run = work / "run"
    for directory, uid in (("zz", OWNER), ("aa", ATTACKER), ("cc", STRANGER)):
        (run / directory).mkdir(parents=True)
        os.chown(run / directory, uid, -1)
    real_path, fake_path, stranger_path = (
        run / "zz" / "web07.qmp",
        run / "aa" / "web07.qmp",
        run / "cc" / "web09.qmp",
    )
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        discover=[{"glob": str(run / "*" / "*.qmp"), "users": [OWNER, ATTACKER]}],
        sections={"connect": FAST_CONNECT},
    )
    async with (
        DaemonProcess.start(cfg) as daemon,
        LabVM.start(as_user("web07", OWNER), work, watch_socket=real_path) as real,
    ):
        await daemon.wait_for("vm_connected", vm="web07")
        async with (
            LabVM.start(as_user("web07", ATTACKER), work, watch_socket=fake_path),
            LabVM.start(as_user("web09", STRANGER), work, watch_socket=stranger_path),
        ):
            conflict = await daemon.wait_for("discover_name_conflict", socket=str(fake_path))
            refused = await daemon.wait_for("discover_socket_refused", socket=str(stranger_path))
            await real.stop()
            await daemon.wait_for("qmp_event", vm="web07", qmp="STOP")
            await daemon.wait_for("alert", vm="web07")
    assert (conflict["reason"], conflict["uid"]) == ("name_owned", ATTACKER)
    assert conflict["other_socket"] == str(real_path)
    assert (refused["reason"], refused["uid"]) == ("user_not_allowed", STRANGER)
    assert [r["socket"] for r in daemon.find("vm_added", vm="web07")] == [str(real_path)]
    assert not daemon.find("vm_added", vm="web09")
    assert all(r["socket"] == str(real_path) for r in daemon.find("vm_connected"))


@pytest.mark.qemu
async def test_a_discovered_socket_served_by_another_user_is_not_believed(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A socket file owned by a believed user but served by a process of another (here the
    test's, root: a fake monitor, as no QEMU does this) is refused when dialed; a real QEMU of
    the believed user beside it is watched."""
    work = shared(sock_dir)
    run = work / "run"
    run.mkdir()
    os.chown(run, OWNER, -1)
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        discover=[{"glob": str(run / "*.qmp"), "users": [OWNER]}],
        sections={"connect": FAST_CONNECT},
    )
    async with FakeQmp.serve(run / "fake01.qmp") as fake:
        os.chown(run / "fake01.qmp", OWNER, -1)
        async with (
            DaemonProcess.start(cfg) as daemon,
            LabVM.start(as_user("real01", OWNER), work, watch_socket=run / "real01.qmp"),
        ):
            refused = await daemon.wait_for("vm_connect_failed", vm="fake01")
            await daemon.wait_for("vm_connected", vm="real01")
    assert refused["reason"] == "user_not_allowed"
    assert "uid 0" in refused["error"]
    assert not daemon.find("vm_connected", vm="fake01")
    assert not fake.sessions or not fake.sessions[0].negotiated.is_set()


@pytest.mark.qemu
async def test_discovered_name_conflicts_say_which_socket_keeps_the_name(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Same user, two sockets named dup: the one watched keeps the name (name_socket_owned for
    the newcomer, sorted first); a discovered socket named like a [[vm]]: name_taken."""
    run = sock_dir / "run"
    for directory in ("aa", "zz", "x"):
        (run / directory).mkdir(parents=True)
    async with LabVM.start(LabSpec("conf"), sock_dir) as conf:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "conf", "socket": str(conf.watch_socket)}],
            discover=[{"glob": str(run / "*" / "*.qmp")}],
            sections={"connect": FAST_CONNECT},
        )
        async with (
            DaemonProcess.start(cfg) as daemon,
            LabVM.start(LabSpec("dup"), sock_dir, watch_socket=run / "zz" / "dup.qmp"),
        ):
            await daemon.wait_for("vm_connected", vm="dup")
            async with (
                LabVM.start(LabSpec("dup"), sock_dir, watch_socket=run / "aa" / "dup.qmp"),
                LabVM.start(LabSpec("conf"), sock_dir, watch_socket=run / "x" / "conf.qmp"),
            ):
                newcomer = await daemon.wait_for(
                    "discover_name_conflict", socket=str(run / "aa" / "dup.qmp")
                )
                taken = await daemon.wait_for(
                    "discover_name_conflict", socket=str(run / "x" / "conf.qmp")
                )
    assert (newcomer["reason"], newcomer["uid"]) == ("name_socket_owned", 0)
    assert newcomer["other_socket"] == str(run / "zz" / "dup.qmp")
    assert taken["reason"] == "name_taken"
    assert taken["other_socket"] == str(conf.watch_socket)
    assert [r["socket"] for r in daemon.find("vm_added", vm="dup")] == [str(run / "zz" / "dup.qmp")]
