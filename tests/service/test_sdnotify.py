"""sd_notify messages, received on a real datagram socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from qmpwatch.service import sdnotify

DEADLINE_S = 5.0


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound to a file path, named by NOTIFY_SOCKET."""
    with tempfile.TemporaryDirectory(prefix="qmpw-") as tmp:  # short: sun_path has 108 bytes
        path = str(Path(tmp) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(DEADLINE_S)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        with sock:
            yield sock


def lines(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_sends_ready_and_status(receiver: socket.socket) -> None:
    """ready() sends READY=1 and, when given, the STATUS= line in the same datagram."""
    assert sdnotify.ready("3 VMs, 3 connected, 0 alerts firing")
    assert lines(receiver) == ["READY=1", "STATUS=3 VMs, 3 connected, 0 alerts firing"]


def test_each_helper_sends_its_assignment(receiver: socket.socket) -> None:
    """status(), watchdog(), stopping() and notify() each send their own datagram."""
    assert sdnotify.status("starting")
    assert sdnotify.watchdog()
    assert sdnotify.stopping()
    assert sdnotify.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=slow")
    assert lines(receiver) == ["STATUS=starting"]
    assert lines(receiver) == ["WATCHDOG=1"]
    assert lines(receiver) == ["STOPPING=1"]
    assert lines(receiver) == ["EXTEND_TIMEOUT_USEC=5000000", "STATUS=slow"]


def test_reloading_carries_monotonic_time(receiver: socket.socket) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC= taken from CLOCK_MONOTONIC."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = lines(receiver)
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_is_kept_on_one_line(receiver: socket.socket) -> None:
    """A newline in a status text cannot inject another assignment."""
    assert sdnotify.status("two\nREADY=1")
    assert lines(receiver) == ["STATUS=two READY=1"]


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name reaches the abstract socket of that name."""
    name = f"qmpwatch-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(DEADLINE_S)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert lines(sock) == ["READY=1"]


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd every helper is a no-op that returns False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready()
    assert not sdnotify.watchdog()


def test_unreachable_socket_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET nobody listens on gives False and one sd_notify_failed record."""
    with tempfile.TemporaryDirectory(prefix="qmpw-") as tmp:
        monkeypatch.setenv("NOTIFY_SOCKET", str(Path(tmp) / "gone"))
        with capture_logs() as logs:
            assert not sdnotify.status("x")
    assert [r["event"] for r in logs] == ["sd_notify_failed"]
    assert logs[0]["log_level"] == "warning"


def test_unsupported_address_is_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path or vsock: address is refused with a record, not sent anywhere."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with capture_logs() as logs:
        assert not sdnotify.ready()
    assert logs[0]["event"] == "sd_notify_failed"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("30000000", "1", None),
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """WATCHDOG_USEC gives the interval, only for the process WATCHDOG_PID names."""
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(os.getpid()) if value == "self" else value)
    assert sdnotify.watchdog_interval() == expected


async def test_keep_alive_pings_from_the_loop(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep_alive() sends WATCHDOG=1 repeatedly, at half the WATCHDOG_USEC interval."""
    receiver.setblocking(False)
    loop = asyncio.get_running_loop()
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # 40 ms: a ping every 20 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    sent_at: list[float] = []

    def alive() -> bool:
        sent_at.append(loop.time())
        return True

    async with asyncio.timeout(DEADLINE_S), asyncio.TaskGroup() as tg:
        task = tg.create_task(sdnotify.keep_alive(alive=alive))
        for _ in range(3):
            assert await loop.sock_recv(receiver, 4096) == b"WATCHDOG=1"
        task.cancel()
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    resolution = time.get_clock_info("monotonic").resolution
    assert all(gap >= 0.02 - resolution for gap in gaps)


async def test_keep_alive_skips_pings_while_not_alive(receiver: socket.socket) -> None:
    """When the alive() check fails no ping is sent, so systemd's watchdog would fire."""
    receiver.setblocking(False)
    loop = asyncio.get_running_loop()
    checks = 0
    healthy = asyncio.Event()

    def alive() -> bool:
        nonlocal checks
        checks += 1
        if checks == 3:
            healthy.set()
        return checks >= 3

    async with asyncio.timeout(DEADLINE_S), asyncio.TaskGroup() as tg:
        task = tg.create_task(sdnotify.keep_alive(0.02, alive))
        assert await loop.sock_recv(receiver, 4096) == b"WATCHDOG=1"
        task.cancel()
    assert healthy.is_set()
    assert checks == 3  # the first ping came only after two failed checks


async def test_keep_alive_without_watchdog_returns(receiver: socket.socket) -> None:
    """Without WATCHDOG_USEC keep_alive() ends at once, so a TaskGroup does not wait on it:
    it sends systemd nothing and never asks whether the daemon is alive."""
    asked: list[bool] = []

    def alive() -> bool:
        asked.append(True)
        return True

    async with asyncio.timeout(DEADLINE_S):
        task = asyncio.ensure_future(sdnotify.keep_alive(alive=alive))
        await asyncio.sleep(0)  # one turn: a loop that pings would have pinged by now
        assert task.done()
    assert task.result() is None
    assert asked == []
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.recv(4096)  # no datagram: no WATCHDOG=1


def test_status_line_wording() -> None:
    """The STATUS summary counts VMs, connections and firing alerts, with plurals."""
    assert sdnotify.status_line(12, 11, 1) == "12 VMs, 11 connected, 1 alert firing"
    assert sdnotify.status_line(1, 0, 0) == "1 VM, 0 connected, 0 alerts firing"
