"""Target 3: while one VM floods, a STOP on another is logged and alerted within 50 ms.

    python -m bench.fairness WORKDIR TRIALS FLOOD_EVENTS [--loop uvloop|asyncio]

prints one JSON object. The real daemon (`bench.inproc`) runs in this process, watching two
fake VMs (`vm0000` floods, `vm0001` is quiet) and delivering alerts to a webhook receiver in
the fake server's process. The fake server floods `vm0000` with back-to-back streams of
FLOOD_EVENTS events; TRIALS times, while a flood is under way (2-90 % of it written), it
sends a STOP on `vm0001` and a RESUME 100 ms later. A monitor client's pause: query-status
says `paused`, so the daemon raises `vm_stopped_unexpected`.

A trial's latency runs from the moment the server wrote the STOP (CLOCK_MONOTONIC, which the
two processes share) to the later of: the write() that put the STOP's `qmp_event` line into
the log file returned, and `AlertDispatcher.fire` (the hand-over to the outbox) returned.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import re
import statistics
import sys
import time
from pathlib import Path

import orjson

from bench import LOOPS, run_on
from bench.fakeqmp import FakeQmp
from bench.inproc import InProcessDaemon, config, timed_handover
from qmpwatch.core.alert import Alert

FLOOD, QUIET = "vm0000", "vm0001"


def nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (p99 of 100 values is the 99th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def measure(workdir: Path, trials: int, flood_events: int) -> dict[str, object]:
    server = await FakeQmp.start(workdir, 2, http=True)
    stop_lines: list[float] = []
    alerts: list[float] = []
    flooded = 0

    def on_fire(at: float, alert: Alert) -> None:
        if alert.vm == QUIET and alert.kind == "vm_stopped_unexpected":
            alerts.append(at)

    def on_flood_lines(now: float, data: bytes) -> None:
        nonlocal flooded
        flooded += data.count(b'"vm":"vm0000","qmp":')

    try:
        cfg = config(
            {FLOOD: server.socket(FLOOD), QUIET: server.socket(QUIET)},
            workdir / "state",
            webhook=f"http://127.0.0.1:{server.http_port}/alerts",
        )
        daemon = InProcessDaemon(cfg, workdir / "qmpwatch.log")
        connected: set[bytes] = set()
        both = asyncio.Event()

        def on_connected(now: float, data: bytes) -> None:
            connected.update(re.findall(rb'"event":"vm_connected","vm":"([^"]+)"', data))
            if len(connected) == 2:
                both.set()

        daemon.log.watch(b'"event":"vm_connected"', on_connected)
        daemon.log.watch(
            f'"vm":"{QUIET}","qmp":"STOP"'.encode(), lambda now, d: stop_lines.append(now)
        )
        daemon.log.watch(b'"vm":"vm0000","qmp":', on_flood_lines)
        with timed_handover(on_fire):
            daemon.start()
            await server.call("connected", count=2)
            async with asyncio.timeout(30):
                await both.wait()
            started = time.monotonic()
            answer = await server.call(
                "fairness",
                flood=FLOOD,
                quiet=QUIET,
                flood_events=flood_events,
                trials=trials,
                resume_after_s=0.1,
            )
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.2)  # the last RESUME and alert deliveries
            status = await daemon.stop()
    finally:
        await server.close()
    sent: list[float] = answer["sent_at"]
    latencies: list[float] = []
    logged_ms: list[float] = []
    alerted_ms: list[float] = []
    missing = 0
    for at in sent:
        i = bisect.bisect_left(stop_lines, at)
        j = bisect.bisect_left(alerts, at)
        if i == len(stop_lines) or j == len(alerts):
            missing += 1
            continue
        logged_ms.append((stop_lines[i] - at) * 1000)
        alerted_ms.append((alerts[j] - at) * 1000)
        latencies.append(max(stop_lines[i], alerts[j]) - at)
    ms = [v * 1000 for v in latencies]
    return {
        "trials": len(sent),
        "missing": missing,
        "floods": answer["floods"],
        "flood_events": flood_events,
        "flood_events_logged": flooded,
        "flood_rate_per_s": round(flooded / elapsed) if elapsed > 0 else 0,
        "p50_ms": statistics.median(ms) if ms else None,
        "p99_ms": nearest_rank(ms, 0.99) if ms else None,
        "max_ms": max(ms) if ms else None,
        "logged_p99_ms": nearest_rank(logged_ms, 0.99) if logged_ms else None,
        "alerted_p99_ms": nearest_rank(alerted_ms, 0.99) if alerted_ms else None,
        "daemon_exit": status,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness")
    parser.add_argument("workdir", type=Path)
    parser.add_argument("trials", type=int)
    parser.add_argument("flood_events", type=int)
    parser.add_argument("--loop", choices=LOOPS, default="uvloop")
    args = parser.parse_args()
    coro = measure(args.workdir, args.trials, args.flood_events)
    result = run_on(args.loop, coro)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
