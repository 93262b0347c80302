"""The guest's side: the I/O port writes and reads a guest would make to drive its devices.

Each recipe pokes ports through the human monitor's ``o``/``i`` (an `Hmp` callable, the
control monitor's) and makes QEMU emit what a real guest would cause: keyboard-controller
reset, ACPI power-off, the ib700 watchdog, an ATA read, a CMOS clock write.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Literal

from qmpwatch.lab.errors import LabClosed, LabError
from qmpwatch.lab.spec import LabSpec

PortWidth = Literal["b", "h", "w"]
#: Runs a human-monitor command line and returns its text output (`LabVM.hmp`).
Hmp = Callable[[str], Awaitable[str]]

_PORT_WIDTH_BITS: Final[Mapping[str, int]] = {"b": 8, "h": 16, "w": 32}
_HMP_PORT_VALUE: Final = re.compile(r"=\s*0x([0-9a-fA-F]+)")

# Guest-side constants (PC machine; the same on QEMU 7.2 and 10.0).
_KBD_CMD_PORT: Final = 0x64
_KBD_CMD_RESET: Final = 0xFE
_PCI_CONFIG_ADDRESS: Final = 0xCF8
_PCI_CONFIG_DATA: Final = 0xCFC
_PIIX4_PM_DEVFN: Final = (1, 3)  # PCI 00:01.3
_PIIX4_PMBA: Final = 0x40  # power-management I/O base register
_PIIX4_PMREGMISC: Final = 0x80  # bit 0 enables the PM I/O space
_PM_IO_BASE: Final = 0x600
_PM1_CNT: Final = _PM_IO_BASE + 4
_PM1_CNT_SOFT_OFF: Final = 0x2000  # SLP_EN with SLP_TYP 0
_IB700_TIMEOUT_PORT: Final = 0x443
_ATA_PORT: Final = 0x1F0
_ATA_CMD_READ_SECTORS: Final = 0x20
_CMOS_INDEX: Final = 0x70
_CMOS_DATA: Final = 0x71
_CMOS_YEAR: Final = 0x09
_CMOS_REG_B: Final = 0x0B
_CMOS_REG_B_BINARY: Final = 0x04


async def port_out(hmp: Hmp, port: int, value: int, width: PortWidth = "b") -> None:
    """``o /WIDTH PORT VALUE``, whose answer is empty unless it failed."""
    bits = _PORT_WIDTH_BITS.get(width)
    if bits is None:
        raise ValueError(f"width must be 'b', 'h' or 'w', not {width!r}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"I/O port out of range: {port:#x}")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"value {value:#x} does not fit in {bits} bits")
    out = await hmp(f"o /{width} {port:#x} {value:#x}")
    if out.strip():
        raise LabError(f"o /{width} {port:#x} {value:#x}: {out.strip()}")


async def port_in(hmp: Hmp, port: int, width: PortWidth = "b") -> int:
    """``i /WIDTH PORT``, whose answer ends in ``= 0xVALUE``."""
    if width not in _PORT_WIDTH_BITS:
        raise ValueError(f"width must be 'b', 'h' or 'w', not {width!r}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"I/O port out of range: {port:#x}")
    out = await hmp(f"i /{width} {port:#x}")
    match = _HMP_PORT_VALUE.search(out)
    if match is None:
        raise LabError(f"i /{width} {port:#x}: unexpected answer {out.strip()!r}")
    return int(match.group(1), 16)


async def guest_reset(hmp: Hmp) -> None:
    """The keyboard controller's reset command (0xFE to port 0x64)."""
    await port_out(hmp, _KBD_CMD_PORT, _KBD_CMD_RESET)


async def guest_poweroff(hmp: Hmp, spec: LabSpec) -> None:
    """PIIX4 power management (PCI 00:01.3): its I/O block at 0x600, then SLP_EN in PM1_CNT."""
    dev, fn = _PIIX4_PM_DEVFN
    await port_out(hmp, _PCI_CONFIG_ADDRESS, _pci_config_address(0, dev, fn, _PIIX4_PMBA), "w")
    await port_out(hmp, _PCI_CONFIG_DATA, _PM_IO_BASE | 1, "w")
    await port_out(hmp, _PCI_CONFIG_ADDRESS, _pci_config_address(0, dev, fn, _PIIX4_PMREGMISC), "w")
    await port_out(hmp, _PCI_CONFIG_DATA, 0x01, "b")
    try:
        await port_out(hmp, _PM1_CNT, _PM1_CNT_SOFT_OFF, "h")
    except LabClosed:
        if spec.no_shutdown:
            raise
        # Without -no-shutdown QEMU may exit before answering; that is the point.


async def arm_watchdog(hmp: Hmp, spec: LabSpec, seconds: int) -> None:
    """The ib700 takes a 4-bit index into 30, 28, ..., 2, 0 s at port 0x443 (2 s: index 14)."""
    if seconds % 2 or not 0 <= seconds <= 30:
        raise ValueError(f"the ib700 supports even timeouts of 0..30 s, not {seconds}")
    if spec.watchdog_action is None:
        raise LabError(f"{spec.name}: no watchdog (LabSpec.watchdog_action is None)")
    await port_out(hmp, _IB700_TIMEOUT_PORT, (30 - seconds) // 2)


async def ata_read_sector(hmp: Hmp, lba: int) -> None:
    """The task file (drive 0, LBA mode, one sector at ``lba``), then READ SECTORS."""
    if not 0 <= lba < 1 << 28:
        raise ValueError(f"LBA28 out of range: {lba}")
    base = _ATA_PORT
    await port_out(hmp, base + 6, 0xE0 | (lba >> 24) & 0x0F)  # drive 0, LBA mode
    await port_out(hmp, base + 2, 1)  # sector count
    await port_out(hmp, base + 3, lba & 0xFF)
    await port_out(hmp, base + 4, (lba >> 8) & 0xFF)
    await port_out(hmp, base + 5, (lba >> 16) & 0xFF)
    await port_out(hmp, base + 7, _ATA_CMD_READ_SECTORS)


async def ata_status(hmp: Hmp) -> int:
    """The primary IDE status register, port 0x1F7."""
    return await port_in(hmp, _ATA_PORT + 7)


async def rtc_change(hmp: Hmp, year: int | None) -> None:
    """CMOS register 9 through ports 0x70/0x71, in the format register B says (BCD or binary)."""
    await port_out(hmp, _CMOS_INDEX, _CMOS_REG_B)
    binary = bool(await port_in(hmp, _CMOS_DATA) & _CMOS_REG_B_BINARY)
    if year is None:
        await port_out(hmp, _CMOS_INDEX, _CMOS_YEAR)
        raw = await port_in(hmp, _CMOS_DATA)
        year = ((raw if binary else _from_bcd(raw)) + 1) % 100
    if not 0 <= year <= 99:
        raise ValueError(f"year must have two digits, not {year}")
    await port_out(hmp, _CMOS_INDEX, _CMOS_YEAR)
    await port_out(hmp, _CMOS_DATA, year if binary else _to_bcd(year))


def _pci_config_address(bus: int, device: int, function: int, register: int) -> int:
    return 0x8000_0000 | bus << 16 | device << 11 | function << 8 | (register & 0xFC)


def _to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)
