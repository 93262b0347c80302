"""Who is on the other end of a monitor socket: QEMU's PID and what its command line says.

`SO_PEERCRED` names the process that created the listening unix socket (QEMU), and
`/proc/PID/cmdline` holds its arguments, from which qmpwatch learns whether the VM runs with
`-no-shutdown` (a guest poweroff then pauses instead of exiting), its `-name` and its
`-watchdog-action`. Pure apart from the two reads.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class QemuCommandLine:
    """What qmpwatch uses from a QEMU command line."""

    no_shutdown: bool
    name: str | None
    watchdog_action: str | None
    uuid: str | None = None
    program: str = ""  # argv[0]


def peer_pid(sock: socket.socket) -> int | None:
    """The PID of the peer of a connected unix socket, or None when unknown."""
    cred = peer_credentials(sock)
    return cred[0] if cred is not None else None


def peer_credentials(sock: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the peer of a connected unix socket (SO_PEERCRED), or None."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, _gid = _UCRED.unpack(raw)
    return (pid, uid) if pid > 0 else None


def read_cmdline(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The argv of process `pid` (raises OSError when unreadable)."""
    raw = (proc / str(pid) / "cmdline").read_bytes()
    return [arg.decode("utf-8", "replace") for arg in raw.split(b"\0") if arg]


def _option_value(args: list[str], option: str) -> str | None:
    """The value of `-option VALUE` or `-option=VALUE` (QEMU accepts `--option` too)."""
    value = None
    for i, arg in enumerate(args):
        bare = arg[1:] if arg.startswith("--") else arg
        if bare == option and i + 1 < len(args):
            value = args[i + 1]
        elif bare.startswith(option + "="):
            value = bare[len(option) + 1 :]
    return value


def parse_cmdline(args: list[str]) -> QemuCommandLine:
    """Read -no-shutdown (or `-action shutdown=pause`), -name and -watchdog-action."""
    no_shutdown = any(a in ("-no-shutdown", "--no-shutdown") for a in args)
    watchdog_action = _option_value(args, "-watchdog-action")
    for i, arg in enumerate(args):
        if arg in ("-action", "--action") and i + 1 < len(args):
            for part in args[i + 1].split(","):
                key, _, value = part.partition("=")
                if key == "shutdown":
                    no_shutdown = value == "pause"
                elif key == "watchdog":
                    watchdog_action = value
    name = _option_value(args, "-name")
    if name is not None:
        # -name guest=NAME,debug-threads=on   or   -name NAME[,process=...]
        first = name.split(",")[0]
        for part in name.split(","):
            if part.startswith("guest="):
                first = part[len("guest=") :]
        name = first
    return QemuCommandLine(
        no_shutdown=no_shutdown,
        name=name,
        watchdog_action=watchdog_action,
        uuid=_option_value(args, "-uuid"),
        program=args[0] if args else "",
    )
