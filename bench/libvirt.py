"""`[[libvirt]]` against a socket session: qmpwatch's CPU per event and the latency from
QEMU's timestamp to the log line, on the same event mix from real QEMUs.

Two runs of the real daemon (`python -m qmpwatch run`, a subprocess), one per path:

- socket: a lab QEMU (`qmpwatch.lab`) with a monitor for the daemon (`[[vm]]`) and one that
  this process drives;
- libvirt: a transient domain of the libvirt lab (`qmpwatch.lab.libvirt`, a real libvirtd
  that this program starts and stops) watched through `[[libvirt]]`, driven through libvirt
  (`virDomainQemuMonitorCommand`: it taints the bench's domain, never a real one).

Each round sends a mix of commands, waiting for each answer: `lifecycle` is `system_reset`
x3, `stop`, `cont` (events RESET x3, STOP, RESUME: the STOP makes the daemon read the run
status and raise an alert that the RESUME resolves); `reset` is `system_reset` alone. Every
event is read in a loop turn of its own (nothing is batched), so the figures are the cost of
an event on a quiet host, not a flood's. CPU per event = the daemon's CPU time (all
threads, /proc schedstat) from the first command to the last event's log line, over the
events. Latency = a
`qmp_event` line's timestamp (when the daemon read the event; the line is written at the end
of that loop turn) - QEMU's timestamp of the event, both the host's realtime clock.

    python -m bench.libvirt [--rounds 400] [--mix lifecycle|reset|both]   (root: runs libvirtd)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import secrets
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procstat import cpu_seconds
from qmpwatch.lab import LabSpec, LabVM
from qmpwatch.lab.libvirt import LAB_PREFIX, URI, DomainSpec, LabDomain, LibvirtLab
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, Record, write_config

MIXES = {
    "lifecycle": ("system_reset", "system_reset", "system_reset", "stop", "cont"),
    "reset": ("system_reset",),  # the cheapest event for the daemon: the transport's cost shows
}


@dataclass(frozen=True)
class PathResult:
    path: str
    events: int
    cpu_us_per_event: float
    latency_ms: list[float]

    def line(self) -> str:
        lat = sorted(self.latency_ms)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (
            f"{self.path:8s} {self.events:6d} events  {self.cpu_us_per_event:7.1f} µs CPU/event  "
            f"latency median {statistics.median(lat):6.2f} ms  p99 {p99:6.2f} ms"
        )


def _when(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def _measure(
    path: str,
    daemon: DaemonProcess,
    vm: str,
    events: int,
    send: Callable[[], Awaitable[None]],
) -> PathResult:
    """Send the commands with `send`, wait for their `events`, and read the daemon's cost."""
    await daemon.wait_for("vm_connected", vm=vm, timeout=60)
    mark = daemon.mark()
    cpu0 = cpu_seconds(daemon.proc.pid)
    await send()
    await daemon.wait_for("qmp_event", vm=vm, after=mark, count=events, timeout=120)
    cpu = cpu_seconds(daemon.proc.pid) - cpu0
    logged: list[Record] = daemon.find("qmp_event", vm=vm, after=mark)
    latency = [(_when(r["timestamp"]) - _when(r["qemu_time"])) * 1000 for r in logged]
    return PathResult(path, len(logged), cpu / len(logged) * 1e6, latency)


async def socket_path(rounds: int, mix: tuple[str, ...], workdir: Path) -> PathResult:
    async with LabVM.start(LabSpec("bench-socket"), workdir) as vm:
        config = write_config(
            workdir / "socket.toml",
            state_dir=workdir / "socket-state",
            sections={"connect": FAST_CONNECT},
            vms=[{"name": "bench-socket", "socket": str(vm.watch_socket)}],
        )
        async with DaemonProcess.start(config) as daemon:

            async def send() -> None:
                for _ in range(rounds):
                    for command in mix:
                        await vm.execute(command)

            return await _measure("socket", daemon, "bench-socket", rounds * len(mix), send)


async def libvirt_path(
    rounds: int, mix: tuple[str, ...], lab: LibvirtLab, workdir: Path
) -> PathResult:
    import libvirt
    import libvirt_qemu

    name = f"{LAB_PREFIX}bench-{secrets.token_hex(3)}"
    await LabDomain(lab, DomainSpec(name)).create()
    config = write_config(
        workdir / "libvirt.toml",
        state_dir=workdir / "libvirt-state",
        sections={"connect": FAST_CONNECT},
        arrays={"libvirt": [{"uri": URI, "domains": [name]}]},
    )
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)

        def drive() -> None:
            for _ in range(rounds):
                for command in mix:
                    libvirt_qemu.qemuMonitorCommand(dom, f'{{"execute": "{command}"}}', 0)

        async with DaemonProcess.start(config) as daemon:

            async def send() -> None:
                await asyncio.to_thread(drive)  # the loop keeps reading the daemon's lines

            return await _measure("libvirt", daemon, name, rounds * len(mix), send)
    finally:
        conn.close()


async def run(rounds: int, mix: tuple[str, ...]) -> tuple[PathResult, PathResult]:
    with tempfile.TemporaryDirectory(prefix="qwb-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        socket_result = await socket_path(rounds, mix, workdir)
        (workdir / "lab").mkdir()
        with LibvirtLab.running(workdir / "lab") as lab:
            libvirt_result = await libvirt_path(rounds, mix, lab, workdir)
    return socket_result, libvirt_result


def report(mix_name: str, rounds: int, results: tuple[PathResult, PathResult]) -> None:
    socket_result, libvirt_result = results
    print(f"[[libvirt]] vs a socket session, mix {mix_name} ({' '.join(MIXES[mix_name])}), "
          f"{rounds} rounds each")  # fmt: skip
    for result in results:
        print("  " + result.line())
    extra_cpu = libvirt_result.cpu_us_per_event - socket_result.cpu_us_per_event
    extra_median = statistics.median(libvirt_result.latency_ms) - statistics.median(
        socket_result.latency_ms
    )
    print(
        f"  through libvirt: {extra_cpu:+.1f} µs CPU/event "
        f"({libvirt_result.cpu_us_per_event / socket_result.cpu_us_per_event:.2f}x), "
        f"{extra_median:+.2f} ms median latency"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400, help="rounds of the mix per path")
    parser.add_argument("--mix", choices=[*MIXES, "both"], default="both")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.libvirt: needs root (it runs libvirtd); skipped", file=sys.stderr)
        return 0
    for mix_name in MIXES if args.mix == "both" else [args.mix]:
        report(mix_name, args.rounds, asyncio.run(run(args.rounds, MIXES[mix_name])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
