"""The daemon against real QEMU processes: sessions, classification, crashes, reconnects.

Every test runs the real `qmpwatch run` (tests/support/daemon_harness.py) against real QEMUs
(qmpwatch.lab) and checks what an operator would check: the daemon's JSON log. Where counts
matter, the daemon's `qmp_event` records are compared with the events the lab's control
monitor received (QEMU broadcasts every event to every monitor). Absence of a record is
asserted only after the daemon has stopped, when its log is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.core.times import iso_utc
from qmpwatch.lab import (
    BlkdebugSpec,
    LabEvent,
    LabSpec,
    LabVM,
    QemuStartError,
    WatchdogAction,
)
from qmpwatch.service.statestore import FILE_NAME as STATE_FILE
from tests.support.daemon_harness import DaemonProcess, write_config
from tests.support.display_clients import spice_link_main_channel, vnc_session
from tests.support.ports import free_tcp_port, free_vnc_display
from tests.support.vm_scripts import basic_events

pytestmark = pytest.mark.qemu

LOCALHOST = "127.0.0.1"
SPEC_EVENTS = frozenset(
    {
        "BLOCK_IO_ERROR",
        "RESET",
        "RESUME",
        "RTC_CHANGE",
        "SHUTDOWN",
        "STOP",
        "VNC_CONNECTED",
        "VNC_DISCONNECTED",
        "VNC_INITIALIZED",
        "SPICE_CONNECTED",
        "SPICE_DISCONNECTED",
        "SPICE_INITIALIZED",
        "WATCHDOG",
    }
)
LoggedEvent = tuple[str, str, dict[str, Any]]  # (qmp, qemu_time, data)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def iso_qemu_time(event: LabEvent) -> str:
    """A lab event's QEMU timestamp as the daemon logs it (exact: float error < 0.25 µs)."""
    micros = round(event.qemu_time * 1_000_000)
    return iso_utc(micros // 1_000_000, micros % 1_000_000)


def as_logged(events: Iterable[LabEvent]) -> list[LoggedEvent]:
    """Control-monitor events as (qmp, qemu_time, data), the daemon's qmp_event fields."""
    return [(ev.name, iso_qemu_time(ev), ev.data) for ev in events]


def logged(daemon: DaemonProcess, vm: str) -> list[LoggedEvent]:
    """The daemon's qmp_event records of one VM as (qmp, qemu_time, data)."""
    return [(r["qmp"], r["qemu_time"], r["data"]) for r in daemon.find("qmp_event", vm=vm)]


def alerts(daemon: DaemonProcess, vm: str) -> list[str]:
    """The kinds of the alerts raised for one VM, in order."""
    return [r["alert"] for r in daemon.find("alert", vm=vm)]


def assert_healthy(daemon: DaemonProcess) -> None:
    """After the daemon stopped: no internal errors, no undecodable QMP, nothing on stderr,
    and every stdout line was JSON."""
    assert daemon.proc.returncode == 0, daemon.stderr_text()
    assert not daemon.stderr_text().strip(), daemon.stderr_text()
    assert not daemon.bad_lines, daemon.bad_lines[:5]
    assert not daemon.find("internal_error"), daemon.find("internal_error")
    assert not daemon.find("qmp_decode_error"), daemon.find("qmp_decode_error")


def config_for(
    tmp_path: Path, vms: Sequence[LabVM], *, no_shutdown: str | None = None, **extra: Any
) -> Path:
    """A daemon config watching the watch sockets of `vms` (VM name = lab spec name)."""
    entries: list[dict[str, object]] = []
    for vm in vms:
        entry: dict[str, object] = {"name": vm.spec.name, "socket": str(vm.watch_socket)}
        if no_shutdown is not None:
            entry["no_shutdown"] = no_shutdown
        entries.append(entry)
    return write_config(tmp_path / "c.toml", state_dir=tmp_path / "state", vms=entries, **extra)


@contextlib.asynccontextmanager
async def lab_vms(*launches: Awaitable[LabVM]) -> AsyncIterator[list[LabVM]]:
    """Start lab VMs concurrently; close them all concurrently on the way out."""
    results = await asyncio.gather(*launches, return_exceptions=True)
    vms = [r for r in results if isinstance(r, LabVM)]
    try:
        for result in results:
            if isinstance(result, BaseException):
                raise result
        yield vms
    finally:
        await asyncio.gather(*(vm.aclose() for vm in vms), return_exceptions=True)


async def launch_display_vm(name: str, workdir: Path) -> LabVM:
    """A VM with VNC and SPICE on ports picked now (retried if one got taken meanwhile)."""
    for attempt in range(3):
        spec = LabSpec(name=name, vnc_display=free_vnc_display(), spice_port=free_tcp_port())
        try:
            return await LabVM.launch(spec, workdir)
        except QemuStartError as exc:
            if attempt == 2 or "in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


async def assert_no_record_for(
    daemon: DaemonProcess, seconds: float, event: str, *, after: int = 0, **match: Any
) -> None:
    """Watch the live log for `seconds`; fail as soon as a matching record appears."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            found = await daemon.wait_for(event, timeout=seconds + 5, after=after, **match)
            raise AssertionError(f"unexpected record: {found}")
    assert daemon.proc.returncode is None, daemon.stderr_text()


# --------------------------------------------------------------------------------------
# Classification, crashes and reconnects
# --------------------------------------------------------------------------------------


async def test_client_stop_is_a_warning_with_status_paused(tmp_path: Path, sock_dir: Path) -> None:
    """A client's `stop` is logged and alerted as vm_stopped_unexpected (warning, paused)."""
    async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "web01", "socket": str(vm.watch_socket)}],
        )
        async with DaemonProcess.start(cfg) as daemon:
            connected = await daemon.wait_for("vm_connected", vm="web01")
            assert connected["status"] == "running"
            assert connected["qemu_version"] == ".".join(map(str, vm.qemu_version))
            await vm.stop()
            alert = await daemon.wait_for("alert", vm="web01")
            assert alert["alert"] == "vm_stopped_unexpected"
            assert alert["severity"] == "warning"
            assert alert["details"]["status"] == "paused"
            await vm.cont()
            await daemon.wait_for("alert_resolved", alert="vm_stopped_unexpected")
            names = [r["qmp"] for r in daemon.find("qmp_event", vm="web01")]
            assert names == ["STOP", "RESUME"]


async def test_kill_is_a_crash_and_a_new_qemu_reconnects(tmp_path: Path, sock_dir: Path) -> None:
    """kill -9 of QEMU gives vm_crashed; a new QEMU on the same socket is picked up again."""
    socket_path = sock_dir / "db01.qmp"
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": "db01", "socket": str(socket_path)}],
    )
    async with DaemonProcess.start(cfg) as daemon:
        async with LabVM.start(LabSpec(name="db01"), sock_dir, watch_socket=socket_path) as vm:
            await daemon.wait_for("vm_connected", vm="db01")
            await vm.kill()
            crash = await daemon.wait_for("alert", alert="vm_crashed")
            assert crash["severity"] == "critical"
            assert daemon.find("vm_disconnected", cause="eof")
        mark = daemon.mark()
        async with LabVM.start(LabSpec(name="db01"), sock_dir, watch_socket=socket_path) as vm:
            await daemon.wait_for("vm_connected", vm="db01", after=mark)
            await daemon.wait_for("alert_resolved", alert="vm_crashed", after=mark)
            mark = daemon.mark()
            await vm.quit()
            gone = await daemon.wait_for("vm_disconnected", after=mark)
            assert gone["cause"] == "shutdown"
            assert not daemon.find("alert", alert="vm_crashed", after=mark)


async def test_io_error_pause_is_explained_not_unexpected(tmp_path: Path, sock_dir: Path) -> None:
    """BLOCK_IO_ERROR(stop) then STOP: followup_satisfied and vm_stopped_io_error, nothing else."""
    spec = LabSpec(name="io01", blkdebug=BlkdebugSpec(errno=28, sector=8))
    async with LabVM.start(spec, sock_dir) as vm:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "io01", "socket": str(vm.watch_socket)}],
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="io01")
            await vm.ata_read_sector(8)
            done = await daemon.wait_for("followup_satisfied", rule="stop_after_block_io_error")
            assert done["cause"] == "BLOCK_IO_ERROR"
            assert done["expected"] == "STOP"
            cause = daemon.find("qmp_event", vm="io01", qmp="BLOCK_IO_ERROR")[0]
            stop = daemon.find("qmp_event", vm="io01", qmp="STOP")[0]
            # latency_ms: the time between the two events' reads, which their records carry
            between_ms = (read_at(stop) - read_at(cause)).total_seconds() * 1000
            assert done["latency_ms"] == pytest.approx(between_ms, abs=0.002)
            alert = await daemon.wait_for("alert", alert="vm_stopped_io_error")
            assert alert["severity"] == "critical"
            assert "read error on drive0" in alert["summary"]
            assert "No space left on device" in alert["summary"]
            await vm.cont()
            await daemon.wait_for("alert_resolved", alert="vm_stopped_io_error")
            assert not daemon.find("alert", alert="vm_stopped_unexpected")


# --------------------------------------------------------------------------------------
# Every event of the spec, as QEMU sent it
# --------------------------------------------------------------------------------------


async def _drive_io_error(vm: LabVM) -> None:
    """BLOCK_IO_ERROR and STOP from a failing ATA read; RESUME on cont; SHUTDOWN by quit."""
    assert vm.spec.blkdebug is not None
    await vm.ata_read_sector(vm.spec.blkdebug.sector)
    error = await vm.wait_event("BLOCK_IO_ERROR")
    await vm.wait_event("STOP", after=error.seq)
    await vm.cont()
    await vm.wait_event("RESUME", after=error.seq)
    await vm.quit()


async def _drive_watchdog(vm: LabVM) -> None:
    """WATCHDOG (action reset) and its RESET; SHUTDOWN by quit."""
    await vm.arm_watchdog(2)
    fired = await vm.wait_event("WATCHDOG", timeout=15)
    await vm.wait_event("RESET", after=fired.seq)
    await vm.quit()


async def _drive_displays(vm: LabVM) -> None:
    """Three VNC events (RFB session), three SPICE events (main-channel link), then quit."""
    assert vm.spec.vnc_display is not None
    assert vm.spec.spice_port is not None
    await vnc_session(LOCALHOST, 5900 + vm.spec.vnc_display)
    await vm.wait_event("VNC_DISCONNECTED")
    await spice_link_main_channel(LOCALHOST, vm.spec.spice_port)
    init = await vm.wait_event("SPICE_INITIALIZED")
    await vm.wait_event("SPICE_DISCONNECTED", after=init.seq)
    await vm.quit()


async def test_every_spec_event_is_logged_once_with_qemus_data(
    tmp_path: Path, sock_dir: Path
) -> None:
    """All 13 spec events from real QEMUs are logged once each, as QEMU sent them (time, data)."""
    drivers = {
        "ev-basic": basic_events,
        "ev-io": _drive_io_error,
        "ev-wd": _drive_watchdog,
        "ev-display": _drive_displays,
    }
    async with lab_vms(
        LabVM.launch(LabSpec("ev-basic"), sock_dir),
        LabVM.launch(LabSpec("ev-io", blkdebug=BlkdebugSpec()), sock_dir),
        LabVM.launch(LabSpec("ev-wd", watchdog_action="reset"), sock_dir),
        launch_display_vm("ev-display", sock_dir),
    ) as vms:
        async with DaemonProcess.start(config_for(tmp_path, vms)) as daemon:
            for vm in vms:
                await daemon.wait_for("vm_connected", vm=vm.spec.name)
            marks = {vm.spec.name: vm.mark() for vm in vms}
            async with asyncio.TaskGroup() as tg:
                for vm in vms:
                    tg.create_task(drivers[vm.spec.name](vm))
            for vm in vms:
                gone = await daemon.wait_for("vm_disconnected", vm=vm.spec.name)
                assert gone["cause"] == "shutdown"
        assert_healthy(daemon)
        seen: set[str] = set()
        for vm in vms:
            name = vm.spec.name
            expected = as_logged(ev for ev in vm.event_log if ev.seq > marks[name])
            assert logged(daemon, name) == expected, name
            seen |= {qmp for qmp, _, _ in expected}
        assert seen >= SPEC_EVENTS, sorted(SPEC_EVENTS - seen)
        spice = daemon.find("qmp_event", vm="ev-display", qmp="SPICE_INITIALIZED")[0]
        assert spice["data"]["client"]["channel-type"] == 1
        vnc = daemon.find("qmp_event", vm="ev-display", qmp="VNC_INITIALIZED")[0]
        assert vnc["data"]["client"]["websocket"] is False
        io = daemon.find("qmp_event", vm="ev-io", qmp="BLOCK_IO_ERROR")[0]
        assert io["data"]["device"] == "drive0"
        assert io["data"]["action"] == "stop"


# --------------------------------------------------------------------------------------
# Follow-up rules: watchdog actions and guest poweroff
# --------------------------------------------------------------------------------------


async def test_watchdog_actions_satisfy_their_followups(tmp_path: Path, sock_dir: Path) -> None:
    """WATCHDOG pause→STOP, reset→RESET, poweroff→exit: satisfied, alerted, no crash/unexpected."""
    actions: tuple[WatchdogAction, ...] = ("pause", "reset", "poweroff")
    async with lab_vms(
        *(LabVM.launch(LabSpec(f"wd-{a}", watchdog_action=a), sock_dir) for a in actions)
    ) as vms:
        by_action = dict(zip(actions, vms, strict=True))
        async with DaemonProcess.start(config_for(tmp_path, vms)) as daemon:
            for vm in vms:
                await daemon.wait_for("vm_connected", vm=vm.spec.name)
            await asyncio.gather(*(vm.arm_watchdog(2) for vm in vms))

            paused = await daemon.wait_for("followup_satisfied", vm="wd-pause", timeout=20)
            assert (paused["rule"], paused["cause"], paused["expected"]) == (
                "stop_after_watchdog",
                "WATCHDOG",
                "STOP",
            )
            stopped = await daemon.wait_for("alert", vm="wd-pause", alert="vm_stopped_watchdog")
            assert stopped["severity"] == "critical"
            assert stopped["details"]["status"] == "watchdog"
            assert await by_action["pause"].query_status() == "watchdog"

            reset = await daemon.wait_for("followup_satisfied", vm="wd-reset", timeout=20)
            assert (reset["rule"], reset["expected"]) == ("reset_after_watchdog", "RESET")
            [reset_event] = daemon.find("qmp_event", vm="wd-reset", qmp="RESET")
            assert reset_event["data"]["guest"] is True

            exited = await daemon.wait_for("followup_satisfied", vm="wd-poweroff", timeout=20)
            assert (exited["rule"], exited["expected"]) == ("exit_after_watchdog", "QEMU_EXIT")
            gone = await daemon.wait_for("vm_disconnected", vm="wd-poweroff")
            assert gone["cause"] == "shutdown"
            await by_action["poweroff"].wait_exit()
            assert by_action["poweroff"].find_event("SHUTDOWN") is None

        assert_healthy(daemon)
        for action, vm in by_action.items():
            name = vm.spec.name
            fired = daemon.find("alert", vm=name, alert="watchdog_fired")
            assert len(fired) == 1, name
            # one incident, one page: a pause pages through vm_stopped_watchdog
            assert fired[0]["severity"] == ("info" if action == "pause" else "critical")
            assert fired[0]["details"]["action"] == action
            assert not daemon.find("followup_missed", vm=name)
            assert "vm_stopped_unexpected" not in alerts(daemon, name)
        assert alerts(daemon, "wd-pause") == ["watchdog_fired", "vm_stopped_watchdog"]
        assert alerts(daemon, "wd-reset") == ["watchdog_fired"]
        assert alerts(daemon, "wd-poweroff") == ["watchdog_fired"]


async def test_guest_poweroff_with_and_without_no_shutdown(tmp_path: Path, sock_dir: Path) -> None:
    """Poweroff: -no-shutdown (auto-detected) gives SHUTDOWN→STOP, no alert; else a clean exit."""
    async with lab_vms(
        LabVM.launch(LabSpec("off-paused", no_shutdown=True), sock_dir),
        LabVM.launch(LabSpec("off-exits"), sock_dir),
    ) as vms:
        paused_vm, exiting_vm = vms
        cfg = config_for(tmp_path, vms, no_shutdown="auto")
        async with DaemonProcess.start(cfg) as daemon:
            on = await daemon.wait_for("vm_connected", vm="off-paused")
            off = await daemon.wait_for("vm_connected", vm="off-exits")
            assert on["no_shutdown"] is True
            assert on["pid"] == paused_vm.pid
            assert off["no_shutdown"] is False
            await asyncio.gather(paused_vm.guest_poweroff(), exiting_vm.guest_poweroff())

            done = await daemon.wait_for("followup_satisfied", vm="off-paused")
            assert (done["rule"], done["cause"], done["expected"]) == (
                "stop_after_shutdown",
                "SHUTDOWN",
                "STOP",
            )
            assert await paused_vm.query_status() == "shutdown"
            gone = await daemon.wait_for("vm_disconnected", vm="off-exits")
            assert gone["cause"] == "shutdown"
            assert await exiting_vm.wait_exit() == 0

        assert_healthy(daemon)
        assert [r["qmp"] for r in daemon.find("qmp_event", vm="off-paused")] == [
            "SHUTDOWN",
            "STOP",
        ]
        shutdown = daemon.find("qmp_event", vm="off-exits", qmp="SHUTDOWN")
        assert [r["data"] for r in shutdown] == [{"guest": True, "reason": "guest-shutdown"}]
        assert alerts(daemon, "off-paused") == []
        assert alerts(daemon, "off-exits") == []
        assert not daemon.find("followup_missed")
        assert not daemon.find("vm_disconnected", vm="off-paused", cause="shutdown")


# --------------------------------------------------------------------------------------
# Connecting: a busy monitor, a missing socket, state the daemon did not see change
# --------------------------------------------------------------------------------------


async def test_monitor_held_by_another_client_is_no_greeting_then_connects(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A monitor held by another client: vm_connect_failed no_greeting, then connected once free."""
    async with LabVM.start(LabSpec("busy"), sock_dir) as vm:
        cfg = config_for(tmp_path, [vm], sections={"connect": {"timeout_s": 1.0}})
        reader, writer = await asyncio.open_unix_connection(str(vm.watch_socket))
        try:
            async with asyncio.timeout(10):
                greeting = await reader.readline()
            assert greeting.startswith(b'{"QMP"')
            async with DaemonProcess.start(cfg) as daemon:
                failed = await daemon.wait_for("vm_connect_failed", vm="busy")
                assert failed["reason"] == "no_greeting"
                assert failed["retry_in_s"] >= 0
                assert not daemon.find("vm_connected")
                mark = daemon.mark()
                writer.close()
                await writer.wait_closed()
                connected = await daemon.wait_for("vm_connected", vm="busy", after=mark)
                assert connected["status"] == "running"
                mark = daemon.mark()
                await vm.stop()
                await daemon.wait_for("qmp_event", vm="busy", qmp="STOP", after=mark)
            assert_healthy(daemon)
        finally:
            writer.close()


async def test_missing_socket_is_logged_rate_limited_then_connects(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A missing socket is logged once over many retries, and connected when QEMU appears."""
    path = sock_dir / "late.qmp"
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": "late", "socket": str(path)}],
    )
    async with DaemonProcess.start(cfg) as daemon:
        first = await daemon.wait_for("vm_connect_failed", vm="late")
        assert first["reason"] == "missing"
        assert first["attempts"] == 1
        assert 0 < first["retry_in_s"] <= 0.5
        # Backoff 0.1 .. 0.5 s: at least four more attempts within this window.
        mark = daemon.mark()
        await assert_no_record_for(daemon, 2.0, "vm_connect_failed", vm="late", after=mark)
        path.write_text("not a socket\n")
        other = await daemon.wait_for("vm_connect_failed", vm="late", reason="not_a_socket")
        assert other["attempts"] >= 5
        assert len(daemon.find("vm_connect_failed", vm="late", reason="missing")) == 1
        # QEMU replaces the regular file with its socket.
        async with LabVM.start(LabSpec("late"), sock_dir, watch_socket=path):
            connected = await daemon.wait_for("vm_connected", vm="late")
            assert connected["status"] == "running"
            assert connected["socket"] == str(path)
    assert_healthy(daemon)
    failures = daemon.find("vm_connect_failed", vm="late")
    assert [r["reason"] for r in failures[:2]] == ["missing", "not_a_socket"]


async def test_io_error_pause_before_daemon_start_is_reported_on_connect(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A VM paused on an I/O error before the daemon started is reported on connect (critical)."""
    async with LabVM.start(LabSpec("pre-io", blkdebug=BlkdebugSpec()), sock_dir) as vm:
        await vm.ata_read_sector(8)
        await vm.wait_event("STOP")
        assert await vm.query_status() == "io-error"
        async with DaemonProcess.start(config_for(tmp_path, [vm])) as daemon:
            connected = await daemon.wait_for("vm_connected", vm="pre-io")
            assert connected["status"] == "io-error"
            alert = await daemon.wait_for("alert", vm="pre-io")
            assert alert["alert"] == "vm_state_changed_while_unmonitored"
            assert alert["severity"] == "critical"
            assert alert["details"]["status"] == "io-error"
            assert "io-error" in alert["summary"]
            await vm.cont()
            await daemon.wait_for(
                "alert_resolved", vm="pre-io", alert="vm_state_changed_while_unmonitored"
            )
    assert_healthy(daemon)
    assert alerts(daemon, "pre-io") == ["vm_state_changed_while_unmonitored"]


async def test_state_changes_across_daemon_restarts(tmp_path: Path, sock_dir: Path) -> None:
    """A pause while the daemon was down is reported on restart; a pause it already saw is not."""
    async with LabVM.start(LabSpec("keep"), sock_dir) as vm:
        cfg = config_for(tmp_path, [vm])

        async def one_run(expect_status: str) -> DaemonProcess:
            async with DaemonProcess.start(cfg) as daemon:
                connected = await daemon.wait_for("vm_connected", vm="keep")
                assert connected["status"] == expect_status
            assert_healthy(daemon)
            assert daemon.find("vm_disconnected", vm="keep", cause="closed")
            return daemon

        first = await one_run("running")
        assert alerts(first, "keep") == []
        assert (tmp_path / "state" / STATE_FILE).is_file()

        await vm.stop()  # while no daemon watches
        second = await one_run("paused")
        [alert] = second.find("alert", vm="keep")
        assert alert["alert"] == "vm_state_changed_while_unmonitored"
        assert alert["severity"] == "warning"
        assert alert["details"] == {"status": "paused", "previous_status": "running"}

        third = await one_run("paused")  # seen by the second run: not news
        assert alerts(third, "keep") == []

        async with DaemonProcess.start(cfg) as fourth:
            await fourth.wait_for("vm_connected", vm="keep")
            mark = vm.mark()
            await vm.cont()
            await vm.wait_event("RESUME", after=mark)
            await vm.stop()  # seen live this time
            await fourth.wait_for("alert", vm="keep", alert="vm_stopped_unexpected")
        assert_healthy(fourth)

        fifth = await one_run("paused")
        assert alerts(fifth, "keep") == []


# --------------------------------------------------------------------------------------
# The daemon's own life: SIGTERM, discovery
# --------------------------------------------------------------------------------------


async def test_sigterm_closes_sessions_and_exits_zero(tmp_path: Path, sock_dir: Path) -> None:
    """SIGTERM: exit 0 within seconds, every session closed (cause closed), VMs left running."""
    async with lab_vms(
        LabVM.launch(LabSpec("term-a"), sock_dir), LabVM.launch(LabSpec("term-b"), sock_dir)
    ) as vms:
        async with DaemonProcess.start(config_for(tmp_path, vms)) as daemon:
            for vm in vms:
                await daemon.wait_for("vm_connected", vm=vm.spec.name)
            await vms[1].stop()
            await daemon.wait_for("alert", vm="term-b", alert="vm_stopped_unexpected")
            began = time.monotonic()
            code = await daemon.stop(signal.SIGTERM, timeout=10)
            elapsed = time.monotonic() - began
        assert code == 0, daemon.stderr_text()
        assert elapsed < 3.0, f"stopping took {elapsed:.2f} s"
        assert_healthy(daemon)
        assert daemon.find("daemon_stopping", signal="SIGTERM")
        assert daemon.records[-1]["event"] == "daemon_stopped"
        for vm in vms:
            [gone] = daemon.find("vm_disconnected", vm=vm.spec.name)
            assert gone["cause"] == "closed"
            assert vm.running
        assert not daemon.find("alert", alert="vm_crashed")
        assert [await vm.query_status() for vm in vms] == ["running", "paused"]


async def test_discovery_adds_new_sockets_drops_removed_ignores_files(
    tmp_path: Path, sock_dir: Path
) -> None:
    """[[discover]] adds a socket created while running, drops it once removed (resolving its
    alert), skips files."""
    run = sock_dir / "run"
    run.mkdir()
    cfg = write_config(
        tmp_path / "c.toml", state_dir=tmp_path / "state", discover=[{"glob": f"{run}/*.qmp"}]
    )
    async with DaemonProcess.start(cfg) as daemon:
        (run / "notes.qmp").write_text("a plain file that matches the glob\n")
        async with LabVM.start(
            LabSpec("alpha", no_shutdown=True), sock_dir, watch_socket=run / "alpha.qmp"
        ) as vm:
            added = await daemon.wait_for("vm_added", vm="alpha")
            assert added["socket"] == str(run / "alpha.qmp")
            connected = await daemon.wait_for("vm_connected", vm="alpha")
            assert connected["no_shutdown"] is True
            await vm.stop()
            # the alert, not just the STOP: it needs query-status answered before the quit
            await daemon.wait_for("alert", vm="alpha", alert="vm_stopped_unexpected")
            await vm.quit()  # QEMU removes its socket file
        assert not (run / "alpha.qmp").exists()
        removed = await daemon.wait_for("vm_removed", vm="alpha")
        # its alert resolves at QEMU's clean end (SHUTDOWN, then EOF), the removal after it
        await daemon.wait_for("alert_resolved", vm="alpha")
        assert removed["socket"] == str(run / "alpha.qmp")
    assert_healthy(daemon)
    assert not daemon.find("vm_added", vm="notes")
    assert not [r for r in daemon.records if r.get("vm") == "notes"]
    resolved = daemon.find("alert_resolved", vm="alpha")
    assert [(r["alert"], r["reason"]) for r in resolved] == [
        ("vm_stopped_unexpected", "QEMU ended cleanly: it shut down (host-qmp-quit)")
    ]
    assert len(daemon.find("vm_added", vm="alpha")) == 1


async def test_a_discovered_socket_removed_while_qemu_runs_resolves_its_alerts(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A paused VM's discovered socket is removed while its QEMU runs on: the VM leaves the
    watch and its alert resolves as no longer discovered."""
    run = sock_dir / "run"
    run.mkdir()
    cfg = write_config(
        tmp_path / "c.toml", state_dir=tmp_path / "state", discover=[{"glob": f"{run}/*.qmp"}]
    )
    async with (
        DaemonProcess.start(cfg) as daemon,
        LabVM.start(LabSpec("beta"), sock_dir, watch_socket=run / "beta.qmp") as vm,
    ):
        await daemon.wait_for("vm_connected", vm="beta")
        await vm.stop()
        alert = await daemon.wait_for("alert", vm="beta", alert="vm_stopped_unexpected")
        (run / "beta.qmp").unlink()  # an operator's rm; QEMU runs on
        removed = await daemon.wait_for("vm_removed", vm="beta")
        resolved = await daemon.wait_for("alert_resolved", fingerprint=alert["fingerprint"])
        assert vm.returncode is None  # QEMU was not stopped: only its socket went
    assert removed["socket"] == str(run / "beta.qmp")
    assert resolved["reason"] == "no longer discovered (its socket is gone)"
    assert not daemon.find("vm_crashed", vm="beta")


def read_at(record: dict[str, Any]) -> datetime:
    """When qmpwatch read what a record is about: its `timestamp`."""
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
