"""The Debian packages of a checkout, as `make deb` builds them (scripts/build-deb).

scripts/build-deb keeps what it built in build/deb/<hash of the sources and version>, so the same
sources are built once, whoever asks (`make deb`, this module); `packages()` also remembers its
answer for the test session.
"""

from __future__ import annotations

import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

BUILD_TIMEOUT_S = 1800.0  # about 60 s on two shared cores; pip wheel of libvirt-python is most


@dataclass(frozen=True)
class Packages:
    """The two packages of one build, and their version."""

    version: str
    main: Path  # qmpwatch_<version>_<arch>.deb
    libvirt: Path  # qmpwatch-libvirt_<version>_<arch>.deb

    @property
    def directory(self) -> Path:
        return self.main.parent


_BUILT: dict[tuple[Path, str], Packages] = {}


def source_version(root: Path) -> str:
    """The version in pyproject.toml, which the packages carry."""
    with open(root / "pyproject.toml", "rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
        return version


def packages(root: Path, version: str = "") -> Packages:
    """The packages of `root`'s sources (built as `version` when given); AssertionError with
    the end of the build's output when the build fails."""
    key = (root, version)
    if key not in _BUILT:
        argv = [str(root / "scripts" / "build-deb")]
        if version:
            argv += ["--version", version]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"scripts/build-deb failed ({result.returncode}): {result.stderr[-4000:]}"
            )
        paths = [Path(line) for line in result.stdout.splitlines() if line.endswith(".deb")]
        want = version or source_version(root)
        main = [p for p in paths if p.name.startswith(f"qmpwatch_{want}_")]
        libvirt = [p for p in paths if p.name.startswith(f"qmpwatch-libvirt_{want}_")]
        assert len(main) == 1, (want, result.stdout)
        assert len(libvirt) == 1, (want, result.stdout)
        _BUILT[key] = Packages(want, main[0], libvirt[0])
    return _BUILT[key]
