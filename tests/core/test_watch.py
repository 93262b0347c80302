"""The per-VM watch core: records, follow-ups, alerts and their resolution, with a fake clock."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpwatch.core.alert import Alert, resolved_because
from qmpwatch.core.config import FollowupConfig, LifecycleConfig
from qmpwatch.core.errors import DecodeError
from qmpwatch.core.events import Event, decode_object
from qmpwatch.core.watch import RAW_LIMIT, VmWatch, WatchOutput, with_handlers
from qmpwatch.core.watch.timers import ORDER
from qmpwatch.output.logs import qmp_event_fields
from tests.support.spec_examples import NEWEST, examples

T0 = 1_700_000_000.0


@dataclass(frozen=True)
class Record:
    kind: str
    level: str
    now: float
    fields: dict[str, Any]


class Collect:
    """A WatchOutput that keeps everything the core decides, in order."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.raised: list[Alert] = []
        self.resolved: list[Alert] = []
        self.status_queries = 0
        self.commands: list[tuple[str, dict[str, Any]]] = []

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None:
        self.records.append(Record(kind, level, now, dict(fields)))

    def qmp_event(self, event: Event, now: float) -> None:
        self.record("qmp_event", "info", now, qmp_event_fields(event))

    def raise_alert(self, alert: Alert) -> None:
        self.raised.append(alert)

    def resolve_alert(self, alert: Alert, now: float) -> None:
        self.resolved.append(alert)

    def query_status(self) -> None:
        self.status_queries += 1

    def command(self, name: str, arguments: Mapping[str, Any]) -> None:
        self.commands.append((name, dict(arguments)))

    # -- for assertions
    def kinds(self) -> list[str]:
        return [r.kind for r in self.records]

    def of(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.kind == kind]

    def alert_kinds(self) -> list[str]:
        return [r.fields["alert"] for r in self.of("alert")]

    def one_alert(self, kind: str) -> Record:
        (found,) = [r for r in self.of("alert") if r.fields["alert"] == kind]
        return found

    def clear(self) -> None:
        self.records.clear()
        self.raised.clear()
        self.resolved.clear()
        self.status_queries = 0


def make_watch(**options: Any) -> tuple[VmWatch, Collect]:
    out = Collect()
    sink: WatchOutput = out
    options.setdefault("followup", FollowupConfig())
    return VmWatch("web01", sink, **options), out


def ev(name: str, at: float = T0, **data: Any) -> Event:
    """An event as QEMU sends it, at epoch time `at` (data keys with - are passed with _)."""
    seconds = int(at)
    message: dict[str, Any] = {
        "timestamp": {"seconds": seconds, "microseconds": round((at - seconds) * 1e6)},
        "event": name,
    }
    if data:
        message["data"] = {k.replace("_", "-"): v for k, v in data.items()}
    decoded = decode_object(message)
    assert isinstance(decoded, Event)
    return decoded


def feed(watch: VmWatch, *events: Event) -> None:
    """Events received at QEMU's own timestamps."""
    for event in events:
        watch.on_event(event, event.time)


def bioerr(at: float = T0, action: str = "stop", device: str = "drive0", **extra: Any) -> Event:
    return ev("BLOCK_IO_ERROR", at, device=device, operation="write", action=action, **extra)


# ---------------------------------------------------------------------------------------------
# qmp_event records


def test_every_event_is_one_qmp_event_record_with_its_data() -> None:
    """Each spec example gives exactly one qmp_event with qmp, qemu_time and data ({} if absent)."""
    watch, out = make_watch()
    sent = [obj for _, obj in examples(NEWEST)]
    for i, obj in enumerate(sent):
        event = decode_object(obj)
        assert isinstance(event, Event)
        watch.on_event(event, T0 + i)
    records = out.of("qmp_event")
    assert len(records) == len(sent)
    for i, (record, obj) in enumerate(zip(records, sent, strict=True)):
        assert record.level == "info"
        assert record.now == T0 + i
        stamp = obj["timestamp"]
        shown = datetime.fromtimestamp(stamp["seconds"], UTC).strftime("%Y-%m-%dT%H:%M:%S")
        assert record.fields == {
            "qmp": obj["event"],
            "qemu_time": f"{shown}.{stamp['microseconds']:06d}Z",
            "data": obj.get("data", {}),
        }


def test_qmp_event_record_comes_first_and_shows_qemu_time() -> None:
    """The qmp_event record is written before any decision about the event, with QEMU's time."""
    watch, out = make_watch()
    watch.on_event(ev("WATCHDOG", 1265044230.450486, action="reset"), T0)
    assert out.kinds()[0] == "qmp_event"
    assert out.records[0].fields["qemu_time"] == "2010-02-01T17:10:30.450486Z"
    assert out.records[0].now == T0


def test_unknown_event_is_logged_as_is_and_changes_nothing() -> None:
    """An event qmpwatch has no handler for is one qmp_event with its data, and nothing else."""
    watch, out = make_watch()
    data: dict[str, Any] = {
        "device": "job0",
        "len": 18446744073709551615,
        "offset": 0,
        "type": "mirror",
    }
    watch.on_event(ev("BLOCK_JOB_READY", **data), T0)
    assert out.kinds() == ["qmp_event"]
    assert out.records[0].fields["qmp"] == "BLOCK_JOB_READY"
    assert out.records[0].fields["data"] == data
    assert watch.tracker.pending == ()
    assert out.status_queries == 0


def test_decode_error_record_keeps_raw_text_truncated() -> None:
    """A bad message becomes qmp_decode_error with error, raw cut at RAW_LIMIT, and raw_length."""
    watch, out = make_watch()
    raw = '{"event": "STOP", "data": "' + "x" * 5000
    watch.on_decode_error(DecodeError("not JSON: truncated", raw), T0)
    (record,) = out.records
    assert (record.kind, record.level) == ("qmp_decode_error", "warning")
    assert record.fields["error"] == "not JSON: truncated"
    assert record.fields["raw"] == raw[:RAW_LIMIT] + "…"
    assert record.fields["raw_length"] == len(raw)
    short = "[1, 2]"
    watch.on_decode_error(DecodeError("not a JSON object: got an array", short), T0)
    assert out.records[-1].fields["raw"] == short


# ---------------------------------------------------------------------------------------------
# Disk errors


def test_io_error_then_stop_is_explained_and_alerted_once() -> None:
    """BLOCK_IO_ERROR(stop) then STOP: followup_satisfied and one vm_stopped_io_error, no query."""
    watch, out = make_watch()
    feed(
        watch,
        bioerr(T0, node_name="#block148", nospace=False, reason="Input/output error"),
        ev("STOP", T0 + 0.02),
    )
    assert out.kinds() == ["qmp_event", "qmp_event", "followup_satisfied", "alert"]
    satisfied = out.of("followup_satisfied")[0].fields
    assert (satisfied["cause"], satisfied["expected"]) == ("BLOCK_IO_ERROR", "STOP")
    assert satisfied["latency_ms"] == pytest.approx(20.0, abs=0.01)
    alert = out.of("alert")[0]
    assert alert.level == "critical"
    assert alert.fields["alert"] == "vm_stopped_io_error"
    assert alert.fields["severity"] == "critical"
    summary = alert.fields["summary"]
    assert "web01" in summary
    assert "write" in summary
    assert "drive0" in summary
    assert "Input/output error" in summary
    assert alert.fields["details"]["node-name"] == "#block148"
    assert "vm_stopped_unexpected" not in out.alert_kinds()
    assert out.status_queries == 0
    assert [a.kind for a in out.raised] == ["vm_stopped_io_error"]
    assert watch.status == "io-error"


def test_nospace_io_error_says_no_space_left_on_device() -> None:
    """With nospace:true (and no reason given) the summary says "No space left on device"."""
    watch, out = make_watch()
    feed(watch, bioerr(T0, nospace=True), ev("STOP", T0 + 0.01))
    summary = out.one_alert("vm_stopped_io_error").fields["summary"]
    assert "No space left on device" in summary
    assert "write error on drive0" in summary


def test_blockdev_io_error_names_the_node_when_device_is_empty() -> None:
    """A -blockdev disk (device "") is named by its node-name in the summary."""
    watch, out = make_watch()
    feed(
        watch,
        bioerr(T0, device="", node_name="disk0", nospace=True, reason="No space left on device"),
        ev("STOP", T0 + 0.01),
    )
    summary = out.one_alert("vm_stopped_io_error").fields["summary"]
    assert "disk0" in summary
    assert "No space left on device" in summary


def test_one_stop_explains_errors_on_several_drives() -> None:
    """Two drives fail, one STOP: two followup_satisfied, one io-error alert per drive."""
    watch, out = make_watch()
    feed(
        watch,
        bioerr(T0, device="drive0"),
        bioerr(T0 + 0.001, device="drive1"),
        ev("STOP", T0 + 0.002),
    )
    assert len(out.of("followup_satisfied")) == 2
    summaries = [r.fields["summary"] for r in out.of("alert")]
    assert len(summaries) == 2
    assert "drive0" in summaries[0]
    assert "drive1" in summaries[1]
    assert out.status_queries == 0


def test_one_stop_explains_errors_on_several_blockdev_disks() -> None:
    """Two -blockdev disks (device "") fail, one STOP: one alert per node, each named."""
    watch, out = make_watch()
    feed(
        watch,
        bioerr(T0, device="", node_name="disk0"),
        bioerr(T0 + 0.001, device="", node_name="disk1"),
        ev("STOP", T0 + 0.002),
    )
    summaries = [r.fields["summary"] for r in out.of("alert")]
    assert len(summaries) == 2
    assert "disk0" in summaries[0]
    assert "disk1" in summaries[1]
    assert len({a.fingerprint for a in out.raised}) == 2


@pytest.mark.parametrize("action", ["report", "ignore"])
def test_reported_io_error_expects_no_stop(action: str) -> None:
    """BLOCK_IO_ERROR with action report/ignore opens nothing; a later STOP is unexplained."""
    watch, out = make_watch()
    feed(watch, bioerr(T0, action=action))
    assert watch.tracker.pending == ()
    feed(watch, ev("STOP", T0 + 1))
    assert out.status_queries == 1
    assert "followup_satisfied" not in out.kinds()


# ---------------------------------------------------------------------------------------------
# Unexpected stops


@pytest.mark.parametrize(
    ("status", "kind", "severity"),
    [
        ("io-error", "vm_stopped_io_error", "critical"),
        ("watchdog", "vm_stopped_watchdog", "critical"),
        ("guest-panicked", "vm_panicked", "critical"),
        ("internal-error", "vm_stopped_unexpected", "critical"),
        ("debug", "vm_stopped_unexpected", "critical"),
        ("some-future-state", "vm_stopped_unexpected", "critical"),
        ("paused", "vm_stopped_unexpected", "warning"),
    ],
)
def test_unexpected_stop_is_classified_by_its_status(status: str, kind: str, severity: str) -> None:
    """An unexplained STOP asks query-status once; the answer picks design.md's alert."""
    watch, out = make_watch()
    feed(watch, ev("STOP", T0))
    assert out.status_queries == 1
    assert out.of("alert") == []
    watch.on_status(status, T0 + 0.05)
    (alert,) = out.of("alert")
    assert alert.fields["alert"] == kind
    assert alert.fields["severity"] == alert.level == severity
    assert alert.fields["details"]["status"] == status
    assert alert.fields["details"]["qemu_time"] == ev("STOP", T0).qemu_time
    assert alert.fields["summary"].startswith("VM web01 ")
    assert [a.kind for a in out.raised] == [kind]
    assert watch.status == status


@pytest.mark.parametrize(
    "status",
    [
        "shutdown",
        "finish-migrate",
        "postmigrate",
        "inmigrate",
        "prelaunch",
        "save-vm",
        "restore-vm",
        "suspended",
        "running",
    ],
)
def test_stop_in_an_expected_state_raises_no_alert(status: str) -> None:
    """A STOP whose status is shutdown, a migration or snapshot state, ... is logged only."""
    watch, out = make_watch()
    feed(watch, ev("STOP", T0))
    watch.on_status(status, T0 + 0.05)
    assert out.of("alert") == []
    assert out.raised == []
    assert out.kinds() == ["qmp_event"]


@pytest.mark.parametrize(("setting", "severity"), [("critical", "critical"), ("info", "info")])
def test_client_stop_severity_is_configurable(setting: str, severity: str) -> None:
    """A stop by a monitor client (status paused) has the configured severity."""
    watch, out = make_watch(client_stop_severity=setting)
    feed(watch, ev("STOP", T0))
    watch.on_status("paused", T0)
    assert out.one_alert("vm_stopped_unexpected").fields["severity"] == severity


def test_client_stop_severity_none_raises_nothing() -> None:
    """With client_stop_severity "none", a client's stop is not alerted."""
    watch, out = make_watch(client_stop_severity="none")
    feed(watch, ev("STOP", T0))
    watch.on_status("paused", T0)
    assert out.of("alert") == []


def test_stop_with_unknown_status_is_critical() -> None:
    """query-status failing (status_unknown) makes the STOP a critical vm_stopped_unexpected."""
    watch, out = make_watch()
    feed(watch, ev("STOP", T0))
    watch.status_unknown(T0 + 5, "query-status timed out")
    alert = out.one_alert("vm_stopped_unexpected")
    assert alert.fields["severity"] == "critical"
    assert "unknown" in alert.fields["summary"]
    assert alert.fields["details"]["status_error"] == "query-status timed out"


def test_status_answer_without_a_pending_stop_raises_nothing() -> None:
    """A status that nobody asked about for a STOP (or a second answer) raises no alert."""
    watch, out = make_watch()
    watch.on_status("paused", T0)
    feed(watch, ev("STOP", T0))
    watch.on_status("paused", T0)
    watch.on_status("paused", T0)
    assert out.alert_kinds() == ["vm_stopped_unexpected"]


# ---------------------------------------------------------------------------------------------
# Resolution


def test_resume_resolves_the_io_error_alert() -> None:
    """RESUME after an I/O-error pause writes alert_resolved and hands the alert back, once."""
    watch, out = make_watch()
    feed(watch, bioerr(T0), ev("STOP", T0 + 0.01))
    (raised,) = out.raised
    feed(watch, ev("RESUME", T0 + 60))
    (resolved,) = out.of("alert_resolved")
    assert resolved.fields["alert"] == "vm_stopped_io_error"
    assert resolved.fields["fingerprint"] == raised.fingerprint
    assert resolved.fields["summary"] == raised.summary
    assert resolved.fields["resolved_summary"] == (
        f"Resolved: {raised.summary}; ended: the VM resumed (RESUME)"
    )
    assert resolved.now == T0 + 60
    assert out.resolved == [resolved_because(raised, "the VM resumed (RESUME)")]
    assert out.resolved[0].details["resolution"] == "the VM resumed (RESUME)"
    assert watch.status == "running"
    feed(watch, ev("RESUME", T0 + 61))
    assert len(out.of("alert_resolved")) == 1


def test_running_status_resolves_stopped_alerts() -> None:
    """A query-status answer "running" also ends a stopped alert."""
    watch, out = make_watch()
    feed(watch, ev("STOP", T0))
    watch.on_status("paused", T0 + 0.1)
    watch.on_status("running", T0 + 10)
    assert [r.fields["alert"] for r in out.of("alert_resolved")] == ["vm_stopped_unexpected"]


def test_resume_before_status_answer_is_a_client_pause_then_resolved() -> None:
    """STOP, then RESUME before query-status answered: a paused warning, resolved at once."""
    watch, out = make_watch()
    feed(watch, ev("STOP", T0), ev("RESUME", T0 + 0.001))
    alert = out.one_alert("vm_stopped_unexpected")
    assert alert.fields["severity"] == "warning"
    assert [r.fields["alert"] for r in out.of("alert_resolved")] == ["vm_stopped_unexpected"]
    watch.on_status("running", T0 + 0.01)  # the late answer changes nothing
    assert len(out.of("alert")) == 1


def test_watchdog_fired_is_not_resolved_by_resume() -> None:
    """watchdog_fired is an event, not a state: RESUME resolves only the stopped alert."""
    watch, out = make_watch()
    feed(watch, ev("WATCHDOG", T0, action="pause"), ev("STOP", T0 + 0.01))
    feed(watch, ev("RESUME", T0 + 30))
    assert [r.fields["alert"] for r in out.of("alert_resolved")] == ["vm_stopped_watchdog"]


# ---------------------------------------------------------------------------------------------
# Watchdog


@pytest.mark.parametrize(
    ("action", "severity"),
    [
        ("reset", "critical"),
        ("pause", "info"),  # one incident, one page: vm_stopped_watchdog pages
        ("shutdown", "critical"),
        ("poweroff", "critical"),
        ("inject-nmi", "critical"),
        ("none", "warning"),
        ("debug", "warning"),
    ],
)
def test_watchdog_raises_watchdog_fired(action: str, severity: str) -> None:
    """Every WATCHDOG event is a watchdog_fired alert naming QEMU's action."""
    watch, out = make_watch()
    feed(watch, ev("WATCHDOG", T0, action=action))
    alert = out.one_alert("watchdog_fired")
    assert alert.fields["severity"] == severity
    assert action in alert.fields["summary"]
    assert alert.fields["details"]["action"] == action


@pytest.mark.parametrize(
    ("action", "follow_up"),
    [("reset", "RESET"), ("pause", "STOP"), ("shutdown", "SHUTDOWN")],
)
def test_watchdog_follow_up_is_satisfied(action: str, follow_up: str) -> None:
    """WATCHDOG reset/pause/shutdown followed by RESET/STOP/SHUTDOWN: followup_satisfied."""
    watch, out = make_watch()
    feed(watch, ev("WATCHDOG", T0, action=action), ev(follow_up, T0 + 0.5))
    (satisfied,) = out.of("followup_satisfied")
    assert satisfied.fields["cause"] == "WATCHDOG"
    assert satisfied.fields["expected"] == follow_up
    assert satisfied.fields["latency_ms"] == pytest.approx(500.0, abs=0.01)
    assert out.status_queries == 0
    assert "followup_missing" not in out.alert_kinds()


def test_watchdog_pause_then_stop_is_a_watchdog_stop() -> None:
    """WATCHDOG(pause) then STOP: vm_stopped_watchdog (critical), no query, no unexpected stop."""
    watch, out = make_watch()
    feed(watch, ev("WATCHDOG", T0, action="pause"), ev("STOP", T0 + 0.01))
    assert out.alert_kinds() == ["watchdog_fired", "vm_stopped_watchdog"]
    assert out.one_alert("vm_stopped_watchdog").fields["severity"] == "critical"
    assert watch.status == "watchdog"


def test_watchdog_shutdown_without_shutdown_means_a_hung_guest() -> None:
    """No SHUTDOWN within 120 s of WATCHDOG(shutdown): followup_missed and a critical alert."""
    watch, out = make_watch()
    feed(watch, ev("WATCHDOG", T0, action="shutdown"))
    assert watch.next_deadline() == T0 + 120.0
    watch.tick(T0 + 119.9)
    assert out.of("followup_missed") == []
    watch.tick(T0 + 120.0)
    missed = out.of("followup_missed")[0]
    assert missed.fields["cause"] == "WATCHDOG"
    assert missed.fields["expected"] == "SHUTDOWN"
    assert missed.fields["deadline_s"] == 120.0
    assert missed.now == T0 + 120.0
    alert = out.one_alert("followup_missing")
    assert alert.fields["severity"] == "critical"
    assert "SHUTDOWN" in alert.fields["summary"]
    assert "hung" in alert.fields["summary"]


def test_watchdog_poweroff_then_eof_is_a_clean_exit() -> None:
    """WATCHDOG(poweroff) then the monitor's EOF satisfies the QEMU_EXIT rule: no vm_crashed."""
    watch, out = make_watch()
    feed(watch, ev("WATCHDOG", T0, action="poweroff"))
    watch.on_disconnected(T0 + 0.2, "eof")
    (satisfied,) = out.of("followup_satisfied")
    assert satisfied.fields["expected"] == "QEMU_EXIT"
    (disconnected,) = out.of("vm_disconnected")
    assert disconnected.fields["cause"] == "shutdown"
    assert "vm_crashed" not in out.alert_kinds()
    assert watch.status == "shutdown"


# ---------------------------------------------------------------------------------------------
# Missed follow-ups


def test_missed_stop_after_io_error_is_a_followup_missing_warning() -> None:
    """No STOP within 5 s of BLOCK_IO_ERROR(stop): followup_missed, then a followup_missing."""
    watch, out = make_watch()
    feed(watch, bioerr(T0))
    watch.tick(T0 + 4.999)
    assert out.kinds() == ["qmp_event"]
    watch.tick(T0 + 5.0)
    assert out.kinds() == ["qmp_event", "followup_missed", "alert"]
    missed = out.of("followup_missed")[0]
    assert missed.fields["deadline_s"] == 5.0
    assert missed.fields["reason"] == "deadline"
    alert = out.one_alert("followup_missing")
    assert alert.fields["severity"] == "warning"
    assert "STOP" in alert.fields["summary"]
    assert "BLOCK_IO_ERROR" in alert.fields["summary"]
    watch.tick(T0 + 100)
    assert len(out.of("followup_missed")) == 1


def test_configured_deadline_is_used() -> None:
    """stop_after_block_io_error_s = 0.5 makes a STOP 0.6 s later come too late."""
    watch, out = make_watch(followup=FollowupConfig(stop_after_block_io_error_s=0.5))
    feed(watch, bioerr(T0), ev("STOP", T0 + 0.6))
    assert out.of("followup_satisfied") == []
    assert out.of("followup_missed")[0].fields["deadline_s"] == 0.5
    assert out.status_queries == 1  # the late STOP is unexplained


def test_late_event_ends_overdue_expectations_first() -> None:
    """An event after a deadline (with no tick between) first reports the miss, then itself."""
    watch, out = make_watch()
    feed(watch, ev("WATCHDOG", T0, action="reset"), ev("RESET", T0 + 10))
    assert out.kinds() == ["qmp_event", "alert", "followup_missed", "alert", "qmp_event"]
    assert out.alert_kinds() == ["watchdog_fired", "followup_missing"]


def test_expectations_open_at_disconnect_are_missed_without_alert() -> None:
    """The session ending while a STOP is awaited: followup_missed reason disconnected only."""
    watch, out = make_watch()
    feed(watch, bioerr(T0))
    watch.on_disconnected(T0 + 1, "closed")
    (missed,) = out.of("followup_missed")
    assert missed.fields["reason"] == "disconnected"
    assert "followup_missing" not in out.alert_kinds()
    assert watch.tracker.pending == ()


def test_disconnect_after_a_deadline_is_the_same_with_or_without_a_tick() -> None:
    """A deadline passed before EOF is a miss even if no tick() ran in between."""
    ticked, ticked_out = make_watch()
    late, late_out = make_watch()
    for watch in (ticked, late):
        feed(watch, ev("WATCHDOG", T0, action="poweroff"))
    ticked.tick(T0 + 5.0)
    for watch in (ticked, late):
        watch.on_disconnected(T0 + 60, "eof")
    assert late_out.records == ticked_out.records
    assert "followup_satisfied" not in late_out.kinds()
    assert late_out.alert_kinds() == ["watchdog_fired", "followup_missing", "vm_crashed"]


# ---------------------------------------------------------------------------------------------
# Shutdown, crash, reconnect


def test_shutdown_then_eof_is_clean() -> None:
    """SHUTDOWN then EOF: vm_disconnected cause shutdown, level info, no vm_crashed."""
    watch, out = make_watch()
    feed(watch, ev("SHUTDOWN", T0, guest=True, reason="guest-shutdown"))
    watch.on_disconnected(T0 + 0.1, "eof")
    (disconnected,) = out.of("vm_disconnected")
    assert disconnected.fields["cause"] == "shutdown"
    assert disconnected.level == "info"
    assert out.of("alert") == []
    assert watch.status == "shutdown"


def test_eof_without_shutdown_is_a_crash() -> None:
    """EOF with no SHUTDOWN first: vm_disconnected cause eof (warning) and vm_crashed."""
    watch, out = make_watch()
    feed(watch, ev("RESUME", T0))
    watch.on_disconnected(T0 + 1, "eof")
    (disconnected,) = out.of("vm_disconnected")
    assert disconnected.fields["cause"] == "eof"
    assert disconnected.level == "warning"
    alert = out.one_alert("vm_crashed")
    assert alert.fields["severity"] == "critical"
    assert "without a SHUTDOWN" in alert.fields["summary"]
    assert watch.status is None


def test_error_disconnect_says_the_error() -> None:
    """A session ended by an error keeps that error in the record and in the crash summary."""
    watch, out = make_watch()
    watch.on_disconnected(T0, "error", "ConnectionResetError: [Errno 104]")
    assert out.of("vm_disconnected")[0].fields == {
        "cause": "error",
        "error": "ConnectionResetError: [Errno 104]",
    }
    assert "Errno 104" in out.one_alert("vm_crashed").fields["summary"]


def test_closing_the_session_ourselves_is_no_crash() -> None:
    """qmpwatch closing the session (cause closed) raises nothing."""
    watch, out = make_watch()
    watch.on_disconnected(T0, "closed")
    assert out.of("vm_disconnected")[0].fields["cause"] == "closed"
    assert out.of("alert") == []


def test_shutdown_counts_for_one_session_only() -> None:
    """A SHUTDOWN in an earlier session does not make a later EOF clean."""
    watch, out = make_watch()
    feed(watch, ev("SHUTDOWN", T0))
    watch.on_disconnected(T0 + 1, "eof")
    watch.on_connected(T0 + 10, "running", {"socket": "/run/qemu/web01.qmp"})
    watch.on_disconnected(T0 + 20, "eof")
    assert out.alert_kinds() == ["vm_crashed"]


def test_reconnect_resolves_vm_crashed() -> None:
    """After a crash, the next session up resolves vm_crashed and logs vm_connected."""
    watch, out = make_watch()
    watch.on_disconnected(T0, "eof")
    (crashed,) = out.raised
    watch.on_connected(
        T0 + 5, "running", {"socket": "/run/qemu/web01.qmp", "qemu_version": "7.2.0"}
    )
    connected = out.of("vm_connected")[0]
    assert connected.fields == {
        "socket": "/run/qemu/web01.qmp",
        "qemu_version": "7.2.0",
        "status": "running",
    }
    assert [r.fields["alert"] for r in out.of("alert_resolved")] == ["vm_crashed"]
    assert out.resolved == [resolved_because(crashed, "QEMU's monitor answers again")]


@pytest.mark.parametrize(
    ("status", "severity"),
    [("paused", "warning"), ("io-error", "critical"), ("internal-error", "critical")],
)
def test_connecting_to_a_vm_in_an_unseen_state_alerts(status: str, severity: str) -> None:
    """on_connected in a stopped state never seen raises vm_state_changed_while_unmonitored."""
    watch, out = make_watch(last_status="running")
    watch.on_connected(T0, status, {"socket": "/s"})
    alert = out.one_alert("vm_state_changed_while_unmonitored")
    assert alert.fields["severity"] == severity
    assert status in alert.fields["summary"]
    assert "last known: running" in alert.fields["summary"]
    assert alert.fields["details"] == {"status": status, "previous_status": "running"}


def test_first_connection_in_a_stopped_state_alerts_with_unknown_past() -> None:
    """With no status known, connecting to a paused VM alerts, saying the past is unknown."""
    watch, out = make_watch()
    watch.on_connected(T0, "paused", {})
    assert (
        "last known: unknown"
        in out.one_alert("vm_state_changed_while_unmonitored").fields["summary"]
    )


@pytest.mark.parametrize("status", ["paused", "io-error"])
def test_connecting_in_the_last_known_state_raises_nothing(status: str) -> None:
    """A VM still in the status qmpwatch last knew raises no unmonitored-change alert."""
    watch, out = make_watch(last_status=status)
    watch.on_connected(T0, status, {})
    assert out.of("alert") == []


def test_status_seen_before_a_reconnect_is_not_news() -> None:
    """Paused (alerted), session closed, reconnected still paused: no second alert."""
    watch, out = make_watch()
    feed(watch, ev("STOP", T0))
    watch.on_status("paused", T0 + 0.1)
    watch.on_disconnected(T0 + 1, "closed")
    watch.on_connected(T0 + 2, "paused", {})
    assert out.alert_kinds() == ["vm_stopped_unexpected"]


@pytest.mark.parametrize("status", ["running", "prelaunch", "inmigrate", "shutdown"])
def test_connecting_in_a_normal_state_raises_nothing(status: str) -> None:
    """Running, prelaunch, incoming migration or shut down: no alert on connect."""
    watch, out = make_watch()
    watch.on_connected(T0, status, {})
    assert out.of("alert") == []


def test_connecting_running_resolves_stopped_alerts() -> None:
    """A VM found running on reconnect resolves its stopped alerts."""
    watch, out = make_watch()
    feed(watch, bioerr(T0), ev("STOP", T0 + 0.01))
    watch.on_disconnected(T0 + 1, "closed")
    watch.on_connected(T0 + 2, "running", {})
    assert [r.fields["alert"] for r in out.of("alert_resolved")] == ["vm_stopped_io_error"]


def test_pending_stop_at_disconnect_is_classified_unknown() -> None:
    """A STOP still waiting for its status when the session ends is alerted as unknown."""
    watch, out = make_watch()
    feed(watch, ev("STOP", T0))
    watch.on_disconnected(T0 + 1, "eof")
    alert = out.one_alert("vm_stopped_unexpected")
    assert alert.fields["details"]["status_error"] == "the session ended"


# ---------------------------------------------------------------------------------------------
# -no-shutdown


def test_shutdown_then_stop_under_no_shutdown_is_satisfied() -> None:
    """With -no-shutdown, SHUTDOWN then STOP is a followup_satisfied and no alert, no query."""
    watch, out = make_watch(no_shutdown=True)
    feed(
        watch,
        ev("SHUTDOWN", T0, guest=True, reason="guest-shutdown"),
        ev("STOP", T0 + 0.003),
    )
    (satisfied,) = out.of("followup_satisfied")
    assert (satisfied.fields["cause"], satisfied.fields["expected"]) == ("SHUTDOWN", "STOP")
    assert out.of("alert") == []
    assert out.status_queries == 0


def test_no_stop_after_shutdown_under_no_shutdown_is_missed() -> None:
    """With -no-shutdown, a SHUTDOWN with no STOP within 5 s is a followup_missed."""
    watch, out = make_watch(no_shutdown=True)
    feed(watch, ev("SHUTDOWN", T0))
    watch.tick(T0 + 5)
    assert out.of("followup_missed")[0].fields["cause"] == "SHUTDOWN"


def test_quit_under_no_shutdown_opens_nothing_and_exits_cleanly() -> None:
    """SHUTDOWN(host-qmp-quit) under -no-shutdown expects no STOP; the EOF after it is clean."""
    watch, out = make_watch(no_shutdown=True)
    feed(watch, ev("SHUTDOWN", T0, guest=False, reason="host-qmp-quit"))
    assert watch.tracker.pending == ()
    watch.on_disconnected(T0 + 0.1, "eof")
    assert out.of("followup_missed") == []
    assert out.of("alert") == []


def test_shutdown_then_stop_without_knowing_no_shutdown_is_quiet() -> None:
    """SHUTDOWN then STOP when -no-shutdown was not known: no query, no alert."""
    watch, out = make_watch(no_shutdown=False)
    feed(watch, ev("SHUTDOWN", T0), ev("STOP", T0 + 0.01))
    assert out.status_queries == 0
    assert out.of("alert") == []
    assert watch.status == "shutdown"


# ---------------------------------------------------------------------------------------------
# Guest panic and the dispatch table


def test_guest_panic_pause_alerts_once_and_explains_its_stop() -> None:
    """GUEST_PANICKED(pause) raises vm_panicked; the STOP after it satisfies, no query."""
    watch, out = make_watch()
    feed(watch, ev("GUEST_PANICKED", T0, action="pause"), ev("STOP", T0 + 0.01))
    assert out.alert_kinds() == ["vm_panicked"]
    assert out.of("followup_satisfied")[0].fields["cause"] == "GUEST_PANICKED"
    assert out.status_queries == 0


def test_extra_handlers_run_after_the_default_ones() -> None:
    """with_handlers adds behaviour for an event after the built-in handlers."""
    seen: list[tuple[str, float, int]] = []

    def count(watch: VmWatch, event: Event, now: float) -> None:
        assert isinstance(watch.out, Collect)
        seen.append((event.name, now, len(watch.out.records)))

    table = with_handlers({"STOP": (count,), "POWERDOWN": (count,)})
    watch, out = make_watch(handlers=table)
    feed(watch, ev("STOP", T0), ev("POWERDOWN", T0 + 1))
    assert seen == [("STOP", T0, 1), ("POWERDOWN", T0 + 1, 2)]
    assert out.status_queries == 1  # the built-in STOP handler still ran


# ---------------------------------------------------------------------------------------------
# Property: every opened expectation ends exactly once; one qmp_event per event

STEPS = st.one_of(
    st.tuples(st.just("event"), st.sampled_from(["stop", "report"]), st.just("BLOCK_IO_ERROR")),
    st.tuples(
        st.just("event"),
        st.sampled_from(["reset", "pause", "shutdown", "poweroff", "none"]),
        st.just("WATCHDOG"),
    ),
    st.tuples(
        st.just("event"),
        st.sampled_from(["guest-shutdown", "host-qmp-quit"]),
        st.just("SHUTDOWN"),
    ),
    st.tuples(st.just("event"), st.sampled_from(["pause", "poweroff"]), st.just("GUEST_PANICKED")),
    st.tuples(st.just("event"), st.just(""), st.sampled_from(["STOP", "RESET", "RESUME"])),
    st.tuples(st.just("tick"), st.just(""), st.just("")),
    st.tuples(st.just("status"), st.sampled_from(["paused", "io-error", "running"]), st.just("")),
    st.tuples(st.just("disconnect"), st.sampled_from(["eof", "closed", "error"]), st.just("")),
)


def _opens(name: str, qualifier: str, no_shutdown: bool, stopped: bool) -> bool:
    """The table of tracker.py, written out independently of Rules (`stopped`: the VM is
    known to be stopped, so a drained BLOCK_IO_ERROR or a SHUTDOWN expects no STOP)."""
    if name == "BLOCK_IO_ERROR":
        return qualifier == "stop" and not stopped
    if name == "WATCHDOG":
        return qualifier in ("reset", "pause", "shutdown", "poweroff")
    if name == "SHUTDOWN":
        return no_shutdown and qualifier == "guest-shutdown" and not stopped
    if name == "GUEST_PANICKED":
        return qualifier == "pause"
    return False


@given(
    st.lists(st.tuples(STEPS, st.floats(min_value=0.0, max_value=30.0)), max_size=40),
    st.booleans(),
)
def test_every_expectation_ends_once_over_random_sessions(
    steps: list[tuple[tuple[str, str, str], float]], no_shutdown: bool
) -> None:
    """Random events, clock advances, answers and disconnects: opened == ended + still pending."""
    watch, out = make_watch(no_shutdown=no_shutdown)
    now = T0
    events = opened = 0
    stopped = False  # as the events and statuses so far tell
    for (step, qualifier, name), gap in steps:
        now += gap
        if step == "event":
            data: dict[str, Any] = {}
            if name == "BLOCK_IO_ERROR":
                data = {"device": "d", "operation": "read", "action": qualifier}
            elif name in ("WATCHDOG", "GUEST_PANICKED"):
                data = {"action": qualifier}
            elif name == "SHUTDOWN":
                data = {"guest": True, "reason": qualifier}
            watch.on_event(ev(name, now, **data), now)
            events += 1
            opened += _opens(name, qualifier, no_shutdown, stopped)
            if name == "STOP" or (name == "GUEST_PANICKED" and qualifier == "pause"):
                stopped = True
            elif name == "RESUME":
                stopped = False
        elif step == "tick":
            watch.tick(now)
        elif step == "status":
            watch.on_status(qualifier, now)
            stopped = qualifier != "running"
        else:
            watch.on_disconnected(now, qualifier)
            watch.on_connected(now, "running", {})
            stopped = False
    ended = len(out.of("followup_satisfied")) + len(out.of("followup_missed"))
    assert ended + len(watch.tracker.pending) == opened
    assert len(out.of("qmp_event")) == events
    for record in out.of("followup_satisfied"):
        deadline = {"SHUTDOWN": 120.0}.get(record.fields["expected"], 5.0)
        assert record.fields["latency_ms"] < deadline * 1000
    # an alert is resolved at most once, and only after it was raised
    raised = Counter(a.fingerprint for a in out.raised)
    resolved = Counter(a.fingerprint for a in out.resolved)
    assert all(resolved[f] <= raised[f] for f in resolved)
    assert len(out.of("alert_resolved")) == len(out.resolved)
    assert len(out.of("alert")) == len(out.raised)
    json.dumps([r.fields for r in out.records])  # every record is JSON-serialisable


def test_session_closed_by_qmpwatch_does_not_alert_a_pending_stop() -> None:
    """A STOP awaiting query-status when qmpwatch itself closes the session raises no alert."""
    watch, out = make_watch()
    watch.on_event(ev("STOP"), T0)
    assert out.status_queries == 1
    watch.on_disconnected(T0 + 0.1, "closed")
    assert out.raised == []
    assert out.of("vm_disconnected")[0].fields["cause"] == "closed"


def test_shutdown_then_stop_under_no_shutdown_leaves_status_shutdown() -> None:
    """SHUTDOWN -> STOP under -no-shutdown leaves the known status as shutdown."""
    watch, out = make_watch(no_shutdown=True)
    watch.on_event(ev("SHUTDOWN", T0, guest=True, reason="guest-shutdown"), T0)
    watch.on_event(ev("STOP", T0 + 0.01), T0 + 0.01)
    assert watch.status == "shutdown"
    assert out.raised == []


def test_status_answer_older_than_a_resume_is_ignored() -> None:
    """A `paused` answer handled after a later RESUME does not make the VM look paused."""
    watch, out = make_watch()
    watch.on_event(ev("STOP", T0), T0)
    watch.on_event(ev("RESUME", T0 + 0.01), T0 + 0.01)
    watch.on_status("paused", T0 + 0.02, as_of=1)  # read before RESUME, handled after it
    assert watch.status == "running"
    assert out.alert_kinds() == ["vm_stopped_unexpected"]
    assert [a.kind for a in out.resolved] == ["vm_stopped_unexpected"]


def test_status_answer_after_a_second_stop_waits_for_the_second_question() -> None:
    """STOP, RESUME, STOP: the first answer is stale; the second one classifies the stop."""
    watch, out = make_watch()
    watch.on_event(ev("STOP", T0), T0)
    watch.on_event(ev("RESUME", T0 + 0.01), T0 + 0.01)
    watch.on_event(ev("STOP", T0 + 0.02), T0 + 0.02)
    assert out.status_queries == 2
    watch.on_status("running", T0 + 0.03, as_of=2)  # read between RESUME and the 2nd STOP
    assert watch.pending_stop is not None
    watch.on_status("io-error", T0 + 0.04, as_of=3)
    assert watch.status == "io-error"
    assert out.alert_kinds() == ["vm_stopped_unexpected", "vm_stopped_io_error"]


def test_resync_answer_older_than_a_session_event_keeps_the_event_state() -> None:
    """A resync `running` read before a STOP of the same session does not hide the stop."""
    watch, out = make_watch(last_status="running")
    watch.on_event(ev("STOP", T0), T0)  # handled before the task that resyncs sees its answer
    watch.on_connected(T0 + 0.01, "running", {"socket": "/s"}, as_of=0)
    assert watch.pending_stop is not None
    watch.on_status("paused", T0 + 0.02, as_of=1)
    assert watch.status == "paused"
    assert out.alert_kinds() == ["vm_stopped_unexpected"]


# ---------------------------------------------------------------------------------------------
# The timers of the watch's parts run in one fixed order


def test_timers_due_at_one_tick_run_in_the_fixed_order() -> None:
    """A follow-up deadline and a stuck transient state due at one tick: the missed follow-up
    is recorded first, then the stuck state; the watch lists its timers in `ORDER`."""
    watch, out = make_watch(lifecycle=LifecycleConfig(transient_state_max_s=10.0))
    assert tuple(timer.name for timer in watch.timers) == ORDER
    watch.on_status("inmigrate", T0)
    watch.on_event(ev("WATCHDOG", T0, action="pause"), T0)  # expects a STOP within 5 s
    assert watch.next_deadline() == pytest.approx(T0 + 5.0)
    watch.tick(T0 + 60)
    order = [
        r.kind if r.kind != "alert" else r.fields["alert"]
        for r in out.records
        if r.kind == "followup_missed"
        or (r.kind == "alert" and r.fields["alert"] != "watchdog_fired")
    ]
    assert order == ["followup_missed", "followup_missing", "vm_stuck_transient"]
    assert watch.next_deadline() is None
