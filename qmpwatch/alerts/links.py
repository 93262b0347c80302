"""Links that go out with alerts: where the daemon is (`generatorURL`) and each kind's runbook.

Both start from the daemon's external URL (`alert.external_url`, else its HTTP endpoint's
address); the runbooks are `docs/runbooks/<kind>.md`, installed as `qmpwatch/runbooks/` and
served at `/runbooks/<kind>`. docs/architecture.md ("Links") has the rules.
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
