"""Who may speak for a VM name: it is pinned to the first owner seen (uid, and socket path
for a discovered VM), and a peer of another owner claiming it is refused. Pure.

docs/architecture.md ("Trust boundaries").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Owner:
    """The uid of the QEMU that spoke for a name, and its socket ("" for [[listen]])."""

    uid: int
    socket: str = ""


def refusal(pinned: Owner | None, claim: Owner) -> str | None:
    """Why `claim` may not speak for a name pinned to `pinned` (None: it may).

    Reasons: `name_owned` (another uid), `name_socket_owned` (same uid, another socket of a
    discovered VM).
    """
    if pinned is None:
        return None
    if pinned.uid != claim.uid:
        return "name_owned"
    if pinned.socket and claim.socket and pinned.socket != claim.socket:
        return "name_socket_owned"
    return None
