"""The webhook sink: POST the version-1 payload (`qmpwatch.alerts.sinks.payload`) as JSON.

Headers: `Content-Type: application/json`, `Idempotency-Key` (the payload's key), the
configured `headers` (secrets from `env:`/`file:`), and with `hmac_secret` the signature
`X-Qmpwatch-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>`. A receiver checks
it with `hmac.compare_digest` over the raw body before parsing it. Delivered = HTTP 2xx.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from qmpwatch.alerts.outbox import Entry
from qmpwatch.alerts.sinks import redact_url
from qmpwatch.alerts.sinks.http import HttpSink
from qmpwatch.alerts.sinks.payload import encode, payload_v1
from qmpwatch.core.alert import Alert
from qmpwatch.core.config import Secret, WebhookConfig

SIGNATURE_HEADER = "X-Qmpwatch-Signature"


def signature(secret: bytes, body: bytes) -> str:
    """The value of the signature header for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSink(HttpSink):
    """One `[[alert.webhook]]`."""

    resend_interval_s: float | None = None

    def __init__(self, index: int, config: WebhookConfig, *, host: str, ident: str) -> None:
        super().__init__()
        self.config = config
        self.host = host
        self.name = f"webhook[{index}]"
        self.sink_id = ident
        self.target = redact_url(config.url)
        self.timeout_s = config.timeout_s
        self._secrets: tuple[Secret, ...] = (
            *config.headers.values(),
            *((config.hmac_secret,) if config.hmac_secret is not None else ()),
        )

    @staticmethod
    def identity(config: WebhookConfig) -> tuple[str, ...]:
        return ("webhook", config.url)

    def request(self, entry: Entry) -> tuple[bytes, dict[str, str]]:
        """The body and headers of `entry`'s POST."""
        body = encode(payload_v1(entry, self.host))
        headers = {"Content-Type": "application/json", "Idempotency-Key": entry.key}
        headers.update((name, secret.reveal()) for name, secret in self.config.headers.items())
        if self.config.hmac_secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.config.hmac_secret.reveal().encode(), body)
        return body, headers

    async def deliver(self, entry: Entry) -> None:
        body, headers = self.request(entry)
        await self._post(self.config.url, body, headers, self._secrets)

    async def refresh(self, alerts: Sequence[Alert], now: float) -> None:
        return None
