"""Shared fixtures: a short temp directory for unix sockets, the QEMU builds to test on, and
the Hypothesis profile.

Every test marked ``qemu`` (``pytestmark = pytest.mark.qemu`` or ``@pytest.mark.qemu``) runs
once per QEMU build, the version in its id (``test_x[qemu-7.2]``, ``test_x[qemu-10.0]``),
with no code of its own: the build is selected through the environment for the test's
duration (``$QMPWATCH_QEMU*``, read by `qmpwatch.lab.QemuBuild.from_environ`), so `LabVM` and
child processes such as ``qmpwatch demo`` run it. The builds: the one the environment names
(the system's QEMU unless ``$QMPWATCH_QEMU`` says otherwise), and QEMU 10.0 from
``.cache/qemu-10.0`` (``scripts/fetch-qemu``, which ``make test`` runs). A test that starts
QEMU without the marker fails, saying to add it.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from qmpwatch.lab import QEMU_DATA_DIR_ENV, QEMU_ENV, QEMU_MODULE_DIR_ENV, LabError, QemuBuild
from qmpwatch.lab.libvirt import LibvirtLab
from tests.support import systemd_harness

# Property tests check what inputs do, not how fast they are made: on a loaded 2-core CI
# machine drawing one input can take seconds, so neither the generation health check nor the
# per-example deadline may fail a run. The number of examples stays Hypothesis' default.
# The contract check: every documented record, alert, resolution, refusal reason, metric and
# degraded reason comes out of some daemon of the run (tests/support/contract.py says how).
pytest_plugins = ["tests.support.contract"]

settings.register_profile(
    "qmpwatch",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("qmpwatch")

ROOT = Path(__file__).resolve().parent.parent
QEMU_10_CACHE = ROOT / ".cache" / "qemu-10.0"
QEMU_10 = QemuBuild.from_root(QEMU_10_CACHE / "root", label="10.0")
#: What $QMPWATCH_QEMU points at during a test not marked qemu (it fails, saying why).
UNMARKED_QEMU = Path(__file__).resolve().parent / "support" / "unmarked-qemu"


@functools.cache
def qemu_builds() -> tuple[QemuBuild, ...]:
    """The builds every ``qemu`` test runs on, labelled ``MAJOR.MINOR``."""
    first = QemuBuild.from_environ()
    try:
        major, minor, _ = first.version()
        first = dataclasses.replace(first, label=f"{major}.{minor}")
    except LabError:
        pass  # no QEMU at all: its tests fail with QemuNotFound, which says what to install
    if first.executable() is not None and first.executable() == QEMU_10.executable():
        return (first,)
    return (first, QEMU_10)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test marked ``qemu`` over `qemu_builds`."""
    if metafunc.definition.get_closest_marker("qemu") is not None:
        builds = qemu_builds()
        metafunc.parametrize(
            "qemu_build", builds, indirect=True, ids=[f"qemu-{b.label}" for b in builds]
        )


@pytest.fixture
def qemu_build(request: pytest.FixtureRequest) -> QemuBuild | None:
    """The QEMU build this test runs on; None for a test not marked ``qemu``."""
    build: QemuBuild | None = getattr(request, "param", None)
    return build


@pytest.fixture(autouse=True)
def _select_qemu_build(qemu_build: QemuBuild | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Select the test's build through the environment, for the lab and child processes."""
    if qemu_build is None:
        settings: dict[str, str | None] = {
            QEMU_ENV: str(UNMARKED_QEMU),
            QEMU_DATA_DIR_ENV: None,
            QEMU_MODULE_DIR_ENV: None,
        }
    else:
        if qemu_build is QEMU_10 and qemu_build.executable() is None:
            pytest.fail(
                f"QEMU 10.0 is missing from {QEMU_10_CACHE}: run scripts/fetch-qemu "
                "(`make test` does)"
            )
        settings = qemu_build.environ()
    for name, value in settings.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qw-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirt_lab() -> Iterator[LibvirtLab]:
    """A real libvirtd and virtlogd for the tests marked ``libvirt`` (started once, stopped
    at the end of the run, whatever happens; daemons an earlier run left are taken over)."""
    workdir = Path(tempfile.mkdtemp(prefix="qwlv-", dir="/tmp"))
    try:
        with LibvirtLab.running(workdir) as lab:
            yield lab
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The real-systemd tests install qmpwatch from wheels built on this host (their namespace
    has no network): start that build now, so that it overlaps the tests before them."""
    if any(
        item.nodeid.startswith("tests/service/test_systemd_service.py") for item in session.items
    ):
        systemd_harness.start_wheels(ROOT)


def pytest_sessionfinish(session: pytest.Session) -> None:
    systemd_harness.stop_wheels()
