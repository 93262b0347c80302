"""Alerts end to end: a real QEMU, the real daemon, a real Alertmanager and webhook receiver."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import pytest

from qmpwatch.lab import BlkdebugSpec, LabSpec, LabVM
from tests.support.alert_fixtures import receiving
from tests.support.alertmanager import Alertmanager, alertmanager
from tests.support.daemon_harness import DaemonProcess, write_config

__all__ = ["alertmanager"]  # the fixture
pytestmark = pytest.mark.qemu


async def test_io_error_pause_reaches_alertmanager_and_webhook(
    tmp_path: Path, sock_dir: Path, alertmanager: Alertmanager
) -> None:
    """An I/O-error pause is in Alertmanager within 2 s with the right labels, and resolves."""
    secret_file = tmp_path / "hook.key"
    secret_file.write_text("s3cret-key\n")
    spec = LabSpec(name="web01", blkdebug=BlkdebugSpec(errno=5, sector=8))
    async with receiving() as hook, LabVM.start(spec, sock_dir) as vm:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "web01", "socket": str(vm.watch_socket)}],
            sections={"alert": {"host": "hv-test"}},
            arrays={
                "alert.alertmanager": [{"url": alertmanager.url}],
                "alert.webhook": [{"url": hook.url, "hmac_secret": f"file:{secret_file}"}],
            },
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="web01")
            mark = vm.mark()
            await vm.ata_read_sector(8)
            stop = await vm.wait_event("STOP", after=mark)
            found = await alertmanager.wait_for(
                lambda alerts: alertmanager.find(
                    alerts, vm="web01", alertname="vm_stopped_io_error"
                ),
                timeout=2.0,
            )
            assert time.time() - stop.qemu_time < 2.0
            labels = found[0]["labels"]
            assert labels == {
                "alertname": "vm_stopped_io_error",
                "vm": "web01",
                "severity": "critical",
                "host": "hv-test",
                "storage": labels["storage"],  # the mount of the disk image: checked below
            }
            assert vm.disk_image is not None
            assert str(vm.disk_image).startswith(labels["storage"])
            assert "read error on drive0" in found[0]["annotations"]["summary"]

            firing = await hook.wait_for(
                lambda h: [r for r in h.delivered if r.json()["status"] == "firing"],
                what="firing webhook",
            )
            request = firing[0]
            expected = hmac.new(b"s3cret-key", request.body, hashlib.sha256).hexdigest()
            assert request.headers["X-Qmpwatch-Signature"] == f"sha256={expected}"
            payload = request.json()
            assert payload["version"] == 1
            assert payload["kind"] == "vm_stopped_io_error"
            assert payload["vm"] == "web01"

            await vm.cont()
            await alertmanager.wait_for(
                lambda alerts: (
                    not alertmanager.find(alerts, vm="web01", alertname="vm_stopped_io_error")
                ),
                timeout=5.0,
            )
            resolved = await hook.wait_for(
                lambda h: [r for r in h.delivered if r.json()["status"] == "resolved"],
                what="resolved webhook",
            )
            assert resolved[0].json()["fingerprint"] == payload["fingerprint"]
            assert daemon.find("alert_delivered", sink="alertmanager[0]")
