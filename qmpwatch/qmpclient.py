"""`WatchClient`: qemu.qmp's `QMPClient`, made fit for a daemon that runs for months.

qemu.qmp stays the protocol layer (greeting, capabilities negotiation, command execution and
reply routing, the session state machine); this subclass replaces the parts of the message
path that a long-running watcher cannot live with (see shared/qemu-qmp-notes.md):

- `_cb_inbound`/`_cb_outbound` return the message untouched: the stock ones build a pretty
  `json.dumps(indent=2)` for a DEBUG line on every message, two thirds of its per-event cost.
- `_do_recv` parses with orjson and hands every *event* straight to `on_event` (a plain
  callback, run in the reader task, which must not raise or await). Events never enter
  qemu.qmp's listener queues, so nothing accumulates in `EventListener._history`.
- A line that is not JSON, not an object, or too long goes to `on_decode_error` and the
  session reads on; the stock client would end the session (and meet the same line again).
- After `YIELD_EVERY` messages in a row the reader yields to the event loop, so one VM's
  burst cannot starve the others.

Only replies, errors and the greeting are wrapped in qemu.qmp `Message` objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from qemu.qmp import QMPClient
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate

from qmpwatch.errors import DecodeError

READ_LIMIT = 8 * 1024 * 1024  # longest QMP line accepted; a longer one is a decode error
YIELD_EVERY = 64  # messages handled in a row before the reader lets other tasks run

EventCallback = Callable[[dict[str, Any]], None]
ErrorCallback = Callable[[DecodeError], None]


def _ignore_event(obj: dict[str, Any]) -> None:
    return None


def _ignore_error(err: DecodeError) -> None:
    return None


class WatchClient(QMPClient):
    """A QMP client whose events go to `on_event` instead of listener queues."""

    def __init__(
        self,
        name: str | None = None,
        *,
        on_event: EventCallback = _ignore_event,
        on_decode_error: ErrorCallback = _ignore_error,
    ) -> None:
        super().__init__(name, readbuflen=READ_LIMIT)
        self.on_event = on_event
        self.on_decode_error = on_decode_error
        self._in_a_row = 0
        self._greeted = False

    # The stock hooks log str(msg) (a pretty JSON dump) on every message.
    def _cb_inbound(self, msg: Message) -> Message:
        return msg

    def _cb_outbound(self, msg: Message) -> Message:
        return msg

    async def _establish_session(self) -> None:
        self._greeted = False
        await super()._establish_session()

    async def _get_greeting(self) -> Any:
        greeting = await super()._get_greeting()
        self._greeted = True
        return greeting

    async def _do_recv(self) -> Message:
        while True:
            self._in_a_row += 1
            if self._in_a_row >= YIELD_EVERY:
                self._in_a_row = 0
                await asyncio.sleep(0)
            line = await self._read_line()
            if line is None:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                bad = DecodeError(f"not JSON: {err}", line.decode("utf-8", "replace"))
            else:
                if type(obj) is dict:
                    if "event" in obj and self._greeted:
                        self.on_event(obj)
                        continue
                    return _message(obj)
                bad = DecodeError("not a JSON object", line.decode("utf-8", "replace"))
            if not self._greeted:
                # Garbage instead of a greeting: this is not a QMP monitor (or not yet).
                raise bad
            self.on_decode_error(bad)

    async def _read_line(self) -> bytes | None:
        """One line; None when an over-long line was dropped (and reported)."""
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except ValueError as err:  # an over-long line: StreamReader dropped what it had
            self.on_decode_error(
                DecodeError(f"line longer than {READ_LIMIT} bytes, dropped", "<dropped>")
            )
            if "is not found" in str(err):  # the rest of the line is still to come
                await self._discard_to_newline()
            return None
        if not line:
            raise EOFError
        if not line.endswith(b"\n") and self._reader.at_eof():
            self.on_decode_error(
                DecodeError("truncated message at end of stream", line.decode("utf-8", "replace"))
            )
            raise EOFError
        return line

    async def _discard_to_newline(self) -> None:
        assert self._reader is not None
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as err:
                await self._reader.readexactly(err.consumed)
            except asyncio.IncompleteReadError as err:
                raise EOFError from err

    @property
    def connected(self) -> bool:
        return self.runstate == Runstate.RUNNING


def _message(obj: dict[str, Any]) -> Message:
    """Wrap an already-parsed object without qemu.qmp re-serialising or copying it."""
    msg = Message.__new__(Message)
    msg._data = None
    msg._obj = obj
    return msg
