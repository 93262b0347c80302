"""Crash cause and protection for [[libvirt]] domains on a real libvirtd: a killed domain's
vm_crashed names libvirt's reason; protections come from the domain XML, with no QMP sent
through libvirt (no taint)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from qmpwatch.lab.libvirt import DomainSpec, LabDomain, LibvirtLab
from tests.sources.test_libvirt import ON_LIBVIRT, token, watching

pytestmark = pytest.mark.libvirt


async def test_a_killed_domain_names_libvirts_reason_and_xml_protections(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """A guarded domain (pvpanic, watchdog pause) has no gaps, a bare one misses both; kill -9
    of the bare one's QEMU: vm_crashed says libvirt reports it failed; nothing is tainted."""
    run = token()
    guarded = await LabDomain(
        libvirt_lab, DomainSpec(f"{run}guarded", watchdog_action="pause", panic=True)
    ).create()
    bare = await LabDomain(libvirt_lab, DomainSpec(f"{run}bare")).create()
    async with watching(tmp_path, [f"{run}*"]) as daemon:
        good = await daemon.wait_for("vm_protection", vm=guarded.name)
        weak = await daemon.wait_for("vm_protection", vm=bare.name)
        os.kill(bare.pid(), signal.SIGKILL)
        crash = await daemon.wait_for("alert", vm=bare.name, alert="vm_crashed")
    assert good["gaps"] == []
    assert good["panic_devices"] == ["panic-isa"]
    assert (good["watchdogs"], good["watchdog_action"], good["panic_action"]) == (
        ["ib700"],
        "pause",
        "pause",
    )
    assert weak["gaps"] == ["no_panic_device", "no_watchdog"]
    assert crash["details"]["crash_cause"] == "libvirt"
    assert crash["details"]["libvirt_reason"] == "failed"
    assert crash["summary"].endswith(
        "libvirt: QEMU failed (killed or died; libvirt does not say which)"
    )
    assert ON_LIBVIRT not in guarded.taints()
