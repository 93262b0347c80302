"""The guest agent's port of one VM: open or closed since when, and the agent's absence.

A VM's guest agent talks through a virtio-serial port named ``org.qemu.guest_agent.0``;
QEMU sends VSERPORT_CHANGE ``{id, open}`` when the guest opens or closes a port, naming it by
its device id only. The session tells `AgentPort` which device ids are agent ports and
whether each was open when it connected (`learned`); events then move the state
(`on_vserport_change`). With ``[lifecycle] agent_absent_after_s`` (0: off), a VM whose agent
port stays closed that long while the VM runs (a boot counts from the VM running) raises
`vm_agent_absent` (a warning), resolved when the port opens. Pure: `VmWatch` owns one and
calls these (docs/real-guests.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpwatch.core.alert import Alert

if TYPE_CHECKING:
    from qmpwatch.core.events import Event
    from qmpwatch.core.watch import VmWatch

AGENT_PORT_NAME = "org.qemu.guest_agent.0"
ABSENT_KIND = "vm_agent_absent"


@dataclass(slots=True)
class AgentPort:
    """What qmpwatch knows of one VM's guest agent port."""

    absent_after_s: float = 0.0  #: 0: no absence alert
    ids: frozenset[str] = frozenset()  #: device ids of the VM's agent ports
    open: bool | None = None  #: None: no agent port known (or its state unknown)
    since: float | None = None  #: when `open` last changed (or was learned)
    due: float | None = None  #: when a closed port counts as the agent's absence

    def fields(self) -> dict[str, Any] | None:
        """For `status`: ``{"open", "since"}`` (epoch seconds), or None with no agent port."""
        if self.open is None:
            return None
        return {"open": self.open, "since": self.since}


def learned(watch: VmWatch, ports: Mapping[str, bool | None], now: float) -> None:
    """A session found the VM's agent ports (device id -> open, None: unknown) on connect."""
    agent = watch.agent
    agent.ids = frozenset(ports)
    states = [state for state in ports.values() if state is not None]
    if not states:
        _clear(agent)
        return
    _set(watch, any(states), now, "resync", next(iter(ports)))


def on_vserport_change(watch: VmWatch, event: Event, now: float) -> None:
    """VSERPORT_CHANGE of an agent port: the guest opened or closed it."""
    device = event.data.get("id")
    opened = event.data.get("open")
    agent = watch.agent
    if not isinstance(opened, bool) or not isinstance(device, str):
        return
    if device not in agent.ids:
        return  # another virtio-serial port (a console, a channel of another tool)
    _set(watch, opened, now, "event", device)


def tick(watch: VmWatch, now: float) -> None:
    """The absence deadline passed: warn if the VM runs (else look again a period later)."""
    agent = watch.agent
    if agent.due is None or agent.due > now:
        return
    agent.due = None
    if agent.open is not False or agent.absent_after_s <= 0:
        return
    if watch.status != "running":
        agent.due = now + agent.absent_after_s  # a stopped guest cannot run its agent
        return
    running_since = watch.status_since if watch.status_since is not None else now
    if running_since + agent.absent_after_s > now:
        agent.due = running_since + agent.absent_after_s  # closed, but not yet running as long
        return
    closed_s = now - max(agent.since if agent.since is not None else now, running_since)
    watch._raise(
        now,
        ABSENT_KIND,
        "warning",
        f"VM {watch.vm}: its guest agent's port has been closed for {closed_s:.0f} s "
        f"(warns after {agent.absent_after_s:g} s): the guest agent is not running",
        cause="agent",
        details={"closed_s": round(closed_s, 3), "absent_after_s": agent.absent_after_s},
    )


def ended(watch: VmWatch, now: float, cause: str) -> None:
    """The session ended: the port's state is unknown until the next one learns it. Unless
    qmpwatch itself closed the session (stopping, reloading), QEMU ended or went away, and
    its agent's absence with it (vm_crashed says the rest)."""
    _clear(watch.agent)
    if cause != "closed":
        watch._resolve(now, _is_absence, "the VM's session ended")


def _set(watch: VmWatch, opened: bool, now: float, origin: str, device: str) -> None:
    agent = watch.agent
    if opened == agent.open:
        return
    agent.open = opened
    agent.since = now
    watch.out.record(
        "vm_agent_port", "info", now, {"open": opened, "device": device, "origin": origin}
    )
    if opened:
        agent.due = None
        watch._resolve(now, _is_absence, "the guest agent opened its port")
    elif agent.absent_after_s > 0:
        agent.due = now + agent.absent_after_s


def _clear(agent: AgentPort) -> None:
    agent.open = None
    agent.since = None
    agent.due = None


def _is_absence(alert: Alert) -> bool:
    return alert.kind == ABSENT_KIND
