"""SQLite commits of the state journals, off the event loop, waited for a moment at most.

The alert outbox and the state store commit once per loop turn. A commit can hang as long as
the disk under `state_dir` does (a dying disk, a stalled network file system, a full thin
pool), so every commit runs in one lane, `JOURNALS` (a thread: FIFO, so the outbox's commit
of a turn still lands before the state store's), and the loop waits for it at most
`COMMIT_WAIT_S`: on a healthy disk that is the whole commit, and "a log line on disk implies
its turn's commits" holds as before. A commit slower than that goes on in the lane while the
loop moves on, and later commits (of either journal) do not wait at all while earlier ones
are pending; the
daemon's stall watch reports a commit running for longer than a second as degraded
(`state_store_slow`), with a record when it starts and ends. Outcomes (failed, recovered)
are handed back on the loop, where their records are written.

Outside a running loop (tests, tools) a commit runs at once, in the caller's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable

from qmpwatch.aio.lanes import Lane

COMMIT_WAIT_S = 0.05  # the longest the loop waits for one commit
DRAIN_S = 3.0  # at close: how long to wait for the commits still pending

JOURNALS = Lane("sqlite journals")


class Committer:
    """Runs one journal's commits in `JOURNALS` and hands each outcome to `done` on the loop."""

    def __init__(self, lane: Lane = JOURNALS) -> None:
        self.lane = lane
        self.pending = 0  # commits submitted, their outcome not yet handed back

    def commit(
        self, work: Callable[[], None], done: Callable[[BaseException | None], None]
    ) -> None:
        """Run `work()` (the SQL of one transaction); then `done(error or None)`."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            done(_run(work))
            return
        waiting = self.lane.pending == 0  # nothing slow ahead of it: wait a moment for it
        self.pending += 1
        future = self.lane.submit(_run, work)
        if waiting:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                future.result(timeout=COMMIT_WAIT_S)
        if future.done():
            self._finish(future, done)
            return

        def cross(f: concurrent.futures.Future[BaseException | None]) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._finish, f, done)

        future.add_done_callback(cross)

    def _finish(
        self,
        future: concurrent.futures.Future[BaseException | None],
        done: Callable[[BaseException | None], None],
    ) -> None:
        self.pending -= 1
        done(future.result())

    def drain(self, timeout: float = DRAIN_S) -> bool:
        """Wait (blocking) for the commits submitted so far; False when they are still
        running after `timeout` (qmpwatch is stopping: what is not committed is lost)."""
        if self.pending == 0:
            return True
        marker = self.lane.submit(lambda: None)
        try:
            marker.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True


def _run(work: Callable[[], None]) -> BaseException | None:
    try:
        work()
    except Exception as err:  # handed back to the loop, never raised in the lane
        return err
    return None
