"""Find out a VM's protections: query commands over its link, and QEMU's command line.

Only queries (`qom-list`, `query-pci`; `query-block` the session already asked): nothing here
acts on the VM. QEMU's command line is the one its source read at connect (`LinkInfo.argv`).
A libvirt domain is asked nothing through QMP (that would taint it): its domain XML says the
same (`DomainDescriber`). `core.protection` decides the gaps.
"""

from __future__ import annotations

from typing import Any

from qmpwatch.core import protection
from qmpwatch.core.protection import Protection
from qmpwatch.session.link import CommandFailed, DomainDescriber, Link, LinkClosed

PERIPHERALS = ("/machine/peripheral", "/machine/peripheral-anon")


async def _query(link: Link, command: str, arguments: dict[str, Any]) -> Any:
    """A query's answer; None when the monitor refuses it or does not answer in time."""
    try:
        return await link.execute(command, arguments)
    except (CommandFailed, TimeoutError):
        return None


async def probe(link: Link, block: Any) -> Protection | None:
    """The VM's protections (None: the link ended first). `block`: its `query-block`."""
    try:
        if isinstance(link, DomainDescriber):
            return protection.from_domain_xml(await link.domain_xml())
        listings = [await _query(link, "qom-list", {"path": path}) for path in PERIPHERALS]
        pci = await _query(link, "query-pci", {})
    except LinkClosed:
        return None
    known = [listing for listing in listings if listing is not None]
    return protection.from_qemu(known if known else None, pci, block, link.info.argv)
