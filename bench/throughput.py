"""Target 1: CPU per event of the floor, stock qemu.qmp and qmpwatch, on the same stream.

One fake server process serves one socket per consumer. Every consumer (`bench.consumers`)
runs in a process of its own for the whole run and gets its session up; then, round after
round, the server streams the same segment (same seed, same bytes: `events` events and the
end mark) to each consumer in turn, and each reports the CPU time the segment cost it. The
order rotates every round. A ratio is taken within a round, where the consumers ran seconds
apart, and the median over the rounds is reported: machine noise that comes and goes (other
guests on the host, frequency changes) moves the consumers of one round together.

With two or more CPUs the fake server runs on the last one and the consumers on the others,
so the producer never competes with the measured process.

`listen` is the daemon as wired (`qmpwatch`) with its VM dialing in to a `[[listen]]` socket:
the fake server, started as a process that looks like QEMU, connects to the consumer's socket,
and streams the same bytes through that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import ROOT
from bench.fakeqmp import FakeQmp

MODES = ("floor", "stock", "path", "qmpwatch", "listen")


@dataclass
class Throughput:
    events: int
    mix: str
    loop: str
    per_event_us: dict[str, list[float]] = field(default_factory=dict)  # mode -> per round

    def median_us(self, mode: str) -> float:
        return statistics.median(self.per_event_us[mode])

    def ratios(self, over: str, under: str) -> list[float]:
        """`over` / `under` in each round."""
        return [
            a / b for a, b in zip(self.per_event_us[over], self.per_event_us[under], strict=True)
        ]

    def vs_floor(self, mode: str = "path") -> float:
        """`mode` / floor, median over rounds: at most 5 is the target."""
        return statistics.median(self.ratios(mode, "floor"))

    def stock_over(self, mode: str = "path") -> float:
        """stock / `mode`, median over rounds: at least 5 is the target."""
        return statistics.median(self.ratios("stock", mode))

    def listen_over_dial(self) -> float:
        """A session dialed in (`listen`) / a dialed one (`qmpwatch`), median over rounds."""
        return statistics.median(self.ratios("listen", "qmpwatch"))


def _pin(pid: int, cpus: set[int]) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(pid, cpus)


class _Consumer:
    def __init__(self, mode: str, proc: asyncio.subprocess.Process) -> None:
        self.mode = mode
        self.proc = proc

    async def line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"consumer {self.mode} exited (status {await self.proc.wait()})")
        answer: dict[str, Any] = orjson.loads(raw)
        return answer


async def run(
    events: int,
    rounds: int,
    *,
    mix: str = "storm",
    loop: str = "uvloop",
    modes: tuple[str, ...] = MODES,
) -> Throughput:
    out = Throughput(events, mix, loop, {m: [] for m in modes})
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpus = {cpus[-1]} if len(cpus) >= 2 else set(cpus)
    consumer_cpus = set(cpus[:-1]) if len(cpus) >= 2 else set(cpus)
    with tempfile.TemporaryDirectory(prefix="qwb-", dir="/tmp") as tmp:
        directory = Path(tmp)
        server = await FakeQmp.start(
            directory, len(modes), qemu_name="bench-listen" if "listen" in modes else ""
        )
        _pin(server.proc.pid, server_cpus)
        consumers: list[_Consumer] = []
        try:
            for i, mode in enumerate(modes):
                workdir = directory / mode
                workdir.mkdir()
                # `listen` makes its socket; the others connect to the server's
                sock = workdir / "qmp.sock" if mode == "listen" else server.socket(server.name(i))
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.consumers",
                    mode,
                    str(sock),
                    str(workdir),
                    str(rounds),
                    "--loop",
                    loop,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=ROOT,
                )
                _pin(proc.pid, consumer_cpus)
                consumers.append(_Consumer(mode, proc))
                if mode == "listen":
                    await server.call("dial", vm=server.name(i), socket=str(sock))
            for r in range(rounds):
                shift = r % len(consumers)
                for i, consumer in [*enumerate(consumers)][shift:] + [*enumerate(consumers)][
                    :shift
                ]:
                    await consumer.line(60)  # ready
                    await server.call(
                        "stream", vm=server.name(i), count=events, seed=1, end=True, mix=mix
                    )
                    result = await consumer.line(600)
                    if result["events"] != events + 1:
                        raise RuntimeError(
                            f"{consumer.mode} saw {result['events']} events, sent {events + 1}"
                        )
                    out.per_event_us[consumer.mode].append(result["cpu_s"] / (events + 1) * 1e6)
            for consumer in consumers:
                async with asyncio.timeout(60):
                    if await consumer.proc.wait() != 0:
                        raise RuntimeError(f"consumer {consumer.mode} failed")
        finally:
            for consumer in consumers:
                if consumer.proc.returncode is None:
                    consumer.proc.kill()
                    await consumer.proc.wait()
            await server.close()
    return out
