"""The console log format: one short line per record, for people (`tail`, `--log-format console`).

    15:09:35.606 vm1       STOP
    15:09:35.608 vm1       ALERT warning vm_stopped_unexpected: VM vm1 paused by a client
    15:09:35.608 vm1       resolved vm_stopped_unexpected: the VM resumed (RESUME)
    15:09:36.101 web01     followup satisfied: BLOCK_IO_ERROR -> STOP in 0.29 ms

Colour only on a terminal. The JSON format stays the contract; this one may change. Every
C0 and C1 control character of what a peer sent (event names, texts) is shown escaped
(`printable`), so that nothing a guest or a local user sends drives the terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from structlog.typing import EventDict, WrappedLogger

from qmpwatch.core.text import printable

_RESET = "\x1b[0m"
_COLOURS = {
    "critical": "\x1b[1;31m",
    "error": "\x1b[31m",
    "warning": "\x1b[33m",
    "ok": "\x1b[32m",
    "dim": "\x1b[2m",
    "event": "\x1b[1m",
}


def _compact(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _what(kind: str, f: Mapping[str, Any]) -> tuple[str, str]:
    """(text, colour key) for a record."""
    if kind == "qmp_event":
        data = f.get("data") or {}
        return (f"{f.get('qmp')} {_compact(data)}" if data else str(f.get("qmp"))), "event"
    if kind == "alert":
        return f"ALERT {f.get('severity')} {f.get('alert')}: {f.get('summary')}", str(
            f.get("severity")
        )
    if kind == "alert_resolved":
        return f"resolved {f.get('alert')}: {f.get('reason')}", "ok"
    if kind == "followup_satisfied":
        cause, expected = f.get("cause"), f.get("expected")
        text = f"followup satisfied: {cause} -> {expected} in {f.get('latency_ms')} ms"
        return text, "ok"
    if kind in ("followup_missed", "followup_open"):
        state = "missed" if kind == "followup_missed" else "still open"
        expected, deadline = f.get("expected"), f.get("deadline_s")
        text = f"followup {state}: no {expected} within {deadline} s after {f.get('cause')}"
        return text, "warning"
    if kind == "vm_connected":
        version, status = f.get("qemu_version"), f.get("status")
        text = f"connected to {f.get('socket')} (QEMU {version}, status {status})"
        return text, "ok"
    if kind == "vm_disconnected":
        error = f": {f['error']}" if f.get("error") else ""
        return f"disconnected ({f.get('cause')}){error}", "warning"
    if kind == "vm_connect_failed":
        reason, retry = f.get("reason"), f.get("retry_in_s")
        text = f"cannot connect ({reason}): {f.get('error')}; retry in {retry} s"
        return text, "warning"
    if kind == "qmp_decode_error":
        return f"undecodable message ({f.get('error')}): {f.get('raw')}", "error"
    rest = " ".join(f"{k}={_compact(v) if not isinstance(v, str) else v}" for k, v in f.items())
    return (f"{kind} {rest}" if rest else kind), "dim"


def text(kind: str, fields: Mapping[str, Any]) -> str:
    """The words of a record's console line: what follows the clock and the VM."""
    return _what(kind, fields)[0]


def renderer(colours: bool) -> Callable[[WrappedLogger, str, EventDict], str]:
    """A structlog processor rendering one console line."""

    def render(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
        stamp = str(event_dict.pop("timestamp", ""))
        level = str(event_dict.pop("level", "info"))
        kind = str(event_dict.pop("event", ""))
        vm = str(event_dict.pop("vm", "-"))
        text, colour = _what(kind, event_dict)
        text, vm, stamp = printable(text), printable(vm), printable(stamp)
        if level in ("error", "critical") and colour not in ("critical", "error"):
            colour = level
        clock = stamp[11:23] if len(stamp) >= 23 else stamp
        line = f"{clock} {vm:<10} {text}"
        if colours:
            line = f"{_COLOURS['dim']}{clock}{_RESET} {vm:<10} {_COLOURS[colour]}{text}{_RESET}"
        return line

    return render
