"""core.protection: gaps from QEMU's devices, disks and command line, or libvirt's XML."""

from __future__ import annotations

from typing import Any

from qmpwatch.core.protection import Protection, describe, from_domain_xml, from_qemu

BLOCK: list[dict[str, Any]] = [
    {"device": "drive0", "qdev": "/machine/peripheral-anon/device[1]",
     "inserted": {"ro": False, "node-name": "#block1"}},
    {"device": "cd0", "inserted": {"ro": True}},
    {"device": "", "qdev": "/machine/peripheral/disk1",
     "inserted": {"ro": False, "node-name": "n1"}},
]  # fmt: skip
ARGS = [
    "qemu-system-x86_64", "-drive", "file=a.img,if=none,id=drive0,werror=stop,rerror=stop",
    "-device", "ide-hd,drive=drive0", "-blockdev", "driver=file,node-name=n1,filename=b.img",
    "-device", "virtio-blk-pci,drive=n1,id=disk1,werror=report",
    "-cpu", "host,hv-crash", "-action", "panic=pause,watchdog=none", "-no-reboot",
]  # fmt: skip
QOM = [[{"name": "wd", "type": "child<i6300esb>"}], [{"name": "x", "type": "child<ide-hd>"}]]


def test_gaps_from_devices_disks_and_command_line() -> None:
    """Hyper-V crash MSRs count as a panic device; a watchdog doing nothing and a -blockdev
    disk reporting write errors are gaps; a read-only disk is not looked at."""
    p = from_qemu(QOM, [], BLOCK, ARGS)
    assert p.panic_devices == ("hyperv-crash",)
    assert p.panic_action == "pause"
    assert p.watchdogs == ("i6300esb",)
    assert [(d.disk, d.rerror, d.werror) for d in p.disks] == [
        ("drive0", "stop", "stop"),
        ("disk1", "report", "report"),
    ]
    assert p.no_reboot is True
    assert p.gaps() == ["watchdog_action_none", "disk_errors_reported_to_guest:disk1"]


def test_nothing_known_and_ignore() -> None:
    """Defaults: no devices is two gaps and a default disk reports errors; `ignore` silences a
    gap by full name or by kind; an unprobed VM has no device gaps."""
    p = from_qemu([[]], None, BLOCK[:1], ["qemu", "-drive", "id=drive0,file=a"])
    assert p.gaps() == ["no_panic_device", "no_watchdog", "disk_errors_reported_to_guest:drive0"]
    assert p.gaps(["no_watchdog", "disk_errors_reported_to_guest"]) == ["no_panic_device"]
    assert p.view(["no_watchdog"])["ignored"] == ["no_watchdog"]
    assert Protection().gaps() == []
    what, means = describe("disk_errors_ignored:drive0")
    assert what == "disk errors are ignored (drive0)"
    assert "no alert fires" in means


def test_libvirt_domain_xml() -> None:
    """<panic>, <watchdog action>, and each disk's error_policy/rerror_policy."""
    xml = """<domain type='kvm'><on_crash>preserve</on_crash><devices>
      <disk type='file' device='disk'><driver name='qemu' error_policy='stop'/>
        <target dev='vda'/></disk>
      <disk type='file' device='disk'><driver name='qemu'/><target dev='vdb'/></disk>
      <disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>
      <watchdog model='i6300esb' action='none'/><panic model='isa'/></devices></domain>"""
    p = from_domain_xml(xml)
    assert p is not None
    assert p.panic_action == "pause"
    assert p.gaps() == ["watchdog_action_none", "disk_errors_reported_to_guest:vdb"]
    assert from_domain_xml("<nope/>") is None
