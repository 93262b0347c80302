"""The versioned alert payload (version 1) of the webhook and exec sinks.

One JSON object per notification, with an `idempotency_key` receivers deduplicate on; keys may
be added within version 1. docs/architecture.md ("Sinks") shows the object.
"""

from __future__ import annotations

from typing import Any

import orjson

from qmpwatch.alerts.outbox import Entry
from qmpwatch.core.alert import resolved_summary
from qmpwatch.core.times import iso_from_epoch

VERSION = 1


def payload_v1(entry: Entry, host: str) -> dict[str, Any]:
    """The payload of one outbox entry."""
    alert = entry.alert
    return {
        "version": VERSION,
        "idempotency_key": entry.key,
        "status": entry.status,
        "fingerprint": alert.fingerprint,
        "kind": alert.kind,
        "severity": alert.severity,
        "vm": alert.vm,
        "host": host,
        "summary": alert.summary,
        "cause": alert.cause,
        "details": dict(alert.details),
        "startsAt": iso_from_epoch(alert.raised_at),
        "endsAt": iso_from_epoch(entry.at) if entry.status == "resolved" else None,
        "resolved_summary": (
            resolved_summary(alert.summary, str(alert.details.get("resolution", "")))
            if entry.status == "resolved"
            else None
        ),
    }


def encode(payload: Any) -> bytes:
    """JSON bytes, as sent (and signed)."""
    return orjson.dumps(payload, default=str)
