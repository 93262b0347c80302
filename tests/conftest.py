"""Shared fixtures (a short temp directory for unix sockets) and the Hypothesis profile."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests check what inputs do, not how fast they are made: on a loaded 2-core CI
# machine drawing one input can take seconds, so neither the generation health check nor the
# per-example deadline may fail a run. The number of examples stays Hypothesis' default.
settings.register_profile(
    "qmpwatch",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("qmpwatch")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qw-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
