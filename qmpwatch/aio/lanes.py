"""Lanes: blocking calls into one dependency, on a thread of its own, awaited with a deadline.

A call into libvirt, SQLite, a file system or a socket that nobody reads can hang for as long
as the dependency does. The daemon's event loop must never wait on one: each dependency gets
a `Lane`, one daemon thread that runs its calls in order, and the loop awaits each call with a
deadline (`Lane.call`) or hands it over and goes on (`Lane.submit`). A call that hangs holds
up only the calls queued behind it in the same lane, never the loop, never another lane.

The threads are daemon threads, not an executor's: a call stuck in C (a frozen libvirtd, a
hung NFS server) cannot be interrupted, and must not keep the process from exiting.
`busy_for()` says how long the call in progress has been running, which is how a stall is
seen while nothing awaits it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]


class LaneTimeout(TimeoutError):
    """A call in a lane missed its deadline; it goes on in the lane until it returns."""


class Lane:
    """One thread running blocking calls into one dependency, in the order submitted."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._started: float | None = None  # monotonic time the running call began
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.pending = 0  # calls submitted and not finished (read anywhere, exact in the lane)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue `fn(*args)` to run in the lane; its future (never awaited by the lane)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self.pending += 1
        self._jobs.put((future, fn, args))
        return future

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        """`fn(*args)` run in the lane; LaneTimeout when it has not returned within `timeout`
        seconds (it is not interrupted: later calls in the lane wait for it)."""
        future = self.submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            raise LaneTimeout(f"{self.name}: no answer within {timeout:g} s") from None

    def busy_for(self) -> float:
        """Seconds the call in progress has been running (0 when the lane is idle)."""
        started = self._started
        return 0.0 if started is None else time.monotonic() - started

    def stop(self) -> None:
        """Let the thread end once the calls queued before this are done."""
        with self._lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread = None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            try:
                if not future.set_running_or_notify_cancel():
                    continue
                self._started = time.monotonic()
                try:
                    result = fn(*args)
                except BaseException as err:  # handed to the caller, never raised here
                    future.set_exception(err)
                else:
                    future.set_result(result)
            finally:
                self._started = None
                with self._lock:
                    self.pending -= 1
