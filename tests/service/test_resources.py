"""Resources: an unusable state directory, state writes failing (as on a full disk), and a
file-descriptor limit too low for the configured VMs.

Whatever the host lacks, the daemon keeps logging events and says clearly what is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.support.daemon_harness import DaemonProcess, write_config
from tests.support.fake_qmp import FakeQmp

FAST = {"timeout_s": 2.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}


async def assert_watching(daemon: DaemonProcess, vm: LabVM, name: str) -> None:
    """A client stop and resume: both events logged, the stop alerted and then resolved."""
    mark = daemon.mark()
    await vm.stop()
    alert = await daemon.wait_for("alert", vm=name, after=mark)
    assert alert["alert"] == "vm_stopped_unexpected"
    await vm.cont()
    await daemon.wait_for("alert_resolved", vm=name, after=mark)
    assert [r["qmp"] for r in daemon.find("qmp_event", vm=name, after=mark)] == ["STOP", "RESUME"]


def under_a_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where a directory should be\n")
    return blocker / "state"


def corrupt_database(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite3").write_bytes(b"this is not an SQLite database\n" * 200)
    return state


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("make_state_dir", "why"),
    [(under_a_file, "Not a directory"), (corrupt_database, "file is not a database")],
    ids=["under-a-file", "corrupt-database"],
)
async def test_unusable_state_dir_is_reported_and_events_still_logged(
    tmp_path: Path, sock_dir: Path, make_state_dir: Callable[[Path], Path], why: str
) -> None:
    """State dir unusable: state_store_unavailable names path and cause; watching goes on."""
    state_dir = make_state_dir(tmp_path)
    async with LabVM.start(LabSpec(name="vm1"), sock_dir) as vm:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=state_dir,
            vms=[{"name": "vm1", "socket": str(vm.watch_socket)}],
            sections={"connect": FAST},
        )
        async with DaemonProcess.start(cfg) as daemon:
            problem = await daemon.wait_for("state_store_unavailable")
            assert problem["level"] == "error"
            assert str(state_dir) in problem["error"]
            assert why in problem["error"]
            await daemon.wait_for("vm_connected", vm="vm1")
            await assert_watching(daemon, vm, "vm1")
            assert await daemon.stop() == 0


@pytest.mark.qemu
async def test_state_writes_failing_are_reported_and_recover(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Writes fail (RLIMIT_FSIZE 0, as a full disk): reported once, events go on, then recovered."""
    state_dir = tmp_path / "state"
    async with LabVM.start(LabSpec(name="vm1"), sock_dir) as vm:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=state_dir,
            vms=[{"name": "vm1", "socket": str(vm.watch_socket)}],
            sections={"connect": FAST},
        )
        async with DaemonProcess.start(cfg) as daemon:
            pid = daemon.proc.pid
            await daemon.wait_for("vm_connected", vm="vm1")
            soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))
            mark = daemon.mark()
            await vm.stop()
            problem = await daemon.wait_for("state_store_unavailable", after=mark)
            assert problem["level"] == "error"
            assert str(state_dir / "state.sqlite3") in problem["error"]
            await daemon.wait_for("alert", vm="vm1", alert="vm_stopped_unexpected", after=mark)
            await vm.cont()
            await daemon.wait_for("alert_resolved", vm="vm1", after=mark)
            await vm.stop()  # a second failing write: no second report
            await daemon.wait_for("alert", vm="vm1", alert="vm_stopped_unexpected", after=mark,
                                  count=2)  # fmt: skip
            assert len(daemon.find("state_store_unavailable", after=mark)) == 1

            resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
            mark = daemon.mark()
            await vm.cont()
            await daemon.wait_for("state_store_recovered", after=mark)
            await daemon.wait_for("alert_resolved", vm="vm1", after=mark)
            assert await daemon.stop() == 0
        with contextlib.closing(sqlite3.connect(state_dir / "state.sqlite3")) as db:
            rows = db.execute("SELECT vm, status FROM vm_status").fetchall()
        assert rows == [("vm1", "running")]


@contextlib.asynccontextmanager
async def daemon_with_nofile(cfg: Path, soft: int, hard: int) -> AsyncIterator[DaemonProcess]:
    """The real daemon started with RLIMIT_NOFILE = (soft, hard)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", "run", "-c", str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=limit,
    )  # fmt: skip
    daemon = DaemonProcess(proc, cfg)
    try:
        await daemon.wait_for("daemon_started", timeout=20)
        yield daemon
    finally:
        await daemon.stop()


@contextlib.asynccontextmanager
async def many_fakes(sock_dir: Path, count: int) -> AsyncIterator[list[FakeQmp]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(FakeQmp.serve(sock_dir / f"vm{i:02d}.qmp"))
            for i in range(count)
        ]


VMS = 30


def nofile_config(tmp_path: Path, fakes: list[FakeQmp]) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": f.path.stem, "socket": str(f.path)} for f in fakes],
        sections={"connect": FAST},
    )


async def test_low_soft_fd_limit_is_raised_to_the_hard_limit(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Soft RLIMIT_NOFILE below what 30 VMs need: raised toward the hard limit; all attach."""
    async with many_fakes(sock_dir, VMS) as fakes:
        cfg = nofile_config(tmp_path, fakes)
        async with daemon_with_nofile(cfg, 32, 4096) as daemon:
            raised = await daemon.wait_for("fd_limit_raised")
            assert raised["level"] == "info"
            assert (raised["soft"], raised["hard"], raised["new_soft"]) == (32, 4096, 4096)
            assert raised["needed"] > VMS
            assert raised["vms"] == VMS
            for fake in fakes:
                await daemon.wait_for("vm_connected", vm=fake.path.stem)
            session = await fakes[-1].session(1)
            await session.event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
            await daemon.wait_for("qmp_event", vm=fakes[-1].path.stem, qmp="RESET")
            assert not daemon.find("fd_limit_too_low")
            assert not daemon.find("vm_connect_failed")
            assert await daemon.stop() == 0


async def test_hard_fd_limit_too_low_is_a_clear_error_and_the_daemon_goes_on(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Hard RLIMIT_NOFILE too low: fd_limit_too_low says what to do; VMs over it are retried."""
    async with many_fakes(sock_dir, VMS) as fakes:
        cfg = nofile_config(tmp_path, fakes)
        async with daemon_with_nofile(cfg, 40, 40) as daemon:
            low = await daemon.wait_for("fd_limit_too_low")
            assert low["level"] == "error"
            assert (low["soft"], low["hard"], low["vms"]) == (40, 40, VMS)
            assert low["needed"] > 40
            assert "LimitNOFILE" in low["summary"]
            failed = await daemon.wait_for("vm_connect_failed")
            assert failed["reason"] == "fd_limit"
            assert "Too many open files" in failed["error"]
            connected = await daemon.wait_for("vm_connected")
            fake = next(f for f in fakes if f.path.stem == connected["vm"])
            session = await fake.session(1)
            await session.event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
            await daemon.wait_for("qmp_event", vm=connected["vm"], qmp="RESET")
            assert {r["reason"] for r in daemon.find("vm_connect_failed")} == {"fd_limit"}
            assert await daemon.stop() == 0
