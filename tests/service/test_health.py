"""Health that tells the truth: `/healthz` degraded (and `qmpwatch_degraded{reason}`) when
alerts are not durable or a sink keeps failing, and connect failures counted as logged."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from qmpwatch.alerts.dispatch import AlertDispatcher, SinkFailing
from qmpwatch.core.config import AlertConfig, AlertmanagerConfig, ExecConfig
from qmpwatch.lab import LabSpec, LabVM
from qmpwatch.service.health import REASONS, degraded_reasons
from tests.support.alert_fixtures import make_alert, running, wait_until
from tests.support.daemon_harness import (
    ANY_PORT,
    FAST_CONNECT,
    DaemonProcess,
    lab_config,
    write_config,
)
from tests.support.ports import refusing_port
from tests.support.scrape import sample, scrape, wait_healthz

T0 = 1_700_000_000.0


def reasons(
    store: str | None = None,
    outbox: str | None = None,
    failing: dict[str, SinkFailing] | None = None,
    now: float = T0,
) -> dict[str, str]:
    return degraded_reasons(
        store_problem=store,
        outbox_problem=outbox,
        failing=failing or {},
        sink_failing_s=300.0,
        now=now,
    )


def test_nothing_wrong_is_not_degraded() -> None:
    """No store or outbox problem and no failing sink: no reason at all."""
    assert reasons() == {}


def test_store_and_outbox_problems_are_reasons() -> None:
    """A store that cannot write and an outbox that is not durable are reasons, with the why."""
    got = reasons(store="/s/state.sqlite3: disk I/O error", outbox="/s: cannot create")
    assert got == {
        "state_store_unavailable": "/s/state.sqlite3: disk I/O error",
        "alert_outbox_unavailable": "/s: cannot create",
    }
    assert set(got) <= set(REASONS)


def test_a_sink_is_failing_only_after_the_set_time() -> None:
    """A sink failing for less than `degraded_after_sink_failing_s` is not a reason yet; from
    then on it is, named with how long and its latest error (fake clock)."""
    failing = {
        "webhook[0]": SinkFailing(T0, "HTTP 500"),
        "alertmanager[0]": SinkFailing(T0 + 100, "cannot connect"),
    }
    assert reasons(failing=failing, now=T0 + 299.9) == {}
    assert reasons(failing=failing, now=T0 + 300) == {
        "sink_failing": "webhook[0] has failed every attempt for 300 s: HTTP 500"
    }
    assert reasons(failing=failing, now=T0 + 400) == {
        "sink_failing": "alertmanager[0] has failed every attempt for 300 s: cannot connect; "
        "webhook[0] has failed every attempt for 400 s: HTTP 500"
    }


async def test_dispatcher_knows_a_sink_failing_since_when_until_it_works(tmp_path: Path) -> None:
    """A real command that fails: the dispatcher keeps the time of its first failure (not the
    latest) and the latest error; the first attempt that works clears it."""
    flag = tmp_path / "receiver-up"
    config = AlertConfig(
        exec=(ExecConfig(("/bin/sh", "-c", f'test -e "{flag}" || {{ echo down >&2; exit 3; }}')),),
        retry_initial_s=0.05,
        retry_max_s=0.1,
    )
    dispatcher = AlertDispatcher(config, tmp_path / "state", host="h")
    async with running(dispatcher):
        dispatcher.fire(make_alert())
        first = await wait_until(lambda: dispatcher.failing.get("exec[0]"), what="a failure")
        assert first is not None
        since = first.since
        assert "down" in first.error
        await wait_until(lambda: dispatcher.outbox.attempts(dispatcher.sinks[0].sink_id, 1) >= 3)
        assert dispatcher.failing["exec[0]"].since == since
        flag.touch()
        await wait_until(lambda: dispatcher.depth() == 0, what="delivered")
        assert dispatcher.failing == {}


async def test_re_posts_with_nothing_to_post_do_not_count_as_the_sink_working(
    tmp_path: Path,
) -> None:
    """An Alertmanager nobody answers at and a one-shot alert: its delivery keeps failing, and
    the re-posts in between (nothing active to post) do not make the sink look fixed."""
    with refusing_port() as port:
        await _re_posts_do_not_count(tmp_path, f"http://127.0.0.1:{port}")


async def _re_posts_do_not_count(tmp_path: Path, url: str) -> None:
    config = AlertConfig(
        alertmanager=(AlertmanagerConfig(url, timeout_s=1.0, resend_interval_s=0.02),),
        retry_initial_s=0.1,
        retry_max_s=0.1,
    )
    dispatcher = AlertDispatcher(config, tmp_path / "state", host="h")
    sink_id = dispatcher.sinks[0].sink_id
    async with running(dispatcher):
        dispatcher.fire(make_alert(kind="watchdog_fired", severity="warning"))
        first = await wait_until(lambda: dispatcher.failing.get("alertmanager[0]"))
        assert first is not None
        seen: set[float | None] = set()

        def six_attempts() -> bool:  # polled: notes what `failing` says meanwhile
            failing = dispatcher.failing.get("alertmanager[0]")
            seen.add(None if failing is None else failing.since)
            return dispatcher.outbox.attempts(sink_id, 1) >= 6

        await wait_until(six_attempts, what="6 attempts")
        assert seen == {first.since}


async def test_outbox_commit_failing_makes_it_not_durable_until_one_works(tmp_path: Path) -> None:
    """The outbox's commit fails (the database is full): `durability_problem` says so; once a
    commit works again it is cleared and `alert_outbox_recovered` logged."""
    config = AlertConfig(exec=(ExecConfig(("/bin/false",)),), retry_initial_s=5, retry_max_s=5)
    dispatcher = AlertDispatcher(config, tmp_path, host="h")
    db = dispatcher.outbox._db
    assert db is not None
    assert dispatcher.durability_problem is None
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")  # not one page more: a full disk
    with capture_logs() as logs:
        for i in range(20):
            dispatcher.fire(make_alert(vm=f"vm{i}", details={"pad": "x" * 500}))
        dispatcher.outbox.flush()
        problem = dispatcher.durability_problem
        assert problem is not None
        assert "full" in problem
        assert str(tmp_path) in problem
        db.execute(f"PRAGMA max_page_count = {pages * 100}")
        dispatcher.fire(make_alert(vm="again"))
        dispatcher.outbox.flush()
    assert dispatcher.durability_problem is None
    assert [r["event"] for r in logs if r["event"].startswith("alert_outbox_")] == [
        "alert_outbox_write_failed",
        "alert_outbox_recovered",
    ]
    dispatcher.outbox.close()


def degraded(body: dict[str, object], *wanted: str) -> bool:
    found = body.get("degraded")
    return body["status"] == "degraded" and isinstance(found, dict) and set(found) == set(wanted)


async def test_unusable_state_dir_is_degraded_and_connect_failures_count_as_logged(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A real daemon whose state_dir is under a file: /healthz is 200 "degraded" naming the
    state store and the outbox, qmpwatch_degraded says the same. Its VM's socket is missing,
    then refuses: qmpwatch_connect_failures_total{vm,reason} counts every failed attempt the
    records count (`attempts`), by the records' reasons."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    path = sock_dir / "ghost.qmp"
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=blocker / "state",
        vms=[{"name": "ghost", "socket": str(path)}],
        sections={"daemon": {"metrics_listen": ANY_PORT}, "connect": FAST_CONNECT},
    )
    async with DaemonProcess.start(cfg) as daemon:
        port = daemon.metrics_port
        body = await wait_healthz(
            port, lambda b: degraded(b, "state_store_unavailable", "alert_outbox_unavailable")
        )
        assert body["http_status"] == 200
        assert "Not a directory" in body["degraded"]["state_store_unavailable"]
        assert str(blocker) in body["degraded"]["alert_outbox_unavailable"]
        text = await scrape(port)
        for reason in REASONS:
            want = 1 if reason in ("state_store_unavailable", "alert_outbox_unavailable") else 0
            assert sample(text, "qmpwatch_degraded", reason=reason) == want

        missing = await daemon.wait_for("vm_connect_failed", vm="ghost", reason="missing")
        assert missing["attempts"] == 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))  # a socket file nobody listens on: connect is refused
            refused = await daemon.wait_for("vm_connect_failed", vm="ghost", reason="refused")
            text = await scrape(port)
        failures = "qmpwatch_connect_failures_total"
        assert sample(text, failures, vm="ghost", reason="missing") == refused["attempts"] - 1
        assert sample(text, failures, vm="ghost", reason="refused") >= 1
        assert sample(text, "qmpwatch_reconnects_total", vm="ghost", reason="missing") == (
            refused["attempts"] - 1
        )
        assert await daemon.stop() == 0


@pytest.mark.qemu
async def test_a_sink_failing_too_long_is_degraded_until_it_delivers(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A real daemon watching a real QEMU, with an exec sink that fails: once the sink has
    failed for `degraded_after_sink_failing_s`, /healthz says degraded (sink_failing, naming
    the sink and its error) and so does the metric; when the command works again, ok."""
    flag = tmp_path / "receiver-up"
    command = ["/bin/sh", "-c", f'test -e "{flag}" || {{ echo pager down >&2; exit 3; }}']
    async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
        cfg = lab_config(
            tmp_path,
            vm,
            metrics_port=0,
            alert={
                "retry_initial_s": 0.05,
                "retry_max_s": 0.2,
                "degraded_after_sink_failing_s": 0.5,
            },
            arrays={"alert.exec": [{"command": command}]},
        )
        async with DaemonProcess.start(cfg) as daemon:
            port = daemon.metrics_port
            await daemon.wait_for("vm_connected", vm="web01")
            ok = await wait_healthz(port, lambda b: b["status"] == "ok")
            assert "degraded" not in ok
            await vm.stop()
            failed = await daemon.wait_for("alert_delivery_failed", vm="web01")
            assert failed["sink"] == "exec[0]"
            body = await wait_healthz(port, lambda b: degraded(b, "sink_failing"))
            assert body["http_status"] == 200
            assert body["degraded"]["sink_failing"].startswith("exec[0] has failed every attempt")
            assert "pager down" in body["degraded"]["sink_failing"]
            text = await scrape(port)
            assert sample(text, "qmpwatch_degraded", reason="sink_failing") == 1
            assert sample(text, "qmpwatch_degraded", reason="state_store_unavailable") == 0

            flag.touch()
            await daemon.wait_for("alert_delivered", vm="web01", sink="exec[0]")
            await wait_healthz(port, lambda b: b["status"] == "ok")
            text = await scrape(port)
            assert sample(text, "qmpwatch_degraded", reason="sink_failing") == 0
            assert await daemon.stop() == 0
