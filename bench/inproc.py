"""The real daemon (`qmpwatch.service.daemon.Daemon`), run inside a measuring process.

Everything is the daemon's own: JSON logs through `logs.configure` into a file, the state
store, metrics, the alert dispatcher and its outbox under the state directory, the
supervisor with one task per VM, signal handling (it is stopped with SIGTERM, as systemd
would). Two observation points are added, neither on the per-event path:

- the log file is opened unbuffered (one write() per LineWriter batch, as with the daemon's
  own file) and notes when a write containing a pattern returned (`TimedLog.watch`);
- `timed_handover()` wraps `AlertDispatcher.fire` to note when an alert has been handed to
  the outbox (after `fire` returned).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qmpwatch.alerts.dispatch import AlertDispatcher
from qmpwatch.core.alert import Alert
from qmpwatch.core.config import (
    AlertConfig,
    Config,
    DaemonConfig,
    ListenConfig,
    VmConfig,
    WebhookConfig,
)
from qmpwatch.output import logs
from qmpwatch.service.daemon import Daemon

Watcher = Callable[[float, bytes], None]


class TimedLog(io.FileIO):
    """An unbuffered log file that reports writes containing a pattern.

    `watch(pattern, callback)`: after every write whose data contains `pattern`, the callback
    gets the time the write returned (`time.monotonic()`) and the data; with `once`, only
    after the first such write.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, "wb")
        self.watchers: list[tuple[bytes, Watcher, bool]] = []

    def watch(self, pattern: bytes, callback: Watcher, *, once: bool = False) -> None:
        self.watchers.append((pattern, callback, once))

    def write(self, data: Any, /) -> int:
        written = super().write(data)
        if self.watchers:
            now = time.monotonic()
            for watcher in list(self.watchers):
                pattern, callback, once = watcher
                if pattern in data:
                    if once:
                        self.watchers.remove(watcher)
                    callback(now, data)
        return written if written is not None else 0


@contextmanager
def timed_handover(on_fire: Callable[[float, Alert], None]) -> Iterator[None]:
    """While active, every `AlertDispatcher.fire` reports (time it returned, alert)."""
    original = AlertDispatcher.fire

    def fire(self: AlertDispatcher, alert: Alert) -> None:
        original(self, alert)
        on_fire(time.monotonic(), alert)

    setattr(AlertDispatcher, "fire", fire)  # noqa: B010 - a measuring wrapper, undone below
    try:
        yield
    finally:
        setattr(AlertDispatcher, "fire", original)  # noqa: B010


def config(
    sockets: dict[str, Path],
    state_dir: Path,
    *,
    webhook: str = "",
    timeout_s: float = 5.0,
    listen: tuple[Path, ...] = (),
) -> Config:
    """A daemon configuration watching `sockets` (name -> path) and the VMs that dial in to
    the `listen` sockets, no HTTP endpoint."""
    hooks = (WebhookConfig(url=webhook, timeout_s=timeout_s),) if webhook else ()
    return Config(
        daemon=DaemonConfig(state_dir=str(state_dir), metrics_listen="", api_socket=""),
        alert=AlertConfig(webhook=hooks),
        vms=tuple(VmConfig(name, str(path)) for name, path in sockets.items()),
        listen=tuple(ListenConfig(str(path)) for path in listen),
    )


class InProcessDaemon:
    """`qmpwatch run` in this process: `start()`, then `stop()` (SIGTERM) when done."""

    def __init__(self, cfg: Config, log_path: Path) -> None:
        self.log = TimedLog(log_path)
        self.writer = logs.configure("json", self.log)
        self.daemon = Daemon(cfg, None, self.writer)
        self.task: asyncio.Task[int] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.daemon.main(), name="qmpwatch-daemon")

    async def stop(self) -> int:
        """SIGTERM to this process (the daemon's handler stops it); its exit status."""
        assert self.task is not None
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            return await self.task
        finally:
            self.log.close()
