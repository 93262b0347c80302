"""A stuck log or state store silences no VM: alerts still reach the webhook, /healthz says
`degraded` naming what is stuck, and a record marks when the stall starts and ends.

The real daemon and a real QEMU behind a [[vm]] socket. The log is the daemon's stdout, a pipe
the test stops reading (as journald stalls); the state store is stuck by another process
holding its databases' write lock (SQLite waits for it), or by putting `state_dir` on a FUSE
pass-through that holds every write (`bench.stallfs`, as a disk that stops completing writes);
the file system of the VM's image is overmounted by a FUSE file system whose server never
answers (as a dead NFS server does), so `statvfs` there hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.stallfs import StallFs
from qmpwatch.lab import BlkdebugSpec, LabSpec, LabVM
from tests.service.test_daemon_qemu import assert_healthy
from tests.service.test_remediate_qemu import small_tmpfs
from tests.support.alert_fixtures import Receiver, receiving
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config
from tests.support.ports import free_tcp_port
from tests.support.scrape import sample, scrape, wait_healthz

pytestmark = pytest.mark.qemu

F_SETPIPE_SZ = 1031


def stalled(reason: str) -> Any:
    def check(body: dict[str, Any]) -> bool:
        degraded = body.get("degraded")
        return isinstance(degraded, dict) and reason in degraded

    return check


def kinds_delivered(receiver: Receiver) -> list[tuple[str, str]]:
    return [(r.json()["kind"], r.json()["status"]) for r in receiver.delivered]


def config(tmp_path: Path, vm: LabVM, port: int, receiver: Receiver, **daemon: object) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket), "no_shutdown": False}],
        sections={
            "connect": FAST_CONNECT,
            "daemon": {"metrics_listen": f"127.0.0.1:{port}", **daemon},
        },
        arrays={"alert.webhook": [{"url": receiver.url, "timeout_s": 2.0}]},
    )


async def listening(port: int, timeout: float = 20.0) -> None:
    """Wait until the daemon's HTTP endpoint accepts connections."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


class Unread:
    """The read end of the daemon's stdout, left unread until `read_all()`."""

    def __init__(self) -> None:
        self.fd, self.write_fd = os.pipe()
        fcntl.fcntl(self.write_fd, F_SETPIPE_SZ, 4096)  # one page: full after a few lines
        self.data = bytearray()
        self._thread: threading.Thread | None = None

    def read_all(self) -> None:
        """From now on, read everything (in a thread) until the daemon closes its end."""

        def run() -> None:
            while chunk := os.read(self.fd, 65536):
                self.data += chunk

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def records(self) -> list[dict[str, Any]]:
        assert self._thread is not None
        self._thread.join(timeout=10)
        return [orjson.loads(line) for line in bytes(self.data).splitlines() if line.strip()]


async def test_a_log_nobody_reads_delays_no_alert(tmp_path: Path, sock_dir: Path) -> None:
    """stdout stops being read: a pause still reaches the webhook and so does its resolution,
    /healthz and qmpwatch_degraded say journal_blocked; once read again, the log has the
    alert, the stall's start and end, and how many lines the bounded backlog dropped."""
    port = free_tcp_port()
    unread = Unread()
    async with (
        receiving() as receiver,
        LabVM.start(LabSpec(name="log01"), sock_dir) as vm,
    ):
        cfg = config(tmp_path, vm, port, receiver, log_backlog_bytes=8192)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpwatch", "run", "-c", str(cfg),
            stdout=unread.write_fd, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        os.close(unread.write_fd)
        try:
            await listening(port)
            await wait_healthz(port, lambda b: b.get("connected") == 1, timeout=20)
            try:
                async with asyncio.timeout(30):
                    while not stalled("journal_blocked")(await wait_healthz(port, bool)):
                        await vm.system_reset()  # log lines until the pipe and backlog fill
            except TimeoutError:
                pytest.fail("the log never stalled although nobody reads it")
            for _ in range(20):
                await vm.system_reset()  # past the backlog: these lines are dropped
            await vm.stop()
            await receiver.wait_for(
                lambda r: ("vm_stopped_unexpected", "firing") in kinds_delivered(r)
            )
            await vm.execute("cont")
            await receiver.wait_for(
                lambda r: ("vm_stopped_unexpected", "resolved") in kinds_delivered(r)
            )
            body = await wait_healthz(port, stalled("journal_blocked"))
            metrics = await scrape(port)
            unread.read_all()
            await wait_healthz(port, lambda b: b["status"] == "ok")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            if not unread._thread:
                unread.read_all()
            await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 0
    assert "stdout" in body["degraded"]["journal_blocked"]
    assert sample(metrics, "qmpwatch_degraded", reason="journal_blocked") == 1
    records = unread.records()
    kinds = [r["event"] for r in records]
    assert "dependency_stalled" in kinds
    assert "dependency_recovered" in kinds
    dropped = [r for r in records if r["event"] == "log_records_dropped"]
    assert dropped
    assert dropped[0]["dropped"] > 0
    alerts = [r for r in records if r["event"] == "alert"]
    assert [a["alert"] for a in alerts] == ["vm_stopped_unexpected"]
    assert not [r for r in records if r["event"] == "internal_error"]


@contextlib.contextmanager
def locked(*paths: Path) -> Iterator[None]:
    """Another process's write lock on each SQLite database, held for the block."""
    dbs = [sqlite3.connect(path, isolation_level=None, timeout=10) for path in paths]
    try:
        for db in dbs:
            db.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        for db in dbs:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()


async def test_a_stuck_state_store_delays_no_alert(tmp_path: Path, sock_dir: Path) -> None:
    """The outbox and state databases are locked by another process, so every commit waits:
    a pause is logged and reaches the webhook meanwhile, /healthz and `qmpwatch status` say
    state_store_slow; once unlocked the stall ends (a record each time) and health is ok."""
    port = free_tcp_port()
    async with (
        receiving() as receiver,
        LabVM.start(LabSpec(name="db01"), sock_dir) as vm,
    ):
        cfg = config(tmp_path, vm, port, receiver)
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="db01")
            state = tmp_path / "state"
            mark = daemon.mark()
            with locked(state / "outbox.sqlite3", state / "state.sqlite3"):
                await vm.stop()  # commits of the alert and of the status: both wait
                await daemon.wait_for("alert", after=mark, alert="vm_stopped_unexpected")
                body = await wait_healthz(port, stalled("state_store_slow"))
                said = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "qmpwatch", "status", "-c", str(cfg),
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                words = (await said.communicate())[0].decode()
                await receiver.wait_for(
                    lambda r: ("vm_stopped_unexpected", "firing") in kinds_delivered(r)
                )
                await vm.execute("cont")
                await daemon.wait_for("alert_resolved", after=mark)
                await daemon.wait_for("dependency_stalled", after=mark, reason="state_store_slow")
            await daemon.wait_for(
                "dependency_recovered", after=mark, reason="state_store_slow", timeout=30
            )
            await wait_healthz(port, lambda b: b["status"] == "ok", timeout=30)
            assert await daemon.stop() == 0
    assert str(state) in body["degraded"]["state_store_slow"]
    assert "DEGRADED (state_store_slow)" in words, words
    assert_healthy(daemon)


@contextlib.contextmanager
def hung_fuse(where: Path) -> Iterator[None]:
    """A FUSE file system over `where` whose server never answers: every lookup and statfs
    there waits, as on a dead NFS server. Closing the device aborts the waiting calls."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"qwhang", str(where).encode(), b"fuse", 0, options) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mounting a FUSE file system at {where}: {os.strerror(err)}")
    try:
        yield
    finally:
        os.close(fd)  # the connection aborts: statfs there fails with ENOTCONN
        libc.umount2(str(where).encode(), 2)  # MNT_DETACH


async def test_a_hung_file_system_under_an_image_delays_no_alert(
    tmp_path: Path, sock_dir: Path
) -> None:
    """The mount holding the VM's image stops answering: statvfs of the storage check
    hangs, /healthz says storage_unresponsive with the mount, a pause still alerts; once the
    file system answers (with an error), the stall ends."""
    port = free_tcp_port()
    async with (
        receiving() as receiver,
        small_tmpfs(tmp_path / "store", "4m") as store,
        LabVM.start(LabSpec("fs01", blkdebug=BlkdebugSpec()), sock_dir,
                    disk_image=store / "disk.img") as vm,
    ):  # fmt: skip
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "fs01", "socket": str(vm.watch_socket), "no_shutdown": False}],
            sections={
                "connect": FAST_CONNECT,
                "daemon": {"metrics_listen": f"127.0.0.1:{port}"},
                "remediate": {"storage_free_percent": 10.0, "storage_check_interval_s": 0.2},
            },
            arrays={"alert.webhook": [{"url": receiver.url, "timeout_s": 2.0}]},
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="fs01")
            mark = daemon.mark()
            with hung_fuse(store):
                body = await wait_healthz(port, stalled("storage_unresponsive"), timeout=20)
                await vm.stop()
                await daemon.wait_for("alert", after=mark, alert="vm_stopped_unexpected")
                await receiver.wait_for(
                    lambda r: ("vm_stopped_unexpected", "firing") in kinds_delivered(r)
                )
                await vm.execute("cont")
                await daemon.wait_for("alert_resolved", after=mark)
            await daemon.wait_for(
                "dependency_recovered", after=mark, reason="storage_unresponsive", timeout=20
            )
            await wait_healthz(port, lambda b: b["status"] == "ok", timeout=20)
            assert await daemon.stop() == 0
    assert str(store) in body["degraded"]["storage_unresponsive"]
    stalls = daemon.find("dependency_stalled", after=mark, reason="storage_unresponsive")
    assert [s["dependency"] for s in stalls] == [str(store)]
    assert_healthy(daemon)


async def test_an_exec_sink_on_a_hung_file_system_delays_no_other_alert(
    tmp_path: Path, sock_dir: Path
) -> None:
    """The exec sink's program lies on a file system that never answers, so starting it
    hangs: the pause is still logged and reaches the webhook, the exec attempt fails on its
    timeout (a record), and the daemon stops cleanly."""
    port = free_tcp_port()
    hang = tmp_path / "hang"
    hang.mkdir()
    async with (
        receiving() as receiver,
        LabVM.start(LabSpec(name="ex01"), sock_dir) as vm,
    ):
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "ex01", "socket": str(vm.watch_socket), "no_shutdown": False}],
            sections={
                "connect": FAST_CONNECT,
                "daemon": {"metrics_listen": f"127.0.0.1:{port}"},
                "alert": {"retry_initial_s": 0.2, "retry_max_s": 0.5},
            },
            arrays={
                "alert.webhook": [{"url": receiver.url, "timeout_s": 2.0}],
                "alert.exec": [{"command": [str(hang / "pager")], "timeout_s": 1.0}],
            },
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="ex01")
            with hung_fuse(hang):
                mark = daemon.mark()
                await vm.stop()
                await daemon.wait_for("alert", after=mark, alert="vm_stopped_unexpected")
                await receiver.wait_for(
                    lambda r: ("vm_stopped_unexpected", "firing") in kinds_delivered(r)
                )
                failed = await daemon.wait_for(
                    "alert_delivery_failed", after=mark, sink="exec[0]", timeout=10
                )
                await vm.execute("cont")
                await daemon.wait_for("alert_resolved", after=mark)
                await receiver.wait_for(
                    lambda r: ("vm_stopped_unexpected", "resolved") in kinds_delivered(r)
                )
                body = await wait_healthz(port, bool)
            assert await daemon.stop() == 0
    assert body["http_status"] == 200
    assert "pager" in failed["target"]
    assert_healthy(daemon)


async def test_a_state_disk_that_stalls_writes_delays_no_alert(
    tmp_path: Path, sock_dir: Path
) -> None:
    """state_dir on a file system that stops completing writes (a FUSE pass-through that
    holds them): a pause is logged and reaches the webhook meanwhile, /healthz says
    state_store_slow; when writes complete again the stall ends and health is ok."""
    port = free_tcp_port()
    backing, state = tmp_path / "backing", tmp_path / "state"
    backing.mkdir()
    state.mkdir()
    async with (
        receiving() as receiver,
        LabVM.start(LabSpec(name="disk01"), sock_dir) as vm,
    ):
        cfg = config(tmp_path, vm, port, receiver)
        with StallFs(backing, state) as fs:
            async with DaemonProcess.start(cfg) as daemon:
                await daemon.wait_for("vm_connected", vm="disk01")
                mark = daemon.mark()
                with fs.stalled():
                    await vm.stop()
                    await daemon.wait_for("alert", after=mark, alert="vm_stopped_unexpected")
                    await receiver.wait_for(
                        lambda r: ("vm_stopped_unexpected", "firing") in kinds_delivered(r)
                    )
                    body = await wait_healthz(port, stalled("state_store_slow"))
                    await vm.execute("cont")
                    await daemon.wait_for("alert_resolved", after=mark)
                    held = fs.stalls
                await daemon.wait_for(
                    "dependency_recovered", after=mark, reason="state_store_slow", timeout=20
                )
                await wait_healthz(port, lambda b: b["status"] == "ok", timeout=20)
                assert await daemon.stop() == 0
    assert held > 0
    assert str(state) in body["degraded"]["state_store_slow"]
    assert_healthy(daemon)
