"""Target 4: a million events through one session leave RSS where it started (within 10 MiB).

    python -m bench.memory WORKDIR EVENTS [--loop uvloop|asyncio]

prints one JSON object. The real daemon (`bench.inproc`) runs in this process and watches one
fake VM. Once its session is up, RSS is read (`start`); the fake server streams EVENTS events
of the storm mix and the end mark; RSS is sampled every 100 ms meanwhile (`peak`) and read
again once the end mark's line is written (`end`, and `settled` half a second later).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import time
from pathlib import Path

import orjson

from bench import LOOPS, run_on
from bench.fakeqmp import FakeQmp
from bench.inproc import InProcessDaemon, config
from bench.procstat import MIB, rss_bytes
from bench.stream import END_EVENT


async def measure(workdir: Path, events: int) -> dict[str, object]:
    server = await FakeQmp.start(workdir, 1)
    try:
        vm = server.name(0)
        daemon = InProcessDaemon(
            config({vm: server.socket(vm)}, workdir / "state"), workdir / "qmpwatch.log"
        )
        connected = asyncio.Event()
        done = asyncio.Event()
        daemon.log.watch(b'"event":"vm_connected"', lambda now, data: connected.set(), once=True)
        daemon.log.watch(f'"qmp":"{END_EVENT}"'.encode(), lambda now, data: done.set(), once=True)
        daemon.start()
        async with asyncio.timeout(30):
            await connected.wait()
        await asyncio.sleep(0.2)
        gc.collect()
        start = rss_bytes()
        peak = start
        samples: list[int] = []

        async def sample() -> None:
            nonlocal peak
            while True:
                await asyncio.sleep(0.1)
                now = rss_bytes()
                samples.append(now)
                peak = max(peak, now)

        sampler = asyncio.create_task(sample())
        began = time.monotonic()
        await server.call("stream", vm=vm, count=events, seed=3, end=True)
        async with asyncio.timeout(600):
            await done.wait()
        elapsed = time.monotonic() - began
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        gc.collect()
        end = rss_bytes()
        await asyncio.sleep(0.5)
        gc.collect()
        settled = rss_bytes()
        status = await daemon.stop()
    finally:
        await server.close()
    logged = _events_logged(workdir / "qmpwatch.log")
    return {
        "events": events,
        "events_logged": logged,
        "seconds": round(elapsed, 2),
        "start_mib": start / MIB,
        "end_mib": end / MIB,
        "settled_mib": settled / MIB,
        "peak_mib": peak / MIB,
        "growth_mib": (end - start) / MIB,
        "daemon_exit": status,
    }


def _events_logged(log: Path) -> int:
    """qmp_event lines in the log, which is then removed (a few hundred MB)."""
    with open(log, "rb") as f:
        logged = sum(1 for line in f if b'"event":"qmp_event"' in line)
    log.unlink()
    return logged


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("workdir", type=Path)
    parser.add_argument("events", type=int)
    parser.add_argument("--loop", choices=LOOPS, default="uvloop")
    args = parser.parse_args()
    coro = measure(args.workdir, args.events)
    result = run_on(args.loop, coro)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
