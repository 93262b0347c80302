"""The supervisor: one `VmConnection` task per VM, kept in line with config and discovery.

`apply()` diffs the wanted VMs against the running ones: new VMs start, removed VMs stop,
VMs whose target did not change keep their task and session untouched (so a reload or a
discovery rescan loses no events). Every task belongs to the daemon's TaskGroup.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from qmpwatch.alert import Alert, resolved_because
from qmpwatch.config import Config
from qmpwatch.connection import Services, VmConnection, VmTarget
from qmpwatch.discovery import discover, glob_root

DISCOVER_INTERVAL_S = 2.0


@dataclass(slots=True)
class _Running:
    target: VmTarget
    connection: VmConnection
    task: asyncio.Task[None]


class Supervisor:
    """Starts and stops VM connection tasks to match the configuration."""

    def __init__(self, config: Config, services: Services, tg: asyncio.TaskGroup) -> None:
        self.config = config
        self.services = services
        self._tg = tg
        self.running: dict[str, _Running] = {}
        self._conflicts_reported: set[str] = set()
        self._config_changed = asyncio.Event()
        self.log = structlog.get_logger()

    def wanted(self) -> dict[str, VmTarget]:
        """Configured VMs, then discovered sockets (a [[vm]] for the same socket wins)."""
        targets = {vm.name: VmTarget(vm.name, vm.socket, vm.no_shutdown) for vm in self.config.vms}
        configured_sockets = {vm.socket for vm in self.config.vms}
        for path, (name, rule) in discover(self.config.discover).items():
            if path in configured_sockets:
                continue
            if name in targets:
                if path not in self._conflicts_reported:
                    self._conflicts_reported.add(path)
                    self.log.warning(
                        "discover_name_conflict",
                        socket=path,
                        vm=name,
                        other_socket=targets[name].socket,
                    )
                continue
            targets[name] = VmTarget(name, path, rule.no_shutdown, confine=glob_root(rule.glob))
        return targets

    def apply(self, config: Config | None = None) -> None:
        """Reconcile the running tasks with `config` (or the current one) and discovery.

        A VM whose target changed (a new socket, say) gets a new task that takes over its
        firing alerts; a VM that left has its firing alerts resolved, with the reason.
        """
        if config is not None:
            self.config = config
            self._config_changed.set()
        wanted = self.wanted()
        replaced: dict[str, list[Alert]] = {}
        for name in list(self.running):
            if name not in wanted or wanted[name] != self.running[name].target:
                old = self._stop(name, leaving=name not in wanted)
                if name in wanted:
                    replaced[name] = list(old.connection.watch.firing.values())
        for name, target in wanted.items():
            if name not in self.running:
                self._start(target, replaced.get(name))

    def _start(self, target: VmTarget, firing: list[Alert] | None = None) -> None:
        connection = VmConnection(
            target,
            connect=self.config.connect,
            followup=self.config.followup,
            lifecycle=self.config.lifecycle,
            client_stop_severity=self.config.alert.client_stop_severity,
            services=self.services,
            firing=firing,
            check_absent=firing is None,
        )
        task = self._tg.create_task(connection.run(), name=f"vm:{target.name}")
        self.running[target.name] = _Running(target, connection, task)
        self.log.info("vm_added", vm=target.name, socket=target.socket)

    def _stop(self, name: str, *, leaving: bool) -> _Running:
        """Cancel a VM's task; `leaving`: the VM is no longer watched at all."""
        entry = self.running.pop(name)
        entry.task.cancel()
        reason = ""
        if leaving:
            reason = (
                "no longer discovered (its socket is gone)"
                if entry.target.confine
                else "removed from the configuration"
            )
        # The cancelled task still records its session's end (vm_disconnected, the status);
        # once it has ended, a VM that left has its alerts resolved, and its series go.
        entry.task.add_done_callback(lambda _: self._forget(entry, reason))
        self.log.info("vm_removed", vm=name, socket=entry.target.socket)
        return entry

    def _forget(self, entry: _Running, reason: str) -> None:
        """After a stopped VM's task ended: resolve its firing alerts (`reason`: it left) and
        drop its metric series, unless it runs again (a new target, same name)."""
        name = entry.target.name
        if reason and name not in self.running:
            entry.connection.watch.retire(time.time(), reason)
        if self.services.metrics is not None and name not in self.running:
            self.services.metrics.forget_vm(name)

    def resolve_orphans(self, restored: Mapping[str, list[Alert]]) -> None:
        """Alerts still firing from before a restart, of VMs no longer watched (removed from
        the configuration while qmpwatch was down): resolve them, saying why."""
        alerts = self.services.alerts
        now = time.time()
        for vm, firing in restored.items():
            if vm in self.running:
                continue
            for alert in firing:
                reason = "no longer in the configuration or discovered"
                self.log.info(
                    "alert_resolved",
                    vm=vm,
                    alert=alert.kind,
                    fingerprint=alert.fingerprint,
                    summary=alert.summary,
                    reason=reason,
                )
                if alerts is not None:
                    alerts.resolve(resolved_because(alert, reason), now)

    async def stop_all(self) -> None:
        """Cancel every VM task and wait for them (their sessions close cleanly)."""
        tasks = [entry.task for entry in self.running.values()]
        self.running.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def rediscover_forever(self, interval_s: float = DISCOVER_INTERVAL_S) -> None:
        """Pick up sockets created or removed while running; asleep without [[discover]]."""
        while True:
            if not self.config.discover:
                self._config_changed.clear()
                await self._config_changed.wait()  # a reload may add [[discover]] globs
                continue
            await asyncio.sleep(interval_s)
            if self.config.discover:
                self.apply()

    def counts(self) -> tuple[int, int, int]:
        """(VMs, connected, alerts firing) for the status line and /healthz."""
        connected = sum(1 for r in self.running.values() if r.connection.connected)
        firing = sum(len(r.connection.watch.firing) for r in self.running.values())
        return len(self.running), connected, firing
