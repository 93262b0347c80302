"""The daemon's `Recorder` for one VM: its log lines, metrics, alert dispatcher and observers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from qmpwatch.core.alert import Alert
from qmpwatch.core.events import Event
from qmpwatch.core.times import iso_from_epoch
from qmpwatch.output.logs import RecordLogger, qmp_event_fields
from qmpwatch.service.metrics import Metrics
from qmpwatch.service.statestore import StateStore
from qmpwatch.service.status import RecordTap


class AlertSink(Protocol):
    """Where alerts go (the dispatcher); both calls return at once."""

    def fire(self, alert: Alert) -> None: ...

    def resolve(self, alert: Alert, now: float) -> None: ...


RecordObserver = Callable[[str, str, Mapping[str, Any], float], None]


@dataclass(frozen=True, slots=True)
class Services:
    """What every VM's session shares: the state store, alert sink and record observers."""

    store: StateStore
    alerts: AlertSink | None = None
    observe: RecordObserver | None = None  # (vm, kind, fields, now) of every record
    metrics: Metrics | None = None  # counts the records and events too
    # Told when a session comes up or ends and when an alert fires or resolves: what the
    # daemon's status line (VMs, connected, alerts firing) is made of.
    changed: Callable[[], None] | None = None
    restored: Mapping[str, list[Alert]] = field(default_factory=dict)  # firing at start-up
    tap: RecordTap | None = None  # copies VM records to `qmpwatch tail`


class DaemonRecorder:
    """One VM's records to the log, the metrics and the observers; its alerts to the
    dispatcher. What runs per event is looked up once, here."""

    def __init__(self, vm: str, services: Services) -> None:
        self._vm = vm
        self._records = RecordLogger(vm)
        self._services = services
        metrics = self._metrics = services.metrics
        self._observe = services.observe
        self._observe_record = metrics.observe_record if metrics is not None else None
        self._meter = metrics.event_meter(vm) if metrics is not None else None
        self._tap = services.tap

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None:
        self._records.record(kind, level, now, fields)
        if self._tap is not None and self._tap.active:
            self._follow(kind, level, now, fields)
        if self._observe_record is not None:
            self._observe_record(self._vm, kind, fields, now)
        if self._observe is not None:
            self._observe(self._vm, kind, fields, now)

    def qmp_event(self, event: Event, now: float) -> None:
        self._records.qmp_event(event, now)
        if self._tap is not None and self._tap.active:
            self._follow("qmp_event", "info", now, qmp_event_fields(event))
        if self._meter is not None:
            self._meter.observe(event, now)
        if self._observe is not None:
            self._observe(self._vm, "qmp_event", qmp_event_fields(event), now)

    def raise_alert(self, alert: Alert) -> None:
        if self._services.alerts is not None:
            self._services.alerts.fire(alert)
        self._changed()

    def resolve_alert(self, alert: Alert, now: float) -> None:
        if self._services.alerts is not None:
            self._services.alerts.resolve(alert, now)
        self._changed()

    def connected(self, connected: bool) -> None:
        if self._metrics is not None:
            self._metrics.set_connected(self._vm, connected)
        self._changed()

    def status(self, status: str | None) -> None:
        if self._metrics is not None:
            self._metrics.set_status(self._vm, status)

    def connect_failed(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.connect_failed(self._vm, reason)

    def _follow(self, kind: str, level: str, now: float, fields: Mapping[str, Any]) -> None:
        assert self._tap is not None
        record = {"timestamp": iso_from_epoch(now), "level": level, "event": kind, "vm": self._vm}
        record.update(fields)
        self._tap.offer(self._vm, record)

    def _changed(self) -> None:
        if self._services.changed is not None:
            self._services.changed()
