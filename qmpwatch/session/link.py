"""The link: how a session talks to one running QEMU, whatever carries it.

A source (a dialed or dialed-in socket, libvirt) makes a `Link` for each connection and hands
it to the VM's `VmSession` with `LinkCallbacks` to call from its reader: events, undecodable
messages and "a reply was read" (which orders command answers against events).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from qmpwatch.core.errors import DecodeError

# QEMU went away / the link broke / qmpwatch hung up (or lost the way to QEMU) / QEMU ended on
# purpose, as its manager says (libvirt: a guest shutdown, a destroy): a clean end whatever
# events came before.
EndCause = Literal["eof", "error", "closed", "exited"]


@dataclass(frozen=True, slots=True)
class LinkCallbacks:
    """What a link calls from its reader; none may raise or await."""

    on_event: Callable[[dict[str, Any], float], None]  # a raw QMP event read at `now`
    on_decode_error: Callable[[DecodeError], None]
    on_reply: Callable[[], None]  # a command's answer was read (before its awaiter runs)


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What the source learned about the QEMU behind a link while connecting."""

    where: str  # the socket path (or libvirt URI and domain) shown in vm_connected
    qemu_version: str  # from the QMP greeting; "" when unknown
    no_shutdown: bool | None  # from QEMU's command line; None: unknown
    pid: int | None = None
    extra: dict[str, Any] | None = None  # more vm_connected fields (a domain's UUID, ...)
    argv: tuple[str, ...] | None = None  # QEMU's command line, as read at connect


class StatusRefused(Exception):
    """The monitor answered `query-status` with an error: the status is unknown, QEMU is
    alive (a restricted monitor, a QMP proxy). The message is a sentence for a record."""


class Link(Protocol):
    """One live connection to one VM's QEMU."""

    info: LinkInfo

    def start(self, callbacks: LinkCallbacks) -> None:
        """Deliver what is read from now on to `callbacks` (events already read included)."""

    async def query_status(self) -> str:
        """QEMU's run status (a `query-status` word). Raises `StatusRefused` when the monitor
        answers with an error, TimeoutError when it does not answer in time, and
        `LinkClosed` when the link ends first."""

    async def execute(self, command: str, arguments: Mapping[str, Any]) -> Any:
        """Run a QMP command that acts on the VM (opt-in remediation); raises `CommandFailed`
        (a sentence) when QEMU refuses it or does not answer, `LinkClosed` when the link
        ends first."""

    async def wait_closed(self) -> tuple[EndCause, str]:
        """Wait until the link ends; how (`eof`: QEMU went away) and an error sentence."""

    async def close(self) -> tuple[EndCause, str]:
        """Hang up (bounded in time); how the link had ended, as `wait_closed` says."""


@runtime_checkable
class DomainDescriber(Protocol):
    """A link whose VM's manager describes its configuration (libvirt's domain XML), so the
    session asks that instead of sending QMP queries."""

    async def domain_xml(self) -> str:
        """The domain's XML; raises `LinkClosed` when it cannot be read."""


class CommandFailed(Exception):
    """QEMU refused a command or did not answer it in time; the message is a sentence."""


class LinkClosed(Exception):
    """A command could not be answered because the link ended."""
