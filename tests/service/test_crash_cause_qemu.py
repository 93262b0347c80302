"""Why QEMU died, in the vm_crashed alert: real QEMUs killed by the kernel's OOM killer in a
memory cgroup, and by a person's kill -9 (no OOM blamed)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.service.test_status import status_doc
from tests.support.alertmanager import running_alertmanager
from tests.support.daemon_harness import DaemonProcess, lab_config
from tests.support.memcg import MemcgUnavailable, MemoryCgroup
from tests.support.ports import free_tcp_port

pytestmark = pytest.mark.qemu

LIMIT = 256 << 20
BALLOON = 1 << 30  # a preallocated RAM backend four times the cgroup's limit


async def oom_kill(vm: LabVM) -> None:
    """Make the kernel OOM-kill `vm`'s QEMU: QMP object-add of 1 GiB of preallocated RAM."""
    args = {"qom-type": "memory-backend-ram", "id": "oom0", "size": BALLOON, "prealloc": True}
    with contextlib.suppress(Exception):  # the control monitor goes with QEMU
        await vm.execute("object-add", args, timeout=30)
    assert await vm.wait_exit(30) == -9


def memcg() -> MemoryCgroup:
    try:
        return MemoryCgroup.make(LIMIT)
    except MemcgUnavailable as err:
        pytest.fail(str(err))


async def test_oom_kill_is_named_in_vm_crashed(tmp_path: Path) -> None:
    """A QEMU OOM-killed in its memory cgroup: vm_crashed names the OOM killer, the cgroup and
    the anon-rss, in the record, in a real Alertmanager's annotations and in status's why."""
    group = memcg()
    port = free_tcp_port()
    try:
        async with (
            running_alertmanager(tmp_path / "alertmanager") as alertmanager,
            LabVM.start(LabSpec(name="oomvm"), tmp_path) as vm,
        ):
            group.add(vm.pid)
            cfg = lab_config(
                tmp_path,
                vm,
                metrics_port=port,
                arrays={"alert.alertmanager": [{"url": alertmanager.url}]},
            )
            async with DaemonProcess.start(cfg) as daemon:
                await daemon.wait_for("vm_connected", vm="oomvm", timeout=20)
                await oom_kill(vm)
                alert = await daemon.wait_for("alert", alert="vm_crashed", timeout=20)
                (posted,) = await alertmanager.wait_for(
                    lambda a: alertmanager.find(a, alertname="vm_crashed", vm="oomvm")
                )
                status = await status_doc(port)
    finally:
        group.remove()
    notes = posted["annotations"]
    assert notes["summary"] == alert["summary"]
    assert notes["crash_cause"] == alert["details"]["crash_cause_words"]
    (entry,) = status["vms"]
    assert entry["why"] == "QEMU died: " + alert["details"]["crash_cause_words"]
    details = alert["details"]
    assert details["crash_cause"] == "oom_kill", alert
    assert details["memory_cgroup"] == group.path
    assert details["anon_rss_bytes"] > 100 << 20
    summary = alert["summary"]
    assert "killed by the kernel's OOM killer (memory cgroup " + group.path in summary
    assert "anon-rss " in summary
    assert "MiB" in summary


async def test_kill_9_by_a_person_blames_no_oom(tmp_path: Path) -> None:
    """A QEMU killed with kill -9 by a person: vm_crashed blames no OOM kill (the cause is
    unknown, or signal 9 when its exit status could be read)."""
    async with LabVM.start(LabSpec(name="k9"), tmp_path) as vm:  # noqa: SIM117 (the daemon needs vm)
        async with DaemonProcess.start(lab_config(tmp_path, vm)) as daemon:
            await daemon.wait_for("vm_connected", vm="k9", timeout=20)
            await vm.kill()
            alert = await daemon.wait_for("alert", alert="vm_crashed", timeout=20)
    # The test (QEMU's parent) reaps it at once; a zombie seen first gives its signal.
    cause = alert["details"]["crash_cause"]
    assert cause in ("unknown", "signal"), alert
    assert "OOM killer" not in alert["summary"]
    words = "the cause is unknown" if cause == "unknown" else "killed by signal 9 (KILL)"
    assert words in alert["summary"]
