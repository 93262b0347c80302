"""What a lab VM is made of: `LabSpec` (a name, QEMU options, devices), checked on creation.

`BlkdebugSpec` adds an IDE disk that fails one kind of request at one sector.
"""

from __future__ import annotations

import errno as errno_mod
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

ReadErrorPolicy = Literal["stop", "report", "ignore"]
ErrorPolicy = Literal["stop", "report", "ignore", "enospc"]  # enospc: werror only
WatchdogAction = Literal["reset", "shutdown", "poweroff", "pause", "debug", "none", "inject-nmi"]
Accel = Literal["auto", "kvm", "tcg"]
PanicAction = Literal["pause", "shutdown", "exit-failure", "none"]

_READ_ERROR_POLICIES: Final = frozenset({"stop", "report", "ignore"})
_WRITE_ERROR_POLICIES: Final = _READ_ERROR_POLICIES | {"enospc"}
_WATCHDOG_ACTIONS: Final = frozenset(
    {"reset", "shutdown", "poweroff", "pause", "debug", "none", "inject-nmi"}
)


@dataclass(frozen=True, slots=True)
class BlkdebugSpec:
    """An IDE disk behind blkdebug that fails one kind of request at one sector.

    The drive is ``-drive ...,id=drive0,rerror=R,werror=W`` on ``ide.0`` (so QEMU's
    BLOCK_IO_ERROR says ``device: "drive0"``). ``once`` makes the rule fire a single time,
    so the retry after ``cont`` succeeds; it is restricted to ``sector`` because QEMU reads
    sector 0 itself at start-up.
    """

    errno: int = errno_mod.EIO
    sector: int = 8
    once: bool = True
    rerror: ReadErrorPolicy = "stop"
    werror: ErrorPolicy = "stop"
    event: str = "read_aio"
    image_size: int = 1 << 20

    def __post_init__(self) -> None:
        for key, policy, allowed in (
            ("rerror", self.rerror, _READ_ERROR_POLICIES),
            ("werror", self.werror, _WRITE_ERROR_POLICIES),
        ):
            if policy not in allowed:
                raise ValueError(f"{key} must be one of {sorted(allowed)}, not {policy!r}")
        if self.errno <= 0:
            raise ValueError(f"errno must be positive, not {self.errno}")
        if self.image_size < 512 or self.image_size % 512:
            raise ValueError(
                f"image_size must be a positive multiple of 512, not {self.image_size}"
            )
        if not 0 <= self.sector < self.image_size // 512:
            raise ValueError(f"sector {self.sector} is outside the {self.image_size}-byte image")
        if not re.fullmatch(r"[a-z_]+", self.event):
            raise ValueError(f"not a blkdebug event name: {self.event!r}")

    def config_text(self) -> str:
        """The blkdebug configuration file."""
        lines = [
            "[inject-error]",
            f'event = "{self.event}"',
            f'errno = "{self.errno}"',
            f'sector = "{self.sector}"',
        ]
        if self.once:
            lines.append('once = "on"')
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class GuestSpec:
    """A real Linux guest (`qmpwatch.lab.guestkit`) instead of the halt firmware.

    The guest runs ``action`` (its /init's ``qw.do``; ``options`` are more ``qw.KEY=VALUE``
    words) and prints ``QW: ...`` lines on its serial console (`LabVM.wait_console`). QEMU
    starts paused (``-S``): `LabVM.cont` boots it, once whoever watches is attached.
    ``panic_action`` adds ``-device pvpanic -action panic=ACTION``; ``reboot_after_panic_s``
    the kernel's ``panic=N``; ``disk`` a virtio disk (``-drive ...,id=disk0,werror=W``) on
    that image; ``agent_port`` a virtio-serial port named org.qemu.guest_agent.0 (device id
    ``agent0``). The watchdog is an i6300esb when `LabSpec.watchdog_action` is set.
    """

    action: str = "idle"
    options: tuple[tuple[str, str], ...] = ()
    panic_action: PanicAction | None = None
    reboot_after_panic_s: int | None = None
    disk: Path | None = None
    werror: ErrorPolicy = "enospc"
    agent_port: bool = False
    kit_dir: Path | None = None  #: where `guestkit.fetch_kit` made the kit (default .cache/guest)

    def __post_init__(self) -> None:
        for word in (self.action, *(f"{k}={v}" for k, v in self.options)):
            if not re.fullmatch(r"[A-Za-z0-9_.,=-]+", word):
                raise ValueError(f"not a kernel command line word: {word!r}")
        if self.werror not in _WRITE_ERROR_POLICIES:
            raise ValueError(f"werror must be one of {sorted(_WRITE_ERROR_POLICIES)}")


@dataclass(frozen=True, slots=True)
class LabSpec:
    """What to start: a name and the devices/options that make the wanted events possible."""

    name: str
    no_shutdown: bool = False
    watchdog_action: WatchdogAction | None = None
    blkdebug: BlkdebugSpec | None = None
    vnc_display: int | None = None
    spice_port: int | None = None
    extra_args: tuple[str, ...] = ()
    accel: Accel = "auto"
    #: Also dial in to a socket that qmpwatch listens on (its `[[listen]]` source).
    dial_in: Path | None = None
    uuid: str | None = None  #: ``-uuid``
    guest: GuestSpec | None = None  #: a real Linux guest instead of the halt firmware
    #: Run QEMU as this uid (the lab runs as root; group and groups stay the lab's).
    user: int | None = None

    def __post_init__(self) -> None:
        if not self.name or any(ch in self.name for ch in ",\0\n"):
            raise ValueError(f"VM name must be non-empty without commas or newlines: {self.name!r}")
        if self.watchdog_action is not None and self.watchdog_action not in _WATCHDOG_ACTIONS:
            raise ValueError(
                f"watchdog_action must be one of {sorted(_WATCHDOG_ACTIONS)}, "
                f"not {self.watchdog_action!r}"
            )
        if self.vnc_display is not None and not 0 <= self.vnc_display <= 65535 - 5900:
            raise ValueError(f"vnc_display out of range: {self.vnc_display}")
        if self.spice_port is not None and not 1 <= self.spice_port <= 65535:
            raise ValueError(f"spice_port out of range: {self.spice_port}")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {self.accel!r}")
