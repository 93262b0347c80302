"""Presence in the pure core, with a fake clock: when a VM not connected is vm_unreachable,
when it is not (a clean end, a crash already alerted), and why, in words."""

from __future__ import annotations

from qmpwatch.core.config import LifecycleConfig
from tests.core.test_watch import T0, make_watch

LIFECYCLE = LifecycleConfig(unreachable_after_s=60.0)
FIELDS = {"socket": "/run/qemu/web01.qmp", "pid": 4242}


def test_a_vm_never_reached_is_unreachable_after_the_threshold_and_resolves_on_connect() -> None:
    """Not connected since the start: nothing before 60 s, then one warning with the last
    failure; connecting resolves it."""
    watch, out = make_watch(lifecycle=LIFECYCLE)
    watch.presence.start(T0, None)
    watch.on_connect_failed(T0 + 1, "refused", "/run/qemu/web01.qmp: connection refused")
    watch.tick(T0 + 59)
    assert out.alert_kinds() == []
    assert watch.next_deadline() == T0 + 60
    watch.tick(T0 + 60)
    (alert,) = out.raised
    assert (alert.kind, alert.severity) == ("vm_unreachable", "warning")
    assert alert.details["reason"] == "refused"
    assert "connection refused" in alert.summary
    watch.tick(T0 + 600)
    assert len(out.raised) == 1
    watch.on_connected(T0 + 700, "running", FIELDS)
    assert [a.kind for a in out.resolved] == ["vm_unreachable"]


def test_a_crash_pages_once_and_a_clean_end_never_becomes_unreachable() -> None:
    """After vm_crashed nothing more is raised for the same absence; after a clean end
    (SHUTDOWN, EOF) no vm_unreachable at all; a link lost otherwise is told in words."""
    crashed, out = make_watch(lifecycle=LIFECYCLE)
    crashed.on_connected(T0, "running", FIELDS)
    crashed.on_disconnected(T0 + 30, "eof")
    crashed.tick(T0 + 200)
    assert out.alert_kinds() == ["vm_crashed"]
    details = out.raised[0].details
    assert (details["pid"], details["socket"], details["last_status"]) == (
        4242,
        "/run/qemu/web01.qmp",
        "running",
    )
    assert details["ran_s"] == 30.0

    ended, out = make_watch(lifecycle=LIFECYCLE)
    ended.on_connected(T0, "running", FIELDS)
    ended.saw_shutdown, ended.shutdown_reason = True, "guest-shutdown"
    ended.on_disconnected(T0 + 1, "eof")
    assert ended.next_deadline() is None
    assert ended.presence.why() == "QEMU is gone: it shut down (guest-shutdown)"

    lost, out = make_watch(lifecycle=LIFECYCLE)
    lost.on_connected(T0, "running", FIELDS)
    lost.on_disconnected(T0 + 1, "closed", "libvirtd went away")
    lost.tick(T0 + 61)
    (alert,) = out.raised
    assert alert.summary.endswith("not connected since its link ended (closed: libvirtd went away)")
