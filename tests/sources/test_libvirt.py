"""The [[libvirt]] source on a real libvirtd and real domains (the system's QEMU, run by
libvirt: these tests are marked ``libvirt``, not ``qemu``), through the real daemon's records.

The lab (`qmpwatch.lab.libvirt`, the session fixture ``libvirt_lab``) runs libvirtd and
virtlogd; each test names its domains with a token of its own and watches only those.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import libvirt
import pytest

from qmpwatch.lab import BlkdebugSpec
from qmpwatch.lab.libvirt import LAB_PREFIX, URI, DomainSpec, LabDomain, LibvirtLab, virsh
from qmpwatch.sources.libvirthost import READ_ONLY_HELP, LibvirtRefused, register_monitor_events
from tests.service.test_daemon_qemu import assert_healthy
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config

pytestmark = pytest.mark.libvirt

ON_LIBVIRT = "custom-monitor"  # the taint of a domain that had QMP sent through libvirt


def token() -> str:
    return f"{LAB_PREFIX}{secrets.token_hex(3)}-"


async def create(lab: LibvirtLab, *names: str) -> list[LabDomain]:
    """Plain transient domains, started."""
    return [await LabDomain(lab, DomainSpec(name)).create() for name in names]


async def all_connected(daemon: DaemonProcess, *domains: LabDomain) -> None:
    for dom in domains:
        await daemon.wait_for("vm_connected", vm=dom.name)


def alerts(daemon: DaemonProcess, vm: str) -> list[str]:
    return [r["alert"] for r in daemon.find("alert", vm=vm)]


@asynccontextmanager
async def watching(
    tmp_path: Path, globs: list[str], *, env: dict[str, str] | None = None
) -> AsyncIterator[DaemonProcess]:
    """qmpwatch watching the lab's libvirt, domains matched by `globs`."""
    config = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"connect": FAST_CONNECT},
        arrays={"libvirt": [{"uri": URI, "domains": globs}]},
    )
    async with DaemonProcess.start(config, env=env) as daemon:
        yield daemon


async def test_suspend_and_resume_alert_and_resolve_without_tainting(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """virsh suspend: STOP through libvirt, a warning alert; resume resolves it. vm_connected
    names the domain's UUID, and qmpwatch leaves no taint on the domain."""
    run = token()
    dom = await LabDomain(libvirt_lab, DomainSpec(f"{run}a")).create()
    async with watching(tmp_path, [f"{run}*"]) as daemon:
        connected = await daemon.wait_for("vm_connected", vm=dom.name)
        await virsh("suspend", dom.name)
        alert = await daemon.wait_for("alert", vm=dom.name, alert="vm_stopped_unexpected")
        await virsh("resume", dom.name)
        await daemon.wait_for("alert_resolved", vm=dom.name, alert="vm_stopped_unexpected")
        uuid = (await virsh("domuuid", dom.name)).strip()
    assert connected["uuid"] == uuid
    assert connected["status"] == "running"
    assert connected["no_shutdown"] is True
    assert alert["severity"] == "warning"
    qmp = [r["qmp"] for r in daemon.find("qmp_event", vm=dom.name)]
    assert qmp[-2:] == ["STOP", "RESUME"]
    stop = daemon.find("qmp_event", vm=dom.name, qmp="STOP")[0]
    assert stop["data"] == {}
    assert ON_LIBVIRT not in dom.taints()
    assert "custom monitor" not in await virsh("dominfo", dom.name)
    assert_healthy(daemon)


async def test_an_io_error_pause_alerts_and_resolves_on_resume(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """A read error on an IDE disk with rerror=stop: vm_stopped_io_error; resume resolves."""
    run = token()
    spec = DomainSpec(f"{run}disk", blkdebug=BlkdebugSpec())
    dom = await LabDomain(libvirt_lab, spec).create()
    async with watching(tmp_path, [f"{run}*"]) as daemon:
        await daemon.wait_for("vm_connected", vm=dom.name)
        await dom.ata_read_sector(8)
        alert = await daemon.wait_for("alert", vm=dom.name, alert="vm_stopped_io_error")
        state = await virsh("domstate", "--reason", dom.name)
        await virsh("resume", dom.name)
        await daemon.wait_for("alert_resolved", vm=dom.name, alert="vm_stopped_io_error")
    error = daemon.find("qmp_event", vm=dom.name, qmp="BLOCK_IO_ERROR")[0]
    assert error["data"]["action"] == "stop"
    assert error["data"]["operation"] == "read"
    assert alert["severity"] == "critical"
    assert "I/O error" in state
    assert_healthy(daemon)


async def test_a_watchdog_pause_alerts(tmp_path: Path, libvirt_lab: LibvirtLab) -> None:
    """The ib700 with action pause: watchdog_fired and vm_stopped_watchdog; the domain that
    the test drove through libvirt's monitor is tainted (the taint check sees it)."""
    run = token()
    dom = await LabDomain(libvirt_lab, DomainSpec(f"{run}wd", watchdog_action="pause")).create()
    async with watching(tmp_path, [f"{run}*"]) as daemon:
        await daemon.wait_for("vm_connected", vm=dom.name)
        await dom.arm_watchdog()
        await daemon.wait_for("alert", vm=dom.name, alert="vm_stopped_watchdog", timeout=20)
        await virsh("resume", dom.name)
        await daemon.wait_for("alert_resolved", vm=dom.name, alert="vm_stopped_watchdog")
        info = await virsh("dominfo", dom.name)
    assert "watchdog_fired" in alerts(daemon, dom.name)
    assert ON_LIBVIRT in dom.taints()
    assert "custom monitor" in info
    assert_healthy(daemon)


async def test_a_killed_qemu_is_a_crash_and_a_destroy_is_not(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """kill -9 of a domain's QEMU: vm_crashed. virsh destroy of another: a clean end, no
    alert; both transient domains are gone, so the destroyed one leaves."""
    run = token()
    killed, destroyed = await create(libvirt_lab, f"{run}killed", f"{run}destroyed")
    async with watching(tmp_path, [f"{run}*"]) as daemon:
        await all_connected(daemon, killed, destroyed)
        os.kill(killed.pid(), signal.SIGKILL)
        crash = await daemon.wait_for("alert", vm=killed.name, alert="vm_crashed")
        await virsh("destroy", destroyed.name)
        gone = await daemon.wait_for("vm_disconnected", vm=destroyed.name)
        await daemon.wait_for("vm_removed", vm=destroyed.name)
    assert crash["severity"] == "critical"
    assert daemon.find("vm_disconnected", vm=killed.name)[0]["cause"] == "eof"
    assert gone["cause"] == "shutdown"
    assert "destroyed" in gone["error"]
    assert alerts(daemon, destroyed.name) == []
    assert not daemon.find("vm_removed", vm=killed.name)  # its crash alert stays visible
    assert_healthy(daemon)


async def test_domains_started_later_are_watched_and_others_ignored(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """A domain started after qmpwatch is watched from its start (its first events
    included); one whose name matches no glob never appears."""
    run = token()
    async with watching(tmp_path, [f"{run}w*"]) as daemon:
        await daemon.wait_for("libvirt_connected")
        other = await LabDomain(libvirt_lab, DomainSpec(f"{run}other")).create()
        late = await LabDomain(libvirt_lab, DomainSpec(f"{run}watched")).create()
        connected = await daemon.wait_for("vm_connected", vm=late.name)
        await virsh("suspend", other.name)
        await virsh("suspend", late.name)
        await daemon.wait_for("qmp_event", vm=late.name, qmp="STOP")
    assert connected["status"] == "running"
    assert daemon.find("qmp_event", vm=late.name, qmp="RESUME")  # the start's own cont
    assert not [r for r in daemon.records if other.name in str(r)]
    assert_healthy(daemon)


async def test_a_pause_while_libvirtd_restarts_is_reported_on_reconnect(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """libvirtd stops; the domain is paused meanwhile (on its own monitor); libvirtd comes
    back: qmpwatch reconnects, resyncs and reports the pause it could not see."""
    run = token()
    dom = await LabDomain(libvirt_lab, DomainSpec(f"{run}r")).create()
    async with watching(tmp_path, [f"{run}*"]) as daemon:
        await daemon.wait_for("vm_connected", vm=dom.name)
        mark = daemon.mark()
        try:
            await asyncio.to_thread(libvirt_lab.stop_libvirtd)
            await daemon.wait_for("libvirt_disconnected", after=mark)
            await dom.qmp_while_libvirtd_is_down("stop")
        finally:
            await asyncio.to_thread(libvirt_lab.start_libvirtd)
        back = await daemon.wait_for("libvirt_connected", after=mark, reconnect=True)
        alert = await daemon.wait_for(
            "alert", after=mark, vm=dom.name, alert="vm_state_changed_while_unmonitored"
        )
        connected = await daemon.wait_for("vm_connected", after=mark, vm=dom.name)
    assert dom.name in back["domains"]
    assert connected["status"] == "paused"
    assert alert["details"]["previous_status"] == "running"
    lost = daemon.find("vm_disconnected", after=mark, vm=dom.name)[0]
    assert lost["cause"] == "closed"
    assert not daemon.find("alert", vm=dom.name, alert="vm_crashed")
    assert_healthy(daemon)


async def test_an_undefined_domain_leaves_and_its_alerts_resolve(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """A persistent domain killed (vm_crashed) and then undefined leaves: the alert
    resolves, saying why."""
    run = token()
    dom = await LabDomain(libvirt_lab, DomainSpec(f"{run}p")).define_and_start()
    try:
        async with watching(tmp_path, [f"{run}*"]) as daemon:
            await daemon.wait_for("vm_connected", vm=dom.name)
            os.kill(dom.pid(), signal.SIGKILL)
            await daemon.wait_for("alert", vm=dom.name, alert="vm_crashed")
            await virsh("undefine", dom.name)
            resolved = await daemon.wait_for("alert_resolved", vm=dom.name, alert="vm_crashed")
            await daemon.wait_for("vm_removed", vm=dom.name)
    finally:
        await virsh("undefine", dom.name, check=False)
    assert resolved["reason"] == "undefined from libvirt"
    assert_healthy(daemon)


async def test_a_read_only_connection_is_refused_saying_what_to_grant(
    libvirt_lab: LibvirtLab,
) -> None:
    """libvirt refuses QEMU's events to a read-only connection: the refusal says so, and
    what to grant."""
    conn = libvirt.openReadOnly(URI)
    try:
        with pytest.raises(LibvirtRefused) as refused:
            register_monitor_events(conn, lambda *args: None)
    finally:
        conn.close()
    assert refused.value.reason == "read_only"
    assert refused.value.detail == READ_ONLY_HELP
    assert "SupplementaryGroups=libvirt" in READ_ONLY_HELP


async def test_without_libvirt_python_one_record_says_what_to_install(tmp_path: Path) -> None:
    """A [[libvirt]] entry with libvirt-python missing: one libvirt_unavailable record
    naming the extra; the daemon runs on."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "libvirt.py").write_text("raise ImportError(\"No module named 'libvirt'\")\n")
    # (the suite's own $PYTHONPATH kept: its contract check reads the daemon's records)
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join([str(hide), *inherited, *sys.path])}
    async with watching(tmp_path, ["*"], env=env) as daemon:
        record = await daemon.wait_for("libvirt_unavailable")
    assert "qmpwatch[libvirt]" in record["help"]
    assert len(daemon.find("libvirt_unavailable")) == 1
    assert daemon.proc.returncode == 0


async def test_what_changed_while_qmpwatch_was_down_is_reported(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """qmpwatch stops; one domain is paused, another destroyed; qmpwatch starts again: the
    pause is reported on resync, the destroyed domain (running when last seen) is gone."""
    run = token()
    paused, ended = await create(libvirt_lab, f"{run}paused", f"{run}ended")
    async with watching(tmp_path, [f"{run}*"]) as daemon:
        await all_connected(daemon, paused, ended)
    await virsh("suspend", paused.name)
    await virsh("destroy", ended.name)
    async with watching(tmp_path, [f"{run}*"]) as daemon:
        changed = await daemon.wait_for(
            "alert", vm=paused.name, alert="vm_state_changed_while_unmonitored"
        )
        gone = await daemon.wait_for("alert", vm=ended.name, alert="vm_gone_while_unmonitored")
    assert changed["details"]["previous_status"] == "running"
    assert gone["details"]["last_status"] == "running"
    assert "not defined" in gone["details"]["error"]
    assert_healthy(daemon)


async def test_an_unreachable_libvirtd_is_retried_with_its_reason(tmp_path: Path) -> None:
    """A [[libvirt]] URI whose socket nobody serves: libvirt_connect_failed with reason
    unreachable and the retry; the daemon runs on."""
    uri = f"qemu+unix:///system?socket={tmp_path / 'nobody.sock'}"
    config = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        arrays={"libvirt": [{"uri": uri, "domains": ["*"]}]},
    )
    async with DaemonProcess.start(config) as daemon:
        failed = await daemon.wait_for("libvirt_connect_failed")
    assert (failed["uri"], failed["reason"]) == (uri, "unreachable")
    assert failed["attempts"] >= 1
    assert failed["retry_in_s"] > 0
    assert daemon.proc.returncode == 0


async def test_a_domain_named_like_a_configured_vm_is_a_name_conflict(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """A [[vm]] already holds the name of a libvirt domain: the domain is not watched, and
    libvirt_name_conflict says who holds the name."""
    run = token()
    dom = await LabDomain(libvirt_lab, DomainSpec(f"{run}dup")).create()
    config = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": dom.name, "socket": str(tmp_path / "elsewhere.qmp")}],
        sections={"connect": FAST_CONNECT},
        arrays={"libvirt": [{"uri": URI, "domains": [f"{run}*"]}]},
    )
    async with DaemonProcess.start(config) as daemon:
        conflict = await daemon.wait_for("libvirt_name_conflict", vm=dom.name)
        await daemon.wait_for("libvirt_connected")
    assert conflict["uri"] == URI
    assert conflict["held_by"]
    assert not daemon.find("vm_connected", vm=dom.name)


async def test_a_connection_step_that_raises_is_started_again(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """Opening the libvirt connection raises what it never should (an injected bug): one
    internal_error record; the connection starts again and its domain is watched."""
    run = token()
    dom = await LabDomain(libvirt_lab, DomainSpec(f"{run}a")).create()
    config = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"connect": FAST_CONNECT},
        arrays={"libvirt": [{"uri": URI, "domains": [f"{run}*"]}]},
    )
    async with DaemonProcess.start(config, faults=["libvirt.connect"]) as daemon:
        failed = await daemon.wait_for(
            "internal_error", where=lambda r: r.get("where") == "libvirt: connection"
        )
        await daemon.wait_for("vm_connected", vm=dom.name)
        await virsh("suspend", dom.name)
        await daemon.wait_for("alert", vm=dom.name, alert="vm_stopped_unexpected")
        assert daemon.proc.returncode is None, daemon.stderr_text()
    assert "injected fault" in failed["error"]
    assert failed["then"] == "starts it again in 2 s"
    assert failed["uri"] == URI


async def test_qmp_events_dropped_at_the_crossing_are_counted_and_the_domains_read_again(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """QMP events dropped between libvirt's thread and the loop (injected: the flood a busy loop
    would take): one libvirt_events_dropped record, and the domain's pause is still alerted."""
    run = token()
    dom = await LabDomain(libvirt_lab, DomainSpec(f"{run}f")).create()
    config = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"connect": FAST_CONNECT},
        arrays={"libvirt": [{"uri": URI, "domains": [f"{run}*"]}]},
    )
    async with DaemonProcess.start(config, faults=["libvirt.crossing"]) as daemon:
        await daemon.wait_for("vm_connected", vm=dom.name)
        await virsh("suspend", dom.name)
        dropped = await daemon.wait_for("libvirt_events_dropped")
        await daemon.wait_for("alert", vm=dom.name, alert="vm_stopped_unexpected")
        assert daemon.proc.returncode is None, daemon.stderr_text()
    assert (dropped["uri"], dropped["dropped"]) == (URI, 1)
