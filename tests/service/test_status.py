"""`qmpwatch status` and `qmpwatch tail` beside the real daemon, on real QEMUs.

The commands run as an operator runs them (`python -m qmpwatch ...` with the daemon's
configuration file) and are judged by what they print and their exit status.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qmpwatch.lab import BlkdebugSpec, LabSpec, LabVM
from tests.support.daemon_harness import DaemonProcess, write_config

pytestmark = pytest.mark.qemu


async def qmpwatch(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run `qmpwatch ARGS`; (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def config(tmp_path: Path, port: int, *vms: LabVM, file: str = "c.toml") -> Path:
    """Watch `vms`, the HTTP endpoint on `port` (0: a free one, `DaemonProcess.metrics_port`)."""
    return write_config(
        tmp_path / file,
        state_dir=tmp_path / "state",
        vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket)} for vm in vms],
        sections={"daemon": {"metrics_listen": f"127.0.0.1:{port}"}},
    )


async def status_doc(port: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/api/v1/status") as response,
    ):
        doc: dict[str, Any] = await response.json()
        return doc


async def test_status_says_which_vm_is_paused_why_and_since_when(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A VM paused on a disk error and one running: the paused one is named with its status,
    its reason in words and its alert; exit 1; only the running one: exit 0."""
    web_spec = LabSpec("web01", blkdebug=BlkdebugSpec(errno=28, sector=8))
    async with (
        LabVM.start(web_spec, sock_dir) as web,
        LabVM.start(LabSpec("db01"), sock_dir) as db,
        DaemonProcess.start(config(tmp_path, 0, web, db)) as daemon,
    ):
        # the commands find the daemon through a config naming the port it bound
        cfg = config(tmp_path, daemon.metrics_port, web, db, file="cli.toml")
        await daemon.wait_for("vm_connected", vm="web01")
        await daemon.wait_for("vm_connected", vm="db01")
        code, out, err = await qmpwatch("status", "-c", str(cfg))
        assert (code, err) == (0, ""), out
        assert "all connected and running" in out
        await web.ata_read_sector(8)
        await daemon.wait_for("alert", vm="web01", alert="vm_stopped_io_error")
        code, out, err = await qmpwatch("status", "-c", str(cfg))
        json_code, json_out, _ = await qmpwatch("status", "-c", str(cfg), "--json")
        only_db = await qmpwatch("status", "-c", str(cfg), "db01")
        await web.cont()
        await daemon.wait_for("alert_resolved", vm="web01")
        after = await qmpwatch("status", "-c", str(cfg))
    assert code == 1, out + err
    web_line = next(line for line in out.splitlines() if line.startswith("web01"))
    assert "io-error" in web_line
    assert "read error on drive0 (No space left on device)" in web_line
    assert "! critical vm_stopped_io_error" in out
    assert "needs attention: web01" in out
    doc = json.loads(json_out)
    assert json_code == 1
    assert doc["version"] == 1
    (web_vm,) = [vm for vm in doc["vms"] if vm["vm"] == "web01"]
    assert web_vm["source"] == "vm"
    assert web_vm["connected"] is True
    assert web_vm["status"] == "io-error"
    assert web_vm["why"] == "read error on drive0 (No space left on device)"
    assert web_vm["status_since"].endswith("Z")
    assert [a["alert"] for a in web_vm["alerts"]] == ["vm_stopped_io_error"]
    assert doc["attention"] == ["web01"]
    assert only_db[0] == 0, only_db
    assert "web01" not in only_db[1]
    assert after[0] == 0, after


async def test_status_without_a_daemon_exits_2(tmp_path: Path) -> None:
    """Nothing listens on the configured API socket: exit 2 and one line saying so."""
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"daemon": {"metrics_listen": "127.0.0.1:0"}},
    )
    code, out, err = await qmpwatch("status", "-c", str(cfg))
    assert code == 2
    assert out == ""
    assert f"no qmpwatch daemon answers on {tmp_path / 'api.sock'}" in err


async def test_tail_follows_the_daemon_beside_it(tmp_path: Path, sock_dir: Path) -> None:
    """`tail -c FILE --vm NAME --json` prints that VM's records as the daemon writes them,
    with no monitor of its own; when the daemon restarts it says so and follows the new one;
    Ctrl-C ends it."""
    async with (
        LabVM.start(LabSpec("web01"), sock_dir) as web,
        LabVM.start(LabSpec("db01"), sock_dir) as db,
    ):
        async with DaemonProcess.start(config(tmp_path, 0, web, db)) as daemon:
            port = daemon.metrics_port
            cfg = config(tmp_path, port, web, db, file="cli.toml")  # where tail finds it
            await daemon.wait_for("vm_connected", vm="web01")
            follower = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qmpwatch", "tail", "-c", str(cfg), "--vm", "web01",
                "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            async with asyncio.timeout(15):
                while (await status_doc(port))["followers"] < 1:  # noqa: ASYNC110 - polls HTTP
                    await asyncio.sleep(0.05)
            await db.stop()
            await daemon.wait_for("qmp_event", vm="db01", qmp="STOP")
            await web.stop()
            await daemon.wait_for("alert", vm="web01")
            assert follower.stdout is not None
            lines: list[dict[str, Any]] = []
            async with asyncio.timeout(15):
                while not any(r.get("event") == "alert" for r in lines):
                    lines.append(json.loads(await follower.stdout.readline()))
        assert follower.stderr is not None
        async with asyncio.timeout(15):
            went = (await follower.stderr.readline()).decode()
        async with DaemonProcess.start(cfg) as again:
            await again.wait_for("vm_connected", vm="web01")
            async with asyncio.timeout(15):
                back = (await follower.stderr.readline()).decode()
                while (await status_doc(port))["followers"] < 1:  # noqa: ASYNC110 - polls HTTP
                    await asyncio.sleep(0.05)
                await web.cont()
                later = [json.loads(await follower.stdout.readline())]
                while later[-1].get("qmp") != "RESUME":  # the old daemon's last lines first
                    later.append(json.loads(await follower.stdout.readline()))
        follower.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            await follower.wait()
    assert "the daemon went away" in went
    assert "following it again" in back
    assert {r["vm"] for r in later} == {"web01"}
    assert [r["event"] for r in lines] == ["qmp_event", "alert"]
    assert lines[0]["qmp"] == "STOP"
    assert {r["vm"] for r in lines} == {"web01"}
    assert lines[1]["alert"] == "vm_stopped_unexpected"
    assert follower.returncode == 0


async def test_tail_on_a_monitor_the_daemon_holds_refuses_at_once(
    tmp_path: Path, sock_dir: Path
) -> None:
    """`tail SOCKET` of a monitor the daemon holds exits 1 with the way to follow the daemon,
    and the daemon keeps its session and reconnects as usual afterwards."""
    async with LabVM.start(LabSpec("web01"), sock_dir) as web:
        cfg = config(tmp_path, 0, web)
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="web01")
            code, _, err = await qmpwatch("tail", str(web.watch_socket))
            await web.stop()
            await daemon.wait_for("qmp_event", vm="web01", qmp="STOP")
    assert code == 1
    assert "another client holds this monitor" in err
    assert "qmpwatch tail -c CONFIG" in err
    assert not daemon.find("vm_disconnected", vm="web01", where=lambda r: r["cause"] != "closed")
