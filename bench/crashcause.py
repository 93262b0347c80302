"""Crash-cause latency: a QEMU's death by the OOM killer -> the vm_crashed alert naming it.

A real QEMU (qmpwatch.lab) in a throwaway memory cgroup of 256 MiB (v1 or v2,
tests/support/memcg.py), the real daemon (`python -m qmpwatch run`), and per trial a QMP
`object-add` of 1 GiB of preallocated RAM: the kernel OOM-kills QEMU. Latency = the `alert`
record's timestamp (when the daemon raised vm_crashed, with its cause) - the kernel's own
timestamp of its `Killed process PID` line (/dev/kmsg, CLOCK_MONOTONIC, turned into the
realtime clock). Needs root (the cgroup, /dev/kmsg). A new QEMU on the same socket per trial.

    python -m bench.crashcause [--trials 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from qmpwatch.lab import LabSpec, LabVM
from tests.support.memcg import MemoryCgroup

LIMIT = 256 << 20
BALLOON = 1 << 30


def killed_at(pid: int) -> float | None:
    """The kernel's timestamp (CLOCK_MONOTONIC seconds) of `Killed process PID`."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    found = None
    try:
        while True:
            try:
                raw = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                return found
            except BrokenPipeError:
                continue
            head, _, message = raw.partition(";")
            if re.search(rf"Killed process {pid} \(", message):
                found = int(head.split(",")[2]) / 1e6
    finally:
        os.close(fd)


class Daemon:
    """`qmpwatch run` and its JSON records."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            with contextlib.suppress(orjson.JSONDecodeError):
                self.records.append(orjson.loads(line))
                self.changed.set()

    async def wait(self, after: int, event: str, **match: Any) -> dict[str, Any]:
        async with asyncio.timeout(30):
            while True:
                for r in self.records[after:]:
                    if r.get("event") == event and all(r.get(k) == v for k, v in match.items()):
                        return r
                self.changed.clear()
                await self.changed.wait()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def measure(trials: int, workdir: Path) -> list[float]:
    sock = workdir / "oom.qmp"
    cfg = workdir / "c.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{workdir / "state"}"\nmetrics_listen = ""\n'
        "[connect]\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.2\n"
        f'[[vm]]\nname = "oom"\nsocket = "{sock}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", "run", "-c", str(cfg), stdout=asyncio.subprocess.PIPE
    )
    daemon = Daemon(proc)
    latencies: list[float] = []
    try:
        for trial in range(trials):
            group = MemoryCgroup.make(LIMIT)
            try:
                mark = len(daemon.records)
                async with LabVM.start(LabSpec(name="oom"), workdir, watch_socket=sock) as vm:
                    group.add(vm.pid)
                    await daemon.wait(mark, "vm_connected", vm="oom")
                    mark = len(daemon.records)
                    args = {"qom-type": "memory-backend-ram", "id": "m", "size": BALLOON,
                            "prealloc": True}  # fmt: skip
                    with contextlib.suppress(Exception):
                        await vm.execute("object-add", args, timeout=30)
                    await vm.wait_exit(30)
                    offset = time.time() - time.monotonic()
                    alert = await daemon.wait(mark, "alert", alert="vm_crashed")
                    died = killed_at(vm.pid)
            finally:
                group.remove()
            cause = alert["details"].get("crash_cause")
            if died is None or cause != "oom_kill":
                print(f"trial {trial}: cause {cause}, kernel line {died}", file=sys.stderr)
                continue
            latency = _epoch(alert["timestamp"]) - (died + offset)
            latencies.append(latency)
            print(f"trial {trial}: {latency * 1000:.1f} ms: {alert['summary']}", file=sys.stderr)
    finally:
        proc.terminate()
        await proc.wait()
        daemon.reader.cancel()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="qw-oom-"))
    try:
        latencies = asyncio.run(measure(args.trials, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if len(latencies) < args.trials:
        print(f"only {len(latencies)} of {args.trials} trials named the OOM kill", file=sys.stderr)
        return 1
    ms = sorted(x * 1000 for x in latencies)
    print(
        f"OOM kill -> vm_crashed with its cause, {len(ms)} kills: "
        f"median {statistics.median(ms):.1f} ms, worst {ms[-1]:.1f} ms, best {ms[0]:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
