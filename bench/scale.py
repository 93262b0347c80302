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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import ROOT
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


def config_file(workdir: Path, sections: list[str]) -> Path:
    """`workdir`/cfg.toml: JSON log to `workdir`/qmpwatch.log, a state directory, /metrics on
    a free port, then `sections` (TOML lines)."""
    lines = [
        "[daemon]",
        f"log_file = {json.dumps(str(workdir / 'qmpwatch.log'))}",
        f"state_dir = {json.dumps(str(workdir / 'state'))}",
        f'metrics_listen = "127.0.0.1:{_free_port()}"',
        'api_socket = ""',
        "",
        *sections,
    ]
    path = workdir / "cfg.toml"
    path.write_text("\n".join(lines))
    return path


def _config(server: FakeQmp, vms: int, workdir: Path) -> Path:
    sections = []
    for i in range(vms):
        name = server.name(i)
        sections += [
            "[[vm]]",
            f'name = "{name}"',
            f"socket = {json.dumps(str(server.socket(name)))}",
            "",
        ]
    return config_file(workdir, sections)


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
        self.counts: Counter[str] = Counter()  # records by `event`
        self.first_seen: dict[str, float] = {}  # `event` -> when its first record was read

    def poll(self) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset += len(data)
            *lines, self.rest = (self.rest + data).split(b"\n")
            for line in lines:
                record = json.loads(line)
                self.last_event = record["event"]
                self.counts[self.last_event] += 1
                self.first_seen.setdefault(self.last_event, time.monotonic())
                if record["event"] == "vm_connected":
                    self.connected.add(record["vm"])
                elif record["event"] == "daemon_started" and self.started_at is None:
                    self.started_at = time.monotonic()
                    if self.pid:
                        self.rss_at_start = rss_bytes(self.pid)


class DaemonProcess:
    """`python -m qmpwatch run -c CFG` as a child process, followed through its log and /proc.

    `module`: another entry point taking the same arguments (`bench.polling`)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, began: float) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.tail = _LogTail(log, proc.pid)
        self.began = began  # time.monotonic() just before the process was started

    @classmethod
    async def start(cls, cfg: Path, workdir: Path, module: str = "qmpwatch") -> DaemonProcess:
        began = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            "run",
            "-c",
            str(cfg),
            cwd=ROOT if module.startswith("bench.") else workdir,
        )
        return cls(proc, workdir / "qmpwatch.log", began)

    async def until_connected(self, count: int, timeout_s: float = 60.0) -> float:
        """Wait until `count` VMs have logged `vm_connected` (or the time is up, or the process
        ended); the time.monotonic() it was seen."""
        deadline = self.began + timeout_s
        while len(self.tail.connected) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.005 if self.tail.started_at is None else 0.02)
            self.tail.poll()
            if self.proc.returncode is not None:
                break
        return time.monotonic()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    async def stop(self) -> int | None:
        """SIGTERM, and its exit status (killed after 30 s)."""
        try:
            if self.proc.returncode is None:
                os.kill(self.pid, signal.SIGTERM)
            async with asyncio.timeout(30):
                await self.proc.wait()
        finally:
            await self.kill()
        self.tail.poll()
        return self.proc.returncode

    @property
    def stopped_cleanly(self) -> bool:
        return self.proc.returncode == 0 and self.tail.last_event == "daemon_stopped"

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def idle_cpu_pct(daemons: list[DaemonProcess], idle_s: float) -> tuple[float, list[float]]:
    """CPU of each daemon over the same `idle_s` seconds, in % of one core; (seconds, pcts)."""
    before = [d.cpu_seconds() for d in daemons]
    t0 = time.monotonic()
    await asyncio.sleep(idle_s)
    after = [d.cpu_seconds() for d in daemons]
    idle = time.monotonic() - t0
    return idle, [(b - a) / idle * 100 for a, b in zip(before, after, strict=True)]


async def run(vms: int, idle_s: float, connect_timeout_s: float = 60.0) -> Scale:
    with tempfile.TemporaryDirectory(prefix="qwb-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        server = await FakeQmp.start(workdir, vms)
        try:
            cfg = _config(server, vms, workdir)
            daemon = await DaemonProcess.start(cfg, workdir)
            try:
                connected_at = await daemon.until_connected(vms, connect_timeout_s)
                connected = len(daemon.tail.connected)
                await asyncio.sleep(0.5)  # let the last sessions' start-up work finish
                rss = rss_bytes(daemon.pid)
                idle, (idle_pct,) = await idle_cpu_pct([daemon], idle_s)
                rss_idle = rss_bytes(daemon.pid)
                peak = peak_rss_bytes(daemon.pid)
                status = await daemon.stop()
            finally:
                await daemon.kill()
        finally:
            await server.close()
    tail = daemon.tail
    return Scale(
        vms=vms,
        connected=connected,
        connect_s=connected_at - daemon.began,
        connect_after_start_s=connected_at - (tail.started_at or daemon.began),
        rss_mib=rss / MIB,
        rss_before_mib=tail.rss_at_start / MIB,
        rss_per_vm_kib=(rss - tail.rss_at_start) / max(1, connected) / 1024,
        rss_after_idle_mib=rss_idle / MIB,
        peak_rss_mib=peak / MIB,
        idle_s=idle,
        idle_cpu_pct=idle_pct,
        exit_status=status,
        stopped_cleanly=daemon.stopped_cleanly,
    )
