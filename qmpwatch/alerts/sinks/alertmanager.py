"""The Alertmanager sink: alerts through Alertmanager's API v2 (`POST /api/v2/alerts`).

Each alert becomes one Alertmanager alert (labels `alertname`, `vm`, `severity`, `host`),
re-posted while it fires so it does not expire, and posted with its `endsAt` when resolved,
as Prometheus does. docs/architecture.md ("Sinks") has the format and the rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from qmpwatch.alerts.links import NO_LINKS, Links
from qmpwatch.alerts.outbox import Entry
from qmpwatch.alerts.sinks import redact_url
from qmpwatch.alerts.sinks.http import HttpSink
from qmpwatch.alerts.sinks.payload import encode
from qmpwatch.core.alert import Alert
from qmpwatch.core.config import AlertmanagerConfig
from qmpwatch.core.times import iso_from_epoch

API_PATH = "/api/v2/alerts"
TTL_INTERVALS = 4  # a firing alert's endsAt is this many resend intervals ahead


def am_labels(alert: Alert, host: str) -> dict[str, str]:
    """Labels: the kind, VM, severity and host; and the storage of a disk alert, so that a
    route can group the VMs of one file system (`group_by: [storage]`)."""
    labels = {"alertname": alert.kind, "vm": alert.vm, "severity": alert.severity, "host": host}
    storage = alert.details.get("storage")
    if isinstance(storage, str) and storage:
        labels["storage"] = storage
    return labels


def am_annotations(alert: Alert, links: Links) -> dict[str, str]:
    lines = [alert.summary, f"cause: {alert.cause}"]
    lines.extend(f"{key}: {value}" for key, value in alert.details.items())
    notes = {
        "summary": alert.summary,
        "description": "\n".join(lines),
        "cause": alert.cause,
        "fingerprint": alert.fingerprint,
    }
    words = alert.details.get("crash_cause_words")
    if isinstance(words, str):  # vm_crashed: why QEMU died, for templates that show one line
        notes["crash_cause"] = words
    if runbook := links.runbook_url(alert.kind):
        notes["runbook_url"] = runbook
    return notes


def am_alert(alert: Alert, host: str, ends_at: float, links: Links = NO_LINKS) -> dict[str, Any]:
    """One element of the POST body."""
    posted = {
        "labels": am_labels(alert, host),
        "annotations": am_annotations(alert, links),
        "startsAt": iso_from_epoch(alert.raised_at),
        "endsAt": iso_from_epoch(max(ends_at, alert.raised_at)),
    }
    if links.generator_url:
        posted["generatorURL"] = links.generator_url
    return posted


def refresh_body(
    active: Sequence[Alert],
    resolved: Sequence[tuple[Alert, float]],
    *,
    host: str,
    ttl_end: float,
    links: Links = NO_LINKS,
) -> list[dict[str, Any]]:
    """What a refresh posts: every active alert with `endsAt` = `ttl_end`, then every recently
    resolved one (alert, when it ended) whose labels no active alert has (that would resolve
    the shared Alertmanager alert), the latest resolution per label set."""
    body = [am_alert(a, host, ttl_end, links) for a in active]
    firing = {tuple(am_labels(a, host).items()) for a in active}
    latest: dict[tuple[tuple[str, str], ...], tuple[Alert, float]] = {}
    for alert, at in resolved:
        labels = tuple(am_labels(alert, host).items())
        if labels not in firing and (labels not in latest or at >= latest[labels][1]):
            latest[labels] = (alert, at)
    body.extend(am_alert(a, host, at, links) for a, at in latest.values())
    return body


class AlertmanagerSink(HttpSink):
    """One `[[alert.alertmanager]]` (one member of a cluster)."""

    def __init__(
        self,
        index: int,
        config: AlertmanagerConfig,
        *,
        host: str,
        ident: str,
        active: Callable[[], Sequence[Alert]],
        resolved: Callable[[str, float], Sequence[tuple[Alert, float]]] = lambda _id, _now: (),
        clock: Callable[[], float] = time.time,
        links: Links = NO_LINKS,
    ) -> None:
        super().__init__()
        self.config = config
        self.host = host
        self.name = f"alertmanager[{index}]"
        self.sink_id = ident
        self.target = redact_url(config.url)
        self.timeout_s = config.timeout_s
        self.resend_interval_s: float | None = config.resend_interval_s
        self.url = config.url.rstrip("/") + API_PATH
        self._active = active
        self._resolved = resolved
        self._clock = clock
        self.links = links

    @staticmethod
    def identity(config: AlertmanagerConfig) -> tuple[str, ...]:
        return ("alertmanager", config.url.rstrip("/"))

    def body(self, entry: Entry, now: float) -> list[dict[str, Any]]:
        """What delivering `entry` posts."""
        alert = entry.alert
        ttl_end = now + TTL_INTERVALS * self.config.resend_interval_s
        if entry.status == "firing":
            return [am_alert(alert, self.host, ttl_end, self.links)]
        mine = am_labels(alert, self.host)
        same = [
            a
            for a in self._active()
            if a.fingerprint != alert.fingerprint and am_labels(a, self.host) == mine
        ]
        if same:
            return [am_alert(a, self.host, ttl_end, self.links) for a in same]
        return [am_alert(alert, self.host, entry.at, self.links)]

    async def deliver(self, entry: Entry) -> None:
        await self._post_alerts(self.body(entry, self._clock()))

    async def refresh(self, alerts: Sequence[Alert], now: float) -> None:
        ttl_end = now + TTL_INTERVALS * self.config.resend_interval_s
        resolved = self._resolved(self.sink_id, now)
        body = refresh_body(alerts, resolved, host=self.host, ttl_end=ttl_end, links=self.links)
        if body:
            await self._post_alerts(body)

    async def _post_alerts(self, body: list[dict[str, Any]]) -> None:
        headers = {"Content-Type": "application/json"}
        headers.update((name, secret.reveal()) for name, secret in self.config.headers.items())
        await self._post(self.url, encode(body), headers, self.config.headers.values())
