"""The `libvirt` source: `[[libvirt]]` entries, each a libvirt connection whose domains (those
whose names match `domains`) are watched as VMs, with no change to the domains.

libvirt-python is an optional extra (`pip install 'qmpwatch[libvirt]'`): it is imported only
when a [[libvirt]] entry is configured, and one `libvirt_unavailable` record says what to
install when it is missing. How a connection and its domains are watched:
`qmpwatch.sources.libvirthost`; how one domain is: `qmpwatch.sources.libvirtlink`.

VMs watched through libvirt before qmpwatch restarted get their sessions at once (their
firing alerts are kept). Once every connection has listed its domains, such a VM last seen
alive whose domain does not run is reported gone (`vm_gone_while_unmonitored`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import structlog

from qmpwatch.core.config import Config, LibvirtConfig, RemediateConfig
from qmpwatch.session.session import VmSession
from qmpwatch.sources.base import SessionHost
from qmpwatch.sources.guard import retried

# Acting on a domain means QMP through libvirt, which taints it: [remediate] does not apply.
NO_ACTIONS = RemediateConfig()
RETRY_S = 2.0  # a connection's task that raised what it never should starts again after this

if TYPE_CHECKING:
    from qmpwatch.sources.libvirthost import LibvirtConnection

INSTALL_HELP = (
    "the [[libvirt]] source needs libvirt-python: pip install 'qmpwatch[libvirt]' (it builds "
    "against libvirt's headers: apt-get install libvirt-dev pkg-config gcc)"
)


@dataclass(slots=True)
class _Running:
    connection: LibvirtConnection
    task: asyncio.Task[None]


class LibvirtSource:
    """`[[libvirt]]`: libvirt connections and their domains."""

    kind = "libvirt"

    def __init__(self, config: Config, host: SessionHost, tg: asyncio.TaskGroup) -> None:
        self.host = host
        self.log = structlog.get_logger()
        self._tg = tg
        self._module: ModuleType | None = None
        self._unavailable = False
        self.connections: dict[str, _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._owners: dict[str, LibvirtConnection] = {}  # VM name -> the connection with it
        self._expected: dict[str, VmSession] | None = None  # watched before, not yet found
        self._listed: set[str] = set()  # URIs that have listed their domains once
        self._found: set[str] = set()  # the domains they found (running or not)

    def _load(self) -> ModuleType | None:
        if self._module is None and not self._unavailable:
            try:
                self._module = importlib.import_module("qmpwatch.sources.libvirthost")
            except ImportError as err:
                self._unavailable = True
                self.log.error("libvirt_unavailable", error=str(err), help=INSTALL_HELP)
        return self._module

    def reconfigure(self, config: Config) -> None:
        module = self._load()
        if module is None:
            return
        wanted = {entry.uri: entry for entry in config.libvirt}
        for uri in list(self.connections):
            if uri not in wanted:
                self._remove(uri)
        for uri, entry in wanted.items():
            running = self.connections.get(uri)
            if running is not None:
                running.connection.connect = config.connect
                if running.connection.entry != entry:
                    running.connection.retarget(entry)
                continue
            connection = module.LibvirtConnection(
                entry, self.host, config.connect, self._claim, self._on_listed
            )
            task = self._tg.create_task(
                retried(connection.run, where="libvirt: connection", delay_s=RETRY_S, uri=uri),
                name=f"libvirt:{uri}",
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.connections[uri] = _Running(connection, task)
        if self._expected is None:
            self._expect_known(config.libvirt)

    def _remove(self, uri: str) -> None:
        running = self.connections.pop(uri)
        self._listed.discard(uri)
        running.task.cancel()
        connection = running.connection
        for name in [n for n, c in self._owners.items() if c is connection]:
            del self._owners[name]

        def ended(_: asyncio.Task[None]) -> None:
            connection.leave_all("its [[libvirt]] entry was removed from the configuration")

        running.task.add_done_callback(ended)

    def _claim(self, name: str, connection: LibvirtConnection) -> bool:
        """The first connection to find a domain name watches it; another is refused."""
        owner = self._owners.setdefault(name, connection)
        return owner is connection

    def _expect_known(self, entries: tuple[LibvirtConfig, ...]) -> None:
        """VMs watched through libvirt when qmpwatch last ran: open their sessions now."""
        self._expected = {}
        for name in self.host.known(self.kind):
            if not any(fnmatch.fnmatchcase(name, g) for e in entries for g in e.domains):
                continue
            session = self.host.open(name, self.kind, no_shutdown=True, remediate=NO_ACTIONS)
            if session is not None:
                self._expected[name] = session

    def _on_listed(self, connection: LibvirtConnection, found: set[str]) -> None:
        """A connection listed its (wanted) domains: once all have, settle the expected VMs:
        one whose domain runs has its link; one last seen alive is reported gone; the others
        leave, unless an alert still fires for them."""
        self._listed.add(connection.entry.uri)
        self._found |= found
        if self._expected is None or not set(self.connections) <= self._listed:
            return
        expected, self._expected = self._expected, {}
        for name, session in expected.items():
            if any(running.connection.running(name) for running in self.connections.values()):
                continue
            if session.watch.status not in (None, "shutdown"):
                why = "is shut off" if name in self._found else "is not defined in libvirt"
                session.absent("missing", f"the domain {why}")
            if not session.watch.firing:
                self.host.close(name, "its domain does not run")

    async def stop(self) -> None:
        tasks = list(self._tasks)
        self.connections.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
