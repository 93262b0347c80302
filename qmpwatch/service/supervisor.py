"""The supervisor: the sources the configuration asks for, and one session per VM name.

`apply()` hands every configured source the (new) configuration; a source opens the session
of each VM it finds (`open`) and closes it when the VM leaves (`close`, which resolves the
VM's firing alerts with the reason). A VM name belongs to the first source that opens it; a
VM that did not change keeps its session and link across a reload. Every task belongs to the
daemon's TaskGroup.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from qmpwatch.core.alert import Alert, resolved_because, resolved_summary
from qmpwatch.core.config import Config, NoShutdown, RemediateConfig
from qmpwatch.core.pins import Owner
from qmpwatch.core.watch import VmWatch
from qmpwatch.service.recorder import DaemonRecorder, Services
from qmpwatch.session.session import VmSession
from qmpwatch.sources import registry
from qmpwatch.sources.base import Source
from qmpwatch.sources.guard import step_failed


@dataclass(slots=True)
class _Held:
    session: VmSession
    source: str


class Supervisor:
    """The sources and sessions of the daemon (the `SessionHost` of every source)."""

    def __init__(self, config: Config, services: Services, tg: asyncio.TaskGroup) -> None:
        self.config = config
        self.services = services
        self._tg = tg
        self.sessions: dict[str, _Held] = {}
        self.sources: dict[str, Source] = {}
        self._restored = dict(services.restored)  # taken by each VM's first session
        self.log = structlog.get_logger()

    def apply(self, config: Config | None = None) -> None:
        """Reconcile every source with `config` (or the current one)."""
        if config is not None:
            self.config = config
            for name, held in self.sessions.items():
                held.session.reconfigure(
                    config.followup, config.lifecycle, config.alert.client_stop_severity
                )
                held.session.ignore_gaps(config.protection.ignored_for(name))
        for kind in registry.SOURCES:
            try:
                source = self.sources.get(kind)
                if source is None:
                    if kind not in registry.configured(self.config):
                        continue
                    source = self.sources[kind] = registry.load(kind)(self.config, self, self._tg)
                source.reconfigure(self.config)
            except Exception as err:  # one source's bug: the others run on
                then = "runs the other sources; tries it again at the next reload"
                step_failed(err, where=f"{kind}: reconfigure", then=then)

    # -- the SessionHost of the sources -----------------------------------------------------------

    def open(
        self,
        name: str,
        source: str,
        *,
        no_shutdown: NoShutdown,
        remediate: RemediateConfig | None = None,
    ) -> VmSession | None:
        held = self.sessions.get(name)
        if held is not None:
            return held.session if held.source == source else None
        config = self.config
        session = VmSession(
            name,
            DaemonRecorder(name, self.services),
            self.services.store,
            followup=config.followup,
            lifecycle=config.lifecycle,
            client_stop_severity=config.alert.client_stop_severity,
            no_shutdown=no_shutdown,
            firing=self._restored.pop(name, ()),
            remediate=remediate if remediate is not None else config.remediate,
        )
        session.ignore_gaps(config.protection.ignored_for(name))
        self.services.store.set_source(name, source)
        self.sessions[name] = _Held(session, source)
        self._changed()
        return session

    def close(self, name: str, reason: str) -> None:
        held = self.sessions.pop(name, None)
        if held is None:
            return
        held.session.retire(reason)
        if self.services.metrics is not None:
            self.services.metrics.forget_vm(name)
        self._changed()

    def _changed(self) -> None:
        """The counts of the status line changed (a VM came or went)."""
        if self.services.changed is not None:
            self.services.changed()

    def holder(self, name: str) -> str | None:
        held = self.sessions.get(name)
        return held.source if held is not None else None

    def known(self, source: str) -> Mapping[str, str | None]:
        return self.services.store.known(source)

    def owner(self, name: str) -> Owner | None:
        return self.services.store.owner(name)

    def pin(self, name: str, owner: Owner) -> None:
        self.services.store.pin(name, owner)

    def source_alert(self, alert: Alert, resolved: str | None = None) -> None:
        alerts = self.services.alerts
        now = time.time()
        if resolved is None:
            getattr(self.log, alert.severity)(
                "alert",
                alert=alert.kind,
                severity=alert.severity,
                summary=alert.summary,
                fingerprint=alert.fingerprint,
                details=dict(alert.details),
            )
            if alerts is not None:
                alerts.fire(alert)
        else:
            self._resolved(alert, resolved, now)
        self._changed()

    def _resolved(self, alert: Alert, reason: str, now: float, **vm: str) -> None:
        """Log `alert`'s resolution for `reason` and hand it to the sinks."""
        self.log.info(
            "alert_resolved",
            **vm,
            alert=alert.kind,
            fingerprint=alert.fingerprint,
            summary=alert.summary,
            reason=reason,
            resolved_summary=resolved_summary(alert.summary, reason),
        )
        if self.services.alerts is not None:
            self.services.alerts.resolve(resolved_because(alert, reason), now)

    # -- the daemon's ---------------------------------------------------------------------------

    def resolve_orphans(self) -> None:
        """Alerts still firing from before a restart, of VMs no source has opened (removed
        from the configuration while qmpwatch was down): resolve them, saying why."""
        now = time.time()
        reason = "no longer in the configuration or discovered"
        orphans: dict[str, list[Alert]] = {
            vm: firing for vm, firing in self._restored.items() if vm not in self.sessions
        }
        for vm, firing in orphans.items():
            del self._restored[vm]
            for alert in firing:
                self._resolved(alert, reason, now, vm=vm)

    async def stop_all(self) -> None:
        """Stop every source; their sessions close cleanly."""
        sources = list(self.sources.values())
        self.sources.clear()
        await asyncio.gather(*(source.stop() for source in sources))

    def counts(self) -> tuple[int, int, int]:
        """(VMs, connected, alerts firing) for the status line and /healthz."""
        held = [h for h in self.sessions.values() if not h.session.leaving]
        connected = sum(1 for h in held if h.session.connected)
        firing = sum(len(h.session.watch.firing) for h in held)
        return len(held), connected, firing

    def metric_views(self) -> list[tuple[str, str | None, int]]:
        """(vm, pause reason or None, alerts firing) of each watched VM, for /metrics."""
        return [
            (name, pause_reason(h.session.watch), len(h.session.watch.firing))
            for name, h in self.watched()
        ]

    def watched(self) -> list[tuple[str, _Held]]:
        """The VMs watched now (not those a reload removed whose link is still ending)."""
        return [(name, h) for name, h in self.sessions.items() if not h.session.leaving]


def pause_reason(watch: VmWatch) -> str | None:
    """Why a VM is stopped, as a metric label (None while it runs or is unknown)."""
    status = watch.status
    if status is None or status == "running":
        return None
    if status == "io-error":
        return "nospace" if watch.resumer.nospace else "io-error"
    return "client" if status == "paused" else status
