"""Metrics derived from the watch core's records, read back through prometheus-client's parser."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from qmpwatch import __version__
from qmpwatch.core.alert import Alert
from qmpwatch.core.config import FollowupConfig
from qmpwatch.core.errors import DecodeError
from qmpwatch.core.events import Event, decode
from qmpwatch.core.watch import VmWatch
from qmpwatch.service.metrics import LAG_BUCKETS, Metrics

T0 = 1_700_000_000  # epoch seconds of the scripted run

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    """Every sample of a render, keyed by (name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names_with(samples: Samples, label: str, wanted: str) -> set[str]:
    return {name for name, labels in samples if (label, wanted) in labels}


class MetricsOutput:
    """A WatchOutput that feeds its records to Metrics, as the daemon's does."""

    def __init__(self, vm: str, metrics: Metrics) -> None:
        self.vm = vm
        self.metrics = metrics
        self.status_wanted = False

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None:
        self.metrics.observe_record(self.vm, kind, fields, now)

    def qmp_event(self, event: Event, now: float) -> None:
        self.metrics.observe_event(self.vm, event, now)

    def raise_alert(self, alert: Alert) -> None:
        pass

    def resolve_alert(self, alert: Alert, now: float) -> None:
        pass

    def query_status(self) -> None:
        self.status_wanted = True

    def command(self, name: str, arguments: object) -> None:
        pass


def event(name: str, at: float, data: Mapping[str, Any] | None = None) -> Event:
    seconds = int(at)
    message: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": seconds, "microseconds": round((at - seconds) * 1e6)},
    }
    if data is not None:
        message["data"] = data
    decoded = decode(orjson.dumps(message))
    assert isinstance(decoded, Event)
    return decoded


def scripted_run(metrics: Metrics, vm: str = "web01") -> None:
    """An I/O-error pause and resume, a watchdog reset that never comes, a bad message, a crash.

    Every event is processed 3 ms after QEMU stamped it.
    """
    out = MetricsOutput(vm, metrics)
    watch = VmWatch(vm, out, followup=FollowupConfig())
    lag = 0.003
    watch.on_connected(T0, "running", {"socket": f"/run/qemu/{vm}.qmp", "qemu_version": "8.2"})
    io_error = {"device": "drive0", "operation": "write", "action": "stop"}
    for name, at, data in [
        ("BLOCK_IO_ERROR", T0 + 1.0, io_error),
        ("BLOCK_IO_ERROR", T0 + 1.000100, io_error),
        ("STOP", T0 + 1.000200, None),
        ("RESUME", T0 + 30.0, None),
        ("WATCHDOG", T0 + 40.0, {"action": "reset"}),
    ]:
        watch.on_event(event(name, at, data), at + lag)
    watch.tick(T0 + 50.0)  # the RESET never came
    watch.on_decode_error(DecodeError("not JSON", "{oops"), T0 + 51.0)
    watch.on_disconnected(T0 + 60.0, "eof", "Connection reset by peer")


def test_scripted_run_counts() -> None:
    """Events, follow-ups, alerts, resolutions, decode errors and disconnects are counted."""
    metrics = Metrics()
    scripted_run(metrics)
    s = scrape(metrics)
    events = "qmpwatch_events_total"
    assert value(s, events, vm="web01", event="BLOCK_IO_ERROR") == 2
    assert value(s, events, vm="web01", event="STOP") == 1
    assert value(s, events, vm="web01", event="RESUME") == 1
    assert value(s, events, vm="web01", event="WATCHDOG") == 1
    followups = "qmpwatch_followups_total"
    assert (
        value(s, followups, vm="web01", rule="stop_after_block_io_error", outcome="satisfied") == 2
    )
    assert value(s, followups, vm="web01", rule="reset_after_watchdog", outcome="missed") == 1
    alerts = "qmpwatch_alerts_total"
    # both errors hit the same drive: one firing alert (same fingerprint), not two
    assert value(s, alerts, vm="web01", alert="vm_stopped_io_error", severity="critical") == 1
    assert value(s, alerts, vm="web01", alert="watchdog_fired", severity="critical") == 1
    assert value(s, alerts, vm="web01", alert="followup_missing", severity="warning") == 1
    assert value(s, alerts, vm="web01", alert="vm_crashed", severity="critical") == 1
    resolved = "qmpwatch_alerts_resolved_total"
    assert value(s, resolved, vm="web01", alert="vm_stopped_io_error") == 1
    assert value(s, "qmpwatch_decode_errors_total", vm="web01") == 1
    assert value(s, "qmpwatch_disconnects_total", vm="web01", cause="eof") == 1
    assert value(s, "qmpwatch_vm_connected", vm="web01") == 0


def test_event_lag_histogram() -> None:
    """The lag from QEMU's timestamp to processing lands in the right buckets."""
    metrics = Metrics()
    scripted_run(metrics)  # five events, each 3 ms late
    s = scrape(metrics)
    lag = "qmpwatch_event_lag_seconds"
    assert value(s, f"{lag}_count") == 5
    assert abs((value(s, f"{lag}_sum") or 0) - 5 * 0.003) < 1e-6
    assert value(s, f"{lag}_bucket", le="0.0025") == 0
    assert value(s, f"{lag}_bucket", le="0.005") == 5
    assert value(s, f"{lag}_bucket", le="+Inf") == 5
    assert len(names_with(s, "le", "+Inf")) == 1
    assert len([k for k in s if k[0] == f"{lag}_bucket"]) == len(LAG_BUCKETS) + 1


def test_lag_edges() -> None:
    """A bucket bound is inclusive, and a clock step back counts as 0."""
    metrics = Metrics()
    stop = event("STOP", T0 + 0.5)
    metrics.observe_event("a", stop, T0 + 0.5 + 0.25)
    metrics.observe_event("a", stop, T0 + 0.4)
    metrics.observe_event("a", event("STOP", T0 + 1.0), T0 + 11)
    s = scrape(metrics)
    lag = "qmpwatch_event_lag_seconds"
    assert value(s, "qmpwatch_events_total", vm="a", event="STOP") == 3
    assert value(s, f"{lag}_count") == 3
    assert value(s, f"{lag}_bucket", le="0.0005") == 1  # the negative one, as 0
    assert value(s, f"{lag}_bucket", le="0.1") == 1
    assert value(s, f"{lag}_bucket", le="0.25") == 2
    assert value(s, f"{lag}_bucket", le="5.0") == 2
    assert value(s, f"{lag}_bucket", le="+Inf") == 3
    assert abs((value(s, f"{lag}_sum") or 0) - (0.25 + 0 + 10)) < 1e-6


def test_an_event_is_counted_once_however_it_reaches_the_metrics() -> None:
    """qmp_event records are not counted again: events are counted from the events."""
    metrics = Metrics()
    stop = event("STOP", T0)
    metrics.observe_event("a", stop, T0)
    fields = {"qmp": "STOP", "qemu_time": stop.qemu_time, "data": {}}
    metrics.observe_record("a", "qmp_event", fields, T0)
    assert value(scrape(metrics), "qmpwatch_events_total", vm="a", event="STOP") == 1


def test_status_is_one_series_per_vm() -> None:
    """The status gauge keeps one series per VM, moving its label; running follows it."""
    metrics = Metrics()
    metrics.observe_record(
        "db", "vm_connected", {"socket": "/x", "qemu_version": "9", "status": "paused"}, T0
    )
    s = scrape(metrics)
    assert value(s, "qmpwatch_vm_status", vm="db", status="paused") == 1
    assert value(s, "qmpwatch_vm_running", vm="db") == 0
    assert value(s, "qmpwatch_vm_connected", vm="db") == 1
    metrics.set_status("db", "running")
    metrics.set_status("db", "running")
    s = scrape(metrics)
    assert [k for k in s if k[0] == "qmpwatch_vm_status"] == [
        ("qmpwatch_vm_status", frozenset({("vm", "db"), ("status", "running")}))
    ]
    assert value(s, "qmpwatch_vm_running", vm="db") == 1
    metrics.set_status("db", None)
    s = scrape(metrics)
    assert value(s, "qmpwatch_vm_status", vm="db", status="unknown") == 1
    assert value(s, "qmpwatch_vm_status", vm="db", status="running") is None
    assert value(s, "qmpwatch_vm_running", vm="db") == 0


def test_setters() -> None:
    """Reconnects, connect failures, deliveries and the outbox depth (read at scrape time)."""
    metrics = Metrics()
    metrics.reconnect("web01", "eof")
    metrics.reconnect("web01", "eof")
    metrics.connect_failed("web01", "missing")
    metrics.alert_delivery("vm_crashed", "webhook", "ok")
    metrics.alert_delivery("vm_crashed", "webhook", "retry")
    metrics.alert_delivery("vm_crashed", "webhook", "ok")
    waiting = [7]
    metrics.outbox_depth_from(lambda: waiting[0])
    metrics.set_connected("web01", True)
    s = scrape(metrics)
    assert value(s, "qmpwatch_reconnects_total", vm="web01", reason="eof") == 2
    assert value(s, "qmpwatch_connect_failures_total", vm="web01", reason="missing") == 1
    assert value(s, "qmpwatch_reconnects_total", vm="web01", reason="missing") == 1  # retried
    deliveries = "qmpwatch_alert_deliveries_total"
    assert value(s, deliveries, alert="vm_crashed", sink="webhook", result="ok") == 2
    assert value(s, deliveries, alert="vm_crashed", sink="webhook", result="retry") == 1
    assert value(s, "qmpwatch_outbox_depth") == 7
    assert value(s, "qmpwatch_vm_connected", vm="web01") == 1
    waiting[0] = 0  # the outbox drained: the next scrape says so, no setter involved
    assert value(scrape(metrics), "qmpwatch_outbox_depth") == 0


def test_forget_vm_removes_its_series() -> None:
    """A removed VM's series disappear, other VMs' stay, and it can come back from zero."""
    metrics = Metrics()
    scripted_run(metrics, "web01")
    scripted_run(metrics, "web02")
    metrics.set_status("web01", "running")
    metrics.reconnect("web01", "eof")
    metrics.alert_delivery("vm_crashed", "log", "ok")
    metrics.forget_vm("web01")
    s = scrape(metrics)
    assert names_with(s, "vm", "web01") == set()
    assert value(s, "qmpwatch_events_total", vm="web02", event="STOP") == 1
    assert value(s, "qmpwatch_alert_deliveries_total", alert="vm_crashed", sink="log", result="ok")
    metrics.observe_event("web01", event("STOP", T0), T0)
    metrics.set_status("web01", "paused")
    s = scrape(metrics)
    assert value(s, "qmpwatch_events_total", vm="web01", event="STOP") == 1
    assert value(s, "qmpwatch_vm_status", vm="web01", status="paused") == 1


def test_registries_are_independent() -> None:
    """Each Metrics has its own registry: two coexist, and counts do not leak between them."""
    first, second = Metrics(), Metrics()
    first.reconnect("a", "eof")
    assert value(scrape(first), "qmpwatch_reconnects_total", vm="a", reason="eof") == 1
    assert value(scrape(second), "qmpwatch_reconnects_total", vm="a", reason="eof") is None


def test_process_metrics_agree_with_proc_stat() -> None:
    """process_start_time_seconds (boot time from the clocks) matches /proc/stat's btime."""
    s = scrape(Metrics())
    start = value(s, "process_start_time_seconds")
    assert start is not None
    with open("/proc/stat", "rb") as stat:
        btime = next(int(line.split()[1]) for line in stat if line.startswith(b"btime "))
    with open(f"/proc/{os.getpid()}/stat", "rb") as stat:
        ticks = int(stat.read().split(b")")[-1].split()[19])
    expected = btime + ticks / os.sysconf("SC_CLK_TCK")
    assert abs(start - expected) <= 1.5  # btime is whole seconds
    assert start <= time.time()
    assert value(s, "qmpwatch_info", version=__version__) == 1
