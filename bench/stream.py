"""The benchmark's event stream: a realistic storm mix, byte for byte as QEMU 7.2 writes it.

Shapes were taken from a real QEMU 7.2 (`-qmp unix:...`): `timestamp` first, then `event`,
then `data` (absent for STOP/RESUME/POWERDOWN), `", "` and `": "` separators, `\\r\\n` line
ends. The mix is what an event storm on a host looks like: a guest hammering the RTC, a VNC
scanner (connect, initialise, disconnect), a flapping disk reporting I/O errors, resets, and
now and then a pause (STOP, RESUME) or a disk error that pauses the VM (BLOCK_IO_ERROR with
action stop, STOP, RESUME). QEMU's timestamps advance 5-80 µs per event. Deterministic for
a seed, so every consumer in one run sees the same bytes.

The stream may end with one POWERDOWN event (never part of the mix), which consumers use as
the "all done" mark.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

BASE_SECONDS = 1_700_000_000
END_EVENT = "POWERDOWN"

_HEAD = b'{"timestamp": {"seconds": %d, "microseconds": %d}, "event": '
_RTC = b'"RTC_CHANGE", "data": {"offset": %d, "qom-path": "/machine/unattached/device[8]"}}\r\n'
_VNC_SERVER = (
    b'"server": {"auth": "none", "family": "ipv4", "service": "5900", '
    b'"host": "0.0.0.0", "websocket": false}'
)
_VNC = (
    b'"%s", "data": {'
    + _VNC_SERVER
    + b', "client": {"family": "ipv4", "service": "%d", "host": "%s", "websocket": false}}}\r\n'
)
_BLOCK = (
    b'"BLOCK_IO_ERROR", "data": {"device": "drive-virtio-disk%d", "nospace": false, '
    b'"node-name": "#block%d", "reason": "Input/output error", "operation": "%s", '
    b'"action": "%s"}}\r\n'
)
_RESET = b'"RESET", "data": {"guest": %s, "reason": "%s"}}\r\n'
_BARE = b'"%s"}\r\n'

# (group, weight): a group is one or more events that come together.
Mix = tuple[tuple[str, float], ...]
MIXES: dict[str, Mix] = {
    # The storms the issue names, plus what a management layer does now and then.
    "storm": (
        ("rtc", 40.0),  # RTC_CHANGE
        ("vnc", 10.0),  # VNC_CONNECTED, VNC_INITIALIZED, VNC_DISCONNECTED
        ("block_report", 15.0),  # BLOCK_IO_ERROR, action report
        ("reset", 4.0),  # RESET (host or guest)
        ("pause", 0.1),  # STOP, RESUME
        ("io_pause", 0.05),  # BLOCK_IO_ERROR action stop, STOP, RESUME
    ),
    "rtc": (("rtc", 1.0),),
    "vnc": (("vnc", 1.0),),
    "disk": (("block_report", 1.0),),
    "pauses": (("pause", 2.0), ("io_pause", 1.0)),
}
DEFAULT_MIX = "storm"


class _Clock:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seconds = BASE_SECONDS
        self.micro = 0

    def head(self) -> bytes:
        self.micro += self.rng.randint(5, 80)
        if self.micro >= 1_000_000:
            self.seconds += 1
            self.micro -= 1_000_000
        return _HEAD % (self.seconds, self.micro)


def _group(kind: str, clock: _Clock, rng: random.Random) -> list[bytes]:
    if kind == "rtc":
        return [clock.head() + _RTC % rng.randint(-3600, 3600)]
    if kind == "vnc":
        port = rng.randint(32768, 60999)
        host = b"192.0.2.%d" % rng.randint(1, 254)
        return [
            clock.head() + _VNC % (name, port, host)
            for name in (b"VNC_CONNECTED", b"VNC_INITIALIZED", b"VNC_DISCONNECTED")
        ]
    if kind == "block_report":
        disk = rng.randint(0, 3)
        op = b"write" if rng.random() < 0.7 else b"read"
        return [clock.head() + _BLOCK % (disk, 100 + disk, op, b"report")]
    if kind == "reset":
        guest = rng.random() < 0.5
        return [
            clock.head()
            + _RESET
            % ((b"true", b"guest-reset") if guest else (b"false", b"host-qmp-system-reset"))
        ]
    if kind == "pause":
        return [clock.head() + _BARE % b"STOP", clock.head() + _BARE % b"RESUME"]
    if kind == "io_pause":
        return [
            clock.head() + _BLOCK % (0, 100, b"write", b"stop"),
            clock.head() + _BARE % b"STOP",
            clock.head() + _BARE % b"RESUME",
        ]
    raise ValueError(kind)


def lines(
    count: int, seed: int = 1, *, end: bool = True, mix: str = DEFAULT_MIX
) -> Iterator[bytes]:
    """`count` event lines of `mix` (then the POWERDOWN end mark when `end`)."""
    rng = random.Random(seed)
    clock = _Clock(rng)
    kinds = [k for k, _ in MIXES[mix]]
    weights = [w for _, w in MIXES[mix]]
    left = count
    while left > 0:
        (kind,) = rng.choices(kinds, weights)
        group = _group(kind, clock, rng)
        if len(group) > left:
            group = [clock.head() + _RTC % 0 for _ in range(left)]
        yield from group
        left -= len(group)
    if end:
        yield clock.head() + _BARE % END_EVENT.encode()


def chunks(
    count: int, seed: int = 1, *, end: bool = True, mix: str = DEFAULT_MIX, per_chunk: int = 512
) -> Iterator[bytes]:
    """The same stream as `lines`, joined into chunks of whole lines for writing."""
    batch: list[bytes] = []
    for line in lines(count, seed, end=end, mix=mix):
        batch.append(line)
        if len(batch) >= per_chunk:
            yield b"".join(batch)
            batch.clear()
    if batch:
        yield b"".join(batch)


def describe(count: int, seed: int = 1, mix: str = DEFAULT_MIX) -> dict[str, int]:
    """Events by name in the stream (for the report)."""
    names: Counter[str] = Counter()
    for line in lines(count, seed, end=False, mix=mix):
        start = line.index(b'"event": "') + 10
        names[line[start : line.index(b'"', start)].decode()] += 1
    return dict(names.most_common())
