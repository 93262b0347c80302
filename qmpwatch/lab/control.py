"""The lab's end of QEMU's control monitor: a lean QMP client and the events it records.

QEMU broadcasts every event to all of its monitors, so what `EventRecorder` keeps is what
the watch monitor received too: the ground truth the daemon's tests compare with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from qemu.qmp import QMPClient
from qemu.qmp.message import Message

from qmpwatch.lab.errors import LabClosed, LabTimeout

_log = logging.getLogger(__package__)


class _DemoteToDebug(logging.Filter):
    """Turn qemu.qmp's records about the control monitor into DEBUG records.

    qemu.qmp logs every failed connect or session at ERROR; the lab reports those through
    its own exceptions (with QEMU's stderr), so the library's lines are detail, not news.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        return _qmp_log.isEnabledFor(logging.DEBUG)


_qmp_log = logging.getLogger(f"{__package__}.qmp")
_qmp_log.addFilter(_DemoteToDebug())

#: Events kept by the recorder; the oldest are dropped beyond this (a lab VM is short-lived,
#: but nothing here grows without bound).
DEFAULT_EVENT_HISTORY: Final = 10_000


@dataclass(frozen=True, slots=True)
class LabEvent:
    """One event seen on the control monitor."""

    seq: int  #: 1, 2, 3, ... in arrival order; compare with `LabVM.mark()`
    name: str
    data: dict[str, Any]
    qemu_time: float  #: QEMU's own timestamp, seconds since the epoch
    received: float  #: ``time.monotonic()`` on arrival


class _ControlClient(QMPClient):
    """A QMPClient whose events go to one callback instead of qemu.qmp's listeners.

    Stock qemu.qmp appends every event to the default listener's unbounded queue and
    history; overriding the dispatch keeps nothing but what the recorder keeps. The
    callback runs in the reader task, so it must neither raise nor block.
    """

    def __init__(self, name: str, on_event: Callable[[Message], None]) -> None:
        super().__init__(name)
        self.logger = _qmp_log
        self._on_event = on_event

    def _cb_inbound(self, msg: Message) -> Message:
        # Skip the stock DEBUG line, which pretty-prints every message even with logging off.
        return msg

    async def _recv(self) -> Message:
        # Events go to the recorder here, before the handshake reads a message too: on a
        # monitor's first connection QEMU (seen with 10.0) can send an event that was emitted
        # while it was opening the connection before its greeting.
        while True:
            msg = await super()._recv()
            if "event" not in msg or "QMP" in msg:
                return msg
            await self._event_dispatch(msg)

    async def _event_dispatch(self, msg: Message) -> None:
        try:
            self._on_event(msg)
        except Exception:  # a failure here must not kill the session
            _log.exception("lab event recorder failed on %r", msg.get("event"))


class EventRecorder:
    """The events seen on the control monitor, oldest first, and the waits for them.

    `LabVM` is one: its `_ControlClient` hands each event to `_record`, and `_mark_closed`
    says that no more will come.
    """

    def __init__(self, vm_name: str, history: int) -> None:
        self._vm_name = vm_name  # for messages
        self._events: deque[LabEvent] = deque(maxlen=history)
        self._seq = 0
        self._changed = asyncio.Event()
        self._closed_reason: str | None = None

    def _record(self, msg: Message) -> None:
        name = msg.get("event")
        if not isinstance(name, str):
            return
        data = msg.get("data")
        stamp = msg.get("timestamp")
        qemu_time = 0.0
        if isinstance(stamp, dict):
            qemu_time = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        self._seq += 1
        self._events.append(
            LabEvent(
                seq=self._seq,
                name=name,
                data=dict(data) if isinstance(data, dict) else {},
                qemu_time=qemu_time,
                received=time.monotonic(),
            )
        )
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _mark_closed(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._notify()

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """``(name, data)`` of the events recorded so far, oldest first."""
        return [(ev.name, ev.data) for ev in self._events]

    @property
    def event_log(self) -> list[LabEvent]:
        """The recorded events with sequence numbers and timestamps, oldest first."""
        return list(self._events)

    def mark(self) -> int:
        """The sequence number of the newest event; pass it as ``after`` to `wait_event`."""
        return self._seq

    def find_event(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        *,
        after: int = 0,
    ) -> LabEvent | None:
        """The first recorded event named ``name`` newer than ``after`` that matches."""
        for ev in self._events:
            if ev.seq > after and ev.name == name and (predicate is None or predicate(ev.data)):
                return ev
        return None

    async def wait_event(
        self,
        name: str,
        timeout: float = 10.0,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        *,
        after: int = 0,
    ) -> LabEvent:
        """Wait for an event named ``name`` (newer than sequence ``after``) whose data matches.

        Events recorded before the call count, so ``mark()`` before acting and pass it as
        ``after`` when an earlier event of the same name must not match. Raises `LabTimeout`
        after ``timeout`` seconds and `LabClosed` when the control monitor goes away first;
        both messages list the events seen.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._changed
                    found = self.find_event(name, predicate, after=after)
                    if found is not None:
                        return found
                    if self._closed_reason is not None:
                        raise LabClosed(
                            f"{self._vm_name}: {name} not seen before the control monitor "
                            f"closed ({self._closed_reason}); events: {self._event_names(after)}"
                        )
                    await changed.wait()
        except TimeoutError as exc:
            raise LabTimeout(
                f"{self._vm_name}: no {name} within {timeout:g} s; "
                f"events: {self._event_names(after)}"
            ) from exc

    def _event_names(self, after: int) -> str:
        names = [ev.name for ev in self._events if ev.seq > after]
        return ", ".join(names) if names else "none"
