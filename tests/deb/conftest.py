"""The Debian packages for the package tests: built once per test session (scripts/build-deb
also keeps them by the sources' hash, so `make deb` before the suite is not paid twice)."""

from __future__ import annotations

import pytest

from tests.support.debs import Packages, packages
from tests.support.service_host import ROOT

UPGRADE_SUFFIX = "+upgrade1"  # sorts after the version itself, for dpkg and for pip alike


@pytest.fixture(scope="session")
def debs() -> Packages:
    """qmpwatch and qmpwatch-libvirt of this checkout."""
    return packages(ROOT)


@pytest.fixture(scope="session")
def upgrade_debs(debs: Packages) -> Packages:
    """The same sources as a higher version: the upgrade that follows `debs`."""
    return packages(ROOT, debs.version + UPGRADE_SUFFIX)
