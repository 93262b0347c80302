"""A frozen libvirtd (SIGSTOP) silences nothing else: socket VMs are watched throughout, the
daemon says what is stuck, and the libvirt domains are resynced when libvirtd thaws.

Real libvirtd (the lab), real QEMUs behind [[vm]] sockets (both builds: marked ``qemu``), the
real daemon. Run under `flock /tmp/qmpwatch-libvirt.lock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpwatch.lab import LabSpec, LabVM
from qmpwatch.lab.libvirt import LIBVIRTD_PID, URI, DomainSpec, LabDomain, LibvirtLab, virsh
from tests.service.test_daemon_qemu import assert_healthy
from tests.sources.test_libvirt import token
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config
from tests.support.ports import free_tcp_port
from tests.support.scrape import sample, scrape, wait_healthz

pytestmark = [pytest.mark.libvirt, pytest.mark.qemu]

FREEZE_S = 60.0  # how long libvirtd stays frozen (past its 15 s keepalive, into the reconnect)
ALERT_AFTER_S = 6.0  # the test's [[libvirt]] unresponsive_alert_s


@contextlib.contextmanager
def frozen_libvirtd() -> Iterator[int]:
    """libvirtd stopped with SIGSTOP for the block; always SIGCONTed after it."""
    pid = int(LIBVIRTD_PID.read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def libvirt_stalled(body: dict[str, object]) -> bool:
    degraded = body.get("degraded")
    return (
        body["status"] == "degraded"
        and isinstance(degraded, dict)
        and ("libvirt_unresponsive" in degraded)
    )


async def pause_and_resume(daemon: DaemonProcess, vm: LabVM) -> None:
    """A client pauses the socket VM: its alert arrives; resumed, it resolves."""
    mark = daemon.mark()
    await vm.stop()
    await daemon.wait_for("alert", after=mark, vm=vm.spec.name, alert="vm_stopped_unexpected")
    await vm.execute("cont")
    await daemon.wait_for(
        "alert_resolved", after=mark, vm=vm.spec.name, alert="vm_stopped_unexpected"
    )


async def test_a_frozen_libvirtd_silences_no_socket_vm_and_is_resynced_after(
    tmp_path: Path, sock_dir: Path, libvirt_lab: LibvirtLab
) -> None:
    """libvirtd frozen 60 s: socket VMs paused before and after its keepalive gave up, and one
    killed, alert while it is still frozen; /healthz answers degraded libvirt_unresponsive
    and the warning alert fires; after SIGCONT the alert resolves, the domain is watched
    again, the watchdog pause it took during the freeze is reported, and nothing crashed."""
    run = token()
    dom = await LabDomain(libvirt_lab, DomainSpec(f"{run}wd", watchdog_action="pause")).create()
    port = free_tcp_port()
    async with (
        LabVM.start(LabSpec(name=f"{run}a"), sock_dir) as vm_a,
        LabVM.start(LabSpec(name=f"{run}b"), sock_dir) as vm_b,
    ):
        config = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[
                {"name": vm.spec.name, "socket": str(vm.watch_socket), "no_shutdown": False}
                for vm in (vm_a, vm_b)
            ],
            sections={
                "connect": FAST_CONNECT,
                "daemon": {"metrics_listen": f"127.0.0.1:{port}"},
            },
            arrays={
                "libvirt": [
                    {"uri": URI, "domains": [f"{run}*"], "unresponsive_alert_s": ALERT_AFTER_S}
                ]
            },
        )
        async with DaemonProcess.start(config) as daemon:
            for name in (vm_a.spec.name, vm_b.spec.name, dom.name):
                await daemon.wait_for("vm_connected", vm=name)
            await dom.hmp("o /b 0x443 0")  # the ib700 pauses the domain in 30 s: mid-freeze
            mark = daemon.mark()
            with frozen_libvirtd():
                frozen_at = time.monotonic()
                body = await wait_healthz(port, libvirt_stalled)
                await pause_and_resume(daemon, vm_a)  # the connection is still up
                await daemon.wait_for("libvirt_disconnected", after=mark, timeout=30)
                await pause_and_resume(daemon, vm_a)  # the reconnect waits on libvirtd
                await daemon.wait_for("alert", after=mark, alert="libvirt_unresponsive")
                await pause_and_resume(daemon, vm_b)
                await vm_b.kill()
                await daemon.wait_for("alert", after=mark, vm=vm_b.spec.name, alert="vm_crashed")
                metrics = await scrape(port)
                left = FREEZE_S - (time.monotonic() - frozen_at)
                await asyncio.sleep(max(0.0, left))  # the freeze lasts its whole length
                still = await wait_healthz(port, libvirt_stalled)
                during = daemon.find("alert", after=mark)
            await daemon.wait_for(
                "alert_resolved", after=mark, alert="libvirt_unresponsive", timeout=30
            )
            await daemon.wait_for("libvirt_connected", after=mark, reconnect=True, timeout=30)
            reported = await daemon.wait_for(
                "alert", after=mark, vm=dom.name, alert="vm_state_changed_while_unmonitored"
            )
            await daemon.wait_for("vm_connected", after=mark, vm=dom.name)
            state = await virsh("domstate", "--reason", dom.name)
            await wait_healthz(port, lambda b: b["status"] == "ok")
            assert await daemon.stop() == 0
    assert "libvirt_unresponsive" in body["degraded"]
    assert URI in still["degraded"]["libvirt_unresponsive"]
    assert sample(metrics, "qmpwatch_degraded", reason="libvirt_unresponsive") == 1
    assert {a["alert"] for a in during} >= {
        "vm_stopped_unexpected",
        "vm_crashed",
        "libvirt_unresponsive",
    }
    assert "watchdog" in state
    assert reported["details"]["status"] == "watchdog"
    stalled = daemon.find("dependency_stalled", after=mark, reason="libvirt_unresponsive")
    recovered = daemon.find("dependency_recovered", after=mark, reason="libvirt_unresponsive")
    assert len(stalled) == len(recovered) == 1
    assert stalled[0]["dependency"] == URI
    assert not daemon.find("alert", vm=dom.name, alert="vm_crashed")
    assert_healthy(daemon)
