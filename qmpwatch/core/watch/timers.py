"""The watch's timers, each through one small protocol (`due()`, `tick(now)`), in a fixed order.

`VmWatch.tick` runs every timer that is due, in `ORDER`; `next_deadline` is the earliest `due()`.
The order is part of the behaviour (a missed follow-up is recorded before a stuck state, a
crash loop's quiet end before a resume), and is tested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpwatch.core import agent as agent_port
from qmpwatch.core.watch import followups, incidents, resume

if TYPE_CHECKING:
    from qmpwatch.core.watch.vmwatch import VmWatch

# The order in which `tick` looks at the timers (the names of `timers()`).
ORDER = ("followups", "stuck_transient", "crash_loop_quiet", "resume", "agent_port", "presence")


@dataclass(frozen=True, slots=True)
class Timer:
    """One part's timer: when it is next due (None: not waiting), and what to do then."""

    name: str
    due: Callable[[], float | None]
    tick: Callable[[float], None]


def timers(watch: VmWatch) -> tuple[Timer, ...]:
    """Every timer of `watch`, in `ORDER`."""
    return (
        Timer(
            "followups",
            watch.tracker.next_deadline,
            lambda now: followups.ended(watch, watch.tracker.expire(now)),
        ),
        Timer(
            "stuck_transient",
            watch.transient.due,
            lambda now: incidents.stuck(watch, now),
        ),
        Timer(
            "crash_loop_quiet",
            watch.crash_loop.due,
            lambda now: incidents.loop_quiet(watch, now),
        ),
        Timer("resume", watch.resumer.due, lambda now: resume.remedy(watch, now)),
        Timer("agent_port", lambda: watch.agent.due, lambda now: agent_port.tick(watch, now)),
        Timer("presence", watch.presence.due, watch.unreachable),
    )
