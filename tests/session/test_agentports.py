"""Finding the guest agent's ports on connect: odd answers from a monitor change nothing.

Real QEMU's answers are covered by tests/service/test_real_guest.py; here a monitor that
answers what QEMU never would (a QMP proxy, another local user's socket)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmpwatch.session.agentports import agent_ports


class Answers:
    """A link whose `execute` answers from a table (command, path, property) -> value."""

    def __init__(self, table: Mapping[tuple[str, ...], Any]) -> None:
        self.table = table
        self.sent: list[str] = []

    async def execute(self, command: str, arguments: Mapping[str, Any]) -> Any:
        self.sent.append(command)
        key = (command, *(str(v) for v in arguments.values()))
        return self.table.get(key)


async def test_agent_port_found_with_its_state() -> None:
    """A virtserialport named org.qemu.guest_agent.0: its id and its chardev's frontend-open."""
    link = Answers(
        {
            ("qom-list", "/machine/peripheral"): [
                {"name": "console0", "type": "child<virtserialport>"},
                {"name": "channel0", "type": "child<virtserialport>"},
                {"name": "disk0", "type": "child<virtio-blk-pci>"},
            ],
            ("qom-get", "/machine/peripheral/console0", "name"): "org.qemu.console.0",
            ("qom-get", "/machine/peripheral/channel0", "name"): "org.qemu.guest_agent.0",
            ("qom-get", "/machine/peripheral/channel0", "chardev"): "charchannel0",
            ("query-chardev",): [{"label": "charchannel0", "frontend-open": True}],
        }
    )
    assert await agent_ports(link) == {"channel0": True}  # type: ignore[arg-type]


async def test_odd_answers_give_no_port_or_an_unknown_state() -> None:
    """Answers of the wrong type name no port, and a state that is not a boolean is unknown."""
    for listing in (None, "x", [1, None, {"name": 5, "type": "child<virtserialport>"}]):
        link = Answers({("qom-list", "/machine/peripheral"): listing})
        assert await agent_ports(link) == {}  # type: ignore[arg-type]
    link = Answers(
        {
            ("qom-list", "/machine/peripheral"): [{"name": "a", "type": "child<virtserialport>"}],
            ("qom-get", "/machine/peripheral/a", "name"): "org.qemu.guest_agent.0",
            ("qom-get", "/machine/peripheral/a", "chardev"): "c",
            ("query-chardev",): [{"label": "c", "frontend-open": "yes"}],
        }
    )
    assert await agent_ports(link) == {"a": None}  # type: ignore[arg-type]
