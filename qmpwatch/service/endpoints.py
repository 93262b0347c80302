"""The daemon's HTTP endpoints kept up: one that cannot listen never stops the watching.

`keep_listening` binds an `HttpServer` (made afresh for every attempt), says so in a record,
and on failure says why (at most once a minute for the same reason), marks the daemon degraded
and tries again with a capped backoff until it is bound: a port held by another process is
taken as soon as it is free. docs/architecture.md ("The HTTP endpoint").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, MutableMapping

import structlog

from qmpwatch.core.backoff import Backoff, FailureLog
from qmpwatch.service.httpserver import HttpServer

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 5.0


async def keep_listening(
    make: Callable[[], HttpServer],
    *,
    listening: str,
    failed: str,
    degraded: MutableMapping[str, str],
    reason: str,
    level: str = "error",
    tried: asyncio.Event | None = None,
) -> None:
    """Serve `make()` until cancelled; while it cannot listen, `degraded[reason]` says why.
    `tried` is set once the first attempt is over, bound or not."""
    log = structlog.get_logger()
    backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S)
    failures = FailureLog(60.0)
    while True:
        server = make()
        try:
            await server.start()
        except Exception as err:  # a ListenError, or anything else: the VMs are watched on
            degraded[reason] = str(err) or type(err).__name__
            delay = backoff.next()
            if failures.failed(degraded[reason], time.monotonic()):
                getattr(log, level)(
                    failed,
                    error=degraded[reason],
                    retry_in_s=round(delay, 3),
                    effect="VMs are watched as usual; the endpoint is bound once it can be",
                )
            if tried is not None:
                tried.set()
            await asyncio.sleep(delay)
            continue
        degraded.pop(reason, None)
        log.info(listening, listen=server.listen, port=server.port)
        if tried is not None:
            tried.set()
        try:
            await asyncio.Future()  # until cancelled
        finally:
            await server.stop()
