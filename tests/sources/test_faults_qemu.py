"""Faults with real QEMU: crashes in a row, a frozen QEMU, a vanished socket, a killed daemon.

The daemon runs as a subprocess and is observed through its JSON log; its open file
descriptors and threads are read from /proc. Asyncio tasks can only be counted in-process,
so one test runs the daemon's own dialer and session in this process against a QEMU killed over
and over.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from qmpwatch.lab import BlkdebugSpec, LabSpec, LabVM
from tests.support.daemon_harness import DaemonProcess, Record, write_config
from tests.support.fake_qmp import SignallingStore, rendered_log, vm_connection

pytestmark = pytest.mark.qemu

KILLS = 100
FAST = {"timeout_s": 2.0, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for row in status:
            if row.startswith("Threads:"):
                return int(row.split()[1])
    raise AssertionError("no Threads: line")


def events_of(daemon: DaemonProcess, vm: str, after: int = 0) -> list[str]:
    return [r["qmp"] for r in daemon.find("qmp_event", vm=vm, after=after)]


async def test_qemu_killed_100_times_each_crash_reported_once_no_leak(
    tmp_path: Path, sock_dir: Path
) -> None:
    """kill -9 x100 with restarts: 100 crashes, 100 reattaches, fds and threads flat; from the
    third crash on it is one crash loop, which pages once."""
    path = sock_dir / "crashy.qmp"
    async with LabVM.start(LabSpec(name="steady"), sock_dir) as steady:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[
                {"name": "crashy", "socket": str(path)},
                {"name": "steady", "socket": str(steady.watch_socket)},
            ],
            sections={"connect": FAST},
        )
        async with DaemonProcess.start(cfg) as daemon:
            pid = daemon.proc.pid
            await daemon.wait_for("vm_connected", vm="steady")
            fds_before = threads_before = 0
            for round_ in range(KILLS + 1):
                mark = daemon.mark()
                async with LabVM.start(LabSpec(name="crashy"), sock_dir, watch_socket=path) as vm:
                    await daemon.wait_for("vm_connected", vm="crashy", after=mark)
                    if round_ == 1:  # after one crash: its readers' thread pool exists
                        fds_before, threads_before = open_fds(pid), threads(pid)
                    if round_ == KILLS:
                        await daemon.wait_for("alert_resolved", vm="crashy", after=mark)
                        fds_after, threads_after = open_fds(pid), threads(pid)
                        break
                    await vm.kill()
                    await daemon.wait_for("alert", vm="crashy", alert="vm_crashed", after=mark)
            mark = daemon.mark()
            await steady.system_reset()
            await daemon.wait_for("qmp_event", vm="steady", qmp="RESET", after=mark)

        crashes = daemon.find("alert", vm="crashy", alert="vm_crashed")
        assert len(crashes) == KILLS
        assert [c["severity"] for c in crashes] == ["critical"] * 2 + ["info"] * (KILLS - 2)
        (loop,) = daemon.find("alert", vm="crashy", alert="vm_crash_loop")
        assert loop["severity"] == "critical"
        assert loop["details"]["by_kind"] == {"crash": 3}
        assert len(daemon.find("vm_connected", vm="crashy")) == KILLS + 1
        assert len(daemon.find("vm_disconnected", vm="crashy", cause="eof")) == KILLS
        assert len(daemon.find("alert_resolved", vm="crashy", alert="vm_crashed")) == KILLS
        assert not daemon.find(
            "vm_disconnected", vm="steady", where=lambda r: r["cause"] != "closed"
        )
        assert not daemon.find("internal_error")
        assert (fds_after, threads_after) == (fds_before, threads_before)


async def test_in_process_no_task_or_fd_leak_across_crashes(sock_dir: Path) -> None:
    """The daemon's dialer and session against a QEMU killed 30 times: tasks and fds stay flat."""
    path = sock_dir / "t.qmp"
    with rendered_log() as log:
        log.reset()
        store = SignallingStore()
        task = asyncio.create_task(vm_connection("t", path, store).run())
        try:
            before: tuple[int, int] = (0, 0)
            for round_ in range(31):
                mark = log.mark()
                async with LabVM.start(LabSpec(name="t"), sock_dir, watch_socket=path) as vm:
                    await log.wait_for("vm_connected", vm="t", after=mark)
                    # count while the lab's own control session is up in both cases
                    counts = (len(asyncio.all_tasks()), open_fds(os.getpid()))
                    if round_ == 0:
                        before = counts
                    if round_ == 30:
                        assert counts == before
                        break
                    await vm.kill()
                    await log.wait_for("alert", vm="t", alert="vm_crashed", after=mark)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert len(log.find("alert", alert="vm_crashed")) == 30
        assert not log.bad_lines


async def test_frozen_qemu_is_unresponsive_others_go_on_and_it_recovers(
    tmp_path: Path, sock_dir: Path
) -> None:
    """SIGSTOP: the STOP's query-status times out (vm_unresponsive), others go on, SIGCONT heals."""
    async with (
        LabVM.start(LabSpec(name="frozen"), sock_dir) as vm,
        LabVM.start(LabSpec(name="steady"), sock_dir) as steady,
    ):
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[
                {"name": "frozen", "socket": str(vm.watch_socket)},
                {"name": "steady", "socket": str(steady.watch_socket)},
            ],
            sections={"connect": FAST},
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="frozen")
            await daemon.wait_for("vm_connected", vm="steady")
            # Freeze right after `stop` returns: QEMU has sent STOP to both monitors, and the
            # daemon's query-status usually arrives after the freeze. When the daemon is
            # quicker (the alert says "paused"), resume and try again.
            for _attempt in range(10):
                mark = daemon.mark()
                await vm.stop()
                vm.freeze()
                await steady.system_reset()  # QEMU is frozen: the daemon must go on with others
                reset = await daemon.wait_for("qmp_event", vm="steady", qmp="RESET", after=mark)
                alert = await daemon.wait_for("alert", vm="frozen", after=mark)
                if alert["details"]["status"] is None:
                    break
                vm.thaw()
                await vm.cont()
                await daemon.wait_for("alert_resolved", vm="frozen", after=mark)
            else:
                raise AssertionError("the daemon's query-status won the race 10 times in a row")
            unresponsive = daemon.find("vm_unresponsive", vm="frozen", after=mark)
            assert [u["error"] for u in unresponsive] == ["query-status timed out"]
            assert alert["alert"] == "vm_stopped_unexpected"
            assert alert["severity"] == "critical"
            assert alert["details"]["status_error"] == "query-status timed out"
            assert daemon.records.index(reset) < daemon.records.index(unresponsive[0])

            vm.thaw()
            mark = daemon.mark()
            await vm.cont()
            await daemon.wait_for("qmp_event", vm="frozen", qmp="RESUME", after=mark)
            await daemon.wait_for("alert_resolved", vm="frozen", alert="vm_stopped_unexpected")
            await vm.stop()  # query-status is answered again
            paused = await daemon.wait_for("alert", vm="frozen", after=mark)
            assert paused["details"]["status"] == "paused"
            assert not daemon.find("qmp_decode_error")  # the late reply was dropped quietly
            assert not daemon.find("vm_disconnected")
            assert not daemon.find("internal_error")


async def test_socket_deleted_and_recreated(tmp_path: Path, sock_dir: Path) -> None:
    """A configured socket deleted (session goes on), missing, replaced by a file, recreated."""
    path = sock_dir / "gone.qmp"
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": "gone", "socket": str(path)}],
        sections={"connect": FAST},
    )
    async with DaemonProcess.start(cfg) as daemon:
        async with LabVM.start(LabSpec(name="gone"), sock_dir, watch_socket=path) as vm:
            await daemon.wait_for("vm_connected", vm="gone")
            path.unlink()
            mark = daemon.mark()
            await vm.stop()
            await vm.cont()
            await daemon.wait_for("qmp_event", vm="gone", qmp="RESUME", after=mark)
            assert events_of(daemon, "gone", mark) == ["STOP", "RESUME"]
            await vm.quit()
            await daemon.wait_for("vm_disconnected", vm="gone", cause="shutdown", after=mark)
        missing = await daemon.wait_for("vm_connect_failed", vm="gone", after=mark)
        assert missing["reason"] == "missing"
        path.write_text("not a socket\n")
        wrong = await daemon.wait_for("vm_connect_failed", vm="gone", reason="not_a_socket")
        assert str(path) in wrong["error"]
        path.unlink()
        mark = daemon.mark()
        async with LabVM.start(LabSpec(name="gone"), sock_dir, watch_socket=path) as vm:
            await daemon.wait_for("vm_connected", vm="gone", after=mark)
            await vm.system_reset()
            await daemon.wait_for("qmp_event", vm="gone", qmp="RESET", after=mark)
        assert not daemon.find("alert", vm="gone", alert="vm_crashed")


async def test_discovered_socket_deleted_and_recreated(tmp_path: Path, sock_dir: Path) -> None:
    """A discovered socket deleted: the VM is dropped; a new QEMU on it is picked up again."""
    path = sock_dir / "disc.qmp"
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        discover=[{"glob": str(sock_dir / "*.qmp")}],
        sections={"connect": FAST},
    )
    async with DaemonProcess.start(cfg) as daemon:
        async with LabVM.start(LabSpec(name="disc"), sock_dir, watch_socket=path) as vm:
            await daemon.wait_for("vm_connected", vm="disc")
            mark = daemon.mark()
            path.unlink()
            await daemon.wait_for("vm_removed", vm="disc", after=mark)
            await daemon.wait_for("vm_disconnected", vm="disc", cause="closed", after=mark)
        mark = daemon.mark()
        async with LabVM.start(LabSpec(name="disc"), sock_dir, watch_socket=path) as vm:
            await daemon.wait_for("vm_added", vm="disc", after=mark)
            await daemon.wait_for("vm_connected", vm="disc", after=mark)
            await vm.system_reset()
            await daemon.wait_for("qmp_event", vm="disc", qmp="RESET", after=mark)
        assert not daemon.find("alert", vm="disc")


async def test_daemon_killed_mid_io_error_pause_reports_it_after_restart(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Daemon SIGKILLed with BLOCK_IO_ERROR→STOP unread: the restart reports the pause."""
    spec = LabSpec(name="io01", blkdebug=BlkdebugSpec(errno=5, sector=8))
    async with LabVM.start(spec, sock_dir) as vm:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "io01", "socket": str(vm.watch_socket)}],
            sections={"connect": FAST},
        )
        async with DaemonProcess.start(cfg) as first:
            connected = await first.wait_for("vm_connected", vm="io01")
            assert connected["status"] == "running"
            first.send_signal(signal.SIGSTOP)  # it reads nothing from now on
            mark = vm.mark()
            await vm.ata_read_sector(8)
            await vm.wait_event("BLOCK_IO_ERROR", after=mark)
            await vm.wait_event("STOP", after=mark)
            assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        assert events_of(first, "io01") == []
        assert await vm.query_status() == "io-error"

        async with DaemonProcess.start(cfg) as second:
            connected = await second.wait_for("vm_connected", vm="io01")
            assert connected["status"] == "io-error"
            alert = await second.wait_for("alert", vm="io01")
            assert alert["alert"] == "vm_state_changed_while_unmonitored"
            assert alert["severity"] == "critical"
            assert alert["details"] == {"status": "io-error", "previous_status": "running"}
            assert "paused on a disk I/O error" in alert["summary"]
            await vm.cont()
            await second.wait_for("alert_resolved", vm="io01")
            alerts: list[Record] = second.find("alert", vm="io01")
            assert len(alerts) == 1
