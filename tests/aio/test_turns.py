"""EndOfTurn: one call after the turn, however often it is asked for; at once outside a loop."""

from __future__ import annotations

import asyncio

from qmpwatch.aio.turns import EndOfTurn


def test_outside_a_loop_the_callback_runs_at_once() -> None:
    calls: list[int] = []
    turn = EndOfTurn(lambda: calls.append(1))
    turn.schedule()
    turn.schedule()
    assert calls == [1, 1]


async def test_many_requests_in_one_turn_make_one_call_after_it() -> None:
    calls: list[str] = []
    turn = EndOfTurn(lambda: calls.append("flush"))
    for _ in range(100):
        turn.schedule()
    calls.append("turn goes on")
    await asyncio.sleep(0)
    assert calls == ["turn goes on", "flush"]
    turn.schedule()  # a new turn, a new call
    await asyncio.sleep(0)
    assert calls == ["turn goes on", "flush", "flush"]


async def test_cancel_drops_the_scheduled_call() -> None:
    calls: list[int] = []
    turn = EndOfTurn(lambda: calls.append(1))
    turn.schedule()
    turn.cancel()
    await asyncio.sleep(0)
    assert calls == []
