"""Test helpers for alert delivery: sample alerts, a real local HTTP receiver, waiting.

- `make_alert(...)`: an `Alert` with sensible defaults.
- `Receiver`: a real aiohttp web server on loopback that records every request and answers
  as told (`mode`: "ok" 200, "fail" 500, "hang" never); it can start late and stop, to play
  a receiver that is down.
- `running(dispatcher)`: run a dispatcher's delivery loops for the `async with` body.
- `wait_until(condition)`: poll a condition with a deadline (never a bare sleep).
- `run_until_sigkill(script, *args)`: run a Python script that ends by SIGKILLing itself.
- `sql_statements(db)`: every SQL statement a database connection runs from now on.
- Run as a script, this module is the daemon stand-in of the SIGKILL test (`child_main`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
import pytest
from aiohttp import web

from qmpwatch.alerts.dispatch import AlertDispatcher
from qmpwatch.core.alert import Alert, Severity

T = TypeVar("T")
Mode = Literal["ok", "fail", "hang"]
_counter = itertools.count(1)


def make_alert(
    vm: str = "web01",
    kind: str = "vm_stopped_io_error",
    severity: Severity = "critical",
    cause: str | None = None,
    *,
    raised_at: float | None = None,
    details: Mapping[str, Any] | None = None,
) -> Alert:
    """A sample alert; every call without `cause` gets a distinct fingerprint."""
    return Alert(
        kind=kind,
        severity=severity,
        vm=vm,
        summary=f"VM {vm} paused: write error on drive0 (No space left on device)",
        cause=cause if cause is not None else f"BLOCK_IO_ERROR:drive{next(_counter)}",
        raised_at=time.time() if raised_at is None else raised_at,
        details={"device": "drive0", "operation": "write"} if details is None else details,
    )


async def wait_until(
    condition: Callable[[], T], timeout: float = 5.0, what: str = "condition"
) -> T:
    """Poll `condition()` until truthy and return it; fail the test after `timeout` s."""
    try:
        async with asyncio.timeout(timeout):
            while not (result := condition()):  # noqa: ASYNC110 - polls a plain condition
                await asyncio.sleep(0.01)
            return result
    except TimeoutError:
        pytest.fail(f"{what}: not true within {timeout} s")


@dataclass
class Request:
    body: bytes
    headers: Mapping[str, str]
    status: int  # what the receiver answered (0: it hung)

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP receiver on 127.0.0.1 that records requests and answers per `mode`."""

    port: int = 0
    mode: Mode = "ok"
    fail_first: int = 0  # answer 500 to this many requests first, whatever the mode
    hang_first: int = 0  # hang on this many requests first
    requests: list[Request] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def delivered(self) -> list[Request]:
        """The requests answered 2xx."""
        return [r for r in self.requests if 200 <= r.status < 300]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._release = asyncio.Event()
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        n = len(self.requests)
        hang = n < self.hang_first or (self.mode == "hang" and n >= self.hang_first)
        if n < self.fail_first or (self.mode == "fail" and not hang):
            status = 500
        else:
            status = 0 if hang else 200
        self.requests.append(Request(body, dict(request.headers), status))
        async with self._changed:
            self._changed.notify_all()
        if status == 0:
            await self._release.wait()
            raise web.HTTPServiceUnavailable()
        if status == 500:
            return web.Response(status=500, text="receiver broken on purpose")
        return web.Response(status=200, text="ok")

    async def wait_for(
        self, condition: Callable[[Receiver], T], timeout: float = 5.0, what: str = ""
    ) -> T:
        """Wait (on each new request) until `condition(self)` is truthy; return it."""
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    return await self._changed.wait_for(lambda: condition(self))
        except TimeoutError:
            pytest.fail(
                f"receiver: {what or 'condition'} not met within {timeout} s; "
                f"{len(self.requests)} request(s): {[r.status for r in self.requests]}"
            )


@contextlib.asynccontextmanager
async def receiving(**kwargs: Any) -> AsyncIterator[Receiver]:
    receiver = Receiver(**kwargs)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@contextlib.asynccontextmanager
async def running(dispatcher: AlertDispatcher, close_s: float = 2.0) -> AsyncIterator[None]:
    """Run the dispatcher's delivery loops; `aclose(close_s)` them at the end."""
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(dispatcher.run())
        try:
            yield
        finally:
            await dispatcher.aclose(close_s)
            async with asyncio.timeout(close_s + 2):
                await task


def child_main() -> None:
    """The SIGKILL test's daemon: fire `count` alerts into STATE_DIR, deliver to URLs.

    argv: STATE_DIR COUNT URL... ; logs JSON lines on stdout; SIGTERM stops it cleanly.
    """
    from qmpwatch.core.config import AlertConfig, WebhookConfig
    from qmpwatch.output import logs

    state_dir, count, *urls = sys.argv[1:]
    logs.configure("json")
    config = AlertConfig(
        retry_initial_s=0.05,
        retry_max_s=0.2,
        webhook=tuple(WebhookConfig(url, timeout_s=2.0) for url in urls),
    )

    async def main() -> None:
        dispatcher = AlertDispatcher(config, Path(state_dir), host="test-host")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(15, stop.set)
        for i in range(int(count)):
            dispatcher.fire(make_alert(vm=f"vm{i}", cause=f"BLOCK_IO_ERROR:drive{i}"))
        import structlog

        structlog.get_logger().info("test_fired", count=int(count), pid=os.getpid())
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(dispatcher.run())
            await stop.wait()
            await dispatcher.aclose(2.0)
            await task

    asyncio.run(main())


if __name__ == "__main__":
    child_main()


ROOT = Path(__file__).resolve().parents[2]


def run_until_sigkill(script: str, *args: str) -> None:
    """Run `script` (Python source, with the checkout importable) and check that it ended by
    SIGKILL, as a daemon killed mid-work does."""
    child = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()


def sql_statements(db: sqlite3.Connection | None) -> list[str]:
    """From now on, every SQL statement `db` runs is appended to the returned list."""
    run: list[str] = []
    assert db is not None
    db.set_trace_callback(run.append)
    return run
