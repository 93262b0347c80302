"""`python -m bench.polling run -c CFG`: `qmpwatch run` that also rescans its globs every 2 s.

Before inotify, `[[discover]]` globs were matched again every 2 s whether anything changed or
not. This is today's daemon with that poll put back (beside the inotify watch, in the same
task), so that `bench.sources` can measure what the poll cost at 1,000 sockets side by side
with the daemon as it is, in one run. Nothing else differs.
"""

from __future__ import annotations

import asyncio

from qmpwatch.cli.main import main
from qmpwatch.sources.discover import DiscoverSource

POLL_S = 2.0  # the interval qmpwatch polled at

_watch_forever = DiscoverSource._watch_forever


async def _watch_and_poll(self: DiscoverSource) -> None:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_watch_forever(self))
        while True:
            await asyncio.sleep(POLL_S)
            self.rescan()


setattr(DiscoverSource, "_watch_forever", _watch_and_poll)  # noqa: B010 - this variant's point

if __name__ == "__main__":
    raise SystemExit(main())
