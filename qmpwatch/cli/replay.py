"""`qmpwatch replay`: a captured QMP stream through the decoder and the watch core, offline.

QEMU's own timestamps are the clock, so the output is the same on every run. Lines that are
not valid QMP become `qmp_decode_error` records (timestamped with the last good time) and the
replay goes on. A `query-status` reply in the stream (`{"return": {"status": ...}}`) answers a
STOP that needs classifying; without one the STOP is classified with an unknown status.
Expectations still open at the end of the input are reported as `followup_open` records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from qmpwatch.core.alert import Alert
from qmpwatch.core.config import Config
from qmpwatch.core.errors import DecodeError
from qmpwatch.core.events import Control, Event, decode
from qmpwatch.core.watch import VmWatch
from qmpwatch.output.logs import RecordLogger


class ReplayOutput:
    """The WatchOutput of a replay: records go to the log, alerts go nowhere else."""

    def __init__(self, vm: str) -> None:
        self._records = RecordLogger(vm)
        self.wants_status = False

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None:
        self._records.record(kind, level, now, fields)

    def qmp_event(self, event: Event, now: float) -> None:
        self._records.qmp_event(event, now)

    def raise_alert(self, alert: Alert) -> None:
        pass

    def resolve_alert(self, alert: Alert, now: float) -> None:
        pass

    def query_status(self) -> None:
        self.wants_status = True

    def command(self, name: str, arguments: Mapping[str, Any]) -> None:
        pass  # a captured stream cannot be acted on


def replay(lines: Iterable[bytes], *, vm: str, no_shutdown: bool, config: Config) -> int:
    """Feed every line to a fresh watch; returns the number of events replayed."""
    out = ReplayOutput(vm)
    watch = VmWatch(
        vm,
        out,
        followup=config.followup,
        lifecycle=config.lifecycle,
        no_shutdown=no_shutdown,
        client_stop_severity=config.alert.client_stop_severity,
    )
    now = 0.0
    events = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            message = decode(line)
        except DecodeError as err:
            watch.on_decode_error(err, now)
            continue
        if isinstance(message, Control):
            result = message.body.get("return")
            if (
                out.wants_status
                and isinstance(result, dict)
                and isinstance(result.get("status"), str)
            ):
                out.wants_status = False
                watch.on_status(result["status"], now)
            continue
        now = max(now, message.time)
        if out.wants_status:
            out.wants_status = False
            watch.status_unknown(now, "no query-status reply in the stream")
        watch.on_event(message, now)
        events += 1
    if out.wants_status:
        watch.status_unknown(now, "no query-status reply in the stream")
    for expectation in watch.tracker.pending:
        rule = expectation.rule
        out.record(
            "followup_open",
            "warning",
            now,
            {
                "cause": rule.cause,
                "expected": rule.expected,
                "rule": rule.key,
                "deadline_s": rule.deadline_s,
                "open_ms": round((now - expectation.opened_at) * 1000, 3),
            },
        )
    return events
