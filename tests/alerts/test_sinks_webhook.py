"""The webhook sink and the dispatcher, against a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from qmpwatch.alerts.dispatch import AlertDispatcher, idempotency_key
from qmpwatch.alerts.outbox import DB_NAME
from qmpwatch.alerts.sinks.webhook import SIGNATURE_HEADER
from qmpwatch.core.alert import resolved_because
from qmpwatch.core.backoff import Backoff
from qmpwatch.core.config import AlertConfig, WebhookConfig, parse_config
from tests.support.alert_fixtures import (
    Receiver,
    make_alert,
    receiving,
    running,
    wait_until,
)
from tests.support.ports import free_tcp_port

TOKEN = "tok-3f9a1c-very-secret"
HMAC_KEY = "hmac-key-77c2-very-secret"
FIXTURES = Path(__file__).parent.parent / "support" / "alert_fixtures.py"


def fast(*webhooks: WebhookConfig, **kwargs: Any) -> AlertConfig:
    """An AlertConfig with quick retries for tests."""
    return AlertConfig(webhook=webhooks, retry_initial_s=0.05, retry_max_s=0.2, **kwargs)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as r:
        yield r


async def test_delivers_signed_versioned_payload(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A firing and a resolved alert arrive as version-1 JSON, signed over the exact body,
    with the configured secret headers and an idempotency key."""
    monkeypatch.setenv("HOOK_TOKEN", TOKEN)
    (tmp_path / "hmac").write_text(HMAC_KEY + "\n")
    config = parse_config(
        {
            "alert": {
                "host": "hv03",
                "webhook": [
                    {
                        "url": receiver.url,
                        "headers": {"Authorization": "env:HOOK_TOKEN"},
                        "hmac_secret": f"file:{tmp_path / 'hmac'}",
                    }
                ],
            }
        }
    ).alert
    dispatcher = AlertDispatcher(config, tmp_path / "state", host=config.host)
    alert = make_alert(raised_at=1714564800.123456)
    async with running(dispatcher):
        dispatcher.fire(alert)
        await receiver.wait_for(lambda r: len(r.delivered) == 1)
        dispatcher.resolve(resolved_because(alert, "the VM resumed (RESUME)"), 1714564805.5)
        await receiver.wait_for(lambda r: len(r.delivered) == 2)
        await wait_until(lambda: dispatcher.depth() == 0, what="outbox empty")

    firing, resolved = receiver.delivered
    for request in (firing, resolved):
        expected = hmac.new(HMAC_KEY.encode(), request.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers[SIGNATURE_HEADER], f"sha256={expected}")
        assert request.headers["Authorization"] == TOKEN
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["Idempotency-Key"] == request.json()["idempotency_key"]
    assert firing.json() == {
        "version": 1,
        "idempotency_key": idempotency_key("hv03", alert, "firing", alert.raised_at),
        "status": "firing",
        "fingerprint": alert.fingerprint,
        "kind": "vm_stopped_io_error",
        "severity": "critical",
        "vm": "web01",
        "host": "hv03",
        "summary": alert.summary,
        "cause": alert.cause,
        "details": {"device": "drive0", "operation": "write"},
        "startsAt": "2024-05-01T12:00:00.123456Z",
        "endsAt": None,
        "resolved_summary": None,
    }
    body = resolved.json()
    assert body["status"] == "resolved"
    assert body["endsAt"] == "2024-05-01T12:00:05.500000Z"
    assert body["summary"] == alert.summary  # as it fired: keys keep their meaning
    assert body["resolved_summary"] == (
        f"Resolved: {alert.summary}; ended: the VM resumed (RESUME)"
    )
    assert body["details"]["resolution"] == "the VM resumed (RESUME)"
    assert body["fingerprint"] == alert.fingerprint
    assert body["idempotency_key"] != firing.json()["idempotency_key"]


async def test_retries_while_receiver_answers_500(tmp_path: Path) -> None:
    """500 answers are retried with growing, capped backoff until a 2xx; each failure is
    an `alert_delivery_failed` record; a secret never appears in any record."""
    async with receiving(fail_first=3) as receiver:
        config = fast(
            WebhookConfig(
                receiver.url, headers={"X-Token": _secret(TOKEN)}, hmac_secret=_secret(HMAC_KEY)
            )
        )
        dispatcher = AlertDispatcher(config, tmp_path, host="h")
        alert = make_alert()
        with capture_logs() as logs:
            async with running(dispatcher):
                dispatcher.fire(alert)
                await receiver.wait_for(lambda r: len(r.delivered) == 1, what="delivery")
                await wait_until(lambda: dispatcher.depth() == 0)
    failed = [r for r in logs if r["event"] == "alert_delivery_failed"]
    assert [r["attempt"] for r in failed] == [1, 2, 3]
    for record in failed:
        assert record["sink"] == "webhook[0]"
        assert record["target"] == f"http://127.0.0.1:{receiver.port}"
        assert record["error"] == "HTTP 500 Internal Server Error: receiver broken on purpose"
        assert 0 < record["retry_in_s"] <= 0.2
        assert record["vm"] == alert.vm
        assert record["alert"] == alert.kind
    delivered = [r for r in logs if r["event"] == "alert_delivered"]
    assert [(r["attempt"], r["status"]) for r in delivered] == [(4, "firing")]
    assert len({r.json()["idempotency_key"] for r in receiver.requests}) == 1
    assert TOKEN not in repr(logs)
    assert HMAC_KEY not in repr(logs)


async def test_receiver_down_then_back(tmp_path: Path) -> None:
    """While nothing listens, attempts fail and back off; once the receiver is up every
    alert arrives once, in order per alert; URL path and query never reach the log."""
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}/hook/path-secret-91?token=query-secret-42"
    dispatcher = AlertDispatcher(fast(WebhookConfig(url)), tmp_path, host="h")
    alerts = [make_alert(vm=f"vm{i}") for i in range(3)]
    with capture_logs() as logs:
        async with running(dispatcher):
            for alert in alerts:
                dispatcher.fire(alert)
            dispatcher.resolve(alerts[0], time.time())

            def failures() -> int:
                return sum(r["event"] == "alert_delivery_failed" for r in logs)

            await wait_until(lambda: failures() >= 3, what="three failed attempts")
            attempts_while_down = failures()
            async with receiving(port=port) as receiver:
                await receiver.wait_for(lambda r: len(r.delivered) == 4, timeout=5)
                await wait_until(lambda: dispatcher.depth() == 0)
    failed = [r for r in logs if r["event"] == "alert_delivery_failed"]
    assert failed[0]["error"] == f"cannot connect to http://127.0.0.1:{port}: Connection refused"
    assert "secret" not in repr(logs)
    # the sink backs off as a whole: not one attempt per queued alert per interval
    assert attempts_while_down <= 6
    bodies = [r.json() for r in receiver.delivered]
    assert sorted(b["vm"] for b in bodies if b["status"] == "firing") == ["vm0", "vm1", "vm2"]
    vm0 = [b["status"] for b in bodies if b["vm"] == "vm0"]
    assert vm0 == ["firing", "resolved"]
    assert len({b["idempotency_key"] for b in bodies}) == 4


async def test_hanging_receiver_hits_the_attempt_timeout(tmp_path: Path) -> None:
    """A receiver that never answers costs one attempt timeout, then the retry delivers."""
    async with receiving(hang_first=1) as receiver:
        config = fast(WebhookConfig(receiver.url, timeout_s=0.3))
        dispatcher = AlertDispatcher(config, tmp_path, host="h")
        with capture_logs() as logs:
            async with running(dispatcher):
                started = time.monotonic()
                dispatcher.fire(make_alert())
                await receiver.wait_for(lambda r: len(r.delivered) == 1)
                took = time.monotonic() - started
    failed = [r for r in logs if r["event"] == "alert_delivery_failed"]
    assert [r["error"] for r in failed] == ["timed out after 0.3 s"]
    assert 0.3 <= took < 2.0


async def test_intake_never_waits_on_a_sink(tmp_path: Path) -> None:
    """fire() returns at once while the receiver hangs; everything waits in the outbox."""
    async with receiving(mode="hang") as receiver:
        dispatcher = AlertDispatcher(
            fast(WebhookConfig(receiver.url, timeout_s=30)), tmp_path, host="h"
        )
        async with running(dispatcher, close_s=0.2):
            dispatcher.fire(make_alert())
            await receiver.wait_for(lambda r: len(r.requests) == 1, what="hung request")
            started = time.monotonic()
            for i in range(200):
                dispatcher.fire(make_alert(vm=f"vm{i}"))
            assert time.monotonic() - started < 1.0
            assert dispatcher.depth() == 201


async def test_shutdown_deadline_keeps_undelivered_for_next_start(tmp_path: Path) -> None:
    """aclose() gives up at its deadline even mid-attempt; a new dispatcher on the same
    state_dir delivers what was left."""
    async with receiving(mode="hang") as receiver:
        config = fast(WebhookConfig(receiver.url, timeout_s=30))
        dispatcher = AlertDispatcher(config, tmp_path, host="h")
        with capture_logs() as logs:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(dispatcher.run())
                dispatcher.fire(make_alert(vm="a"))
                dispatcher.fire(make_alert(vm="b"))
                await receiver.wait_for(lambda r: len(r.requests) == 1)
                started = time.monotonic()
                await dispatcher.aclose(0.3)
                took = time.monotonic() - started
                await task
        assert 0.25 <= took < 1.5
        stopped = [r for r in logs if r["event"] == "alert_dispatcher_stopped"]
        assert stopped[0]["undelivered"] == 2
        failed = [r for r in logs if r["event"] == "alert_delivery_failed"]
        assert failed[0]["error"] == "stopped: the daemon is shutting down"
        receiver.mode = "ok"
        again = AlertDispatcher(config, tmp_path, host="h")
        async with running(again):
            await receiver.wait_for(lambda r: len(r.delivered) == 2)
            await wait_until(lambda: again.depth() == 0)
    assert sorted(r.json()["vm"] for r in receiver.delivered) == ["a", "b"]


async def test_unusable_state_dir_degrades_to_memory(tmp_path: Path) -> None:
    """A state_dir in use by another daemon (or unusable) does not stop alerting: the
    dispatcher delivers from memory and says why."""
    async with receiving() as receiver:
        config = fast(WebhookConfig(receiver.url))
        first = AlertDispatcher(config, tmp_path, host="h")
        with capture_logs() as logs:
            second = AlertDispatcher(config, tmp_path, host="h")
        assert second.problem is not None
        assert "in use by another process" in second.problem
        assert [r["event"] for r in logs] == ["alert_outbox_unavailable"]
        async with running(second):
            second.fire(make_alert())
            await receiver.wait_for(lambda r: len(r.delivered) == 1)
        await first.aclose(0)
        assert first.problem is None


def test_backoff_doubles_capped_and_jittered() -> None:
    """attempt n waits initial*2^(n-1), capped, times a factor in [0.5, 1]."""
    top = Backoff(1.0, 10.0, rng=lambda: 1.0)
    low = Backoff(1.0, 10.0, rng=lambda: 0.0)
    assert [top.delay(n) for n in (1, 2, 3, 4, 5, 100)] == [1, 2, 4, 8, 10, 10]
    assert [low.delay(n) for n in (1, 2, 5)] == [0.5, 1, 5]


@pytest.mark.parametrize("failure", ["500", "down"])
async def test_sigkill_with_pending_alerts_delivers_each_once_after_restart(
    tmp_path: Path, failure: str
) -> None:
    """A daemon killed with SIGKILL while alerts are pending delivers them after restart,
    exactly once per receiver: the healthy receiver gets nothing again, the one that was
    failing (500, or not listening) gets each alert once."""
    count = 5
    state = tmp_path / "state"
    down_port = free_tcp_port()
    async with receiving() as healthy, receiving(mode="fail") as failing:
        broken_url = failing.url if failure == "500" else f"http://127.0.0.1:{down_port}/hook"
        first = await _child(state, count, healthy.url, broken_url)
        try:
            await first.wait_for(lambda r: _delivered(r, "webhook[0]") == count)
            await first.wait_for(
                lambda r: any(x["event"] == "alert_delivery_failed" for x in r), what="a failure"
            )
            first.process.send_signal(signal.SIGKILL)
            assert await first.process.wait() == -signal.SIGKILL
        finally:
            await first.close()
        assert len(healthy.delivered) == count
        assert failing.delivered == []

        failing.mode = "ok"
        revived = None
        if failure == "down":
            revived = Receiver(port=down_port)
            await revived.start()
        target = failing if revived is None else revived
        second = await _child(state, 0, healthy.url, broken_url)
        try:
            resumed = await second.wait_for(
                lambda r: [x for x in r if x["event"] == "alert_outbox_resumed"]
            )
            assert resumed[0]["undelivered"] == count
            await second.wait_for(lambda r: _delivered(r, "webhook[1]") == count)
            second.process.send_signal(signal.SIGTERM)
            assert await second.process.wait() == 0
        finally:
            await second.close()
            if revived is not None:
                await revived.stop()

    for receiver in (healthy, target):
        keys = [r.json()["idempotency_key"] for r in receiver.delivered]
        assert len(keys) == count
        assert len(set(keys)) == count
    assert {r.json()["idempotency_key"] for r in healthy.delivered} == {
        r.json()["idempotency_key"] for r in target.delivered
    }
    with sqlite3.connect(state / DB_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM entry").fetchone()[0] == 0


# -- helpers -----------------------------------------------------------------------------


def _secret(value: str) -> Any:
    from qmpwatch.core.config import Secret

    return Secret("inline", value)


def _delivered(records: list[dict[str, Any]], sink: str) -> int:
    return sum(r["event"] == "alert_delivered" and r["sink"] == sink for r in records)


class _Child:
    """The daemon stand-in (tests/support/alert_fixtures.py run as a script) and its log records."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.records: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.records.append(orjson.loads(line))
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, condition: Any, timeout: float = 10.0, what: str = "") -> Any:
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    return await self._changed.wait_for(lambda: condition(self.records))
        except TimeoutError:
            pytest.fail(f"child: {what or 'condition'} not met; records: {self.records}")

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await self._reader


async def _child(state: Path, count: int, *urls: str) -> _Child:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(FIXTURES),
        str(state),
        str(count),
        *urls,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    return _Child(process)


def test_urls_and_secrets_are_blanked_for_logs() -> None:
    """Targets keep scheme, host and port only; error texts lose URL paths, queries,
    passwords and secret values."""
    from qmpwatch.alerts.sinks import redact_url, scrub
    from qmpwatch.core.config import Secret

    url = "https://bot:pw-9@hooks.example:8443/services/T0/B0/XyZsecret?token=q-secret"
    assert redact_url(url) == "https://hooks.example:8443"
    assert redact_url("http://[::1]:9093/") == "http://[::1]:9093"
    text = f"failed POST {url}; also /services/T0/B0/XyZsecret and hdr-value-1"
    shown = scrub(text, [Secret("env:X", "hdr-value-1")], url)
    assert "XyZsecret" not in shown
    assert "q-secret" not in shown
    assert "pw-9" not in shown
    assert "hdr-value-1" not in shown
    assert "https://hooks.example:8443" in shown


async def test_host_defaults_to_config_then_hostname(tmp_path: Path) -> None:
    """An empty host falls back to alert.host, then to the machine's hostname."""
    import socket

    by_config = AlertDispatcher(AlertConfig(host="cfg-host"), tmp_path / "a", host="")
    by_name = AlertDispatcher(AlertConfig(), tmp_path / "b", host="")
    assert by_config.host == "cfg-host"
    assert by_name.host == socket.gethostname()
    await by_config.aclose(0)
    await by_name.aclose(0)


async def test_a_webhook_host_name_is_looked_up_in_the_sinks_own_lane(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A webhook URL with a host name (localhost) is resolved in the sink's own lane, not
    asyncio's default executor, and delivered."""
    url = receiver.url.replace("127.0.0.1", "localhost")
    dispatcher = AlertDispatcher(fast(WebhookConfig(url)), tmp_path, host="h")
    used: list[str] = []
    loop = asyncio.get_running_loop()
    original = loop.getaddrinfo

    async def spy(*args: Any, **kwargs: Any) -> Any:
        used.append(str(args[0]))
        return await original(*args, **kwargs)

    loop.getaddrinfo = spy  # type: ignore[method-assign]
    try:
        async with running(dispatcher):
            dispatcher.fire(make_alert())
            await receiver.wait_for(lambda r: r.delivered)
    finally:
        del loop.getaddrinfo
    assert "localhost" not in used
