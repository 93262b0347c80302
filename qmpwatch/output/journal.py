"""journald, natively: each record one journal entry with fields (`daemon.log_target = "journal"`).

The records are rendered exactly as for stdout (the JSON lines of `qmpwatch.output.logs`,
written once per event-loop turn after the state commits); `open_stream()` takes those lines
in place of stdout and sends each one as a journal entry through journald's native socket:

    MESSAGE             the console line (`qmpwatch.output.console`) without the clock, which
                        the journal keeps itself: "web01 ALERT warning vm_stopped_unexpected: ..."
    PRIORITY            from `level`: critical 2, error 3, warning 4, info 6 (debug 7)
    MESSAGE_ID          one per record kind, `message_id(kind)`: the UUID
                        uuid5(NAMESPACE_URL, "urn:qmpwatch:record:" + kind), as 32 hex digits
    SYSLOG_IDENTIFIER   qmpwatch
    QMPWATCH_EVENT      the record kind (`event`)
    QMPWATCH_VM         `vm`, for a record about a VM
    QMPWATCH_QMP        `qmp`, the QMP event of a `qmp_event` record
    QMPWATCH_ALERT      `alert`, the alert kind of `alert`, `alert_resolved`, `alert_delivered`...
    QMPWATCH_JSON       the whole record: the JSON line of the log contract

so that `journalctl QMPWATCH_VM=web01`, `journalctl MESSAGE_ID=...` and `journalctl -o json`
work. The protocol itself is `logging_journald.JournaldTransport`: pure Python, and an entry
too large for one datagram goes in a sealed memfd, as libsystemd's `sd_journal_send` does.
A send that fails loses that entry only; the daemon goes on watching.
"""

from __future__ import annotations

import functools
import io
import socket
import uuid
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import orjson
from logging_journald import JournaldTransport

from qmpwatch.output import console

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "qmpwatch"
PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
_ID_NAMESPACE = "urn:qmpwatch:record:"
# Record keys copied into fields of their own (for journalctl's matches), field -> key.
_FIELDS = {"QMPWATCH_VM": "vm", "QMPWATCH_QMP": "qmp", "QMPWATCH_ALERT": "alert"}
_NOT_TEXT = frozenset({"timestamp", "level", "event", "vm"})  # not in the console line's words

Entry = list[tuple[str, Any]]


@functools.cache
def message_id(kind: str) -> str:
    """The journal's MESSAGE_ID of records of `kind`: stable, derived from the kind alone."""
    return uuid.uuid5(uuid.NAMESPACE_URL, _ID_NAMESPACE + kind).hex


def entry(line: bytes) -> Entry:
    """The journal entry of one rendered JSON line (without its newline)."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict):  # not a record: sent as it is
        return [("MESSAGE", line), ("PRIORITY", 6), ("SYSLOG_IDENTIFIER", IDENTIFIER)]
    kind = str(record.get("event", ""))
    vm = record.get("vm")
    words = console.text(kind, {k: v for k, v in record.items() if k not in _NOT_TEXT})
    fields: Entry = [
        ("MESSAGE", f"{vm} {words}" if vm else words),
        ("PRIORITY", PRIORITIES.get(str(record.get("level")), 6)),
        ("MESSAGE_ID", message_id(kind)),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
        ("QMPWATCH_EVENT", kind),
    ]
    for field, key in _FIELDS.items():
        value = record.get(key)
        if isinstance(value, str):
            fields.append((field, value))
    fields.append(("QMPWATCH_JSON", line))
    return fields


class JournalWriter(io.RawIOBase):
    """The raw stream under `open_stream()`: JSON lines in, one journal entry per line out."""

    def __init__(
        self,
        send: Callable[[Iterable[tuple[str, Any]]], None],
        release: Callable[[], None] = lambda: None,
    ) -> None:
        """`send`: one entry to journald; `release`: what `close()` lets go of."""
        super().__init__()
        self._send = send
        self._release = release
        self._partial = b""  # the start of a line whose newline has not come yet
        self.lost = 0  # entries journald did not take

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._release()
        super().close()

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        lines = chunk.split(b"\n")
        if self._partial:
            lines[0] = self._partial + lines[0]
        self._partial = lines.pop()
        for line in lines:
            if not line:
                continue
            try:
                self._send(entry(line))
            except OSError:
                self.lost += 1
        return len(chunk)


def open_stream(socket_path: str | None = None) -> BinaryIO:
    """A stream for `qmpwatch.output.logs.configure("json", ...)` whose lines go to journald
    (at `socket_path`, default `SOCKET`).

    OSError when journald does not listen there (tried once now). Each entry is addressed to
    the path, as libsystemd does, so a journald restarted since still gets the next ones.
    """
    path = socket_path or SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        probe.connect(path)
    transport = JournaldTransport(socket_path=path, connected=False)
    return io.BufferedWriter(JournalWriter(transport.send, transport.socket.close))
