"""VM lifecycles as real hosts drive them: real QEMUs, the real daemon, a real webhook receiver.

libvirt and Proxmox run QEMU with -no-shutdown, reboot guests with SHUTDOWN/STOP/reset/cont,
end VMs with `quit` or signals and restart them: each test walks a real QEMU through one such
flow (recipes in qemu-facts.md) and checks what an operator would see: the daemon's JSON log,
its metrics, and the notifications a webhook gets. Absence of a record is asserted only after
the daemon has stopped, when its log is complete.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qmpwatch.lab import LabClosed, LabSpec, LabVM
from tests.support.alert_fixtures import Receiver, receiving
from tests.support.daemon_harness import ANY_PORT, DaemonProcess, write_config

pytestmark = pytest.mark.qemu

PVPANIC_PORT = 0x505
PANICKED, CRASH_LOADED = 1, 2  # pvpanic's bits


def pvpanic(action: str) -> tuple[str, ...]:
    """QEMU options for a pvpanic device and what QEMU does on a guest panic."""
    return ("-device", "pvpanic", "-action", f"panic={action}")


def config(
    tmp_path: Path,
    vms: Sequence[LabVM | tuple[str, Path]],
    *,
    name: str = "c.toml",
    hook: Receiver | None = None,
    sections: dict[str, dict[str, object]] | None = None,
) -> Path:
    entries = [
        {"name": vm.spec.name, "socket": str(vm.watch_socket)}
        if isinstance(vm, LabVM)
        else {"name": vm[0], "socket": str(vm[1])}
        for vm in vms
    ]
    return write_config(
        tmp_path / name,
        state_dir=tmp_path / "state",
        vms=entries,
        sections=sections,
        arrays={"alert.webhook": [{"url": hook.url}]} if hook is not None else None,
    )


def alerts(daemon: DaemonProcess, vm: str) -> list[tuple[str, str]]:
    return [(r["alert"], r["severity"]) for r in daemon.find("alert", vm=vm)]


def notifications(hook: Receiver) -> list[tuple[str, str, str]]:
    return [(p["status"], p["kind"], p["severity"]) for p in (r.json() for r in hook.delivered)]


def assert_clean_run(daemon: DaemonProcess) -> None:
    assert daemon.proc.returncode == 0, daemon.stderr_text()
    assert not daemon.bad_lines
    assert not daemon.find("internal_error")


async def test_a_crash_after_a_fake_reboot_is_a_crash(tmp_path: Path, sock_dir: Path) -> None:
    """libvirt's reboot (SHUTDOWN, STOP, system_reset, cont), then kill -9: vm_crashed."""
    async with (
        LabVM.start(LabSpec("reboot01", no_shutdown=True), sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, [vm])) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="reboot01")
        await vm.guest_poweroff()
        await daemon.wait_for("followup_satisfied", vm="reboot01", rule="stop_after_shutdown")
        await vm.system_reset()
        await vm.cont()
        await daemon.wait_for("qmp_event", vm="reboot01", qmp="RESUME")
        await vm.kill()
        gone = await daemon.wait_for("vm_disconnected", vm="reboot01")
        crashed = await daemon.wait_for("alert", vm="reboot01", alert="vm_crashed")
    assert gone["cause"] == "eof"
    assert gone["level"] == "warning"
    assert crashed["severity"] == "critical"
    assert_clean_run(daemon)


async def test_a_shutdown_still_stopped_then_gone_is_clean(tmp_path: Path, sock_dir: Path) -> None:
    """SHUTDOWN, STOP, and QEMU ends while still stopped (Proxmox's quit): a clean end."""
    async with (
        LabVM.start(LabSpec("pve01", no_shutdown=True), sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, [vm])) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="pve01")
        await vm.guest_poweroff()
        await daemon.wait_for("followup_satisfied", vm="pve01", rule="stop_after_shutdown")
        await vm.kill()  # qmeventd's SIGKILL after its timeout
        gone = await daemon.wait_for("vm_disconnected", vm="pve01")
    assert gone["cause"] == "shutdown"
    assert "vm_crashed" not in [a for a, _ in alerts(daemon, "pve01")]
    assert_clean_run(daemon)


@pytest.mark.parametrize("how", ["quit", "sigterm", "sigint"])
async def test_quit_and_signals_end_qemu_cleanly_under_no_shutdown(
    tmp_path: Path, sock_dir: Path, how: str
) -> None:
    """`quit`, SIGTERM, SIGINT end QEMU even under -no-shutdown: no STOP owed, no crash."""
    async with (
        LabVM.start(LabSpec("end01", no_shutdown=True), sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, [vm])) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="end01")
        if how == "quit":
            await vm.quit()
        else:
            os.kill(vm.pid, signal.SIGTERM if how == "sigterm" else signal.SIGINT)
            await vm.wait_exit()
        gone = await daemon.wait_for("vm_disconnected", vm="end01")
    (shutdown,) = daemon.find("qmp_event", vm="end01", qmp="SHUTDOWN")
    assert shutdown["data"]["reason"] == ("host-qmp-quit" if how == "quit" else "host-signal")
    assert gone["cause"] == "shutdown"
    assert not daemon.find("followup_missed", vm="end01")
    assert alerts(daemon, "end01") == []
    assert_clean_run(daemon)


async def test_a_watchdog_reset_under_no_reboot_is_satisfied(
    tmp_path: Path, sock_dir: Path
) -> None:
    """-no-reboot turns the watchdog's reset into SHUTDOWN(guest-reset): the rule is met."""
    spec = LabSpec(
        "noreboot01", no_shutdown=True, watchdog_action="reset", extra_args=("-no-reboot",)
    )
    async with (
        LabVM.start(spec, sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, [vm])) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="noreboot01")
        await vm.arm_watchdog()
        met = await daemon.wait_for("followup_satisfied", vm="noreboot01", timeout=20,
                                    rule="reset_after_watchdog")  # fmt: skip
        await daemon.wait_for("followup_satisfied", vm="noreboot01", rule="stop_after_shutdown")
        shutdown = vm.find_event("SHUTDOWN")
        assert shutdown is not None
        assert shutdown.data["reason"] == "guest-reset"
        assert vm.find_event("RESET") is None
    assert met["expected"] == "RESET"
    assert not daemon.find("followup_missed", vm="noreboot01")
    assert [a for a, _ in alerts(daemon, "noreboot01")] == ["watchdog_fired"]
    assert_clean_run(daemon)


async def test_a_panic_that_keeps_running_resolves_when_the_guest_resets(
    tmp_path: Path, sock_dir: Path
) -> None:
    """pvpanic with panic=none: vm_panicked; the crash kernel is the same incident; a guest
    reset resolves it."""
    async with (
        LabVM.start(LabSpec("panic01", extra_args=pvpanic("none")), sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, [vm])) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="panic01")
        await vm.port_out(PVPANIC_PORT, PANICKED)
        panicked = await daemon.wait_for("alert", vm="panic01", alert="vm_panicked")
        await vm.port_out(PVPANIC_PORT, CRASH_LOADED)
        await daemon.wait_for("qmp_event", vm="panic01", qmp="GUEST_CRASHLOADED")
        assert await vm.query_status() == "running"
        await vm.guest_reset()
        resolved = await daemon.wait_for("alert_resolved", vm="panic01")
    assert panicked["severity"] == "critical"
    assert panicked["details"]["action"] == "run"
    assert (resolved["alert"], resolved["fingerprint"]) == ("vm_panicked", panicked["fingerprint"])
    assert resolved["reason"] == "the guest was reset (RESET)"
    assert alerts(daemon, "panic01") == [("vm_panicked", "critical")]
    assert_clean_run(daemon)


async def test_panics_again_and_again_are_one_crash_loop(tmp_path: Path, sock_dir: Path) -> None:
    """Three panic-and-reboot rounds: one critical vm_crash_loop (the third panic does not page
    on its own), resolved once the VM has been quiet for crash_loop_quiet_s."""
    lifecycle: dict[str, object] = {
        "crash_loop_count": 3,
        "crash_loop_window_s": 600.0,
        "crash_loop_quiet_s": 2.0,
    }
    async with (
        receiving() as hook,
        LabVM.start(LabSpec("loop01", extra_args=pvpanic("none")), sock_dir) as vm,
    ):
        cfg = config(tmp_path, [vm], hook=hook, sections={"lifecycle": lifecycle})
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="loop01")
            for round_ in range(1, 4):
                await vm.port_out(PVPANIC_PORT, PANICKED)
                await daemon.wait_for("alert", vm="loop01", alert="vm_panicked", count=round_)
                await vm.guest_reset()
                await daemon.wait_for("alert_resolved", vm="loop01", alert="vm_panicked",
                                      count=round_)  # fmt: skip
            loop = await daemon.wait_for("alert", vm="loop01", alert="vm_crash_loop")
            quiet = await daemon.wait_for("alert_resolved", vm="loop01", alert="vm_crash_loop",
                                          timeout=10)  # fmt: skip
            await hook.wait_for(lambda h: ("resolved", "vm_crash_loop", "critical")
                                in notifications(h), what="the loop's resolution")  # fmt: skip
    assert alerts(daemon, "loop01") == [
        ("vm_panicked", "critical"),
        ("vm_panicked", "critical"),
        ("vm_crash_loop", "critical"),
        ("vm_panicked", "info"),
    ]
    assert loop["details"]["by_kind"] == {"panic": 3}
    assert quiet["reason"] == "no incident for 2 s"
    assert_clean_run(daemon)


async def metrics_text(port: int) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        return await response.text()


async def test_vms_gone_while_qmpwatch_was_down(tmp_path: Path, sock_dir: Path) -> None:
    """Killed while qmpwatch was down: vm_gone_while_unmonitored (critical), resolved when the
    VM is back. Shut down before qmpwatch stopped: said in the log, no alert. Both have a
    qmpwatch_vm_connected series of 0."""
    alive_path = sock_dir / "alive01.qmp"
    async with LabVM.start(LabSpec("down01"), sock_dir) as down:
        cfg = config(tmp_path, [("alive01", alive_path), down],
                     sections={"daemon": {"metrics_listen": ANY_PORT}})  # fmt: skip
        alive = await LabVM.launch(LabSpec("alive01"), sock_dir, watch_socket=alive_path)
        try:
            async with DaemonProcess.start(cfg) as first:
                await first.wait_for("vm_connected", vm="alive01")
                await first.wait_for("vm_connected", vm="down01")
                await down.guest_poweroff()
                await first.wait_for("vm_disconnected", vm="down01", cause="shutdown")
            await alive.kill()  # while qmpwatch is down
        finally:
            await alive.aclose()
        async with DaemonProcess.start(cfg) as second:
            gone = await second.wait_for("alert", vm="alive01", alert="vm_gone_while_unmonitored")
            said = await second.wait_for("vm_gone", vm="down01")
            await second.wait_for("vm_gone", vm="alive01")
            text = await metrics_text(second.metrics_port)
            async with LabVM.start(LabSpec("alive01"), sock_dir, watch_socket=alive_path):
                back = await second.wait_for("alert_resolved", vm="alive01", timeout=20)
    assert gone["severity"] == "critical"
    assert gone["details"]["last_status"] == "running"
    assert said["level"] == "info"
    assert said["last_status"] == "shutdown"
    assert 'qmpwatch_vm_connected{vm="alive01"} 0.0' in text
    assert 'qmpwatch_vm_connected{vm="down01"} 0.0' in text
    assert back["alert"] == "vm_gone_while_unmonitored"
    assert alerts(second, "down01") == []
    assert [a for a, _ in alerts(second, "alive01")] == ["vm_gone_while_unmonitored"]
    assert_clean_run(second)


async def test_vms_removed_or_renamed_on_reload_resolve_their_alerts(
    tmp_path: Path, sock_dir: Path
) -> None:
    """SIGHUP without a paused VM (removed) and with another under a new name (renamed): their
    alerts resolve at the webhook with the reason; the renamed VM's pause is its new name's."""
    async with (
        receiving() as hook,
        LabVM.start(LabSpec("gone01"), sock_dir) as gone,
        LabVM.start(LabSpec("old01"), sock_dir) as old,
    ):
        cfg = config(tmp_path, [gone, old], hook=hook)
        async with DaemonProcess.start(cfg) as daemon:
            for vm in (gone, old):
                await daemon.wait_for("vm_connected", vm=vm.spec.name)
                await vm.stop()
                await daemon.wait_for("alert", vm=vm.spec.name, alert="vm_stopped_unexpected")
            config(tmp_path, [("new01", old.watch_socket)], hook=hook)
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for("config_reloaded")
            for name in ("gone01", "old01"):
                resolved = await daemon.wait_for("alert_resolved", vm=name)
                assert resolved["reason"] == "removed from the configuration"
            renamed = await daemon.wait_for("alert", vm="new01")
            await hook.wait_for(lambda h: len(h.delivered) == 5, what="5 notifications")
    assert renamed["alert"] == "vm_state_changed_while_unmonitored"
    resolutions = [r.json() for r in hook.delivered if r.json()["status"] == "resolved"]
    assert sorted(p["vm"] for p in resolutions) == ["gone01", "old01"]
    assert {p["details"]["resolution"] for p in resolutions} == {"removed from the configuration"}
    assert_clean_run(daemon)


async def test_alerts_of_vms_removed_while_qmpwatch_was_down_resolve_at_start(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A VM paused, qmpwatch stopped, the VM taken out of the config: the next start resolves
    its alert everywhere."""
    async with receiving() as hook, LabVM.start(LabSpec("orphan01"), sock_dir) as vm:
        async with DaemonProcess.start(config(tmp_path, [vm], hook=hook)) as first:
            await first.wait_for("vm_connected", vm="orphan01")
            await vm.stop()
            fired = await first.wait_for("alert", vm="orphan01")
            await hook.wait_for(lambda h: len(h.delivered) == 1, what="the firing alert")
        async with DaemonProcess.start(config(tmp_path, [], hook=hook)) as second:
            resolved = await second.wait_for("alert_resolved", vm="orphan01")
            await hook.wait_for(lambda h: len(h.delivered) == 2, what="the resolution")
    assert resolved["fingerprint"] == fired["fingerprint"]
    assert resolved["reason"] == "no longer in the configuration or discovered"
    last = hook.delivered[-1].json()
    assert (last["status"], last["fingerprint"]) == ("resolved", fired["fingerprint"])
    assert_clean_run(second)


@pytest.mark.parametrize(
    ("scenario", "spec_options", "paging"),
    [
        ("watchdog-pause", {"watchdog_action": "pause"}, "vm_stopped_watchdog"),
        ("panic-pause", {"extra_args": pvpanic("pause")}, "vm_panicked"),
        ("panic-exit", {"extra_args": pvpanic("exit-failure")}, "vm_panicked"),
    ],
)
async def test_one_incident_pages_once(
    tmp_path: Path, sock_dir: Path, scenario: str, spec_options: dict[str, Any], paging: str
) -> None:
    """A watchdog pause, a panic that pauses, a panic that ends QEMU: one critical
    notification each (companions go out as info)."""
    async with (
        receiving() as hook,
        LabVM.start(LabSpec("page01", **spec_options), sock_dir) as vm,
        DaemonProcess.start(config(tmp_path, [vm], hook=hook)) as daemon,
    ):
        await daemon.wait_for("vm_connected", vm="page01")
        if scenario == "watchdog-pause":
            await vm.arm_watchdog()
        else:
            with contextlib.suppress(LabClosed):  # panic=exit-failure: QEMU may be gone
                await vm.port_out(PVPANIC_PORT, PANICKED)
        await daemon.wait_for("alert", vm="page01", alert=paging, timeout=20)
        if scenario == "panic-exit":
            await daemon.wait_for("vm_disconnected", vm="page01", cause="shutdown")
        else:
            await daemon.wait_for("qmp_event", vm="page01", qmp="STOP")
            await daemon.wait_for("followup_satisfied", vm="page01")
        expected = len(daemon.find("alert", vm="page01"))
        await hook.wait_for(lambda h: len(h.delivered) == expected, what="every alert")
    critical = [n for n in notifications(hook) if n[2] == "critical"]
    assert critical == [("firing", paging, "critical")]
    assert "vm_crashed" not in [a for a, _ in alerts(daemon, "page01")]
    assert "vm_stopped_unexpected" not in [a for a, _ in alerts(daemon, "page01")]
    assert_clean_run(daemon)
