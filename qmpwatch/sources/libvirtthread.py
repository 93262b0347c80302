"""libvirt off the daemon's event loop: its event thread, its calls, and whether it answers.

libvirt-python's calls block until libvirtd answers, and a frozen libvirtd (SIGSTOP, a
deadlock, a stuck storage pool) may never answer: the open of a new connection waits
forever, a call on an open one until the keepalive gives up (15 s). None of it runs on the
daemon's loop:

- **Events**: libvirt's default event implementation runs on a thread of its own
  (`start_event_thread`, once per process; it drives the keepalive too). libvirt's callbacks
  run there and cross to the daemon's loop through a `Crossing`.
- **Calls**: each `[[libvirt]]` connection makes its calls (open, list, `virDomainGetState`,
  the keepalive probe, close) in a `Lane` of its own (`qmpwatch.aio.lanes`), awaited with a
  deadline. A frozen libvirtd holds up that lane only.
- **Answers**: `Responsiveness` watches the lane: a call that has run for `STALL_AFTER_S`
  makes `libvirt_unresponsive` degraded (`dependency_stalled`); one still unanswered after
  `[[libvirt]] unresponsive_alert_s` raises the warning alert `libvirt_unresponsive` (its
  domains are not watched meanwhile). Both end when a call succeeds again; then every domain
  is resynced. While the connection is idle, a probe (`virConnectGetLibVersion`, one RPC)
  runs every `PROBE_INTERVAL_S`, so a hang is seen within one keepalive interval (5 s) even
  when nothing else asks.

Overflow rule of the crossing: lifecycle and close events always cross; QMP events cross
while fewer than `EVENTS_BEHIND_MAX` wait for the loop, and beyond that are dropped and
counted: one `libvirt_events_dropped` record (`dropped`) once the loop catches up, and every
watched domain's status is read again, so what the lost events changed is still reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

from qmpwatch.aio.lanes import Lane
from qmpwatch.aio.stalls import STALLS
from qmpwatch.core.alert import Alert
from qmpwatch.core.config import LibvirtConfig

STALL_AFTER_S = 2.0  # a call into libvirt running this long: libvirt_unresponsive
PROBE_INTERVAL_S = 2.0  # an idle connection is probed this often
WATCH_TICK_S = 0.5
CALL_TIMEOUT_S = 5.0  # the deadline of a call the loop awaits (a state read, a listing)
EVENTS_BEHIND_MAX = 10_000  # QMP events waiting for the loop before new ones are dropped
REASON = "libvirt_unresponsive"

_started: list[threading.Thread] = []
_start_lock = threading.Lock()


def start_event_thread() -> None:
    """Run libvirt's default event implementation on a thread of its own (once per process,
    before the first connection), and keep libvirt from printing its errors: qmpwatch
    reports them."""
    with _start_lock:
        if _started:
            return
        libvirt.virEventRegisterDefaultImpl()
        libvirt.registerErrorHandler(_ignore_error, None)
        thread = threading.Thread(target=_run_events, name="libvirt-events", daemon=True)
        thread.start()
        _started.append(thread)


def _run_events() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            time.sleep(0.1)  # libvirt said why through its error handler; do not spin


def _ignore_error(_ctx: object, _err: object) -> None:
    return None


class Crossing:
    """libvirt's callbacks, from its event thread to the daemon's loop (see the module's
    overflow rule)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_dropped: Callable[[int], None]) -> None:
        self._loop = loop
        self._on_dropped = on_dropped
        self._lock = threading.Lock()
        self._waiting = 0  # QMP events handed to the loop, not yet run there
        self._dropped = 0

    def always(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` on the loop (from the event thread)."""
        with contextlib.suppress(RuntimeError):  # the loop has ended: qmpwatch is stopping
            self._loop.call_soon_threadsafe(fn, *args)

    def event(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` on the loop unless too many QMP events wait already."""
        with self._lock:
            if self._waiting >= EVENTS_BEHIND_MAX:
                self._dropped += 1
                return
            self._waiting += 1
        self.always(self._arrive, fn, args)

    def _arrive(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        with self._lock:
            self._waiting -= 1
            dropped = 0
            if self._waiting == 0 and self._dropped:
                dropped, self._dropped = self._dropped, 0
        fn(*args)
        if dropped:
            self._on_dropped(dropped)


class Responsiveness:
    """Whether one connection's libvirtd answers (see the module's docstring)."""

    def __init__(
        self,
        lane: Lane,
        entry: Callable[[], LibvirtConfig],
        alert: Callable[[Alert, str | None], None],
        recovered: Callable[[], None],
        probe: Callable[[], Any],
    ) -> None:
        """`entry()`: the connection's configuration now; `alert(alert, resolved)`: raise
        or resolve; `recovered()`: libvirt answers again after a stall; `probe()`: the
        connection to probe now (None: not connected)."""
        self.lane = lane
        self._entry = entry
        self._alert = alert
        self._recovered = recovered
        self._probe = probe
        self.answered = time.monotonic()  # when a call last succeeded (set in the lane)
        self._since: float | None = None  # monotonic: when the stall was seen
        self._since_wall = 0.0
        self._firing: Alert | None = None
        self._probed = 0.0

    def answer(self) -> None:
        """A call into libvirt succeeded (from the lane's thread)."""
        self.answered = time.monotonic()

    @property
    def stalled(self) -> bool:
        return self._since is not None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(WATCH_TICK_S)
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        uri = self._entry().uri
        busy = self.lane.busy_for()
        if self._since is None:
            if busy >= STALL_AFTER_S:
                self._since = now - busy
                self._since_wall = time.time() - busy
                STALLS.begin(REASON, uri, f"a call into libvirt has run for {busy:.1f} s")
        elif self.answered > self._since:
            self._end(uri)
        elif self._firing is None and now - self._since >= self._entry().unresponsive_alert_s:
            self._fire(uri, now - self._since)
        if self._since is None and busy == 0 and now - self._probed >= PROBE_INTERVAL_S:
            conn = self._probe()
            if conn is not None:
                self._probed = now
                self.lane.submit(self._ping, conn)

    def _ping(self, conn: Any) -> None:
        try:
            conn.getLibVersion()
        except libvirt.libvirtError:
            return  # the connection is broken: its close callback says so
        self.answer()

    def _fire(self, uri: str, stalled_s: float) -> None:
        alert = Alert(
            kind=REASON,
            severity="warning",
            vm="",
            summary=(
                f"libvirt at {uri} has not answered for {stalled_s:.0f} s: "
                "its domains are not watched"
            ),
            cause=uri,
            raised_at=self._since_wall,
            details={"uri": uri, "stalled_s": round(stalled_s, 1)},
        )
        self._firing = alert
        self._alert(alert, None)

    def _end(self, uri: str) -> None:
        self._since = None
        STALLS.end(REASON, uri)
        if self._firing is not None:
            alert, self._firing = self._firing, None
            self._alert(alert, "libvirt answers again")
        self._recovered()

    def close(self) -> None:
        """The connection is gone from the configuration: its stall ends with it."""
        if self._since is not None:
            self._since = None
            STALLS.end(REASON, self._entry().uri)
            if self._firing is not None:
                alert, self._firing = self._firing, None
                self._alert(alert, "its [[libvirt]] entry was removed from the configuration")
