"""A step of a source that raised what it never should: one record, and only that step is
dropped or started again; the daemon and the other VMs go on (docs/architecture.md, "What
one peer, VM or source can break").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog


def step_failed(err: BaseException, *, where: str, then: str, **fields: object) -> None:
    """Record `internal_error`: what failed (`where`), the exception, what qmpwatch does next."""
    log = structlog.get_logger()
    log.error("internal_error", where=where, error=repr(err), then=then, **fields)


async def retried(
    step: Callable[[], Awaitable[None]], *, where: str, delay_s: float, **fields: object
) -> None:
    """Run `step` until it returns (or is cancelled); each unexpected exception is recorded
    and the step starts again after `delay_s`."""
    while True:
        try:
            await step()
            return
        except Exception as err:
            step_failed(err, where=where, then=f"starts it again in {delay_s:g} s", **fields)
        await asyncio.sleep(delay_s)
