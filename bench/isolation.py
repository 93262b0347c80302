"""Isolation: a socket VM's alert while a dependency is stuck, beside the same with nothing stuck.

The real daemon (`python -m qmpwatch run`, a subprocess) watches a real QEMU through its
`-qmp` socket ([[vm]]) and a domain of a real libvirtd ([[libvirt]], the libvirt lab), with
one `[[alert.webhook]]` (an aiohttp receiver in this process) and its HTTP endpoint. Five
scenarios, one daemon each, the same configuration:

- `nothing stuck`;
- `libvirtd frozen`: SIGSTOP for the whole window (60 s), SIGCONT after;
- `journal not read`: the daemon's stdout is a pipe of one page (4 KiB) that this program
  stops reading for the window (what a stalled journald does to a service's stdout);
- `state store locked`: another process holds the write lock of the outbox and state
  databases for the window, so every SQLite commit waits (5 s, SQLite's busy timeout, then
  fails);
- `state disk stalls`: `state_dir` is a FUSE file system (`bench.stallfs`, served by this
  program) that holds every write, sync, create and truncate for the window, as a disk
  that stops completing writes does.

In each window the socket VM is paused with `stop` once every window/trials seconds (spread
over the whole window: before and after libvirt's keepalive gives up at 15 s) and resumed
once its alert resolved. Latency = arrival - QEMU's timestamp of the STOP (both the host's
realtime clock), to:

- the record: the `alert` record as `qmpwatch tail` receives it (GET /api/v1/records), which
  does not depend on the log being read;
- the webhook: the firing notification at the receiver.

Target: p99 under 100 ms in every scenario. Root only (it runs libvirtd).

    python -m bench.isolation [--trials 55] [--window 60] [--only "journal not read,..."]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench.stallfs import StallFs
from qmpwatch.lab import LabSpec, LabVM
from qmpwatch.lab.libvirt import LAB_PREFIX, LIBVIRTD_PID, URI, DomainSpec, LabDomain, LibvirtLab

TARGET_P99_MS = 100.0
F_SETPIPE_SZ = 1031
VM = "iso01"


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


@dataclass
class Result:
    scenario: str
    record_ms: list[float] = field(default_factory=list)
    webhook_ms: list[float] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)  # reasons /healthz gave in the window
    degraded_after_s: float | None = None  # window start -> /healthz first said degraded

    def line(self) -> str:
        def figs(values: list[float]) -> str:
            ordered = sorted(values)
            return (
                f"median {ordered[len(ordered) // 2]:6.2f}  p99 {p99(ordered):6.2f}  "
                f"max {ordered[-1]:6.2f} ms"
            )

        return (
            f"{self.scenario:<20} {len(self.record_ms):>3} trials  record: "
            f"{figs(self.record_ms)}   webhook: {figs(self.webhook_ms)}   degraded: "
            f"{','.join(self.degraded) or '-'}"
            + (f" after {self.degraded_after_s:.2f} s" if self.degraded_after_s is not None else "")
        )

    @property
    def met(self) -> bool:
        return max(p99(self.record_ms), p99(self.webhook_ms)) < TARGET_P99_MS


class Stdout:
    """The daemon's stdout: a one-page pipe, read by a thread except while `paused`."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        fcntl.fcntl(self.write_fd, F_SETPIPE_SZ, 4096)
        self.reading = threading.Event()
        self.reading.set()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.reading.wait()
            if not os.read(self.read_fd, 65536):
                return

    @contextlib.contextmanager
    def paused(self) -> Any:
        self.reading.clear()
        try:
            yield
        finally:
            self.reading.set()


class Receiver:
    """The webhook: arrival time of each (kind, status) notification."""

    def __init__(self) -> None:
        self.arrivals: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            arrived = time.time()
            await self.arrivals.put((arrived, orjson.loads(await request.read())))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", hook)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        self.port = _free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait(self, status: str) -> float:
        while True:
            arrived, payload = await asyncio.wait_for(self.arrivals.get(), 30)
            if payload["vm"] == VM and payload["status"] == status:
                return arrived


class Follower:
    """`qmpwatch tail`'s view: the daemon's VM records over its HTTP API, with arrival times."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.records: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        url = f"http://127.0.0.1:{self.port}/api/v1/records?vm={VM}"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            async for line in resp.content:
                await self.records.put((time.time(), orjson.loads(line)))

    async def wait(self, event: str) -> float:
        while True:
            arrived, record = await asyncio.wait_for(self.records.get(), 30)
            if record.get("event") == event and record.get("alert") == "vm_stopped_unexpected":
                return arrived

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def healthz(port: int) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(f"http://127.0.0.1:{port}/healthz") as resp,
    ):
        body: dict[str, Any] = orjson.loads(await resp.read())
        return body


@contextlib.asynccontextmanager
async def nothing() -> AsyncIterator[None]:
    yield


@contextlib.asynccontextmanager
async def frozen_libvirtd() -> AsyncIterator[None]:
    pid = int(LIBVIRTD_PID.read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def unread(stdout: Stdout) -> Callable[[], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def window() -> AsyncIterator[None]:
        with stdout.paused():
            yield

    return window


def stalling(fs: StallFs) -> Callable[[], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def window() -> AsyncIterator[None]:
        with fs.stalled():
            yield

    return window


def locked(state: Path) -> Callable[[], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def window() -> AsyncIterator[None]:
        dbs = [
            sqlite3.connect(state / name, isolation_level=None, timeout=10)
            for name in ("outbox.sqlite3", "state.sqlite3")
        ]
        try:
            for db in dbs:
                db.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            for db in dbs:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                db.close()

    return window


async def scenario(
    name: str,
    workdir: Path,
    vm: LabVM,
    domain: str,
    stuck: Callable[[Stdout, Path], Callable[[], AbstractAsyncContextManager[None]]],
    trials: int,
    window: float,
    state_dir: Path | None = None,
) -> Result:
    result = Result(name)
    run = workdir / name.replace(" ", "-")
    run.mkdir()
    state = state_dir or run / "state"
    receiver = Receiver()
    await receiver.start()
    port = _free_port()
    cfg = run / "c.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{state}"\nmetrics_listen = "127.0.0.1:{port}"\n'
        f"log_backlog_bytes = 1048576\n"
        f"[connect]\nbackoff_initial_s = 0.1\nbackoff_max_s = 0.5\n"
        f'[[vm]]\nname = "{VM}"\nsocket = "{vm.watch_socket}"\nno_shutdown = false\n'
        f'[[libvirt]]\nuri = "{URI}"\ndomains = ["{domain}"]\n'
        f'[[alert.webhook]]\nurl = "http://127.0.0.1:{receiver.port}/hook"\n'
    )
    stdout = Stdout()
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", "run", "-c", str(cfg), stdout=stdout.write_fd
    )  # fmt: skip
    os.close(stdout.write_fd)
    follower = Follower(port)
    try:
        await follower.start()
        async with asyncio.timeout(60):  # the socket VM and the libvirt domain
            while (await healthz(port)).get("connected") != 2:  # noqa: ASYNC110 - polls HTTP
                await asyncio.sleep(0.1)
        async with stuck(stdout, state)():
            start = time.monotonic()
            watcher = asyncio.create_task(_first_degraded(port, start, result))
            for n in range(trials):
                await asyncio.sleep(max(0.0, start + n * window / trials - time.monotonic()))
                mark = vm.mark()
                await vm.stop()
                stop = await vm.wait_event("STOP", after=mark)
                record = await follower.wait("alert")
                hooked = await receiver.wait("firing")
                result.record_ms.append((record - stop.qemu_time) * 1000)
                result.webhook_ms.append((hooked - stop.qemu_time) * 1000)
                await vm.cont()
                await follower.wait("alert_resolved")
                await receiver.wait("resolved")
            await asyncio.sleep(max(0.0, start + window - time.monotonic()))
            result.degraded = sorted((await healthz(port)).get("degraded", {}))
            watcher.cancel()
    finally:
        follower.stop()
        daemon.terminate()
        await daemon.wait()
        await receiver.stop()
    return result


async def _first_degraded(port: int, start: float, result: Result) -> None:
    """Poll /healthz every 50 ms: when did it first say degraded (after the window began)?"""
    while True:
        if (await healthz(port)).get("status") == "degraded":
            result.degraded_after_s = time.monotonic() - start
            return
        await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def measure(
    trials: int, window: float, workdir: Path, only: frozenset[str] = frozenset()
) -> list[Result]:
    results: list[Result] = []
    (workdir / "lab").mkdir()
    with LibvirtLab.running(workdir / "lab") as lab:
        name = f"{LAB_PREFIX}iso-{os.getpid()}"
        await LabDomain(lab, DomainSpec(name)).create()
        async with LabVM.start(LabSpec(name=VM), workdir) as vm:
            plans: list[tuple[str, Any]] = [
                ("nothing stuck", lambda out, state: nothing),
                ("libvirtd frozen", lambda out, state: frozen_libvirtd),
                ("journal not read", lambda out, state: unread(out)),
                ("state store locked", lambda out, state: locked(state)),
            ]
            for label, stuck in plans:
                if only and label not in only:
                    continue
                result = await scenario(label, workdir, vm, name, stuck, trials, window)
                print(result.line(), flush=True)
                results.append(result)
            if only and "state disk stalls" not in only:
                return results
            backing, mountpoint = workdir / "stallfs-backing", workdir / "stallfs"
            backing.mkdir()
            mountpoint.mkdir()
            with StallFs(backing, mountpoint) as fs:
                result = await scenario(
                    "state disk stalls",
                    workdir,
                    vm,
                    name,
                    lambda out, state: stalling(fs),
                    trials,
                    window,
                    state_dir=mountpoint,
                )
                print(result.line(), flush=True)
                results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=55)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--only", default="", help="scenarios to run, comma-separated")
    args = parser.parse_args()
    only = frozenset(filter(None, (n.strip() for n in args.only.split(","))))
    workdir = Path(tempfile.mkdtemp(prefix="qw-iso-", dir="/tmp"))
    print(
        f"isolation: STOP -> alert record (tail API) and -> webhook, {args.trials} trials "
        f"spread over {args.window:g} s per scenario (host {os.uname().nodename}, "
        f"{os.cpu_count()} CPUs); target p99 < {TARGET_P99_MS:g} ms",
        flush=True,
    )
    try:
        results = asyncio.run(measure(args.trials, args.window, workdir, only))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    missed = [r.scenario for r in results if not r.met]
    print("all targets met" if not missed else f"target missed: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
