"""The crossing from libvirt's event thread to the daemon's loop: its overflow rule."""

from __future__ import annotations

import asyncio
import threading

from qmpwatch.sources.libvirtthread import EVENTS_BEHIND_MAX, Crossing
from tests.support.alert_fixtures import wait_until


async def test_qmp_events_beyond_the_bound_are_dropped_and_counted_lifecycle_never() -> None:
    """While the loop is busy, QMP events past EVENTS_BEHIND_MAX are dropped and counted
    (once, when the loop catches up); the others arrive in order; lifecycle calls always."""
    loop = asyncio.get_running_loop()
    seen: list[int] = []
    always: list[str] = []
    dropped: list[int] = []
    crossing = Crossing(loop, dropped.append)
    flood = EVENTS_BEHIND_MAX + 25

    def libvirt_thread() -> None:
        for n in range(flood):
            crossing.event(seen.append, n)
        crossing.always(always.append, "stopped")

    thread = threading.Thread(target=libvirt_thread)
    thread.start()
    thread.join()  # the loop has not run meanwhile: everything waits for it
    await wait_until(lambda: always, what="the lifecycle call")
    assert seen == list(range(EVENTS_BEHIND_MAX))
    assert dropped == [25]
    assert always == ["stopped"]
    crossing.event(seen.append, -1)  # caught up: the next one crosses again
    await wait_until(lambda: seen[-1] == -1, what="the next event")
    assert dropped == [25]
