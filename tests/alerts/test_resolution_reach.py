"""A resolution reaches whoever was paged: the sinks that got an alert's firing get its
resolution, even after a reload moved the alert sink elsewhere; `status` shows a failing sink.

Real QEMU, the real daemon, two real webhook receivers, `qmpwatch status` as operators run it.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.service.test_status import qmpwatch, status_doc
from tests.support.alert_fixtures import Receiver, receiving
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config
from tests.support.ports import free_tcp_port

pytestmark = pytest.mark.qemu


def payloads(hook: Receiver, *, answered: int = 200) -> list[tuple[str, str]]:
    bodies = [r.json() for r in hook.requests if r.status == answered]
    return [(p["status"], p["kind"]) for p in bodies]


async def test_a_resolution_reaches_the_webhook_a_reload_moved_away_from(
    tmp_path: Path, sock_dir: Path
) -> None:
    """An alert fired to webhook A; a reload replaces A by B; the resolution goes to A (kept
    in the outbox while A fails, shown failing in `status --json`) and to B."""
    port = free_tcp_port()
    cfg = tmp_path / "c.toml"

    def write(vm: LabVM, hook: Receiver) -> None:
        write_config(
            cfg,
            state_dir=tmp_path / "state",
            vms=[{"name": vm.spec.name, "socket": str(vm.watch_socket)}],
            sections={
                "connect": FAST_CONNECT,
                "daemon": {"metrics_listen": f"127.0.0.1:{port}"},
                "alert": {"retry_initial_s": 0.1, "retry_max_s": 0.3},
            },
            arrays={"alert.webhook": [{"url": hook.url}]},
        )

    async with (
        receiving() as a,
        receiving() as b,
        LabVM.start(LabSpec("web01"), sock_dir) as vm,
    ):
        write(vm, a)
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="web01")
            await vm.stop()
            await a.wait_for(lambda h: ("firing", "vm_stopped_unexpected") in payloads(h))
            write(vm, b)
            mark = daemon.mark()
            daemon.send_signal(signal.SIGHUP)
            reloaded = await daemon.wait_for("config_reloaded", after=mark)
            a.mode = "fail"
            await vm.cont()
            await b.wait_for(lambda h: ("resolved", "vm_stopped_unexpected") in payloads(h))
            await a.wait_for(lambda h: payloads(h, answered=500), what="a failed resolution")
            doc: dict[str, Any] = await status_doc(port)
            code, out, _ = await qmpwatch("status", "-c", str(cfg))
            a.mode = "ok"
            await a.wait_for(lambda h: ("resolved", "vm_stopped_unexpected") in payloads(h))
    assert sorted(reloaded["changed"]) == sorted(
        [f"webhook[0] (127.0.0.1:{b.port})", f"webhook[0] (127.0.0.1:{a.port}) (removed)"]
    )
    assert payloads(a) == [
        ("firing", "vm_stopped_unexpected"),
        ("resolved", "vm_stopped_unexpected"),
    ]
    assert payloads(b) == [("resolved", "vm_stopped_unexpected")]
    sinks = {s["sink"]: s for s in doc["sinks"]}
    failing = sinks[f"webhook[0] (127.0.0.1:{a.port}) (removed)"]
    assert (failing["ok"], failing["pending"]) == (False, 1)
    assert "500" in failing["last_error"]
    assert failing["last_success"] is not None  # the firing went through
    current = sinks[f"webhook[0] (127.0.0.1:{b.port})"]
    assert (current["ok"], current["pending"], current["last_error"]) == (True, 0, None)
    assert code == 1
    assert "FAILING" in out
    assert daemon.proc.returncode == 0, daemon.stderr_text()
