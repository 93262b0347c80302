"""sd_notify: tell systemd that qmpwatch is ready, what it is doing, and that its loop lives.

Outside systemd (no `$NOTIFY_SOCKET`) every function does nothing and returns False; a failed
send is logged and returned as False, never raised. `keep_alive()` sends the watchdog ping
from the event loop at half `WatchdogSec=`. docs/architecture.md ("systemd").
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import structlog

_log = structlog.get_logger()


def _address(value: str) -> str | None:
    """`$NOTIFY_SOCKET` -> an AF_UNIX address, or None when it is not one we can reach."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." of newer systemd inside VMs: not for a host daemon


def notify(*lines: str) -> bool:
    """Send one message of `KEY=VALUE` lines; True if it was handed to systemd."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address = _address(target)
    if address is None:
        _log.warning("sd_notify_failed", socket=target, error="unsupported NOTIFY_SOCKET address")
        return False
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop: systemd drains its queue quickly; if it is full, the
            # message is dropped (a watchdog ping is sent again half an interval later).
            sock.setblocking(False)
            sock.sendto(message, address)
    except OSError as err:
        _log.warning("sd_notify_failed", socket=target, error=str(err))
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Startup (or a reload) is complete: `READY=1`, with a `STATUS=` line if given."""
    return notify("READY=1", *([] if status is None else [_status_line(status)]))


def status(text: str) -> bool:
    """A one-line summary for `systemctl status`, e.g. "12 VMs, 11 connected, 1 alert firing"."""
    return notify(_status_line(text))


def reloading() -> bool:
    """A reload (SIGHUP) has begun; send `ready()` when it is done.

    `MONOTONIC_USEC=` is what `Type=notify-reload` (systemd 253+) requires; older systemd
    ignores it.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    """Shutdown has begun."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """One watchdog keep-alive ping."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds within which systemd wants a ping, or None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # the variables were meant for another process (we are its child)
    return int(usec) / 1_000_000


async def keep_alive(
    interval: float | None = None, alive: Callable[[], bool] | None = None
) -> None:
    """Ping the watchdog from the event loop every half `interval`, until cancelled.

    `interval` defaults to `watchdog_interval()`; without a watchdog this returns at once. When
    `alive` is given and returns False, that ping is skipped, so systemd restarts a daemon that
    is running but no longer doing its job.
    """
    if interval is None:
        interval = watchdog_interval()
        if interval is None:
            return
    period = interval / 2
    while True:
        if alive is None or alive():
            watchdog()
        await asyncio.sleep(period)


def status_line(vms: int, connected: int, firing: int) -> str:
    """The STATUS= summary, e.g. "12 VMs, 11 connected, 1 alert firing"."""
    return (
        f"{vms} VM{'' if vms == 1 else 's'}, {connected} connected, "
        f"{firing} alert{'' if firing == 1 else 's'} firing"
    )


def _status_line(text: str) -> str:
    # STATUS= is one line: a newline would start a new (bogus) KEY=VALUE assignment.
    return "STATUS=" + " ".join(text.splitlines())
