"""A filling disk that is given room: QEMU's `block_resize` grows the image, or a mirror
replaces it, and `vm_disk_filling` resolves with the threshold armed again on the new size
(the flow of thin-provisioned disks: the threshold fires, the volume is extended)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.lab import BlkdebugSpec, LabSpec, LabVM
from tests.service.test_remediate_qemu import ata_write_sector
from tests.support.daemon_harness import DaemonProcess, write_config

pytestmark = pytest.mark.qemu
MIB = 1 << 20


def config(tmp_path: Path, vm: LabVM) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket)}],
        sections={"remediate": {"write_threshold_percent": 50.0, "storage_check_interval_s": 0.2}},
    )


def disk() -> BlkdebugSpec:
    return BlkdebugSpec(errno=5, sector=8191, image_size=4 * MIB, rerror="stop", werror="stop")


def threshold(size: int) -> Callable[[dict[str, Any]], bool]:
    """A `vm_command_sent` arming the write threshold at `size` bytes."""
    return lambda r: r["arguments"].get("write-threshold") == size


async def filled(vm: LabVM, daemon: DaemonProcess) -> dict[str, object]:
    """Write past half of the 4 MiB image: the threshold qmpwatch armed fires."""
    await daemon.wait_for("vm_command_sent", vm=vm.spec.name, command="block-set-write-threshold")
    await ata_write_sector(vm, 5000)  # 2.4 MiB in
    return await daemon.wait_for("alert", vm=vm.spec.name, alert="vm_disk_filling")


async def test_a_grown_disk_resolves_filling_and_is_armed_on_its_new_size(
    tmp_path: Path, sock_dir: Path
) -> None:
    """block_resize to 8 MiB after the 50 % threshold fired: vm_disk_filling resolves ("its
    image grew") and the threshold is armed again at 50 % of 8 MiB."""
    async with (
        LabVM.start(LabSpec("grow01", blkdebug=disk()), sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, vm)) as daemon,
    ):
        alert = await filled(vm, daemon)
        mark = daemon.mark()
        await vm.execute("block_resize", {"device": "drive0", "size": 8 * MIB})
        resolved = await daemon.wait_for(
            "alert_resolved", vm="grow01", alert="vm_disk_filling", after=mark
        )
        armed = await daemon.wait_for(  # not the 75 % re-arm of the old size
            "vm_command_sent", vm="grow01", after=mark, where=threshold(4 * MIB)
        )
        await ata_write_sector(vm, 9000)  # 4.4 MiB in: past 50 % of the new size
        again = await daemon.wait_for("alert", vm="grow01", alert="vm_disk_filling", after=mark)
    assert alert["details"]["size"] == 4 * MIB  # type: ignore[index]
    assert resolved["fingerprint"] == alert["fingerprint"]
    assert resolved["reason"] == "its image grew to 8388608 bytes"
    assert (armed["command"], armed["outcome"]) == ("block-set-write-threshold", "done")
    assert again["details"]["size"] == 8 * MIB


async def test_a_replaced_disk_resolves_filling_and_is_armed_on_the_new_image(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A mirror to a new 4 MiB image, pivoted (block-job-complete): vm_disk_filling resolves
    ("its image was replaced") and the threshold is armed on the new image."""
    target = tmp_path / "new.img"
    target.write_bytes(b"")
    async with (
        LabVM.start(LabSpec("swap01", blkdebug=disk()), sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, vm)) as daemon,
    ):
        alert = await filled(vm, daemon)
        mark = daemon.mark()
        events = vm.mark()
        await vm.execute(
            "drive-mirror",
            {
                "device": "drive0",
                "target": str(target),
                "format": "raw",
                "sync": "full",
                "mode": "absolute-paths",
                "job-id": "swap",
            },
        )
        await vm.wait_event("BLOCK_JOB_READY", after=events)
        await vm.execute("block-job-complete", {"device": "swap"})
        await vm.wait_event("BLOCK_JOB_COMPLETED", after=events)
        resolved = await daemon.wait_for(
            "alert_resolved", vm="swap01", alert="vm_disk_filling", after=mark
        )
        armed = await daemon.wait_for(  # not the 75 % re-arm of the old image
            "vm_command_sent", vm="swap01", after=mark, where=threshold(2 * MIB)
        )
    assert resolved["fingerprint"] == alert["fingerprint"]
    assert resolved["reason"] == "its image was replaced"
    assert armed["arguments"]["node-name"] != alert["details"]["node-name"]  # type: ignore[index]
    assert armed["outcome"] == "done"
