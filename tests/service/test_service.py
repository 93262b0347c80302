"""The daemon as a service: /metrics after a real-QEMU run, /healthz, sd_notify, and the demo."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from qmpwatch.lab import LabSpec, LabVM, QemuBuild
from tests.support.daemon_harness import ANY_PORT, DaemonProcess, write_config
from tests.support.scrape import sample

pytestmark = pytest.mark.qemu


class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def wait_for(self, line: str, timeout: float = 10.0, *, after: int = 0) -> str:
        """The first message from the `after`-th on that holds `line`."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                for message in self.messages[after:]:
                    if line in message.split("\n"):
                        return message
                data = await loop.sock_recv(self.sock, 4096)
                self.messages.append(data.decode())

    def close(self) -> None:
        self.sock.close()


async def test_metrics_healthz_and_sd_notify(tmp_path: Path, sock_dir: Path) -> None:
    """After a scripted run /metrics counts the events, /healthz is 200, systemd hears READY."""
    notify = NotifyListener(sock_dir / "notify")
    try:
        async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
            cfg = write_config(
                tmp_path / "c.toml",
                state_dir=tmp_path / "state",
                vms=[{"name": "web01", "socket": str(vm.watch_socket)}],
                sections={"daemon": {"metrics_listen": ANY_PORT}},
            )
            env = {"NOTIFY_SOCKET": str(notify.path)}
            async with DaemonProcess.start(cfg, env=env) as daemon:
                port = daemon.metrics_port
                await notify.wait_for("READY=1")
                await daemon.wait_for("vm_connected", vm="web01")
                await notify.wait_for("STATUS=1 VM, 1 connected, 0 alerts firing")
                await vm.stop()
                # the status line follows the alert as it fires and resolves (no polling)
                await notify.wait_for("STATUS=1 VM, 1 connected, 1 alert firing")
                seen = len(notify.messages)
                await vm.cont()
                await notify.wait_for("STATUS=1 VM, 1 connected, 0 alerts firing", after=seen)
                await vm.system_reset()
                await daemon.wait_for("qmp_event", vm="web01", qmp="RESET")
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        assert resp.status == 200
                        text = await resp.text()
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        assert resp.status == 200
                        health = json.loads(await resp.text())
                for name in ("STOP", "RESUME", "RESET"):
                    assert sample(text, "qmpwatch_events_total", vm="web01", event=name) == 1
                assert sample(text, "qmpwatch_vm_connected", vm="web01") == 1
                assert sample(text, "qmpwatch_vm_status", vm="web01", status="running") == 1
                assert (
                    sample(text, "qmpwatch_alerts_total", vm="web01", alert="vm_stopped_unexpected")
                    == 1
                )
                assert health["vms"] == 1
                assert health["connected"] == 1
                assert await daemon.stop(signal.SIGTERM) == 0
                await notify.wait_for("STOPPING=1")
    finally:
        notify.close()


async def test_demo_runs_to_completion(qemu_build: QemuBuild) -> None:
    """`qmpwatch demo` walks its whole script on the test's QEMU build and exits 0, showing
    every alert kind it promises and the QEMU version its greeting gave."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    records = [json.loads(line) for line in out.splitlines()]
    alerts = {r["alert"] for r in records if r["event"] == "alert"}
    assert {
        "vm_stopped_unexpected",
        "vm_stopped_io_error",
        "watchdog_fired",
        "vm_stopped_watchdog",
        "vm_crashed",
    } <= alerts
    rules = {r["rule"] for r in records if r["event"] == "followup_satisfied"}
    assert rules == {"stop_after_block_io_error", "stop_after_watchdog", "stop_after_shutdown"}
    assert "==> done in" in err.decode()
    version = ".".join(map(str, qemu_build.version()))
    assert {r["qemu_version"] for r in records if r["event"] == "vm_connected"} == {version}
    assert f"QEMU {version}, as their QMP greeting says" in err.decode()
