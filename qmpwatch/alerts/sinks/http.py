"""One HTTP POST through aiohttp, with every failure turned into a loggable DeliveryError.

`HttpSink` is the base of the webhook and Alertmanager sinks: their session, from `start()`
to `stop()`, and `_post` through it. The caller's `asyncio.timeout` bounds the whole exchange
(connect, send, status, body). Connections are not reused (`force_close`): alerts are rare,
and a kept-alive connection that the receiver closed meanwhile would cost a failed attempt
and a backoff. Names are looked up in the session's own lane (`LaneResolver`), not asyncio's
default executor: a DNS server that does not answer holds up this sink's lookups only.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
from aiohttp.resolver import ThreadedResolver

from qmpwatch import __version__
from qmpwatch.aio.lanes import Lane
from qmpwatch.alerts.sinks import DeliveryError, redact_url, scrub, truncate
from qmpwatch.core.config import Secret

USER_AGENT = f"qmpwatch/{__version__}"
BODY_LIMIT = 64 * 1024  # bytes of an error answer read, for its first words


class HttpSink:
    """A sink that delivers by POST: one aiohttp session from `start()` to `stop()`."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._resolver: LaneResolver | None = None

    async def start(self) -> None:
        self._resolver = LaneResolver()
        self._session = new_session(self._resolver)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def _post(
        self, url: str, body: bytes, headers: Mapping[str, str], secrets: Iterable[Secret]
    ) -> None:
        assert self._session is not None, "start() first"
        await post(self._session, url, body, headers, secrets)


class _LaneLookups:
    """What `ThreadedResolver` asks of its event loop (getaddrinfo, getnameinfo), answered
    from a lane of its own; the caller's timeout bounds the wait, not the lookup."""

    def __init__(self, lane: Lane) -> None:
        self._lane = lane

    async def getaddrinfo(self, host: str, port: int, **kwargs: Any) -> Any:
        return await asyncio.wrap_future(self._lane.submit(_getaddrinfo, host, port, kwargs))

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> Any:
        return await asyncio.wrap_future(self._lane.submit(socket.getnameinfo, sockaddr, flags))


def _getaddrinfo(host: str, port: int, kwargs: dict[str, Any]) -> Any:
    return socket.getaddrinfo(host, port, **kwargs)


class LaneResolver(ThreadedResolver):
    """aiohttp's own resolver (its handling of the answers), its lookups in a lane."""

    def __init__(self, name: str = "dns") -> None:
        super().__init__()
        self._lane = Lane(name)
        self._loop = _LaneLookups(self._lane)  # type: ignore[assignment]

    async def close(self) -> None:
        """Let the lane's thread end (after a lookup in progress, if one hangs)."""
        self._lane.stop()


def new_session(resolver: LaneResolver | None = None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, resolver=resolver or LaneResolver()),
        timeout=aiohttp.ClientTimeout(total=None),  # the caller's asyncio.timeout rules
        headers={"User-Agent": USER_AGENT},
        raise_for_status=False,
    )


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    secrets: Iterable[Secret],
) -> None:
    """POST `body`; returns on 2xx, raises DeliveryError (scrubbed of `secrets`) otherwise."""
    target = redact_url(url)
    secrets = tuple(secrets)
    try:
        async with session.post(url, data=body, headers=dict(headers)) as response:
            if 200 <= response.status < 300:
                await response.read()
                return
            text = (await response.content.read(BODY_LIMIT)).decode("utf-8", "replace")
            reason = response.reason or ""
            detail = f"HTTP {response.status} {reason}".rstrip()
            if text.strip():
                detail = f"{detail}: {truncate(scrub(text, secrets, url))}"
    except aiohttp.ClientConnectorError as err:
        cause = err.os_error
        why = os.strerror(cause.errno) if cause.errno else cause.strerror or type(cause).__name__
        raise DeliveryError(f"cannot connect to {target}: {why}") from None
    except aiohttp.ServerDisconnectedError:
        raise DeliveryError(f"{target} closed the connection without answering") from None
    except aiohttp.ClientError as err:
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise DeliveryError(truncate(scrub(detail, secrets, url))) from None
    except OSError as err:
        raise DeliveryError(f"{target}: {err.strerror or type(err).__name__}") from None
    raise DeliveryError(scrub(detail, secrets, url))
