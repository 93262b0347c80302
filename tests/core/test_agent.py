"""The guest agent's port (core/agent.py): its state, records and the absence warning, with a
fake clock."""

from __future__ import annotations

from qmpwatch.core import agent
from qmpwatch.core.config import LifecycleConfig
from qmpwatch.core.watch import VmWatch
from tests.core.test_watch import T0, Collect, ev, feed, make_watch


def running_watch(
    absent_after_s: float = 60.0, open_: bool | None = False
) -> tuple[VmWatch, Collect]:
    """A running VM whose agent port `agent0` was learned on connect."""
    watch, out = make_watch(lifecycle=LifecycleConfig(agent_absent_after_s=absent_after_s))
    watch.on_connected(T0, "running", {})
    agent.learned(watch, {"agent0": open_}, T0)
    return watch, out


def test_port_changes_are_recorded_and_other_ports_ignored() -> None:
    """VSERPORT_CHANGE of the agent's device id is a vm_agent_port record and moves the state;
    another port's change (a console) is logged as an event only."""
    watch, out = running_watch(absent_after_s=0)
    feed(watch, ev("VSERPORT_CHANGE", T0 + 1, id="console0", open=True))
    feed(watch, ev("VSERPORT_CHANGE", T0 + 1, id=["agent0"], open=True))  # hostile: ignored
    feed(watch, ev("VSERPORT_CHANGE", T0 + 1, id="agent0", open="yes"))
    feed(watch, ev("VSERPORT_CHANGE", T0 + 2, id="agent0", open=True))
    records = [(r.fields["open"], r.fields["origin"]) for r in out.of("vm_agent_port")]
    assert records == [(False, "resync"), (True, "event")]
    assert watch.agent.fields() == {"open": True, "since": T0 + 2}
    assert watch.next_deadline() is None  # no absence timer when it is off


def test_a_port_closed_too_long_while_running_warns_and_opening_resolves() -> None:
    """Closed for agent_absent_after_s while running: one vm_agent_absent warning (no page);
    the port opening resolves it."""
    watch, out = running_watch(absent_after_s=60.0)
    assert watch.next_deadline() == T0 + 60
    watch.tick(T0 + 59)
    assert out.alert_kinds() == []
    watch.tick(T0 + 60)
    absent = out.one_alert("vm_agent_absent")
    assert absent.level == "warning"
    assert absent.fields["details"]["closed_s"] == 60
    feed(watch, ev("VSERPORT_CHANGE", T0 + 70, id="agent0", open=True))
    (resolved,) = out.of("alert_resolved")
    assert resolved.fields["reason"] == "the guest agent opened its port"
    assert watch.firing == {}


def test_a_stopped_vm_is_not_warned_of_until_it_has_run_that_long() -> None:
    """A paused VM cannot run its agent: the absence counts from when the VM runs again."""
    watch, out = running_watch(absent_after_s=60.0)
    feed(watch, ev("STOP", T0 + 10))
    watch.on_status("paused", T0 + 10)
    watch.tick(T0 + 60)
    feed(watch, ev("RESUME", T0 + 100))
    watch.tick(watch.next_deadline() or 0)
    assert out.alert_kinds() == ["vm_stopped_unexpected"]
    watch.tick(T0 + 160)
    assert out.alert_kinds() == ["vm_stopped_unexpected", "vm_agent_absent"]


def test_the_end_of_qemu_resolves_the_absence_but_qmpwatch_closing_does_not() -> None:
    """QEMU going away ends the agent's absence (state unknown); qmpwatch closing the session
    (a stop, a reload) keeps it firing for the next session."""
    watch, out = running_watch(absent_after_s=5.0)
    watch.tick(T0 + 5)
    watch.on_disconnected(T0 + 6, "closed")
    assert [a.kind for a in watch.firing.values()] == ["vm_agent_absent"]
    assert watch.agent.fields() is None
    watch.on_connected(T0 + 7, "running", {})
    agent.learned(watch, {"agent0": False}, T0 + 7)
    watch.on_disconnected(T0 + 8, "eof")
    assert "vm_agent_absent" not in [a.kind for a in watch.firing.values()]
    assert out.of("alert_resolved")[0].fields["reason"] == "the VM's session ended"


def test_a_vm_without_agent_port_has_none() -> None:
    """No agent port found: nothing recorded, no state, no timer."""
    watch, out = make_watch(lifecycle=LifecycleConfig(agent_absent_after_s=5.0))
    watch.on_connected(T0, "running", {})
    agent.learned(watch, {}, T0)
    assert out.of("vm_agent_port") == []
    assert watch.agent.fields() is None
    assert watch.next_deadline() is None
