"""The follow-up rules of the QMP events document and the tracker that checks them.

Pure: time is passed in (`now`, epoch seconds). A cause event opens an expectation that its
follow-up satisfies, or that is missed at its deadline or when the session ends; every
expectation ends exactly once. docs/architecture.md ("The follow-up rules and the tracker")
has the table of rules and the SHUTDOWNs that open none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qmpwatch.core.config import FollowupConfig
from qmpwatch.core.events import BlockIoError, Event, GuestPanicked, Shutdown, Watchdog

QEMU_EXIT = "QEMU_EXIT"  # the pseudo-event of a monitor connection ending
EXITING_SHUTDOWN_REASONS = frozenset({"host-qmp-quit", "host-signal", "host-ui"})


@dataclass(frozen=True, slots=True)
class Rule:
    """One follow-up rule: `cause` (with a qualifier such as the action) must be followed by
    `expected` within `deadline_s`; `alert` is the alert kind raised when it is (if any)."""

    key: str
    cause: str
    expected: str
    deadline_s: float
    alert: str | None = None
    also: tuple[str, ...] = ()  # other follow-ups that satisfy it, e.g. "SHUTDOWN:guest-reset"


class Rules:
    """The rules with their configured deadlines, and which of them an event opens."""

    def __init__(self, deadlines: FollowupConfig) -> None:
        d = deadlines
        self.stop_after_block_io_error = Rule(
            "stop_after_block_io_error",
            "BLOCK_IO_ERROR",
            "STOP",
            d.stop_after_block_io_error_s,
            "vm_stopped_io_error",
        )
        self.stop_after_shutdown = Rule(
            "stop_after_shutdown", "SHUTDOWN", "STOP", d.stop_after_shutdown_s
        )
        self.by_watchdog_action = {
            "reset": Rule(
                "reset_after_watchdog",
                "WATCHDOG",
                "RESET",
                d.reset_after_watchdog_s,
                also=("SHUTDOWN:guest-reset",),  # under -no-reboot
            ),
            "pause": Rule(
                "stop_after_watchdog",
                "WATCHDOG",
                "STOP",
                d.stop_after_watchdog_s,
                "vm_stopped_watchdog",
            ),
            "shutdown": Rule(
                "shutdown_after_watchdog", "WATCHDOG", "SHUTDOWN", d.shutdown_after_watchdog_s
            ),
            "poweroff": Rule("exit_after_watchdog", "WATCHDOG", QEMU_EXIT, d.exit_after_watchdog_s),
        }
        self.stop_after_guest_panicked = Rule(
            "stop_after_guest_panicked", "GUEST_PANICKED", "STOP", d.stop_after_guest_panicked_s
        )

    def opened_by(self, event: Event, no_shutdown: bool, stopped: bool = False) -> Rule | None:
        """The rule this event opens an expectation for, if any (`stopped`: the VM is known
        to be stopped already, so no STOP can follow)."""
        if isinstance(event, BlockIoError):
            if event.action == "stop" and not stopped:
                return self.stop_after_block_io_error
            return None
        if isinstance(event, Watchdog):
            return self.by_watchdog_action.get(event.action)
        if isinstance(event, Shutdown):
            if no_shutdown and not stopped and event.reason not in EXITING_SHUTDOWN_REASONS:
                return self.stop_after_shutdown
            return None
        if isinstance(event, GuestPanicked) and event.action == "pause":
            return self.stop_after_guest_panicked
        return None


@dataclass(frozen=True, slots=True)
class Expectation:
    """An open expectation: `rule` was triggered by `cause` at `opened_at`."""

    rule: Rule
    cause: Event
    opened_at: float

    @property
    def deadline_at(self) -> float:
        return self.opened_at + self.rule.deadline_s


@dataclass(frozen=True, slots=True)
class Ended:
    """How an expectation ended: satisfied at `at` (latency `at - opened_at`), or missed."""

    expectation: Expectation
    outcome: Literal["satisfied", "missed"]
    at: float
    reason: str = ""  # for missed: "deadline" or "disconnected"

    @property
    def latency_s(self) -> float:
        return max(0.0, self.at - self.expectation.opened_at)


class FollowUpTracker:
    """Open expectations of one VM, in the order they were opened."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: list[Expectation] = []

    @property
    def pending(self) -> tuple[Expectation, ...]:
        return tuple(self._open)

    @property
    def waiting(self) -> bool:
        """Whether any expectation is open (`bool(pending)`, without building the tuple)."""
        return bool(self._open)

    def open(self, rule: Rule, cause: Event, now: float) -> Expectation:
        expectation = Expectation(rule, cause, now)
        self._open.append(expectation)
        return expectation

    def satisfy(self, name: str, now: float, qualified: str = "") -> list[Ended]:
        """Close every open expectation waiting for event `name` (or, through a rule's `also`,
        for its `qualified` form such as "SHUTDOWN:guest-reset")."""
        if not self._open:
            return []
        met = [e for e in self._open if e.rule.expected == name or qualified in e.rule.also]
        if met:
            self._open = [e for e in self._open if e not in met]
        return [Ended(e, "satisfied", now) for e in met]

    def expire(self, now: float) -> list[Ended]:
        """Close every expectation whose deadline has passed by `now`."""
        if not self._open:
            return []
        late = [e for e in self._open if e.deadline_at <= now]
        if late:
            self._open = [e for e in self._open if e.deadline_at > now]
        return [Ended(e, "missed", e.deadline_at, "deadline") for e in late]

    def abandon(self, now: float) -> list[Ended]:
        """The session ended: every open expectation is missed now."""
        ended = [Ended(e, "missed", now, "disconnected") for e in self._open]
        self._open = []
        return ended

    def next_deadline(self) -> float | None:
        if not self._open:  # the usual case, asked for every event: no generator built
            return None
        return min(e.deadline_at for e in self._open)
