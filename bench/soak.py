"""Soak: 20 real QEMU VMs, a scripted mix of every scenario, for 10 minutes (`make soak`).

The real daemon (`python -m qmpwatch run`, one `[[discover]]` glob) watches every VM while
each VM's own loop drives it through stop/cont, host and guest resets, clock writes, disk
I/O errors that pause it, watchdog pauses, and kill -9 followed by a new QEMU on the same
socket. At the end, for every VM, the daemon's `qmp_event` records must equal exactly what
QEMU broadcast to the control monitor (every event, once), every crash must have been
reported once, and the daemon's RSS and open fds must be flat.

    python -m bench.soak [--vms 20] [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import shutil
import tempfile
import time
from pathlib import Path

from qmpwatch.lab import BlkdebugSpec, LabSpec, LabVM
from tests.support.daemon_harness import DaemonProcess, write_config


def _proc_figures(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open fds) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


class VmRun:
    """One VM's life in the soak: several QEMU processes in a row on one socket."""

    def __init__(self, name: str, sock_dir: Path, rng: random.Random) -> None:
        self.name = name
        self.socket = sock_dir / f"{name}.qmp"
        self.rng = rng
        self.emitted: collections.Counter[tuple[str, float]] = collections.Counter()
        self.crashes = 0
        self.actions: collections.Counter[str] = collections.Counter()

    def spec(self) -> LabSpec:
        return LabSpec(
            name=self.name,
            watchdog_action="pause",
            blkdebug=BlkdebugSpec(errno=28, sector=8, once=True),
        )

    async def run(self, daemon: DaemonProcess, workdir: Path, until: float) -> None:
        while time.monotonic() < until:
            mark = daemon.mark()
            vm = await LabVM.launch(self.spec(), workdir, watch_socket=self.socket)
            try:
                await daemon.wait_for("vm_connected", vm=self.name, after=mark, timeout=30)
                await self._drive(vm, until)
            finally:
                if vm.running and self.rng.random() < 0.5:
                    self.actions["quit"] += 1
                    await vm.quit()
                if vm.running:
                    self.crashes += 1
                    self.actions["kill"] += 1
                    await vm.kill()
                self.emitted.update((e.name, round(e.qemu_time, 6)) for e in vm.event_log)
                await daemon.wait_for("vm_disconnected", vm=self.name, after=mark, timeout=30)
                await vm.aclose()

    async def _drive(self, vm: LabVM, until: float) -> None:
        io_error_used = False
        for _ in range(self.rng.randint(5, 25)):
            if time.monotonic() >= until:
                return
            choice = self.rng.choice(
                ["pause", "reset", "guest_reset", "rtc", "io_error", "watchdog"]
            )
            if choice == "io_error" and io_error_used:
                choice = "pause"
            self.actions[choice] += 1
            mark = vm.mark()
            if choice == "pause":
                await vm.stop()
                await vm.cont()
            elif choice == "reset":
                await vm.system_reset()
                await vm.wait_event("RESET", after=mark)
            elif choice == "guest_reset":
                await vm.guest_reset()
                await vm.wait_event("RESET", after=mark)
            elif choice == "rtc":
                await vm.rtc_change(self.rng.randint(0, 99))
                await vm.wait_event("RTC_CHANGE", after=mark, timeout=5)
            elif choice == "io_error":
                io_error_used = True
                await vm.ata_read_sector(8)
                await vm.wait_event("STOP", after=mark)
                await vm.cont()
            elif choice == "watchdog":
                await vm.arm_watchdog(0)
                await vm.wait_event("STOP", after=mark)
                await vm.cont()
            await asyncio.sleep(self.rng.uniform(0.05, 0.5))


async def soak(vms: int, minutes: float, workdir: Path, seed: int) -> int:
    sock_dir = Path(tempfile.mkdtemp(prefix="qw-soak-", dir="/tmp"))
    rng = random.Random(seed)
    runs = [VmRun(f"soak{i:02d}", sock_dir, random.Random(rng.random())) for i in range(vms)]
    cfg = write_config(
        workdir / "c.toml",
        state_dir=workdir / "state",
        discover=[{"glob": str(sock_dir / "*.qmp")}],
    )
    try:
        async with DaemonProcess.start(cfg) as daemon:
            pid = daemon.proc.pid
            until = time.monotonic() + minutes * 60
            warm: tuple[int, int] | None = None

            async def sample() -> None:
                nonlocal warm
                await asyncio.sleep(min(30.0, minutes * 60 / 4))
                warm = _proc_figures(pid)

            sampler = asyncio.create_task(sample())
            await asyncio.gather(*(run.run(daemon, workdir, until) for run in runs))
            await sampler
            end = _proc_figures(pid)
            failures = 0
            for run in runs:
                logged = collections.Counter(
                    (r["qmp"], _epoch(r["qemu_time"]))
                    for r in daemon.find("qmp_event", vm=run.name)
                )
                if logged != run.emitted:
                    failures += 1
                    missing, extra = run.emitted - logged, logged - run.emitted
                    print(f"{run.name}: MISMATCH missing={missing} extra={extra}")
                crashes = len(daemon.find("alert", vm=run.name, alert="vm_crashed"))
                if (
                    len(daemon.find("vm_disconnected", vm=run.name, cause="shutdown"))
                    != run.actions["quit"]
                ):
                    failures += 1
                    print(f"{run.name}: clean exits do not match {run.actions['quit']} quits")
                if crashes != run.crashes:
                    failures += 1
                    print(f"{run.name}: {crashes} vm_crashed alerts for {run.crashes} kills")
            emitted = sum(sum(r.emitted.values()) for r in runs)
            logged_total = len(daemon.find("qmp_event"))
            actions = sum((r.actions for r in runs), collections.Counter[str]())
            assert warm is not None
            print(
                f"soak: {vms} VMs, {minutes:g} min, seed {seed}: QEMU emitted {emitted} events, "
                f"the daemon logged {logged_total}; {sum(r.crashes for r in runs)} crashes; "
                f"actions {dict(actions)}"
            )
            print(
                f"daemon RSS {warm[0] / 1024:.1f} MiB after warm-up -> {end[0] / 1024:.1f} MiB at "
                f"the end; open fds {warm[1]} -> {end[1]}"
            )
            bad = [
                r for r in daemon.records if r["event"] in ("internal_error", "qmp_decode_error")
            ]
            if bad:
                failures += 1
                print(f"unexpected records: {bad[:5]}")
            print("soak: PASS" if failures == 0 else f"soak: FAIL ({failures} problems)")
            return 0 if failures == 0 else 1
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _epoch(iso: str) -> float:
    from datetime import datetime

    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp(), 6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="qmpwatch-soak-"))
    try:
        return asyncio.run(soak(args.vms, args.minutes, workdir, args.seed))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
