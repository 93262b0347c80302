"""The Alertmanager sink: alerts through Alertmanager's API v2 (`POST /api/v2/alerts`).

Each alert becomes

    {"labels": {"alertname": <kind>, "vm": ..., "severity": ..., "host": ...},
     "annotations": {"summary": ..., "description": ..., "cause": ..., "fingerprint": ...},
     "startsAt": <raised>, "endsAt": <see below>}

Alertmanager identifies an alert by its labels. While an alert fires, qmpwatch posts it again
every `resend_interval_s` (and at startup) with `endsAt` = now + 4 intervals, as Prometheus
does: the alert stays active while qmpwatch confirms it, and expires by itself only if
qmpwatch stops doing so (its host died). A resolution posts `endsAt` = the time it ended,
unless another active alert of that VM has the same labels, which is then posted instead so
that the shared Alertmanager alert keeps firing. One-shot alerts (a watchdog that fired, a
missed follow-up) are never resolved by qmpwatch: they expire after the 4 intervals.

Several `[[alert.alertmanager]]` entries are several sinks: each member of an Alertmanager
cluster gets every alert, which is how its high availability works.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from qmpwatch.alerts.outbox import Entry
from qmpwatch.alerts.sinks import redact_url
from qmpwatch.alerts.sinks.http import HttpSink
from qmpwatch.alerts.sinks.payload import encode
from qmpwatch.core.alert import Alert
from qmpwatch.core.config import AlertmanagerConfig
from qmpwatch.output.logs import iso_from_epoch

API_PATH = "/api/v2/alerts"
TTL_INTERVALS = 4  # a firing alert's endsAt is this many resend intervals ahead


def am_labels(alert: Alert, host: str) -> dict[str, str]:
    return {"alertname": alert.kind, "vm": alert.vm, "severity": alert.severity, "host": host}


def am_annotations(alert: Alert) -> dict[str, str]:
    lines = [alert.summary, f"cause: {alert.cause}"]
    lines.extend(f"{key}: {value}" for key, value in alert.details.items())
    return {
        "summary": alert.summary,
        "description": "\n".join(lines),
        "cause": alert.cause,
        "fingerprint": alert.fingerprint,
    }


def am_alert(alert: Alert, host: str, ends_at: float) -> dict[str, Any]:
    """One element of the POST body."""
    return {
        "labels": am_labels(alert, host),
        "annotations": am_annotations(alert),
        "startsAt": iso_from_epoch(alert.raised_at),
        "endsAt": iso_from_epoch(max(ends_at, alert.raised_at)),
    }


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
        clock: Callable[[], float] = time.time,
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
        self._clock = clock

    @staticmethod
    def identity(config: AlertmanagerConfig) -> tuple[str, ...]:
        return ("alertmanager", config.url.rstrip("/"))

    def body(self, entry: Entry, now: float) -> list[dict[str, Any]]:
        """What delivering `entry` posts."""
        alert = entry.alert
        ttl_end = now + TTL_INTERVALS * self.config.resend_interval_s
        if entry.status == "firing":
            return [am_alert(alert, self.host, ttl_end)]
        mine = am_labels(alert, self.host)
        same = [
            a
            for a in self._active()
            if a.fingerprint != alert.fingerprint and am_labels(a, self.host) == mine
        ]
        if same:
            return [am_alert(a, self.host, ttl_end) for a in same]
        return [am_alert(alert, self.host, entry.at)]

    async def deliver(self, entry: Entry) -> None:
        await self._post_alerts(self.body(entry, self._clock()))

    async def refresh(self, alerts: Sequence[Alert], now: float) -> None:
        if alerts:
            ttl_end = now + TTL_INTERVALS * self.config.resend_interval_s
            await self._post_alerts([am_alert(a, self.host, ttl_end) for a in alerts])

    async def _post_alerts(self, body: list[dict[str, Any]]) -> None:
        headers = {"Content-Type": "application/json"}
        headers.update((name, secret.reveal()) for name, secret in self.config.headers.items())
        await self._post(self.url, encode(body), headers, self.config.headers.values())
