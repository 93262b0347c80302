"""Alert sinks: where the dispatcher delivers outbox entries (webhook, Alertmanager, exec).

A sink is one configured receiver, and makes one attempt per `deliver`: it returns when the
receiver has the entry and raises `DeliveryError` (safe to log) otherwise; the dispatcher
does the timeouts, retries and logs (docs/architecture.md, "Sinks").

    QmpwatchError
     └── DeliveryError   one attempt failed; `str()` is the loggable reason
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Protocol
from urllib.parse import unquote, urlsplit

from qmpwatch.alerts.outbox import Entry
from qmpwatch.core.alert import Alert
from qmpwatch.core.config import Secret
from qmpwatch.core.errors import QmpwatchError


class DeliveryError(QmpwatchError):
    """One delivery attempt failed; the message names the reason and holds no secret."""


class Sink(Protocol):
    """One receiver of alert notifications."""

    @property
    def name(self) -> str:
        """For logs, as in the config: `webhook[0]`, `alertmanager[1]`, `exec[0]`."""

    @property
    def sink_id(self) -> str:
        """Stable identity in the outbox (survives reordering the config)."""

    @property
    def target(self) -> str:
        """Where it goes, safe to log: `scheme://host:port`, or the program's path."""

    @property
    def timeout_s(self) -> float:
        """The limit of one attempt."""

    @property
    def resend_interval_s(self) -> float | None:
        """How often `refresh` re-posts the active alerts; None: never."""

    async def start(self) -> None:
        """Acquire resources (an HTTP session); called once by the delivery loop."""

    async def stop(self) -> None:
        """Release them."""

    async def deliver(self, entry: Entry) -> None:
        """One attempt to hand over `entry`; raises DeliveryError."""

    async def refresh(self, alerts: Sequence[Alert], now: float) -> None:
        """Re-post the still active `alerts` (Alertmanager); raises DeliveryError."""


def sink_id(kind: str, *parts: str) -> str:
    """A stable, opaque id from what identifies a sink (its kind and URL or argv)."""
    digest = hashlib.sha256("\x00".join((kind, *parts)).encode()).hexdigest()[:16]
    return f"{kind}:{digest}"


def redact_url(url: str) -> str:
    """`scheme://host[:port]`: drops user info, path and query, which may hold credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}"


def scrub(text: str, secrets: Iterable[Secret | str], url: str = "") -> str:
    """`text` with every secret value, `url` (beyond scheme://host:port) and its credentials
    (as written, decoded, and in the base64 `Basic` form), and any URL's user:password,
    blanked out. Scrub before truncating: a cut secret is no longer found."""
    if url:
        text = text.replace(url, redact_url(url))
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is not None:
            query = f"?{parts.query}" if parts.query else ""
            for piece in (parts.path + query, parts.path, parts.query):
                if len(piece) > 1:
                    text = text.replace(piece, "/<redacted>")
            for value in _credentials(parts.username, parts.password):
                text = text.replace(value, "<secret>")
    for secret in secrets:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if value:
            text = text.replace(value, "<secret>")
    return _USERINFO.sub(r"\1<secret>@", text)


# scheme://user:password@ in any text (a URL the error names, not only the sink's own).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")


def _credentials(user: str | None, password: str | None) -> list[str]:
    """What a URL's user:password can look like in an error text, longest first."""
    if not password:
        return []
    found: set[str] = set()
    for u, p in ((user or "", password), (unquote(user or ""), unquote(password))):
        pair = f"{u}:{p}"
        found |= {pair, base64.b64encode(pair.encode()).decode(), p}
    return sorted((v for v in found if len(v) > 1), key=len, reverse=True)


def truncate(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
