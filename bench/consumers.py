"""The consumers of the throughput run, each measuring its own CPU time per event.

    python -m bench.consumers MODE SOCKET WORKDIR SEGMENTS [--loop uvloop|asyncio]

A consumer gets its session up and prints `{"ready": true}`; the runner then has the fake
server stream a segment of events ending with POWERDOWN (the end mark). The consumer counts
`time.process_time()` of its own process from "ready" until the end mark is handled and
prints `{"events": N, "cpu_s": S}`; then "ready" again for the next segment, SEGMENTS times.
Between segments it runs `gc.collect()` (outside the measurement) and stays connected, except
`stock`, which takes a fresh client per segment (qemu.qmp keeps every event it delivered).

    floor     asyncio readline + orjson.loads, nothing else
    stock     a plain qemu.qmp QMPClient: `async for event in qmp.events`, doing nothing
    qmpwatch  the real daemon in this process (`bench.inproc`), as `qmpwatch run` wires it:
              WatchClient, decoder, VmWatch (handlers, tracker), a JSON log line written to a
              file, and every event and record also counted in the Prometheus metrics; a
              segment ends when the POWERDOWN line has been written
    path      the same daemon with the metrics' observers made no-ops: the per-event path
              issue 6 names (decode, handlers, tracker, a JSON log line written to a file)
    listen    the daemon as wired (as `qmpwatch`), its VM dialing in: SOCKET is a `[[listen]]`
              socket the daemon makes, and the fake server connects to it (`bench.fakeqmp`'s
              `dial`, as a process that looks like QEMU)
    client    WatchClient alone, events dropped (the protocol layer's share, for profiling)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from bench import LOOPS, run_on
from bench.stream import END_EVENT

READ_LIMIT = 8 * 1024 * 1024  # the line limit WatchClient uses, for the floor's StreamReader


class Segments:
    """Says ready, measures a segment, reports it; `segments` times."""

    def __init__(self, segments: int) -> None:
        self.left = segments
        self.started = 0.0
        self.seen = 0

    def ready(self) -> None:
        gc.collect()
        self.seen = 0
        _say({"ready": True})
        self.started = time.process_time()

    def done(self, end: float | None = None) -> bool:
        """The end mark was handled (at `end`, or now): report; True after the last segment."""
        cpu = (time.process_time() if end is None else end) - self.started
        _say({"events": self.seen, "cpu_s": cpu})
        self.left -= 1
        return self.left <= 0


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


async def floor(socket: Path, workdir: Path, seg: Segments) -> None:
    reader, writer = await asyncio.open_unix_connection(str(socket), limit=READ_LIMIT)
    await reader.readline()  # greeting
    writer.write(b'{"execute": "qmp_capabilities"}\r\n')
    await reader.readline()
    seg.ready()
    while True:
        line = await reader.readline()
        if not line:
            raise EOFError("stream ended early")
        obj = orjson.loads(line)
        if "event" in obj:
            seg.seen += 1
            if obj["event"] == END_EVENT:
                if seg.done():
                    break
                seg.ready()
    writer.close()


async def stock(socket: Path, workdir: Path, seg: Segments) -> None:
    from qemu.qmp import QMPClient

    while True:
        qmp = QMPClient("bench")
        await qmp.connect(str(socket))
        await qmp.execute("query-version")
        seg.ready()
        async for event in qmp.events:
            seg.seen += 1
            if event["event"] == END_EVENT:
                break
        last = seg.done()
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        del qmp
        if last:
            break


async def qmpwatch(socket: Path, workdir: Path, seg: Segments, *, listen: bool = False) -> None:
    from bench.inproc import InProcessDaemon, config

    log_path = workdir / "qmpwatch.log"
    if listen:
        cfg = config({}, workdir / "state", listen=(socket,))
    else:
        cfg = config({"bench": socket}, workdir / "state")
    daemon = InProcessDaemon(cfg, log_path)
    connected = asyncio.Event()
    done = asyncio.Event()
    daemon.log.watch(b'"event":"vm_connected"', lambda now, data: connected.set(), once=True)
    daemon.log.watch(f'"qmp":"{END_EVENT}"'.encode(), lambda now, data: done.set())
    daemon.start()
    await connected.wait()
    logged = _Counter(log_path)
    while True:
        seg.ready()
        await done.wait()
        end = time.process_time()
        done.clear()
        seg.seen = logged.new_events()
        if seg.done(end):
            break
    logged.close()
    if await daemon.stop() != 0:
        raise RuntimeError("the daemon did not stop cleanly")


class _Counter:
    """Counts the qmp_event lines a log file gained since the last call."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.file.seek(0, 2)

    def new_events(self) -> int:
        return self.file.read().count(b'"event":"qmp_event"')

    def close(self) -> None:
        self.file.close()


def _no_observation(self: object, vm: str, kind: str, fields: object, now: float) -> None:
    return None


def _no_event(self: object, event: object, now: float) -> None:
    return None


async def path(socket: Path, workdir: Path, seg: Segments) -> None:
    from qmpwatch.service.metrics import EventMeter, Metrics

    setattr(Metrics, "observe_record", _no_observation)  # noqa: B010 - this variant's point
    setattr(EventMeter, "observe", _no_event)  # noqa: B010
    await qmpwatch(socket, workdir, seg)


async def listen(socket: Path, workdir: Path, seg: Segments) -> None:
    await qmpwatch(socket, workdir, seg, listen=True)


async def client(socket: Path, workdir: Path, seg: Segments) -> None:
    from qmpwatch.sources.qmpclient import WatchClient

    done = asyncio.Event()

    def on_event(obj: dict[str, Any], now: float) -> None:
        seg.seen += 1
        if obj["event"] == END_EVENT:
            done.set()

    watch = WatchClient("bench", on_event=on_event)
    await watch.connect(str(socket))
    await watch.execute("query-version")
    while True:
        seg.ready()
        await done.wait()
        done.clear()
        if seg.done():
            break
    with contextlib.suppress(Exception):
        await watch.disconnect()


MODES: dict[str, Callable[[Path, Path, Segments], Coroutine[Any, Any, None]]] = {
    "floor": floor,
    "stock": stock,
    "qmpwatch": qmpwatch,
    "path": path,
    "listen": listen,
    "client": client,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.consumers")
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("socket", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("segments", type=int)
    parser.add_argument("--loop", choices=LOOPS, default="uvloop")
    args = parser.parse_args()
    coro = MODES[args.mode](args.socket, args.workdir, Segments(args.segments))
    run_on(args.loop, coro)


if __name__ == "__main__":
    main()
