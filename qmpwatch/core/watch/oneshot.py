"""The one-shot kinds: watchdog, guest panic and crash kernel, image corruption, memory
failure, block job error, failed migration. Each event is an alert of its own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qmpwatch.core.alert import Severity
from qmpwatch.core.events import Event, GuestPanicked, Watchdog
from qmpwatch.core.watch import incidents, runstate

if TYPE_CHECKING:
    from qmpwatch.core.watch.vmwatch import VmWatch


def event_text(data: Mapping[str, Any], key: str, default: str = "") -> str:
    """A string field of an event the decoder does not type (a newer or unlisted event)."""
    value = data.get(key)
    return value if isinstance(value, str) else default


def _one_shot_cause(event: Event, what: str) -> str:
    """The cause of a one-shot alert: the event itself, so each event is an alert of its own."""
    return f"{event.name}:{what}:{event.seconds}.{event.microseconds:06d}"


def on_watchdog(watch: VmWatch, event: Event, now: float) -> None:
    """Every watchdog expiry is an alert of its own, whatever follows. It pages unless the
    VM's pause does (action `pause`: vm_stopped_watchdog follows) or QEMU does nothing."""
    assert isinstance(event, Watchdog)
    action = event.action
    severity: Severity = "critical"
    if action in ("none", "debug"):
        severity = "warning"
    elif action == "pause":
        severity = "info"
    incidents.incident(watch, now, "watchdog")
    watch.book.fire(
        now,
        "watchdog_fired",
        severity,
        f"VM {watch.vm}: the guest watchdog expired; QEMU's action: {action}",
        cause=f"WATCHDOG:{action}",
        details={"action": action},
        qemu_time=event.qemu_time,
    )


def on_guest_panicked(watch: VmWatch, event: Event, now: float) -> None:
    """A guest panic is an alert whatever QEMU does next; it resolves when the guest runs
    again (RESUME, a RESET of a VM that kept running, or a status `running`)."""
    assert isinstance(event, GuestPanicked)
    action = event.action
    if action == "pause":
        runstate.set_status(watch, "guest-panicked", now)
    incidents.incident(watch, now, "panic")
    details: dict[str, Any] = {"action": action, "status": "guest-panicked"}
    if "info" in event.data:
        details["info"] = event.data["info"]
    kept = " and kept running" if action == "run" else ""
    watch.book.fire(
        now,
        "vm_panicked",
        "critical",
        f"VM {watch.vm}: the guest kernel panicked{kept} (QEMU's action: {action})",
        cause="GUEST_PANICKED",
        details=details,
        qemu_time=event.qemu_time,
    )


def on_guest_crashloaded(watch: VmWatch, event: Event, now: float) -> None:
    """The guest loaded its crash kernel after a panic: part of the panic's incident (one
    alert), or the first sign of it when QEMU reported no GUEST_PANICKED."""
    if any(alert.kind == "vm_panicked" for alert in watch.firing.values()):
        return
    details: dict[str, Any] = {
        "action": event_text(event.data, "action"),
        "cause_event": event.name,
    }
    if "info" in event.data:
        details["info"] = event.data["info"]
    watch.book.fire(
        now,
        "vm_panicked",
        "critical",
        f"VM {watch.vm}: the guest kernel crashed and loaded its crash kernel",
        cause="GUEST_CRASHLOADED",
        details=details,
        qemu_time=event.qemu_time,
    )


def on_image_corrupted(watch: VmWatch, event: Event, now: float) -> None:
    """A fatal BLOCK_IMAGE_CORRUPTED: QEMU marked the image corrupt and unusable."""
    data = event.data
    if data.get("fatal") is not True:
        return
    disk = event_text(data, "device") or event_text(data, "node-name") or "a disk"
    message = event_text(data, "msg")
    watch.book.fire(
        now,
        "vm_image_corrupted",
        "critical",
        f"VM {watch.vm}: the image of {disk} is corrupt and QEMU marked it unusable"
        + (f" ({message})" if message else ""),
        cause=_one_shot_cause(event, disk),
        details={k: data[k] for k in ("device", "node-name", "msg", "offset", "size") if k in data},
        qemu_time=event.qemu_time,
    )


def on_memory_failure(watch: VmWatch, event: Event, now: float) -> None:
    """MEMORY_FAILURE: a hardware memory error that QEMU had to act on, or that needs action."""
    data = event.data
    action = event_text(data, "action", "unknown")
    recipient = event_text(data, "recipient", "unknown")
    flags = data.get("flags")
    required = isinstance(flags, Mapping) and flags.get("action-required") is True
    severity: Severity
    if action in ("fatal", "reset"):
        severity = "critical"
    elif required:
        severity = "warning"
    else:
        return  # ignored by QEMU, nothing required: logged only
    watch.book.fire(
        now,
        "vm_memory_failure",
        severity,
        f"VM {watch.vm}: a hardware memory error hit the {recipient}; QEMU's action: {action}",
        cause=_one_shot_cause(event, action),
        details={"recipient": recipient, "action": action, "action_required": required},
        qemu_time=event.qemu_time,
    )


def on_block_job_error(watch: VmWatch, event: Event, now: float) -> None:
    """BLOCK_JOB_ERROR: a block job (mirror, backup, stream, commit) hit an I/O error."""
    data = event.data
    device = event_text(data, "device", "a block job")
    operation = event_text(data, "operation", "I/O")
    action = event_text(data, "action", "unknown")
    watch.book.fire(
        now,
        "block_job_error",
        "warning",
        f"VM {watch.vm}: block job {device} got a {operation} error (QEMU's action: {action})",
        cause=_one_shot_cause(event, device),
        details={"device": device, "operation": operation, "action": action},
        qemu_time=event.qemu_time,
    )


def on_migration(watch: VmWatch, event: Event, now: float) -> None:
    """MIGRATION with status `failed`: the VM stays where it was (and may be paused)."""
    if event.data.get("status") != "failed":
        return
    watch.book.fire(
        now,
        "migration_failed",
        "warning",
        f"VM {watch.vm}: a migration failed",
        cause=_one_shot_cause(event, "failed"),
        details={"status": "failed"},
        qemu_time=event.qemu_time,
    )
