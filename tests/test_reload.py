"""SIGHUP reload against real QEMU: added VMs start, removed stop, unchanged keep their session."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.daemon_harness import DaemonProcess, write_config

pytestmark = pytest.mark.qemu


async def test_reload_adds_removes_and_keeps_unchanged(tmp_path: Path, sock_dir: Path) -> None:
    """After SIGHUP: the new VM connects, the removed one stops, the kept one never reconnects."""
    async with (
        LabVM.start(LabSpec(name="keep"), sock_dir) as keep,
        LabVM.start(LabSpec(name="gone"), sock_dir) as gone,
        LabVM.start(LabSpec(name="new"), sock_dir) as new,
    ):
        state = tmp_path / "state"
        cfg = tmp_path / "c.toml"
        keep_vm = {"name": "keep", "socket": str(keep.watch_socket)}
        write_config(
            cfg, state_dir=state, vms=[keep_vm, {"name": "gone", "socket": str(gone.watch_socket)}]
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="keep")
            await daemon.wait_for("vm_connected", vm="gone")
            mark = daemon.mark()
            write_config(
                cfg,
                state_dir=state,
                vms=[keep_vm, {"name": "new", "socket": str(new.watch_socket)}],
            )
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for("config_reloaded", after=mark)
            await daemon.wait_for("vm_connected", vm="new", after=mark)
            await daemon.wait_for("vm_disconnected", vm="gone", cause="closed", after=mark)
            # The kept VM's session is the same one: its events still arrive, and it never
            # disconnected or reconnected.
            await keep.stop()
            await daemon.wait_for("qmp_event", vm="keep", qmp="STOP", after=mark)
            assert not daemon.find("vm_disconnected", vm="keep")
            assert len(daemon.find("vm_connected", vm="keep")) == 1
            # The removed VM is no longer watched: its events are not logged.
            gone_mark = daemon.mark()
            await gone.stop()
            await new.stop()
            await daemon.wait_for("qmp_event", vm="new", qmp="STOP", after=gone_mark)
            assert not daemon.find("qmp_event", vm="gone", after=gone_mark)


async def test_invalid_reload_is_refused_and_old_config_runs(
    tmp_path: Path, sock_dir: Path
) -> None:
    """An invalid new config is refused with one clear record; the old sessions go on."""
    async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
        cfg = tmp_path / "c.toml"
        write_config(
            cfg,
            state_dir=tmp_path / "state",
            vms=[{"name": "web01", "socket": str(vm.watch_socket)}],
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="web01")
            good = cfg.read_text()
            cfg.write_text(good.replace("timeout_s = 2.0", 'timeout_s = "soon"'))
            mark = daemon.mark()
            daemon.send_signal(signal.SIGHUP)
            refused = await daemon.wait_for("config_reload_refused", after=mark)
            assert refused["level"] == "error"
            assert 'connect.timeout_s: expected a number, got "soon"' in refused["problems"]
            await vm.stop()
            await daemon.wait_for("qmp_event", vm="web01", qmp="STOP", after=mark)
            assert not daemon.find("vm_disconnected", vm="web01")
            assert not daemon.find("config_reloaded")
