"""Which QEMU the lab runs (`QemuBuild`), and whether this host offers KVM.

A build is a binary, plus for one extracted beside the system's (``dpkg -x``) its ``-L`` data
directory and ``QEMU_MODULE_DIR``. By default the environment selects it, so a child such as
``qmpwatch demo`` runs its parent's build: ``$QMPWATCH_QEMU`` (the binary, default
qemu-system-x86_64 on PATH), ``$QMPWATCH_QEMU_DATA_DIR`` (passed as -L) and
``$QMPWATCH_QEMU_MODULE_DIR`` (QEMU refuses modules such as SPICE's from another build).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qmpwatch.lab.errors import LabError

QEMU_BINARY: Final = "qemu-system-x86_64"
QEMU_ENV: Final = "QMPWATCH_QEMU"
QEMU_DATA_DIR_ENV: Final = "QMPWATCH_QEMU_DATA_DIR"
QEMU_MODULE_DIR_ENV: Final = "QMPWATCH_QEMU_MODULE_DIR"
QEMU_INSTALL_HINT: Final = "apt-get install qemu-system-x86"


class QemuNotFound(LabError):
    """qemu-system-x86_64 is not installed (or not on PATH), or a given binary is missing."""

    def __init__(self, binary: str | None = None) -> None:
        where = f"{binary} is not executable" if binary else f"{QEMU_BINARY} not found on PATH"
        super().__init__(
            f"{where} (${QEMU_ENV} names the binary to run); "
            f"install QEMU with `{QEMU_INSTALL_HINT}` (Debian/Ubuntu)"
        )


@dataclass(frozen=True, slots=True)
class QemuBuild:
    """Which QEMU the lab runs: a binary, and where that build keeps its data and modules.

    The system's QEMU needs only its binary. A build extracted beside it (`from_root`) also
    needs ``-L data_dir`` and ``QEMU_MODULE_DIR=module_dir`` in its environment. ``label``
    names the build for people (test ids, errors), e.g. ``"10.0"``.
    """

    binary: str  #: a path, or a name looked up on PATH
    data_dir: str | None = None
    module_dir: str | None = None
    label: str = "system"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> QemuBuild:
        """The build that ``$QMPWATCH_QEMU*`` selects (see the module docstring)."""
        env = os.environ if environ is None else environ
        override = env.get(QEMU_ENV) or None
        return cls(
            binary=override or QEMU_BINARY,
            data_dir=env.get(QEMU_DATA_DIR_ENV) or None,
            module_dir=env.get(QEMU_MODULE_DIR_ENV) or None,
            label=override or "system",
        )

    @classmethod
    def from_root(cls, root: Path | str, label: str) -> QemuBuild:
        """A build whose Debian packages were extracted into ``root`` with ``dpkg -x``."""
        base = Path(root).absolute()
        multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
        return cls(
            binary=str(base / "usr" / "bin" / QEMU_BINARY),
            data_dir=str(base / "usr" / "share" / "qemu"),
            module_dir=str(base / "usr" / "lib" / multiarch / "qemu"),
            label=label,
        )

    def environ(self) -> dict[str, str | None]:
        """The ``QMPWATCH_QEMU*`` variables that select this build (None: unset them)."""
        return {
            QEMU_ENV: None if self.binary == QEMU_BINARY else self.binary,
            QEMU_DATA_DIR_ENV: self.data_dir,
            QEMU_MODULE_DIR_ENV: self.module_dir,
        }

    def executable(self) -> str | None:
        """The binary's path if it can be run, else None."""
        path = self.binary if os.sep in self.binary else shutil.which(self.binary)
        return path if path is not None and os.access(path, os.X_OK) else None

    def require(self) -> str:
        """Like `executable`, but raise `QemuNotFound` (which says what to install)."""
        path = self.executable()
        if path is None:
            raise QemuNotFound(None if self.binary == QEMU_BINARY else self.binary)
        return path

    def version(self) -> tuple[int, int, int]:
        """``(major, minor, micro)`` from ``BINARY --version`` (run once per binary)."""
        return _binary_version(self.require())

    def qemu_args(self) -> list[str]:
        """Command-line options this build needs before any other."""
        return ["-L", self.data_dir] if self.data_dir else []

    def qemu_env(self) -> dict[str, str] | None:
        """QEMU's environment (None: inherit this process's unchanged)."""
        if self.module_dir is None:
            return None
        return {**os.environ, "QEMU_MODULE_DIR": self.module_dir}


_VERSION_LINE: Final = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")


@functools.cache
def _binary_version(binary: str) -> tuple[int, int, int]:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LabError(f"{binary} --version failed: {exc}") from exc
    match = _VERSION_LINE.search(out)
    if match is None:
        raise LabError(f"{binary} --version: no version in {out.strip()!r}")
    major, minor, micro = match.groups()
    return int(major), int(minor), int(micro or 0)


def qemu_binary() -> str | None:
    """The binary of the build the environment selects (`QemuBuild.from_environ`), or None."""
    return QemuBuild.from_environ().executable()


def require_qemu() -> str:
    """Like `qemu_binary`, but raise `QemuNotFound` (which says what to install)."""
    return QemuBuild.from_environ().require()


def kvm_usable() -> bool:
    """Whether /dev/kvm can be opened read-write by this process."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True
