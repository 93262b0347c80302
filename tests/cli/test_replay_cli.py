"""`qmpwatch replay`, run as the real command on captured streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.spec_examples import NEWEST, OLDER, examples

T0 = 1_700_000_000


def qemu_line(name: str, seconds: int, micro: int = 0, **data: Any) -> bytes:
    """An event line as QEMU 7.2 writes it: timestamp first, ", " separators, \\r\\n."""
    message: dict[str, Any] = {
        "timestamp": {"seconds": seconds, "microseconds": micro},
        "event": name,
    }
    if data:
        message["data"] = {k.replace("_", "-"): v for k, v in data.items()}
    return json.dumps(message).encode() + b"\r\n"


GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": '
    b'"Debian 1:7.2+dfsg-7+deb12u6"}, "capabilities": ["oob"]}}\r\n'
)
CAPABILITIES_REPLY = b'{"return": {}}\r\n'


def iso(seconds: int, micro: int) -> str:
    shown = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{shown}.{micro:06d}Z"


def run(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "qmpwatch", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


def replay(path: Path, *args: str) -> list[dict[str, Any]]:
    """Run `qmpwatch replay ARGS PATH`; it must succeed; every stdout line parsed as JSON."""
    done = run("replay", *args, str(path))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    return records_of(done.stdout)


def records_of(stdout: bytes) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stdout.decode().splitlines()]
    for record in records:
        assert list(record)[:4] == ["timestamp", "level", "event", "vm"], record
    return records


def write(tmp_path: Path, *lines: bytes) -> Path:
    path = tmp_path / "capture.qmp"
    path.write_bytes(b"".join(lines))
    return path


def of(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == kind]


def alerts(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["alert"], r["severity"]) for r in of(records, "alert")]


@pytest.fixture
def spec_capture(tmp_path: Path) -> Path:
    """Every example of spec/qmp-events.txt, one QEMU-style line each, in document order."""
    return write(tmp_path, *(json.dumps(obj).encode() + b"\r\n" for _, obj in examples(NEWEST)))


# ---------------------------------------------------------------------------------------------
# The spec's examples


def test_replay_of_every_spec_example_logs_each_once(spec_capture: Path) -> None:
    """One qmp_event per example, in order, with qmp, vm, qemu_time and data per the contract."""
    records = replay(spec_capture)
    sent = [obj for _, obj in examples(NEWEST)]
    events = of(records, "qmp_event")
    assert len(events) == len(sent) == 12
    for record, obj in zip(events, sent, strict=True):
        stamp = obj["timestamp"]
        assert record["qmp"] == obj["event"]
        assert record["vm"] == "replay"
        assert record["level"] == "info"
        assert record["qemu_time"] == iso(stamp["seconds"], stamp["microseconds"])
        assert record["data"] == obj.get("data", {})
    # QEMU's time is the clock: the first record is dated by the first event
    assert records[0]["timestamp"] == events[0]["qemu_time"]


def test_replay_of_the_spec_reports_its_follow_ups(spec_capture: Path) -> None:
    """The document's BLOCK_IO_ERROR(stop) has no STOP within 5 s; its WATCHDOG(reset) is open."""
    records = replay(spec_capture)
    follow_ups = [
        (r["event"], r["cause"], r["expected"])
        for r in records
        if r["event"].startswith("followup_")
    ]
    assert follow_ups == [
        ("followup_missed", "BLOCK_IO_ERROR", "STOP"),
        ("followup_open", "WATCHDOG", "RESET"),
    ]
    (missed,) = of(records, "followup_missed")
    assert missed["deadline_s"] == 5.0
    assert missed["timestamp"] == iso(1265044230 + 5, 450486)
    assert alerts(records) == [("followup_missing", "warning"), ("watchdog_fired", "critical")]


def test_replay_of_the_older_revision_shows_its_mislabelled_stop(tmp_path: Path) -> None:
    """The older document's 8 examples replay as 8 qmp_events, its STOP example as a SHUTDOWN."""
    path = write(tmp_path, *(json.dumps(obj).encode() + b"\n" for _, obj in examples(OLDER)))
    events = of(replay(path), "qmp_event")
    assert [r["qmp"] for r in events] == [
        "BLOCK_IO_ERROR",
        "RESET",
        "RTC_CHANGE",
        "SHUTDOWN",
        "SHUTDOWN",
        "VNC_CONNECTED",
        "VNC_DISCONNECTED",
        "VNC_INITIALIZED",
    ]


def test_replay_is_deterministic(spec_capture: Path) -> None:
    """Two runs (even in another time zone) print byte-identical output."""
    first = run("replay", str(spec_capture))
    second = run("replay", str(spec_capture), env=os.environ | {"TZ": "America/New_York"})
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    assert first.stdout.count(b"\n") == len(records_of(first.stdout)) > 12


def test_replay_names_the_vm(spec_capture: Path) -> None:
    """--vm NAME puts that name in every record."""
    records = replay(spec_capture, "--vm", "web01")
    assert {r["vm"] for r in records} == {"web01"}


def test_replay_reads_standard_input(spec_capture: Path) -> None:
    """`qmpwatch replay -` reads the stream from stdin and prints the same as from the file."""
    from_stdin = run("replay", "-", stdin=spec_capture.read_bytes())
    from_file = run("replay", str(spec_capture))
    assert from_stdin.returncode == 0
    assert from_stdin.stdout == from_file.stdout
    assert len(of(records_of(from_stdin.stdout), "qmp_event")) == 12


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_lines_become_decode_errors_and_the_replay_goes_on(tmp_path: Path) -> None:
    """Garbage, a non-object and a mistyped event mid-stream are qmp_decode_error records."""
    bad_type = qemu_line("BLOCK_IO_ERROR", T0, 2, device=5, operation="read", action="stop")
    path = write(
        tmp_path,
        qemu_line("BLOCK_IO_ERROR", T0, 0, device="drive0", operation="read", action="stop"),
        b"this is not json\r\n",
        b"[1, 2, 3]\r\n",
        b"\r\n",
        bad_type,
        b'{"event": "STOP", "timestamp": {"seconds": \xff}}\r\n',
        qemu_line("STOP", T0, 1000),
        qemu_line("RESUME", T0 + 30),
    )
    records = replay(path)
    errors = of(records, "qmp_decode_error")
    assert [e["error"].split(":")[0] for e in errors] == [
        "not JSON",
        "not a JSON object",
        "data.device",
        "not JSON",
    ]
    assert errors[0]["raw"].rstrip() == "this is not json"
    assert errors[1]["raw"].rstrip() == "[1, 2, 3]"
    assert errors[2]["raw"].rstrip() == bad_type.decode().rstrip()
    assert "\ufffd" in errors[3]["raw"]
    assert {e["level"] for e in errors} == {"warning"}
    assert {e["timestamp"] for e in errors} == {iso(T0, 0)}  # the last good time
    assert [r["qmp"] for r in of(records, "qmp_event")] == ["BLOCK_IO_ERROR", "STOP", "RESUME"]
    (satisfied,) = of(records, "followup_satisfied")
    assert satisfied["latency_ms"] == 1.0


def test_missing_file_fails_with_a_message(tmp_path: Path) -> None:
    """Replaying a file that does not exist exits non-zero and says why on stderr."""
    done = run("replay", str(tmp_path / "nope.qmp"))
    assert done.returncode != 0
    assert b"No such file or directory" in done.stderr
    assert b"Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# Follow-ups and classification


def test_io_error_capture_as_qemu_writes_it(tmp_path: Path) -> None:
    """Greeting, BLOCK_IO_ERROR(stop), STOP, RESUME: satisfied, io-error alert, then resolved."""
    path = write(
        tmp_path,
        GREETING,
        CAPABILITIES_REPLY,
        qemu_line(
            "BLOCK_IO_ERROR",
            T0,
            100,
            device="drive0",
            node_name="#block148",
            operation="read",
            action="stop",
            nospace=False,
            reason="Input/output error",
        ),
        qemu_line("STOP", T0, 2100),
        qemu_line("RESUME", T0 + 60, 0),
    )
    records = replay(path, "--vm", "web01")
    assert [r["event"] for r in records] == [
        "qmp_event",
        "qmp_event",
        "followup_satisfied",
        "alert",
        "qmp_event",
        "alert_resolved",
    ]
    assert records[2]["latency_ms"] == 2.0
    alert = records[3]
    assert (alert["alert"], alert["severity"], alert["level"]) == (
        "vm_stopped_io_error",
        "critical",
        "critical",
    )
    assert alert["summary"] == "VM web01 paused: read error on drive0 (Input/output error)"
    assert alert["details"]["node-name"] == "#block148"
    assert records[5]["alert"] == "vm_stopped_io_error"


def test_no_shutdown_makes_shutdown_then_stop_a_satisfied_follow_up(tmp_path: Path) -> None:
    """With --no-shutdown, SHUTDOWN then STOP is followup_satisfied; without, it is not checked."""
    path = write(
        tmp_path,
        qemu_line("SHUTDOWN", T0, 0, guest=True, reason="guest-shutdown"),
        qemu_line("STOP", T0, 3000),
    )
    with_flag = replay(path, "--no-shutdown")
    (satisfied,) = of(with_flag, "followup_satisfied")
    assert (satisfied["cause"], satisfied["expected"]) == ("SHUTDOWN", "STOP")
    assert satisfied["latency_ms"] == 3.0
    assert alerts(with_flag) == []
    without = replay(path)
    assert of(without, "followup_satisfied") == []
    assert alerts(without) == []


def test_no_shutdown_reports_a_missing_stop(tmp_path: Path) -> None:
    """With --no-shutdown, a SHUTDOWN and then nothing for 5 s is a followup_missed."""
    path = write(
        tmp_path,
        qemu_line("SHUTDOWN", T0, 0, guest=True, reason="guest-shutdown"),
        qemu_line("RTC_CHANGE", T0 + 6, 0, offset=1),
    )
    (missed,) = of(replay(path, "--no-shutdown"), "followup_missed")
    assert (missed["cause"], missed["expected"]) == ("SHUTDOWN", "STOP")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("io-error", [("vm_stopped_io_error", "critical")]),
        ("watchdog", [("vm_stopped_watchdog", "critical")]),
        ("guest-panicked", [("vm_panicked", "critical")]),
        ("paused", [("vm_stopped_unexpected", "warning")]),
        ("postmigrate", []),
    ],
)
def test_query_status_reply_classifies_an_unexplained_stop(
    tmp_path: Path, status: str, expected: list[tuple[str, str]]
) -> None:
    """A {"return": {"status": ...}} line after an unexplained STOP decides its alert."""
    path = write(
        tmp_path,
        GREETING,
        CAPABILITIES_REPLY,
        qemu_line("STOP", T0, 0),
        json.dumps({"return": {"status": status, "singlestep": False, "running": False}}).encode()
        + b"\r\n",
    )
    records = replay(path)
    assert alerts(records) == expected
    for record in of(records, "alert"):
        assert record["details"]["status"] == status
        assert "status_error" not in record["details"]


def test_a_qemu_10_stream_replays_as_a_qemu_7_2_one(tmp_path: Path) -> None:
    """QEMU 10.0's greeting and its query-status reply without `singlestep` give the records
    QEMU 7.2's give (the version aside)."""
    greeting_10 = (
        b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": '
        b'"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}\r\n'
    )
    streams = {
        "7.2": (GREETING, b'{"return": {"status": "io-error", "singlestep": false, '
                b'"running": false}}\r\n'),
        "10.0": (greeting_10, b'{"return": {"status": "io-error", "running": false}}\r\n'),
    }  # fmt: skip
    records = {}
    for version, (greeting, reply) in streams.items():
        (tmp_path / version).mkdir()
        stop = qemu_line("STOP", T0, 0)
        records[version] = replay(
            write(tmp_path / version, greeting, CAPABILITIES_REPLY, stop, reply)
        )
    assert records["10.0"] == records["7.2"]
    assert alerts(records["10.0"]) == [("vm_stopped_io_error", "critical")]


def test_stop_without_a_status_reply_is_unexpected(tmp_path: Path) -> None:
    """An unexplained STOP with no reply before the next event is critical, status unknown."""
    path = write(tmp_path, qemu_line("STOP", T0, 0), qemu_line("RESET", T0 + 1, 0))
    records = replay(path)
    assert alerts(records) == [("vm_stopped_unexpected", "critical")]
    (alert,) = of(records, "alert")
    assert alert["details"]["status_error"] == "no query-status reply in the stream"
    assert [r["event"] for r in records][:2] == ["qmp_event", "alert"]


def test_expectations_open_at_the_end_are_reported(tmp_path: Path) -> None:
    """A BLOCK_IO_ERROR(stop) last in the stream gives a followup_open record with its rule."""
    path = write(
        tmp_path,
        qemu_line("RESUME", T0, 0),
        qemu_line("BLOCK_IO_ERROR", T0 + 1, 0, device="drive0", operation="write", action="stop"),
        qemu_line("WATCHDOG", T0 + 2, 500_000, action="shutdown"),
    )
    records = replay(path)
    open_ = of(records, "followup_open")
    assert [(r["cause"], r["expected"], r["deadline_s"]) for r in open_] == [
        ("BLOCK_IO_ERROR", "STOP", 5.0),
        ("WATCHDOG", "SHUTDOWN", 120.0),
    ]
    assert [r["open_ms"] for r in open_] == [1500.0, 0.0]
    assert records[-2:] == open_


def test_deadlines_come_from_the_config_file(tmp_path: Path) -> None:
    """-c FILE sets the deadlines: with 0.5 s, a STOP 1 s after the error is late."""
    config = tmp_path / "config.toml"
    config.write_text("[followup]\nstop_after_block_io_error_s = 0.5\n")
    path = write(
        tmp_path,
        qemu_line("BLOCK_IO_ERROR", T0, 0, device="drive0", operation="write", action="stop"),
        qemu_line("STOP", T0 + 1, 0),
    )
    records = replay(path, "-c", str(config))
    (missed,) = of(records, "followup_missed")
    assert missed["deadline_s"] == 0.5
    assert of(records, "followup_satisfied") == []
    assert of(replay(path), "followup_satisfied") != []


def test_invalid_config_stops_the_replay(tmp_path: Path) -> None:
    """-c with an invalid file exits non-zero, the problem on stderr, nothing replayed."""
    config = tmp_path / "config.toml"
    config.write_text('[followup]\nstop_after_block_io_error_s = "soon"\n')
    path = write(tmp_path, qemu_line("STOP", T0, 0))
    done = run("replay", "-c", str(config), str(path))
    assert done.returncode != 0
    assert done.stdout == b""
    assert b'followup.stop_after_block_io_error_s: expected a number, got "soon"' in done.stderr
