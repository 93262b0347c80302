"""The Alertmanager sink against a real Alertmanager (Debian's prometheus-alertmanager)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from qmpwatch.alerts.dispatch import AlertDispatcher
from qmpwatch.core.config import AlertConfig, AlertmanagerConfig
from tests.support.alert_fixtures import make_alert, running, wait_until
from tests.support.alertmanager import Alertmanager, alertmanager, running_alertmanager
from tests.support.ports import free_tcp_port

__all__ = ["alertmanager"]  # the fixture


def fast(*urls: str, resend_interval_s: float = 60.0) -> AlertConfig:
    return AlertConfig(
        alertmanager=tuple(
            AlertmanagerConfig(url, timeout_s=2.0, resend_interval_s=resend_interval_s)
            for url in urls
        ),
        retry_initial_s=0.05,
        retry_max_s=0.2,
    )


def _has(am: Alertmanager, **labels: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda alerts: bool(am.find(alerts, **labels))


def _lacks(am: Alertmanager, **labels: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda alerts: not am.find(alerts, **labels)


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_firing_alert_appears_with_labels_then_resolves(
    tmp_path: Path, alertmanager: Alertmanager
) -> None:
    """A fired alert is active in Alertmanager with alertname/vm/severity/host labels and
    summary/description annotations; after resolve it is no longer active."""
    dispatcher = AlertDispatcher(fast(alertmanager.url), tmp_path, host="hv03")
    alert = make_alert(vm="web01", raised_at=time.time() - 3)
    async with running(dispatcher):
        dispatcher.fire(alert)
        (found,) = await alertmanager.wait_for(lambda a: alertmanager.find(a, vm="web01"))
        assert found["labels"] == {
            "alertname": "vm_stopped_io_error",
            "vm": "web01",
            "severity": "critical",
            "host": "hv03",
        }
        notes = found["annotations"]
        assert notes["summary"] == alert.summary
        assert notes["description"].startswith(alert.summary)
        assert f"cause: {alert.cause}" in notes["description"]
        assert notes["fingerprint"] == alert.fingerprint
        assert found["status"]["state"] == "active"
        assert abs(epoch(found["startsAt"]) - alert.raised_at) < 0.01
        # endsAt is 4 resend intervals ahead, so it only expires if qmpwatch goes away
        assert epoch(found["endsAt"]) > time.time() + 200

        dispatcher.resolve(alert, time.time())
        await alertmanager.wait_for(lambda a: not alertmanager.find(a, vm="web01"))
        await wait_until(lambda: dispatcher.depth() == 0)


async def test_cluster_gets_every_alert(tmp_path: Path) -> None:
    """Several [[alert.alertmanager]] entries (a cluster): each member gets fire and resolve."""
    async with (
        running_alertmanager(tmp_path / "am1") as one,
        running_alertmanager(tmp_path / "am2") as two,
    ):
        dispatcher = AlertDispatcher(fast(one.url, two.url), tmp_path / "state", host="h")
        alert = make_alert(vm="db1", kind="vm_panicked")
        async with running(dispatcher):
            dispatcher.fire(alert)
            for am in (one, two):
                await am.wait_for(_has(am, vm="db1", alertname="vm_panicked"))
            dispatcher.resolve(alert, time.time())
            for am in (one, two):
                await am.wait_for(_lacks(am, vm="db1"))


async def test_firing_alerts_are_reposted_and_one_shots_expire(
    tmp_path: Path, alertmanager: Alertmanager
) -> None:
    """A resolvable alert is re-posted every resend interval, pushing its endsAt ahead, so
    it stays active; a one-shot alert (watchdog_fired) is not, and expires by itself."""
    dispatcher = AlertDispatcher(fast(alertmanager.url, resend_interval_s=0.25), tmp_path, host="h")
    stays = make_alert(vm="stays")
    once = make_alert(vm="once", kind="watchdog_fired", severity="warning", cause="WATCHDOG:x")
    async with running(dispatcher):
        dispatcher.fire(stays)
        dispatcher.fire(once)
        (first,) = await alertmanager.wait_for(lambda a: alertmanager.find(a, vm="stays"))
        ends = epoch(first["endsAt"])
        assert ends - time.time() <= 4 * 0.25 + 0.1
        # the one-shot expires (endsAt passes), while the other keeps being extended
        await alertmanager.wait_for(lambda a: not alertmanager.find(a, vm="once"), timeout=5)

        def extended(alerts: list[dict[str, Any]]) -> bool:
            found = alertmanager.find(alerts, vm="stays")
            return bool(found) and epoch(found[0]["endsAt"]) > ends + 0.5

        await alertmanager.wait_for(extended, timeout=5)


async def test_alertmanager_down_then_up_and_restarted(tmp_path: Path) -> None:
    """Posts to an Alertmanager that is not up yet are retried until it is; an Alertmanager
    that restarts empty gets the active alerts again (re-posted at the next interval)."""
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}"
    dispatcher = AlertDispatcher(fast(url, resend_interval_s=0.3), tmp_path / "state", host="h")
    alert = make_alert(vm="late")
    with capture_logs() as logs:
        async with running(dispatcher):
            dispatcher.fire(alert)
            await wait_until(
                lambda: any(r["event"] == "alert_delivery_failed" for r in logs),
                what="a failed post",
            )
            async with running_alertmanager(tmp_path / "am-a", port=port) as am:
                await am.wait_for(lambda a: am.find(a, vm="late"))
            # a fresh Alertmanager (no storage of the old one) on the same address
            async with running_alertmanager(tmp_path / "am-b", port=port) as am:
                await am.wait_for(lambda a: am.find(a, vm="late"))
    failed = next(r for r in logs if r["event"] == "alert_delivery_failed")
    assert failed["sink"] == "alertmanager[0]"
    assert failed["target"] == url
    assert "Connection refused" in failed["error"]


async def test_active_alerts_are_reposted_after_a_daemon_restart(
    tmp_path: Path, alertmanager: Alertmanager
) -> None:
    """A new dispatcher on the same state_dir re-posts the alerts still firing at once,
    and a resolution after the restart still resolves them."""
    config = fast(alertmanager.url, resend_interval_s=30)
    alert = make_alert(vm="kept")
    first = AlertDispatcher(config, tmp_path, host="h")
    async with running(first):
        first.fire(alert)
        await wait_until(lambda: first.depth() == 0)
    async with running_alertmanager(tmp_path / "fresh") as fresh:
        again = AlertDispatcher(fast(fresh.url, resend_interval_s=30), tmp_path, host="h")
        assert again.firing_alerts() == [alert]
        async with running(again):
            await fresh.wait_for(lambda a: fresh.find(a, vm="kept"))
            again.resolve(alert, time.time())
            await fresh.wait_for(lambda a: not fresh.find(a, vm="kept"))
        assert again.firing_alerts() == []


async def test_resolving_one_of_two_alerts_with_the_same_labels_keeps_it_firing(
    tmp_path: Path, alertmanager: Alertmanager
) -> None:
    """Alertmanager knows alerts by labels: while a second alert with the same labels is
    active, resolving the first does not resolve the Alertmanager alert."""
    dispatcher = AlertDispatcher(fast(alertmanager.url), tmp_path, host="h")
    drive0 = make_alert(vm="twin", cause="BLOCK_IO_ERROR:drive0")
    stop = make_alert(vm="twin", cause="STOP:io-error")
    async with running(dispatcher):
        dispatcher.fire(drive0)
        dispatcher.fire(stop)
        await alertmanager.wait_for(lambda a: alertmanager.find(a, vm="twin"))
        dispatcher.resolve(drive0, time.time())
        await wait_until(lambda: dispatcher.depth() == 0)
        (found,) = await alertmanager.wait_for(lambda a: alertmanager.find(a, vm="twin"))
        assert found["status"]["state"] == "active"
        dispatcher.resolve(stop, time.time())
        await alertmanager.wait_for(lambda a: not alertmanager.find(a, vm="twin"))
