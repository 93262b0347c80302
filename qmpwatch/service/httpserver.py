"""The HTTP endpoints: `/metrics`, `/healthz`, `/runbooks/<kind>` on `daemon.metrics_listen`
(TCP), and the local API (`/api/v1/status`, `/api/v1/records`) on `daemon.api_socket` (unix).

aiohttp, on the daemon's event loop; requests are not logged. Use it as an async context
manager, or run `serve()` as a task of the daemon's TaskGroup. Anyone on the host can connect
to a TCP port, so there: at most `max_connections` clients at once (more are answered 503 and
closed), each closed after `CONNECTION_DEADLINE_S` (a header that never ends holds nothing),
and only `Host:` values of the allow-list (no DNS rebinding from a browser on the host).
docs/architecture.md ("The HTTP endpoint") says what each path answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import grp
import ipaddress
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import orjson
import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from qmpwatch.alerts.links import runbook_path
from qmpwatch.core.errors import QmpwatchError
from qmpwatch.service.metrics import Metrics
from qmpwatch.service.status import RecordTap
from qmpwatch.sources.trust import Throttle

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SHUTDOWN_TIMEOUT_S = 5.0  # how long stop() lets an in-flight request finish
CONNECTION_DEADLINE_S = 10.0  # a TCP client is closed this long after it connected
API_SOCKET_MODE = 0o660
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


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
        hosts: Iterable[str] = (),
        max_connections: int = 64,
        unix_group: str = "",
    ) -> None:
        """`listen` is "HOST:PORT", or the path of a unix socket (the local API). `status`
        answers `/api/v1/status`; `tap` feeds `/api/v1/records` (`qmpwatch status` and
        `qmpwatch tail`); `hosts`: the Host: values answered on TCP (empty: see
        `allowed_hosts`)."""
        self.listen = listen
        self.unix = listen.startswith("/")
        self.host, self._port = ("", 0) if self.unix else parse_listen(listen)
        self.unix_group = unix_group
        self.metrics = metrics
        self.health = health
        self.status = status
        self.tap = tap
        self._configured_hosts = tuple(hosts)
        self.hosts: frozenset[str] | None = None  # the allow-list, once the port is known
        self.max_connections = max_connections
        self.refused_clients = 0  # clients beyond max_connections, closed at once
        self._streams: set[asyncio.Task[Any]] = set()  # /api/v1/records handlers
        self._gate: _Gate | None = None
        self._listener: asyncio.Server | None = None
        app = web.Application(middlewares=[self._check_host])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/runbooks/{kind}", self._runbook)
        app.router.add_get("/api/v1/status", self._status)
        app.router.add_get("/api/v1/records", self._records)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            keepalive_timeout=CONNECTION_DEADLINE_S,
        )
        self.listening = asyncio.Event()  # set while bound; `serve()` users wait on it

    @property
    def port(self) -> int:
        """The port listened on (the one the kernel chose, when configured as 0)."""
        return self._port

    async def start(self) -> None:
        """Listen; raises ListenError when the address cannot be bound."""
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        self._gate = _Gate(server, self.max_connections, self, deadline=not self.unix)
        loop = asyncio.get_running_loop()
        try:
            if self.unix:
                self._listener = await loop.create_unix_server(self._gate, sock=_unix(self))
            else:
                self._listener = await loop.create_server(
                    self._gate, self.host, self._port, reuse_address=True
                )
        except OSError as err:
            await self._runner.cleanup()
            why = err.strerror or str(err)
            key = "api_socket" if self.unix else "metrics_listen"
            raise ListenError(f"{key}: cannot listen on {self.listen}: {why}") from err
        if not self.unix:
            self._port = self._listener.sockets[0].getsockname()[1]
            self.hosts = allowed_hosts(self.host, self._port, self._configured_hosts)
        self.listening.set()

    async def stop(self) -> None:
        """Stop listening and close open connections (in-flight requests get a moment; record
        streams end at once)."""
        self.listening.clear()
        for task in self._streams:
            task.cancel()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.unix:
                with contextlib.suppress(OSError):
                    os.unlink(self.listen)
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

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse a Host: not in the allow-list (a page on a rebound name reaching loopback)."""
        if self.hosts is not None and request.host.lower() not in self.hosts:
            raise web.HTTPMisdirectedRequest(text="unknown Host: see daemon.metrics_hosts\n")
        return await handler(request)

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
        """The records of one VM (`?vm=NAME`) or of all, as JSON lines, as they are written.

        Only on the local API socket; followers are limited per user (SO_PEERCRED) and in
        total, and one that stops reading is dropped (`RecordTap`)."""
        if self.tap is None or not self.unix:
            raise web.HTTPNotFound(text="no records here\n")
        uid = _client_uid(request)
        if self.tap.full or self.tap.full_for(uid):
            raise web.HTTPServiceUnavailable(text="too many followers\n")
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            async with self.tap.follow(request.query.get("vm", ""), uid=uid) as follower:
                if request.transport is not None:
                    follower.abort = request.transport.abort
                response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await response.prepare(request)
                await response.write(b"")  # the headers go out now: the client is following
                while (lines := await follower.next_lines()) is not None:
                    await response.write(lines)
                return response  # dropped: the connection ends here
        finally:
            self._streams.discard(task)


def allowed_hosts(host: str, port: int, configured: Iterable[str]) -> frozenset[str] | None:
    """The Host: values (lower case, with and without the port) answered on `host:port`;
    None: any (configured empty, and `host` is not a loopback address)."""
    names = list(configured)
    if not names:
        if not _loopback(host):
            return None  # reached by names qmpwatch cannot know; no browser rebinds to it
        names = [*LOOPBACK_HOSTS, host]
    allowed: set[str] = set()
    for name in names:
        bare = name.lower().strip("[]")
        shown = f"[{bare}]" if ":" in bare else bare
        allowed |= {shown, f"{shown}:{port}"}
    return frozenset(allowed)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _client_uid(request: web.Request) -> int | None:
    """The uid of the client of a unix socket connection (SO_PEERCRED), None on TCP."""
    return _socket_uid(request.transport.get_extra_info("socket") if request.transport else None)


def _socket_uid(sock: socket.socket | None) -> int | None:
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return int(_UCRED.unpack(raw)[1])


def _unix(server: HttpServer) -> socket.socket:
    """The bound API socket (mode 0660, `unix_group`): a stale socket file is replaced, a
    live one (another daemon answers on it) or any other file is not."""
    path = server.listen
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody answers: stale
            else:
                raise OSError(errno.EADDRINUSE, "another process answers on it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, API_SOCKET_MODE)
        if server.unix_group:
            try:
                gid = grp.getgrnam(server.unix_group).gr_gid
            except KeyError:
                raise OSError(errno.EINVAL, f"no such group {server.unix_group}") from None
            os.chown(path, -1, gid)
    except BaseException:
        sock.close()
        raise
    return sock


class _Gate:
    """The protocol factory of a listener: the aiohttp handler for each client while fewer
    than `cap` are connected (on a unix socket, and fewer than a quarter of them of the same
    user), else one that answers 503 and closes (the daemon's descriptors are for VMs); with
    `deadline`, each client is closed `CONNECTION_DEADLINE_S` after it
    connected, whatever it sent."""

    def __init__(self, server: web.Server, cap: int, owner: HttpServer, *, deadline: bool) -> None:
        self.server = server
        self.cap = cap
        self.owner = owner
        self.deadline = deadline
        self.open = 0
        # On a unix socket, also per user (SO_PEERCRED): one user cannot take every slot.
        self.per_user = max(1, cap // 4) if owner.unix else None
        self.by_user: collections.Counter[int | None] = collections.Counter()

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.cap:
            self.refuse()
            return _Busy()
        self.open += 1
        return _Counted(self.server(), self)

    def refuse(self) -> None:
        """Count a client answered 503, and say so at most once a minute."""
        self.owner.refused_clients += 1
        if _said.due(("http_clients_capped", self.owner.listen)):
            structlog.get_logger().warning(
                "http_clients_capped",
                listen=self.owner.listen,
                max_connections=self.cap,
                max_per_user=self.per_user,
                refused=self.owner.refused_clients,
            )


class _Counted(asyncio.Protocol):
    """An aiohttp handler, counted while connected (and closed at its deadline)."""

    def __init__(self, inner: asyncio.Protocol, gate: _Gate) -> None:
        self.inner = inner
        self.gate = gate
        self.timer: asyncio.TimerHandle | None = None
        self.uid: int | None = None
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self.gate
        if gate.per_user is not None:
            self.uid = _socket_uid(transport.get_extra_info("socket"))
            if gate.by_user[self.uid] >= gate.per_user:
                self.refused = True
                gate.refuse()
                _Busy().connection_made(transport)
                return
            gate.by_user[self.uid] += 1
        if self.gate.deadline:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(CONNECTION_DEADLINE_S, transport.close)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.open -= 1
        if self.refused:
            return
        if self.gate.per_user is not None:
            self.gate.by_user[self.uid] -= 1
        if self.timer is not None:
            self.timer.cancel()
        self.inner.connection_lost(exc)


class _Busy(asyncio.Protocol):
    """A client beyond the cap: 503 and closed, without reading its request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's are not subclasses
        writer.write(_BUSY)
        writer.close()


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: 17\r\n\r\ntoo many clients\n"
)
_UCRED = struct.Struct("3i")
_said = Throttle()


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()
