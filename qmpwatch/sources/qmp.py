"""`QmpLink`: a link over a QMP unix socket, dialed or dialed in, with qemu.qmp underneath.

The source hands over a connected socket; `negotiate` lets qemu.qmp do the greeting and the
capabilities negotiation within a time limit (a monitor held by another client never
greets). Every later command is bounded too, and the end of the session is told apart:
`eof` (QEMU went away), `error` (the session broke), `closed` (qmpwatch hung up).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import Mapping
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPError
from qemu.qmp.protocol import Runstate

from qmpwatch.core.errors import ConnectFailed, DecodeError
from qmpwatch.session.link import (
    CommandFailed,
    EndCause,
    LinkCallbacks,
    LinkClosed,
    LinkInfo,
    StatusRefused,
)
from qmpwatch.sources.qmpclient import WatchClient

COMMAND_TIMEOUT_S = 5.0  # query-status
DISCONNECT_TIMEOUT_S = 2.0
EARLY_LIMIT = 1024  # messages kept between negotiation and `start` (more are dropped)


class QmpLink:
    """One QMP session on one connected unix socket."""

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        *,
        where: str,
        no_shutdown: bool | None,
        pid: int | None,
        argv: tuple[str, ...] | None = None,
    ) -> None:
        self._sock = sock
        self._early: list[tuple[dict[str, Any], float] | DecodeError] = []
        self.client = WatchClient(
            name, on_event=self._early_event, on_decode_error=self._early_error
        )
        self.info = LinkInfo(where, "", no_shutdown, pid, argv=argv)
        self._end: tuple[EndCause, str] | None = None

    # Events that arrive with the negotiation's reply, before the session takes over.
    def _early_event(self, obj: dict[str, Any], now: float) -> None:
        if len(self._early) < EARLY_LIMIT:
            self._early.append((obj, now))

    def _early_error(self, err: DecodeError) -> None:
        if len(self._early) < EARLY_LIMIT:
            self._early.append(err)

    async def negotiate(self, timeout_s: float) -> None:
        """Greeting and negotiation within `timeout_s`; ConnectFailed says why not."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.client.connect(self._sock)
        except TimeoutError:
            await self._reset()
            raise ConnectFailed(
                "no_greeting",
                f"no QMP greeting within {timeout_s:g} s "
                "(another client holds the monitor, or QEMU is not answering)",
            ) from None
        except ConnectError as err:
            await self._reset()
            raise ConnectFailed(_connect_reason(err.exc), f"{err.exc!s} ({err.exc!r})") from None
        except (asyncio.CancelledError, KeyboardInterrupt):
            await self._reset()
            raise
        except Exception as err:  # qemu.qmp can raise a bare AssertionError here
            await self._reset()
            raise ConnectFailed("error", f"{type(err).__name__}: {err}") from None
        self.info = dataclasses.replace(self.info, qemu_version=_version(self.client))

    async def _reset(self) -> None:
        """Bring a failed client back to IDLE and close the socket, whatever state it is in."""
        if self.client.runstate != Runstate.IDLE:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                    await self.client.disconnect()
        self._sock.close()

    # -- the Link protocol ----------------------------------------------------------------------

    def start(self, callbacks: LinkCallbacks) -> None:
        client = self.client
        client.on_event = callbacks.on_event
        client.on_decode_error = callbacks.on_decode_error
        client.on_reply = callbacks.on_reply
        early, self._early = self._early, []
        for item in early:
            if isinstance(item, DecodeError):
                callbacks.on_decode_error(item)
            else:
                callbacks.on_event(*item)

    async def query_status(self) -> str:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                reply = await self.client.execute("query-status")
        except ExecuteError as err:
            raise StatusRefused(describe_error(err)) from err
        except TimeoutError:
            raise TimeoutError(f"within {COMMAND_TIMEOUT_S:g} s") from None
        except (QMPError, OSError, EOFError) as err:
            raise LinkClosed(describe_error(err)) from err
        status = reply.get("status") if isinstance(reply, dict) else None
        return status if isinstance(status, str) else "unknown"

    async def execute(self, command: str, arguments: Mapping[str, Any]) -> Any:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                return await self.client.execute(command, dict(arguments) or None)
        except ExecuteError as err:
            raise CommandFailed(describe_error(err)) from err
        except TimeoutError:
            raise CommandFailed(f"no answer to {command} within {COMMAND_TIMEOUT_S:g} s") from None
        except (QMPError, OSError, EOFError) as err:
            raise LinkClosed(describe_error(err)) from err

    async def wait_closed(self) -> tuple[EndCause, str]:
        while self.client.runstate == Runstate.RUNNING:
            await self.client.runstate_changed()
        return await self.close()

    async def close(self) -> tuple[EndCause, str]:
        if self._end is None:
            self._end = await self._disconnect()
            self._sock.close()
        return self._end

    async def _disconnect(self) -> tuple[EndCause, str]:
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await self.client.disconnect()
        except (EOFError, ConnectionError):
            # A reset or broken pipe is QEMU gone with a command of ours unread (the
            # protection check's queries right after connect): as much an end of file as EOF.
            return "eof", ""
        except TimeoutError:
            return "error", "disconnect timed out"
        except Exception as err:
            return "error", f"{type(err).__name__}: {err}"
        return "closed", ""


def describe_error(err: BaseException) -> str:
    """An error as a sentence for a record, never a repr of a library object."""
    if isinstance(err, ExecuteError):
        return f"QEMU answered {err.sent.get('execute', 'a command')} with {err.error_class}: {err}"
    if isinstance(err, ExecInterruptedError):
        return "the session ended before QEMU answered"
    if isinstance(err, EOFError):
        return "end of file on the monitor (QEMU closed the connection)"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _version(client: WatchClient) -> str:
    """QEMU's version, from the greeting every QMP server sends first ("" if it has none)."""
    greeting = client.greeting
    qemu = greeting.QMP.version.get("qemu") if greeting is not None else None
    if not isinstance(qemu, Mapping):
        return ""
    return f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}"


def _connect_reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, PermissionError):
        return "permission"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, EOFError | ConnectionResetError | BrokenPipeError):
        return "closed_during_handshake"
    if isinstance(exc, DecodeError | QMPError):
        return "bad_greeting"
    return "error"
