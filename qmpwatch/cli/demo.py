"""`qmpwatch demo`: a throwaway real QEMU walked through the documented sequences.

For a newcomer, in under a minute and with no VM of their own: two QEMU processes with no
guest OS (`qmpwatch.lab`), the real daemon watching them, and a narrated script — a client
pause, a disk I/O error that pauses the VM, a watchdog that fires, a guest poweroff under
-no-shutdown, and a crash. The daemon's JSON log goes to stdout (as it would to journald);
the narration goes to stderr, so `qmpwatch demo | jq` works.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from qmpwatch.core.config import Config, DaemonConfig, VmConfig
from qmpwatch.lab import BlkdebugSpec, LabError, LabSpec, LabVM, QemuNotFound, require_qemu
from qmpwatch.output import logs
from qmpwatch.service.recorder import Services
from qmpwatch.service.statestore import StateStore
from qmpwatch.service.supervisor import Supervisor

STEP_TIMEOUT_S = 20.0


class _Seen:
    """Records the daemon logged, so that each step waits for its outcome (not a sleep)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []
        self.changed = asyncio.Event()

    def observe(self, vm: str, kind: str, fields: Mapping[str, Any], now: float) -> None:
        self.records.append((vm, kind, dict(fields)))
        self.changed.set()

    async def wait(self, vm: str, kind: str, **match: Any) -> dict[str, Any]:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while True:
                self.changed.clear()
                for rvm, rkind, fields in self.records:
                    if (
                        rvm == vm
                        and rkind == kind
                        and all(fields.get(k) == v for k, v in match.items())
                    ):
                        return fields
                await self.changed.wait()


def _say(text: str) -> None:
    print(f"\n==> {text}", file=sys.stderr, flush=True)


async def watch_during(
    config: Config, seen: _Seen, state_dir: Path, story: Callable[[], Awaitable[None]]
) -> None:
    """Watch `config`'s VMs with the daemon's own supervisor while `story` runs."""
    store = StateStore(state_dir)
    try:
        async with asyncio.TaskGroup() as tg:
            supervisor = Supervisor(config, Services(store, observe=seen.observe), tg)
            supervisor.apply()
            try:
                await story()
            finally:
                await supervisor.stop_all()
    finally:
        store.close()


async def _script(web: LabVM, db: LabVM, seen: _Seen) -> None:
    await seen.wait("web01", "vm_connected")
    await seen.wait("db01", "vm_connected")
    version = ".".join(map(str, web.qemu_version))
    _say(
        f"web01 and db01: QEMU {version}, as their QMP greeting says. web01 runs with "
        "-no-shutdown and -action watchdog=pause (QEMU 6.0 and later; 7.2 and 10.0 also "
        "take the older -watchdog-action pause)"
    )

    _say("web01: a monitor client sends `stop`, then `cont` (a warning, then resolved)")
    await web.stop()
    await seen.wait("web01", "alert", alert="vm_stopped_unexpected")
    await web.cont()
    await seen.wait("web01", "alert_resolved", alert="vm_stopped_unexpected")

    _say("web01: a disk read fails with ENOSPC; QEMU pauses the VM (BLOCK_IO_ERROR -> STOP)")
    await web.ata_read_sector(8)
    await seen.wait("web01", "alert", alert="vm_stopped_io_error")
    _say("web01: the operator frees space and resumes the VM (`cont`)")
    await web.cont()
    await seen.wait("web01", "alert_resolved", alert="vm_stopped_io_error")

    _say("web01: the guest stops feeding its watchdog; QEMU pauses it (WATCHDOG -> STOP)")
    await web.arm_watchdog(2)
    await seen.wait("web01", "alert", alert="vm_stopped_watchdog")
    await web.cont()
    await seen.wait("web01", "alert_resolved", alert="vm_stopped_watchdog")

    _say("web01: the guest powers off under -no-shutdown (SHUTDOWN -> STOP, no alert)")
    await web.guest_poweroff()
    await seen.wait("web01", "followup_satisfied", rule="stop_after_shutdown")

    _say("db01: QEMU is killed with SIGKILL (a crash: EOF without SHUTDOWN)")
    await db.kill()
    await seen.wait("db01", "alert", alert="vm_crashed")


async def _demo(workdir: Path) -> int:
    web_spec = LabSpec(
        name="web01",
        no_shutdown=True,
        watchdog_action="pause",
        blkdebug=BlkdebugSpec(errno=28, sector=8),
    )
    async with (
        LabVM.start(web_spec, workdir) as web,
        LabVM.start(LabSpec(name="db01"), workdir) as db,
    ):
        config = Config(
            daemon=DaemonConfig(state_dir=str(workdir / "state"), metrics_listen="", api_socket=""),
            vms=(
                VmConfig("web01", str(web.watch_socket), no_shutdown="auto"),
                VmConfig("db01", str(db.watch_socket), no_shutdown="auto"),
            ),
        )
        seen = _Seen()
        started = time.monotonic()
        await watch_during(config, seen, workdir / "state", lambda: _script(web, db, seen))
        _say(
            f"done in {time.monotonic() - started:.1f} s. Every record above is what "
            "`qmpwatch run` writes; see README.md to watch your own VMs."
        )
    return 0


def run_demo(log_format: str = "json") -> int:
    """`qmpwatch demo`: returns the exit status."""
    try:
        require_qemu()
    except QemuNotFound as err:
        print(f"qmpwatch demo: {err}", file=sys.stderr)
        return 1
    writer = logs.configure("console" if log_format == "console" else "json", sys.stdout.buffer)
    try:
        with tempfile.TemporaryDirectory(prefix="qmpwatch-demo-") as tmp:
            return asyncio.run(_demo(Path(tmp)))
    except (LabError, TimeoutError) as err:
        print(f"qmpwatch demo failed: {err!r}", file=sys.stderr)
        return 1
    except ExceptionGroup as group:
        print(f"qmpwatch demo failed: {group.exceptions!r}", file=sys.stderr)
        return 1
    finally:
        writer.flush()
