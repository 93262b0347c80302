"""Alerts: the model, the stable fingerprint, and the classification of stopped VMs.

Pure. An alert is raised by the watch core (`qmpwatch.core.watch`) and handed to the dispatcher;
this module only says what an alert is and which run status deserves which alert.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Severity = Literal["critical", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = get_args(Severity)  # most severe first
# `alert.client_stop_severity`: the severity of a pause by a monitor client, or no alert.
ClientStopSeverity = Severity | Literal["none"]

KINDS = (
    "vm_stopped_io_error",
    "vm_stopped_watchdog",
    "vm_stopped_unexpected",
    "vm_panicked",
    "vm_crashed",
    "watchdog_fired",
    "followup_missing",
    "vm_state_changed_while_unmonitored",
    "vm_crash_loop",
    "vm_gone_while_unmonitored",
    "vm_stuck_transient",
    "vm_image_corrupted",
    "vm_memory_failure",
    "block_job_error",
    "migration_failed",
    "vm_resume_given_up",
    "vm_disk_filling",
    "storage_space_low",
    "vm_agent_absent",
    "vm_unreachable",
    "libvirt_unresponsive",
)

# Alerts about a VM that is not running; they resolve when it runs again.
STOPPED_KINDS = frozenset(
    {
        "vm_stopped_io_error",
        "vm_stopped_watchdog",
        "vm_stopped_unexpected",
        "vm_panicked",
        "vm_state_changed_while_unmonitored",
        "vm_stuck_transient",
    }
)


def stop_alert_firing(firing: Iterable[Alert], status: str, kind: str = "") -> bool:
    """Whether an alert of another kind than `kind` about the VM being stopped in `status`
    fires already (one found at connect): a new stop in that status is the same incident."""
    return any(
        a.kind in STOPPED_KINDS and a.kind != kind and a.details.get("status") == status
        for a in firing
    )


# Alerts that stay firing until their condition ends (the others are one-shot).
RESOLVABLE_KINDS = STOPPED_KINDS | {
    "vm_crashed",
    "vm_crash_loop",
    "vm_gone_while_unmonitored",
    "vm_disk_filling",
    "storage_space_low",
    "vm_agent_absent",
    "vm_unreachable",
    "libvirt_unresponsive",  # about a [[libvirt]] connection, not one VM (its `vm` is "")
}

# Alerts of the incidents a crash loop is made of; while a VM's vm_crash_loop fires they are
# raised as `info`, so a loop pages once.
CRASH_KINDS = frozenset({"vm_crashed", "vm_panicked", "watchdog_fired"})


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert: what happened to which VM, how bad, in one sentence, with details."""

    kind: str
    severity: Severity
    vm: str
    summary: str
    cause: str  # what raised it, e.g. "BLOCK_IO_ERROR:drive0" or "STOP:paused"
    raised_at: float  # epoch seconds (the watch clock)
    details: Mapping[str, Any] = field(default_factory=dict)
    #: Stable identity for deduplication: VM + kind + cause (computed once).
    fingerprint: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = f"{self.vm}\x00{self.kind}\x00{self.cause}".encode()
        object.__setattr__(self, "fingerprint", hashlib.sha256(key).hexdigest()[:16])


def resolved_summary(summary: str, reason: str) -> str:
    """The sentence of an alert's resolution: its summary, read as over, and why it ended.

    "Resolved: VM web01 paused by a monitor client (stop); ended: the VM resumed (RESUME)"
    """
    return f"Resolved: {summary}; ended: {reason}" if reason else f"Resolved: {summary}"


def resolved_because(alert: Alert, reason: str) -> Alert:
    """`alert` as its resolution is sent: the same alert, its details saying why it ended."""
    return dataclasses.replace(alert, details={**alert.details, "resolution": reason})


# Statuses of a stopped VM that need no alert: explained by a shutdown, or normal states.
QUIET_STATUSES = frozenset(
    {
        "running",
        "shutdown",
        "finish-migrate",
        "postmigrate",
        "inmigrate",
        "prelaunch",
        "save-vm",
        "restore-vm",
        "suspended",
        "colo",
    }
)


# States a VM passes through on its way somewhere (migration, start-up with -S, snapshots):
# quiet, unless the VM stays in one longer than `lifecycle.transient_state_max_s`.
TRANSIENT_STATUSES = frozenset(
    {"inmigrate", "postmigrate", "finish-migrate", "prelaunch", "save-vm", "restore-vm"}
)


# A run status in words, for people (`qmpwatch status`).
STATUS_WORDS = {
    "running": "",
    "paused": "paused by a monitor client (stop)",
    "shutdown": "the guest shut down; QEMU waits (-no-shutdown)",
    "io-error": "paused on a disk I/O error",
    "watchdog": "paused by its watchdog",
    "guest-panicked": "the guest kernel panicked",
    "internal-error": "stopped on an internal error of QEMU",
    "debug": "stopped for a debugger",
    "prelaunch": "not started yet (-S): waiting for cont",
    "inmigrate": "waiting for an incoming migration",
    "postmigrate": "migrated away; this QEMU is left over",
    "finish-migrate": "finishing a migration",
    "save-vm": "saving a snapshot",
    "restore-vm": "restoring a snapshot",
    "suspended": "suspended by the guest (ACPI S3)",
    "colo": "in COLO fault tolerance",
}


def describe_status(status: str | None) -> str:
    """Why a VM is in `status`, in words ("" while running; "" when unknown)."""
    if status is None:
        return ""
    return STATUS_WORDS.get(status, f"state {status}")


@dataclass(frozen=True, slots=True)
class StopClass:
    """How a stopped VM's status is alerted: kind, severity and the words for the summary."""

    kind: str
    severity: Severity
    what: str


def classify_status(
    status: str | None, client_stop_severity: ClientStopSeverity
) -> StopClass | None:
    """The alert for a VM stopped in `status` (None: unknown), or None when no alert is due."""
    if status in QUIET_STATUSES:
        return None
    if status == "io-error":
        return StopClass("vm_stopped_io_error", "critical", "paused on a disk I/O error")
    if status == "watchdog":
        return StopClass("vm_stopped_watchdog", "critical", "paused by its watchdog")
    if status == "guest-panicked":
        return StopClass("vm_panicked", "critical", "stopped: the guest kernel panicked")
    if status == "paused":
        if client_stop_severity == "none":
            return None
        severity: Severity = client_stop_severity
        return StopClass("vm_stopped_unexpected", severity, "paused by a monitor client (stop)")
    shown = "an unknown state" if status is None else f"state {status}"
    return StopClass("vm_stopped_unexpected", "critical", f"stopped unexpectedly ({shown})")
