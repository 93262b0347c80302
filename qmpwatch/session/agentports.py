"""Which of a VM's virtio-serial ports are guest-agent ports, and whether each is open now.

VSERPORT_CHANGE names a port by its device id only; on every connect the session asks QEMU
(`qom-list` of /machine/peripheral, `qom-get` of each virtserialport's `name` and `chardev`,
`query-chardev` for `frontend-open`, which follows the guest's open and close) and hands the
answer to the core (`qmpwatch.core.agent.learned`). Queries only; every answer is checked.
"""

from __future__ import annotations

from typing import Any

from qmpwatch.core.agent import AGENT_PORT_NAME
from qmpwatch.session.link import Link

PERIPHERAL = "/machine/peripheral"
MAX_PORTS = 64  # virtserialports looked at per connect (a VM has a few)


async def agent_ports(link: Link) -> dict[str, bool | None]:
    """Device id -> open (None: not told) of the VM's ports named org.qemu.guest_agent.0.

    Raises what `Link.execute` raises (a monitor that refuses, a link that ends)."""
    listing = await link.execute("qom-list", {"path": PERIPHERAL})
    ids = [
        entry["name"]
        for entry in (listing if isinstance(listing, list) else [])
        if isinstance(entry, dict)
        and entry.get("type") == "child<virtserialport>"
        and isinstance(entry.get("name"), str)
    ][:MAX_PORTS]
    found: dict[str, bool | None] = {}
    chardevs: Any = None
    for device in ids:
        path = f"{PERIPHERAL}/{device}"
        if await link.execute("qom-get", {"path": path, "property": "name"}) != AGENT_PORT_NAME:
            continue
        label = await link.execute("qom-get", {"path": path, "property": "chardev"})
        if chardevs is None:
            chardevs = await link.execute("query-chardev", {})
        found[device] = _frontend_open(chardevs, label)
    return found


def _frontend_open(chardevs: Any, label: Any) -> bool | None:
    for chardev in chardevs if isinstance(chardevs, list) else []:
        if isinstance(chardev, dict) and chardev.get("label") == label:
            state = chardev.get("frontend-open")
            return state if isinstance(state, bool) else None
    return None
