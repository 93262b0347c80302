"""Prometheus metrics: counters derived from the core's log records, plus a few setters.

`Metrics.observe_record` takes every record a `WatchOutput` writes, so the numbers and the log
cannot disagree; events are counted by a per-VM `EventMeter` that touches no prometheus-client
object. Each instance has its own registry; event loop only. docs/architecture.md ("Metrics")
lists the series.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from qmpwatch import __version__
from qmpwatch.core.events import Event

# Event lag: QEMU stamps an event when it emits it; the daemon normally processes it within
# a millisecond, a busy loop in tens of milliseconds; seconds mean the loop is in trouble.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

UNKNOWN_STATUS = "unknown"  # the status label while it is not known (None in the core)


class _LagHistogram(Collector):
    """The event-lag histogram, kept as plain numbers: one `bisect` and two adds per event.

    prometheus-client's Histogram takes a lock per bucket and per sum; this one runs on the
    event loop only, so it needs none, and costs a fraction of that on the per-event path.
    """

    name = "qmpwatch_event_lag_seconds"
    documentation = "Delay from QEMU's event timestamp to qmpwatch processing the event."

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterable[Metric]:
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((_bound_text(bound), cumulative))
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self.sum
        )


class EventMeter:
    """One VM's share of the per-event metrics: its event counts and the shared lag histogram.

    The daemon holds one per VM and calls `observe` for every event it logs; that is the whole
    per-event cost of the metrics (a dict add, a `bisect` and two float adds). No locks: the
    event loop is the only caller.
    """

    __slots__ = ("_bounds", "_lag", "_lag_counts", "counts")

    def __init__(self, lag: _LagHistogram) -> None:
        self.counts: dict[str, int] = {}  # event name -> events
        self._lag = lag
        self._bounds = lag.bounds
        self._lag_counts = lag.counts

    def observe(self, event: Event, now: float) -> None:
        """`event` (QEMU stamped it at `event.time`) was received at `now`."""
        counts = self.counts
        name = event.name
        counts[name] = counts.get(name, 0) + 1
        lag = now - event.seconds - event.microseconds * 1e-6
        lag = lag if lag > 0.0 else 0.0  # below 0: the host clock stepped back
        self._lag_counts[bisect.bisect_left(self._bounds, lag)] += 1  # _LagHistogram.observe
        self._lag.sum += lag


class _StatusGauges(Collector):
    """`qmpwatch_vm_status{vm,status}` and `qmpwatch_vm_running{vm}`, from one dict.

    One series per VM, whose `status` label moves with the status: kept as vm -> status and
    rendered at scrape time, so a VM pausing and resuming in a storm costs a dict store each
    time (prometheus-client's Gauge would remove and re-create a labelled child).
    """

    def __init__(self) -> None:
        self.status_of_vm: dict[str, str] = {}

    def collect(self) -> Iterable[Metric]:
        status = GaugeMetricFamily(
            "qmpwatch_vm_status",
            "The VM's current run status (query-status word, or unknown) as a label; always 1.",
            labels=["vm", "status"],
        )
        running = GaugeMetricFamily(
            "qmpwatch_vm_running", "1 while the VM's run status is running.", labels=["vm"]
        )
        for vm, word in list(self.status_of_vm.items()):
            status.add_metric([vm, word], 1)
            running.add_metric([vm], 1 if word == "running" else 0)
        yield status
        yield running


class _ProtectionGaps(Collector):
    """`qmpwatch_vm_protection_gap{vm,gap}`: 1 for each gap the VM's latest `vm_protection`
    record named; a gap closed (or silenced) has no series."""

    def __init__(self) -> None:
        self.gaps_of_vm: dict[str, tuple[str, ...]] = {}

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "qmpwatch_vm_protection_gap",
            "1 for each protection gap of the VM (a failure QEMU would not report).",
            labels=["vm", "gap"],
        )
        for vm, gaps in list(self.gaps_of_vm.items()):
            for gap in gaps:
                family.add_metric([vm, gap], 1)
        yield family


# (vm, why it is paused or None while it runs, alerts firing), one per watched VM
VmView = tuple[str, str | None, int]


class _VmViews(Collector):
    """`qmpwatch_vm_pause_reason{vm,reason}` and `qmpwatch_vm_alerts_firing{vm}`, read from the
    sessions at scrape time (`Metrics.vms_from`)."""

    def __init__(self) -> None:
        self.views: Callable[[], list[VmView]] = list

    def collect(self) -> Iterable[Metric]:
        paused = GaugeMetricFamily(
            "qmpwatch_vm_pause_reason",
            "1 while the VM is stopped, with why as a label (nospace, io-error, watchdog, "
            "guest-panicked, client, shutdown, or another run status).",
            labels=["vm", "reason"],
        )
        firing = GaugeMetricFamily(
            "qmpwatch_vm_alerts_firing", "Alerts firing for the VM now.", labels=["vm"]
        )
        for vm, reason, count in self.views():
            if reason is not None:
                paused.add_metric([vm, reason], 1)
            firing.add_metric([vm], count)
        yield paused
        yield firing


class _EventCounter(Collector):
    """`qmpwatch_events_total{vm,event}`, read from the VMs' `EventMeter`s at scrape time."""

    name = "qmpwatch_events"
    documentation = "QMP events received."

    def __init__(self) -> None:
        self.meters: dict[str, EventMeter] = {}  # vm -> its meter

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["vm", "event"])
        for vm, meter in list(self.meters.items()):
            for event, count in list(meter.counts.items()):
                family.add_metric([vm, event], count)
        yield family


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class _ProcessCollector(ProcessCollector):
    """process_* metrics that also work under systemd's `ProcSubset=pid`.

    prometheus-client reads the boot time from /proc/stat, which `ProcSubset=pid` hides, and
    then exports no process metrics at all; the clocks give the same number.
    """

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class Metrics:
    """qmpwatch's metrics in a registry of their own; docs/architecture.md lists them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._events = _EventCounter()
        r.register(self._events)
        self._lag = _LagHistogram(LAG_BUCKETS)
        r.register(self._lag)
        self._decode_errors = Counter(
            "qmpwatch_decode_errors",
            "QMP messages that were not valid JSON or broke the spec's types.",
            ["vm"],
            registry=r,
        )
        self._followups = Counter(
            "qmpwatch_followups",
            "Follow-up expectations ended, by rule and outcome (satisfied, missed, disconnected).",
            ["vm", "rule", "outcome"],
            registry=r,
        )
        self._alerts = Counter(
            "qmpwatch_alerts", "Alerts raised.", ["vm", "alert", "severity"], registry=r
        )
        self._resolved = Counter(
            "qmpwatch_alerts_resolved", "Alerts resolved.", ["vm", "alert"], registry=r
        )
        self._connected = Gauge(
            "qmpwatch_vm_connected", "1 while a QMP session to the VM is up.", ["vm"], registry=r
        )
        self._agent_open = Gauge(
            "qmpwatch_vm_agent_port_open",
            "1 while the guest agent's port (org.qemu.guest_agent.0) is open, 0 while closed.",
            ["vm"],
            registry=r,
        )
        self._statuses = _StatusGauges()
        self._views = _VmViews()
        r.register(self._statuses)
        r.register(self._views)
        self._status_of_vm = self._statuses.status_of_vm
        self._gaps = _ProtectionGaps()
        r.register(self._gaps)
        self._disconnects = Counter(
            "qmpwatch_disconnects",
            "QMP sessions ended, by cause (shutdown, eof, error, closed).",
            ["vm", "cause"],
            registry=r,
        )
        self._connect_failures = Counter(
            "qmpwatch_connect_failures",
            "Attempts to attach to a QMP socket that failed, by reason.",
            ["vm", "reason"],
            registry=r,
        )
        self._reconnects = Counter(
            "qmpwatch_reconnects", "Reconnect attempts, by reason.", ["vm", "reason"], registry=r
        )
        self._deliveries = Counter(
            "qmpwatch_alert_deliveries",
            "Alert deliveries to sinks, by result.",
            ["alert", "sink", "result"],
            registry=r,
        )
        self._outbox = Gauge(
            "qmpwatch_outbox_depth", "Alerts in the outbox waiting for delivery.", registry=r
        )
        Gauge("qmpwatch_info", "qmpwatch version.", ["version"], registry=r).labels(
            __version__
        ).set(1)
        _ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        # Label children by label values, so the per-event path skips prometheus-client's
        # label validation; and per VM, every (metric, labels) made, for forget_vm().
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._series_of_vm: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}

    # -- events and records ---------------------------------------------------------------

    def event_meter(self, vm: str) -> EventMeter:
        """The meter that counts `vm`'s events (one per VM, made on first use)."""
        meter = self._events.meters.get(vm)
        if meter is None:
            meter = self._events.meters[vm] = EventMeter(self._lag)
        return meter

    def observe_event(self, vm: str, event: Event, now: float) -> None:
        """Count one event of `vm` processed at `now` (`event_meter(vm).observe`)."""
        self.event_meter(vm).observe(event, now)

    def observe_record(self, vm: str, kind: str, fields: Mapping[str, Any], now: float) -> None:
        """Count one log record of `vm` (as written by the watch core), processed at `now`.

        `qmp_event` records are counted by `observe_event` instead, from the event itself.
        """
        if kind == "followup_satisfied":
            self._child(self._followups, vm, fields["rule"], "satisfied").inc()
        elif kind == "followup_missed":
            outcome = "disconnected" if fields.get("reason") == "disconnected" else "missed"
            self._child(self._followups, vm, fields["rule"], outcome).inc()
        elif kind == "alert":
            self._child(self._alerts, vm, fields["alert"], fields["severity"]).inc()
        elif kind == "alert_resolved":
            self._child(self._resolved, vm, fields["alert"]).inc()
        elif kind == "qmp_decode_error":
            self._child(self._decode_errors, vm).inc()
        elif kind == "vm_connected":
            self.set_connected(vm, True)
            self.set_status(vm, fields.get("status"))
        elif kind == "vm_agent_port":
            self._child(self._agent_open, vm).set(1 if fields.get("open") else 0)
        elif kind == "vm_disconnected":
            self.set_connected(vm, False)
            self._child(self._disconnects, vm, fields.get("cause", "unknown")).inc()
        elif kind == "vm_protection":
            self._gaps.gaps_of_vm[vm] = tuple(fields.get("gaps", ()))

    # -- setters --------------------------------------------------------------------------

    def set_connected(self, vm: str, connected: bool) -> None:
        """Whether a QMP session to `vm` is up (also set from vm_connected/vm_disconnected)."""
        self._child(self._connected, vm).set(1 if connected else 0)

    def set_status(self, vm: str, status: str | None) -> None:
        """The VM's current run status (None: unknown)."""
        self._status_of_vm[vm] = UNKNOWN_STATUS if status is None else status

    def connect_failed(self, vm: str, reason: str) -> None:
        """One attempt to attach to `vm` failed for `reason` ("missing", "refused", ...).

        Called for every failed attempt: the `vm_connect_failed` record is rate-limited, and
        its `attempts` counts them all, as this counter does. The attempt is retried, so it
        also counts as a reconnect.
        """
        self._child(self._connect_failures, vm, reason).inc()
        self.reconnect(vm, reason)

    def reconnect(self, vm: str, reason: str) -> None:
        """One reconnect attempt of `vm`, e.g. after "eof" or a failed attempt's "missing"."""
        self._child(self._reconnects, vm, reason).inc()

    def alert_delivery(self, kind: str, sink: str, result: str) -> None:
        """One delivery of an alert of `kind` to `sink` ("webhook", ...) ended in `result`."""
        self._child(self._deliveries, kind, sink, result, per_vm=False).inc()

    def vms_from(self, views: Callable[[], list[VmView]]) -> None:
        """Each watched VM's pause reason and firing alerts are `views()`, read at every
        scrape."""
        self._views.views = views

    def outbox_depth_from(self, depth: Callable[[], int]) -> None:
        """The outbox depth (alerts waiting for a sink) is `depth()`, read at every scrape."""
        self._outbox.set_function(depth)

    def forget_vm(self, vm: str) -> None:
        """Drop every series of `vm` (it was removed from the config)."""
        for metric, labels in self._series_of_vm.pop(vm, ()):
            metric.remove(*labels)
            self._children.pop((metric, labels), None)
        self._status_of_vm.pop(vm, None)
        self._gaps.gaps_of_vm.pop(vm, None)
        self._events.meters.pop(vm, None)

    # -- output ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (0.0.4)."""
        return generate_latest(self.registry)

    # -- helpers --------------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str, per_vm: bool = True) -> Any:
        """The labelled child of `metric`, made once; with `per_vm`, the first label is the VM
        and the series is remembered for forget_vm()."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
            if per_vm:
                self._series_of_vm.setdefault(labels[0], set()).add(key)
        return child
