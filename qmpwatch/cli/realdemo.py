"""`qmpwatch demo --real-guest`: the demo's story told by real Linux guests.

Three throwaway QEMUs boot a Debian kernel with a busybox initramfs (`qmpwatch.lab.guestkit`,
fetched into .cache/guest on first use): one guest kernel panics (pvpanic), one stops feeding
its i6300esb watchdog, one fills its virtio disk until the file system under its image is
full, and qmpwatch resumes it once the host makes room (as root only: that disk needs a small
tmpfs). Each guest starts paused and boots when its chapter begins. The daemon's log goes to
stdout, the narration to stderr, as in `qmpwatch demo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qmpwatch.cli.demo import _say, _Seen, watch_during
from qmpwatch.core.config import Config, DaemonConfig, RemediateConfig, VmConfig
from qmpwatch.lab import GuestSpec, LabError, LabSpec, LabVM, QemuNotFound, fetch_kit, require_qemu
from qmpwatch.lab.guestkit import DEFAULT_DIR
from qmpwatch.output import logs

BOOT_TIMEOUT_S = 60.0
FILL_MIB = 16
RESUME = RemediateConfig(
    resume_after_io_error=True, resume_backoff_initial_s=1.0, resume_backoff_max_s=2.0
)


@contextlib.contextmanager
def _small_tmpfs(where: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs at `where` for the block's duration (root only)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def _story(vms: dict[str, LabVM], seen: _Seen, store: Path | None) -> None:
    for name in vms:
        await seen.wait(name, "vm_connected")
    panic, dog = vms["panic01"], vms["dog01"]
    _say(
        "three real Linux guests (Debian's kernel, a busybox initramfs), each waiting to boot; "
        f"QEMU {'.'.join(map(str, panic.qemu_version))}, "
        f"{'KVM' if panic.spec.accel == 'kvm' else 'TCG (no KVM that runs Linux guests here)'}"
    )

    _say(
        "panic01 boots and its kernel panics (echo c > /proc/sysrq-trigger); pvpanic tells "
        "QEMU, which pauses it (-action panic=pause): GUEST_PANICKED -> STOP"
    )
    await panic.cont()
    await seen.wait("panic01", "alert", alert="vm_panicked")
    _say("one page, vm_panicked; it fires until the guest runs again")

    _say(
        "dog01 boots, opens its i6300esb watchdog, feeds it once and stops; QEMU resets it "
        "(-action watchdog=reset): WATCHDOG, then a burst of RESETs as the guest reboots"
    )
    await dog.cont()
    await seen.wait("dog01", "alert", alert="watchdog_fired")
    await seen.wait("dog01", "followup_satisfied", rule="reset_after_watchdog")
    await dog.wait_console("^init idle", timeout=BOOT_TIMEOUT_S)
    _say("dog01 is back: its kernel read the watchdog's reset flag at boot and runs on")

    if store is None:
        _say("(the full disk needs root for its small tmpfs: run as root to see it)")
        return
    disk = vms["disk01"]
    _say(
        f"disk01 boots and writes {FILL_MIB} MiB to its virtio disk, whose image sits on an "
        "8 MiB tmpfs: ENOSPC, and QEMU pauses it (BLOCK_IO_ERROR nospace -> STOP); "
        "[remediate] resume_after_io_error is on"
    )
    await disk.cont()
    await seen.wait("disk01", "alert", alert="vm_stopped_io_error")
    await seen.wait("disk01", "vm_resume_attempted", outcome="paused_again")
    _say("qmpwatch's `cont` finds the disk still full: the VM pauses again, and it retries")
    _say("the host makes room: mount -o remount,size=96m on the tmpfs")
    await asyncio.to_thread(
        subprocess.run, ["mount", "-o", "remount,size=96m", str(store)], check=True
    )
    await seen.wait("disk01", "alert_resolved", alert="vm_stopped_io_error")
    line = await disk.wait_console("^fill done", timeout=BOOT_TIMEOUT_S)
    _say(f"resumed by qmpwatch, and the guest's write completed ({line})")


async def _demo(workdir: Path, kit_dir: Path) -> int:
    as_root = os.geteuid() == 0
    store: Path | None = None
    with contextlib.ExitStack() as stack:
        specs = [
            LabSpec("panic01", guest=GuestSpec("panic", panic_action="pause", kit_dir=kit_dir)),
            LabSpec("dog01", watchdog_action="reset", guest=GuestSpec("watchdog", kit_dir=kit_dir)),
        ]
        if as_root:
            store = stack.enter_context(_small_tmpfs(workdir / "store"))
            image = store / "disk.img"
            with image.open("wb") as f:
                f.truncate(64 << 20)
            options = (("mib", str(FILL_MIB)),)
            specs.append(
                LabSpec(
                    "disk01", guest=GuestSpec("fill", disk=image, options=options, kit_dir=kit_dir)
                )
            )
        async with contextlib.AsyncExitStack() as vms_stack:
            started = time.monotonic()
            vms = await asyncio.gather(
                *(vms_stack.enter_async_context(LabVM.start(s, workdir)) for s in specs)
            )
            by_name = {vm.spec.name: vm for vm in vms}
            config = Config(
                daemon=DaemonConfig(state_dir=str(workdir / "state"), metrics_listen=""),
                vms=tuple(
                    VmConfig(
                        vm.spec.name,
                        str(vm.watch_socket),
                        remediate=RESUME if vm.spec.name == "disk01" else RemediateConfig(),
                    )
                    for vm in vms
                ),
            )
            seen = _Seen()
            await watch_during(
                config, seen, workdir / "state", lambda: _story(by_name, seen, store)
            )
            _say(
                f"done in {time.monotonic() - started:.1f} s. Every record above is what "
                "`qmpwatch run` writes; see README.md to watch your own VMs."
            )
    return 0


def run_real_demo(log_format: str = "json", kit_dir: Path = DEFAULT_DIR) -> int:
    """`qmpwatch demo --real-guest`: returns the exit status."""
    try:
        require_qemu()
        if not (kit_dir / "kit" / "complete").is_file():
            _say(f"fetching a Debian kernel and busybox into {kit_dir} (once; about 70 MB)")
        fetch_kit(kit_dir)
    except (QemuNotFound, LabError) as err:
        print(f"qmpwatch demo: {err}", file=sys.stderr)
        return 1
    writer = logs.configure("console" if log_format == "console" else "json", sys.stdout.buffer)
    try:
        with tempfile.TemporaryDirectory(prefix="qwdemo-", dir="/tmp") as tmp:
            return asyncio.run(_demo(Path(tmp), kit_dir.absolute()))
    except (LabError, TimeoutError, subprocess.CalledProcessError) as err:
        print(f"qmpwatch demo failed: {err!r}", file=sys.stderr)
        return 1
    except ExceptionGroup as group:
        print(f"qmpwatch demo failed: {group.exceptions!r}", file=sys.stderr)
        return 1
    finally:
        writer.flush()
