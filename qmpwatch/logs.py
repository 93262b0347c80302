"""Structured logs: structlog configured for JSON lines (or a console format for people).

Every record has `timestamp` (ISO 8601, UTC, microseconds), `level` and `event`, then the
record's own keys, rendered with orjson. Lines are collected in memory and written in one
`write()` per event-loop turn (`LineWriter.flush_soon`), so a burst of events costs one
syscall, and no line waits longer than the rest of the current loop iteration; `flush()` runs
on shutdown. Outside a running loop (`replay`, `check-config`) every line is written at once.

The stdlib loggers of qemu.qmp are routed here too, lowered to warnings-and-above, so that a
retry loop against a missing socket does not flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import IO, Any, Literal

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from qmpwatch.events import iso_utc

LogFormat = Literal["json", "console"]


def iso_from_epoch(now: float) -> str:
    """Epoch seconds -> ISO 8601 UTC with microseconds."""
    seconds = int(now)
    micro = round((now - seconds) * 1_000_000)
    if micro >= 1_000_000:
        seconds, micro = seconds + 1, micro - 1_000_000
    return _iso_cached(seconds, micro)


_last_second = -1
_last_prefix = ""


def _iso_cached(seconds: int, micro: int) -> str:
    global _last_second, _last_prefix  # noqa: PLW0603 - one-entry cache, same result either way
    if seconds != _last_second:
        _last_prefix = iso_utc(seconds, 0)[:-8]
        _last_second = seconds
    return f"{_last_prefix}.{micro:06d}Z"


class LineWriter:
    """A structlog "logger" that collects rendered lines and writes them in batches."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self._lines: list[bytes] = []
        self._scheduled = False

    def msg(self, line: bytes | str) -> None:
        self._lines.append(line if isinstance(line, bytes) else line.encode() + b"\n")
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    debug = info = warning = warn = error = critical = exception = log = msg

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except OSError:
            # Nowhere left to write (stdout closed, disk full): the records are lost, but the
            # daemon goes on watching and alerting, which matters more.
            pass


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
        colors = hasattr(writer.stream, "isatty") and writer.stream.isatty()
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
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


class RecordLogger:
    """The `record()` half of a WatchOutput: one VM's records through structlog."""

    def __init__(self, vm: str) -> None:
        self._log = structlog.get_logger().bind(vm=vm)

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None:
        getattr(self._log, level)(kind, timestamp=iso_from_epoch(now), **fields)
