"""Alertmanager fed as Prometheus feeds it: resolved alerts re-posted for 15 minutes after the
resolution, `generatorURL`, and a `runbook_url` annotation, checked on a real Alertmanager."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.alerts.dispatch import RESOLVED_KEPT_MAX, RESOLVED_RETENTION_S, AlertDispatcher
from qmpwatch.alerts.links import Links
from qmpwatch.alerts.sinks.alertmanager import refresh_body
from qmpwatch.core.config import AlertConfig, AlertmanagerConfig
from qmpwatch.core.times import iso_from_epoch
from qmpwatch.lab import LabSpec, LabVM
from tests.support.alert_fixtures import Receiver, make_alert, receiving, running
from tests.support.alertmanager import Alertmanager, notifying, running_alertmanager
from tests.support.daemon_harness import DaemonProcess, lab_config
from tests.support.ports import free_tcp_port
from tests.support.scrape import get

T0 = 1_700_000_000.0
LINKS = Links("http://hv03:9752/healthz", "http://hv03:9752/runbooks/{kind}")


class Clock:
    """The wall clock plus an offset a test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def am_config(url: str, resend_interval_s: float = 60.0) -> AlertConfig:
    return AlertConfig(
        alertmanager=(AlertmanagerConfig(url, timeout_s=2.0, resend_interval_s=resend_interval_s),),
        retry_initial_s=0.05,
        retry_max_s=0.2,
    )


def test_refresh_posts_active_alerts_then_recent_resolutions() -> None:
    """A refresh posts each active alert with the TTL end, then each recently resolved one
    with its end, the latest per label set, never one whose labels an active alert has (that
    would resolve the shared Alertmanager alert); all with runbook_url and generatorURL."""
    active = make_alert(vm="web01", raised_at=T0)
    shares_labels = make_alert(vm="web01", raised_at=T0)  # another drive: same labels
    older = make_alert(vm="web02", raised_at=T0)
    newer = make_alert(vm="web02", raised_at=T0 + 5)
    body = refresh_body(
        [active],
        [(shares_labels, T0 + 1), (newer, T0 + 30), (older, T0 + 20)],
        host="hv03",
        ttl_end=T0 + 240,
        links=LINKS,
    )
    assert [(b["labels"]["vm"], b["endsAt"]) for b in body] == [
        ("web01", iso_from_epoch(T0 + 240)),
        ("web02", iso_from_epoch(T0 + 30)),
    ]
    assert body[1]["annotations"]["fingerprint"] == newer.fingerprint
    for posted in body:
        assert posted["generatorURL"] == "http://hv03:9752/healthz"
        assert posted["annotations"]["runbook_url"] == (
            "http://hv03:9752/runbooks/vm_stopped_io_error"
        )
    assert refresh_body([], [], host="hv03", ttl_end=T0) == []


def delivered_everything(dispatcher: AlertDispatcher) -> str:
    """Mark every owed notification delivered (as if the sink had them); the sink's id."""
    sink_id = dispatcher.sinks[0].sink_id
    for entry in dispatcher.outbox.entries():
        dispatcher.outbox.delivered(sink_id, entry.seq)
    return sink_id


def test_resolved_alerts_are_re_sent_for_15_minutes_only() -> None:
    """With a fake clock: a resolution is re-sent until 15 minutes after it and then forgotten;
    not while its notification is still owed; not after the alert fires again."""
    dispatcher = AlertDispatcher(am_config("http://127.0.0.1:9"), None, host="hv03")
    alert, again = make_alert(raised_at=T0), make_alert(vm="web02", raised_at=T0)
    sink_id = dispatcher.sinks[0].sink_id
    for a in (alert, again):
        dispatcher.fire(a)
        dispatcher.resolve(a, T0 + 10)
    assert dispatcher.recently_resolved(sink_id, T0 + 11) == []  # owed: delivered in order
    delivered_everything(dispatcher)
    assert dispatcher.recently_resolved(sink_id, T0 + 11) == [(alert, T0 + 10), (again, T0 + 10)]
    dispatcher.fire(again)  # firing again: no longer resolved
    delivered_everything(dispatcher)
    later = T0 + 10 + RESOLVED_RETENTION_S
    assert RESOLVED_RETENTION_S == 900
    assert dispatcher.recently_resolved(sink_id, later) == [(alert, T0 + 10)]
    assert dispatcher.recently_resolved(sink_id, later + 0.001) == []
    assert dispatcher.recently_resolved(sink_id, T0 + 11) == []  # forgotten for good


def test_resolutions_kept_are_bounded() -> None:
    """At most RESOLVED_KEPT_MAX resolutions are kept for re-sending; the oldest go first."""
    dispatcher = AlertDispatcher(am_config("http://127.0.0.1:9"), None, host="hv03")
    alerts = [make_alert(vm=f"vm{i}", raised_at=T0) for i in range(RESOLVED_KEPT_MAX + 2)]
    for i, a in enumerate(alerts):
        dispatcher.resolve(a, T0 + i / 100)
    sink_id = delivered_everything(dispatcher)
    kept = dispatcher.recently_resolved(sink_id, T0 + 20)
    assert [a for a, _ in kept] == alerts[2:]


def notifications(hook: Receiver, status: str, vm: str) -> list[dict[str, Any]]:
    """The alerts of `vm` that Alertmanager's notifications to `hook` called `status`."""
    return [
        a
        for r in hook.requests
        for a in r.json()["alerts"]
        if a["status"] == status and a["labels"].get("vm") == vm
    ]


async def test_alertmanager_shows_the_resolution_with_runbook_and_generator(
    tmp_path: Path,
) -> None:
    """A real Alertmanager holds the firing alert with its runbook_url annotation and
    generatorURL, and after the resolution notifies it as resolved, annotations intact."""
    async with (
        receiving() as hook,
        running_alertmanager(tmp_path / "am", config=notifying(hook.url)) as am,
    ):
        dispatcher = AlertDispatcher(am_config(am.url), tmp_path / "s", host="hv03", links=LINKS)
        alert = make_alert(vm="web01", raised_at=time.time() - 3)
        async with running(dispatcher):
            dispatcher.fire(alert)
            (found,) = await am.wait_for(lambda a: am.find(a, vm="web01"))
            assert found["generatorURL"] == "http://hv03:9752/healthz"
            runbook = "http://hv03:9752/runbooks/vm_stopped_io_error"
            assert found["annotations"]["runbook_url"] == runbook
            await hook.wait_for(lambda h: notifications(h, "firing", "web01"), timeout=10)
            dispatcher.resolve(alert, time.time())
            (resolved,) = await hook.wait_for(
                lambda h: notifications(h, "resolved", "web01"), timeout=10, what="resolved"
            )
    assert resolved["annotations"]["runbook_url"] == runbook
    assert resolved["annotations"]["summary"] == alert.summary
    assert resolved["generatorURL"] == "http://hv03:9752/healthz"
    assert resolved["labels"]["alertname"] == "vm_stopped_io_error"


async def received_at_least(am: Alertmanager, status: str, count: float) -> float:
    """Wait until `am` has been posted `count` alerts of `status`; how many it has."""
    got = 0.0
    try:
        async with asyncio.timeout(10):
            while (got := await am.received(status)) < count:  # noqa: ASYNC110 - remote
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"Alertmanager got {got} {status} alerts, not {count}, within 10 s")
    return got


async def test_a_real_alertmanager_gets_the_resolution_again_for_15_minutes(
    tmp_path: Path,
) -> None:
    """Refreshes (every 0.1 s here) post the resolved alert again, as resolved, to a real
    Alertmanager (its own alerts_received_total counts them); once the clock is 15 minutes
    past the resolution they stop, while the firing alert's refreshes go on."""
    clock = Clock()
    async with running_alertmanager(tmp_path / "am") as am:
        config = am_config(am.url, resend_interval_s=0.1)
        dispatcher = AlertDispatcher(config, tmp_path / "s", host="hv03", clock=clock)
        firing, gone = make_alert(vm="web02"), make_alert(vm="web01")
        async with running(dispatcher):
            dispatcher.fire(firing)
            dispatcher.fire(gone)
            await am.wait_for(lambda a: am.find(a, vm="web01"))
            dispatcher.resolve(gone, clock())
            await received_at_least(am, "resolved", 3)  # the resolution, then 2 re-sends
            assert not am.find(await am.alerts(), vm="web01")
            assert am.find(await am.alerts(), vm="web02")

            clock.offset += RESOLVED_RETENTION_S + 1
            refreshes = await am.received("firing")
            # one post may have left before the jump; the one after it is surely later
            await received_at_least(am, "firing", refreshes + 2)
            resolved = await am.received("resolved")
            await received_at_least(am, "firing", refreshes + 5)
            assert await am.received("resolved") == resolved


def runbook_of(found: list[dict[str, Any]]) -> str:
    url: str = found[0]["annotations"]["runbook_url"]
    return url


@pytest.mark.qemu
async def test_daemon_links_its_alerts_to_its_own_runbooks(tmp_path: Path, sock_dir: Path) -> None:
    """A real daemon, QEMU and Alertmanager: a client stop reaches Alertmanager with a
    runbook_url and a generatorURL on the daemon's endpoint (by default, from alert.host and
    metrics_listen), both answer, and the resume is notified as resolved."""
    port = free_tcp_port()
    async with (
        receiving() as hook,
        running_alertmanager(tmp_path / "am", config=notifying(hook.url)) as am,
        LabVM.start(LabSpec(name="web01"), sock_dir) as vm,
    ):
        cfg = lab_config(
            tmp_path,
            vm,
            metrics_port=port,
            alert={"host": "127.0.0.1", "retry_initial_s": 0.05, "retry_max_s": 0.2},
            arrays={"alert.alertmanager": [{"url": am.url, "timeout_s": 2.0}]},
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="web01")
            await vm.stop()
            found = await am.wait_for(lambda a: am.find(a, vm="web01"))
            base = f"http://127.0.0.1:{port}"
            assert runbook_of(found) == f"{base}/runbooks/vm_stopped_unexpected"
            assert found[0]["generatorURL"] == f"{base}/healthz"
            status, text = await get(port, "/runbooks/vm_stopped_unexpected")
            assert (status, text.splitlines()[0]) == (200, "# vm_stopped_unexpected")
            assert (await get(port, "/healthz"))[0] == 200
            await vm.cont()
            (resolved,) = await hook.wait_for(
                lambda h: notifications(h, "resolved", "web01"), timeout=10, what="resolved"
            )
            assert resolved["annotations"]["runbook_url"] == runbook_of(found)
            assert await daemon.stop() == 0
