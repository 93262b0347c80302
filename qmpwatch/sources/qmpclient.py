"""`WatchClient`: qemu.qmp's `QMPClient`, made fit for a daemon that runs for months.

qemu.qmp stays the protocol layer; this subclass replaces the message path: events go straight
to a callback (never to listener queues), bad input is a decode error and the session reads
on, a burst yields to other VMs, lines are split from large chunks. `QEMU_QMP_PRIVATES` lists
the qemu.qmp privates it relies on (see shared/qemu-qmp-notes.md, and docs/architecture.md,
"The QMP client").
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from qemu.qmp import QMPClient
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate

from qmpwatch.core.errors import DecodeError
from qmpwatch.core.events import MAX_DEPTH, deeper_than, type_name

READ_LIMIT = 8 * 1024 * 1024  # longest QMP line accepted; a longer one is a decode error
YIELD_EVERY = 64  # messages handled in a row before the reader lets other tasks run
READ_CHUNK = 256 * 1024  # bytes taken from the stream at once, then split into lines
# StreamReader's limit: it stops reading the socket while more than twice this is buffered.
# Lines are split here (READ_LIMIT applies), so the limit only bounds what one VM's burst
# can queue in memory; the kernel's socket buffer and QEMU hold the rest.
STREAM_BUFFER = READ_CHUNK
_LINE = re.compile(rb"[^\n]*\n")
_DROPPED = b""  # in the line queue: an over-long line was dropped here (a line has its "\n")
_SHALLOW = 2 * MAX_DEPTH  # a line this short cannot nest deeper than MAX_DEPTH
_ID_PREFIX = "__qmp#"  # qemu.qmp's execute ids: __qmp#00000, __qmp#00001, ...
_LATE = "late reply"  # _unroutable(): a reply to one of our commands that gave up waiting

# Every private name of qemu.qmp that qmpwatch relies on, as (class, name): the methods
# WatchClient (and the lab's control client) override or extend through super(), the
# attributes WatchClient reads, and the slots `_message` fills. The pin in pyproject.toml
# holds them; tests/sources/test_qemu_qmp_privates.py fails, naming each one, if the installed
# qemu.qmp lacks any (check them all before moving the pin).
QEMU_QMP_PRIVATES: tuple[tuple[str, str], ...] = (
    ("QMPClient", "_cb_inbound"),  # overridden: no pretty DEBUG dump per message (lab too)
    ("QMPClient", "_cb_outbound"),  # overridden: the same, for messages sent
    ("QMPClient", "_establish_session"),  # extended: a new session resets the line splitter
    ("QMPClient", "_get_greeting"),  # extended: greeted yet (garbage before it is fatal)
    ("QMPClient", "_negotiate"),  # extended: negotiated yet (an id-less reply is routable)
    ("QMPClient", "_do_recv"),  # replaced: the whole message path
    ("QMPClient", "_reader"),  # read by `_fill`: the session's StreamReader
    ("QMPClient", "_pending"),  # read: the ids of the commands waiting for a reply
    ("QMPClient", "_execute_id"),  # read: the next execute id, to tell late replies
    ("QMPClient", "_get_exec_id"),  # its ids are `_ID_PREFIX` + a number (late replies)
    ("QMPClient", "_event_dispatch"),  # overridden by the lab's control client
    ("QMPClient", "_recv"),  # extended by the lab's control client: events before a greeting
    ("Message", "_data"),  # set by `_message`: no serialised form yet
    ("Message", "_obj"),  # set by `_message`: the object already parsed
)

EventCallback = Callable[[dict[str, Any], float], None]  # (event, received at: epoch s)
ErrorCallback = Callable[[DecodeError], None]


def _ignore_event(obj: dict[str, Any], now: float) -> None:
    return None


def _ignore_error(err: DecodeError) -> None:
    return None


def _ignore_reply() -> None:
    return None


class WatchClient(QMPClient):
    """A QMP client whose events go to `on_event` instead of listener queues."""

    def __init__(
        self,
        name: str | None = None,
        *,
        on_event: EventCallback = _ignore_event,
        on_decode_error: ErrorCallback = _ignore_error,
        on_reply: Callable[[], None] = _ignore_reply,
    ) -> None:
        """`on_reply()` runs in the reader the moment a command's reply is read, so that the
        caller can tell the reply apart from events read after it."""
        super().__init__(name, readbuflen=STREAM_BUFFER)
        self.on_event = on_event
        self.on_decode_error = on_decode_error
        self.on_reply = on_reply
        self._in_a_row = 0
        self._greeted = False
        self._negotiated = False
        self._lines: deque[bytes] = deque()  # whole lines read, not yet handled
        self._partial: list[bytes] = []  # the pieces of the line still being received
        self._partial_len = 0
        self._dropping = False  # skipping the rest of an over-long line

    # The stock hooks log str(msg) (a pretty JSON dump) on every message.
    def _cb_inbound(self, msg: Message) -> Message:
        return msg

    def _cb_outbound(self, msg: Message) -> Message:
        return msg

    async def _establish_session(self) -> None:
        self._greeted = False
        self._negotiated = False
        self._lines.clear()
        self._partial.clear()
        self._partial_len = 0
        self._dropping = False
        await super()._establish_session()

    async def _negotiate(self) -> None:
        await super()._negotiate()
        self._negotiated = True

    async def _get_greeting(self) -> Any:
        greeting = await super()._get_greeting()
        self._greeted = True
        return greeting

    async def _do_recv(self) -> Message:
        lines = self._lines  # runs per message: what the loop reads often is kept in locals
        in_a_row = self._in_a_row
        now = time.time()
        try:
            while True:
                in_a_row += 1
                if in_a_row >= YIELD_EVERY:
                    in_a_row = 0
                    await asyncio.sleep(0)
                    now = time.time()
                if lines:
                    line = lines.popleft()
                else:
                    line = await self._read_line()
                    now = time.time()
                if not line:  # _DROPPED: every line read has at least its newline
                    self._line_dropped()
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as err:
                    problem = f"not JSON: {err}"
                else:
                    if type(obj) is not dict:
                        problem = "not a JSON object"
                    elif not self._greeted:
                        if "event" in obj and "QMP" not in obj:
                            # QEMU (seen with 10.0) can send an event emitted while it opened
                            # a monitor's first connection before that monitor's greeting.
                            self.on_event(obj, now)
                            continue
                        return _message(obj)  # the greeting: qemu.qmp checks it
                    elif "event" in obj:
                        if len(line) <= _SHALLOW or not deeper_than(obj, MAX_DEPTH):
                            self.on_event(obj, now)
                            continue
                        problem = f"nested deeper than {MAX_DEPTH} levels"
                    else:
                        problem = self._unroutable(obj)
                        if not problem:
                            self.on_reply()
                            return _message(obj)
                        if problem is _LATE:
                            continue
                bad = DecodeError(problem, line.decode("utf-8", "replace"))
                if not self._greeted:
                    # Garbage instead of a greeting: this is not a QMP monitor (or not yet).
                    raise bad
                self.on_decode_error(bad)
        finally:
            self._in_a_row = in_a_row

    def _unroutable(self, obj: dict[str, Any]) -> str:
        """Why a non-event message cannot go to qemu.qmp's reply routing; "" if it can."""
        if "return" not in obj and "error" not in obj:
            if "QMP" in obj:
                return "a second greeting in the middle of a session"
            return "not a QMP message: no event, return or error key"
        if "id" not in obj:
            if not self._negotiated:
                return ""  # the reply to qmp_capabilities, which is sent without an id
            return "a reply without an id, but every command was sent with one"
        msg_id = obj["id"]
        if type(msg_id) is not str:
            return f"reply id: expected a string, got {type_name(msg_id)}"
        if msg_id in self._pending:
            return ""
        number = msg_id.removeprefix(_ID_PREFIX)
        ours = number != msg_id and 0 < len(number) <= 20 and number.isascii() and number.isdigit()
        if ours and int(number) < self._execute_id:
            return _LATE  # ours, but its execute() gave up (timed out) already
        return f"reply with unknown id {msg_id[:64]!r}: no command is waiting for it"

    async def _read_line(self) -> bytes:
        """The next line, with its newline, or `_DROPPED`; reads from the stream as needed."""
        while not self._lines:
            await self._fill()
        return self._lines.popleft()

    async def _fill(self) -> None:
        """Read one chunk: its whole lines go to `_lines`, the unfinished one to `_partial`."""
        assert self._reader is not None
        data = await self._reader.read(READ_CHUNK)
        if not data:
            if self._partial:
                rest = b"".join(self._partial).decode("utf-8", "replace")
                self._partial.clear()
                self._partial_len = 0
                self.on_decode_error(DecodeError("truncated message at end of stream", rest))
            raise EOFError
        start = 0
        if self._dropping:
            start = data.find(b"\n") + 1
            if not start:
                return
            self._dropping = False
        cut = data.rfind(b"\n") + 1
        if cut > start:
            lines = _LINE.findall(data, start, cut)
            if self._partial:
                if self._partial_len + len(lines[0]) - 1 > READ_LIMIT:
                    lines[0] = _DROPPED
                else:
                    self._partial.append(lines[0])
                    lines[0] = b"".join(self._partial)
                self._partial.clear()
                self._partial_len = 0
            self._lines.extend(lines)
            start = cut
        if start < len(data):
            self._partial.append(data[start:])
            self._partial_len += len(data) - start
            if self._partial_len > READ_LIMIT:  # no newline yet, and already too long
                self._partial.clear()
                self._partial_len = 0
                self._dropping = True
                self._lines.append(_DROPPED)

    def _line_dropped(self) -> None:
        bad = DecodeError(f"line longer than {READ_LIMIT} bytes, dropped", "<dropped>")
        if not self._greeted:
            raise bad  # not a QMP monitor
        self.on_decode_error(bad)

    @property
    def connected(self) -> bool:
        return self.runstate == Runstate.RUNNING


def _message(obj: dict[str, Any]) -> Message:
    """Wrap an already-parsed object without qemu.qmp re-serialising or copying it."""
    msg = Message.__new__(Message)
    msg._data = None
    msg._obj = obj
    return msg
