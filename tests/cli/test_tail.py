"""`qmpwatch tail`: attach to sockets ad hoc and print events for people (or JSON)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from qmpwatch.lab import LabSpec, LabVM

pytestmark = pytest.mark.qemu


async def _tail(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", "tail", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _read_until(proc: asyncio.subprocess.Process, needle: str, lines: list[str]) -> None:
    assert proc.stdout is not None
    async with asyncio.timeout(15):
        while not any(needle in line for line in lines):
            raw = await proc.stdout.readline()
            assert raw, f"tail ended before {needle!r}: {lines}"
            lines.append(raw.decode())


async def _stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(10):
        return await proc.wait()


async def test_tail_prints_one_line_per_event_for_people(sock_dir: Path) -> None:
    """Events, alerts and resolutions appear as short lines naming the VM; Ctrl-C exits 0."""
    async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
        proc = await _tail(str(vm.watch_socket))
        lines: list[str] = []
        try:
            await _read_until(proc, "connected to", lines)
            await vm.stop()
            await _read_until(proc, "ALERT warning vm_stopped_unexpected", lines)
            await vm.cont()
            await _read_until(proc, "resolved vm_stopped_unexpected", lines)
        finally:
            code = await _stop(proc)
        name = vm.watch_socket.stem
        assert any(line.split()[1:3] == [name, "STOP"] for line in lines), lines
        assert any(line.split()[1:3] == [name, "RESUME"] for line in lines), lines
        assert not any(line.lstrip().startswith("{") for line in lines)
        assert "\x1b[" not in "".join(lines)  # no colour when not on a terminal
        assert code == 0


async def test_tail_json_prints_the_log_contract(sock_dir: Path) -> None:
    """`--json` prints the same JSON records as the daemon, one per line."""
    async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
        proc = await _tail("--json", str(vm.watch_socket))
        lines: list[str] = []
        try:
            await _read_until(proc, '"vm_connected"', lines)
            await vm.system_reset()
            await _read_until(proc, '"RESET"', lines)
        finally:
            await _stop(proc)
        records = [json.loads(line) for line in lines]
        reset = next(r for r in records if r.get("qmp") == "RESET")
        assert reset["event"] == "qmp_event"
        assert reset["vm"] == vm.watch_socket.stem
        assert reset["data"]["reason"] == "host-qmp-system-reset"
