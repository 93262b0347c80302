"""Acting on VMs, opt-in: qmpwatch resumes a real QEMU paused on a disk error.

blkdebug makes the disk error happen once (the retry after `cont` succeeds: the storage is
back) or on every try (it stays broken), as qemu-facts.md describes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpwatch.alerts.sinks.alertmanager import am_labels
from qmpwatch.core.alert import Alert
from qmpwatch.lab import BlkdebugSpec, LabSpec, LabVM
from tests.support.daemon_harness import DaemonProcess, write_config

pytestmark = pytest.mark.qemu

FAST_RESUME: dict[str, object] = {
    "resume_after_io_error": True,
    "resume_backoff_initial_s": 0.5,
    "resume_backoff_max_s": 1.0,
    "resume_give_up_after_s": 4.0,
}


def config(tmp_path: Path, vm: LabVM, **remediate: object) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket)}],
        sections={"remediate": {**FAST_RESUME, **remediate}},
    )


async def test_a_pause_on_a_passing_disk_error_is_resumed(tmp_path: Path, sock_dir: Path) -> None:
    """The error happened once: qmpwatch sends cont, the VM runs on, the alert resolves."""
    spec = LabSpec("heal01", blkdebug=BlkdebugSpec(errno=28, sector=8, once=True))
    async with (
        LabVM.start(spec, sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, vm)) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="heal01")
        await vm.ata_read_sector(8)
        paused = await daemon.wait_for("alert", vm="heal01", alert="vm_stopped_io_error")
        sent = await daemon.wait_for("vm_command_sent", vm="heal01")
        attempt = await daemon.wait_for("vm_resume_attempted", vm="heal01", timeout=20)
        resolved = await daemon.wait_for("alert_resolved", vm="heal01")
        assert await vm.query_status() == "running"
    assert (sent["command"], sent["outcome"]) == ("cont", "done")
    assert attempt["outcome"] == "resumed"
    assert resolved["fingerprint"] == paused["fingerprint"]
    assert resolved["reason"] == "resumed by qmpwatch after 1 attempt"


async def test_a_disk_that_stays_broken_is_tried_then_given_up(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Every retry fails again: attempts back off, then one warning says qmpwatch gave up;
    the VM stays paused and its alert stays firing."""
    spec = LabSpec("broken01", blkdebug=BlkdebugSpec(errno=5, sector=8, once=False))
    async with (
        LabVM.start(spec, sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, vm)) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="broken01")
        await vm.ata_read_sector(8)
        await daemon.wait_for("alert", vm="broken01", alert="vm_stopped_io_error")
        gave_up = await daemon.wait_for("alert", vm="broken01", alert="vm_resume_given_up",
                                        timeout=30)  # fmt: skip
        assert await vm.query_status() == "io-error"
    attempts = daemon.find("vm_resume_attempted", vm="broken01")
    assert len(attempts) >= 2
    assert {a["outcome"] for a in attempts} == {"paused_again"}
    assert gave_up["severity"] == "warning"
    assert gave_up["details"]["attempts"] == len(attempts)
    assert not daemon.find("alert_resolved", vm="broken01")


async def test_a_persons_stop_is_never_resumed(tmp_path: Path, sock_dir: Path) -> None:
    """With resume on, a client's `stop` is alerted and left alone: no command is sent."""
    async with (
        LabVM.start(LabSpec("held01"), sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, vm)) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="held01")
        await vm.stop()
        await daemon.wait_for("alert", vm="held01", alert="vm_stopped_unexpected")
        await vm.cont()
        await daemon.wait_for("alert_resolved", vm="held01")
    assert not daemon.find("vm_command_sent")
    assert not daemon.find("vm_resume_attempted")


async def test_vms_on_one_file_system_share_their_storage_label(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Two VMs whose images are on one file system pause on disk errors: both alerts name
    the image and the same storage (the mount point `df` names), the label Alertmanager
    groups by."""
    specs = [LabSpec(f"store0{n}", blkdebug=BlkdebugSpec(errno=28, sector=8)) for n in (1, 2)]
    async with (
        LabVM.start(specs[0], sock_dir) as one,
        LabVM.start(specs[1], sock_dir) as two,
    ):
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket)} for vm in (one, two)],
        )
        async with DaemonProcess.start(cfg) as daemon:
            for vm in (one, two):
                await daemon.wait_for("vm_connected", vm=vm.spec.name)
                await vm.ata_read_sector(8)
            alerts = [
                await daemon.wait_for("alert", vm=vm.spec.name, alert="vm_stopped_io_error")
                for vm in (one, two)
            ]
        images = [vm.disk_image for vm in (one, two)]
    df = await asyncio.create_subprocess_exec(
        "df", "--output=target", str(images[0]), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await df.communicate()
    mount_point = out.decode().splitlines()[-1].strip()
    for alert, image in zip(alerts, images, strict=True):
        assert alert["details"]["image"] == str(image)
        assert alert["details"]["storage"] == mount_point
        assert alert["details"]["storage_fs"]
    assert am_labels_of(alerts[0])["storage"] == am_labels_of(alerts[1])["storage"] == mount_point


def am_labels_of(record: dict[str, object]) -> dict[str, str]:
    """The Alertmanager labels qmpwatch posts for the alert of a record."""
    details = record["details"]
    assert isinstance(details, dict)
    alert = Alert(str(record["alert"]), "critical", str(record["vm"]), "", "", 0.0, details)
    return am_labels(alert, "hv")


async def ata_write_sector(vm: LabVM, lba: int) -> None:
    """ATA WRITE SECTORS of one sector at `lba`, as a guest does it (qemu-facts.md)."""
    await vm.port_out(0x1F6, 0xE0 | ((lba >> 24) & 0x0F))
    await vm.port_out(0x1F2, 1)
    for port, shift in ((0x1F3, 0), (0x1F4, 8), (0x1F5, 16)):
        await vm.port_out(port, (lba >> shift) & 0xFF)
    await vm.port_out(0x1F7, 0x30)
    for _ in range(128):
        await vm.port_out(0x1F0, 0x5A5A5A5A, "w")


@contextlib.asynccontextmanager
async def small_tmpfs(where: Path, size: str) -> AsyncIterator[Path]:
    """A tmpfs of `size` mounted at `where` for the block's duration."""
    await asyncio.to_thread(where.mkdir)
    mount = await asyncio.create_subprocess_exec("mount", "-t", "tmpfs", "-o", f"size={size}",
                                                 "tmpfs", str(where))  # fmt: skip
    assert await mount.wait() == 0, "mounting a tmpfs needs root"
    try:
        yield where
    finally:
        umount = await asyncio.create_subprocess_exec("umount", "-l", str(where))
        await umount.wait()


def fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s file system."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                return filler
    finally:
        os.close(fd)


async def test_a_filling_disk_is_warned_of_then_resumed_when_space_is_freed(
    tmp_path: Path, sock_dir: Path
) -> None:
    """An image on a small tmpfs: a write past 50 % of it raises vm_disk_filling (and the
    threshold is armed again further on); the file system fills, the VM pauses on ENOSPC;
    once space is freed qmpwatch resumes it and the pause's alert resolves."""
    async with small_tmpfs(tmp_path / "store", "1m") as store:
        disk = BlkdebugSpec(errno=5, sector=8191, image_size=4 << 20, rerror="stop",
                            werror="stop")  # fmt: skip
        spec = LabSpec("fill01", blkdebug=disk)
        async with LabVM.start(spec, sock_dir, disk_image=store / "disk.img") as vm:
            cfg = config(tmp_path, vm, write_threshold_percent=50.0)
            async with DaemonProcess.start(cfg) as daemon:
                armed = await daemon.wait_for("vm_command_sent", vm="fill01")
                await ata_write_sector(vm, 5000)  # 2.4 MiB into the 4 MiB image: past 50 %
                filling = await daemon.wait_for("alert", vm="fill01", alert="vm_disk_filling")
                rearmed = await daemon.wait_for("vm_command_sent", vm="fill01", count=2)
                filler = fill(store)
                await ata_write_sector(vm, 7000)  # a page the full tmpfs cannot give
                paused = await daemon.wait_for("alert", vm="fill01", alert="vm_stopped_io_error")
                freed_at = time.time()
                filler.unlink()
                resolved = await daemon.wait_for(
                    "alert_resolved", vm="fill01", alert="vm_stopped_io_error", timeout=30
                )
                running_after_s = time.time() - freed_at
                assert await vm.query_status() == "running"
    assert (armed["command"], armed["outcome"]) == ("block-set-write-threshold", "done")
    assert armed["arguments"]["write-threshold"] == 2 << 20
    assert rearmed["arguments"]["write-threshold"] == 3 << 20  # half-way to full: 75 %
    assert filling["severity"] == "warning"
    assert filling["details"]["image"] == str(store / "disk.img")
    assert filling["details"]["storage"] == str(store)
    assert filling["details"]["storage_fs"] == "tmpfs"
    assert paused["details"]["nospace"] is True
    assert resolved["reason"].startswith("resumed by qmpwatch after")
    print(f"space freed -> VM running and resolved: {running_after_s:.2f} s")


async def test_low_free_space_where_images_live_is_warned_of(
    tmp_path: Path, sock_dir: Path
) -> None:
    """storage_free_percent: the file system of the VM's image gets full -> a warning with
    its storage; space freed -> resolved."""
    async with small_tmpfs(tmp_path / "store", "1m") as store:
        disk = BlkdebugSpec(errno=5, sector=2047, image_size=1 << 20)
        async with LabVM.start(LabSpec("low01", blkdebug=disk), sock_dir,
                               disk_image=store / "disk.img") as vm:  # fmt: skip
            cfg = config(tmp_path, vm, storage_free_percent=50.0, storage_check_interval_s=0.2)
            async with DaemonProcess.start(cfg) as daemon:
                await daemon.wait_for("vm_connected", vm="low01")
                filler = fill(store)
                low = await daemon.wait_for("alert", vm="low01", alert="storage_space_low")
                filler.unlink()
                back = await daemon.wait_for("alert_resolved", vm="low01")
    assert low["severity"] == "warning"
    assert low["details"]["storage"] == str(store)
    assert low["details"]["images"] == [str(store / "disk.img")]
    assert low["details"]["free_percent"] < 50
    assert back["alert"] == "storage_space_low"
    assert "free again" in back["reason"]
