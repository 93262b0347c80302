"""Where a VM's disks live: image files from `query-block`, and the mounts that hold them.

So that alerts about disks can say which file system they are on (`storage`), and
Alertmanager can group "8 VMs paused on one NFS mount" into one notification.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from qmpwatch.aio.lanes import Lane, LaneTimeout
from qmpwatch.aio.stalls import STALLS
from qmpwatch.core.alert import Alert
from qmpwatch.core.watch import DiskInfo

MOUNTINFO = "/proc/self/mountinfo"

STALL_REASON = "storage_unresponsive"
PATHS_TIMEOUT_S = 2.0  # resolving the images' paths (a hung mount on the way hangs it)

_lanes: dict[str, Lane] = {}  # mount point -> the lane its statvfs calls run in
_paths = Lane("storage paths")


async def statvfs_of(mount: str, timeout: float) -> os.statvfs_result | None:
    """`statvfs` of `mount`; None when unknown.

    It runs in the mount's own lane (a thread): a hung file system (a dead NFS server) holds
    up the calls for that mount only, and while one hangs past `timeout` no other is started
    (None at once). A call that misses `timeout` starts the stall `storage_unresponsive`
    (degraded, `dependency_stalled`); the next call that returns, even with an error, ends it.
    """
    lane = _lanes.get(mount)
    if lane is None:
        lane = _lanes[mount] = Lane(f"statvfs {mount}")
    if lane.busy_for() >= timeout:
        return None  # one hangs already: starting more would only pile them up
    try:
        st: os.statvfs_result = await lane.call(os.statvfs, mount, timeout=timeout)
    except LaneTimeout:
        STALLS.begin(STALL_REASON, mount, f"statvfs has not answered for {timeout:g} s")
        return None
    except OSError:
        STALLS.end(STALL_REASON, mount)
        return None
    STALLS.end(STALL_REASON, mount)
    return st


async def free_percent(mount: str, timeout: float) -> float | None:
    """The share of `mount` free for unprivileged users (`statvfs_of`); None when unknown."""
    st = await statvfs_of(mount, timeout)
    return 100.0 * st.f_bavail / st.f_blocks if st is not None and st.f_blocks else None


async def free_bytes(mount: str, timeout: float) -> int | None:
    """The bytes of `mount` free for unprivileged users (`statvfs_of`); None when unknown."""
    st = await statvfs_of(mount, timeout)
    return st.f_bavail * st.f_frsize if st is not None else None


async def disks_of(block: Any) -> dict[str, DiskInfo]:
    """`disks(block)` off the loop (it resolves paths, which a hung mount on the way
    hangs), within PATHS_TIMEOUT_S; nothing known when it does not answer by then."""
    if _paths.busy_for() >= PATHS_TIMEOUT_S:
        return {}  # an earlier resolution hangs: starting more would only pile them up
    try:
        return await _paths.call(disks, block, timeout=PATHS_TIMEOUT_S)
    except LaneTimeout:
        return {}


def mounts(text: str) -> list[tuple[str, str, str]]:
    """(mount point, source, file system type) of every line of a mountinfo file."""
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        point = fields[4].encode().decode("unicode_escape")  # \\040 for a space, ...
        found.append((point, tail[1], tail[0]))
    return found


def mount_of(path: str, table: Iterable[tuple[str, str, str]]) -> tuple[str, str, str] | None:
    """The mount holding `path` (the longest mount point it lies under)."""
    best: tuple[str, str, str] | None = None
    for entry in table:
        point = entry[0]
        under = path == point or path.startswith(point.rstrip("/") + "/")
        if under and (best is None or len(point) > len(best[0])):
            best = entry
    return best


def filling(firing: Iterable[Alert]) -> bool:
    """Whether one of these firing alerts is a disk filling up (`vm_disk_filling`)."""
    return any(alert.kind == "vm_disk_filling" for alert in firing)


def disks(block: Any, mountinfo: str | None = None) -> dict[str, DiskInfo]:
    """Device and node-name -> the image behind it, from a `query-block` answer."""
    if mountinfo is None:
        try:
            with open(MOUNTINFO, encoding="utf-8") as f:
                mountinfo = f.read()
        except OSError:
            mountinfo = ""
    table = mounts(mountinfo)
    found: dict[str, DiskInfo] = {}
    for device in block if isinstance(block, list) else ():
        inserted = device.get("inserted") if isinstance(device, Mapping) else None
        if not isinstance(inserted, Mapping):
            continue
        image = inserted.get("image")
        filename = _file_of(image) or inserted.get("file")
        if not isinstance(filename, str) or not filename.startswith("/"):
            continue
        real = os.path.realpath(filename)
        mount = mount_of(real, table)
        size = image.get("virtual-size") if isinstance(image, Mapping) else None
        node = inserted.get("node-name")
        info = DiskInfo(
            image=filename,
            node_name=node if isinstance(node, str) else "",
            size=size if isinstance(size, int) else 0,
            read_only=inserted.get("ro") is True,
            storage=mount[0] if mount else "",
            storage_source=mount[1] if mount else "",
            storage_fs=mount[2] if mount else "",
        )
        for key in (device.get("device"), inserted.get("node-name")):
            if isinstance(key, str) and key:
                found[key] = info
    return found


def _file_of(image: Any) -> str | None:
    """The file at the bottom of an image chain (blkdebug, raw over file, ...)."""
    while isinstance(image, Mapping):
        backing = image.get("backing-image")
        name = image.get("filename")
        if isinstance(name, str) and name.startswith("/") and not isinstance(backing, Mapping):
            return name
        if isinstance(name, str) and ":" in name and name.rsplit(":", 1)[-1].startswith("/"):
            return name.rsplit(":", 1)[-1]  # blkdebug:CONF:/path/disk.img
        image = backing
    return None
