"""The daemon at scale: 20 real QEMUs through one `[[discover]]` glob, every event once.

The Done-when of issue 3: the daemon's `qmp_event` records of each VM, as a multiset of
(name, QEMU timestamp), equal what that VM's control monitor received (QEMU broadcasts every
event to every monitor): nothing lost, nothing logged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpwatch.core.times import iso_utc
from qmpwatch.lab import LabEvent, LabSpec, LabVM
from tests.support.daemon_harness import DaemonProcess, write_config
from tests.support.vm_scripts import basic_events

pytestmark = pytest.mark.qemu

VM_COUNT = 20
ROUNDS = 2
#: What `script` makes each QEMU emit.
SCRIPTED = Counter(
    {"STOP": ROUNDS, "RESUME": ROUNDS, "RESET": 2 * ROUNDS, "RTC_CHANGE": 1, "SHUTDOWN": 1}
)


def iso_qemu_time(event: LabEvent) -> str:
    """A lab event's QEMU timestamp as the daemon logs it (exact: float error < 0.25 µs)."""
    micros = round(event.qemu_time * 1_000_000)
    return iso_utc(micros // 1_000_000, micros % 1_000_000)


@contextlib.asynccontextmanager
async def many_vms(names: list[str], workdir: Path, sockets: Path) -> AsyncIterator[list[LabVM]]:
    """Start one lab VM per name concurrently, watch socket `sockets/NAME.qmp`."""
    launches = [LabVM.launch(LabSpec(n), workdir, watch_socket=sockets / f"{n}.qmp") for n in names]
    results = await asyncio.gather(*launches, return_exceptions=True)
    vms = [r for r in results if isinstance(r, LabVM)]
    try:
        for result in results:
            if isinstance(result, BaseException):
                raise result
        yield vms
    finally:
        await asyncio.gather(*(vm.aclose() for vm in vms), return_exceptions=True)


async def test_twenty_qemus_through_one_glob_log_every_event_exactly_once(
    tmp_path: Path, sock_dir: Path
) -> None:
    """20 QEMUs found by one glob: per VM the logged (qmp, qemu_time) multiset is QEMU's own."""
    sockets = sock_dir / "vms"
    sockets.mkdir()
    names = [f"vm{i:02d}" for i in range(VM_COUNT)]
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        discover=[{"glob": f"{sockets}/*.qmp"}],
    )
    async with DaemonProcess.start(cfg) as daemon, many_vms(names, sock_dir, sockets) as vms:
        await daemon.wait_for("vm_connected", count=VM_COUNT, timeout=30)
        assert {r["vm"] for r in daemon.find("vm_connected")} == set(names)
        async with asyncio.TaskGroup() as tg:
            for vm in vms:
                tg.create_task(basic_events(vm, ROUNDS))
        await daemon.wait_for("vm_disconnected", count=VM_COUNT, timeout=30)

    assert daemon.proc.returncode == 0, daemon.stderr_text()
    assert not daemon.stderr_text().strip(), daemon.stderr_text()
    assert not daemon.bad_lines
    assert not daemon.find("internal_error")
    assert not daemon.find("qmp_decode_error")
    assert {r["vm"] for r in daemon.find("vm_added")} == set(names)
    for vm in vms:
        name = vm.spec.name
        sent = Counter((ev.name, iso_qemu_time(ev)) for ev in vm.event_log)
        got = Counter((r["qmp"], r["qemu_time"]) for r in daemon.find("qmp_event", vm=name))
        assert got == sent, f"{name}: missing {sent - got}, extra {got - sent}"
        assert Counter(ev.name for ev in vm.event_log) == SCRIPTED, name
        [gone] = daemon.find("vm_disconnected", vm=name)
        assert gone["cause"] == "shutdown"
    assert not daemon.find("alert", alert="vm_crashed")
