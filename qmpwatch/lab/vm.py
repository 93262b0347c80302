"""`LabVM`: one throwaway QEMU process, from launch to reaping, and what it can be asked.

``async with LabVM.start(spec, workdir) as vm:`` returns once both monitors exist and the
control monitor is negotiated; leaving the block quits QEMU politely, SIGKILLs it after a
deadline, always reaps it and removes the lab's files. QEMU also gets PR_SET_PDEATHSIG=SIGKILL
and its own session, so a dead test runner or a Ctrl-C in a terminal never leaves a stray
QEMU behind or kills it abruptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import re
import shutil
import signal
import socket
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Self

from qemu.qmp import ExecInterruptedError, ExecuteError
from qemu.qmp.protocol import Runstate, StateError

from qmpwatch.lab import devices
from qmpwatch.lab.build import QemuBuild
from qmpwatch.lab.control import DEFAULT_EVENT_HISTORY, EventRecorder, _ControlClient
from qmpwatch.lab.devices import PortWidth
from qmpwatch.lab.errors import LabClosed, LabError, LabTimeout, QemuStartError
from qmpwatch.lab.plan import guest_accel, is_new_socket, prepare
from qmpwatch.lab.spec import LabSpec

_log = logging.getLogger(__package__)

_STDERR_TAIL: Final = 4096


@functools.cache
def _prctl() -> Any:
    """libc's prctl(2), or None where there is none (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _make_pdeathsig_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with SIGKILL when its parent dies (Linux)."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class LabVM(EventRecorder):
    """A running QEMU with a free watch monitor and a control monitor driven by the lab.

    Create it with ``async with LabVM.start(spec, workdir) as vm`` (or ``await
    LabVM.launch(...)`` and later ``await vm.aclose()``). Every method that talks to QEMU
    is bounded by ``command_timeout`` unless given its own ``timeout``. The events QEMU
    broadcasts are recorded as they come (`EventRecorder`: `events`, `wait_event`, ...).
    """

    def __init__(
        self,
        *,
        spec: LabSpec,
        qemu: QemuBuild,
        proc: asyncio.subprocess.Process,
        argv: tuple[str, ...],
        run_dir: Path,
        watch_socket: Path,
        control_socket: Path,
        stderr_path: Path,
        console_path: Path | None,
        disk_image: Path | None,
        command_timeout: float,
        event_history: int,
    ) -> None:
        """Internal: use `LabVM.start` or `LabVM.launch`."""
        super().__init__(spec.name, event_history)
        self.spec: Final = spec
        self.qemu: Final = qemu
        self.argv: Final = argv
        self.watch_socket: Final = watch_socket
        self.control_socket: Final = control_socket
        self.disk_image: Final = disk_image
        self.command_timeout = command_timeout
        self._proc = proc
        self._run_dir = run_dir
        self._stderr_path = stderr_path
        self._console_path = console_path
        self._console = ""  # the guest's console so far (kept after aclose)
        self._stderr_tail = ""
        self._closing = False
        self._closed = False
        self._frozen = False
        self._qmp = _ControlClient(f"qlab-{spec.name}", self._record)
        self._exit_task: asyncio.Task[int] = asyncio.ensure_future(proc.wait())
        self._exit_task.add_done_callback(self._on_exit)
        self._runstate_task: asyncio.Task[None] | None = None
        # Last resort if the object is dropped without aclose(): never leave QEMU running.
        self._finalizer = weakref.finalize(self, _sigkill, proc.pid)

    # ----- creation ---------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        spec: LabSpec,
        workdir: Path | str,
        *,
        watch_socket: Path | str | None = None,
        disk_image: Path | str | None = None,
        start_timeout: float = 30.0,
        command_timeout: float = 10.0,
        event_history: int = DEFAULT_EVENT_HISTORY,
        qemu: QemuBuild | None = None,
    ) -> AsyncIterator[LabVM]:
        """Start QEMU for the block's duration; see `launch` for the arguments."""
        vm = await cls.launch(
            spec,
            workdir,
            watch_socket=watch_socket,
            disk_image=disk_image,
            start_timeout=start_timeout,
            command_timeout=command_timeout,
            event_history=event_history,
            qemu=qemu,
        )
        try:
            yield vm
        finally:
            await vm.aclose()

    @classmethod
    async def launch(
        cls,
        spec: LabSpec,
        workdir: Path | str,
        *,
        watch_socket: Path | str | None = None,
        disk_image: Path | str | None = None,
        start_timeout: float = 30.0,
        command_timeout: float = 10.0,
        event_history: int = DEFAULT_EVENT_HISTORY,
        qemu: QemuBuild | None = None,
    ) -> LabVM:
        """Start QEMU and return once both monitors exist and the control one is negotiated.

        ``workdir`` must exist; the lab's private files (firmware, sockets, blkdebug config,
        QEMU's stderr) go in a fresh directory inside it, or under /tmp when socket paths
        there would be too long, and are removed by `aclose`. ``watch_socket`` puts the
        daemon's monitor at a given path (e.g. the path of a QEMU killed earlier: a stale
        socket file there is replaced by QEMU); the caller owns that path. ``disk_image``
        reuses an image for the blkdebug disk (created when missing); by default the image
        is ``workdir/NAME.img`` and is kept, like everything else the caller owns. ``qemu``
        is the build to run; by default the one the environment selects
        (`QemuBuild.from_environ`).
        """
        build = QemuBuild.from_environ() if qemu is None else qemu
        if spec.guest is not None and spec.accel == "auto":
            accel = await asyncio.to_thread(guest_accel, build, spec.guest)
            spec = dataclasses.replace(spec, accel=accel)
        plan = prepare(build, spec, workdir, watch_socket=watch_socket, disk_image=disk_image)
        try:
            if spec.user is not None:  # QEMU makes its sockets and files in the run directory
                os.chown(plan.run_dir, spec.user, -1)
            log = _open_log(plan.stderr_path)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *plan.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=build.qemu_env(),
                    start_new_session=True,  # a terminal's Ctrl-C is for the lab, not QEMU
                    preexec_fn=_make_pdeathsig_hook(),
                    user=spec.user,
                )
            finally:
                log.close()
        except BaseException:
            shutil.rmtree(plan.run_dir, ignore_errors=True)
            raise
        vm = cls(
            spec=spec,
            qemu=build,
            proc=proc,
            argv=plan.argv,
            run_dir=plan.run_dir,
            watch_socket=plan.watch,
            control_socket=plan.control,
            stderr_path=plan.stderr_path,
            console_path=plan.console,
            disk_image=plan.image,
            command_timeout=command_timeout,
            event_history=event_history,
        )
        try:
            await vm._connect(start_timeout, plan.stale_watch)
        except BaseException:
            await vm.aclose(timeout=2.0)
            raise
        return vm

    async def _connect(self, start_timeout: float, stale: tuple[int, int, int] | None) -> None:
        try:
            async with asyncio.timeout(start_timeout):
                sock = await self._wait_listening(self.control_socket)
                try:
                    await self._qmp.connect(sock)
                except Exception as exc:
                    sock.close()
                    # Monitors open before devices are created: a bad command line shows
                    # up as EOF here. Give QEMU a moment to exit so the error has its status.
                    await asyncio.wait({self._exit_task}, timeout=2.0)
                    if self._exit_task.done():
                        raise self._start_error("QEMU exited during start-up") from exc
                    raise self._start_error(f"control monitor handshake failed: {exc!r}") from exc
                self._runstate_task = asyncio.ensure_future(self._watch_runstate())
                delay = 0.001
                while not is_new_socket(self.watch_socket, stale):
                    await self._pause_unless_exited(delay)
                    delay = min(delay * 2, 0.05)
        except TimeoutError as exc:
            raise self._start_error(
                f"QEMU did not open its monitors within {start_timeout:g} s"
            ) from exc

    async def _wait_listening(self, path: Path) -> socket.socket:
        """Connect to a unix socket QEMU is about to create; fail fast if QEMU exits."""
        loop = asyncio.get_running_loop()
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, os.fspath(path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            except BaseException:
                sock.close()
                raise
            else:
                return sock
            await self._pause_unless_exited(delay)
            delay = min(delay * 2, 0.05)

    async def _pause_unless_exited(self, delay: float) -> None:
        await asyncio.wait({self._exit_task}, timeout=delay)
        if self._exit_task.done():
            raise self._start_error("QEMU exited during start-up")

    def _start_error(self, message: str) -> QemuStartError:
        return QemuStartError(
            f"{self.spec.name} (QEMU {self.qemu.label}): {message}",
            stderr=self.stderr(),
            returncode=self.returncode,
        )

    # ----- the end of the recording ---------------------------------------------------------

    def _on_exit(self, task: asyncio.Task[int]) -> None:
        # Not "closed" yet: events QEMU wrote before exiting may still sit unread in the
        # control socket. The control monitor's EOF (below) is what ends the recording.
        self._finalizer.detach()
        if self._runstate_task is None:
            self._mark_closed(f"QEMU exited with status {self.returncode}")

    async def _watch_runstate(self) -> None:
        while self._qmp.runstate == Runstate.RUNNING:
            await self._qmp.runstate_changed()
        status = self.returncode
        exited = f"; QEMU exited with status {status}" if status is not None else ""
        self._mark_closed(f"control monitor disconnected{exited}")

    # ----- QMP ------------------------------------------------------------------------------

    async def execute(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> object:
        """Run a QMP command on the control monitor and return its ``return`` value.

        Raises qemu.qmp's `ExecuteError` when QEMU answers with an error, `LabTimeout` when
        no answer comes in time (a frozen QEMU never answers) and `LabClosed` when the
        monitor is gone.
        """
        limit = self.command_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await self._qmp.execute(cmd, args)
        except TimeoutError as exc:
            frozen = " (QEMU is frozen)" if self._frozen else ""
            raise LabTimeout(
                f"{self.spec.name}: {cmd} got no answer within {limit:g} s{frozen}"
            ) from exc
        except (ExecInterruptedError, StateError) as exc:
            raise LabClosed(f"{self.spec.name}: {cmd}: control monitor closed: {exc}") from exc

    async def hmp(
        self,
        command_line: str,
        *,
        timeout: float | None = None,
    ) -> str:
        """Run a human-monitor command and return its text output."""
        out = await self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
        if not isinstance(out, str):
            raise LabError(f"human-monitor-command returned {type(out).__name__}, not text")
        return out

    @property
    def qemu_version(self) -> tuple[int, int, int]:
        """``(major, minor, micro)`` from the control monitor's QMP greeting."""
        greeting = self._qmp.greeting
        if greeting is None:
            raise LabClosed(f"{self.spec.name}: no QMP greeting")
        qemu = greeting.QMP.version.get("qemu")
        if not isinstance(qemu, Mapping):
            raise LabError(f"{self.spec.name}: greeting without a QEMU version: {greeting!r}")
        return int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"])

    async def stop(self) -> None:
        """Pause the VM (QMP ``stop``): STOP."""
        await self.execute("stop")

    async def cont(self) -> None:
        """Resume the VM (QMP ``cont``): RESUME."""
        await self.execute("cont")

    async def system_reset(self) -> None:
        """Reset from the host: RESET ``{guest: false, reason: host-qmp-system-reset}``."""
        await self.execute("system_reset")

    async def query_status(self) -> str:
        """The run state from ``query-status`` (``running``, ``paused``, ``io-error``, ...)."""
        out = await self.execute("query-status")
        if not isinstance(out, dict) or not isinstance(out.get("status"), str):
            raise LabError(f"unexpected query-status answer: {out!r}")
        status: str = out["status"]
        return status

    async def vnc_address(self) -> tuple[str, int]:
        """Where QEMU's VNC server listens (from ``query-vnc``)."""
        out = await self.execute("query-vnc")
        if not isinstance(out, dict) or not out.get("enabled"):
            raise LabError(f"{self.spec.name}: VNC is not enabled")
        return str(out["host"]), int(out["service"])

    async def quit(self, *, timeout: float | None = None) -> int:
        """QMP ``quit`` (SHUTDOWN ``host-qmp-quit``), then wait for QEMU to exit."""
        limit = self.command_timeout if timeout is None else timeout
        if self.returncode is None:
            with contextlib.suppress(LabClosed):
                await self.execute("quit", timeout=limit)
        return await self.wait_exit(limit)

    # ----- the guest's side: I/O ports --------------------------------------------------------

    async def port_out(self, port: int, value: int, width: PortWidth = "b") -> None:
        """Write ``value`` to I/O ``port`` as a byte (``b``), 16-bit (``h``) or 32-bit (``w``)."""
        await devices.port_out(self.hmp, port, value, width)

    async def port_in(self, port: int, width: PortWidth = "b") -> int:
        """Read I/O ``port`` (``b``, ``h`` or ``w`` as in `port_out`)."""
        return await devices.port_in(self.hmp, port, width)

    async def guest_reset(self) -> None:
        """Reset as a guest does, through the keyboard controller: RESET ``guest-reset``."""
        await devices.guest_reset(self.hmp)

    async def guest_poweroff(self) -> None:
        """ACPI soft-off as a guest does: SHUTDOWN ``guest-shutdown``.

        With ``-no-shutdown`` QEMU then stops (STOP, status ``shutdown``); without it QEMU
        exits.
        """
        await devices.guest_poweroff(self.hmp, self.spec)

    async def arm_watchdog(self, seconds: int = 2) -> None:
        """Start the ib700 watchdog; it fires after ``seconds`` (even, 0..30) of VM time.

        Needs ``LabSpec.watchdog_action``.
        """
        await devices.arm_watchdog(self.hmp, self.spec, seconds)

    async def ata_read_sector(self, lba: int) -> None:
        """Issue ATA READ SECTORS for one sector at ``lba`` on the primary IDE master."""
        await devices.ata_read_sector(self.hmp, lba)

    async def ata_status(self) -> int:
        """The primary IDE status register (BSY 0x80, DRDY 0x40, DRQ 0x08, ERR 0x01)."""
        return await devices.ata_status(self.hmp)

    async def rtc_change(self, year: int | None = None) -> None:
        """Write the CMOS year register (two digits; default: next year): RTC_CHANGE."""
        await devices.rtc_change(self.hmp, year)

    # ----- a real guest's serial console --------------------------------------------------

    def console(self) -> str:
        """What a real guest wrote on its serial console so far (kept after `aclose`)."""
        if self._console_path is not None and not self._closed:
            with contextlib.suppress(OSError):
                self._console = self._console_path.read_bytes().decode(errors="replace")
        return self._console

    def console_lines(self) -> list[str]:
        """The guest's ``QW: ...`` lines (its /init's progress), without the prefix."""
        return [m.group(1) for m in re.finditer(r"^QW: (.*?)\r?$", self.console(), re.M)]

    async def wait_console(self, pattern: str, timeout: float = 30.0, *, after: int = 0) -> str:
        """Wait for a ``QW:`` line (newer than the first ``after`` ones) that matches the
        regular expression ``pattern``; `LabTimeout` (with the console's end) if none comes."""
        if self._console_path is None:
            raise LabError(f"{self.spec.name}: not a real guest (LabSpec.guest)")
        wanted = re.compile(pattern)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.console_lines()[after:]:
                        if wanted.search(line):
                            return line
                    await asyncio.sleep(0.05)  # a file has no change notice here
        except TimeoutError as exc:
            raise LabTimeout(
                f"{self.spec.name}: no console line like {pattern!r} within {timeout:g} s; "
                f"console ends: {self.console()[-1500:]!r}"
            ) from exc

    # ----- the process ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once reaped (negative: killed by that signal), else None."""
        return self._proc.returncode

    @property
    def running(self) -> bool:
        """Whether QEMU has not exited yet."""
        return self._proc.returncode is None

    @property
    def frozen(self) -> bool:
        """Whether QEMU is stopped with SIGSTOP by `freeze`."""
        return self._frozen

    async def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for QEMU to exit and return its status; `LabTimeout` if it keeps running.

        Also waits for the control monitor's end of file, so every event QEMU sent before
        exiting is in `events` when this returns.
        """
        try:
            async with asyncio.timeout(timeout):
                status = await asyncio.shield(self._exit_task)
                if self._runstate_task is not None:
                    await asyncio.wait({self._runstate_task})
                return status
        except TimeoutError as exc:
            raise LabTimeout(f"{self.spec.name}: QEMU still running after {timeout:g} s") from exc

    async def kill(self, timeout: float = 10.0) -> int:
        """SIGKILL QEMU (as a crash would) and wait for it; returns the exit status."""
        if self.running:
            _sigkill(self.pid)
        self._frozen = False
        return await self.wait_exit(timeout)

    def freeze(self) -> None:
        """SIGSTOP QEMU: its monitors accept nothing and answer nothing until `thaw`."""
        if self.running:
            os.kill(self.pid, signal.SIGSTOP)
            self._frozen = True

    def thaw(self) -> None:
        """SIGCONT QEMU after `freeze`."""
        if self.running:
            os.kill(self.pid, signal.SIGCONT)
        self._frozen = False

    def stderr(self) -> str:
        """The end of what QEMU wrote to stdout/stderr (kept after `aclose`)."""
        if not self._closed:
            with contextlib.suppress(OSError), self._stderr_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - _STDERR_TAIL))
                self._stderr_tail = log.read().decode(errors="replace")
        return self._stderr_tail

    # ----- shutting down --------------------------------------------------------------------

    async def aclose(self, timeout: float = 10.0) -> None:
        """Quit QEMU politely, SIGKILL it after ``timeout``, reap it and remove lab files.

        Safe to call more than once. Even when cancelled, QEMU gets SIGKILL before this
        returns (the reaping then finishes in asyncio's child watcher).
        """
        if self._closing:
            await self.wait_exit(timeout)
            return
        self._closing = True
        try:
            if self.running:
                if self._frozen:
                    self.thaw()
                with contextlib.suppress(LabError, ExecuteError):
                    await self.quit(timeout=timeout / 2)
            if self.running:
                _log.warning("lab VM %s did not quit; killing it", self.spec.name)
                await self.kill(timeout / 2)
        finally:
            # The synchronous part first, so that even a cancelled close leaves nothing.
            if self.running:
                _sigkill(self.pid)
            self.stderr()  # keep the tail before the log file goes
            self.console()
            self._closed = True
            self._cleanup_files()
            await self._close_control()
            if self.running:
                with contextlib.suppress(LabError):
                    await self.wait_exit(timeout)
            self._mark_closed("lab closed")

    async def _close_control(self) -> None:
        try:
            async with asyncio.timeout(2.0):
                await self._qmp.disconnect()
        except Exception as exc:  # EOFError when QEMU exited first; nothing to report
            _log.debug("control monitor of %s ended with %r", self.spec.name, exc)
        if self._runstate_task is not None and not self._runstate_task.done():
            self._runstate_task.cancel()  # only if disconnect() itself timed out
            await asyncio.wait({self._runstate_task})

    def _cleanup_files(self) -> None:
        # A watch socket at a caller-given path is the caller's (a killed QEMU leaves it
        # stale on purpose); the default one lives in the run directory.
        shutil.rmtree(self._run_dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited({self.returncode})"
        return f"LabVM(name={self.spec.name!r}, pid={self.pid}, {state})"


def _open_log(path: Path) -> BinaryIO:
    return path.open("wb")
