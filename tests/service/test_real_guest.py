"""The daemon against a real Linux guest: what an operator sees when the guest itself panics,
stops feeding its watchdog, fills its disk, powers off or reboots.

The guest (`qmpwatch.lab.guestkit`: a Debian kernel, a busybox initramfs) acts as its kernel
command line says; QEMU starts paused and boots once the daemon is attached, so no event is
missed. Guests of one test boot side by side under one daemon (about 2.3 s each under TCG).
Each test asserts the pages (critical alerts), their resolutions, the records and `status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.lab import AGENT_PORT_ID, GuestSpec, LabSpec, LabVM
from tests.service.test_remediate_qemu import small_tmpfs
from tests.service.test_status import qmpwatch, status_doc
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, Record, write_config
from tests.support.ports import free_tcp_port
from tests.support.scrape import sample, scrape

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]
KIT_DIR = ROOT / ".cache" / "guest"
BOOT_S = 60.0  # a generous bound for a TCG boot on a loaded machine (~2.3 s idle)


def guest(action: str, **keys: Any) -> GuestSpec:
    """A guest running `action` from the kit that `make test` fetched."""
    return GuestSpec(action=action, kit_dir=KIT_DIR, **keys)


@contextlib.asynccontextmanager
async def guests(sock_dir: Path, specs: Sequence[LabSpec]) -> AsyncIterator[list[LabVM]]:
    """The guests' QEMUs, started side by side (paused before the first instruction)."""
    async with contextlib.AsyncExitStack() as stack:
        vms = await asyncio.gather(
            *(stack.enter_async_context(LabVM.start(s, sock_dir, start_timeout=60)) for s in specs)
        )
        yield list(vms)


@contextlib.asynccontextmanager
async def watched(
    tmp_path: Path, vms: Sequence[LabVM], **sections: Mapping[str, object]
) -> AsyncIterator[tuple[DaemonProcess, int]]:
    """The daemon watching `vms` (with `/api/v1/status` on the port returned); once it is
    attached to each, the guests boot."""
    port = free_tcp_port()
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket)} for vm in vms],
        sections={
            "connect": FAST_CONNECT,
            "daemon": {"metrics_listen": f"127.0.0.1:{port}"},
            **sections,
        },
    )
    async with DaemonProcess.start(cfg) as daemon:
        for vm in vms:
            await daemon.wait_for("vm_connected", vm=vm.spec.name, timeout=20)
        await asyncio.gather(*(vm.cont() for vm in vms))
        yield daemon, port


def pages(daemon: DaemonProcess, vm: str) -> list[str]:
    """The alerts that paged for `vm` (severity critical), in order."""
    return [r["alert"] for r in daemon.find("alert", vm=vm) if r["severity"] == "critical"]


def alerts(daemon: DaemonProcess, vm: str) -> list[tuple[str, str]]:
    """Every alert raised for `vm`: (kind, severity), in order."""
    return [(r["alert"], r["severity"]) for r in daemon.find("alert", vm=vm)]


def qmp(daemon: DaemonProcess, vm: str) -> list[str]:
    """The QMP events logged for `vm`, in order."""
    return [r["qmp"] for r in daemon.find("qmp_event", vm=vm)]


async def vm_entry(port: int, vm: str) -> dict[str, Any]:
    """`vm`'s entry of the status document (what `qmpwatch status --json` prints)."""
    doc = await status_doc(port)
    entries: list[dict[str, Any]] = [v for v in doc["vms"] if v["vm"] == vm]
    assert len(entries) == 1, doc
    return entries[0]


async def test_kernel_panics_page_once_each_and_a_panicking_reboot_loop_is_one_page(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A real kernel panic through pvpanic: `pause` keeps the VM guest-panicked (one page,
    still firing); the default action powers it off (one page, a clean end, no crash); `none`
    with the kernel's panic=1 reboots it into the same panic again and again: the first panic
    pages and resolves on its RESET, the second makes a crash loop (crash_loop_count 2), which
    pages once, and that panic no longer pages."""
    specs = [
        LabSpec("pause01", guest=guest("panic", panic_action="pause")),
        # QEMU's default action (no -action panic=): shutdown
        LabSpec("default01", guest=guest("panic"), extra_args=("-device", "pvpanic")),
        LabSpec("loop01", guest=guest("panic", panic_action="none", reboot_after_panic_s=1)),
    ]
    loop_of_two = {"crash_loop_count": 2}
    async with guests(sock_dir, specs) as (pause, default, loop):
        async with watched(tmp_path, [pause, default, loop], lifecycle=loop_of_two) as watching:
            daemon, port = watching
            await daemon.wait_for("alert", vm="pause01", alert="vm_panicked", timeout=BOOT_S)
            await daemon.wait_for("vm_disconnected", vm="default01", timeout=BOOT_S)
            await daemon.wait_for("alert", vm="loop01", alert="vm_crash_loop", timeout=2 * BOOT_S)
            second = await daemon.wait_for(
                "alert", vm="loop01", alert="vm_panicked", count=2, timeout=2 * BOOT_S
            )
            pause_entry = await vm_entry(port, "pause01")
            default_entry = await vm_entry(port, "default01")
            loop_entry = await vm_entry(port, "loop01")
            assert await pause.query_status() == "guest-panicked"
        assert await default.wait_exit() == 0
    assert pages(daemon, "pause01") == ["vm_panicked"]
    assert pause_entry["status"] == "guest-panicked"
    assert [a["alert"] for a in pause_entry["alerts"]] == ["vm_panicked"]
    assert daemon.find("followup_satisfied", vm="pause01", rule="stop_after_guest_panicked")
    assert not daemon.find("alert", vm="pause01", alert="vm_stopped_unexpected")

    assert qmp(daemon, "default01")[-2:] == ["GUEST_PANICKED", "SHUTDOWN"]
    assert daemon.find("qmp_event", vm="default01", qmp="GUEST_PANICKED")[0]["data"] == {
        "action": "poweroff"
    }
    assert pages(daemon, "default01") == ["vm_panicked"]
    assert daemon.find("vm_disconnected", vm="default01")[0]["cause"] == "shutdown"
    assert not daemon.find("alert", vm="default01", alert="vm_crashed")
    assert default_entry["status"] == "shutdown"

    assert pages(daemon, "loop01") == ["vm_panicked", "vm_crash_loop"]
    assert second["severity"] == "info"  # the crash loop is the page
    resolved = daemon.find("alert_resolved", vm="loop01", alert="vm_panicked")
    assert resolved
    assert resolved[0]["reason"] == "the guest was reset (RESET)"
    assert qmp(daemon, "loop01").count("GUEST_PANICKED") >= 2
    resets = daemon.find("qmp_event", vm="loop01", qmp="RESET")
    assert resets
    assert all(r["data"] == {"guest": True, "reason": "guest-reset"} for r in resets)
    assert loop_entry["status"] == "running"
    assert "vm_crash_loop" in [a["alert"] for a in loop_entry["alerts"]]


async def test_a_guest_that_stops_feeding_its_watchdog(tmp_path: Path, sock_dir: Path) -> None:
    """The guest opens i6300esb and stops feeding it: `reset` pages once and the guest comes
    back (it reads the reset from the device and runs on); `pause` pages as
    vm_stopped_watchdog (watchdog_fired is info) and shows status watchdog; `poweroff` ends
    QEMU with no SHUTDOWN at all: one page, the end is clean, not a crash."""
    specs = [
        LabSpec("reset01", watchdog_action="reset", guest=guest("watchdog")),
        LabSpec("pause02", watchdog_action="pause", guest=guest("watchdog")),
        LabSpec("off01", watchdog_action="poweroff", guest=guest("watchdog")),
    ]
    async with (
        guests(sock_dir, specs) as (reset, pause, off),
        watched(tmp_path, [reset, pause, off]) as (daemon, port),
    ):
        await daemon.wait_for("alert", vm="pause02", alert="vm_stopped_watchdog", timeout=BOOT_S)
        await daemon.wait_for("vm_disconnected", vm="off01", timeout=BOOT_S)
        await reset.wait_console("^init idle", timeout=2 * BOOT_S)  # booted again after the reset
        reset_entry = await vm_entry(port, "reset01")
        pause_entry = await vm_entry(port, "pause02")
        off_entry = await vm_entry(port, "off01")
        assert await off.wait_exit() == 0
    assert reset.console_lines().count("reset by the watchdog") == 1
    assert alerts(daemon, "reset01") == [("watchdog_fired", "critical")]
    assert daemon.find("followup_satisfied", vm="reset01", rule="reset_after_watchdog")
    first_reset = daemon.find("qmp_event", vm="reset01", qmp="RESET")[0]
    assert first_reset["data"] == {"guest": True, "reason": "guest-reset"}
    assert reset_entry["status"] == "running"
    assert reset_entry["alerts"] == []

    assert alerts(daemon, "pause02") == [
        ("watchdog_fired", "info"),
        ("vm_stopped_watchdog", "critical"),
    ]
    assert pause_entry["status"] == "watchdog"
    assert [a["alert"] for a in pause_entry["alerts"]] == ["vm_stopped_watchdog"]

    assert qmp(daemon, "off01")[-1] == "WATCHDOG"  # and nothing after it: no SHUTDOWN
    assert pages(daemon, "off01") == ["watchdog_fired"]
    assert daemon.find("followup_satisfied", vm="off01", rule="exit_after_watchdog")
    assert daemon.find("vm_disconnected", vm="off01")[0]["cause"] == "shutdown"
    assert not daemon.find("alert", vm="off01", alert="vm_crashed")
    assert off_entry["status"] == "shutdown"


async def test_a_guest_filling_its_disk_is_resumed_when_space_returns(
    tmp_path: Path, sock_dir: Path
) -> None:
    """The guest writes 16 MiB to a virtio disk whose image sits on an 8 MiB tmpfs: ENOSPC
    pauses it (one page, status io-error); qmpwatch's resumes fail while the space is gone,
    and once the host grows the file system one works: the alert resolves, the VM runs and
    the guest's write completes."""
    async with small_tmpfs(tmp_path / "store", "8m") as store:
        image = store / "disk.img"
        with image.open("wb") as f:
            f.truncate(64 << 20)
        spec = LabSpec("fill02", guest=guest("fill", disk=image, options=(("mib", "16"),)))
        resume = {
            "resume_after_io_error": True,
            "resume_backoff_initial_s": 0.5,
            "resume_backoff_max_s": 1.0,
            "resume_give_up_after_s": 600.0,
        }
        async with (
            guests(sock_dir, [spec]) as (vm,),
            watched(tmp_path, [vm], remediate=resume) as (daemon, port),
        ):
            paused = await daemon.wait_for(
                "alert", vm="fill02", alert="vm_stopped_io_error", timeout=BOOT_S
            )
            entry = await vm_entry(port, "fill02")
            await daemon.wait_for("vm_resume_attempted", vm="fill02", outcome="paused_again")
            grow = await asyncio.create_subprocess_exec(
                "mount", "-o", "remount,size=96m", str(store)
            )
            assert await grow.wait() == 0
            resolved = await daemon.wait_for(
                "alert_resolved", vm="fill02", alert="vm_stopped_io_error", timeout=30
            )
            done = await vm.wait_console("^fill done", timeout=BOOT_S)
            after = await vm_entry(port, "fill02")
    assert pages(daemon, "fill02") == ["vm_stopped_io_error"]
    assert paused["details"]["nospace"] is True
    assert paused["details"]["device"] == "disk0"
    assert paused["details"]["storage_fs"] == "tmpfs"
    assert entry["status"] == "io-error"
    assert "No space left on device" in entry["why"]
    assert resolved["reason"].startswith("resumed by qmpwatch after")
    assert done == "fill done rc=0"
    assert after["status"] == "running"
    assert after["alerts"] == []


async def test_a_guest_powering_off_or_rebooting_pages_nobody(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Ordinary lifecycle, no page: the guest powers off under -no-shutdown (SHUTDOWN then
    STOP, status shutdown); the host's system_powerdown is answered by the guest's acpid
    (POWERDOWN, SHUTDOWN, a clean exit); the guest reboots (a burst of RESETs, running)."""
    specs = [
        LabSpec("off02", no_shutdown=True, guest=guest("poweroff")),
        LabSpec("acpi01", guest=guest("idle")),
        LabSpec("boot01", guest=guest("reboot")),
    ]
    async with (
        guests(sock_dir, specs) as (off, acpi, boot),
        watched(tmp_path, [off, acpi, boot]) as (daemon, port),
    ):
        await daemon.wait_for(
            "followup_satisfied", vm="off02", rule="stop_after_shutdown", timeout=BOOT_S
        )
        await boot.wait_console("^init", after=1, timeout=BOOT_S)  # its second boot
        await daemon.wait_for("qmp_event", vm="boot01", qmp="RESET", timeout=BOOT_S)
        entries = {vm: await vm_entry(port, vm) for vm in ("off02", "boot01")}
        await boot.quit()  # it would reboot again and again
        await acpi.wait_console("^idle", timeout=BOOT_S)
        await acpi.execute("system_powerdown")
        await daemon.wait_for("vm_disconnected", vm="acpi01", timeout=BOOT_S)
        entries["acpi01"] = await vm_entry(port, "acpi01")
        assert await acpi.wait_exit() == 0
    for vm in ("off02", "acpi01", "boot01"):
        assert alerts(daemon, vm) == [], vm
    assert qmp(daemon, "off02")[-2:] == ["SHUTDOWN", "STOP"]
    assert entries["off02"]["status"] == "shutdown"

    assert qmp(daemon, "acpi01")[-2:] == ["POWERDOWN", "SHUTDOWN"]
    assert daemon.find("qmp_event", vm="acpi01", qmp="SHUTDOWN")[0]["data"] == {
        "guest": True,
        "reason": "guest-shutdown",
    }
    assert "power button" in acpi.console_lines()
    assert daemon.find("vm_disconnected", vm="acpi01")[0]["cause"] == "shutdown"
    assert entries["acpi01"]["status"] == "shutdown"

    resets: list[Record] = daemon.find("qmp_event", vm="boot01", qmp="RESET")
    assert all(r["data"] == {"guest": True, "reason": "guest-reset"} for r in resets)
    assert entries["boot01"]["status"] == "running"


async def test_the_guest_agent_port_opening_and_closing(tmp_path: Path, sock_dir: Path) -> None:
    """The guest opens its org.qemu.guest_agent.0 port (busybox on /dev/vportNpM), closes it
    and opens it again: each change is a vm_agent_port record, in status (open or closed,
    since when) and in qmpwatch_vm_agent_port_open; closed longer than agent_absent_after_s
    while running, vm_agent_absent warns (no page), and resolves when the port opens."""
    spec = LabSpec(
        "agent01",
        guest=guest("agent", agent_port=True, options=(("agent", "open,1,close,8,open"),)),
    )
    async with (
        guests(sock_dir, [spec]) as (vm,),
        watched(tmp_path, [vm], lifecycle={"agent_absent_after_s": 4.0}) as (daemon, port),
    ):
        learned = await daemon.wait_for("vm_agent_port", vm="agent01", origin="resync")
        opened = await daemon.wait_for("vm_agent_port", vm="agent01", open=True, timeout=BOOT_S)
        closed = await daemon.wait_for("vm_agent_port", vm="agent01", open=False, origin="event")
        closed_entry = await vm_entry(port, "agent01")
        closed_metric = sample(await scrape(port), "qmpwatch_vm_agent_port_open", vm="agent01")
        # (a boot slower than agent_absent_after_s warns too, and resolves at the first open)
        since = daemon.records.index(closed)
        absent = await daemon.wait_for(
            "alert", vm="agent01", alert="vm_agent_absent", after=since, timeout=20
        )
        absent_entry = await vm_entry(port, "agent01")
        resolved = await daemon.wait_for(
            "alert_resolved", vm="agent01", alert="vm_agent_absent", after=since, timeout=20
        )
        open_entry = await vm_entry(port, "agent01")
        open_metric = sample(await scrape(port), "qmpwatch_vm_agent_port_open", vm="agent01")
        code, text, _ = await qmpwatch("status", "-c", str(tmp_path / "c.toml"))
    assert "agent open" in vm.console_lines()
    assert (learned["open"], learned["device"]) == (False, AGENT_PORT_ID)
    assert (opened["origin"], closed["origin"]) == ("event", "event")
    assert closed_entry["agent_port"]["open"] is False
    assert closed_entry["agent_port"]["since"] == closed["timestamp"]
    assert closed_metric == 0
    assert absent["severity"] == "warning"
    assert absent["details"]["absent_after_s"] == 4.0
    assert absent["details"]["closed_s"] >= 4.0
    assert [a["alert"] for a in absent_entry["alerts"]] == ["vm_agent_absent"]
    assert resolved["reason"] == "the guest agent opened its port"
    assert pages(daemon, "agent01") == []
    assert open_entry["agent_port"]["open"] is True
    assert open_entry["alerts"] == []
    assert open_metric == 1
    assert code == 0, text
    assert "\n  agent port open since " in text


async def test_demo_with_real_guests_tells_its_story() -> None:
    """`qmpwatch demo --real-guest` boots its guests, narrates a kernel panic, a watchdog and
    a full disk resumed by qmpwatch (the suite runs as root, so the disk chapter runs), and
    exits 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpwatch", "demo", "--real-guest", "--guest-dir", str(KIT_DIR),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(240):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    records = [json.loads(line) for line in out.splitlines()]
    raised = [(r["vm"], r["alert"], r["severity"]) for r in records if r["event"] == "alert"]
    assert raised == [
        ("panic01", "vm_panicked", "critical"),
        ("dog01", "watchdog_fired", "critical"),
        ("disk01", "vm_stopped_io_error", "critical"),
    ]
    resolved = [r for r in records if r["event"] == "alert_resolved"]
    assert [(r["vm"], r["alert"]) for r in resolved] == [("disk01", "vm_stopped_io_error")]
    assert resolved[0]["reason"].startswith("resumed by qmpwatch after")
    narration = err.decode()
    assert "the guest's write completed (fill done rc=0)" in narration
    assert "==> done in" in narration
