"""The supervisor with real QEMUs: VMs that come and go.

A removed VM's dialing task is cancelled, and its session then records the link's end
(`vm_disconnected`, the last status) on its way out. Those records must not bring back the
metric series the supervisor forgot for it: with discovery, every VM that ever existed would
otherwise keep its series (and a `running` status) for the life of the daemon.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qmpwatch.core.config import Config, DaemonConfig, DiscoverConfig, VmConfig
from qmpwatch.lab import LabSpec, LabVM
from qmpwatch.service.metrics import Metrics
from qmpwatch.service.recorder import Services
from qmpwatch.service.statestore import StateStore
from qmpwatch.service.supervisor import Supervisor
from tests.support.alert_fixtures import wait_until
from tests.support.fake_qmp import FAST_CONNECT, rendered_log

pytestmark = pytest.mark.qemu

NO_DAEMON = DaemonConfig(state_dir="", metrics_listen="")
GONE = 4  # VMs that come and go


def vms_in(metrics: Metrics) -> set[str]:
    """The VMs that have at least one series in a scrape."""
    return {
        sample.labels["vm"]
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if "vm" in sample.labels
    }


def events_counted(metrics: Metrics, vm: str, event: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "qmpwatch_events_total" and sample.labels == {
                "vm": vm,
                "event": event,
            }:
                return sample.value
    return 0.0


async def test_vms_that_come_and_go_leave_no_series(sock_dir: Path) -> None:
    """Real QEMUs found by discovery and removed while connected: once their tasks end, none
    of their series remain; a VM still there keeps its own."""
    metrics = Metrics()
    lab = sock_dir / "lab"
    lab.mkdir()
    config = Config(
        daemon=NO_DAEMON,
        connect=FAST_CONNECT,
        discover=(DiscoverConfig(os.fspath(sock_dir / "*.qmp")),),
    )
    with rendered_log() as log:
        log.reset()
        async with asyncio.TaskGroup() as tg:
            supervisor = Supervisor(config, Services(StateStore(None), metrics=metrics), tg)
            stays = sock_dir / "stays.qmp"
            async with LabVM.start(LabSpec(name="stays"), lab, watch_socket=stays) as vm:
                supervisor.apply()
                await log.wait_for("vm_connected", vm="stays")
                for i in range(GONE):
                    name = f"gone{i}"
                    path = sock_dir / f"{name}.qmp"
                    async with LabVM.start(LabSpec(name=name), lab, watch_socket=path):
                        supervisor.apply()
                        await log.wait_for("vm_connected", vm=name)
                        path.unlink()  # the VM went away; inotify tells discovery
                        await log.wait_for("vm_removed", vm=name)
                        await log.wait_for("vm_disconnected", vm=name, cause="closed")

                        def closed(name: str = name) -> bool:
                            return name not in supervisor.sessions

                        await wait_until(closed, 10, f"{name} closed")
                await vm.stop()
                await log.wait_for("qmp_event", vm="stays", qmp="STOP")
                await supervisor.stop_all()
    assert vms_in(metrics) == {"stays"}
    assert events_counted(metrics, "stays", "STOP") == 1


async def test_a_vm_restarted_on_a_new_socket_keeps_counting(sock_dir: Path) -> None:
    """A VM whose socket changes (a real QEMU on each) is stopped and started again under the
    same name: when the old task has ended, the new session's events are still counted."""
    metrics = Metrics()
    first, second = sock_dir / "a.qmp", sock_dir / "b.qmp"
    with rendered_log() as log:
        log.reset()
        async with (
            LabVM.start(LabSpec(name="web-a"), sock_dir, watch_socket=first),
            LabVM.start(LabSpec(name="web-b"), sock_dir, watch_socket=second) as moved_to,
            asyncio.TaskGroup() as tg,
        ):
            config = Config(
                daemon=NO_DAEMON, connect=FAST_CONNECT, vms=(VmConfig("web", os.fspath(first)),)
            )
            supervisor = Supervisor(config, Services(StateStore(None), metrics=metrics), tg)
            supervisor.apply()
            await log.wait_for("vm_connected", vm="web", socket=os.fspath(first))
            old = supervisor.sources["vms"].targets.running["web"].task  # type: ignore[attr-defined]
            moved = Config(
                daemon=NO_DAEMON, connect=FAST_CONNECT, vms=(VmConfig("web", os.fspath(second)),)
            )
            supervisor.apply(moved)
            async with asyncio.timeout(10):
                await asyncio.wait([old])
            await log.wait_for("vm_connected", vm="web", socket=os.fspath(second))
            await moved_to.stop()
            await log.wait_for("qmp_event", vm="web", qmp="STOP")
            await supervisor.stop_all()
    assert events_counted(metrics, "web", "STOP") == 1
