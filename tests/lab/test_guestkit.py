"""The real guest's kit: the initramfs made from it, and the message when it is missing."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from qmpwatch.lab import GuestKit, LabError
from qmpwatch.lab.guestkit import INIT_SCRIPT, initramfs

ROOT = Path(__file__).resolve().parents[2]
KIT = GuestKit.find(ROOT / ".cache" / "guest")  # fetched by `make test`


def cpio_entries(data: bytes) -> dict[str, tuple[int, int, int, bytes]]:
    """name -> (mode, rdev major, rdev minor, content) of a newc archive."""
    found: dict[str, tuple[int, int, int, bytes]] = {}
    at = 0
    while True:
        assert data[at : at + 6] == b"070701"
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, major, minor, name_size = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_at = at + 110
        name = data[name_at : name_at + name_size - 1].decode()
        body_at = (name_at + name_size + 3) // 4 * 4
        if name == "TRAILER!!!":
            return found
        found[name] = (mode, major, minor, data[body_at : body_at + size])
        at = (body_at + size + 3) // 4 * 4


def test_the_initramfs_holds_init_busybox_console_and_modules_in_order(tmp_path: Path) -> None:
    """The cpio has /init (the script), busybox with its applets, /dev/console (5:1) and each
    module /init loads, in the order dependencies come first."""
    entries = cpio_entries(gzip.decompress(initramfs(KIT, tmp_path).read_bytes()))
    assert entries["init"][3] == INIT_SCRIPT.encode()
    assert entries["init"][0] == 0o100755
    assert entries["dev/console"][:3] == (0o020600, 5, 1)
    assert entries["bin/sh"][3] == b"busybox"  # a symlink to busybox
    load = [line.split()[0] for line in entries["modules.load"][3].decode().splitlines()]
    assert load.index("virtio_ring") < load.index("virtio_blk")
    assert load.index("watchdog") < load.index("i6300esb")
    assert load.index("pvpanic") < load.index("pvpanic_mmio")
    assert all(f"lib/modules/{name}.ko" in entries for name in load)
    assert "i6300esb heartbeat=2" in entries["modules.load"][3].decode()


def test_the_initramfs_is_named_by_its_content_and_made_once(tmp_path: Path) -> None:
    """The same kit gives the same file (written once, renamed into place): nothing else is
    left in the directory."""
    first = initramfs(KIT, tmp_path)
    mtime = first.stat().st_mtime_ns
    assert initramfs(KIT, tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_a_missing_kit_says_how_to_fetch_it(tmp_path: Path) -> None:
    """No kit in the directory: the error names the command that fetches it."""
    with pytest.raises(LabError, match=r"python -m qmpwatch.lab.fetch_guest"):
        GuestKit.find(tmp_path)
