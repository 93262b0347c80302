"""A monitor that refuses commands (a restricted monitor, a QMP proxy, qemu-storage-daemon).

A real QEMU answers query-status; the fault here is a monitor that answers it with an error,
so it runs on the fake monitor of tests/support/fake_qmp.py with the real daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.daemon_harness import DaemonProcess, Record, write_config
from tests.support.fake_qmp import GREETING, FakeQmp, error_line, event_line


async def test_a_monitor_that_refuses_query_status_is_watched_not_crashed(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A restricted monitor answers query-status with an error: connected with status unknown
    and the greeting's version, no crash alert, and a STOP is still alerted."""

    def refuse(session: Any, command: dict[str, Any]) -> list[bytes]:
        return [error_line("CommandNotFound", "The command query-status has not been found",
                           command)]  # fmt: skip

    async with FakeQmp.serve(sock_dir / "restricted.qmp") as fake:
        fake.replies["query-status"] = refuse
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "restricted01", "socket": str(fake.path)}],
        )
        async with DaemonProcess.start(cfg) as daemon:
            connected = await daemon.wait_for("vm_connected", vm="restricted01")
            refused = await daemon.wait_for("vm_status_unavailable", vm="restricted01")
            session = await fake.session(1)
            await session.event("STOP")
            stopped = await daemon.wait_for("alert", vm="restricted01")
            await session.event("RESUME")
            await daemon.wait_for("alert_resolved", vm="restricted01")
            assert fake.connections == 1  # the first session, still up
    assert (connected["status"], connected["qemu_version"]) == ("unknown", "7.2.0")
    assert refused["error"] == (
        "QEMU answered query-status with CommandNotFound: The command query-status has not been "
        "found"
    )
    assert stopped["alert"] == "vm_stopped_unexpected"
    assert stopped["details"]["status_error"] == refused["error"]
    assert not daemon.find("vm_disconnected", vm="restricted01", where=_not_closed)
    assert [r["alert"] for r in daemon.find("alert")] == ["vm_stopped_unexpected"]
    assert daemon.proc.returncode == 0, daemon.stderr_text()
    assert not daemon.find("internal_error")


def _not_closed(record: Record) -> bool:
    return record.get("cause") != "closed"


async def test_an_event_before_the_greeting_is_logged_and_the_session_goes_on(
    tmp_path: Path, sock_dir: Path
) -> None:
    """QEMU 10.0 can send an event ahead of a monitor's first greeting: the event is logged
    once and the session is set up as usual."""
    async with FakeQmp.serve(sock_dir / "early.qmp") as fake:
        fake.greeting = event_line("RESUME", seconds=1_700_000_000) + GREETING
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "early01", "socket": str(fake.path)}],
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="early01")
            resumed = await daemon.wait_for("qmp_event", vm="early01", qmp="RESUME")
            assert fake.connections == 1
    assert resumed["qemu_time"] == "2023-11-14T22:13:20.000000Z"
    assert len(daemon.find("qmp_event", vm="early01")) == 1
    assert not daemon.find("vm_connect_failed")
    assert not daemon.find("qmp_decode_error")
