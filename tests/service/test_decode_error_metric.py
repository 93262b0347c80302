"""A peer that breaks QMP (a fake monitor: QEMU writes only valid QMP) is counted in
`/metrics` as the records count it."""

from __future__ import annotations

from pathlib import Path

from tests.support.daemon_harness import ANY_PORT, FAST_CONNECT, DaemonProcess, write_config
from tests.support.fake_qmp import FakeQmp
from tests.support.scrape import sample, scrape


async def test_decode_errors_are_counted_per_vm(tmp_path: Path, sock_dir: Path) -> None:
    """Two lines that are not QMP: two qmp_decode_error records, and
    qmpwatch_decode_errors_total{vm} says 2; the session goes on."""
    async with FakeQmp.serve(sock_dir / "bad.qmp") as fake:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "bad01", "socket": str(fake.path)}],
            sections={"daemon": {"metrics_listen": ANY_PORT}, "connect": FAST_CONNECT},
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="bad01")
            session = await fake.session(1)
            await session.send(b"not json\r\n[1, 2]\r\n")
            await daemon.wait_for("qmp_decode_error", vm="bad01", count=2)
            await session.event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
            await daemon.wait_for("qmp_event", vm="bad01", qmp="RESET")
            text = await scrape(daemon.metrics_port)
    assert sample(text, "qmpwatch_decode_errors_total", vm="bad01") == 2
    assert fake.connections == 1
