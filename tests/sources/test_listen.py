"""The `[[listen]]` source: real QEMUs dial in to the real daemon (the qmeventd style).

QEMU runs with `-chardev socket,...,reconnect=1 -mon chardev=...,mode=control` (the lab's
`LabSpec.dial_in`) and connects to the daemon's socket by itself. The tests check what an
operator sees in the daemon's log: the VM named from its command line, its alerts, crashes,
restarts of qmpwatch, and peers that are not what they claim.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.support.daemon_harness import NOBODY, UNPRIVILEGED, DaemonProcess, write_config

pytestmark = pytest.mark.qemu


def listen_config(tmp_path: Path, listen: Path, **entry: object) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        arrays={"listen": [{"socket": str(listen), **entry}]},
    )


def uid_of(pid: int) -> int:
    """The real uid of a running process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])


def dialing(name: str, listen: Path, **options: object) -> LabSpec:
    return LabSpec(name, dial_in=listen, **options)  # type: ignore[arg-type]


async def test_a_vm_that_dials_in_is_named_watched_and_alerted(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Named from -name; stop/cont alert and resolve; kill -9 is a crash."""
    listen = sock_dir / "qw.sock"
    async with (
        DaemonProcess.start(listen_config(tmp_path, listen)) as daemon,
        LabVM.start(dialing("dial01", listen, no_shutdown=True), sock_dir) as vm,
    ):
        connected = await daemon.wait_for("vm_connected", vm="dial01")
        assert stat.S_IMODE(os.stat(listen).st_mode) == 0o660
        await vm.stop()
        paused = await daemon.wait_for("alert", vm="dial01")
        await vm.cont()
        resolved = await daemon.wait_for("alert_resolved", vm="dial01")
        await vm.kill()
        crashed = await daemon.wait_for("alert", vm="dial01", alert="vm_crashed")
    assert connected["socket"] == str(listen)
    assert connected["pid"] == vm.pid
    assert connected["no_shutdown"] is True
    assert connected["status"] == "running"
    assert (paused["alert"], paused["severity"]) == ("vm_stopped_unexpected", "warning")
    assert resolved["fingerprint"] == paused["fingerprint"]
    assert crashed["severity"] == "critical"
    assert daemon.proc.returncode == 0, daemon.stderr_text()
    assert not daemon.find("internal_error")
    assert not listen.exists()  # the daemon removes its socket when it stops


async def test_a_restart_of_qmpwatch_reports_what_happened_meanwhile(
    tmp_path: Path, sock_dir: Path
) -> None:
    """QEMU dials in again after a restart: a pause in the gap is reported; a VM killed in
    the gap is gone once the grace time passes."""
    listen = sock_dir / "qw.sock"
    cfg = listen_config(tmp_path, listen, grace_s=2.0)
    async with (
        LabVM.start(dialing("back01", listen), sock_dir) as back,
        LabVM.start(dialing("lost01", listen), sock_dir) as lost,
    ):
        async with DaemonProcess.start(cfg) as first:
            await first.wait_for("vm_connected", vm="back01")
            await first.wait_for("vm_connected", vm="lost01")
        await back.stop()  # while nobody listens: the event is lost
        await lost.kill()
        async with DaemonProcess.start(cfg) as second:
            reconnected = await second.wait_for("vm_connected", vm="back01")
            paused = await second.wait_for("alert", vm="back01")
            gone = await second.wait_for("alert", vm="lost01", timeout=20)
    assert reconnected["status"] == "paused"
    assert paused["alert"] == "vm_state_changed_while_unmonitored"
    assert gone["alert"] == "vm_gone_while_unmonitored"
    assert gone["severity"] == "critical"
    assert second.find("vm_gone", vm="lost01")[0]["reason"] == "not_reconnected"
    assert not second.find("internal_error")


async def test_two_vms_claiming_one_name_replace_neither(tmp_path: Path, sock_dir: Path) -> None:
    """The second QEMU named "twin" is refused with a clear record; the first stays watched."""
    listen = sock_dir / "qw.sock"
    async with (
        DaemonProcess.start(listen_config(tmp_path, listen)) as daemon,
        LabVM.start(dialing("twin", listen), sock_dir) as first,
    ):
        await daemon.wait_for("vm_connected", vm="twin")
        async with LabVM.start(dialing("twin", listen), sock_dir) as second:
            conflict = await daemon.wait_for("listen_name_conflict", vm="twin")
            await first.stop()
            await daemon.wait_for("alert", vm="twin")
            assert conflict["pid"] == second.pid
    connections = daemon.find("vm_connected", vm="twin")
    assert [c["pid"] for c in connections] == [first.pid]
    assert not daemon.find("vm_disconnected", vm="twin", cause="eof")


async def test_peers_that_are_not_qemu_are_dropped_alone(tmp_path: Path, sock_dir: Path) -> None:
    """A program that is not QEMU, and one that calls itself QEMU but sends garbage: each is
    logged and dropped; a real QEMU dialing in meanwhile is watched."""
    listen = sock_dir / "qw.sock"
    talker = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(b'garbage, not a greeting\\r\\n')\n"
        "s.recv(1)\n"
    )
    async with DaemonProcess.start(listen_config(tmp_path, listen)) as daemon:
        plain = await asyncio.create_subprocess_exec(sys.executable, "-c", talker, str(listen))
        refused = await daemon.wait_for("listen_peer_refused", reason="not_qemu")
        # A program that calls itself QEMU: python run through a link named like QEMU.
        fake_qemu = tmp_path / "qemu-system-x86_64"
        fake_qemu.symlink_to(sys.executable)
        posing = await asyncio.create_subprocess_exec(fake_qemu, "-c", talker, str(listen))
        garbage = await daemon.wait_for("listen_peer_refused", reason="bad_greeting")
        async with LabVM.start(dialing("real01", listen), sock_dir) as vm:
            await daemon.wait_for("vm_connected", vm="real01")
            await vm.system_reset()
            await daemon.wait_for("qmp_event", vm="real01", qmp="RESET")
        for proc in (plain, posing):
            async with asyncio.timeout(10):
                await proc.wait()
    assert f"({sys.executable})" in refused["error"]
    assert garbage["error"]
    assert not daemon.find("vm_connected", where=lambda r: r["vm"] != "real01")
    assert not daemon.find("internal_error")


async def test_qemu_started_before_qmpwatch_dials_in_once_it_listens(
    tmp_path: Path, sock_dir: Path
) -> None:
    """QEMU starts while nothing listens (it retries on its own) and is watched once qmpwatch
    is up."""
    listen = sock_dir / "qw.sock"
    async with LabVM.start(dialing("early01", listen), sock_dir) as vm:
        assert vm.running
        async with DaemonProcess.start(listen_config(tmp_path, listen)) as daemon:
            connected = await daemon.wait_for("vm_connected", vm="early01")
    assert connected["pid"] == vm.pid
    assert not daemon.find("listen_peer_refused")


async def test_an_unprivileged_daemon_identifies_a_root_qemu_and_keeps_running(
    tmp_path: Path, sock_dir: Path
) -> None:
    """The daemon as another user than QEMU (it cannot signal it) watches the VM that dials
    in: named, paused and resumed, crashed; it never exits."""
    listen = sock_dir / "qw.sock"
    state = tmp_path / "state"
    state.mkdir()
    for path in (sock_dir, state):
        os.chown(path, NOBODY, NOBODY)
    cfg = listen_config(tmp_path, listen)
    async with (
        DaemonProcess.start(cfg, prefix=UNPRIVILEGED) as daemon,
        LabVM.start(dialing("other01", listen), sock_dir) as vm,
    ):
        connected = await daemon.wait_for("vm_connected", vm="other01")
        assert (uid_of(daemon.proc.pid), uid_of(vm.pid)) == (NOBODY, 0)
        await vm.stop()
        await daemon.wait_for("alert", vm="other01", alert="vm_stopped_unexpected")
        await vm.cont()
        await daemon.wait_for("alert_resolved", vm="other01")
        await vm.kill()
        await daemon.wait_for("alert", vm="other01", alert="vm_crashed")
        assert daemon.proc.returncode is None, daemon.stderr_text()
    assert connected["pid"] == vm.pid
    assert daemon.proc.returncode == 0, daemon.stderr_text()
    assert not daemon.find("listen_peer_refused")
    assert not daemon.find("internal_error")
