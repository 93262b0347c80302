"""Target 2: one `qmpwatch run` process watching 1,000 VMs.

The fake server serves `vms` sockets; the daemon is the real command line
(`python -m qmpwatch run -c cfg.toml`, JSON log to a file, state directory, the
/metrics + /healthz endpoint on a free port), started as a child process. Measured from
outside through /proc and its log:

- connect: seconds from starting the process (interpreter start-up and imports included)
  until the log holds a `vm_connected` line for every VM; also from `daemon_started`;
- RSS of the daemon process once all are connected, and after the idle period;
- idle CPU: CPU time of the daemon's threads (schedstat, nanoseconds) over `idle_s` seconds
  with every session up and no events, as a percentage of one core.

Then SIGTERM, and the daemon must exit 0 with `daemon_stopped` as its last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.fakeqmp import FakeQmp
from bench.procstat import MIB, cpu_seconds, peak_rss_bytes, rss_bytes


@dataclass
class Scale:
    vms: int
    connected: int
    connect_s: float  # from process start
    connect_after_start_s: float  # from the daemon_started record
    rss_mib: float
    rss_before_mib: float  # when daemon_started appeared, before sessions (roughly)
    rss_per_vm_kib: float
    rss_after_idle_mib: float
    peak_rss_mib: float
    idle_s: float
    idle_cpu_pct: float
    exit_status: int | None
    stopped_cleanly: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(server: FakeQmp, vms: int, workdir: Path) -> Path:
    lines = [
        "[daemon]",
        f"log_file = {json.dumps(str(workdir / 'qmpwatch.log'))}",
        f"state_dir = {json.dumps(str(workdir / 'state'))}",
        f'metrics_listen = "127.0.0.1:{_free_port()}"',
        "",
    ]
    for i in range(vms):
        name = server.name(i)
        lines += [
            "[[vm]]",
            f'name = "{name}"',
            f"socket = {json.dumps(str(server.socket(name)))}",
            "",
        ]
    path = workdir / "cfg.toml"
    path.write_text("\n".join(lines))
    return path


class _LogTail:
    """Reads the daemon's log as it grows."""

    def __init__(self, path: Path, pid: int = 0) -> None:
        self.pid = pid
        self.rss_at_start = 0
        self.path = path
        self.offset = 0
        self.rest = b""
        self.connected: set[str] = set()
        self.started_at: float | None = None
        self.last_event = ""

    def poll(self) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset += len(data)
            *lines, self.rest = (self.rest + data).split(b"\n")
            for line in lines:
                record = json.loads(line)
                self.last_event = record["event"]
                if record["event"] == "vm_connected":
                    self.connected.add(record["vm"])
                elif record["event"] == "daemon_started" and self.started_at is None:
                    self.started_at = time.monotonic()
                    if self.pid:
                        self.rss_at_start = rss_bytes(self.pid)


async def run(vms: int, idle_s: float, connect_timeout_s: float = 60.0) -> Scale:
    with tempfile.TemporaryDirectory(prefix="qwb-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        server = await FakeQmp.start(workdir, vms)
        try:
            cfg = _config(server, vms, workdir)
            began = time.monotonic()
            daemon = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qmpwatch", "run", "-c", str(cfg), cwd=workdir
            )
            tail = _LogTail(workdir / "qmpwatch.log", daemon.pid)
            try:
                deadline = began + connect_timeout_s
                while len(tail.connected) < vms and time.monotonic() < deadline:
                    await asyncio.sleep(0.005 if tail.started_at is None else 0.02)
                    tail.poll()
                    if daemon.returncode is not None:
                        break
                connected_at = time.monotonic()
                connected = len(tail.connected)
                await asyncio.sleep(0.5)  # let the last sessions' start-up work finish
                rss = rss_bytes(daemon.pid)
                cpu0 = cpu_seconds(daemon.pid)
                t0 = time.monotonic()
                await asyncio.sleep(idle_s)
                cpu1 = cpu_seconds(daemon.pid)
                idle = time.monotonic() - t0
                rss_idle = rss_bytes(daemon.pid)
                peak = peak_rss_bytes(daemon.pid)
                os.kill(daemon.pid, signal.SIGTERM)
                async with asyncio.timeout(30):
                    status = await daemon.wait()
            finally:
                if daemon.returncode is None:
                    daemon.kill()
                    await daemon.wait()
            tail.poll()
        finally:
            await server.close()
    return Scale(
        vms=vms,
        connected=connected,
        connect_s=connected_at - began,
        connect_after_start_s=connected_at - (tail.started_at or began),
        rss_mib=rss / MIB,
        rss_before_mib=tail.rss_at_start / MIB,
        rss_per_vm_kib=(rss - tail.rss_at_start) / max(1, connected) / 1024,
        rss_after_idle_mib=rss_idle / MIB,
        peak_rss_mib=peak / MIB,
        idle_s=idle,
        idle_cpu_pct=(cpu1 - cpu0) / idle * 100,
        exit_status=status,
        stopped_cleanly=status == 0 and tail.last_event == "daemon_stopped",
    )
