"""The follow-up rules and the tracker: satisfied, missed, ending exactly once, deadlines."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from qmpwatch.core.config import FollowupConfig
from qmpwatch.core.events import Event, decode_object
from qmpwatch.core.tracker import QEMU_EXIT, Ended, Expectation, FollowUpTracker, Rules

# Every deadline different, so a rule that reads the wrong key shows.
DEADLINES = FollowupConfig(
    stop_after_block_io_error_s=1.5,
    stop_after_shutdown_s=2.5,
    reset_after_watchdog_s=3.5,
    stop_after_watchdog_s=4.5,
    shutdown_after_watchdog_s=120.0,
    exit_after_watchdog_s=6.5,
    stop_after_guest_panicked_s=7.5,
)


def event(name: str, at: float = 1_700_000_000.0, **data: Any) -> Event:
    """A decoded event as QEMU would send it at epoch time `at`."""
    seconds = int(at)
    message: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": seconds, "microseconds": round((at - seconds) * 1e6)},
    }
    if data:
        message["data"] = data
    decoded = decode_object(message)
    assert isinstance(decoded, Event)
    return decoded


def block_io_error(action: str = "stop", device: str = "drive0") -> Event:
    return event("BLOCK_IO_ERROR", device=device, operation="write", action=action)


# ---------------------------------------------------------------------------------------------
# The table of the follow-up rules (docs/architecture.md), rule by rule

OPENING = [
    pytest.param(block_io_error("stop"), False, "STOP", 1.5, "BLOCK_IO_ERROR", id="bioerr-stop"),
    pytest.param(event("SHUTDOWN"), True, "STOP", 2.5, "SHUTDOWN", id="shutdown-no-shutdown"),
    pytest.param(
        event("SHUTDOWN", guest=True, reason="guest-shutdown"),
        True,
        "STOP",
        2.5,
        "SHUTDOWN",
        id="guest-shutdown-no-shutdown",
    ),
    pytest.param(
        event("WATCHDOG", action="reset"), False, "RESET", 3.5, "WATCHDOG", id="watchdog-reset"
    ),
    pytest.param(
        event("WATCHDOG", action="pause"), False, "STOP", 4.5, "WATCHDOG", id="watchdog-pause"
    ),
    pytest.param(
        event("WATCHDOG", action="shutdown"),
        False,
        "SHUTDOWN",
        120.0,
        "WATCHDOG",
        id="watchdog-shutdown",
    ),
    pytest.param(
        event("WATCHDOG", action="poweroff"),
        False,
        QEMU_EXIT,
        6.5,
        "WATCHDOG",
        id="watchdog-poweroff",
    ),
    pytest.param(
        event("GUEST_PANICKED", action="pause"),
        False,
        "STOP",
        7.5,
        "GUEST_PANICKED",
        id="guest-panicked-pause",
    ),
]


@pytest.mark.parametrize(("cause", "no_shutdown", "expected", "deadline", "cause_name"), OPENING)
def test_rule_opened_by_cause_has_its_follow_up_and_configured_deadline(
    cause: Event, no_shutdown: bool, expected: str, deadline: float, cause_name: str
) -> None:
    """Each cause of the table opens its rule: the right follow-up, the configured deadline."""
    opened = Rules(DEADLINES).opened_by(cause, no_shutdown)
    assert opened is not None
    assert (opened.cause, opened.expected, opened.deadline_s) == (cause_name, expected, deadline)


@pytest.mark.parametrize(
    ("cause", "no_shutdown"),
    [
        pytest.param(block_io_error("report"), False, id="bioerr-report"),
        pytest.param(block_io_error("ignore"), False, id="bioerr-ignore"),
        pytest.param(event("SHUTDOWN"), False, id="shutdown-without-no-shutdown"),
        pytest.param(
            event("SHUTDOWN", guest=False, reason="host-qmp-quit"), True, id="quit-no-shutdown"
        ),
        pytest.param(
            event("SHUTDOWN", guest=False, reason="host-signal"), True, id="signal-no-shutdown"
        ),
        pytest.param(event("WATCHDOG", action="none"), False, id="watchdog-none"),
        pytest.param(event("WATCHDOG", action="debug"), False, id="watchdog-debug"),
        pytest.param(event("WATCHDOG", action="inject-nmi"), False, id="watchdog-inject-nmi"),
        pytest.param(event("GUEST_PANICKED", action="poweroff"), False, id="panic-poweroff"),
        pytest.param(event("STOP"), True, id="stop"),
        pytest.param(event("RESET"), True, id="reset"),
        pytest.param(event("RESUME"), True, id="resume"),
        pytest.param(event("POWERDOWN"), True, id="powerdown"),
        pytest.param(event("BLOCK_JOB_READY", device="j"), True, id="unknown-event"),
    ],
)
def test_events_outside_the_table_open_nothing(cause: Event, no_shutdown: bool) -> None:
    """Events the table does not list (or with another action) open no expectation."""
    assert Rules(DEADLINES).opened_by(cause, no_shutdown) is None


def test_shutdown_by_quit_under_no_shutdown_opens_nothing() -> None:
    """SHUTDOWN with reason host-qmp-quit ends QEMU even under -no-shutdown: no STOP awaited."""
    quit_ = event("SHUTDOWN", guest=False, reason="host-qmp-quit")
    assert Rules(FollowupConfig()).opened_by(quit_, no_shutdown=True) is None


def test_default_deadlines_are_the_designs() -> None:
    """Without configuration the deadlines are design.md's: 5 s, and 120 s for a guest shutdown."""
    rules = Rules(FollowupConfig())
    assert rules.stop_after_block_io_error.deadline_s == 5.0
    assert rules.stop_after_shutdown.deadline_s == 5.0
    assert {a: r.deadline_s for a, r in rules.by_watchdog_action.items()} == {
        "reset": 5.0,
        "pause": 5.0,
        "shutdown": 120.0,
        "poweroff": 5.0,
    }


# ---------------------------------------------------------------------------------------------
# The tracker


def test_follow_up_satisfies_with_its_latency() -> None:
    """A STOP 20 ms after a BLOCK_IO_ERROR(stop) satisfies it with latency 0.02 s."""
    rules = Rules(DEADLINES)
    tracker = FollowUpTracker()
    cause = block_io_error()
    opened = tracker.open(rules.stop_after_block_io_error, cause, 100.0)
    (ended,) = tracker.satisfy("STOP", 100.02)
    assert ended.expectation is opened
    assert ended.outcome == "satisfied"
    assert ended.latency_s == pytest.approx(0.02)
    assert tracker.pending == ()


def test_other_events_do_not_satisfy() -> None:
    """A RESET or RESUME does not answer an expectation waiting for STOP."""
    tracker = FollowUpTracker()
    tracker.open(Rules(DEADLINES).stop_after_block_io_error, block_io_error(), 100.0)
    assert tracker.satisfy("RESET", 100.1) == []
    assert tracker.satisfy("RESUME", 100.2) == []
    assert len(tracker.pending) == 1


def test_missed_exactly_at_the_deadline() -> None:
    """An expectation is not missed just before its deadline, and missed at it, dated then."""
    tracker = FollowUpTracker()
    opened = tracker.open(Rules(DEADLINES).stop_after_block_io_error, block_io_error(), 100.0)
    assert tracker.next_deadline() == 101.5
    assert tracker.expire(101.499) == []
    (ended,) = tracker.expire(101.5)
    assert ended == Ended(opened, "missed", 101.5, "deadline")
    assert tracker.pending == ()
    assert tracker.next_deadline() is None


def test_missed_late_is_dated_at_its_deadline() -> None:
    """Expiring long after the deadline reports the miss at the deadline, not at `now`."""
    tracker = FollowUpTracker()
    tracker.open(
        Rules(DEADLINES).by_watchdog_action["reset"], event("WATCHDOG", action="reset"), 10.0
    )
    (ended,) = tracker.expire(500.0)
    assert ended.at == 13.5
    assert ended.reason == "deadline"


def test_one_stop_satisfies_every_open_stop_expectation() -> None:
    """Two failing drives and a SHUTDOWN: one STOP answers all three; the RESET wait stays open."""
    rules = Rules(DEADLINES)
    tracker = FollowUpTracker()
    a = tracker.open(rules.stop_after_block_io_error, block_io_error(device="drive0"), 100.0)
    b = tracker.open(rules.stop_after_block_io_error, block_io_error(device="drive1"), 100.1)
    c = tracker.open(rules.stop_after_shutdown, event("SHUTDOWN"), 100.2)
    reset = tracker.open(
        rules.by_watchdog_action["reset"], event("WATCHDOG", action="reset"), 100.3
    )
    ended = tracker.satisfy("STOP", 100.5)
    assert [e.expectation for e in ended] == [a, b, c]
    assert {e.outcome for e in ended} == {"satisfied"}
    assert [round(e.latency_s, 3) for e in ended] == [0.5, 0.4, 0.3]
    assert tracker.pending == (reset,)
    assert tracker.satisfy("STOP", 100.6) == []


def test_abandon_misses_everything_open_as_disconnected() -> None:
    """When the session ends, every open expectation is missed now, reason disconnected."""
    rules = Rules(DEADLINES)
    tracker = FollowUpTracker()
    tracker.open(rules.stop_after_block_io_error, block_io_error(), 1.0)
    tracker.open(rules.by_watchdog_action["shutdown"], event("WATCHDOG", action="shutdown"), 2.0)
    ended = tracker.abandon(3.0)
    assert [(e.outcome, e.at, e.reason) for e in ended] == [
        ("missed", 3.0, "disconnected"),
        ("missed", 3.0, "disconnected"),
    ]
    assert tracker.pending == ()
    assert tracker.abandon(4.0) == []


def test_configured_deadline_changes_when_it_is_missed() -> None:
    """A 30 s shutdown_after_watchdog_s makes the SHUTDOWN wait end at 30 s, not 120 s."""
    rules = Rules(FollowupConfig(shutdown_after_watchdog_s=30.0))
    tracker = FollowUpTracker()
    tracker.open(rules.by_watchdog_action["shutdown"], event("WATCHDOG", action="shutdown"), 0.0)
    assert tracker.expire(29.9) == []
    (ended,) = tracker.expire(30.0)
    assert ended.expectation.rule.deadline_s == 30.0


def test_next_deadline_is_the_earliest() -> None:
    """next_deadline is the soonest deadline among open expectations, whatever the order."""
    rules = Rules(DEADLINES)
    tracker = FollowUpTracker()
    tracker.open(rules.by_watchdog_action["shutdown"], event("WATCHDOG", action="shutdown"), 0.0)
    tracker.open(rules.stop_after_block_io_error, block_io_error(), 10.0)
    assert tracker.next_deadline() == 11.5


# ---------------------------------------------------------------------------------------------
# Every expectation ends exactly once, whatever the interleaving


CAUSES = [
    (block_io_error(), False),
    (event("SHUTDOWN"), True),
    (event("WATCHDOG", action="reset"), False),
    (event("WATCHDOG", action="pause"), False),
    (event("WATCHDOG", action="shutdown"), False),
    (event("WATCHDOG", action="poweroff"), False),
    (event("GUEST_PANICKED", action="pause"), False),
]
FOLLOW_UPS = ["STOP", "RESET", "SHUTDOWN", QEMU_EXIT, "RESUME"]


class TrackerMachine(RuleBasedStateMachine):
    """Random interleavings of causes, follow-ups, clock advances and session ends."""

    @initialize()
    def start(self) -> None:
        self.table = Rules(DEADLINES)
        self.tracker = FollowUpTracker()
        self.now = 1_000.0
        self.opened: list[Expectation] = []
        self.ended: list[Ended] = []

    def _end(self, ended: list[Ended]) -> None:
        for end in ended:
            # nothing ends twice: identity, not equality (two causes can look alike)
            assert all(end.expectation is not e.expectation for e in self.ended)
            if end.outcome == "satisfied":
                assert end.at == self.now
                assert end.latency_s < end.expectation.rule.deadline_s
            elif end.reason == "deadline":
                assert end.at == end.expectation.deadline_at <= self.now
            else:
                assert end.at == self.now
        self.ended.extend(ended)

    @rule(which=st.sampled_from(CAUSES))
    def cause(self, which: tuple[Event, bool]) -> None:
        cause, no_shutdown = which
        opened_rule = self.table.opened_by(cause, no_shutdown)
        assert opened_rule is not None
        self.opened.append(self.tracker.open(opened_rule, cause, self.now))

    @rule(name=st.sampled_from(FOLLOW_UPS))
    def follow_up(self, name: str) -> None:
        # as the watch core does: deadlines first, then the event
        self._end(self.tracker.expire(self.now))
        waiting = [e for e in self.tracker.pending if e.rule.expected == name]
        ended = self.tracker.satisfy(name, self.now)
        assert [e.expectation for e in ended] == waiting
        self._end(ended)

    @rule(seconds=st.floats(min_value=0.0, max_value=200.0))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._end(self.tracker.expire(self.now))
        assert all(e.deadline_at > self.now for e in self.tracker.pending)

    @precondition(lambda self: bool(self.tracker.pending))
    @rule()
    def session_ends(self) -> None:
        self._end(self.tracker.expire(self.now))
        self._end(self.tracker.abandon(self.now))
        assert self.tracker.pending == ()

    @invariant()
    def every_expectation_ends_exactly_once(self) -> None:
        """Each opened expectation is in exactly one of: satisfied, missed, still pending."""
        ended_ids = [id(e.expectation) for e in self.ended]
        pending_ids = [id(e) for e in self.tracker.pending]
        assert len(ended_ids) + len(pending_ids) == len(self.opened)
        assert sorted(ended_ids + pending_ids) == sorted(id(e) for e in self.opened)

    @invariant()
    def next_deadline_is_the_earliest_pending(self) -> None:
        expected = min((e.deadline_at for e in self.tracker.pending), default=None)
        assert self.tracker.next_deadline() == expected


TrackerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
test_tracker_state_machine = TrackerMachine.TestCase


@given(
    st.lists(
        st.tuples(st.sampled_from(range(len(CAUSES))), st.floats(min_value=0.0, max_value=10.0)),
        max_size=20,
    ),
    st.floats(min_value=0.0, max_value=300.0),
)
def test_expire_then_abandon_ends_each_expectation_once(
    openings: list[tuple[int, float]], end_after: float
) -> None:
    """Opened at random times, expired at one instant and abandoned: each ends exactly once."""
    rules = Rules(DEADLINES)
    tracker = FollowUpTracker()
    now = 0.0
    opened = []
    for index, gap in openings:
        now += gap
        cause, no_shutdown = CAUSES[index]
        found = rules.opened_by(cause, no_shutdown)
        assert found is not None
        opened.append(tracker.open(found, cause, now))
    now += end_after
    missed = tracker.expire(now)
    abandoned = tracker.abandon(now)
    assert sorted(id(e.expectation) for e in missed + abandoned) == sorted(id(e) for e in opened)
    assert all(e.expectation.deadline_at <= now for e in missed)
    assert all(e.expectation.deadline_at > now for e in abandoned)
