"""A log line on disk implies the state of the turn that logged it.

The daemon batches its writes per event-loop turn: log lines, the alert outbox and the state
store each commit once at the end of the turn. It commits the outbox and the store before it
writes a batch of lines, so an operator (or a restart after SIGKILL) never finds an `alert`
line whose alert is not in the outbox, nor a status line ahead of the stored status.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.alerts.outbox import DB_NAME
from qmpwatch.core.config import AlertConfig, Config, DaemonConfig, VmConfig, WebhookConfig
from qmpwatch.lab import LabSpec, LabVM
from qmpwatch.output import logs
from qmpwatch.service.daemon import Daemon
from qmpwatch.service.statestore import FILE_NAME
from tests.support.ports import refusing_port

pytestmark = pytest.mark.qemu

DEADLINE_S = 10.0


class JournalCheckingLog(io.BytesIO):
    """The daemon's log stream; at each write that holds an `alert` line it reads what the
    outbox and the state store have committed at that moment, through connections of its own."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__()
        self.state_dir = state_dir
        self.at_alert_lines: list[tuple[list[str], dict[str, Any]]] = []
        self.alert_written = asyncio.Event()
        self.written = asyncio.Event()

    def write(self, data: Any) -> int:
        if b'"event":"alert"' in bytes(data):
            self.at_alert_lines.append((self._outbox_alerts(), self._statuses()))
            self.alert_written.set()
        self.written.set()
        return super().write(data)

    def _outbox_alerts(self) -> list[str]:
        with contextlib.closing(sqlite3.connect(self.state_dir / DB_NAME)) as db:
            return [
                kind for (kind,) in db.execute("SELECT json_extract(alert, '$.kind') FROM entry")
            ]

    def _statuses(self) -> dict[str, Any]:
        with contextlib.closing(sqlite3.connect(self.state_dir / FILE_NAME)) as db:
            return dict(db.execute("SELECT vm, status FROM vm_status"))


async def test_an_alert_line_is_written_only_after_its_alert_and_status_are_committed(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A client pauses a real QEMU: when the `alert` line reaches the log, the outbox already
    holds the alert (owed to a webhook that is down) and the store already says `paused`."""
    state_dir = tmp_path / "state"
    refusing = contextlib.ExitStack()
    # nothing listens: the alert stays owed
    down = f"http://127.0.0.1:{refusing.enter_context(refusing_port())}/hook"
    log = JournalCheckingLog(state_dir)
    writer = logs.configure("json", log)
    try:
        async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
            config = Config(
                daemon=DaemonConfig(state_dir=str(state_dir), metrics_listen=""),
                alert=AlertConfig(webhook=(WebhookConfig(url=down, timeout_s=1.0),)),
                vms=(VmConfig("web01", str(vm.watch_socket)),),
            )
            daemon = asyncio.create_task(Daemon(config, None, writer).main())
            try:
                async with asyncio.timeout(DEADLINE_S):
                    while b'"event":"vm_connected"' not in log.getvalue():
                        await log.written.wait()
                        log.written.clear()
                await vm.stop()
                async with asyncio.timeout(DEADLINE_S):
                    await log.alert_written.wait()
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler stops it
                async with asyncio.timeout(DEADLINE_S):
                    assert await daemon == 0
    finally:
        logs.unconfigure()
        refusing.close()
    outbox, statuses = log.at_alert_lines[0]
    assert outbox == ["vm_stopped_unexpected"]
    assert statuses == {"web01": "paused"}
