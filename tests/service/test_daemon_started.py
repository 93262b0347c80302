"""`daemon_started.vms` counts what /healthz counts: the sessions of every source, not only
the `[[vm]]` entries (first-day papercut: it said 1 while /healthz said 3)."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.daemon_harness import ANY_PORT, DaemonProcess, write_config
from tests.support.scrape import wait_healthz


async def test_daemon_started_counts_every_sources_vms_as_healthz_does(
    tmp_path: Path, sock_dir: Path
) -> None:
    """One [[vm]] (its socket missing) and two sockets a [[discover]] glob finds: 3 VMs in
    daemon_started, in /healthz and in the status counts."""
    listeners = []
    try:
        for name in ("a", "b"):  # sockets that never greet: sessions that stay unconnected
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.append(sock)
            sock.bind(str(sock_dir / f"{name}.qmp"))
            sock.listen()
        config = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "web01", "socket": str(sock_dir / "web01.sock")}],
            discover=[{"glob": str(sock_dir / "*.qmp")}],
            sections={"daemon": {"metrics_listen": ANY_PORT}},
        )
        async with DaemonProcess.start(config) as daemon:
            port = daemon.metrics_port
            (started,) = daemon.find("daemon_started")
            assert started["vms"] == 3
            body = await wait_healthz(port, lambda b: b.get("vms") is not None)
            assert body["vms"] == started["vms"]
    finally:
        for sock in listeners:
            sock.close()
