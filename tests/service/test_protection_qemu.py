"""The protection check against real QEMUs: VMs with and without a panic device, a watchdog
(and its action) and disks that stop on errors, as `qmpwatch status` (text and --json), the
`vm_protection` record and `qmpwatch_vm_protection_gap` show them; `[protection] ignore`."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from qmpwatch.lab import BlkdebugSpec, LabSpec, LabVM
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config
from tests.support.ports import free_tcp_port
from tests.support.scrape import sample, samples, scrape

pytestmark = pytest.mark.qemu

GAP = "qmpwatch_vm_protection_gap"
BARE = LabSpec("bare", blkdebug=BlkdebugSpec(rerror="report", werror="enospc"))
GUARDED = LabSpec(
    "guarded",
    no_shutdown=True,
    watchdog_action="pause",
    blkdebug=BlkdebugSpec(rerror="stop", werror="stop"),
    extra_args=("-device", "pvpanic", "-action", "panic=pause", "-cpu", "qemu64,hv-crash"),
)
DOG_NONE = LabSpec(
    "dognone",
    extra_args=("-device", "i6300esb", "-action", "watchdog=none", "-device", "pvpanic-pci"),
)


async def qmpwatch(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", *args, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_protection_gaps_in_status_record_and_metrics(tmp_path: Path, sock_dir: Path) -> None:
    """Each VM's gaps (none for the guarded one) in status --json, status, vm_protection and
    the gap metric; a gap ignored for one VM is listed as ignored and has no series."""
    port = free_tcp_port()
    async with (
        LabVM.start(BARE, sock_dir) as bare,
        LabVM.start(GUARDED, sock_dir) as guarded,
        LabVM.start(DOG_NONE, sock_dir) as dognone,
    ):
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[
                {"name": vm.spec.name, "socket": str(vm.watch_socket)}
                for vm in (bare, guarded, dognone)
            ],
            sections={
                "daemon": {"metrics_listen": f"127.0.0.1:{port}"},
                "connect": FAST_CONNECT,
                "protection.vm.bare": {"ignore": ["no_watchdog"]},
            },
        )
        async with DaemonProcess.start(cfg) as daemon:
            records = {
                name: await daemon.wait_for("vm_protection", vm=name)
                for name in ("bare", "guarded", "dognone")
            }
            code, out = await qmpwatch("status", "-c", str(cfg), "--json")
            _, text = await qmpwatch("status", "-c", str(cfg))
            metrics = await scrape(port)
    assert code == 0, out
    doc = {vm["vm"]: vm["protection"] for vm in json.loads(out)["vms"]}
    assert doc["bare"]["gaps"] == ["no_panic_device", "disk_errors_reported_to_guest:drive0"]
    assert doc["bare"]["ignored"] == ["no_watchdog"]
    assert doc["bare"]["disks"] == [{"disk": "drive0", "rerror": "report", "werror": "enospc"}]
    assert doc["guarded"]["gaps"] == []
    assert doc["guarded"]["panic_devices"] == ["pvpanic", "hyperv-crash"]
    assert doc["guarded"]["panic_action"] == "pause"
    assert doc["guarded"]["watchdogs"] == ["ib700"]
    assert doc["guarded"]["watchdog_action"] == "pause"
    assert doc["guarded"]["no_shutdown"] is True
    assert doc["dognone"]["gaps"] == ["watchdog_action_none"]
    assert doc["dognone"]["panic_devices"] == ["pvpanic-pci"]
    assert doc["dognone"]["watchdogs"] == ["i6300esb"]
    for name, record in records.items():
        assert record["gaps"] == doc[name]["gaps"]
        assert record["level"] == ("info" if name == "guarded" else "warning")
    assert "unprotected: no panic device (pvpanic or Hyper-V crash MSRs): a guest kernel" in text
    assert "unprotected: disk errors are reported to the guest (drive0)" in text
    assert "unprotected: the watchdog's action is none" in text
    assert sample(metrics, GAP, vm="bare", gap="no_panic_device") == 1
    assert sample(metrics, GAP, vm="dognone", gap="watchdog_action_none") == 1
    series = {(s.labels["vm"], s.labels["gap"]) for s in samples(metrics) if s.name == GAP}
    assert series == {
        ("bare", "no_panic_device"),
        ("bare", "disk_errors_reported_to_guest:drive0"),
        ("dognone", "watchdog_action_none"),
    }


async def test_a_vm_dialing_in_is_checked_from_its_own_command_line(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A QEMU that dials in to [[listen]]: its disk policies come from the command line the
    listener read at accept (SO_PEERCRED), its devices from QOM; a reload that ignores a gap
    logs vm_protection again without it."""
    listen = sock_dir / "listen.sock"
    spec = LabSpec(
        "dialer",
        dial_in=listen,
        blkdebug=BlkdebugSpec(rerror="stop", werror="ignore"),
        extra_args=("-device", "pvpanic"),
    )
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"connect": FAST_CONNECT},
        arrays={"listen": [{"socket": str(listen)}]},
    )
    async with DaemonProcess.start(cfg) as daemon, LabVM.start(spec, sock_dir):
        record = await daemon.wait_for("vm_protection", vm="dialer")
        mark = daemon.mark()
        text = cfg.read_text() + '[protection]\nignore = ["disk_errors_ignored"]\n'
        cfg.write_text(text)
        daemon.send_signal(signal.SIGHUP)
        reloaded = await daemon.wait_for("config_reloaded", after=mark)
        again = await daemon.wait_for("vm_protection", vm="dialer", after=mark)
    assert record["disks"] == [{"disk": "drive0", "rerror": "stop", "werror": "ignore"}]
    assert record["gaps"] == ["no_watchdog", "disk_errors_ignored:drive0"]
    assert "protection.ignore" in reloaded["changed"]
    assert (again["gaps"], again["ignored"]) == (["no_watchdog"], ["disk_errors_ignored:drive0"])
