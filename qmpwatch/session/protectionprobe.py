"""Find out a VM's protections: query commands over its link, and QEMU's command line.

Only queries (`qom-list`, `query-pci`; `query-block` the session already asked): nothing here
acts on the VM. A libvirt domain is asked nothing through QMP (that would taint it): its
domain XML says the same (`DomainDescriber`). `core.protection` decides the gaps.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qmpwatch.core import protection
from qmpwatch.core.protection import Protection
from qmpwatch.session.link import CommandFailed, DomainDescriber, Link, LinkClosed

PERIPHERALS = ("/machine/peripheral", "/machine/peripheral-anon")


def read_argv(pid: int) -> list[str] | None:
    """QEMU's argv from /proc/PID/cmdline; None when unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode("utf-8", "replace") for arg in raw.split(b"\0") if arg]


async def _query(link: Link, command: str, arguments: dict[str, Any]) -> Any:
    """A query's answer; None when the monitor refuses it."""
    try:
        return await link.execute(command, arguments)
    except CommandFailed:
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
    pid = link.info.pid
    argv = await asyncio.to_thread(read_argv, pid) if pid is not None else None
    known = [listing for listing in listings if listing is not None]
    return protection.from_qemu(known if known else None, pci, block, argv)
