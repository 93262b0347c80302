"""SIGHUP reload against real QEMU: added VMs start, removed stop, unchanged keep their session."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.support.alert_fixtures import Receiver, receiving
from tests.support.daemon_harness import DaemonProcess, write_config

pytestmark = pytest.mark.qemu


async def test_reload_adds_removes_and_keeps_unchanged(tmp_path: Path, sock_dir: Path) -> None:
    """After SIGHUP: the new VM connects, the removed one stops, the kept one never reconnects."""
    async with (
        LabVM.start(LabSpec(name="keep"), sock_dir) as keep,
        LabVM.start(LabSpec(name="gone"), sock_dir) as gone,
        LabVM.start(LabSpec(name="new"), sock_dir) as new,
    ):
        state = tmp_path / "state"
        cfg = tmp_path / "c.toml"
        keep_vm = {"name": "keep", "socket": str(keep.watch_socket)}
        write_config(
            cfg, state_dir=state, vms=[keep_vm, {"name": "gone", "socket": str(gone.watch_socket)}]
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="keep")
            await daemon.wait_for("vm_connected", vm="gone")
            mark = daemon.mark()
            write_config(
                cfg,
                state_dir=state,
                vms=[keep_vm, {"name": "new", "socket": str(new.watch_socket)}],
            )
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for("config_reloaded", after=mark)
            await daemon.wait_for("vm_connected", vm="new", after=mark)
            await daemon.wait_for("vm_disconnected", vm="gone", cause="closed", after=mark)
            # The kept VM's session is the same one: its events still arrive, and it never
            # disconnected or reconnected.
            await keep.stop()
            await daemon.wait_for("qmp_event", vm="keep", qmp="STOP", after=mark)
            assert not daemon.find("vm_disconnected", vm="keep")
            assert len(daemon.find("vm_connected", vm="keep")) == 1
            # The removed VM is no longer watched: its events are not logged.
            gone_mark = daemon.mark()
            await gone.stop()
            await new.stop()
            await daemon.wait_for("qmp_event", vm="new", qmp="STOP", after=gone_mark)
            assert not daemon.find("qmp_event", vm="gone", after=gone_mark)


async def test_invalid_reload_is_refused_and_old_config_runs(
    tmp_path: Path, sock_dir: Path
) -> None:
    """An invalid new config is refused with one clear record; the old sessions go on."""
    async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
        cfg = tmp_path / "c.toml"
        write_config(
            cfg,
            state_dir=tmp_path / "state",
            vms=[{"name": "web01", "socket": str(vm.watch_socket)}],
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="web01")
            good = cfg.read_text()
            cfg.write_text(good.replace("timeout_s = 2.0", 'timeout_s = "soon"'))
            mark = daemon.mark()
            daemon.send_signal(signal.SIGHUP)
            refused = await daemon.wait_for("config_reload_refused", after=mark)
            assert refused["level"] == "error"
            assert 'connect.timeout_s: expected a number, got "soon"' in refused["problems"]
            await vm.stop()
            await daemon.wait_for("qmp_event", vm="web01", qmp="STOP", after=mark)
            assert not daemon.find("vm_disconnected", vm="web01")
            assert not daemon.find("config_reloaded")


async def test_reload_applies_alert_settings_and_rebuilds_sinks(
    tmp_path: Path, sock_dir: Path
) -> None:
    """SIGHUP with a new client-stop severity, host and webhook: the next pause is critical,
    names the new host, goes to the new webhook too, and the delivery in flight to the old
    webhook when the reload came is completed, not lost; the record names what changed."""
    async with (
        receiving(hang_first=1) as old_hook,
        receiving() as new_hook,
        LabVM.start(LabSpec(name="web01"), sock_dir) as vm,
    ):
        cfg, state = tmp_path / "c.toml", tmp_path / "state"
        web = {"name": "web01", "socket": str(vm.watch_socket)}

        def write(host: str, severity: str, hooks: list[Receiver]) -> None:
            write_config(
                cfg,
                state_dir=state,
                vms=[web],
                sections={"alert": {"host": host, "client_stop_severity": severity}},
                arrays={"alert.webhook": [{"url": hook.url, "timeout_s": 30.0} for hook in hooks]},
            )

        write("hv-old", "warning", [old_hook])
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="web01")
            await vm.stop()
            first = await daemon.wait_for("alert", vm="web01")
            await old_hook.wait_for(lambda h: len(h.requests) == 1, what="a delivery in flight")
            write("hv-new", "critical", [old_hook, new_hook])
            mark = daemon.mark()
            daemon.send_signal(signal.SIGHUP)
            reloaded = await daemon.wait_for("config_reloaded", after=mark)
            old_hook._release.set()  # the hung request may end now: it is retried, not lost
            await vm.cont()
            await daemon.wait_for("alert_resolved", vm="web01", after=mark)
            await vm.stop()
            second = await daemon.wait_for("alert", vm="web01", after=mark)
            await new_hook.wait_for(
                lambda h: any(r.json()["status"] == "firing" for r in h.delivered), what="firing"
            )
            await old_hook.wait_for(lambda h: len(h.delivered) >= 3, what="all three")
    assert (first["severity"], second["severity"]) == ("warning", "critical")
    # webhook[0] is rebuilt for its new host; webhook[1] is new
    assert reloaded["changed"] == [
        "alert.client_stop_severity",
        "alert.host",
        f"webhook[0] (127.0.0.1:{old_hook.port})",
        f"webhook[1] (127.0.0.1:{new_hook.port})",
    ]
    old_payloads = [r.json() for r in old_hook.delivered]
    assert [p["status"] for p in old_payloads] == ["firing", "resolved", "firing"]
    assert old_payloads[0]["fingerprint"] == first["fingerprint"]
    assert [p["host"] for p in old_payloads[1:]] == ["hv-new", "hv-new"]
    new_payloads = [r.json() for r in new_hook.delivered]
    assert [(p["status"], p["severity"], p["host"]) for p in new_payloads] == [
        ("resolved", "warning", "hv-new"),
        ("firing", "critical", "hv-new"),
    ]
    assert not daemon.find("config_reload_partial")
