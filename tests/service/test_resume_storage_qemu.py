"""Auto-resume follows the storage: a VM paused on a full disk is resumed when space comes
back, not when a timer says; a VM found paused on a full disk pages once.

A real QEMU whose image lives on a small tmpfs that is filled and then freed (qemu-facts.md's
guest disk write), the real daemon, `[remediate] resume_after_io_error`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qmpwatch.lab import BlkdebugSpec, LabSpec, LabVM
from tests.service.test_remediate_qemu import ata_write_sector, config, fill, small_tmpfs
from tests.support.daemon_harness import DaemonProcess

pytestmark = pytest.mark.qemu

# A 4 MiB image on a 1 MiB tmpfs; blkdebug's rule (reads of the last sector) never fires.
DISK = BlkdebugSpec(errno=5, sector=8191, image_size=4 << 20)
SLOW_BACKOFF = {"resume_backoff_initial_s": 600.0, "resume_backoff_max_s": 600.0}


async def test_a_vm_paused_on_a_full_disk_is_resumed_when_space_comes_back(
    tmp_path: Path, sock_dir: Path
) -> None:
    """ENOSPC pauses the VM; the backoff would wait 10 minutes, but freeing space resumes
    it at once (`trigger` space), and the pause's alert resolves."""
    async with small_tmpfs(tmp_path / "store", "1m") as store:
        spec = LabSpec("full01", blkdebug=DISK)
        async with (
            LabVM.start(spec, sock_dir, disk_image=store / "disk.img") as vm,
            DaemonProcess.start(config(tmp_path, vm, **SLOW_BACKOFF)) as daemon,
        ):
            await daemon.wait_for("vm_connected", vm="full01")
            filler = fill(store)
            await ata_write_sector(vm, 7000)  # a page the full tmpfs cannot give
            paused = await daemon.wait_for("alert", vm="full01", alert="vm_stopped_io_error")
            mark = vm.mark()
            freed = time.monotonic()
            filler.unlink()
            resumed = await vm.wait_event("RESUME", after=mark)
            attempt = await daemon.wait_for("vm_resume_attempted", vm="full01")
            resolved = await daemon.wait_for("alert_resolved", vm="full01")
            assert await vm.query_status() == "running"
    assert paused["details"]["nospace"] is True
    assert (attempt["outcome"], attempt["trigger"], attempt["attempt"]) == ("resumed", "space", 1)
    assert resolved["fingerprint"] == paused["fingerprint"]
    assert resolved["reason"] == "resumed by qmpwatch after 1 attempt"
    print(f"space freed -> VM running: {resumed.received - freed:.3f} s")


async def test_a_vm_found_paused_on_a_full_disk_pages_once(tmp_path: Path, sock_dir: Path) -> None:
    """A VM paused on ENOSPC before qmpwatch starts, resume on, the storage still full: one
    critical alert; the failed resumes add none; space freed: resumed and resolved."""
    async with small_tmpfs(tmp_path / "store", "1m") as store:
        spec = LabSpec("found01", blkdebug=DISK)
        async with LabVM.start(spec, sock_dir, disk_image=store / "disk.img") as vm:
            filler = fill(store)
            mark = vm.mark()
            await ata_write_sector(vm, 7000)
            await vm.wait_event("STOP", after=mark)
            async with DaemonProcess.start(config(tmp_path, vm)) as daemon:
                found = await daemon.wait_for("alert", vm="found01")
                await daemon.wait_for(
                    "vm_resume_attempted", vm="found01", outcome="paused_again", count=2
                )
                filler.unlink()
                resolved = await daemon.wait_for("alert_resolved", vm="found01")
                assert await vm.query_status() == "running"
    assert (found["alert"], found["severity"]) == ("vm_state_changed_while_unmonitored", "critical")
    critical = [a for a in daemon.find("alert", vm="found01") if a["severity"] == "critical"]
    assert [(a["alert"], a["details"]) for a in critical] == [(found["alert"], found["details"])]
    assert resolved["fingerprint"] == found["fingerprint"]
    assert daemon.proc.returncode == 0, daemon.stderr_text()
