"""The HTTP endpoint on `daemon.metrics_listen`: `/metrics`, `/healthz` and `/runbooks/<kind>`.

aiohttp, on the daemon's event loop; requests are not logged. Use it as an async context
manager, or run `serve()` as a task of the daemon's TaskGroup. docs/architecture.md ("The HTTP
endpoint") says what each path answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from qmpwatch.alerts.links import runbook_path
from qmpwatch.core.errors import QmpwatchError
from qmpwatch.service.metrics import Metrics
from qmpwatch.service.status import RecordTap

SHUTDOWN_TIMEOUT_S = 5.0  # how long stop() lets an in-flight request finish


@dataclass(frozen=True, slots=True)
class Health:
    """What `/healthz` reports: `ok` picks 200 or 503; `detail` goes into the JSON body.

    `degraded` (reason -> what is wrong, see `qmpwatch.service.health`) turns an ok status into
    "degraded", still 200: the daemon runs, but its alerts are not safe.
    """

    ok: bool
    detail: Mapping[str, Any] = field(default_factory=dict)
    degraded: Mapping[str, str] = field(default_factory=dict)


class ListenError(QmpwatchError):
    """The endpoint could not listen on `metrics_listen` (address in use, not local, ...)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """ "HOST:PORT" (IPv6 as "[::1]:9752") -> (host, port); port 0 picks a free one."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ListenError(f'metrics_listen: expected "HOST:PORT", got "{listen}"')
    return host, int(port)


class HttpServer:
    """`/metrics` and `/healthz` on one address; `start()`/`stop()` or `async with`."""

    def __init__(
        self,
        listen: str,
        metrics: Metrics,
        health: Callable[[], Health],
        *,
        status: Callable[[], Mapping[str, Any]] | None = None,
        tap: RecordTap | None = None,
    ) -> None:
        """`status` answers `/api/v1/status`; `tap` feeds `/api/v1/records` (`qmpwatch
        status` and `qmpwatch tail`)."""
        self.listen = listen
        self.host, self._port = parse_listen(listen)
        self.metrics = metrics
        self.health = health
        self.status = status
        self.tap = tap
        self._streams: set[asyncio.Task[Any]] = set()  # /api/v1/records handlers
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/runbooks/{kind}", self._runbook)
        app.router.add_get("/api/v1/status", self._status)
        app.router.add_get("/api/v1/records", self._records)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        self.listening = asyncio.Event()  # set while bound; `serve()` users wait on it

    @property
    def port(self) -> int:
        """The port listened on (the one the kernel chose, when configured as 0)."""
        return self._port

    async def start(self) -> None:
        """Listen; raises ListenError when the address cannot be bound."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        try:
            await site.start()
        except OSError as err:
            await self._runner.cleanup()
            why = err.strerror or str(err)
            raise ListenError(f"metrics_listen: cannot listen on {self.listen}: {why}") from err
        self._port = self._runner.addresses[0][1]
        self.listening.set()

    async def stop(self) -> None:
        """Stop listening and close open connections (in-flight requests get a moment; record
        streams end at once)."""
        self.listening.clear()
        for task in self._streams:
            task.cancel()
        await self._runner.cleanup()

    async def serve(self) -> None:
        """Start, then serve until cancelled (for a TaskGroup); stops on the way out."""
        await self.start()
        try:
            await asyncio.Future()  # until cancelled
        finally:
            await self.stop()

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- handlers -------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            report = self.health()
        except Exception as err:  # a broken health check is unhealthy, not a 500 with a trace
            report = Health(False, {"error": f"health check failed: {err!r}"})
        status = "unhealthy" if not report.ok else "degraded" if report.degraded else "ok"
        body: dict[str, Any] = {"status": status}
        body.update((k, v) for k, v in report.detail.items() if k != "status")
        if report.degraded:
            body["degraded"] = dict(report.degraded)
        return web.json_response(body, status=200 if report.ok else 503, dumps=_dumps)

    async def _runbook(self, request: web.Request) -> web.Response:
        path = runbook_path(request.match_info["kind"])
        if path is None:
            raise web.HTTPNotFound(text="no runbook for that alert kind\n")
        return web.Response(body=path.read_bytes(), content_type="text/plain", charset="utf-8")

    async def _status(self, request: web.Request) -> web.Response:
        if self.status is None:
            raise web.HTTPNotFound(text="no status here\n")
        return web.json_response(self.status(), dumps=_dumps)

    async def _records(self, request: web.Request) -> web.StreamResponse:
        """The records of one VM (`?vm=NAME`) or of all, as JSON lines, as they are written."""
        if self.tap is None:
            raise web.HTTPNotFound(text="no records here\n")
        if self.tap.full:
            raise web.HTTPServiceUnavailable(text="too many followers\n")
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            async with self.tap.follow(request.query.get("vm", "")) as follower:
                response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await response.prepare(request)
                await response.write(b"")  # the headers go out now: the client is following
                while True:
                    await response.write(await follower.next_lines())
        finally:
            self._streams.discard(task)


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()
