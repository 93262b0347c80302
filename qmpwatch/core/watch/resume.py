"""Remedy: resuming a VM paused on a disk error (opt-in), as the `Resumer` plans it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmpwatch.core.alert import STOPPED_KINDS

if TYPE_CHECKING:
    from qmpwatch.core.watch.vmwatch import VmWatch


def on_command_result(watch: VmWatch, name: str, error: str, now: float) -> None:
    """QEMU answered a command of `command()`: `error` is "" when it was done."""
    resumer = watch.resumer
    if name != "cont" or not resumer.sent:
        return
    resumer.sent = False
    if error:
        resume_failed(watch, now, "refused", error)
    elif resumer.settle_until is None and resumer.next_at is not None and watch.run.stopped:
        resume_failed(watch, now, "not_running", "QEMU accepted cont, and the VM is stopped")


def remedy(watch: VmWatch, now: float) -> None:
    """The resume plan is due: the VM ran long enough, or give up, or try `cont`."""
    resumer = watch.resumer
    attempts = resumer.attempts
    if resumer.settle_until is not None:
        fields = {"attempt": attempts, "outcome": "resumed", "trigger": resumer.trigger}
        resumer.stop()
        watch.out.record("vm_resume_attempted", "info", now, fields)
        watch.book.resolve(
            now,
            lambda a: a.kind in STOPPED_KINDS,
            f"resumed by qmpwatch after {attempts} attempt{'s' if attempts != 1 else ''}",
        )
        return
    assert resumer.paused_at is not None
    if resumer.give_up_due(now):
        since = now - resumer.paused_at
        resumer.stop()
        watch.out.record(
            "vm_resume_given_up", "warning", now, {"attempts": attempts, "paused_s": since}
        )
        watch.book.fire(
            now,
            "vm_resume_given_up",
            "warning",
            f"VM {watch.vm} stays paused on its disk error: qmpwatch gave up resuming it "
            f"after {attempts} attempt(s) in {since:.0f} s",
            cause=f"resume:{now:.6f}",
            details={"attempts": attempts, "paused_s": round(since, 3)},
        )
        return
    resumer.attempts += 1
    resumer.sent = True
    watch.out.command("cont", {})


def resume_failed(watch: VmWatch, now: float, outcome: str, error: str) -> None:
    resumer = watch.resumer
    fields: dict[str, Any] = {
        "attempt": resumer.attempts,
        "outcome": outcome,
        "trigger": resumer.trigger,
    }
    if error:
        fields["error"] = error
    resumer.failed(now)
    assert resumer.next_at is not None
    fields["retry_in_s"] = round(resumer.next_at - now, 3)
    watch.out.record("vm_resume_attempted", "warning", now, fields)
