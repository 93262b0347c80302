"""`EndOfTurn`: run a callback once, right after the current event-loop turn.

For writers that batch what one turn produces: the alert outbox and the state store (one SQLite
transaction) and the log (`LineWriter`, one `write()`). Outside a running event loop (tests,
tools) the callback runs at once, so nothing waits for a turn that never ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class EndOfTurn:
    """Schedules `callback` with `loop.call_soon`, at most once per turn."""

    def __init__(self, callback: Callable[[], object]) -> None:
        self._callback = callback
        self._handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # where the handle is scheduled

    def schedule(self) -> None:
        """Run the callback after this turn (once, however often this is called); outside a
        running loop, run it now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._callback()
            return
        # A call scheduled on another loop (one that has since ended) no longer counts.
        if self._loop is not loop:
            if self._handle is not None:
                self._handle.cancel()
            self._loop = loop
            self._handle = loop.call_soon(self._run)

    def cancel(self) -> None:
        """Forget the scheduled call (the caller is doing the work now)."""
        handle, self._handle, self._loop = self._handle, None, None
        if handle is not None:
            handle.cancel()

    def _run(self) -> None:
        self._handle = self._loop = None
        self._callback()
