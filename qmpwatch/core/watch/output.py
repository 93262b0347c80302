"""Where the watch core's decisions go: the daemon and `replay` each provide a `WatchOutput`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from qmpwatch.core.alert import Alert
from qmpwatch.core.events import Event


class WatchOutput(Protocol):
    """Where the core's decisions go; the daemon and `replay` each provide one."""

    def record(self, kind: str, level: str, now: float, fields: dict[str, Any]) -> None:
        """Write one log record (`kind` is the record's `event` name)."""

    def qmp_event(self, event: Event, now: float) -> None:
        """Write the `qmp_event` record of `event`: level info, the fields that
        `logs.qmp_event_fields` gives (`record("qmp_event", "info", now,
        qmp_event_fields(event))`, or a faster equivalent)."""

    def raise_alert(self, alert: Alert) -> None:
        """Hand a new alert to the dispatcher (its `alert` record is already written)."""

    def resolve_alert(self, alert: Alert, now: float) -> None:
        """Hand a resolved alert to the dispatcher (its record is already written)."""

    def query_status(self) -> None:
        """Run `query-status` off the reader task and call `on_status` (or `status_unknown`)."""

    def command(self, name: str, arguments: Mapping[str, Any]) -> None:
        """Send QEMU a command that acts on the VM (opt-in remediation); the answer comes
        back through `on_command_result`."""
