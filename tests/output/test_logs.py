"""Structured logs: JSON lines with timestamp, level, event and vm first, as design.md says."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from qmpwatch.core.config import FollowupConfig
from qmpwatch.core.events import Event, decode
from qmpwatch.core.times import iso_from_epoch
from qmpwatch.core.watch import VmWatch
from qmpwatch.output import logs
from qmpwatch.output.logs import LineWriter, RecordLogger

ISO_UTC_MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class CountingStream(io.BytesIO):
    """A BytesIO that counts write() calls (one per batch of lines is the contract)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: object) -> int:
        self.writes += 1
        assert isinstance(data, bytes | bytearray)
        return super().write(data)


@pytest.fixture
def stream() -> Iterator[CountingStream]:
    """structlog configured for JSON lines into a buffer; the defaults are restored after."""
    buffer = CountingStream()
    logs.configure("json", buffer)
    try:
        yield buffer
    finally:
        logs.unconfigure()


def lines_of(stream: io.BytesIO) -> list[dict[str, object]]:
    """Every line written, each parsed as one JSON object (keys in written order)."""
    text = stream.getvalue().decode("utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------------------------
# Timestamps


@pytest.mark.parametrize(
    ("now", "shown"),
    [
        (0.0, "1970-01-01T00:00:00.000000Z"),
        (1265044230.450486, "2010-02-01T17:10:30.450486Z"),
        (1267041653.009518, "2010-02-24T20:00:53.009518Z"),
        (1.9999999, "1970-01-01T00:00:02.000000Z"),
        (1700000000.0000004, "2023-11-14T22:13:20.000000Z"),
    ],
)
def test_timestamps_are_iso_8601_utc_with_microseconds(now: float, shown: str) -> None:
    """Epoch seconds are shown as UTC, six fractional digits, Z; rounding carries the second."""
    assert iso_from_epoch(now) == shown


@given(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=999_999),
)
def test_timestamp_of_a_qemu_time_shows_its_microseconds(seconds: int, micro: int) -> None:
    """Any QEMU timestamp (seconds, µs) as an epoch float is shown with exactly those digits."""
    shown = iso_from_epoch(seconds + micro / 1_000_000)
    expected = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert shown == f"{expected}.{micro:06d}Z"
    assert ISO_UTC_MICRO.match(shown)


# ---------------------------------------------------------------------------------------------
# Records as dicts (capture_logs)


def test_record_logger_binds_vm_and_uses_the_given_time() -> None:
    """RecordLogger.record logs the kind as event, at the level given, with vm and timestamp."""
    with capture_logs() as captured:
        RecordLogger("web01").record(
            "followup_satisfied",
            "info",
            1265044230.450486,
            {"cause": "BLOCK_IO_ERROR", "expected": "STOP", "latency_ms": 20.0},
        )
    assert captured == [
        {
            "event": "followup_satisfied",
            "log_level": "info",
            "vm": "web01",
            "timestamp": "2010-02-01T17:10:30.450486Z",
            "cause": "BLOCK_IO_ERROR",
            "expected": "STOP",
            "latency_ms": 20.0,
        }
    ]


def test_watch_records_reach_the_log_with_vm() -> None:
    """A VmWatch writing through RecordLogger gives records with vm, event and the contract keys."""

    class Output(RecordLogger):
        def raise_alert(self, alert: object) -> None:
            pass

        def resolve_alert(self, alert: object, now: float) -> None:
            pass

        def query_status(self) -> None:
            pass

        def command(self, name: str, arguments: object) -> None:
            pass

    with capture_logs() as captured:
        watch = VmWatch("db01", Output("db01"), followup=FollowupConfig())
        event = decode(
            b'{"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": "BLOCK_IO_ERROR",'
            b' "data": {"device": "drive0", "operation": "write", "action": "stop"}}\r\n'
        )
        assert isinstance(event, Event)
        watch.on_event(event, 1700000000.000005)
        watch.tick(1700000005.000005)
    assert [(r["event"], r["log_level"], r["vm"]) for r in captured] == [
        ("qmp_event", "info", "db01"),
        ("followup_missed", "warning", "db01"),
        ("alert", "warning", "db01"),
    ]
    assert captured[0]["qmp"] == "BLOCK_IO_ERROR"
    assert captured[0]["qemu_time"] == "2023-11-14T22:13:20.000005Z"
    assert captured[1]["deadline_s"] == 5.0
    assert captured[2]["alert"] == "followup_missing"


# ---------------------------------------------------------------------------------------------
# Rendered JSON lines


def test_json_line_has_timestamp_level_event_vm_first(stream: CountingStream) -> None:
    """A record is one line of JSON: timestamp, level, event, vm, then its own keys in order."""
    RecordLogger("web01").record(
        "qmp_event",
        "info",
        1265044230.450486,
        {"qmp": "STOP", "qemu_time": "2010-02-01T17:10:30.450486Z", "data": {}},
    )
    raw = stream.getvalue()
    assert raw.count(b"\n") == 1
    assert raw.endswith(b"\n")
    (line,) = lines_of(stream)
    assert list(line) == ["timestamp", "level", "event", "vm", "qmp", "qemu_time", "data"]
    assert line == {
        "timestamp": "2010-02-01T17:10:30.450486Z",
        "level": "info",
        "event": "qmp_event",
        "vm": "web01",
        "qmp": "STOP",
        "qemu_time": "2010-02-01T17:10:30.450486Z",
        "data": {},
    }


@pytest.mark.parametrize("level", ["info", "warning", "critical"])
def test_level_is_the_records_level(stream: CountingStream, level: str) -> None:
    """Alert records are logged at their severity, and "level" says it."""
    RecordLogger("web01").record("alert", level, 0.0, {"alert": "vm_crashed", "severity": level})
    (line,) = lines_of(stream)
    assert line["level"] == level


def test_records_without_a_time_get_now(stream: CountingStream) -> None:
    """A record logged without a timestamp gets the current time, in the same format."""
    before = datetime.now(UTC)
    structlog.get_logger().info("vm_connect_failed", vm="web01", reason="missing")
    after = datetime.now(UTC)
    (line,) = lines_of(stream)
    stamp = line["timestamp"]
    assert isinstance(stamp, str)
    assert ISO_UTC_MICRO.match(stamp)
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before.replace(microsecond=0) <= when <= after
    assert list(line)[:4] == ["timestamp", "level", "event", "vm"]


def test_event_data_is_rendered_as_received(stream: CountingStream) -> None:
    """A qmp_event's data (nested, non-ASCII, u64, booleans) is an object in the line, intact."""
    data = {
        "device": "disque-é-0",
        "len": 18446744073709551615,
        "nospace": False,
        "server": {"websocket": False, "host": "::1"},
    }
    RecordLogger("web01").record("qmp_event", "info", 1.0, {"qmp": "X", "data": data})
    (line,) = lines_of(stream)
    assert line["data"] == data


def test_each_record_is_written_at_once_outside_an_event_loop(stream: CountingStream) -> None:
    """Without a running loop (replay, check-config) every record is written immediately."""
    log = RecordLogger("web01")
    log.record("qmp_event", "info", 1.0, {"qmp": "STOP"})
    assert stream.writes == 1
    log.record("qmp_event", "info", 2.0, {"qmp": "RESUME"})
    assert stream.writes == 2
    assert [line["qmp"] for line in lines_of(stream)] == ["STOP", "RESUME"]


async def test_a_burst_in_one_loop_turn_is_one_write(stream: CountingStream) -> None:
    """Inside the event loop, records of one turn are written together at the end of the turn."""
    log = RecordLogger("web01")
    for qmp in ("BLOCK_IO_ERROR", "STOP", "RESUME"):
        log.record("qmp_event", "info", 1.0, {"qmp": qmp})
    assert stream.writes == 0
    turn_over = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(turn_over.set_result, None)
    await turn_over
    assert stream.writes == 1
    assert [line["qmp"] for line in lines_of(stream)] == ["BLOCK_IO_ERROR", "STOP", "RESUME"]


def test_a_closed_output_loses_records_but_does_not_raise() -> None:
    """Writing to a pipe nobody reads any more drops the lines instead of failing the caller;
    the writer stays usable: once the output works again, later lines go out (the lost ones
    are not replayed)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb", buffering=0) as pipe:
        writer = LineWriter(pipe)
        with pytest.raises(BrokenPipeError):
            pipe.write(b"x")  # the output is really gone: each write fails
        writer.msg(b'{"event":"qmp_event"}\n')  # outside a loop: written (tried) at once
        writer.msg('{"event":"qmp_event"}')
        working = io.BytesIO()
        writer.stream = working
        writer.msg(b'{"event":"vm_connected"}\n')
    assert working.getvalue() == b'{"event":"vm_connected"}\n'


def test_stdlib_warnings_become_library_log_records(stream: CountingStream) -> None:
    """A stdlib logger's warning is routed through structlog as a library_log JSON line."""
    logging.getLogger("some.library").warning("disk %s is slow", "sda")
    (line,) = lines_of(stream)
    assert line["event"] == "library_log"
    assert line["level"] == "warning"
    assert line["logger"] == "some.library"
    assert line["message"] == "disk sda is slow"


def test_qemu_qmp_below_critical_is_quiet(stream: CountingStream) -> None:
    """qemu.qmp's own connect errors are not logged (qmpwatch reports them with context)."""
    logging.getLogger("qemu.qmp.protocol").error("Failed to establish connection")
    assert stream.getvalue() == b""


def test_console_format_is_for_people() -> None:
    """--log-format console renders a readable line with the event name and the VM."""
    buffer = io.BytesIO()
    try:
        logs.configure("console", buffer)
        RecordLogger("web01").record(
            "vm_connected",
            "info",
            0.0,
            {"socket": "/run/qemu/web01.qmp", "qemu_version": "7.2.22", "status": "running"},
        )
        RecordLogger("web01").record(
            "qmp_event", "info", 1.5, {"qmp": "STOP", "qemu_time": "x", "data": {}}
        )
    finally:
        logs.unconfigure()
    first, second = buffer.getvalue().decode().splitlines()
    assert first == (
        "00:00:00.000 web01      connected to /run/qemu/web01.qmp (QEMU 7.2.22, status running)"
    )
    assert second == "00:00:01.500 web01      STOP"
