"""What every source is and what it may ask of the daemon.

A source finds VMs of one kind ([[vm]] sockets, [[discover]] globs, [[listen]] dial-ins,
[[libvirt]] domains), opens each VM's session through the `SessionHost`, hands the session a
link whenever it reaches the VM's QEMU, and says when a VM leaves. The daemon reconciles
sources with the configuration by calling `reconfigure`; tasks go in the TaskGroup it gives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from qmpwatch.core.alert import Alert
from qmpwatch.core.config import Config, NoShutdown, RemediateConfig
from qmpwatch.core.pins import Owner
from qmpwatch.session.session import VmSession


class SessionHost(Protocol):
    """The daemon's side: one session per VM name, whichever source found it."""

    def open(
        self,
        name: str,
        source: str,
        *,
        no_shutdown: NoShutdown,
        remediate: RemediateConfig | None = None,
    ) -> VmSession | None:
        """The VM's session (made when new, with what qmpwatch may do to the VM); None when
        another source holds the name."""

    def close(self, name: str, reason: str) -> None:
        """The VM left its source: its session ends and its firing alerts resolve (`reason`)."""

    def holder(self, name: str) -> str | None:
        """The source that holds the name, if any."""

    def known(self, source: str) -> Mapping[str, str | None]:
        """VMs this source had when qmpwatch last ran, with their last status."""

    def owner(self, name: str) -> Owner | None:
        """Who the VM name is pinned to (`qmpwatch.core.pins`), kept across restarts."""

    def pin(self, name: str, owner: Owner) -> None:
        """Pin the VM name to `owner` (the first QEMU that spoke for it)."""

    def source_alert(self, alert: Alert, resolved: str | None = None) -> None:
        """An alert about a source itself, not one VM (a libvirtd that does not answer):
        logged and sent to the sinks; with `resolved`, its resolution for that reason."""


class Source(Protocol):
    """One kind of source, made by `qmpwatch.sources.make` when its config has entries."""

    kind: str

    def reconfigure(self, config: Config) -> None:
        """Take the entries of `config` (at start-up and on every reload), synchronously:
        VMs that came are opened, VMs that went are closed once their task has ended."""

    async def stop(self) -> None:
        """Cancel every task of the source and wait for them."""


class SourceFactory(Protocol):
    def __call__(self, config: Config, host: SessionHost, tg: asyncio.TaskGroup) -> Source: ...
