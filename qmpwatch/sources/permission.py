"""What to do about a monitor socket qmpwatch may not connect to: the `hint` of a
`vm_connect_failed` record with reason `permission`.

Connecting to a unix socket needs write permission on the socket file (and search permission
on its directories). QEMU makes its sockets under its own umask: as root under the usual 022 or
027 they come out `srwxr-xr-x` or `srwxr-x---`, which a group member can read but not connect
to. The fix is on QEMU's side (a umask of 007: `UMask=0007` in its unit; `chmod g+w` for the
sockets that exist), with qmpwatch in the socket's group, or QEMU dialing in to a `[[listen]]`
socket that qmpwatch makes itself.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Collection


def _name(lookup: str, ident: int) -> str:
    try:
        if lookup == "user":
            return pwd.getpwuid(ident).pw_name
        return grp.getgrgid(ident).gr_name
    except KeyError:
        return str(ident)


def permission_hint(path: str, groups: Collection[int] | None = None) -> str:
    """One or two sentences for an operator: what the socket is, and what lets qmpwatch in.

    `groups`: the group IDs qmpwatch runs with (default: this process's).
    """
    mine = set(os.getgroups()) | {os.getegid()} if groups is None else set(groups)
    listen = "or let QEMU dial in to a [[listen]] socket that qmpwatch makes (README)"
    try:
        st = os.stat(path)
    except OSError:
        return (
            f"a directory on the way to {path} is not searchable by qmpwatch: give its group "
            f"(or qmpwatch's) execute permission on it, {listen}"
        )
    group = _name("group", st.st_gid)
    shown = f"{path} is {stat.filemode(st.st_mode)} {_name('user', st.st_uid)}:{group}"
    umask = (
        "make QEMU create it group-writable: UMask=0007 in QEMU's unit (umask 007 before "
        f"starting it by hand), or chmod g+w {path} for a socket that exists"
    )
    if st.st_gid in mine:
        return f"{shown}, not writable by its group, which qmpwatch is in: {umask}, {listen}"
    return (
        f"{shown} and qmpwatch is not in group {group}: add it (SupplementaryGroups={group} in "
        f"the unit; make install QMPWATCH_GROUP={group})"
        + ("" if st.st_mode & stat.S_IWGRP else f" and {umask}")
        + f", {listen}"
    )


def hint_for(reason: str, path: str) -> dict[str, str]:
    """The `hint` key of a `vm_connect_failed` record: only for reason `permission`."""
    return {"hint": permission_hint(path)} if reason == "permission" else {}
