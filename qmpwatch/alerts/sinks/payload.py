"""The versioned alert payload (version 1) of the webhook and exec sinks.

One JSON object per notification; the webhook POSTs it, the exec sink writes it to the
command's standard input. Receivers should deduplicate on `idempotency_key`: a notification
is delivered at least once, and again only if qmpwatch could not learn that it arrived
(the attempt timed out, or the daemon died between the answer and recording it).

    {
      "version": 1,                      # bumped only for incompatible changes
      "idempotency_key": "9f2c…",        # 32 hex chars, unique per notification
      "status": "firing",                # or "resolved"
      "fingerprint": "3b1e5c0a9d7f2e41", # the alert's identity (VM + kind + cause)
      "kind": "vm_stopped_io_error",
      "severity": "critical",            # "critical" | "warning" | "info"
      "vm": "web01",
      "host": "hv03",
      "summary": "VM web01 paused: write error on drive0 (No space left on device)",
      "cause": "BLOCK_IO_ERROR:drive0",
      "details": {"device": "drive0", "operation": "write", ...},
      "startsAt": "2024-05-01T12:00:00.123456Z",
      "endsAt": null,                    # resolved: when it ended
      "resolved_summary": null           # resolved: "Resolved: <summary>; ended: <why>"
    }

Keys may be added within version 1; receivers must ignore keys they do not know.
"""

from __future__ import annotations

from typing import Any

import orjson

from qmpwatch.alerts.outbox import Entry
from qmpwatch.core.alert import resolved_summary
from qmpwatch.output.logs import iso_from_epoch

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
