"""Lifecycle decisions on captured streams, through the real `qmpwatch replay` command.

For what a real QEMU cannot be made to send here (a disk error that drains after the stop, a
closed display window, memory failures, corrupt images, failed migrations and block jobs),
the streams below are written as QEMU 7.2 writes them, with fields from QEMU's QAPI schema.
`replay` runs the same core as the daemon, so these are the daemon's decisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_replay_cli import T0, alerts, of, qemu_line, replay, write


def status_reply(status: str) -> bytes:
    """A query-status answer as QEMU writes it (replay reads it as the answer to a STOP)."""
    body = {"return": {"status": status, "singlestep": False, "running": status == "running"}}
    return json.dumps(body).encode() + b"\r\n"


def config_file(tmp_path: Path, **lifecycle: float) -> Path:
    path = tmp_path / "lifecycle.toml"
    path.write_text("[lifecycle]\n" + "".join(f"{k} = {v}\n" for k, v in lifecycle.items()))
    return path


def followups(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(r["event"], r["rule"], r.get("reason", "")) for r in records if "rule" in r]


def test_disk_errors_that_drain_after_the_stop_expect_no_second_stop(tmp_path: Path) -> None:
    """BLOCK_IO_ERROR, STOP, then two drained BLOCK_IO_ERRORs: one satisfied rule, no misses."""
    error = {"device": "drive0", "node_name": "#block158", "operation": "write", "action": "stop",
             "nospace": True, "reason": "No space left on device"}  # fmt: skip
    capture = write(
        tmp_path,
        qemu_line("BLOCK_IO_ERROR", T0, 100, **error),
        qemu_line("STOP", T0, 150),
        qemu_line("BLOCK_IO_ERROR", T0, 900, **error),
        qemu_line("BLOCK_IO_ERROR", T0 + 1, 200, **error),
        qemu_line("RTC_CHANGE", T0 + 30, 0, offset=0, qom_path="/machine/unattached/device[8]"),
    )
    records = replay(capture)
    assert followups(records) == [("followup_satisfied", "stop_after_block_io_error", "")]
    assert alerts(records) == [("vm_stopped_io_error", "critical")]
    assert len(of(records, "qmp_event")) == 5


def test_a_disk_error_after_resume_expects_a_stop_again(tmp_path: Path) -> None:
    """After RESUME the VM runs: the next BLOCK_IO_ERROR(stop) opens an expectation again."""
    error = {"device": "drive0", "operation": "read", "action": "stop", "nospace": False}
    capture = write(
        tmp_path,
        qemu_line("BLOCK_IO_ERROR", T0, 0, **error),
        qemu_line("STOP", T0, 10),
        qemu_line("RESUME", T0 + 20, 0),
        qemu_line("BLOCK_IO_ERROR", T0 + 21, 0, **error),
        qemu_line("RTC_CHANGE", T0 + 40, 0, offset=0),
    )
    assert followups(replay(capture)) == [
        ("followup_satisfied", "stop_after_block_io_error", ""),
        ("followup_missed", "stop_after_block_io_error", "deadline"),
    ]


@pytest.mark.parametrize("reason", ["host-qmp-quit", "host-signal", "host-ui"])
def test_shutdowns_that_make_qemu_exit_expect_no_stop(tmp_path: Path, reason: str) -> None:
    """Under -no-shutdown, `quit`, a signal and a closed window end QEMU: no STOP is owed."""
    capture = write(
        tmp_path,
        qemu_line("SHUTDOWN", T0, 0, guest=False, reason=reason),
        qemu_line("RTC_CHANGE", T0 + 30, 0, offset=0),
    )
    records = replay(capture, "--no-shutdown")
    assert followups(records) == []
    assert alerts(records) == []


def test_a_guest_shutdown_under_no_shutdown_still_expects_its_stop(tmp_path: Path) -> None:
    """The guest's own poweroff under -no-shutdown is followed by STOP (the rule stays)."""
    capture = write(
        tmp_path,
        qemu_line("SHUTDOWN", T0, 0, guest=True, reason="guest-shutdown"),
        qemu_line("RTC_CHANGE", T0 + 30, 0, offset=0),
    )
    assert followups(replay(capture, "--no-shutdown")) == [
        ("followup_missed", "stop_after_shutdown", "deadline")
    ]


def test_a_watchdog_reset_under_no_reboot_is_satisfied_by_its_shutdown(tmp_path: Path) -> None:
    """WATCHDOG(reset) then SHUTDOWN(guest-reset), as QEMU 7.2 does under -no-reboot."""
    capture = write(
        tmp_path,
        qemu_line("WATCHDOG", T0, 0, action="reset"),
        qemu_line("SHUTDOWN", T0, 40, guest=True, reason="guest-reset"),
        qemu_line("STOP", T0, 60),
        qemu_line("RTC_CHANGE", T0 + 30, 0, offset=0),
    )
    assert followups(replay(capture, "--no-shutdown")) == [
        ("followup_satisfied", "reset_after_watchdog", ""),
        ("followup_satisfied", "stop_after_shutdown", ""),
    ]


def test_a_panic_with_information_carries_it_in_the_alert(tmp_path: Path) -> None:
    """GUEST_PANICKED(run) with Hyper-V crash parameters: the alert's details carry them."""
    info = {"type": "hyper-v", "arg1": 30, "arg2": 0, "arg3": 0, "arg4": 0, "arg5": 0}
    capture = write(tmp_path, qemu_line("GUEST_PANICKED", T0, 0, action="run", info=info))
    (alert,) = of(replay(capture), "alert")
    assert alert["alert"] == "vm_panicked"
    assert alert["severity"] == "critical"
    assert alert["details"]["info"] == info
    assert alert["details"]["action"] == "run"
    assert "kept running" in alert["summary"]


def test_a_crash_kernel_after_a_panic_is_the_same_incident(tmp_path: Path) -> None:
    """GUEST_PANICKED then GUEST_CRASHLOADED: one alert; the reset of the kdump reboot ends it."""
    capture = write(
        tmp_path,
        qemu_line("GUEST_PANICKED", T0, 0, action="run"),
        qemu_line("GUEST_CRASHLOADED", T0 + 1, 0, action="run"),
        qemu_line("RESET", T0 + 9, 0, guest=True, reason="guest-reset"),
    )
    records = replay(capture)
    assert alerts(records) == [("vm_panicked", "critical")]
    (resolved,) = of(records, "alert_resolved")
    assert resolved["alert"] == "vm_panicked"
    assert resolved["reason"] == "the guest was reset (RESET)"


def test_a_crash_kernel_alone_is_a_panic(tmp_path: Path) -> None:
    """GUEST_CRASHLOADED with no GUEST_PANICKED before it still raises vm_panicked."""
    capture = write(tmp_path, qemu_line("GUEST_CRASHLOADED", T0, 0, action="run"))
    (alert,) = of(replay(capture), "alert")
    assert (alert["alert"], alert["details"]["cause_event"]) == ("vm_panicked", "GUEST_CRASHLOADED")


def test_watchdog_resets_again_and_again_are_one_crash_loop(tmp_path: Path) -> None:
    """Three watchdog resets within the window: one critical vm_crash_loop, the third reset
    no page of its own; it resolves after the quiet time."""
    lines = []
    for n in range(3):
        lines.append(qemu_line("WATCHDOG", T0 + 60 * n, 0, action="reset"))
        lines.append(qemu_line("RESET", T0 + 60 * n, 500, guest=True, reason="watchdog"))
    lines.append(qemu_line("RTC_CHANGE", T0 + 120 + 901, 0, offset=0))
    records = replay(write(tmp_path, *lines))
    assert alerts(records) == [
        ("watchdog_fired", "critical"),
        ("watchdog_fired", "critical"),
        ("vm_crash_loop", "critical"),
        ("watchdog_fired", "info"),
    ]
    loop = of(records, "alert")[2]
    assert loop["details"]["by_kind"] == {"watchdog": 3}
    (resolved,) = of(records, "alert_resolved")
    assert resolved["alert"] == "vm_crash_loop"
    assert resolved["reason"] == "no incident for 900 s"


def test_incidents_spread_wider_than_the_window_are_no_loop(tmp_path: Path) -> None:
    """Three panics 400 s apart with a 600 s window: never three within it, no loop."""
    lines = [qemu_line("GUEST_PANICKED", T0 + 400 * n, 0, action="run") for n in range(3)]
    lines += [qemu_line("RESET", T0 + 400 * n + 5, 0, guest=True, reason="guest-reset")
              for n in range(3)]  # fmt: skip
    lines.sort(key=lambda line: json.loads(line)["timestamp"]["seconds"])
    records = replay(write(tmp_path, *lines))
    assert [a for a, _ in alerts(records)] == ["vm_panicked"] * 3


def test_crash_loop_thresholds_come_from_the_config(tmp_path: Path) -> None:
    """crash_loop_count = 2 makes the second panic a loop."""
    cfg = config_file(tmp_path, crash_loop_count=2, crash_loop_window_s=60.0)
    lines = [
        qemu_line("GUEST_PANICKED", T0, 0, action="run"),
        qemu_line("RESET", T0 + 5, 0, guest=True, reason="guest-reset"),
        qemu_line("GUEST_PANICKED", T0 + 30, 0, action="run"),
    ]
    records = replay(write(tmp_path, *lines), "-c", str(cfg))
    assert alerts(records) == [
        ("vm_panicked", "critical"),
        ("vm_crash_loop", "critical"),
        ("vm_panicked", "info"),
    ]


@pytest.mark.parametrize(
    ("name", "data", "kind", "severity"),
    [
        ("BLOCK_IMAGE_CORRUPTED",
         {"device": "", "node_name": "disk0", "msg": "L1 table offset invalid", "offset": 196608,
          "size": 65536, "fatal": True},
         "vm_image_corrupted", "critical"),
        ("MEMORY_FAILURE",
         {"recipient": "guest", "action": "inject", "flags": {"action-required": True,
                                                              "recursive": False}},
         "vm_memory_failure", "warning"),
        ("MEMORY_FAILURE",
         {"recipient": "hypervisor", "action": "fatal", "flags": {"action-required": False,
                                                                  "recursive": False}},
         "vm_memory_failure", "critical"),
        ("BLOCK_JOB_ERROR", {"device": "mirror0", "operation": "write", "action": "stop"},
         "block_job_error", "warning"),
        ("MIGRATION", {"status": "failed"}, "migration_failed", "warning"),
    ],
)  # fmt: skip
def test_events_beyond_the_spec_that_mean_danger_are_alerted(
    tmp_path: Path, name: str, data: dict[str, Any], kind: str, severity: str
) -> None:
    """Each of these events raises its alert, once, with QEMU's time."""
    records = replay(write(tmp_path, qemu_line(name, T0, 250, **data)))
    (alert,) = of(records, "alert")
    assert (alert["alert"], alert["severity"]) == (kind, severity)
    assert alert["details"]["qemu_time"].endswith(".000250Z")
    assert alert["vm"] == "replay"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("BLOCK_IMAGE_CORRUPTED", {"device": "", "node_name": "disk0", "msg": "x", "fatal": False}),
        ("MEMORY_FAILURE",
         {"recipient": "guest", "action": "ignore", "flags": {"action-required": False,
                                                              "recursive": False}}),
        ("MIGRATION", {"status": "active"}),
        ("MIGRATION", {"status": "completed"}),
    ],
)  # fmt: skip
def test_harmless_forms_of_those_events_are_logged_only(
    tmp_path: Path, name: str, data: dict[str, Any]
) -> None:
    """A non-fatal corruption note, an ignored memory error, a migration going fine: no alert."""
    records = replay(write(tmp_path, qemu_line(name, T0, 0, **data)))
    assert of(records, "alert") == []
    assert len(of(records, "qmp_event")) == 1


def test_events_with_fields_of_the_wrong_type_raise_nothing_odd(tmp_path: Path) -> None:
    """Fields of unexpected types in these untyped events neither crash nor invent alerts."""
    capture = write(
        tmp_path,
        qemu_line("MEMORY_FAILURE", T0, 0, recipient=5, action=["fatal"], flags="x"),
        qemu_line("BLOCK_JOB_ERROR", T0, 1, device=None, operation=3, action={}),
        qemu_line("BLOCK_IMAGE_CORRUPTED", T0, 2, fatal="yes"),
        qemu_line("MIGRATION", T0, 3, status=7),
    )
    records = replay(capture)
    assert alerts(records) == [("block_job_error", "warning")]
    assert of(records, "internal_error") == []
    assert len(of(records, "qmp_event")) == 4


def test_a_vm_stuck_in_a_transient_state_is_alerted_and_resolves(tmp_path: Path) -> None:
    """Stopped for a migration (finish-migrate) past transient_state_max_s: a warning that
    resolves when the VM runs again."""
    cfg = config_file(tmp_path, transient_state_max_s=60.0)
    capture = write(
        tmp_path,
        qemu_line("STOP", T0, 0),
        status_reply("finish-migrate"),
        qemu_line("RTC_CHANGE", T0 + 30, 0, offset=0),
        qemu_line("RTC_CHANGE", T0 + 61, 0, offset=0),
        qemu_line("RESUME", T0 + 90, 0),
    )
    records = replay(capture, "-c", str(cfg))
    assert alerts(records) == [("vm_stuck_transient", "warning")]
    stuck = of(records, "alert")[0]
    assert stuck["details"]["status"] == "finish-migrate"
    assert "finish-migrate" in stuck["summary"]
    (resolved,) = of(records, "alert_resolved")
    assert resolved["alert"] == "vm_stuck_transient"


def test_a_short_transient_state_is_quiet(tmp_path: Path) -> None:
    """finish-migrate for 10 s, then running again: no alert."""
    capture = write(
        tmp_path,
        qemu_line("STOP", T0, 0),
        status_reply("finish-migrate"),
        qemu_line("RESUME", T0 + 10, 0),
        qemu_line("RTC_CHANGE", T0 + 900, 0, offset=0),
    )
    assert of(replay(capture), "alert") == []
