"""Fake QMP endpoints: one process, many unix sockets, enough QMP for a watcher.

    python -m bench.fakeqmp DIR COUNT [--prefix vm] [--http] [-name NAME]

serves `DIR/{prefix}{i:04d}.qmp` for i < COUNT. Each connection gets QEMU 7.2's greeting, and
`qmp_capabilities`, `query-status` (`running`, or `paused` after a STOP this process sent) and
`query-version` are answered; anything else gets a CommandNotFound error. Replies echo `id`
(`bench.dialin.reply`).

It can also dial in to a `[[listen]]` socket (the `dial` request): the daemon then identifies
this process as the peer, so `FakeQmp.start(..., qemu_name=NAME)` starts it through a link
named like QEMU (`bench.dialin.qemu_lookalike`) with `-name NAME` on its command line.

With `--http` it also answers HTTP requests on 127.0.0.1 (any request: 200, empty body), a
receiver for the daemon's webhook sink; its port is in the start-up line (`http_port`).

The benchmark drives the process through JSON lines on stdin; answers (with the request's
`id`) and the start-up line `{"ready": true, "pid": ...}` go to stdout. Times are
`time.monotonic()` (CLOCK_MONOTONIC, comparable with the measuring process on the same host).

    {"op": "arm", "vm": NAME, "count": N, "seed": S, "mix": MIX}
        the next `query-status` or `query-version` on NAME (the daemon's resync, a stock
        client's first command) starts a stream of N events (+ POWERDOWN)
    {"op": "connected", "count": N}              answer once N sessions are negotiated
    {"op": "dial", "vm": NAME, "socket": PATH}
        connect to PATH (again every 20 ms while that fails, for up to 60 s) and serve the
        connection as VM NAME (made if new); answer once connected
    {"op": "stream", "vm": NAME, "count": N, "seed": S, "end": BOOL, "mix": MIX}
        stream now on NAME's newest session (`bench.stream`, + POWERDOWN with `end`);
        answer when written
    {"op": "send", "vm": NAME, "event": "STOP"}  one event; answers `sent_at`
    {"op": "fairness", "flood": NAME, "quiet": NAME, "flood_events": N, "trials": T,
     "resume_after_s": S}
        floods `flood` with back-to-back streams of N events; T times, while a flood is under
        way, a STOP on `quiet` (RESUME S seconds later); answers the STOPs' `sent_at` times
    {"op": "quit"}

The process itself costs the measured process nothing: it is a separate process, and the
measurements are the watcher's own CPU time and RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import ROOT, qemu_lookalike, stream
from bench.dialin import GREETING, reply

DIAL_RETRY_S = 0.02
DIAL_TIMEOUT_S = 60.0


class Session:
    """One client connection."""

    def __init__(self, vm: Vm, writer: asyncio.StreamWriter) -> None:
        self.vm = vm
        self.writer = writer
        self.streamed = 0  # events of the current stream written so far
        self.stream_total = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def stream(self, count: int, seed: int, end: bool, mix: str = stream.DEFAULT_MIX) -> None:
        self.streamed, self.stream_total = 0, count
        for chunk in stream.chunks(count, seed, end=end, mix=mix, per_chunk=256):
            if self.writer.is_closing():
                return
            self.writer.write(chunk)
            await self.writer.drain()
            self.streamed += chunk.count(b"\n")


class Vm:
    """One fake QEMU: its socket, run status and newest session."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.status = "running"
        self.session: Session | None = None
        self.armed: tuple[int, int, str] | None = None  # (count, seed, mix): next query


class Server:
    def __init__(self, directory: Path, count: int, prefix: str) -> None:
        self.vms = {
            f"{prefix}{i:04d}": Vm(f"{prefix}{i:04d}", directory / f"{prefix}{i:04d}.qmp")
            for i in range(count)
        }
        self.negotiated = 0
        self.negotiated_changed = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        for vm in self.vms.values():
            with contextlib.suppress(FileNotFoundError):
                vm.path.unlink()
            self.servers.append(
                await asyncio.start_unix_server(
                    lambda r, w, vm=vm: self._serve(vm, r, w),  # type: ignore[misc]
                    vm.path,
                    backlog=1024,
                )
            )

    async def _serve(
        self, vm: Vm, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        session = Session(vm, writer)
        vm.session = session
        writer.write(GREETING)
        # Like QEMU, parse a stream of JSON objects: qemu.qmp sends no newline after them.
        decoder = json.JSONDecoder()
        buffer = ""
        try:
            while data := await reader.read(65536):
                buffer += data.decode("utf-8", "replace")
                while buffer := buffer.lstrip():
                    try:
                        cmd, end = decoder.raw_decode(buffer)
                    except json.JSONDecodeError:
                        if len(buffer) > 1 << 20:
                            buffer = ""
                        break
                    buffer = buffer[end:]
                    if isinstance(cmd, dict):
                        self._command(session, cmd)
        except (ConnectionError, OSError):
            pass
        finally:
            for task in session.tasks:
                task.cancel()
            if vm.session is session:
                vm.session = None
            writer.close()

    def _command(self, session: Session, cmd: dict[str, Any]) -> None:
        name = cmd.get("execute")
        vm = session.vm
        if name == "qmp_capabilities":
            self.negotiated += 1
            self.negotiated_changed.set()
        session.write(orjson.dumps(reply(cmd, vm.status)) + b"\r\n")
        if name in ("query-status", "query-version") and vm.armed is not None:
            count, seed, mix = vm.armed
            vm.armed = None
            task = asyncio.create_task(session.stream(count, seed, True, mix))
            session.tasks.add(task)

    async def dial(self, name: str, path: str) -> None:
        """Connect to a listening socket and serve the connection as VM `name`."""
        vm = self.vms.get(name)
        if vm is None:
            vm = self.vms[name] = Vm(name, Path(path))
        async with asyncio.timeout(DIAL_TIMEOUT_S):
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(path)
                    break
                except OSError:
                    await asyncio.sleep(DIAL_RETRY_S)
        task = asyncio.create_task(self._serve(vm, reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send_event(self, vm: Vm, name: str) -> float:
        if name == "STOP":
            vm.status = "paused"
        elif name == "RESUME":
            vm.status = "running"
        seconds, micro = divmod(time.time_ns() // 1000, 1_000_000)
        line = b'{"timestamp": {"seconds": %d, "microseconds": %d}, "event": "%s"}\r\n' % (
            seconds,
            micro,
            name.encode(),
        )
        sent_at = time.monotonic()
        if vm.session is not None:
            vm.session.write(line)
        return sent_at

    # -- control ------------------------------------------------------------------------------

    async def control(self, req: dict[str, Any]) -> dict[str, Any] | None:
        op = req["op"]
        if op == "arm":
            self.vms[req["vm"]].armed = (
                int(req["count"]),
                int(req.get("seed", 1)),
                str(req.get("mix", stream.DEFAULT_MIX)),
            )
            return {}
        if op == "connected":
            while self.negotiated < int(req["count"]):
                self.negotiated_changed.clear()
                await self.negotiated_changed.wait()
            return {"negotiated": self.negotiated}
        if op == "dial":
            await self.dial(str(req["vm"]), str(req["socket"]))
            return {}
        if op == "stream":
            session = self.vms[req["vm"]].session
            if session is None:
                return {"error": "not connected"}
            await session.stream(
                int(req["count"]),
                int(req.get("seed", 1)),
                bool(req.get("end")),
                str(req.get("mix", stream.DEFAULT_MIX)),
            )
            return {"sent": int(req["count"])}
        if op == "send":
            return {"sent_at": self.send_event(self.vms[req["vm"]], req["event"])}
        if op == "fairness":
            return await self._fairness(req)
        raise ValueError(f"unknown op {op!r}")

    async def _fairness(self, req: dict[str, Any]) -> dict[str, Any]:
        flood_vm, quiet = self.vms[req["flood"]], self.vms[req["quiet"]]
        flood_events = int(req["flood_events"])
        resume_after = float(req.get("resume_after_s", 0.1))
        rng = random.Random(int(req.get("seed", 7)))
        sent: list[float] = []
        floods = 0
        flood: asyncio.Task[None] | None = None
        session = flood_vm.session
        assert session is not None
        assert quiet.session is not None
        for _ in range(int(req["trials"])):
            while True:
                if flood is None or flood.done():
                    floods += 1
                    flood = asyncio.create_task(session.stream(flood_events, floods, False))
                await asyncio.sleep(rng.uniform(0.002, 0.02))
                total = session.stream_total
                if not flood.done() and 0.02 * total <= session.streamed <= 0.9 * total:
                    break
            sent.append(self.send_event(quiet, "STOP"))
            await asyncio.sleep(resume_after)
            self.send_event(quiet, "RESUME")
            await asyncio.sleep(rng.uniform(0.0, 0.01))
        if flood is not None:
            await flood
        return {"sent_at": sent, "floods": floods}


class FakeQmp:
    """The controlling side: starts `python -m bench.fakeqmp` and sends it requests."""

    def __init__(self, proc: asyncio.subprocess.Process, directory: Path, prefix: str) -> None:
        self.proc = proc
        self.directory = directory
        self.prefix = prefix
        self.pid = 0
        self.http_port = 0
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        directory: Path,
        count: int,
        prefix: str = "vm",
        *,
        http: bool = False,
        qemu_name: str = "",
    ) -> FakeQmp:
        """`qemu_name`: started as a QEMU named so would be (to dial in to `[[listen]]`)."""
        program = str(qemu_lookalike(directory / "qemu")) if qemu_name else sys.executable
        proc = await asyncio.create_subprocess_exec(
            program,
            "-m",
            "bench.fakeqmp",
            str(directory),
            str(count),
            "--prefix",
            prefix,
            *(["--http"] if http else []),
            *(["-name", qemu_name] if qemu_name else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        server = cls(proc, directory, prefix)
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            first = orjson.loads(await proc.stdout.readline())
        server.pid = int(first["pid"])
        server.http_port = int(first["http_port"])
        server._reader = asyncio.create_task(server._read_answers())
        return server

    def name(self, i: int) -> str:
        return f"{self.prefix}{i:04d}"

    def socket(self, name: str) -> Path:
        return self.directory / f"{name}.qmp"

    async def _read_answers(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            answer = orjson.loads(line)
            future = self._waiting.pop(answer.get("id"), None)
            if future is not None and not future.done():
                future.set_result(answer)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(EOFError("bench.fakeqmp exited"))

    async def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """Send one request and wait for its answer."""
        assert self.proc.stdin is not None
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = future
        self.proc.stdin.write(orjson.dumps({"op": op, "id": self._next_id, **kwargs}) + b"\n")
        await self.proc.stdin.drain()
        answer = await future
        if "error" in answer:
            raise RuntimeError(f"bench.fakeqmp {op}: {answer['error']}")
        return answer

    async def close(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                self.proc.stdin.write(b'{"op": "quit"}\n')
                await self.proc.stdin.drain()
                self.proc.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request with 200 and no body, keeping the connection open."""
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def _main(directory: Path, count: int, prefix: str, http: bool) -> None:
    server = Server(directory, count, prefix)
    await server.start()
    http_port = 0
    if http:
        receiver = await asyncio.start_server(_http, "127.0.0.1", 0)
        http_port = receiver.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    out = sys.stdout.buffer

    def answer(obj: dict[str, Any]) -> None:
        out.write(orjson.dumps(obj) + b"\n")
        out.flush()

    async def handle(req: dict[str, Any]) -> None:
        try:
            result = await server.control(req)
        except Exception as err:
            result = {"error": repr(err)}
        if result is not None:
            answer({"id": req.get("id"), **result})

    answer({"ready": True, "pid": os.getpid(), "http_port": http_port})
    while line := await stdin.readline():
        req = orjson.loads(line)
        if req.get("op") == "quit":
            break
        task = asyncio.create_task(handle(req))
        server.tasks.add(task)
        task.add_done_callback(server.tasks.discard)
    for s in server.servers:
        s.close()
    for vm in server.vms.values():
        with contextlib.suppress(FileNotFoundError):
            vm.path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fakeqmp")
    parser.add_argument("directory", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("--prefix", default="vm")
    parser.add_argument("--http", action="store_true")
    parser.add_argument("-name", default="", help="read by the daemon from /proc/PID/cmdline")
    args = parser.parse_args()
    main_coro = _main(args.directory, args.count, args.prefix, args.http)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)


if __name__ == "__main__":
    main()
