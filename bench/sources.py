"""Scale through the other sources (issue 12): `[[discover]]` globs and QEMUs dialing in.

Each run starts the real daemon (`python -m qmpwatch run -c cfg.toml`, as `bench.scale`
does) and follows it through its log and /proc:

discover  a fake server (`bench.fakeqmp`) serves `vms` sockets in one directory and the
          daemon finds them through `[[discover]] glob = "DIR/*.qmp"`. Connect time from
          starting the process to the last `vm_connected`. Then a second daemon, the same
          except that it also rescans the glob every 2 s (`bench.polling`: the poll that
          inotify replaced) watches another `vms` sockets, and the idle CPU of both is
          measured over the same `idle_s` seconds.
listen    `vms` fake QEMUs (`bench.dialin`, one process each, started through a link named
          `qemu-system-x86_64` with `-name vmNNNN`) retry every second to connect to the
          daemon's `[[listen]]` socket, as QEMU's `reconnect=1` does; they are all up before
          the daemon starts (a restart of qmpwatch on a busy host). Connect time from
          starting the daemon until every VM is identified (by its `-name`) and connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import ROOT, qemu_lookalike
from bench.fakeqmp import FakeQmp
from bench.procstat import MIB, rss_bytes
from bench.scale import DaemonProcess, config_file, idle_cpu_pct

POLL_MODULE = "bench.polling"


@dataclass
class DiscoverScale:
    vms: int
    connected: int
    connect_s: float  # from process start
    connect_after_start_s: float  # from the daemon_started record
    rss_mib: float
    idle_s: float
    idle_cpu_pct: float  # the daemon as it is: inotify, nothing polls
    # The same daemon rescanning the glob every 2 s, over the same window (None: not run).
    poll_connected: int | None
    poll_idle_cpu_pct: float | None
    exit_status: int | None
    stopped_cleanly: bool


@dataclass
class ListenScale:
    vms: int
    connected: int
    identified: bool  # every VM connected under the `-name` its process was started with
    refused: int  # listen_peer_refused and listen_name_conflict records
    connect_s: float  # from starting the daemon
    connect_after_listening_s: float  # from the `listening` record
    rss_mib: float
    fakes_private_mib: float  # private memory of all the fake QEMU processes together
    idle_s: float
    idle_cpu_pct: float
    exit_status: int | None
    stopped_cleanly: bool


def _discover_config(workdir: Path, sockets: Path) -> Path:
    return config_file(workdir, ["[[discover]]", f"glob = {json.dumps(str(sockets / '*.qmp'))}"])


async def run_discover(
    vms: int, idle_s: float, *, poll: bool = True, connect_timeout_s: float = 60.0
) -> DiscoverScale:
    """`poll`: also run the polling variant and measure both over the same idle window."""
    with tempfile.TemporaryDirectory(prefix="qwb-", dir="/tmp") as tmp:
        work = {kind: Path(tmp) / kind for kind in ("inotify", "poll")[: 2 if poll else 1]}
        sockets = {kind: path / "sockets" for kind, path in work.items()}
        for path in sockets.values():
            path.mkdir(parents=True)
        servers = [await FakeQmp.start(sockets[kind], vms) for kind in work]
        daemons: list[DaemonProcess] = []
        try:
            # The daemon as it is, alone on the machine while it connects.
            daemon = await DaemonProcess.start(
                _discover_config(work["inotify"], sockets["inotify"]), work["inotify"]
            )
            daemons.append(daemon)
            connected_at = await daemon.until_connected(vms, connect_timeout_s)
            connected = len(daemon.tail.connected)
            # The same with the old poll, then both idle through the same window.
            if poll:
                poller = await DaemonProcess.start(
                    _discover_config(work["poll"], sockets["poll"]), work["poll"], POLL_MODULE
                )
                daemons.append(poller)
                await poller.until_connected(vms, connect_timeout_s)
            await asyncio.sleep(0.5)  # let the last sessions' start-up work finish
            rss = rss_bytes(daemon.pid)
            idle, pcts = await idle_cpu_pct(daemons, idle_s)
            for d in daemons:
                await d.stop()
        finally:
            for d in daemons:
                await d.kill()
            for server in servers:
                await server.close()
    return DiscoverScale(
        vms=vms,
        connected=connected,
        connect_s=connected_at - daemon.began,
        connect_after_start_s=connected_at - (daemon.tail.started_at or daemon.began),
        rss_mib=rss / MIB,
        idle_s=idle,
        idle_cpu_pct=pcts[0],
        poll_connected=len(daemons[1].tail.connected) if poll else None,
        poll_idle_cpu_pct=pcts[1] if poll else None,
        exit_status=daemon.proc.returncode,
        stopped_cleanly=daemon.stopped_cleanly,
    )


def _private_bytes(pid: int) -> int:
    """Memory only this process holds (Private_Clean + Private_Dirty of smaps_rollup)."""
    total = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


class _DialIns:
    """Fake QEMUs (`bench.dialin`), a process each, dialing in to `sock`; synchronous."""

    def __init__(self, qemu: Path, sock: Path, names: list[str]) -> None:
        self.argv = [str(qemu), "-I", "-S", str(ROOT / "bench" / "dialin.py"), str(sock)]
        self.names = names
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, timeout_s: float) -> None:
        """Start them all and wait until each has said it is up."""
        up_r, up_w = os.pipe()
        try:
            try:
                for name in self.names:
                    self.procs.append(
                        subprocess.Popen(
                            [*self.argv, "-name", name], stdin=subprocess.DEVNULL, stdout=up_w
                        )
                    )
            finally:
                os.close(up_w)
            up = _count_lines(up_r, len(self.names), timeout_s)
        finally:
            os.close(up_r)
        if up < len(self.names):
            raise RuntimeError(f"only {up} of {len(self.names)} fake QEMUs started")

    def private_bytes(self) -> int:
        return sum(_private_bytes(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait()


def _count_lines(fd: int, count: int, timeout_s: float) -> int:
    """Read lines from `fd` until `count` have come (or the time is up); how many came."""
    seen = 0
    deadline = time.monotonic() + timeout_s
    while seen < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        data = os.read(fd, 65536)
        if not data:
            break
        seen += data.count(b"\n")
    return seen


async def run_listen(vms: int, idle_s: float, connect_timeout_s: float = 60.0) -> ListenScale:
    names = [f"vm{i:04d}" for i in range(vms)]
    with tempfile.TemporaryDirectory(prefix="qwb-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        sock = workdir / "qmp.sock"
        fakes = _DialIns(qemu_lookalike(workdir / "qemu"), sock, names)
        daemon: DaemonProcess | None = None
        try:
            await asyncio.to_thread(fakes.start, 120.0)
            fakes_private = fakes.private_bytes()
            cfg = config_file(workdir, ["[[listen]]", f"socket = {json.dumps(str(sock))}"])
            daemon = await DaemonProcess.start(cfg, workdir)
            connected_at = await daemon.until_connected(vms, connect_timeout_s)
            listening_at = daemon.tail.first_seen.get("listening", daemon.began)
            connected = set(daemon.tail.connected)
            await asyncio.sleep(0.5)
            rss = rss_bytes(daemon.pid)
            idle, (idle_pct,) = await idle_cpu_pct([daemon], idle_s)
            status = await daemon.stop()
        finally:
            if daemon is not None:
                await daemon.kill()
            await asyncio.to_thread(fakes.stop)
    counts = daemon.tail.counts
    return ListenScale(
        vms=vms,
        connected=len(connected),
        identified=connected == set(names),
        refused=counts["listen_peer_refused"] + counts["listen_name_conflict"],
        connect_s=connected_at - daemon.began,
        connect_after_listening_s=connected_at - listening_at,
        rss_mib=rss / MIB,
        fakes_private_mib=fakes_private / MIB,
        idle_s=idle,
        idle_cpu_pct=idle_pct,
        exit_status=status,
        stopped_cleanly=daemon.stopped_cleanly,
    )
