"""A bug in qmpwatch's own event handling (injected: no real input may cause one) is an
`internal_error` record, and the session goes on with the next event."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.core.watch import VmWatch
from tests.support.fake_qmp import FakeQmp, SignallingStore, rendered_log, vm_connection


async def test_a_bug_in_event_handling_is_logged_and_the_session_goes_on(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handling RTC_CHANGE raises: internal_error says where and what; the STOP after it is
    still alerted on the same connection."""
    handle = VmWatch.on_event

    def buggy(watch: VmWatch, event: Any, now: float) -> None:
        if event.name == "RTC_CHANGE":
            raise RuntimeError("injected bug")
        handle(watch, event, now)

    monkeypatch.setattr(VmWatch, "on_event", buggy)
    path = sock_dir / "bug.qmp"
    with rendered_log() as log:
        log.reset()
        async with FakeQmp.serve(path) as fake:
            conn = vm_connection("bug01", path, SignallingStore())
            task = asyncio.create_task(conn.run())
            try:
                await log.wait_for("vm_connected", vm="bug01")
                session = await fake.session(1)
                await session.event("RTC_CHANGE", {"offset": 1, "qom-path": "/machine/rtc"})
                bug = await log.wait_for("internal_error", vm="bug01")
                fake.status = "paused"  # what query-status answers after the STOP
                await session.event("STOP")
                alert = await log.wait_for("alert", vm="bug01")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert (bug["where"], bug["error"]) == ("event handling", "RuntimeError('injected bug')")
    assert alert["alert"] == "vm_stopped_unexpected"
    assert fake.connections == 1
