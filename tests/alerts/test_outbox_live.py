"""The alert outbox of the live daemon under pressure, with real QEMU pauses as the alerts:
a bound reached (alert_dropped, alert_outbox_over_capacity), owed alerts across a restart
(alert_outbox_resumed), a state directory whose file system fills and empties again
(alert_outbox_write_failed, state_store_unavailable, then *_recovered), and an Alertmanager
that goes away while an alert fires (alert_refresh_failed)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.service.test_remediate_qemu import fill, small_tmpfs
from tests.support.alertmanager import Alertmanager, alertmanager
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config

pytestmark = pytest.mark.qemu
__all__ = ["alertmanager"]  # the fixture


@contextmanager
def refused_url() -> Iterator[str]:
    """A URL whose port is held but not listening: every delivery is refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}/hook"


def config(tmp_path: Path, vm: LabVM, state: Path, alert: dict[str, Any], **arrays: Any) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=state,
        vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket)}],
        sections={"connect": FAST_CONNECT, "alert": alert},
        arrays=arrays,
    )


async def test_a_full_outbox_drops_resolutions_then_refuses_nothing_critical(
    tmp_path: Path, sock_dir: Path
) -> None:
    """outbox_max_entries = 1 and a sink that refuses: a resolution beyond the bound is
    dropped (alert_dropped); two critical pauses are kept beyond it
    (alert_outbox_over_capacity); a restart resumes them (alert_outbox_resumed)."""
    alert = {"outbox_max_entries": 1, "client_stop_severity": "critical"}
    with refused_url() as url:
        async with LabVM.start(LabSpec("box01"), sock_dir) as vm:
            cfg = config(tmp_path, vm, tmp_path / "state", alert,
                         **{"alert.webhook": [{"url": url}]})  # fmt: skip
            async with DaemonProcess.start(cfg) as daemon:
                await daemon.wait_for("vm_connected", vm="box01")
                await vm.stop()
                await daemon.wait_for("alert", vm="box01")
                await vm.cont()
                dropped = await daemon.wait_for("alert_dropped", vm="box01")
                await vm.stop()
                await daemon.wait_for("alert", vm="box01", count=2)
                over = await daemon.wait_for("alert_outbox_over_capacity")
            async with DaemonProcess.start(cfg) as again:
                resumed = again.find("alert_outbox_resumed")
    assert (dropped["status"], dropped["reason"]) == ("resolved", "outbox_full")
    assert (over["undelivered"], over["outbox_max_entries"]) == (2, 1)
    assert resumed
    assert resumed[0]["undelivered"] == 2


async def test_a_state_dir_that_fills_fails_writes_then_recovers(
    tmp_path: Path, sock_dir: Path
) -> None:
    """The state directory's file system is full: the outbox's and the state store's commits
    fail (alert_outbox_write_failed, state_store_unavailable; /healthz degraded); space is
    freed and the next commits work again (alert_outbox_recovered, state_store_recovered)."""
    async with small_tmpfs(tmp_path / "store", "1m") as store:
        with refused_url() as url:
            async with LabVM.start(LabSpec("full01"), sock_dir) as vm:
                cfg = config(tmp_path, vm, store / "state", {},
                             **{"alert.webhook": [{"url": url}]})  # fmt: skip
                async with DaemonProcess.start(cfg) as daemon:
                    await daemon.wait_for("vm_connected", vm="full01")
                    filler = await asyncio.to_thread(fill, store)
                    await vm.stop()
                    failed = await daemon.wait_for("alert_outbox_write_failed")
                    unavailable = await daemon.wait_for("state_store_unavailable")
                    await asyncio.to_thread(filler.unlink)
                    await vm.cont()
                    await daemon.wait_for("alert_outbox_recovered")
                    await daemon.wait_for("state_store_recovered")
    assert "full" in failed["error"]
    assert "full" in unavailable["error"]


async def test_an_alertmanager_gone_while_an_alert_fires_fails_the_refresh(
    tmp_path: Path, sock_dir: Path, alertmanager: Alertmanager
) -> None:
    """The firing alert reached Alertmanager; Alertmanager stops; the next re-post fails:
    alert_refresh_failed names the sink and how many alerts it could not confirm."""
    sink = {"url": alertmanager.url, "resend_interval_s": 0.5, "timeout_s": 2.0}
    async with LabVM.start(LabSpec("am01"), sock_dir) as vm:
        cfg = config(tmp_path, vm, tmp_path / "state", {}, **{"alert.alertmanager": [sink]})
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="am01")
            await vm.stop()
            await daemon.wait_for("alert_delivered", vm="am01")
            alertmanager.process.terminate()
            await alertmanager.process.wait()
            failed = await daemon.wait_for("alert_refresh_failed", timeout=30)
    assert failed["sink"] == "alertmanager[0]"
    assert failed["alerts"] == 1
    assert failed["error"]
