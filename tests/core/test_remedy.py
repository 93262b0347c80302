"""Resume after an I/O-error pause, in the pure core with a fake clock: when `cont` is sent,
what counts as resumed, backing off, giving up, and never acting where it must not."""

from __future__ import annotations

import pytest

from qmpwatch.core.config import RemediateConfig, parse_config_text
from qmpwatch.core.errors import ConfigError
from qmpwatch.core.remedy import SETTLE_S
from qmpwatch.core.watch import VmWatch
from tests.core.test_watch import T0, Collect, bioerr, ev, feed, make_watch

RESUME = RemediateConfig(
    resume_after_io_error=True,
    resume_backoff_initial_s=10.0,
    resume_backoff_max_s=40.0,
    resume_give_up_after_s=100.0,
)


def paused(**options: object) -> tuple[VmWatch, Collect]:
    """A watch whose VM just paused on a disk error at T0."""
    watch, out = make_watch(remediate=RESUME, **options)
    feed(watch, bioerr(T0), ev("STOP", T0 + 0.001))
    assert out.alert_kinds() == ["vm_stopped_io_error"]
    return watch, out


def test_a_pause_is_resumed_once_qemu_runs_for_a_while() -> None:
    """After the backoff a `cont`; RESUME; still running SETTLE_S later: resolved, saying so."""
    watch, out = paused()
    first = watch.next_deadline()
    assert first is not None
    assert T0 + 5.0 <= first <= T0 + 10.001
    watch.tick(first)
    assert out.commands == [("cont", {})]
    feed(watch, ev("RESUME", first + 0.01))
    watch.on_command_result("cont", "", first + 0.02)
    assert out.of("alert_resolved") == []  # not before it has run for a while
    settled = watch.next_deadline()
    assert settled is not None
    assert abs(settled - (first + 0.01 + SETTLE_S)) < 0.001
    watch.tick(settled)
    (attempt,) = out.of("vm_resume_attempted")
    assert attempt.fields == {"attempt": 1, "outcome": "resumed", "trigger": "backoff"}
    (resolved,) = out.of("alert_resolved")
    assert resolved.fields["reason"] == "resumed by qmpwatch after 1 attempt"
    assert watch.next_deadline() is None


def test_a_vm_that_pauses_again_is_tried_later_then_given_up() -> None:
    """Each cont that ends in another pause backs off; past the give-up time: one warning."""
    watch, out = paused()
    now = T0
    while watch.resumer.active:
        deadline = watch.next_deadline()
        assert deadline is not None
        now = deadline
        watch.tick(now)
        if out.commands and watch.resumer.sent:
            feed(watch, ev("RESUME", now + 0.01), bioerr(now + 0.02), ev("STOP", now + 0.03))
            watch.on_command_result("cont", "", now + 0.04)
    outcomes = [r.fields["outcome"] for r in out.of("vm_resume_attempted")]
    assert outcomes
    assert set(outcomes) == {"paused_again"}
    assert len(out.commands) == len(outcomes)
    gaps = [r.fields["retry_in_s"] for r in out.of("vm_resume_attempted")]
    assert all(5.0 <= g <= 40.0 for g in gaps)
    assert out.alert_kinds() == ["vm_stopped_io_error", "vm_resume_given_up"]
    given_up = out.one_alert("vm_resume_given_up")
    assert given_up.now - T0 >= 100.0
    assert given_up.fields["details"]["attempts"] == len(outcomes)
    assert out.of("alert_resolved") == []  # still paused: the io-error alert stays


def test_a_cont_that_qemu_refuses_is_a_failed_attempt() -> None:
    """QEMU answers cont with an error: recorded with it, and tried again later."""
    watch, out = paused()
    deadline = watch.next_deadline()
    assert deadline is not None
    watch.tick(deadline)
    watch.on_command_result("cont", "QEMU answered cont with GenericError: no", deadline + 0.1)
    (attempt,) = out.of("vm_resume_attempted")
    assert attempt.fields["outcome"] == "refused"
    assert attempt.fields["error"] == "QEMU answered cont with GenericError: no"
    assert watch.resumer.active
    assert watch.next_deadline() is not None


def test_a_person_who_resumes_or_pauses_takes_over() -> None:
    """A RESUME qmpwatch did not ask for ends the plan; so does a client's stop."""
    watch, out = paused()
    feed(watch, ev("RESUME", T0 + 2))
    assert not watch.resumer.active
    assert out.of("alert_resolved")[0].fields["reason"] == "the VM resumed (RESUME)"
    feed(watch, ev("STOP", T0 + 3))
    watch.on_status("paused", T0 + 3.1)
    assert watch.next_deadline() is None
    assert out.commands == []


def test_nothing_is_done_unless_asked_for() -> None:
    """By default (resume_after_io_error = false) an io-error pause only alerts."""
    watch, out = make_watch()
    feed(watch, bioerr(T0), ev("STOP", T0 + 0.001))
    assert watch.next_deadline() is None
    watch.tick(T0 + 10_000)
    assert out.commands == []


def test_only_io_error_pauses_are_resumed() -> None:
    """A watchdog pause or a client's stop is never resumed, even with resume enabled."""
    watch, out = make_watch(remediate=RESUME)
    feed(watch, ev("STOP", T0))
    watch.on_status("watchdog", T0 + 0.1)
    watch.tick(T0 + 10_000)
    assert out.commands == []


def test_remediate_keys_default_off_and_override_per_entry() -> None:
    """[remediate] sets the default; a [[vm]] entry's own keys override it for that VM."""
    cfg = parse_config_text(
        "[remediate]\nresume_after_io_error = true\nresume_backoff_initial_s = 5\n"
        '[[vm]]\nname = "a"\nsocket = "/run/a.qmp"\n'
        '[[vm]]\nname = "b"\nsocket = "/run/b.qmp"\nresume_after_io_error = false\n'
    )
    assert parse_config_text("").remediate == RemediateConfig()
    assert not RemediateConfig().resume_after_io_error
    a, b = cfg.vms
    assert a.remediate == RemediateConfig(True, 5.0, 300.0, 3600.0)
    assert b.remediate == RemediateConfig(False, 5.0, 300.0, 3600.0)


def test_bad_remediate_keys_name_the_key() -> None:
    """A wrong type or an inverted backoff names the key (and the VM)."""
    with pytest.raises(ConfigError) as caught:
        parse_config_text(
            '[remediate]\nresume_after_io_error = "yes"\n'
            '[[vm]]\nname = "a"\nsocket = "/run/a.qmp"\nresume_backoff_max_s = 1\n'
        )
    assert caught.value.problems == [
        'remediate.resume_after_io_error: expected true or false, got "yes"',
        "vm[0] a: resume_backoff_max_s: must not be less than resume_backoff_initial_s (10)",
    ]


def test_space_coming_back_makes_the_next_attempt_due_at_once() -> None:
    """A pause on ENOSPC: free space growing where the images live makes `cont` due now; the
    same space seen again changes nothing (the backoff spaces the attempts)."""
    watch, out = make_watch(remediate=RESUME)
    feed(watch, bioerr(T0, nospace=True), ev("STOP", T0 + 0.001))
    assert watch.on_space({"/store": 0}, T0 + 0.5) is False
    assert watch.on_space({"/store": 1 << 20}, T0 + 1.0) is True
    assert watch.next_deadline() == T0 + 1.0
    watch.tick(T0 + 1.0)
    assert out.commands == [("cont", {})]
    feed(watch, ev("RESUME", T0 + 1.01), bioerr(T0 + 1.02, nospace=True), ev("STOP", T0 + 1.03))
    (attempt,) = out.of("vm_resume_attempted")
    assert (attempt.fields["outcome"], attempt.fields["trigger"]) == ("paused_again", "space")
    assert watch.on_space({"/store": 1 << 20}, T0 + 2.0) is False
    later = watch.next_deadline()
    assert later is not None
    assert later > T0 + 5.0


def test_an_eio_pause_keeps_the_backoff_whatever_the_space() -> None:
    """A pause on EIO (nospace false): free space says nothing about the disk; no early cont."""
    watch, _ = make_watch(remediate=RESUME)
    feed(watch, bioerr(T0, nospace=False), ev("STOP", T0 + 0.001))
    before = watch.next_deadline()
    assert watch.on_space({"/store": 0}, T0 + 0.5) is False
    assert watch.on_space({"/store": 1 << 30}, T0 + 1.0) is False
    assert watch.next_deadline() == before
