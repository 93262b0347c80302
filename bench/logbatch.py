"""CPU per log record by how many records one loop turn writes: why `LineWriter` copies lines.

    python -m bench.logbatch [--events N] [--rounds R]

`LineWriter` writes everything logged in one event-loop turn with one `write()`. With one VM
a turn holds at most 64 records (the reader yields after 64 messages); with many busy VMs it
holds thousands. The obvious way to batch, a list of rendered lines joined at the end of the
turn, keeps every line's bytes object alive until then, and glibc's heap trimming then makes
each `orjson.dumps` several times slower once a turn holds a few hundred lines. `LineWriter`
copies each line into one growing buffer as it comes and frees the line at once.

Both writers render the same `qmp_event` records (`RecordLogger.qmp_event`, the storm mix)
into /dev/null, flushing every `batch` records; the best of `rounds` is reported, in ns per
record, for batches of 64, 640 and 6,400 records.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import IO

import orjson

from bench import stream
from qmpwatch.core.events import Event, decode_object
from qmpwatch.output import logs

BATCHES = (64, 640, 6400)


class ListOfLines(logs.LineWriter):
    """The alternative: keep the rendered lines in a list, join them at the end of the turn."""

    def __init__(self, out: IO[bytes]) -> None:
        super().__init__(out)
        self._lines: list[bytes] = []

    def write_line(self, line: bytes) -> None:
        self._lines.append(line)

    def flush(self) -> None:
        data = b"".join(self._lines)
        self._lines.clear()
        self.stream.write(data)


def _events(count: int) -> list[Event]:
    events = [decode_object(orjson.loads(line)) for line in stream.lines(count, 1, end=False)]
    return [e for e in events if isinstance(e, Event)]


def _per_record_ns(writer: logs.LineWriter, events: list[Event], batch: int, rounds: int) -> float:
    records = logs.RecordLogger("bench")
    records._writer = writer  # the writer under test, in place of the configured one
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        now = 1_700_000_000.0
        in_turn = 0
        for event in events:
            records.qmp_event(event, now)
            in_turn += 1
            if in_turn == batch:
                in_turn = 0
                writer.flush()
                now += 0.001
        writer.flush()
        best = min(best, (time.process_time() - started) / len(events) * 1e9)
    return best


async def run(sink: IO[bytes], count: int, rounds: int) -> dict[str, dict[int, float]]:
    """ns per record: {"buffer" | "list": {batch: ns}}, inside a running loop as in the daemon
    (outside one, LineWriter writes every line at once)."""
    events = _events(count)
    results: dict[str, dict[int, float]] = {"buffer": {}, "list": {}}
    for batch in BATCHES:
        for name in ("list", "buffer"):
            writer = logs.configure("json", sink)
            if name == "list":
                writer = ListOfLines(sink)
            results[name][batch] = _per_record_ns(writer, events, batch, rounds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.logbatch")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with open("/dev/null", "wb", buffering=0) as sink:
        results = asyncio.run(run(sink, args.events, args.rounds))
    print(f"CPU per qmp_event record, best of {args.rounds} rounds of {args.events:,} records")
    print("   records per turn   list of lines   LineWriter (one buffer)")
    for batch in BATCHES:
        listed, buffered = results["list"][batch], results["buffer"][batch]
        print(f"   {batch:>16,}   {listed:10.0f} ns   {buffered:10.0f} ns")


if __name__ == "__main__":
    main()
