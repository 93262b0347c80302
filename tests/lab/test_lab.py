"""The lab VM against a real QEMU: every recipe of qemu-facts.md gives its documented events.

Events are checked on the lab's control monitor, the ground truth the daemon's tests compare
against (QEMU broadcasts every event to every monitor). VMs that must wait for the ib700
watchdog run concurrently, so the file stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from qmpwatch.lab import (
    FIRMWARE_SIZE,
    BlkdebugSpec,
    LabClosed,
    LabSpec,
    LabTimeout,
    LabVM,
    QemuBuild,
    QemuNotFound,
    QemuStartError,
    WatchdogAction,
    halt_firmware,
    qemu_binary,
)
from tests.support.display_clients import spice_connect_close, spice_link_main_channel, vnc_session
from tests.support.ports import free_tcp_port, free_vnc_display

_T = TypeVar("_T", bound=Callable[..., object])


def needs_qemu(test: _T) -> _T:
    """Mark a test as running real QEMU (never skipped: `make test` installs QEMU, and a
    missing QEMU fails with QemuNotFound saying what to install)."""
    marked: _T = pytest.mark.qemu(test)
    return marked


ATA_BSY = 0x80
ATA_DRQ = 0x08
ATA_ERR = 0x01
LOCALHOST = "127.0.0.1"


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def cmdline(pid: int) -> list[str]:
    """A process's argv from /proc."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [arg.decode() for arg in raw.split(b"\0")[:-1]]


def process_environ(pid: int) -> list[str]:
    """A process's environment from /proc, as NAME=VALUE strings."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return [entry.decode() for entry in raw.split(b"\0")[:-1]]


def process_gone(pid: int) -> bool:
    """Whether no process (not even a zombie) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def entries(directory: Path) -> list[str]:
    """The names in a directory."""
    return sorted(p.name for p in directory.iterdir())


def write_marker(image: Path, marker: bytes) -> None:
    """Overwrite the start of a disk image."""
    with image.open("r+b") as f:
        f.write(marker)


def read_head(image: Path, size: int) -> bytes:
    """The first bytes of a file."""
    with image.open("rb") as f:
        return f.read(size)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Re-check a device register until ``check`` holds (each check is a QMP round trip)."""
    async with asyncio.timeout(timeout):
        while not await check():
            pass


@contextlib.asynccontextmanager
async def display_vm(tmp_path: Path, *, vnc: bool, spice: bool) -> AsyncIterator[LabVM]:
    """A VM with VNC and/or SPICE on ports picked now (retried if one got taken meanwhile)."""
    for attempt in range(3):
        spec = LabSpec(
            name=f"display{attempt}",
            vnc_display=free_vnc_display() if vnc else None,
            spice_port=free_tcp_port() if spice else None,
        )
        try:
            vm = await LabVM.launch(spec, tmp_path)
        except QemuStartError as exc:
            taken = "in use" in str(exc) or "binding socket" in str(exc)  # VNC / SPICE
            if attempt == 2 or not taken:
                raise
            continue
        async with vm:
            yield vm
        return


# --------------------------------------------------------------------------------------
# No QEMU needed
# --------------------------------------------------------------------------------------


def test_halt_firmware_is_64k_of_hlt(tmp_path: Path) -> None:
    """The firmware is 65,536 bytes of the hlt instruction."""
    path = halt_firmware(tmp_path / "halt.bin")
    data = path.read_bytes()
    assert len(data) == FIRMWARE_SIZE == 65_536
    assert set(data) == {0xF4}


async def test_missing_qemu_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without QEMU, starting a lab VM fails with the package to install."""
    monkeypatch.setenv("QMPWATCH_QEMU", str(tmp_path / "no-such-qemu"))
    assert qemu_binary() is None
    with pytest.raises(QemuNotFound, match="apt-get install qemu-system-x86"):
        await LabVM.launch(LabSpec("x"), tmp_path)


def test_a_build_selected_through_the_environment_round_trips() -> None:
    """`QemuBuild.environ` gives the variables from which `from_environ` makes the same build."""
    build = QemuBuild.from_root("/opt/qemu-x", label="x")
    assert build.binary == "/opt/qemu-x/usr/bin/qemu-system-x86_64"
    assert build.qemu_args() == ["-L", "/opt/qemu-x/usr/share/qemu"]
    assert build.module_dir is not None
    assert build.module_dir.startswith("/opt/qemu-x/usr/lib/")
    env = {k: v for k, v in build.environ().items() if v is not None}
    again = QemuBuild.from_environ(env)
    assert (again.binary, again.data_dir, again.module_dir) == (
        build.binary,
        build.data_dir,
        build.module_dir,
    )
    system = QemuBuild.from_environ({})
    assert system == QemuBuild("qemu-system-x86_64")
    assert system.qemu_args() == []
    assert system.qemu_env() is None
    assert system.environ() == dict.fromkeys(build.environ())


async def test_a_test_not_marked_qemu_cannot_start_qemu(tmp_path: Path) -> None:
    """Outside a test marked qemu, starting a lab VM fails saying to add the marker."""
    with pytest.raises(QemuStartError, match="not marked qemu"):
        await LabVM.launch(LabSpec("unmarked"), tmp_path)
    assert entries(tmp_path) == []


def test_spec_rejects_bad_values() -> None:
    """Specs refuse what QEMU would misparse or reject."""
    with pytest.raises(ValueError, match="comma"):
        LabSpec("a,b")
    with pytest.raises(ValueError, match="watchdog_action"):
        LabSpec("a", watchdog_action="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rerror"):
        BlkdebugSpec(rerror="retry")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        BlkdebugSpec(sector=4096)


# --------------------------------------------------------------------------------------
# Start-up and tear-down
# --------------------------------------------------------------------------------------


@needs_qemu
async def test_early_exit_is_reported_with_stderr(tmp_path: Path) -> None:
    """A QEMU that refuses its command line fails start() with its stderr, leaving nothing."""
    spec = LabSpec("bad", extra_args=("-device", "no-such-device"))
    with pytest.raises(QemuStartError, match="no-such-device") as caught:
        await LabVM.launch(spec, tmp_path)
    assert caught.value.returncode == 1
    assert entries(tmp_path) == []


@needs_qemu
async def test_runs_the_build_of_the_test(tmp_path: Path, qemu_build: QemuBuild) -> None:
    """By default the lab runs the build the environment selects (the test's), and a build
    given explicitly the same way: its binary, -L and QEMU_MODULE_DIR; the greeting agrees."""
    version = qemu_build.version()
    assert qemu_build.label == f"{version[0]}.{version[1]}"
    for explicit in (None, qemu_build):
        async with LabVM.start(LabSpec("which"), tmp_path, qemu=explicit) as vm:
            assert vm.qemu_version == version
            argv = cmdline(vm.pid)
            assert argv[0] == qemu_build.executable()
            assert argv[1 : 1 + len(qemu_build.qemu_args())] == qemu_build.qemu_args()
            if qemu_build.module_dir is not None:
                assert f"QEMU_MODULE_DIR={qemu_build.module_dir}" in process_environ(vm.pid)


@needs_qemu
async def test_close_quits_reaps_and_cleans_up(tmp_path: Path) -> None:
    """Leaving the block ends QEMU (even a frozen one), reaps it and removes the lab's files."""
    async with LabVM.start(LabSpec("tidy"), tmp_path) as vm:
        assert vm.running
        assert await vm.query_status() == "running"
        assert vm.watch_socket.is_socket()
        assert entries(tmp_path) == [vm.control_socket.parent.name]
        vm.freeze()
    assert vm.returncode == 0  # thawed, then quit politely
    assert process_gone(vm.pid)
    assert entries(tmp_path) == []
    assert vm.events[-1][0] == "SHUTDOWN"


@needs_qemu
async def test_cancelled_block_still_kills_qemu(tmp_path: Path) -> None:
    """Cancelling a task inside the block still ends and reaps QEMU."""
    started = asyncio.Event()
    vms: list[LabVM] = []

    async def body() -> None:
        async with LabVM.start(LabSpec("cancelled"), tmp_path) as vm:
            vms.append(vm)
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vms[0].returncode is not None
    assert process_gone(vms[0].pid)


@needs_qemu
async def test_long_workdir_gets_short_socket_paths(tmp_path: Path) -> None:
    """Socket paths stay under 100 bytes even for a deep working directory."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    async with LabVM.start(LabSpec("deep"), deep) as vm:
        assert len(os.fsencode(vm.watch_socket)) < 100
        assert len(os.fsencode(vm.control_socket)) < 100
        assert await vm.query_status() == "running"


@needs_qemu
async def test_peer_credentials_and_cmdline(tmp_path: Path) -> None:
    """SO_PEERCRED on the watch socket names QEMU, whose /proc cmdline shows its options."""
    spec = LabSpec("peer", no_shutdown=True, watchdog_action="pause")
    async with LabVM.start(spec, tmp_path) as vm:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.fspath(vm.watch_socket))
            assert peer_pid(sock) == vm.pid
        argv = cmdline(vm.pid)
        assert "-no-shutdown" in argv
        assert argv[argv.index("-name") + 1] == "peer"
        assert argv[argv.index("-action") + 1] == "watchdog=pause"


@needs_qemu
async def test_restart_on_same_watch_socket_and_disk(tmp_path: Path) -> None:
    """A killed QEMU leaves a stale socket; a new QEMU takes over the path and the disk."""
    watch = tmp_path / "w.sock"
    spec = LabSpec("again", blkdebug=BlkdebugSpec())
    async with LabVM.start(spec, tmp_path, watch_socket=watch) as first:
        assert first.watch_socket == watch
        image = first.disk_image
        assert image is not None
        assert await first.kill() == -9
        with pytest.raises(LabClosed):
            await first.wait_event("SHUTDOWN", timeout=5)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
        pytest.raises(ConnectionRefusedError),
    ):
        sock.connect(os.fspath(watch))  # the stale socket of the killed QEMU
    write_marker(image, b"marker")
    async with LabVM.start(spec, tmp_path, watch_socket=watch, disk_image=image) as second:
        assert second.pid != first.pid
        assert second.disk_image == image
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.fspath(watch))
            assert peer_pid(sock) == second.pid
        assert await second.query_status() == "running"
    assert read_head(image, 6) == b"marker"  # reused, not recreated
    assert entries(tmp_path) == ["again.img"]  # QEMU removes its socket when it quits


@needs_qemu
async def test_freeze_blocks_the_monitor_until_thaw(tmp_path: Path) -> None:
    """A SIGSTOPped QEMU answers nothing (commands time out) until SIGCONT."""
    async with LabVM.start(LabSpec("frozen"), tmp_path) as vm:
        vm.freeze()
        assert vm.frozen
        with pytest.raises(LabTimeout, match="frozen"):
            await vm.execute("query-status", timeout=0.3)
        vm.thaw()
        assert await vm.query_status() == "running"


@needs_qemu
async def test_wait_event_fails_fast_when_qemu_dies(tmp_path: Path) -> None:
    """wait_event raises LabClosed at once on QEMU's death and LabTimeout on silence."""
    async with LabVM.start(LabSpec("dies"), tmp_path) as vm:
        with pytest.raises(LabTimeout, match="no STOP"):
            await vm.wait_event("STOP", timeout=0.05)
        waiter = asyncio.create_task(vm.wait_event("STOP", timeout=30))
        began = time.monotonic()
        await vm.kill()
        with pytest.raises(LabClosed):
            await waiter
        assert time.monotonic() - began < 5


@needs_qemu
async def test_event_history_is_bounded(tmp_path: Path) -> None:
    """The recorder keeps only the newest events; sequence numbers keep counting."""
    async with LabVM.start(LabSpec("bounded"), tmp_path, event_history=3) as vm:
        for _ in range(3):
            mark = vm.mark()
            await vm.stop()
            await vm.wait_event("STOP", after=mark)
            await vm.cont()
            await vm.wait_event("RESUME", after=mark)
        assert [name for name, _ in vm.events] == ["RESUME", "STOP", "RESUME"]
        assert [ev.seq for ev in vm.event_log] == [4, 5, 6]


# --------------------------------------------------------------------------------------
# The recipes
# --------------------------------------------------------------------------------------


@needs_qemu
async def test_stop_and_cont(tmp_path: Path) -> None:
    """stop gives STOP (status paused); cont gives RESUME (status running)."""
    async with LabVM.start(LabSpec("stopcont"), tmp_path) as vm:
        mark = vm.mark()
        await vm.stop()
        assert (await vm.wait_event("STOP", after=mark)).data == {}
        assert await vm.query_status() == "paused"
        await vm.cont()
        assert (await vm.wait_event("RESUME", after=mark)).data == {}
        assert await vm.query_status() == "running"


@needs_qemu
async def test_reset_from_host_and_guest(tmp_path: Path) -> None:
    """system_reset and a keyboard-controller reset give RESET with guest false/true."""
    async with LabVM.start(LabSpec("reset"), tmp_path) as vm:
        mark = vm.mark()
        await vm.system_reset()
        host = await vm.wait_event("RESET", after=mark)
        assert host.data == {"guest": False, "reason": "host-qmp-system-reset"}
        await vm.guest_reset()
        guest = await vm.wait_event("RESET", after=host.seq)
        assert guest.data == {"guest": True, "reason": "guest-reset"}
        assert await vm.query_status() == "running"


@needs_qemu
async def test_rtc_change(tmp_path: Path) -> None:
    """Writing the CMOS year register gives RTC_CHANGE with the new offset."""
    async with LabVM.start(LabSpec("rtc"), tmp_path) as vm:
        await vm.rtc_change()
        event = await vm.wait_event("RTC_CHANGE")
        assert event.data["offset"] >= 365 * 86400 - 60  # one year ahead (two digits)
        assert isinstance(event.data["qom-path"], str)


@needs_qemu
async def test_guest_poweroff_with_no_shutdown(tmp_path: Path) -> None:
    """ACPI soft-off under -no-shutdown: SHUTDOWN, then STOP; QEMU stays with status shutdown."""
    async with LabVM.start(LabSpec("noshut", no_shutdown=True), tmp_path) as vm:
        await vm.guest_poweroff()
        shutdown = await vm.wait_event("SHUTDOWN")
        assert shutdown.data == {"guest": True, "reason": "guest-shutdown"}
        stop = await vm.wait_event("STOP", after=shutdown.seq)
        assert stop.seq > shutdown.seq
        assert await vm.query_status() == "shutdown"
        assert vm.running


@needs_qemu
async def test_guest_poweroff_exits_without_no_shutdown(tmp_path: Path) -> None:
    """ACPI soft-off without -no-shutdown: SHUTDOWN, then QEMU exits (status 0), no STOP."""
    async with LabVM.start(LabSpec("shut"), tmp_path) as vm:
        await vm.guest_poweroff()
        shutdown = await vm.wait_event("SHUTDOWN")
        assert shutdown.data == {"guest": True, "reason": "guest-shutdown"}
        assert await vm.wait_exit(10) == 0
        assert [name for name, _ in vm.events] == ["SHUTDOWN"]


@needs_qemu
async def test_quit(tmp_path: Path) -> None:
    """QMP quit: SHUTDOWN host-qmp-quit, then QEMU exits."""
    async with LabVM.start(LabSpec("quit"), tmp_path) as vm:
        assert await vm.quit() == 0
        assert vm.events == [("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]


async def _watchdog_case(tmp_path: Path, action: WatchdogAction) -> float:
    """Arm the ib700 with ``action`` and check what follows; returns the seconds to fire."""
    async with LabVM.start(LabSpec(f"wd-{action}", watchdog_action=action), tmp_path) as vm:
        began = time.monotonic()
        await vm.arm_watchdog(2)
        fired = await vm.wait_event("WATCHDOG", timeout=15)
        elapsed = fired.received - began
        assert fired.data == {"action": action}
        if action == "reset":
            reset = await vm.wait_event("RESET", after=fired.seq)
            assert reset.data["guest"] is True
            assert await vm.query_status() == "running"
        elif action == "pause":
            await vm.wait_event("STOP", after=fired.seq)
            assert await vm.query_status() == "watchdog"
        elif action == "shutdown":
            await vm.wait_event("POWERDOWN", after=fired.seq)
            assert await vm.query_status() == "running"  # no guest obeys the request
        elif action == "poweroff":
            await vm.wait_exit(10)
            assert vm.find_event("SHUTDOWN") is None
        return elapsed


@needs_qemu
async def test_watchdog_actions(tmp_path: Path) -> None:
    """ib700 fires after about 2 s: reset → RESET, pause → STOP (watchdog),
    shutdown → POWERDOWN, poweroff → QEMU exits without SHUTDOWN."""
    actions: tuple[WatchdogAction, ...] = ("reset", "pause", "shutdown", "poweroff")
    async with asyncio.TaskGroup() as tg:
        tasks = {a: tg.create_task(_watchdog_case(tmp_path, a)) for a in actions}
    for action, task in tasks.items():
        assert 1.5 < task.result() < 6, f"{action} fired after {task.result():.2f} s"


async def _block_io_error_case(tmp_path: Path, name: str, blk: BlkdebugSpec) -> None:
    async with LabVM.start(LabSpec(name, blkdebug=blk), tmp_path) as vm:
        await vm.ata_read_sector(blk.sector)
        error = await vm.wait_event("BLOCK_IO_ERROR")
        assert error.data["device"] == "drive0"
        assert isinstance(error.data["node-name"], str)
        assert error.data["operation"] == "read"
        assert error.data["nospace"] is (blk.errno == errno.ENOSPC)
        assert isinstance(error.data["reason"], str)
        if blk.rerror == "stop":
            assert error.data["action"] == "stop"
            await vm.wait_event("STOP", after=error.seq)
            assert await vm.query_status() == "io-error"
            mark = vm.mark()
            await vm.cont()
            await vm.wait_event("RESUME", after=mark)
            # The request is retried on resume; with once=on it now succeeds.
            await until(lambda: _ata_idle(vm))
            assert await vm.ata_status() & (ATA_DRQ | ATA_ERR) == ATA_DRQ
            assert vm.find_event("BLOCK_IO_ERROR", after=mark) is None
            assert await vm.query_status() == "running"
        else:
            assert error.data["action"] == blk.rerror
            await until(lambda: _ata_idle(vm))
            status = await vm.ata_status()
            assert bool(status & ATA_ERR) is (blk.rerror == "report")
            assert await vm.query_status() == "running"
            assert vm.find_event("STOP") is None


async def _ata_idle(vm: LabVM) -> bool:
    return not await vm.ata_status() & ATA_BSY


@needs_qemu
async def test_block_io_error(tmp_path: Path) -> None:
    """An ATA read of the blkdebug sector: BLOCK_IO_ERROR with the drive's policy
    (stop → STOP, status io-error, retry succeeds after cont; report; ignore; ENOSPC)."""
    cases = {
        "bio-stop": BlkdebugSpec(rerror="stop"),
        "bio-report": BlkdebugSpec(rerror="report"),
        "bio-ignore": BlkdebugSpec(rerror="ignore"),
        "bio-nospace": BlkdebugSpec(errno=errno.ENOSPC, rerror="stop"),
    }
    async with asyncio.TaskGroup() as tg:
        for name, blk in cases.items():
            tg.create_task(_block_io_error_case(tmp_path, name, blk))


@needs_qemu
async def test_vnc_events(tmp_path: Path) -> None:
    """An RFB 3.8 client gives VNC_CONNECTED, VNC_INITIALIZED, VNC_DISCONNECTED."""
    async with display_vm(tmp_path, vnc=True, spice=False) as vm:
        host, port = await vm.vnc_address()
        assert vm.spec.vnc_display is not None
        assert port == 5900 + vm.spec.vnc_display
        init = await vnc_session(host, port)
        assert init.name == f"QEMU ({vm.spec.name})"
        names = ("VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED")
        seen = [await vm.wait_event(name) for name in names]
        assert [ev.seq for ev in seen] == sorted(ev.seq for ev in seen)
        for ev in seen:
            assert ev.data["server"]["service"] == str(port)
            assert ev.data["client"]["websocket"] is False


@needs_qemu
async def test_spice_events(tmp_path: Path) -> None:
    """A bare connect gives SPICE_CONNECTED/DISCONNECTED; a main-channel link adds
    SPICE_INITIALIZED."""
    async with display_vm(tmp_path, vnc=False, spice=True) as vm:
        port = vm.spec.spice_port
        assert port is not None
        await spice_connect_close(LOCALHOST, port)
        connected = await vm.wait_event("SPICE_CONNECTED")
        disconnected = await vm.wait_event("SPICE_DISCONNECTED")
        assert connected.data["client"]["port"] == disconnected.data["client"]["port"]
        assert vm.find_event("SPICE_INITIALIZED") is None

        mark = vm.mark()
        await spice_link_main_channel(LOCALHOST, port)
        await vm.wait_event("SPICE_CONNECTED", after=mark)
        init = await vm.wait_event("SPICE_INITIALIZED", after=mark)
        client = init.data["client"]
        assert client["channel-type"] == 1
        assert client["channel-id"] == 0
        assert client["tls"] is False
        assert isinstance(client["connection-id"], int)
        await vm.wait_event("SPICE_DISCONNECTED", after=init.seq)
