"""No exception from one connection, VM session or source step ends the daemon.

Each test makes one step of one source raise an exception qmpwatch never expects (a bug:
`tests/support/faulty_daemon.py` injects it once into the real daemon), beside a bystander VM
watched through `[[vm]]`. What an operator must see: an `internal_error` record naming the
step and what qmpwatch does next, the faulty VM watched after the retry, the bystander
watched throughout, and the daemon still running.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, Record, write_config

pytestmark = pytest.mark.qemu


@contextlib.asynccontextmanager
async def bystander(sock_dir: Path) -> AsyncIterator[LabVM]:
    async with LabVM.start(LabSpec("bystander"), sock_dir) as vm:
        yield vm


def config(tmp_path: Path, by: LabVM, **arrays: list[dict[str, object]]) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": "bystander", "socket": str(by.watch_socket)}, *arrays.pop("vm", [])],
        sections={"connect": FAST_CONNECT},
        arrays=arrays,
    )


async def still_watching(daemon: DaemonProcess, victim: LabVM, by: LabVM) -> None:
    """Both VMs are watched: a pause of each alerts; the daemon runs on."""
    await daemon.wait_for("vm_connected", vm=victim.spec.name)
    for vm in (by, victim):
        await vm.stop()
        await daemon.wait_for("alert", vm=vm.spec.name, alert="vm_stopped_unexpected")
    assert daemon.proc.returncode is None, daemon.stderr_text()
    assert await daemon.stop() == 0, daemon.stderr_text()


async def fault_record(daemon: DaemonProcess, step: str) -> Record:
    record = await daemon.wait_for("internal_error", where=lambda r: r.get("where") == step)
    assert "injected fault" in record["error"]
    return record


async def test_a_failing_accept_on_a_listen_socket_is_retried(
    tmp_path: Path, sock_dir: Path
) -> None:
    """accept() on the [[listen]] socket raises: recorded, accepted again a second later."""
    listen = sock_dir / "qw.sock"
    async with bystander(sock_dir) as by:
        cfg = config(tmp_path, by, listen=[{"socket": str(listen)}])
        async with (
            DaemonProcess.start(cfg, faults=[f"listen.accept:{listen}"]) as daemon,
            LabVM.start(LabSpec("victim", dial_in=listen), sock_dir) as victim,
        ):
            record = await fault_record(daemon, "listen: accept")
            await still_watching(daemon, victim, by)
    assert record["socket"] == str(listen)
    assert record["then"] == "accepts again in 1 s"


async def test_a_source_that_fails_to_take_the_configuration_spares_the_others(
    tmp_path: Path, sock_dir: Path
) -> None:
    """[[listen]] raises while taking the configuration at start-up: recorded, the [[vm]]
    source runs; the next reload (SIGHUP) gives [[listen]] its entries again."""
    listen = sock_dir / "qw.sock"
    async with bystander(sock_dir) as by:
        cfg = config(tmp_path, by, listen=[{"socket": str(listen)}])
        async with (
            DaemonProcess.start(cfg, faults=["listen.reconfigure"]) as daemon,
            LabVM.start(LabSpec("victim", dial_in=listen), sock_dir) as victim,
        ):
            record = await fault_record(daemon, "listen: reconfigure")
            await daemon.wait_for("vm_connected", vm="bystander")
            assert not daemon.find("listening")
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for("listening", socket=str(listen))
            await still_watching(daemon, victim, by)
    assert record["then"] == "runs the other sources; tries it again at the next reload"


async def test_a_failing_identification_drops_only_that_connection(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Identifying a QEMU that dialed in raises: that connection is dropped, QEMU dials in
    again and is watched."""
    listen = sock_dir / "qw.sock"
    async with bystander(sock_dir) as by:
        cfg = config(tmp_path, by, listen=[{"socket": str(listen)}])
        # QEMU first: it dials in from its main loop once qmpwatch listens (a hang-up while
        # QEMU is still starting can crash it: exit status -11 seen on 7.2 and 10.0).
        async with (
            LabVM.start(LabSpec("victim", dial_in=listen), sock_dir) as victim,
            DaemonProcess.start(cfg, faults=["listen.identify"]) as daemon,
        ):
            record = await fault_record(daemon, "listen: connection")
            await still_watching(daemon, victim, by)
    assert record["then"] == "drops this connection (QEMU dials in again)"


async def test_a_failing_dial_is_retried(tmp_path: Path, sock_dir: Path) -> None:
    """Dialing a [[vm]]'s socket raises: recorded, dialed again after the backoff."""
    async with bystander(sock_dir) as by, LabVM.start(LabSpec("victim"), sock_dir) as victim:
        cfg = config(tmp_path, by, vm=[{"name": "victim", "socket": str(victim.watch_socket)}])
        async with DaemonProcess.start(cfg, faults=["dial.connect:victim"]) as daemon:
            record = await fault_record(daemon, "dial: connect")
            await still_watching(daemon, victim, by)
    assert record["vm"] == "victim"
    assert record["then"].startswith("dials again in ")


async def test_a_failing_discover_scan_is_done_again(tmp_path: Path, sock_dir: Path) -> None:
    """Matching the [[discover]] globs raises: recorded, matched again two seconds later."""
    found = sock_dir / "found"
    found.mkdir()
    async with (
        bystander(sock_dir) as by,
        LabVM.start(LabSpec("victim"), sock_dir, watch_socket=found / "victim.qmp") as victim,
    ):
        cfg = config(tmp_path, by, discover=[{"glob": str(found / "*.qmp")}])
        async with DaemonProcess.start(cfg, faults=["discover.scan"]) as daemon:
            record = await fault_record(daemon, "discover: rescan")
            await still_watching(daemon, victim, by)
    assert record["then"] == "rescans in 2 s"


async def test_a_failing_resync_closes_only_that_link(tmp_path: Path, sock_dir: Path) -> None:
    """The query-status after a VM's link is up raises: that link is closed and the VM is
    dialed again and watched."""
    async with bystander(sock_dir) as by, LabVM.start(LabSpec("victim"), sock_dir) as victim:
        cfg = config(tmp_path, by, vm=[{"name": "victim", "socket": str(victim.watch_socket)}])
        async with DaemonProcess.start(cfg, faults=["session.resync:victim"]) as daemon:
            record = await fault_record(daemon, "session")
            await still_watching(daemon, victim, by)
    assert record["vm"] == "victim"
    assert record["then"] == "closes the link; its source connects again"


async def test_a_failing_read_closes_only_that_link(tmp_path: Path, sock_dir: Path) -> None:
    """Reading a VM's negotiated link raises: the link ends as an error, saying so, and the
    VM is dialed again and watched."""
    async with bystander(sock_dir) as by, LabVM.start(LabSpec("victim"), sock_dir) as victim:
        cfg = config(tmp_path, by, vm=[{"name": "victim", "socket": str(victim.watch_socket)}])
        async with DaemonProcess.start(cfg, faults=["session.read:victim"]) as daemon:
            ended = await daemon.wait_for("vm_disconnected", vm="victim")
            await daemon.wait_for("vm_connected", vm="victim", count=2)
            await still_watching(daemon, victim, by)
    assert ended["cause"] == "error"
    assert "injected fault" in ended["error"]
