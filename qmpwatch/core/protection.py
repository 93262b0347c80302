"""What would go unseen: a VM's protections and the gaps between them, decided from facts.

Pure. A session hands in what QEMU's monitor says (device types from `qom-list`, PCI IDs
from `query-pci`, disks from `query-block`) and what QEMU's command line (or libvirt's domain
XML) says; `Protection` holds the result and `gaps` names what is missing, as short stable
names (`GAPS`; a disk's gap carries the disk: `disk_errors_reported_to_guest:drive0`). Which
gaps matter is the operator's: `[protection] ignore`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# gap -> (what is missing, what it means for the operator)
GAPS: dict[str, tuple[str, str]] = {
    "no_panic_device": (
        "no panic device (pvpanic or Hyper-V crash MSRs)",
        "a guest kernel panic is not reported to QEMU: the guest hangs or reboots silently and "
        "no vm_panicked alert can fire",
    ),
    "no_watchdog": (
        "no watchdog device",
        "a guest that hangs without panicking goes unseen: no watchdog_fired alert can fire",
    ),
    "watchdog_action_none": (
        "the watchdog's action is none (or debug)",
        "the watchdog fires but QEMU leaves the hung guest as it is: one warning, no recovery",
    ),
    "disk_errors_reported_to_guest": (
        "disk errors are reported to the guest",
        "a failing disk does not pause the VM: the guest gets I/O errors (a file system "
        "remounted read-only, a database aborting) and no vm_stopped_io_error alert fires",
    ),
    "disk_errors_ignored": (
        "disk errors are ignored",
        "a failing disk's errors are dropped: the guest believes data was written that was "
        "not, and no alert fires",
    ),
}

PANIC_TYPES = frozenset({"pvpanic", "pvpanic-isa", "pvpanic-pci"})
WATCHDOG_TYPES = frozenset({"ib700", "i6300esb", "diag288", "wdt-diag288"})
# query-pci (vendor, device) -> the device type, for devices QOM does not list by type.
PCI_IDS = {(0x1B36, 0x0011): "pvpanic-pci", (0x8086, 0x25AB): "i6300esb"}
# QEMU's defaults when the command line says nothing.
DEFAULT_PANIC_ACTION = "shutdown"
DEFAULT_WATCHDOG_ACTION = "reset"
DEFAULT_RERROR = "report"
DEFAULT_WERROR = "enospc"
_DISK_TYPES = ("ide-hd", "scsi-hd", "virtio-blk", "nvme", "usb-storage", "scsi-disk", "ide-drive")


@dataclass(frozen=True, slots=True)
class DiskPolicy:
    """One writable disk's error policies ("" when unknown)."""

    disk: str
    rerror: str = ""
    werror: str = ""


@dataclass(frozen=True, slots=True)
class Protection:
    """What a VM has that makes a failure visible, as far as qmpwatch could tell."""

    panic_devices: tuple[str, ...] = ()
    panic_action: str = ""  # "" unknown
    watchdogs: tuple[str, ...] = ()
    watchdog_action: str = ""
    disks: tuple[DiskPolicy, ...] = ()
    no_shutdown: bool | None = None
    no_reboot: bool | None = None
    devices_known: bool = False  # the device list was read (QOM, or the domain XML)

    def all_gaps(self) -> list[str]:
        """Every gap, ignored or not, in a stable order."""
        found: list[str] = []
        if self.devices_known and not self.panic_devices:
            found.append("no_panic_device")
        if self.devices_known and not self.watchdogs:
            found.append("no_watchdog")
        if self.watchdogs and self.watchdog_action in ("none", "debug"):
            found.append("watchdog_action_none")
        for disk in self.disks:
            policies = {disk.rerror, disk.werror}
            if "ignore" in policies:
                found.append(f"disk_errors_ignored:{disk.disk}")
            elif policies & {"report", "enospc"}:
                found.append(f"disk_errors_reported_to_guest:{disk.disk}")
        return found

    def gaps(self, ignore: Iterable[str] = ()) -> list[str]:
        """The gaps the operator has not silenced (`ignore`: gap names, a disk's in full or
        its kind alone, silencing it for every disk)."""
        silenced = frozenset(ignore)
        return [g for g in self.all_gaps() if g not in silenced and base(g) not in silenced]

    def view(self, ignore: Iterable[str] = ()) -> dict[str, Any]:
        """The `protection` object of `status --json` and the `vm_protection` record."""
        ignore = tuple(ignore)
        gaps = self.gaps(ignore)
        return {
            "checked": True,
            "panic_devices": list(self.panic_devices),
            "panic_action": self.panic_action or None,
            "watchdogs": list(self.watchdogs),
            "watchdog_action": self.watchdog_action or None,
            "disks": [
                {"disk": d.disk, "rerror": d.rerror or None, "werror": d.werror or None}
                for d in self.disks
            ],
            "no_shutdown": self.no_shutdown,
            "no_reboot": self.no_reboot,
            "gaps": gaps,
            "ignored": [g for g in self.all_gaps() if g not in gaps],
        }


UNCHECKED: dict[str, Any] = {"checked": False, "gaps": []}


def base(gap: str) -> str:
    """`disk_errors_reported_to_guest:drive0` -> `disk_errors_reported_to_guest`."""
    return gap.partition(":")[0]


def describe(gap: str) -> tuple[str, str]:
    """A gap in words: (what is missing, what it means), the disk named where there is one."""
    what, means = GAPS.get(base(gap), (gap, "not a gap this qmpwatch knows"))
    disk = gap.partition(":")[2]
    return (f"{what} ({disk})" if disk else what), means


# -- the command line ------------------------------------------------------------------------


def _options(text: str) -> tuple[str, dict[str, str]]:
    """`ide-hd,drive=drive0,bus=ide.0` -> ("ide-hd", {...}); a leading key=value has no head."""
    parts = text.split(",")
    head = "" if "=" in parts[0] else parts[0]
    opts = {}
    for part in parts[1:] if head else parts:
        key, _, value = part.partition("=")
        opts[key] = value
    return head, opts


def _values(args: Sequence[str], option: str) -> list[str]:
    found = []
    for i, arg in enumerate(args):
        bare = arg[1:] if arg.startswith("--") else arg
        if bare == option and i + 1 < len(args):
            found.append(args[i + 1])
    return found


@dataclass(frozen=True, slots=True)
class CommandLine:
    """What a QEMU command line says about protection."""

    panic_action: str
    watchdog_action: str
    hv_crash: bool
    no_shutdown: bool
    no_reboot: bool
    policies: Mapping[str, tuple[str, str]]  # drive id / node-name / device id -> (r, w)


def read_command_line(args: Sequence[str]) -> CommandLine:
    """Panic and watchdog actions, Hyper-V crash MSRs, -no-shutdown/-no-reboot and each
    drive's rerror/werror (a -device's own werror/rerror win over its -drive's)."""
    panic, watchdog = DEFAULT_PANIC_ACTION, DEFAULT_WATCHDOG_ACTION
    for value in _values(args, "-watchdog-action"):
        watchdog = value
    no_shutdown = any(a in ("-no-shutdown", "--no-shutdown") for a in args)
    no_reboot = any(a in ("-no-reboot", "--no-reboot") for a in args)
    for value in _values(args, "-action"):
        for key, _, act in (part.partition("=") for part in value.split(",")):
            if key == "panic":
                panic = act
            elif key == "watchdog":
                watchdog = act
            elif key == "shutdown":
                no_shutdown = act == "pause"
            elif key == "reboot":
                no_reboot = act == "shutdown"
    hv_crash = any(
        part in ("hv-crash", "hv-crash=on", "hv_crash", "+hv-crash")
        for value in _values(args, "-cpu")
        for part in value.split(",")
    )
    drives: dict[str, tuple[str, str]] = {}
    for value in _values(args, "-drive"):
        _, opts = _options(value)
        if "id" in opts:
            drives[opts["id"]] = (
                opts.get("rerror", DEFAULT_RERROR),
                opts.get("werror", DEFAULT_WERROR),
            )
    policies = dict(drives)
    for value in _values(args, "-device"):
        _, opts = _options(value)
        drive = opts.get("drive")
        if not drive:
            continue
        r, w = drives.get(drive, (DEFAULT_RERROR, DEFAULT_WERROR))
        r = opts.get("rerror", "auto") if opts.get("rerror", "auto") != "auto" else r
        w = opts.get("werror", "auto") if opts.get("werror", "auto") != "auto" else w
        policies[drive] = (r, w)
        if "id" in opts:
            policies[opts["id"]] = (r, w)
    return CommandLine(panic, watchdog, hv_crash, no_shutdown, no_reboot, policies)


def _qom_types(listing: Any) -> list[str]:
    """Device types of a `qom-list` answer (`child<TYPE>` entries)."""
    types = []
    for item in listing if isinstance(listing, list) else ():
        kind = item.get("type") if isinstance(item, Mapping) else None
        if isinstance(kind, str) and kind.startswith("child<") and kind.endswith(">"):
            types.append(kind[6:-1])
    return types


def _pci_types(pci: Any) -> list[str]:
    types = []
    for bus in pci if isinstance(pci, list) else ():
        for dev in bus.get("devices", ()) if isinstance(bus, Mapping) else ():
            ident = dev.get("id") if isinstance(dev, Mapping) else None
            if isinstance(ident, Mapping):
                kind = PCI_IDS.get((ident.get("vendor"), ident.get("device")))  # type: ignore[arg-type]
                if kind is not None:
                    types.append(kind)
    return types


def _writable_disks(block: Any) -> list[tuple[str, list[str]]]:
    """(name, keys to look its policy up by) of each writable disk with a medium."""
    found = []
    for dev in block if isinstance(block, list) else ():
        inserted = dev.get("inserted") if isinstance(dev, Mapping) else None
        if not isinstance(inserted, Mapping) or inserted.get("ro") is True:
            continue
        qdev = dev.get("qdev") if isinstance(dev.get("qdev"), str) else ""
        qdev_id = qdev.rsplit("/", 1)[-1] if qdev and "peripheral-anon" not in qdev else ""
        keys = [
            k
            for k in (dev.get("device"), qdev_id, inserted.get("node-name"))
            if isinstance(k, str) and k
        ]
        if keys:
            found.append((keys[0], keys))
    return found


def from_qemu(
    qom_types: Iterable[Any] | None,
    pci: Any,
    block: Any,
    args: Sequence[str] | None,
) -> Protection:
    """From QMP answers (`qom-list` of /machine/peripheral and -anon, `query-pci`,
    `query-block`; None when refused) and QEMU's argv (None when unreadable)."""
    types: list[str] = []
    known = qom_types is not None
    for listing in qom_types or ():
        types += _qom_types(listing)
    types += _pci_types(pci)
    line = read_command_line(args) if args is not None else None
    panic = sorted({t for t in types if t in PANIC_TYPES})
    if line is not None and line.hv_crash:
        panic.append("hyperv-crash")
    dogs = sorted({t for t in types if t in WATCHDOG_TYPES})
    disks = []
    for name, keys in _writable_disks(block):
        policy = ("", "")
        if line is not None:
            policy = next((line.policies[k] for k in keys if k in line.policies), policy)
        disks.append(DiskPolicy(name, *policy))
    return Protection(
        panic_devices=tuple(panic),
        panic_action=line.panic_action if line else "",
        watchdogs=tuple(dogs),
        watchdog_action=line.watchdog_action if line and dogs else "",
        disks=tuple(disks),
        no_shutdown=line.no_shutdown if line else None,
        no_reboot=line.no_reboot if line else None,
        devices_known=known,
    )


# -- libvirt's domain XML ------------------------------------------------------------------------

_ON_CRASH = {"destroy": "shutdown", "restart": "reset", "preserve": "pause"}


def from_domain_xml(text: str) -> Protection | None:
    """From a libvirt domain's XML (`<panic>`, Hyper-V `<crash>`, `<watchdog>`, each disk's
    `<driver error_policy rerror_policy>`); None when it is not a domain's XML."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    if root.tag != "domain":
        return None
    panic = [f"panic-{p.get('model', 'isa')}" for p in root.iterfind("devices/panic")]
    crash = root.find("features/hyperv/crash")
    if crash is not None and crash.get("state") == "on":
        panic.append("hyperv-crash")
    dogs = root.findall("devices/watchdog")
    disks = []
    for disk in root.iterfind("devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
            continue
        target = disk.find("target")
        name = target.get("dev", "") if target is not None else ""
        driver = disk.find("driver")
        werror = driver.get("error_policy", "") if driver is not None else ""
        rerror = driver.get("rerror_policy", "") if driver is not None else ""
        disks.append(
            DiskPolicy(name or "disk", rerror or werror or DEFAULT_RERROR, werror or DEFAULT_WERROR)
        )
    on_crash = root.findtext("on_crash", "destroy").strip()
    return Protection(
        panic_devices=tuple(panic),
        panic_action=_ON_CRASH.get(on_crash, on_crash),
        watchdogs=tuple(d.get("model", "") for d in dogs),
        watchdog_action=dogs[0].get("action", DEFAULT_WATCHDOG_ACTION) if dogs else "",
        disks=tuple(disks),
        no_shutdown=True,  # libvirt always runs QEMU with -no-shutdown
        no_reboot=root.findtext("on_reboot", "restart").strip() == "destroy",
        devices_known=True,
    )
