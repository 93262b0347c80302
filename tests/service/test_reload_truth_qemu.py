"""The smaller truths: a VM removed by a reload says so, `config_reloaded` counts VMs as
`status` does, and /metrics says why each VM is paused and how many alerts fire for it.

Real QEMUs, the real daemon, its /metrics and status document.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.service.test_status import status_doc
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config
from tests.support.ports import free_tcp_port
from tests.support.scrape import sample, samples, scrape

pytestmark = pytest.mark.qemu


async def test_a_reload_removal_is_told_and_counted_as_status_counts(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Two VMs, one paused by a client: /metrics has its pause reason (client) and one alert
    firing; a reload removes it: vm_disconnected says "removed from the configuration", and
    config_reloaded counts the VMs that status lists."""
    port = free_tcp_port()
    cfg = tmp_path / "c.toml"

    def write(*vms: LabVM) -> None:
        write_config(
            cfg,
            state_dir=tmp_path / "state",
            vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket)} for vm in vms],
            sections={"connect": FAST_CONNECT, "daemon": {"metrics_listen": f"127.0.0.1:{port}"}},
        )

    async with (
        LabVM.start(LabSpec("keep01"), sock_dir) as keep,
        LabVM.start(LabSpec("gone01"), sock_dir) as gone,
    ):
        write(keep, gone)
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="keep01")
            await daemon.wait_for("vm_connected", vm="gone01")
            await gone.stop()
            await daemon.wait_for("alert", vm="gone01", alert="vm_stopped_unexpected")
            metrics = await scrape(port)
            write(keep)
            mark = daemon.mark()
            daemon.send_signal(signal.SIGHUP)
            reloaded = await daemon.wait_for("config_reloaded", after=mark)
            doc = await status_doc(port)
            ended = await daemon.wait_for("vm_disconnected", vm="gone01", after=mark)
    assert sample(metrics, "qmpwatch_vm_pause_reason", vm="gone01") == 1
    reasons = [s.labels for s in samples(metrics) if s.name == "qmpwatch_vm_pause_reason"]
    assert reasons == [{"vm": "gone01", "reason": "client"}]
    assert sample(metrics, "qmpwatch_vm_alerts_firing", vm="gone01") == 1
    assert sample(metrics, "qmpwatch_vm_alerts_firing", vm="keep01") == 0
    assert (ended["cause"], ended["error"]) == ("closed", "removed from the configuration")
    assert [vm["vm"] for vm in doc["vms"]] == ["keep01"]
    assert reloaded["vms"] == len(doc["vms"]) == 1
    assert daemon.proc.returncode == 0, daemon.stderr_text()
