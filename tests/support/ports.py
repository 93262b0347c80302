"""Loopback TCP ports for servers the tests start.

The daemon binds port 0 and names the port it got (`DaemonProcess.metrics_port`); a port that
must refuse connections is held bound, not listening (`refusing_port`). `free_tcp_port` is
only for programs that cannot say which port they bound (QEMU's SPICE, Alertmanager) or a
server restarted on the same port: their start-up retries when the port was taken meanwhile.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator

LOCALHOST = "127.0.0.1"


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback TCP port held for the block, bound but not listening: every connect to it
    is refused, and nothing else can take it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        yield port


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


def free_vnc_display() -> int:
    """A VNC display number N whose TCP port 5900+N was free a moment ago."""
    for _ in range(200):
        display = random.randint(100, 20000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOCALHOST, 5900 + display))
            except OSError:
                continue
            return display
    raise RuntimeError("no free VNC display found")
