"""No local user can blind or fool qmpwatch through its endpoints: the TCP port caps its
clients and checks Host:, a port taken before start never stops the watching, `status` and
`tail` ask over a unix socket, followers are bounded per user and in bytes, and nothing a peer
sends reaches a terminal, an environment or a log raw.

Real QEMUs and the real daemon; a fake QMP monitor only where a flood of megabyte events is
needed (no real QEMU sends those on demand).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from qmpwatch.lab import LabSpec, LabVM
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config
from tests.support.fake_qmp import FakeQmp
from tests.support.ports import free_tcp_port

OTHER_USER = 64022  # another local user (a uid the test makes up), in the socket's group
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


async def qmpwatch(*args: str, user: int | None = None) -> tuple[int, str, str]:
    """Run `qmpwatch ARGS`; (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, user=user,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def api_get(api: Path, path: str) -> tuple[int, Any]:
    """GET `path` from the daemon's local API socket: (status, JSON body)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(api))) as http,
        http.get(f"http://localhost{path}") as response,
    ):
        return response.status, await response.json(content_type=None)


async def followers(api: Path) -> int:
    """How many follow the daemon now (its status document says)."""
    _, doc = await api_get(api, "/api/v1/status")
    return int(doc["followers"])


def vm_config(tmp_path: Path, vm: LabVM | Path, port: int, **daemon: object) -> Path:
    socket_path = vm if isinstance(vm, Path) else vm.watch_socket
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": "web01", "socket": str(socket_path)}],
        sections={
            "connect": FAST_CONNECT,
            "daemon": {"metrics_listen": f"127.0.0.1:{port}", **daemon},
        },
    )


@contextlib.asynccontextmanager
async def idle_clients(port: int, count: int) -> AsyncIterator[list[asyncio.StreamReader]]:
    """`count` TCP connections to `port` that never send a byte, held for the block."""
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        while len(opened) < count:
            batch = min(100, count - len(opened))
            opened += await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", port) for _ in range(batch))
            )
        yield [reader for reader, _ in opened]
    finally:
        for _, writer in opened:
            writer.close()


@pytest.mark.qemu
async def test_idle_http_clients_never_keep_a_vm_from_being_watched(
    tmp_path: Path, sock_dir: Path
) -> None:
    """1,100 idle connections to the metrics port of a daemon limited to 1,024 open files:
    the daemon answers the ones beyond its cap at once and stays well below its limit, and
    a VM that crashes and restarts meanwhile is watched again."""
    port = free_tcp_port()
    monitor = sock_dir / "web01.qmp"
    async with LabVM.start(LabSpec("web01"), sock_dir, watch_socket=monitor) as web:
        cfg = vm_config(tmp_path, web, port)
        async with DaemonProcess.start(cfg, open_files=1024) as daemon:
            await daemon.wait_for("metrics_listening")
            await daemon.wait_for("vm_connected", vm="web01")
            async with idle_clients(port, 1100) as clients:
                await web.kill()
                await daemon.wait_for("alert", vm="web01", alert="vm_crashed")
                async with LabVM.start(LabSpec("web01"), sock_dir, watch_socket=monitor):
                    await daemon.wait_for("vm_connected", vm="web01", count=2)
                    capped = await daemon.wait_for("http_clients_capped")
                    async with asyncio.timeout(15):
                        turned_away = await clients[-1].read()
                    open_files = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
                    status, health = await api_get(tmp_path / "api.sock", "/healthz")
    assert capped["max_connections"] == 64
    assert turned_away.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert open_files < 300
    assert (status, health["connected"]) == (200, 1)
    assert not daemon.find("vm_connect_failed", reason="fd_limit")


@pytest.mark.qemu
async def test_a_port_taken_before_start_never_stops_the_watching(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Another user holds the metrics port: the daemon starts anyway and watches, says so,
    reports degraded; `qmpwatch status` asks the daemon, not the squatter; once the port is
    free the daemon binds it, and answers only the Host: values it knows."""
    port = free_tcp_port()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        async with LabVM.start(LabSpec("web01"), sock_dir) as web:
            cfg = vm_config(tmp_path, web, port)
            async with DaemonProcess.start(cfg) as daemon:
                failed = await daemon.wait_for("metrics_listen_failed")
                await daemon.wait_for("vm_connected", vm="web01")
                _, health = await api_get(tmp_path / "api.sock", "/healthz")
                code, out, err = await qmpwatch("status", "-c", str(cfg))
                squatter.close()
                listening = await daemon.wait_for("metrics_listening", timeout=20)
                async with aiohttp.ClientSession() as http:
                    url = f"http://127.0.0.1:{port}/metrics"
                    async with http.get(url) as response:
                        metrics = response.status
                    async with http.get(url, headers={"Host": "evil.example"}) as response:
                        rebound = response.status
    finally:
        squatter.close()
    assert f"127.0.0.1:{port}" in failed["error"]
    assert failed["retry_in_s"] > 0
    assert "metrics_unbound" in health["degraded"]
    assert health["status"] == "degraded"
    assert (code, err) == (0, ""), out + err
    assert out.splitlines()[1].startswith("web01")
    assert f"DEGRADED (metrics_unbound): metrics_listen: cannot listen on 127.0.0.1:{port}" in out
    assert listening["port"] == port
    assert (metrics, rebound) == (200, 421)


async def test_followers_are_bounded_per_user_and_in_bytes(tmp_path: Path, sock_dir: Path) -> None:
    """On the API socket one user may follow 8 times, another user still can; a follower
    that stops reading while megabyte events pour in is dropped with a record, and the
    daemon goes on."""
    os.chmod(sock_dir, 0o755)  # the other user reaches the API socket (0660, its group)
    api = sock_dir / "api.sock"
    monitor = sock_dir / "web01.qmp"
    async with FakeQmp.serve(monitor) as fake:
        # the log keeps every line of the flood: this test is about followers, not the log
        cfg = vm_config(
            tmp_path, monitor, free_tcp_port(), api_socket=str(api), log_backlog_bytes=1 << 30
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("api_listening")
            session = await fake.session(1)
            answers = [await follow(api) for _ in range(9)]
            other = await other_user_follows(api)
            turned_away = await other_user_holds(api, 20)
            status = await qmpwatch("status", "-c", str(cfg))
            big = "x" * (1024 * 1024)
            for n in range(12):
                await session.event("BLOCK_JOB_ERROR", {"device": f"d{n}", "operation": big})
            dropped = await daemon.wait_for("tail_follower_dropped")
            await session.event("RESET", {"guest": True})
            await daemon.wait_for("qmp_event", vm="web01", qmp="RESET")
            for sock, _ in answers:
                sock.close()
    assert [line for _, line in answers] == ["HTTP/1.1 200 OK"] * 8 + [
        "HTTP/1.1 503 Service Unavailable"
    ]
    assert other == "HTTP/1.1 200 OK"
    assert turned_away == 20 - 16  # a quarter of the API socket's 64 connections per user
    assert status[0] in (0, 1), status  # the daemon answered
    assert dropped["uid"] == 0
    assert dropped["queued_bytes"] > 0
    assert daemon.proc.returncode == 0


async def follow(api: Path) -> tuple[socket.socket, str]:
    """A raw follower of every VM's records on the API socket that reads nothing after the
    status line of the answer: (its socket, that line)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(str(api))
    sock.sendall(b"GET /api/v1/records HTTP/1.1\r\nHost: localhost\r\n\r\n")
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    head = b""
    async with asyncio.timeout(15):
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 1)
            if not chunk:
                break
            head += chunk
    return sock, head.split(b"\r\n")[0].decode()


async def other_user_follows(api: Path) -> str:
    """The status line another local user gets when it follows."""
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(b'GET /api/v1/records HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n')\n"
        "print(s.recv(4096).split(b'\\r\\n')[0].decode())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-c", script, str(api), stdout=asyncio.subprocess.PIPE, user=OTHER_USER
    )
    async with asyncio.timeout(15):
        out, _ = await proc.communicate()
    return out.decode().strip()


async def other_user_holds(api: Path, count: int) -> int:
    """Another local user opens `count` idle connections to the API socket: how many the
    daemon turns away at once (503)."""
    script = (
        "import select, socket, sys, time\n"
        "socks = []\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); socks.append(s)\n"
        "busy, end = set(), time.monotonic() + 3\n"
        "while time.monotonic() < end:\n"
        "    ready, _, _ = select.select([s for s in socks if s not in busy], [], [], 0.2)\n"
        "    busy |= {s for s in ready if s.recv(64).startswith(b'HTTP/1.1 503')}\n"
        "print(len(busy))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-c", script, str(api), str(count),
        stdout=asyncio.subprocess.PIPE, user=OTHER_USER,
    )  # fmt: skip
    async with asyncio.timeout(15):
        out, _ = await proc.communicate()
    return int(out)


@pytest.mark.qemu
async def test_escape_sequences_from_a_peer_reach_no_terminal_or_environment(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A QEMU named with escape sequences dials in and pauses: `qmpwatch tail` prints them
    escaped, and the exec sink's environment carries no control character."""
    listen = sock_dir / "qw.sock"
    env_file = tmp_path / "env.out"
    name = "web\x1b]0;pwned\x07\x1b[2J01"
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        arrays={
            "listen": [{"socket": str(listen)}],
            "alert.exec": [{"command": ["/bin/sh", "-c", f"env -0 > {env_file}"]}],
        },
    )
    async with DaemonProcess.start(cfg) as daemon:
        await daemon.wait_for("api_listening")
        tail = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpwatch", "tail", "-c", str(cfg),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(15):
            while await followers(tmp_path / "api.sock") < 1:  # noqa: ASYNC110 - polls HTTP
                await asyncio.sleep(0.05)
        async with LabVM.start(LabSpec(name, dial_in=listen), sock_dir) as vm:
            await daemon.wait_for("vm_connected", vm=name)
            await vm.stop()
            await daemon.wait_for("alert_delivered", sink="exec[0]")
        await daemon.wait_for("vm_removed", vm=name)
        await daemon.stop()
        tail.send_signal(signal.SIGINT)  # tail follows across daemon restarts until Ctrl-C
        async with asyncio.timeout(15):
            out, _ = await tail.communicate()
    shown = out.decode()
    assert "STOP" in shown
    assert "\x1b" not in shown
    assert "\x07" not in shown
    assert "web\\x1b]0;pwned\\x07\\x1b[2J01" in shown
    variables = dict(v.split("=", 1) for v in env_file.read_text().split("\0") if "=" in v)
    assert variables["QMPWATCH_VM"] == "web\\x1b]0;pwned\\x07\\x1b[2J01"
    for key in ("QMPWATCH_VM", "QMPWATCH_SUMMARY"):
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in variables[key]), key


@pytest.mark.qemu
async def test_a_secret_in_a_long_error_text_never_reaches_the_log(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A receiver that answers 500 with a long text echoing the token header and the Basic
    credentials of the URL: the logged error holds neither, nor any prefix of the token."""
    token = "tok-" + secrets.token_hex(16)
    seen: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        body = "e" * 180 + " token=" + request.headers.get("X-Token", "")
        return web.Response(status=500, text=f"{body} auth={request.headers['Authorization']}")

    app = web.Application()
    app.router.add_post("/hook", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_tcp_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with LabVM.start(LabSpec("vm1"), sock_dir) as vm:
            cfg = write_config(
                tmp_path / "c.toml",
                state_dir=tmp_path / "state",
                vms=[{"name": "vm1", "socket": str(vm.watch_socket)}],
                sections={"connect": FAST_CONNECT, "alert": {"retry_initial_s": 0.05}},
                arrays={
                    "alert.webhook": [
                        {
                            "url": f"http://alice:pa55word@127.0.0.1:{port}/hook",
                            "headers": {"X-Token": "env:QW_TEST_TOKEN"},
                        }
                    ]
                },
            )
            async with DaemonProcess.start(cfg, env={"QW_TEST_TOKEN": token}) as daemon:
                await daemon.wait_for("vm_connected", vm="vm1")
                await vm.stop()
                failed = await daemon.wait_for("alert_delivery_failed", sink="webhook[0]")
    finally:
        await runner.cleanup()
    basic = base64.b64encode(b"alice:pa55word").decode()
    assert seen[0] == f"Basic {basic}"  # the receiver did get them
    assert "HTTP 500" in failed["error"]
    logged = json.dumps(daemon.records)
    for leak in (token[:8], basic[:8], "pa55word"):
        assert leak not in logged, leak
