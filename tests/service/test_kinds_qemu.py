"""Kinds that once came only from `replay`, produced by real QEMU through the live daemon:
a VM held in `prelaunch`, a watchdog `shutdown` nobody obeys, a failed migration, a failed
block job and a corrupted qcow2 image (qemu-facts.md says how each is made)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config

pytestmark = pytest.mark.qemu
MIB = 1 << 20


def config(tmp_path: Path, vm: LabVM, **sections: dict[str, object]) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket)}],
        sections={"connect": FAST_CONNECT, **sections},
    )


async def test_a_vm_held_in_prelaunch_is_stuck_then_resolves_when_it_runs(
    tmp_path: Path, sock_dir: Path
) -> None:
    """QEMU started with -S stays in `prelaunch`: past transient_state_max_s the live daemon
    raises vm_stuck_transient; `cont` resolves it."""
    spec = LabSpec("pre01", extra_args=("-S",))
    async with LabVM.start(spec, sock_dir) as vm:
        cfg = config(tmp_path, vm, lifecycle={"transient_state_max_s": 0.5})
        async with DaemonProcess.start(cfg) as daemon:
            connected = await daemon.wait_for("vm_connected", vm="pre01")
            stuck = await daemon.wait_for("alert", vm="pre01", alert="vm_stuck_transient")
            await vm.cont()
            resolved = await daemon.wait_for(
                "alert_resolved", vm="pre01", alert="vm_stuck_transient"
            )
    assert connected["status"] == "prelaunch"
    assert stuck["severity"] == "warning"
    assert resolved["fingerprint"] == stuck["fingerprint"]
    assert resolved["reason"] == "the VM left the transient state (now running)"


async def test_a_watchdog_shutdown_nobody_obeys_misses_its_deadline(
    tmp_path: Path, sock_dir: Path
) -> None:
    """WATCHDOG(shutdown) with no guest to obey the ACPI request: no SHUTDOWN comes, so past
    shutdown_after_watchdog_s followup_missed (reason deadline) and a critical
    followup_missing (a hung guest)."""
    spec = LabSpec("wdt01", watchdog_action="shutdown")
    async with LabVM.start(spec, sock_dir) as vm:
        cfg = config(tmp_path, vm, followup={"shutdown_after_watchdog_s": 0.5})
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="wdt01")
            await vm.arm_watchdog(2)
            missed = await daemon.wait_for("followup_missed", vm="wdt01", timeout=30)
            alert = await daemon.wait_for("alert", vm="wdt01", alert="followup_missing")
            assert await vm.query_status() == "running"  # the guest never shut down
    assert (missed["cause"], missed["expected"], missed["reason"]) == (
        "WATCHDOG",
        "SHUTDOWN",
        "deadline",
    )
    assert missed["deadline_s"] == 0.5
    assert alert["severity"] == "critical"


async def test_a_migration_to_a_closed_port_fails(tmp_path: Path, sock_dir: Path) -> None:
    """Migration events on, `migrate` to a port nobody listens on: MIGRATION status failed
    raises migration_failed; the VM runs on where it was."""
    async with (
        LabVM.start(LabSpec("mig01"), sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, vm)) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="mig01")
        await vm.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events", "state": True}]},
        )
        with socket.socket() as closed:  # bound, never listening: the connect is refused
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
            await vm.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            alert = await daemon.wait_for("alert", vm="mig01", alert="migration_failed")
        assert await vm.query_status() == "running"
    assert alert["severity"] == "warning"
    migrations = daemon.find("qmp_event", vm="mig01", qmp="MIGRATION")
    assert "failed" in [m["data"]["status"] for m in migrations]


async def test_a_mirror_onto_a_failing_target_is_a_block_job_error(
    tmp_path: Path, sock_dir: Path
) -> None:
    """blockdev-mirror onto a raw node over blkdebug that fails every write: BLOCK_JOB_ERROR
    raises block_job_error (warning) naming the job."""
    target = tmp_path / "target.img"
    target.write_bytes(b"\0" * MIB)
    spec = LabSpec("job01", extra_args=_scratch_disk(tmp_path))
    async with (
        LabVM.start(spec, sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, vm)) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="job01")
        await vm.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "failing",
                "file": {
                    "driver": "blkdebug",
                    "inject-error": [{"event": "pwritev", "errno": 5}],
                    "image": {"driver": "file", "filename": str(target)},
                },
            },
        )
        await vm.execute(
            "blockdev-mirror",
            {"job-id": "mirror0", "device": "scratch", "target": "failing", "sync": "full"},
        )
        alert = await daemon.wait_for("alert", vm="job01", alert="block_job_error")
    assert alert["severity"] == "warning"
    assert alert["details"]["device"] == "mirror0"
    assert alert["details"]["operation"] == "write"


def _scratch_disk(tmp_path: Path) -> tuple[str, ...]:
    """A 1 MiB raw image as node `scratch` (the mirror's source)."""
    image = tmp_path / "scratch.img"
    image.write_bytes(b"\x2a" * MIB)
    return ("-blockdev", f"driver=file,filename={image},node-name=scratch-file",
            "-blockdev", "driver=raw,file=scratch-file,node-name=scratch")  # fmt: skip


async def test_a_corrupted_qcow2_image_is_a_critical_alert(tmp_path: Path, sock_dir: Path) -> None:
    """A qcow2 whose L1 table points its first L2 table at the L1 table itself: the next
    write would overwrite metadata, QEMU marks the image corrupt (BLOCK_IMAGE_CORRUPTED,
    fatal) and vm_image_corrupted fires."""
    image = tmp_path / "bad.qcow2"
    image.write_bytes(b"")
    async with LabVM.start(LabSpec("qcow01"), sock_dir) as vm:
        file_node = {"driver": "file", "node-name": "bad-file", "filename": str(image)}
        await vm.execute("blockdev-add", file_node)
        mark = vm.mark()
        await vm.execute(
            "blockdev-create",
            {"job-id": "create", "options": {"driver": "qcow2", "file": "bad-file", "size": MIB}},
        )
        await vm.wait_event("JOB_STATUS_CHANGE", after=mark, predicate=_concluded)
        await vm.execute("job-dismiss", {"id": "create"})
        qcow2: dict[str, Any] = {"driver": "qcow2", "node-name": "bad", "file": "bad-file"}
        await vm.execute("blockdev-add", qcow2)
        await vm.hmp('qemu-io bad "write -P 0x2a 0 512"')  # an L2 table and a data cluster
        await vm.execute("blockdev-del", {"node-name": "bad"})
        _point_first_l2_at_l1(image)
        async with DaemonProcess.start(config(tmp_path, vm)) as daemon:
            await daemon.wait_for("vm_connected", vm="qcow01")
            await vm.execute("blockdev-add", qcow2)
            await vm.hmp('qemu-io bad "write -P 0x2a 0 512"')
            alert = await daemon.wait_for("alert", vm="qcow01", alert="vm_image_corrupted")
    assert alert["severity"] == "critical"
    event = daemon.find("qmp_event", vm="qcow01", qmp="BLOCK_IMAGE_CORRUPTED")[0]
    assert event["data"]["fatal"] is True
    assert event["data"]["node-name"] == "bad"


def _concluded(data: dict[str, Any]) -> bool:
    return data.get("status") == "concluded"


def _point_first_l2_at_l1(image: Path) -> None:
    """Set L1[0] to the L1 table's own offset (flag COPIED), as QEMU's iotest 060 does."""
    with image.open("r+b") as f:
        f.seek(40)
        (l1_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(l1_offset)
        f.write(struct.pack(">Q", (1 << 63) | l1_offset))


async def test_a_watchdog_pause_resolves_when_the_vm_runs_again(
    tmp_path: Path, sock_dir: Path
) -> None:
    """WATCHDOG(pause) stops the VM: vm_stopped_watchdog (critical); `cont` resolves it."""
    spec = LabSpec("wdp01", watchdog_action="pause")
    async with (
        LabVM.start(spec, sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, vm)) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="wdp01")
        await vm.arm_watchdog(2)
        paused = await daemon.wait_for("alert", vm="wdp01", alert="vm_stopped_watchdog")
        await vm.cont()
        resolved = await daemon.wait_for("alert_resolved", vm="wdp01", alert="vm_stopped_watchdog")
    assert paused["severity"] == "critical"
    assert resolved["fingerprint"] == paused["fingerprint"]
    assert resolved["reason"] == "the VM resumed (RESUME)"
