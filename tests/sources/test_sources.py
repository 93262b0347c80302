"""Sources without a QEMU: their configuration, the registry, naming a dialed-in peer."""

from __future__ import annotations

import sys

import pytest

from qmpwatch.core.backoff import Backoff
from qmpwatch.core.config import ListenConfig, parse_config_text
from qmpwatch.core.errors import ConfigError
from qmpwatch.core.watch import DiskInfo
from qmpwatch.session.storage import disks
from qmpwatch.sources import registry
from qmpwatch.sources.peer import parse_cmdline


def test_listen_entries_parse_with_their_defaults() -> None:
    """[[listen]] takes socket (required), group, no_shutdown and grace_s."""
    cfg = parse_config_text(
        '[[listen]]\nsocket = "/run/qmpwatch/qmp.sock"\ngroup = "kvm"\n'
        '[[listen]]\nsocket = "/run/qmpwatch/b.sock"\nno_shutdown = true\ngrace_s = 3\n'
    )
    assert cfg.listen == (
        ListenConfig("/run/qmpwatch/qmp.sock", "kvm", "auto", 10.0),
        ListenConfig("/run/qmpwatch/b.sock", "", True, 3.0),
    )
    assert registry.configured(cfg) == ["listen"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[listen]]\ngroup = 'kvm'", "listen[0].socket: missing (required)"),
        ("[[listen]]\nsocket = 'qmp.sock'",
         'listen[0].socket: must be an absolute path, got "qmp.sock"'),
        ("[[listen]]\nsocket = '/a'\n[[listen]]\nsocket = '/a'",
         'listen[1].socket: "/a" is already a [[listen]] socket'),
        ("[[listen]]\nsocket = '/a'\ngrace_s = 0",
         "listen[0].grace_s: must be a number greater than 0, got 0"),
        ("[[listen]]\nsocket = '/a'\nport = 1", "listen[0].port: unknown key"),
    ],
)  # fmt: skip
def test_bad_listen_entries_name_the_key(text: str, problem: str) -> None:
    """Each problem names the entry and the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text)
    assert problem in caught.value.problems


def test_sources_are_imported_only_when_configured() -> None:
    """A source's module is loaded when asked for, and each registry entry names a class."""
    assert registry.configured(parse_config_text("")) == []
    for kind in registry.SOURCES:
        factory = registry.load(kind)
        assert getattr(factory, "kind", None) in (kind, "vm")
    assert "qmpwatch.sources.listen" in sys.modules


@pytest.mark.parametrize(
    ("args", "name", "uuid"),
    [
        (["/usr/bin/qemu-system-x86_64", "-name", "web01"], "web01", None),
        (["/usr/bin/kvm", "-name", "guest=web02,debug-threads=on", "-uuid", "u-1"], "web02", "u-1"),
        (["qemu-system-x86_64", "-uuid", "8f3c"], None, "8f3c"),
    ],
)
def test_a_peers_name_and_uuid_come_from_its_command_line(
    args: list[str], name: str | None, uuid: str | None
) -> None:
    """-name (plain or guest=...), -uuid and the program are read from the command line."""
    cmdline = parse_cmdline(args)
    assert (cmdline.name, cmdline.uuid, cmdline.program) == (name, uuid, args[0])


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    """Delays double up to the cap, each in [d/2, d]; reset starts again."""
    top = Backoff(1.0, 10.0, rng=lambda: 1.0)
    assert [top.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    top.reset()
    assert top.next() == 1.0
    low = Backoff(1.0, 10.0, rng=lambda: 0.0)
    assert [low.delay(n) for n in (1, 2, 5)] == [0.5, 1.0, 5.0]


MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 0:35 / /var/lib/images rw shared:20 - nfs4 nas:/export/vm rw,vers=4.2\n"
    r"41 22 0:36 / /mnt/my\040disk rw - xfs /dev/sdb1 rw"
    "\n"
)


def test_a_disk_image_is_placed_on_its_mount() -> None:
    """query-block's image files land on the longest mount point that holds them."""
    block = [
        {"device": "drive0", "inserted": {"node-name": "n0", "file": "/var/lib/images/a.qcow2",
                                          "image": {"filename": "/var/lib/images/a.qcow2",
                                                    "virtual-size": 1 << 30}}},
        {"device": "", "inserted": {"node-name": "n1", "file": "blkdebug:/c.conf:/mnt/my disk/b",
                                    "image": {"filename": "blkdebug:/c.conf:/mnt/my disk/b"}}},
        {"device": "cd0", "locked": False},
    ]  # fmt: skip
    found = disks(block, MOUNTINFO)
    assert found["drive0"] == found["n0"]
    assert found["n0"].fields() == {
        "image": "/var/lib/images/a.qcow2",
        "storage": "/var/lib/images",
        "storage_source": "nas:/export/vm",
        "storage_fs": "nfs4",
    }
    assert (found["n0"].node_name, found["n0"].size) == ("n0", 1 << 30)
    assert found["n1"] == DiskInfo(
        "/mnt/my disk/b", "n1", storage="/mnt/my disk", storage_source="/dev/sdb1", storage_fs="xfs"
    )
    assert "cd0" not in found
