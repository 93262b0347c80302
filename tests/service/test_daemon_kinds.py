"""Daemon records that no test produced before: a reload that changes [daemon] keys, a
metrics address that cannot be bound, `daemon.log_file`, and a second SIGTERM while the
first one's shutdown is still flushing alerts."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.lab import LabSpec, LabVM
from qmpwatch.service.daemon import FD_HEADROOM
from tests.support import scrape
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config


async def test_a_reload_changing_daemon_keys_is_partial(tmp_path: Path) -> None:
    """SIGHUP with a changed [daemon] key: config_reload_partial names the key (applied at the
    next start), then config_reloaded; the metrics address is not opened."""
    cfg = write_config(tmp_path / "c.toml", state_dir=tmp_path / "state")
    async with DaemonProcess.start(cfg) as daemon:
        write_config(
            cfg,
            state_dir=tmp_path / "state",
            sections={"daemon": {"metrics_listen": "127.0.0.1:0"}},
        )
        daemon.send_signal(signal.SIGHUP)
        partial = await daemon.wait_for("config_reload_partial")
        await daemon.wait_for("config_reloaded")
    assert partial["keys"] == ["daemon.metrics_listen"]
    assert "restart" in partial["detail"]
    assert not daemon.find("metrics_listening")


async def test_a_metrics_address_in_use_is_reported(tmp_path: Path) -> None:
    """metrics_listen on a port another program holds: metrics_listen_failed says which."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            sections={"daemon": {"metrics_listen": f"127.0.0.1:{port}"}},
        )
        async with DaemonProcess.start(cfg, started="metrics_listen_failed") as daemon:
            failed = daemon.find("metrics_listen_failed")[0]
    assert f"127.0.0.1:{port}" in failed["error"]
    assert not daemon.find("metrics_listening")


async def test_log_file_gets_the_records_and_stdout_none(tmp_path: Path) -> None:
    """daemon.log_file: the JSON lines go to that file (appended), nothing to stdout."""
    log = tmp_path / "qmpwatch.log"
    log.write_text('{"event": "earlier"}\n')
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"daemon": {"log_file": str(log)}},
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", "run", "-c", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await until_logged(log, "daemon_started", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds[0] == "earlier"  # appended to, not truncated
    assert "daemon_started" in kinds[1:]
    assert records[-1]["event"] == "daemon_stopped"
    assert (proc.returncode, out) == (0, b""), err


async def until_logged(log: Path, event: str, proc: asyncio.subprocess.Process) -> None:
    """Until `log` holds a record `event` (the daemon writes it once per turn)."""
    async with asyncio.timeout(20):
        while True:
            text = await asyncio.to_thread(log.read_text)
            if any(json.loads(line).get("event") == event for line in text.splitlines()):
                return
            assert proc.returncode is None, "the daemon exited"
            await asyncio.sleep(0.05)  # a file has no change notification here


@pytest.mark.qemu
async def test_a_second_sigterm_exits_at_once(tmp_path: Path, sock_dir: Path) -> None:
    """The first SIGTERM waits for alert deliveries in flight (a webhook that never answers);
    a second one exits at once, with status 1 and daemon_forced_exit, before daemon_stopped."""
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hook: dict[str, Any] = {"url": f"http://127.0.0.1:{silent.getsockname()[1]}/hook",
                                "timeout_s": 120.0}  # fmt: skip
        async with LabVM.start(LabSpec("term01"), sock_dir) as vm:
            cfg = write_config(
                tmp_path / "c.toml",
                state_dir=tmp_path / "state",
                vms=[{"name": "term01", "socket": str(vm.watch_socket)}],
                sections={"connect": FAST_CONNECT},
                arrays={"alert.webhook": [hook]},
            )
            async with DaemonProcess.start(cfg) as daemon:
                await daemon.wait_for("vm_connected", vm="term01")
                await vm.stop()
                await daemon.wait_for("alert", vm="term01")
                daemon.send_signal(signal.SIGTERM)
                await daemon.wait_for("daemon_stopping")
                daemon.send_signal(signal.SIGTERM)
                forced = await daemon.wait_for("daemon_forced_exit")
                code = await daemon.stop()
    assert code == 1
    assert forced["signal"] == "SIGTERM"
    assert not daemon.find("daemon_stopped")


async def test_metrics_on_port_0_take_a_free_port_and_name_it(tmp_path: Path) -> None:
    """metrics_listen = "127.0.0.1:0": the daemon binds a free port, names it in
    metrics_listening, and serves /healthz there."""
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"daemon": {"metrics_listen": "127.0.0.1:0"}},
    )
    async with DaemonProcess.start(cfg) as daemon:
        listening = daemon.find("metrics_listening")[0]
        status, body = await scrape.get(listening["port"], "/healthz")
    assert listening["listen"] == "127.0.0.1:0"
    assert listening["port"] > 0
    assert (status, json.loads(body)["status"]) == (200, "ok")


def vm_entries(tmp_path: Path, count: int) -> list[dict[str, object]]:
    """`count` configured VMs whose sockets do not exist (each one needs a descriptor)."""
    return [{"name": f"fd{i:03}", "socket": str(tmp_path / f"fd{i:03}.qmp")} for i in range(count)]


async def test_a_low_soft_fd_limit_is_raised(tmp_path: Path) -> None:
    """Started with `prlimit --nofile=SOFT:HARD` below what its VMs need: the daemon raises its
    soft limit to the hard one (fd_limit_raised)."""
    cfg = write_config(tmp_path / "c.toml", state_dir=tmp_path / "state",
                       vms=vm_entries(tmp_path, 10))  # fmt: skip
    low = ("prlimit", f"--nofile={FD_HEADROOM}:4096", "--")
    async with DaemonProcess.start(cfg, prefix=low) as daemon:
        raised = daemon.find("fd_limit_raised")[0]
    assert (raised["soft"], raised["hard"], raised["new_soft"]) == (FD_HEADROOM, 4096, 4096)
    # a socket per VM and FD_HEADROOM, plus the HTTP clients' caps kept apart for them
    assert raised["vms"] == 10
    assert raised["needed"] >= FD_HEADROOM + 10


async def test_a_hard_fd_limit_too_low_is_an_error_and_the_daemon_runs(tmp_path: Path) -> None:
    """A hard limit below what the VMs need: fd_limit_too_low says so; the daemon runs on."""
    cfg = write_config(tmp_path / "c.toml", state_dir=tmp_path / "state",
                       vms=vm_entries(tmp_path, 10))  # fmt: skip
    low = ("prlimit", f"--nofile={FD_HEADROOM}:{FD_HEADROOM}", "--")
    async with DaemonProcess.start(cfg, prefix=low) as daemon:
        too_low = daemon.find("fd_limit_too_low")[0]
        await daemon.wait_for("vm_connect_failed", vm="fd000")
    assert (too_low["new_soft"], too_low["vms"]) == (FD_HEADROOM, 10)
    assert too_low["needed"] >= FD_HEADROOM + 10
    assert "LimitNOFILE=" in too_low["summary"]


async def test_two_discovered_sockets_with_one_name_conflict(tmp_path: Path) -> None:
    """Two [[discover]] globs find web.qmp in two directories: one is watched as "web", the
    other is logged once as discover_name_conflict naming both sockets."""
    first, second = tmp_path / "a", tmp_path / "b"
    sockets = []
    for directory in (first, second):
        directory.mkdir()
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(directory / "web.qmp"))
        sock.listen()
        sockets.append(sock)
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        discover=[{"glob": f"{first}/*.qmp"}, {"glob": f"{second}/*.qmp"}],
    )
    try:
        async with DaemonProcess.start(cfg) as daemon:
            conflict = await daemon.wait_for("discover_name_conflict")
            added = await daemon.wait_for("vm_added", vm="web")
    finally:
        for sock in sockets:
            sock.close()
    paths = {str(first / "web.qmp"), str(second / "web.qmp")}
    assert conflict["vm"] == "web"
    assert {conflict["socket"], conflict["other_socket"]} == paths
    assert len(daemon.find("vm_added", vm="web")) == 1
    assert added["vm"] == "web"
