"""Structured logs: structlog configured for JSON lines (or a console format for people).

Every record has `timestamp`, `level` and `event`, then its own keys. `LineWriter` writes the
lines of one event-loop turn in one `write()` (at once outside a running loop), `RecordLogger`
is the per-event path, and qemu.qmp's stdlib loggers are routed here, quiet below CRITICAL.
docs/architecture.md ("JSON lines") says why.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import IO, Any, Literal

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from qmpwatch.aio.lanes import Lane
from qmpwatch.aio.turns import EndOfTurn
from qmpwatch.core.events import Event
from qmpwatch.core.times import iso_from_epoch, iso_utc
from qmpwatch.output import console

LogFormat = Literal["json", "console"]


def qmp_event_fields(event: Event) -> dict[str, Any]:
    """The fields of an event's `qmp_event` record: its name, QEMU's time and its data."""
    return {
        "qmp": event.name,
        "qemu_time": iso_utc(event.seconds, event.microseconds),  # event.qemu_time
        "data": event.data,
    }


class LineWriter:
    """A structlog "logger" that collects rendered lines and writes them in batches.

    Lines are copied into one growing buffer as they come, and each line's own bytes object is
    freed at once: keeping hundreds of them alive until the end of the turn (a busy turn with
    many VMs) made every `orjson.dumps` several times slower, through glibc's heap trimming.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._end_of_turn = EndOfTurn(self.flush)
        self._flush_due = False  # spares the per-line call to `EndOfTurn.schedule`
        # Run before each batch is written: the daemon commits its state journals there, so
        # that a line on disk implies the state changes of the turn that logged it.
        self.before_write: list[Callable[[], object]] = []
        self.lane: Lane | None = None  # where batches are written (None: here, at once)
        self._backlog_max = 0
        self._backlog = 0  # bytes handed to the lane, not yet written
        self._dropped = 0  # lines dropped since the last batch written
        self._lock = threading.Lock()

    def offload(self, lane: Lane, backlog_max: int) -> None:
        """From now on write each batch in `lane` (a thread), so that a log nobody reads
        (journald stalled, a full pipe) never blocks the loop. Beyond `backlog_max` bytes
        waiting, new `info` lines are dropped and counted, and lines of warning and above
        (alerts, stalls) are kept up to twice that; the next batch written starts with a
        `log_records_dropped` line saying how many lines were lost."""
        self.lane = lane
        self._backlog_max = backlog_max

    def drain(self, timeout: float) -> bool:
        """Wait (blocking) until the batches handed to the lane are written; False when they
        are not after `timeout` s."""
        if self.lane is None:
            return True
        try:
            self.lane.submit(lambda: None).result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True

    def msg(self, line: bytes | str) -> None:
        self.write_line(line if isinstance(line, bytes) else line.encode() + b"\n")

    def write_line(self, line: bytes) -> None:
        """Queue one rendered line (with its newline); it is written at the end of this turn
        (at once outside a running loop)."""
        self._buffer += line
        if not self._flush_due:
            self._flush_due = True
            self._end_of_turn.schedule()

    debug = info = warning = warn = error = critical = exception = log = msg

    def flush(self) -> None:
        """Write what is queued now (runs by itself right after the turn that queued it)."""
        self._flush_due = False
        self._end_of_turn.cancel()
        if not self._buffer:
            return
        for hook in self.before_write:
            hook()
        data, self._buffer = self._buffer, bytearray()  # the stream may keep what it is given
        lane = self.lane
        if lane is None:
            self._write(data)
            return
        with self._lock:
            if self._backlog + len(data) > self._backlog_max:
                data = self._overflow(data)
                if not data:
                    return
            self._backlog += len(data)
        lane.submit(self._write_in_lane, data)

    def _overflow(self, data: bytearray) -> bytearray:
        """The backlog is full: drop the batch's `info` lines (counted), keep the others
        (alerts, stalls, errors) up to twice the bound, then drop those too."""
        kept = bytearray()
        room = 2 * self._backlog_max - self._backlog
        for line in data.splitlines(keepends=True):
            if _IMPORTANT.search(line, 0, 64) and len(kept) + len(line) <= room:
                kept += line
            else:
                self._dropped += 1
        return kept

    def _write_in_lane(self, data: bytearray) -> None:
        with self._lock:
            self._backlog -= len(data)
            dropped, self._dropped = self._dropped, 0
        if dropped:
            self._write(_dropped_line(dropped))
        self._write(data)

    def _write(self, data: bytes | bytearray) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except OSError:
            # Nowhere left to write (stdout closed, disk full): the records are lost, but the
            # daemon goes on watching and alerting, which matters more.
            pass


_IMPORTANT = re.compile(rb'"level":"(?:warning|error|critical)"')


def _dropped_line(dropped: int) -> bytes:
    """The `log_records_dropped` record, rendered in the log's thread (not through
    structlog, which belongs to the loop)."""
    return orjson.dumps(
        {
            "timestamp": iso_from_epoch(time.time()),
            "level": "error",
            "event": "log_records_dropped",
            "dropped": dropped,
            "reason": "the log was not read (journald or the log file stalled); "
            "daemon.log_backlog_bytes were waiting",
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


def _add_timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    if "timestamp" not in event_dict:
        event_dict["timestamp"] = iso_from_epoch(time.time())
    return event_dict


def _render_json(_: WrappedLogger, __: str, event_dict: EventDict) -> bytes:
    ordered = {
        "timestamp": event_dict.pop("timestamp"),
        "level": event_dict.pop("level"),
        "event": event_dict.pop("event"),
    }
    ordered.update(event_dict)
    return orjson.dumps(ordered, option=orjson.OPT_APPEND_NEWLINE, default=str)


def configure(fmt: LogFormat = "json", stream: IO[bytes] | None = None) -> LineWriter:
    """Configure structlog (and route stdlib logging through it); returns the writer."""
    writer = LineWriter(stream if stream is not None else sys.stdout.buffer)
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = _render_json
    else:
        colours = hasattr(writer.stream, "isatty") and writer.stream.isatty()
        renderer = console.renderer(colours)
    structlog.configure(
        processors=[structlog.processors.add_log_level, _add_timestamp, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=False,
    )
    _route_stdlib(writer)
    return writer


class _StdlibToStructlog(logging.Handler):
    """Send stdlib records (qemu.qmp's) through structlog as `library_log` records."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        log = structlog.get_logger()
        fields: MutableMapping[str, Any] = {"logger": record.name, "message": record.getMessage()}
        getattr(log, level if level in ("warning", "error", "critical") else "info")(
            "library_log", **fields
        )


def _route_stdlib(writer: LineWriter) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibToStructlog):
            root.removeHandler(handler)
    root.addHandler(_StdlibToStructlog())
    # qemu.qmp logs every failed connect at ERROR, and "Unknown ID" at WARNING; the daemon
    # reports those itself with context, so the library is quiet below CRITICAL.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def unconfigure() -> None:
    """Undo `configure`: structlog's defaults, no stdlib routing, qemu.qmp's own level (for a
    process that configures logging more than once, such as a test run)."""
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibToStructlog):
            root.removeHandler(handler)
    logging.getLogger("qemu.qmp").setLevel(logging.NOTSET)


# What `configure("json")` sets up; RecordLogger renders straight to the writer while it holds.
_JSON_CHAIN: list[Any] = [structlog.processors.add_log_level, _add_timestamp, _render_json]
_FILTERING_LOGGER = structlog.make_filtering_bound_logger(logging.INFO)
_LOGGED_LEVELS = frozenset({"info", "warning", "error", "critical"})  # INFO and above


class RecordLogger:
    """The `record()` half of a WatchOutput: one VM's records through structlog.

    Records are written for every QMP event, so while structlog is configured as
    `configure("json")` left it (not, say, under `structlog.testing.capture_logs()`), a record
    is rendered here directly: the same dict in the same key order that structlog's chain
    (bound context, `add_log_level`, `_add_timestamp`, `_render_json`) would build, the same
    `orjson.dumps`, the same writer. That skips the chain's dict copies and pops, which were
    the largest share of the per-event cost. Anything else takes structlog's own path.
    """

    def __init__(self, vm: str) -> None:
        self._log = structlog.get_logger().bind(vm=vm)
        # A bound logger keeps its class, context, wrapped logger and processor list for life
        # (`capture_logs()` changes the list's contents, so those are checked per record).
        log: Any = self._log
        self._processors: list[Any] = log._processors
        self._context: dict[str, Any] = log._context
        writer = log._logger
        direct = (
            type(log) is _FILTERING_LOGGER
            and type(writer) is LineWriter
            and self._context == {"vm": vm}
        )
        self._writer: LineWriter | None = writer if direct else None
        self._vm = vm
        self._last_now = -1.0  # _stamp()'s one-entry cache
        self._last_stamp = ""

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None:
        writer = self._writer
        if (
            writer is not None
            and self._processors == _JSON_CHAIN
            and level in _LOGGED_LEVELS
            and "timestamp" not in fields
            and "level" not in fields
            and "event" not in fields
        ):
            line = orjson.dumps(
                {
                    "timestamp": self._stamp(now),
                    "level": level,
                    "event": kind,
                    **self._context,
                    **fields,
                },
                option=orjson.OPT_APPEND_NEWLINE,
                default=str,
            )
            writer.write_line(line)  # what every level's method of LineWriter does
            return
        getattr(self._log, level)(kind, timestamp=iso_from_epoch(now), **fields)

    def qmp_event(self, event: Event, now: float) -> None:
        """The `qmp_event` record of `event`: `record("qmp_event", "info", now,
        qmp_event_fields(event))`, with the fields' dict built in place (once per event)."""
        writer = self._writer
        if writer is not None and self._processors == _JSON_CHAIN:
            line = orjson.dumps(
                {
                    "timestamp": self._stamp(now),
                    "level": "info",
                    "event": "qmp_event",
                    "vm": self._vm,  # the bound context: only vm (checked in __init__)
                    "qmp": event.name,
                    "qemu_time": iso_utc(event.seconds, event.microseconds),
                    "data": event.data,
                },
                option=orjson.OPT_APPEND_NEWLINE,
                default=str,
            )
            writer.write_line(line)
            return
        self.record("qmp_event", "info", now, qmp_event_fields(event))

    def _stamp(self, now: float) -> str:
        """`iso_from_epoch(now)`; records written in one go share `now`, so the last is kept."""
        if now == self._last_now:
            return self._last_stamp
        stamp = self._last_stamp = iso_from_epoch(now)
        self._last_now = now
        return stamp
