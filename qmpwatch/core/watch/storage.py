"""Storage: where the VM's disks live, the write thresholds armed on them, free space.

Its state is `Disks` (the watch's `disks_state`): the images from `query-block` and the write
thresholds armed on them; raises `vm_disk_filling` and `storage_space_low`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpwatch.core.events import BlockIoError, Event
from qmpwatch.core.watch.oneshot import event_text

if TYPE_CHECKING:
    from qmpwatch.core.watch.vmwatch import VmWatch


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """Where one disk's image lives: the file and the mount (file system) holding it."""

    image: str
    node_name: str = ""
    size: int = 0  # the image's virtual size, bytes (0: unknown)
    read_only: bool = False
    storage: str = ""  # the mount point
    storage_source: str = ""  # what is mounted there (a device, host:/export, ...)
    storage_fs: str = ""  # its file system type

    def fields(self) -> dict[str, str]:
        pairs = {
            "image": self.image,
            "storage": self.storage,
            "storage_source": self.storage_source,
            "storage_fs": self.storage_fs,
        }
        return {key: value for key, value in pairs.items() if value}


class Disks:
    """The VM's disks as the latest `query-block` told them, and the thresholds armed."""

    def __init__(self) -> None:
        self.images: dict[str, DiskInfo] = {}  # device or node-name -> image
        self.thresholds: dict[str, float] = {}  # node-name -> write threshold armed, percent


def on_disks(watch: VmWatch, disks: dict[str, DiskInfo], now: float) -> None:
    """A session learned where the VM's disks live (`query-block`): a filling alert of a
    disk replaced, shrunk or grown resolves; with `write_threshold_percent`, QEMU's write
    threshold is armed on every writable image of known size."""
    watch.disks_state.images = disks
    by_node = {info.node_name: info for info in disks.values() if info.node_name}
    for alert in [a for a in watch.firing.values() if a.kind == "vm_disk_filling"]:
        info = by_node.get(str(alert.details.get("node-name")))
        if info is None or info.image != alert.details.get("image"):
            reason = "its image was replaced"
        elif info.size < int(alert.details.get("size", 0)):
            reason = "its image shrank"
        elif info.size > int(alert.details.get("size", 0)):
            reason = f"its image grew to {info.size} bytes"  # its threshold is armed anew
        else:
            continue
        watch.book.resolve(now, alert.__eq__, reason)
    percent = watch.resumer.config.write_threshold_percent
    watch.disks_state.thresholds.clear()
    if percent:
        for node, info in by_node.items():
            if not info.read_only and info.size > 0:
                arm_threshold(watch, node, info, percent)


def storages(watch: VmWatch) -> dict[str, list[DiskInfo]]:
    """Mount point -> the writable images of this VM on it."""
    found: dict[str, list[DiskInfo]] = {}
    seen: set[str] = set()
    for info in watch.disks_state.images.values():
        if info.storage and not info.read_only and info.image not in seen:
            seen.add(info.image)
            found.setdefault(info.storage, []).append(info)
    return found


def on_storage_free(watch: VmWatch, free: Mapping[str, float], now: float) -> None:
    """The free space (percent) of the file systems holding the VM's writable images:
    below `storage_free_percent` a warning per file system, resolved above it again."""
    limit = watch.resumer.config.storage_free_percent
    storages = watch.storages()
    for mount, percent in free.items():
        images = storages.get(mount, [])
        if not images:
            continue
        cause = f"storage:{mount}"
        if percent >= limit:
            watch.book.resolve(
                now,
                lambda a, c=cause: a.kind == "storage_space_low" and a.cause == c,  # type: ignore[misc]
                f"{percent:.1f} % free again",
            )
            continue
        first = images[0]
        watch.book.fire(
            now,
            "storage_space_low",
            "warning",
            f"VM {watch.vm}: the file system of its disk {first.image} has {percent:.1f} % "
            f"free (warns below {limit:g} %): QEMU pauses the VM when it is full",
            cause=cause,
            details={
                "storage": mount,
                "storage_source": first.storage_source,
                "storage_fs": first.storage_fs,
                "free_percent": round(percent, 2),
                "images": [i.image for i in images],
            },
        )


def arm_threshold(watch: VmWatch, node: str, info: DiskInfo, percent: float) -> None:
    watch.disks_state.thresholds[node] = percent
    threshold = int(info.size * percent / 100)
    watch.out.command(
        "block-set-write-threshold", {"node-name": node, "write-threshold": threshold}
    )


def disk_fields(watch: VmWatch, event: BlockIoError) -> dict[str, str]:
    """The failing disk's image and storage, when `query-block` told them."""
    node = event.data.get("node-name")
    for key in (event.device, node):
        if isinstance(key, str) and key in watch.disks_state.images:
            return watch.disks_state.images[key].fields()
    return {}


def disk_name(event: BlockIoError) -> str:
    """The failing disk: its device, or (a -blockdev disk reports device "") its node-name."""
    node = event.data.get("node-name")
    return event.device or (node if isinstance(node, str) else "")


def io_error_words(event: BlockIoError) -> str:
    reason = event.reason or ("No space left on device" if event.nospace else "")
    words = f"{event.operation} error on {disk_name(event) or 'a disk'}"
    return f"{words} ({reason})" if reason else words


def on_write_threshold(watch: VmWatch, event: Event, now: float) -> None:
    """BLOCK_WRITE_THRESHOLD: a guest wrote past the threshold qmpwatch armed on an image (it
    is filling up): one warning per disk, and the threshold armed again half-way to full."""
    data = event.data
    node = event_text(data, "node-name")
    info = next((i for i in watch.disks_state.images.values() if i.node_name == node), None)
    percent = watch.disks_state.thresholds.pop(node, None)
    disk = info.image if info is not None else node or "a disk"
    shown = f" ({percent:g} % of its {info.size / 2**30:.3g} GiB)" if percent and info else ""
    details: dict[str, Any] = {
        k: data[k] for k in ("node-name", "write-threshold", "amount-exceeded") if k in data
    }
    if percent is not None:
        details["percent"] = percent
    if info is not None:
        details.update(info.fields())
        details["size"] = info.size
    watch.book.fire(
        now,
        "vm_disk_filling",
        "warning",
        f"VM {watch.vm}: its disk {disk} is filling up: written past the threshold{shown}",
        cause=f"filling:{node}",
        details=details,
        qemu_time=event.qemu_time,
    )
    if percent is not None and info is not None and 100 - percent > 0.2:
        arm_threshold(watch, node, info, percent + (100 - percent) / 2)
