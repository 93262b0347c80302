"""Links that go out with alerts: where the daemon is (`generatorURL`) and each kind's runbook.

Alertmanager shows an alert's `generatorURL` as its source and its `runbook_url` annotation
as the link to follow. Both start from the daemon's *external URL*, the address people reach
its HTTP endpoint at: `alert.external_url`, else `http://<alert.host or hostname>:<port of
daemon.metrics_listen>`, which is how Prometheus defaults its own `--web.external-url`.

    generatorURL   <external URL>/healthz            (none without an HTTP endpoint)
    runbook_url    alert.runbook_url with {kind} replaced, else
                   <external URL>/runbooks/<kind>    (served by the daemon, see below)

The runbooks are the Markdown files of `docs/runbooks/` (`<kind>.md`, one per alert kind),
installed with the package as `qmpwatch/runbooks/` and served by the HTTP endpoint at
`/runbooks/<kind>`, so the default links work wherever `/metrics` can be reached.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from qmpwatch.core.config import AlertConfig

RUNBOOK_DIR = Path(__file__).resolve().parent.parent / "runbooks"  # qmpwatch/runbooks
KIND_PLACEHOLDER = "{kind}"
_KIND = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Links:
    """The generator URL ("" for none) and the runbook URL template ("" for none)."""

    generator_url: str = ""
    runbook_template: str = ""

    def runbook_url(self, kind: str) -> str:
        return self.runbook_template.replace(KIND_PLACEHOLDER, kind)


NO_LINKS = Links()


def external_url(alert: AlertConfig, metrics_listen: str) -> str:
    """The daemon's external URL without a trailing slash; "" when it has none."""
    if alert.external_url:
        return alert.external_url.rstrip("/")
    if not metrics_listen:
        return ""
    port = metrics_listen.rpartition(":")[2]
    return f"http://{alert.host or socket.gethostname()}:{port}"


def links_for(alert: AlertConfig, metrics_listen: str) -> Links:
    base = external_url(alert, metrics_listen)
    default_runbook = f"{base}/runbooks/{KIND_PLACEHOLDER}" if base else ""
    return Links(
        generator_url=f"{base}/healthz" if base else "",
        runbook_template=alert.runbook_url or default_runbook,
    )


def runbook_path(kind: str) -> Path | None:
    """The runbook of `kind`, if there is one (never a path outside RUNBOOK_DIR)."""
    if not _KIND.fullmatch(kind):
        return None
    path = RUNBOOK_DIR / f"{kind}.md"
    return path if path.is_file() else None
