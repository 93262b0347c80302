"""Free loopback TCP ports for servers the tests start (QEMU's VNC/SPICE, receivers, ...)."""

from __future__ import annotations

import random
import socket

LOCALHOST = "127.0.0.1"


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
