"""The `hint` of a `vm_connect_failed` record with reason `permission` (first-day papercut):
what the socket is and what lets qmpwatch in. The record itself, from a daemon that really
is refused, is in tests/service/test_systemd_service.py."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpwatch.sources.permission import hint_for, permission_hint


@pytest.fixture
def monitor(sock_dir: Path) -> Iterator[Path]:
    """A listening unix socket as QEMU makes it under umask 027: srwxr-x--- root:root."""
    path = sock_dir / "web01.qmp"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        os.chmod(path, 0o750)
        yield path


def test_in_the_group_but_not_group_writable(monitor: Path) -> None:
    """qmpwatch in the socket's group: the fix is QEMU's umask, chmod g+w, or [[listen]]."""
    gid = os.stat(monitor).st_gid
    hint = permission_hint(str(monitor), groups={gid})
    assert hint.startswith(f"{monitor} is srwxr-x--- ")
    assert "not writable by its group, which qmpwatch is in" in hint
    assert "UMask=0007" in hint
    assert f"chmod g+w {monitor}" in hint
    assert "[[listen]]" in hint
    assert "SupplementaryGroups" not in hint


def test_not_in_the_group(monitor: Path) -> None:
    """qmpwatch not in the socket's group: name the group to join, and the umask fix too."""
    gid = os.stat(monitor).st_gid
    hint = permission_hint(str(monitor), groups={gid + 12345})
    assert "qmpwatch is not in group" in hint
    assert "SupplementaryGroups=" in hint
    assert "QMPWATCH_GROUP=" in hint
    assert "UMask=0007" in hint  # not group-writable either


def test_group_writable_but_not_in_the_group(monitor: Path) -> None:
    """A group-writable socket of another group: only the group is missing."""
    os.chmod(monitor, 0o770)
    gid = os.stat(monitor).st_gid
    hint = permission_hint(str(monitor), groups={gid + 12345})
    assert "qmpwatch is not in group" in hint
    assert "UMask" not in hint


def test_an_unreachable_path_names_its_directories(tmp_path: Path) -> None:
    """A socket that cannot even be looked at: its directories must be searchable."""
    hint = permission_hint(str(tmp_path / "gone" / "web01.qmp"))
    assert "not searchable by qmpwatch" in hint


def test_only_permission_failures_get_a_hint(monitor: Path) -> None:
    """Other reasons keep the record as it was: no `hint` key."""
    assert set(hint_for("permission", str(monitor))) == {"hint"}
    for reason in ("missing", "refused", "no_greeting", "error"):
        assert hint_for(reason, str(monitor)) == {}
