"""Never silently unwatched: a VM that cannot be reached pages, a clean end is told as one.

Real QEMUs, the real daemon, a real webhook receiver, and `qmpwatch status` as an operator
runs it. Absence of a record is asserted only after the daemon has stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.service.test_status import qmpwatch, status_doc
from tests.support.alert_fixtures import Receiver, receiving
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config
from tests.support.ports import free_tcp_port

pytestmark = pytest.mark.qemu


def presence_config(
    tmp_path: Path,
    port: int,
    hook: Receiver,
    *,
    vms: list[dict[str, object]] | None = None,
    arrays: dict[str, list[dict[str, object]]] | None = None,
) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=vms or [],
        sections={
            "connect": FAST_CONNECT,
            "lifecycle": {"unreachable_after_s": 1.0},
            "daemon": {"metrics_listen": f"127.0.0.1:{port}"},
        },
        arrays={"alert.webhook": [{"url": hook.url}], **(arrays or {})},
    )


def sent(hook: Receiver, status: str, kind: str, vm: str) -> list[dict[str, Any]]:
    payloads = [r.json() for r in hook.delivered]
    return [p for p in payloads if (p["status"], p["kind"], p["vm"]) == (status, kind, vm)]


def entry(doc: dict[str, Any], vm: str) -> dict[str, Any] | None:
    return next((v for v in doc["vms"] if v["vm"] == vm), None)


async def test_a_configured_vm_never_reached_pages_and_resolves_when_it_connects(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A [[vm]] whose socket does not exist raises vm_unreachable (warning, the failure in
    words) to the webhook and in status; it resolves when QEMU is there; an unknown name
    exits 3."""
    port = free_tcp_port()
    sock = sock_dir / "late01.qmp"
    async with receiving() as hook:
        cfg = presence_config(tmp_path, port, hook, vms=[{"name": "late01", "socket": str(sock)}])
        async with DaemonProcess.start(cfg) as daemon:
            alert = await daemon.wait_for("alert", vm="late01", alert="vm_unreachable")
            await hook.wait_for(lambda h: sent(h, "firing", "vm_unreachable", "late01"))
            doc = await status_doc(port)
            code, out, _ = await qmpwatch("status", "-c", str(cfg), "late01")
            unknown, _, unknown_err = await qmpwatch("status", "-c", str(cfg), "nosuch")
            async with LabVM.start(LabSpec("late01"), sock_dir, watch_socket=sock):
                resolved = await daemon.wait_for("alert_resolved", alert="vm_unreachable")
                await hook.wait_for(lambda h: sent(h, "resolved", "vm_unreachable", "late01"))
    assert alert["severity"] == "warning"
    assert alert["details"]["reason"] == "missing"
    assert f"{sock} does not exist" in alert["summary"]
    late = entry(doc, "late01")
    assert late is not None
    assert not late["connected"]
    assert f"{sock} does not exist" in late["why"]
    assert code == 1
    assert "has not been reachable" in out
    assert unknown == 3
    assert "nosuch" in unknown_err
    assert resolved["fingerprint"] == alert["fingerprint"]
    assert resolved["reason"] == "QEMU's monitor answers again"


@pytest.mark.parametrize("source", ["vm", "discover", "listen"])
async def test_a_clean_end_resolves_the_pause_and_says_qemu_is_gone(
    tmp_path: Path, sock_dir: Path, source: str
) -> None:
    """A VM paused by a client whose QEMU then ends on SIGTERM (SHUTDOWN host-signal, EOF):
    vm_disconnected says shut down, the pause alert resolves (to the webhook too), status
    says QEMU is gone, and no vm_unreachable follows; for every source."""
    port = free_tcp_port()
    listen = sock_dir / "qw.sock"
    found = sock_dir / "found"
    found.mkdir()
    ghost: dict[str, object] = {"name": "ghost01", "socket": str(sock_dir / "ghost01.qmp")}
    watch_socket: Path | None = None
    spec = LabSpec("end01")
    vms: list[dict[str, object]] = []
    arrays: dict[str, list[dict[str, object]]] = {}
    if source == "vm":
        watch_socket = sock_dir / "end01.qmp"
        vms = [{"name": "end01", "socket": str(watch_socket)}]
    elif source == "discover":
        watch_socket = found / "end01.qmp"
        arrays = {"discover": [{"glob": str(found / "*.qmp")}]}
    else:
        spec = LabSpec("end01", dial_in=listen)
        arrays = {"listen": [{"socket": str(listen)}]}
    async with receiving() as hook:
        cfg = presence_config(tmp_path, port, hook, vms=vms, arrays=arrays)
        async with (
            DaemonProcess.start(cfg) as daemon,
            LabVM.start(spec, sock_dir, watch_socket=watch_socket) as vm,
        ):
            await daemon.wait_for("vm_connected", vm="end01")
            await vm.stop()
            paused = await daemon.wait_for("alert", vm="end01", alert="vm_stopped_unexpected")
            os.kill(vm.pid, signal.SIGTERM)
            await vm.wait_exit()
            resolved = await daemon.wait_for("alert_resolved", vm="end01")
            ended = await daemon.wait_for("vm_disconnected", vm="end01")
            await hook.wait_for(lambda h: sent(h, "resolved", "vm_stopped_unexpected", "end01"))
            if source != "vm":
                await daemon.wait_for("vm_removed", vm="end01")
            doc = await status_doc(port)
            # A VM added after the end: once its vm_unreachable is due, end01's would be too.
            presence_config(tmp_path, port, hook, vms=[*vms, ghost], arrays=arrays)
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for("alert", vm="ghost01", alert="vm_unreachable")
    assert resolved["fingerprint"] == paused["fingerprint"]
    assert resolved["reason"] == "QEMU ended cleanly: it shut down (host-signal)"
    assert (ended["cause"], ended["reason"]) == ("shutdown", "it shut down (host-signal)")
    end = entry(doc, "end01")
    if source == "vm":
        assert end is not None
        assert not end["connected"]
        assert not end["alerts"]
        assert (end["status"], end["why"]) == (
            "shutdown",
            "QEMU is gone: it shut down (host-signal)",
        )
        assert "end01" in doc["attention"]  # not connected: still listed, with the reason
    else:
        assert end is None  # a discovered or dialed-in VM that ended cleanly leaves
    assert not daemon.find("alert", vm="end01", alert="vm_unreachable")
    assert not daemon.find("alert", vm="end01", alert="vm_crashed")
    assert daemon.proc.returncode == 0, daemon.stderr_text()
    assert not daemon.find("internal_error")


async def test_a_refused_peer_claiming_a_watched_vm_is_the_why(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A VM that dialed in before qmpwatch restarted is not back yet; a program calling
    itself its QEMU dials in and sends garbage: status says the VM's QEMU was refused, and
    the VM is still reported gone when its grace ends."""
    port = free_tcp_port()
    listen = sock_dir / "qw.sock"
    talker = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(b'garbage, not a greeting\\r\\n')\n"
        "s.recv(1)\n"
    )
    fake_qemu = tmp_path / "qemu-system-x86_64"
    fake_qemu.symlink_to(sys.executable)
    async with receiving() as hook:
        cfg = presence_config(
            tmp_path, port, hook, arrays={"listen": [{"socket": str(listen), "grace_s": 8.0}]}
        )
        async with LabVM.start(LabSpec("back01", dial_in=listen), sock_dir) as vm:
            async with DaemonProcess.start(cfg) as first:
                await first.wait_for("vm_connected", vm="back01")
            await vm.kill()  # while qmpwatch is down: it never comes back
        async with DaemonProcess.start(cfg) as daemon:
            posing = await asyncio.create_subprocess_exec(
                fake_qemu, "-c", talker, str(listen), "-name", "back01"
            )
            refused = await daemon.wait_for("listen_peer_refused", vm="back01")
            doc = await status_doc(port)
            gone = await daemon.wait_for("vm_gone", vm="back01", timeout=20)
            async with asyncio.timeout(10):
                await posing.wait()
    assert refused["reason"] == "bad_greeting"
    back = entry(doc, "back01")
    assert back is not None
    assert not back["connected"]
    assert back["why"].startswith("cannot connect (bad_greeting): its QEMU (pid ")
    assert gone["reason"] == "not_reconnected"
