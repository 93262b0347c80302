"""A scriptable fake QMP monitor on a real unix socket, for faults a real QEMU cannot produce.

Real QEMU is the ground truth for what a monitor says; this server is for what it must never
say: garbage lines, a greeting that is not QMP (or none), a line cut off by EOF, a line over
the client's read limit, invalid UTF-8, absurd nesting, replies with ids nobody asked for,
events whose fields have the wrong types. Every accepted connection is a `FakeSession`; the
server's attributes (`greeting`, `status`, `replies`, `after_negotiation`) are read when a
session needs them, so a test can change the script between (or during) sessions.

Like QEMU, the server writes lines ending in CRLF and reads commands as a JSON stream (a
client need not end them with a newline). Commands are answered in order:
`qmp_capabilities` with `{"return": {}}` (followed, in the same write, by
`after_negotiation`), `query-status` with `status`, `query-version` with 7.2.0, anything
else with CommandNotFound; `replies[name]` overrides any of them (return the raw chunks to
write, `[]` for no answer at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from qmpwatch.core.config import ConnectConfig, FollowupConfig, LifecycleConfig
from qmpwatch.output import logs
from qmpwatch.service.recorder import DaemonRecorder, Services
from qmpwatch.service.statestore import StateStore
from qmpwatch.session.session import VmSession
from qmpwatch.sources.dial import Dialer, DialTarget
from tests.support.daemon_harness import matches

CRLF = b"\r\n"
GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
    b'"package": "fake"}, "capabilities": []}}\r\n'
)
READ_CHUNK = 65_536

Json = Any
ReplyScript = Callable[["FakeSession", dict[str, Any]], Sequence[bytes]]


def line(obj: Json) -> bytes:
    """One JSON message as the server writes it (CRLF-terminated)."""
    return json.dumps(obj, separators=(",", ":")).encode() + CRLF


def event_line(
    name: str,
    data: Mapping[str, Json] | None = None,
    *,
    seconds: int | None = None,
    microseconds: int = 0,
) -> bytes:
    """A well-formed event (timestamp: now unless given)."""
    stamp = int(time.time()) if seconds is None else seconds
    obj: dict[str, Json] = {
        "event": name,
        "timestamp": {"seconds": stamp, "microseconds": microseconds},
    }
    if data is not None:
        obj["data"] = dict(data)
    return line(obj)


def reply_line(value: Json, command: Mapping[str, Any]) -> bytes:
    """`{"return": value}` with the command's id (if it had one)."""
    obj: dict[str, Json] = {"return": value}
    if "id" in command:
        obj["id"] = command["id"]
    return line(obj)


def error_line(cls: str, desc: str, command: Mapping[str, Any]) -> bytes:
    obj: dict[str, Json] = {"error": {"class": cls, "desc": desc}}
    if "id" in command:
        obj["id"] = command["id"]
    return line(obj)


class FakeSession:
    """One accepted client connection."""

    def __init__(
        self, server: FakeQmp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.number = len(server.sessions) + 1
        self.reader = reader
        self.writer = writer
        self.commands: list[dict[str, Any]] = []
        self.negotiated = asyncio.Event()
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()

    async def send(self, *chunks: bytes) -> None:
        """Write raw bytes to the client, chunk by chunk."""
        for chunk in chunks:
            self.writer.write(chunk)
            await self.writer.drain()

    async def event(self, name: str, data: Mapping[str, Json] | None = None, **kw: int) -> None:
        """Send one well-formed event."""
        await self.send(event_line(name, data, **kw))

    def close(self) -> None:
        """Hang up (the client sees EOF)."""
        self.writer.close()

    def commands_named(self, name: str) -> list[dict[str, Any]]:
        return [c for c in self.commands if c.get("execute") == name]

    async def wait_command(self, name: str, *, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until `count` commands `name` arrived on this session."""
        async with asyncio.timeout(timeout):
            while len(self.commands_named(name)) < count:
                if self.ended.is_set():
                    raise AssertionError(f"session {self.number} ended before {count}x {name}")
                self._changed.clear()
                await self._changed.wait()

    # -- the server side ---------------------------------------------------------------------

    async def run(self) -> None:
        try:
            greeting = self.server.greeting
            if greeting is None:  # a monitor held by someone else: connected, but silent
                await self.reader.read()
                return
            await self.send(greeting)
            if self.server.close_after_greeting:
                return
            decoder = json.JSONDecoder()
            text = ""
            while True:
                chunk = await self.reader.read(READ_CHUNK)
                if not chunk:
                    return
                text += chunk.decode("utf-8", "replace")
                while True:
                    text = text.lstrip()
                    if not text:
                        break
                    try:
                        command, end = decoder.raw_decode(text)
                    except ValueError:
                        break  # incomplete: wait for more
                    text = text[end:]
                    if isinstance(command, dict):
                        await self._answer(command)
        except (ConnectionError, OSError):
            return
        finally:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
            self.ended.set()
            self._changed.set()
            self.server._notify()

    async def _answer(self, command: dict[str, Any]) -> None:
        self.commands.append(command)
        self._changed.set()
        self.server._notify()
        name = command.get("execute")
        script = self.server.replies.get(name) if isinstance(name, str) else None
        if script is not None:
            chunks: Sequence[bytes] = script(self, command)
        elif name == "qmp_capabilities":
            chunks = [reply_line({}, command) + b"".join(self.server.after_negotiation)]
        elif name == "query-status":
            status = self.server.status
            chunks = [reply_line({"status": status, "running": status == "running"}, command)]
        elif name == "query-version":
            chunks = [
                reply_line(
                    {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"}, command
                )
            ]
        else:
            chunks = [
                error_line("CommandNotFound", f"The command {name} has not been found", command)
            ]
        await self.send(*chunks)
        if name == "qmp_capabilities":
            self.negotiated.set()
            self.server._notify()


class FakeQmp:
    """A fake QMP monitor listening on `path`; see the module docstring for the script."""

    def __init__(
        self,
        path: Path,
        *,
        greeting: bytes | None = GREETING,
        status: str = "running",
        close_after_greeting: bool = False,
    ) -> None:
        self.path = path
        self.greeting = greeting
        self.status = status
        self.close_after_greeting = close_after_greeting
        self.replies: dict[str, ReplyScript] = {}
        self.after_negotiation: list[bytes] = []
        self.sessions: list[FakeSession] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def serve(
        cls,
        path: Path,
        *,
        greeting: bytes | None = GREETING,
        status: str = "running",
        close_after_greeting: bool = False,
    ) -> AsyncIterator[FakeQmp]:
        """Listen on `path` for the block's duration."""
        fake = cls(
            path, greeting=greeting, status=status, close_after_greeting=close_after_greeting
        )
        await fake.start()
        try:
            yield fake
        finally:
            await fake.aclose()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=os.fspath(self.path))

    async def aclose(self) -> None:
        """Stop listening, hang up every session, remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for session in self.sessions:
            session.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = FakeSession(self, reader, writer)
        self.sessions.append(session)
        task = asyncio.get_running_loop().create_task(session.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()

    @property
    def connections(self) -> int:
        """How many clients connected so far."""
        return len(self.sessions)

    async def session(self, number: int = 0, *, timeout: float = 10.0) -> FakeSession:
        """The `number`-th session (1-based; 0: the next one after now), once negotiated."""
        wanted = number or len(self.sessions) + 1
        async with asyncio.timeout(timeout):
            while True:
                if len(self.sessions) >= wanted and self.sessions[wanted - 1].negotiated.is_set():
                    return self.sessions[wanted - 1]
                self._changed.clear()
                await self._changed.wait()

    async def wait_connections(self, count: int, *, timeout: float = 10.0) -> None:
        """Wait until `count` clients have connected (negotiated or not)."""
        async with asyncio.timeout(timeout):
            while len(self.sessions) < count:
                self._changed.clear()
                await self._changed.wait()


# ---------------------------------------------------------------------------------------------
# In-process watching: the daemon's own dialer, session and JSON renderer, without a subprocess
# (for hypothesis, where a process per example would be too slow, and for log lines longer
# than a subprocess pipe reader takes).


class RenderedLog(io.BytesIO):
    """The stream the real JSON renderer writes to in-process: lines parsed as they arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []
        self.bad_lines: list[bytes] = []
        self.writer: logs.LineWriter | None = None
        self._changed: asyncio.Event | None = None

    def write(self, data: Any) -> int:
        for raw in bytes(data).splitlines():
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self.bad_lines.append(raw)
            else:
                self.records.append(record)
        if self._changed is not None:
            self._changed.set()
        return len(data)

    def reset(self) -> None:
        """Forget the records; bind the wake-up to the running loop (one per asyncio.run)."""
        if self.writer is not None:
            self.writer.flush()
        self.records.clear()
        self.bad_lines.clear()
        self._changed = asyncio.Event()

    def mark(self) -> int:
        return len(self.records)

    def find(self, event: str, *, after: int = 0, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records[after:] if r.get("event") == event and matches(r, match)]

    async def wait_for(
        self, event: str, *, after: int = 0, count: int = 1, timeout: float = 10.0, **match: Any
    ) -> dict[str, Any]:
        """Wait until `count` records `event` matching `match` exist; return the last."""
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._changed.clear()
                    found = self.find(event, after=after, **match)
                    if len(found) >= count:
                        return found[count - 1]
                    await self._changed.wait()
        except TimeoutError:
            seen = [(r.get("event"), r.get("vm"), r.get("error")) for r in self.records[after:]]
            raise AssertionError(
                f"no {count}x {event} {match} within {timeout} s; records: {seen[-30:]}"
            ) from None


@contextlib.contextmanager
def rendered_log() -> Iterator[RenderedLog]:
    """Configure qmpwatch's real JSON logging into a `RenderedLog`; restore defaults after."""
    sink = RenderedLog()
    sink.writer = logs.configure("json", sink)
    try:
        yield sink
    finally:
        sink.writer.flush()
        logs.unconfigure()


class SignallingStore(StateStore):
    """The in-memory state store, telling waiters about every status written."""

    def __init__(self) -> None:
        super().__init__(None)
        self.written: list[tuple[str, str | None]] = []
        self._changed = asyncio.Event()

    def set_status(self, vm: str, status: str | None) -> None:
        super().set_status(vm, status)
        self.written.append((vm, status))
        self._changed.set()

    async def wait_status(self, vm: str, status: str, *, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while (vm, status) not in self.written:
                self._changed.clear()
                await self._changed.wait()


FAST_CONNECT = ConnectConfig(timeout_s=1.0, backoff_initial_s=0.02, backoff_max_s=0.1)


def vm_connection(
    name: str, path: Path, store: StateStore, *, connect: ConnectConfig = FAST_CONNECT
) -> Dialer:
    """The daemon's dialer and session for one VM (build it after `rendered_log()`)."""
    session = VmSession(
        name,
        DaemonRecorder(name, Services(store=store)),
        store,
        followup=FollowupConfig(),
        lifecycle=LifecycleConfig(),
        client_stop_severity="warning",
        no_shutdown=False,
    )
    return Dialer(DialTarget(name, os.fspath(path), no_shutdown=False), session, connect)
