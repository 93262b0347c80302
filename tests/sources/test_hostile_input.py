"""Hostile monitors: whatever a QMP socket sends, qmpwatch logs why, reads on (or reconnects),
and keeps logging the valid events of that VM and of every other VM.

Hypothesis drives arbitrary bytes and arbitrary JSON through the real stream path (the
daemon's dialer, `VmSession` and `WatchClient` against a fake monitor on a real unix socket, with
the daemon's own JSON renderer); scripted scenarios run the real daemon as a subprocess
beside a real QEMU, which must keep being watched whatever the fake one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpwatch.lab import LabSpec, LabVM
from qmpwatch.sources.qmpclient import READ_LIMIT
from tests.support.daemon_harness import DaemonProcess, Record, write_config
from tests.support.fake_qmp import (
    GREETING,
    FakeQmp,
    FakeSession,
    RenderedLog,
    SignallingStore,
    event_line,
    line,
    rendered_log,
    reply_line,
    vm_connection,
)

SENTINEL_SECONDS = 1_700_000_000
FUZZ_WAIT_S = 3.0  # generous for a local socket; short, so that shrinking a failure is quick

# ---------------------------------------------------------------------------------------------
# Hypothesis: the stream path in-process

FUZZ_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
scalars = st.none() | st.booleans() | i64 | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    scalars | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
event_names = st.sampled_from(
    ["STOP", "RESUME", "RESET", "SHUTDOWN", "POWERDOWN", "BLOCK_IO_ERROR", "WATCHDOG",
     "RTC_CHANGE", "GUEST_PANICKED", "VNC_CONNECTED", "SPICE_INITIALIZED", "NEW_EVENT"]
) | st.text(max_size=10)  # fmt: skip
timestamps = (
    st.fixed_dictionaries(
        {"seconds": st.integers(-5, 2**40) | json_values, "microseconds": st.integers(-5, 2**21)}
    )
    | json_values
)
event_objects = st.fixed_dictionaries(
    {"event": event_names | json_values},
    optional={"timestamp": timestamps,
              "data": st.dictionaries(st.text(max_size=10), json_values) | json_values},
)  # fmt: skip


# The resync's commands: query-status, query-block, and the protection check's qom-list (x2)
# and query-pci (__qmp#0 to __qmp#4).
RESYNC_COMMANDS = 6


def issued_by_resync(value: object) -> bool:
    """An id of resync's commands (__qmp#0 ...: query-status, query-block, the guest
    agent's port, the protection check): a reply to it now is late, dropped quietly."""
    if not isinstance(value, str) or not value.startswith("__qmp#"):
        return False
    number = value.removeprefix("__qmp#")
    return (
        0 < len(number) <= 20
        and number.isascii()
        and number.isdigit()
        and int(number) < RESYNC_COMMANDS
    )


reply_ids = (
    json_values
    | st.text(max_size=12)
    | st.sampled_from(["__qmp#", "__qmp#²", "__qmp#-1", "__qmp#99999", "__qmp#" + "9" * 5000])
    | st.from_regex(r"\A__qmp#[0-9]{1,6}\Z")
).filter(lambda v: not issued_by_resync(v))
reply_objects = st.fixed_dictionaries(
    {}, optional={"return": json_values, "error": json_values, "id": reply_ids, "QMP": json_values}
)
messages = event_objects | reply_objects | json_values

JSON_PIECES = [b"{", b"}", b"[", b"]", b":", b",", b'"event"', b'"STOP"', b'"data"', b'"id"',
               b'"timestamp"', b'"return"', b'"error"', b"null", b"1e999", b"-", b"\\", b'"',
               b"\xff", b"\xc3", b"\x00", b"\r", b"\n", b" "]  # fmt: skip
byte_blobs = st.binary(max_size=300) | st.lists(
    st.sampled_from(JSON_PIECES) | st.binary(max_size=6), max_size=60
).map(b"".join)


async def stream_through_watch(log: RenderedLog, path: Path, blob: bytes) -> list[Record]:
    """Attach the daemon's dialer and session to a fake monitor, send `blob`, then a sentinel event.

    Returns the qmp_event/qmp_decode_error records logged for the blob. Before returning it
    checks that the sentinel event was logged, that a command still gets its reply (the
    reply routing survived) and that the session was never dropped.
    """
    log.reset()
    store = SignallingStore()
    async with FakeQmp.serve(path) as fake:
        conn = vm_connection("fuzz", path, store)
        task = asyncio.create_task(conn.run())
        try:
            await log.wait_for("vm_connected", vm="fuzz", timeout=FUZZ_WAIT_S)
            session = await fake.session(1, timeout=FUZZ_WAIT_S)
            start = log.mark()
            await session.send(blob)
            await session.event("FUZZ_SENTINEL", {"n": 1}, seconds=SENTINEL_SECONDS)
            sentinel = await log.wait_for(
                "qmp_event", qmp="FUZZ_SENTINEL", after=start, timeout=FUZZ_WAIT_S
            )
            fake.status = "sentinel-status"
            conn.session.request_status()
            await store.wait_status("fuzz", "sentinel-status", timeout=FUZZ_WAIT_S)
            assert not log.find("vm_disconnected", after=start)
            assert not log.find("internal_error")
            assert fake.connections == 1
            assert not log.bad_lines
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    end = log.records.index(sentinel)
    return [
        r
        for r in log.records[start:end]
        if r.get("event") in ("qmp_event", "qmp_decode_error") and r.get("vm") == "fuzz"
    ]


def check_one_record_per_line(blob: bytes, records: list[Record]) -> None:
    """Every line gave exactly one record; decode errors say why and show the line."""
    lines = blob.split(b"\n")[:-1]
    assert len(records) == len(lines), (lines, records)
    for raw, record in zip(lines, records, strict=True):
        if record["event"] == "qmp_decode_error":
            assert record["error"]
            # the line as received; for an event breaking the spec's types, the parsed object
            shown = [(raw + b"\n").decode("utf-8", "replace")]
            with contextlib.suppress(orjson.JSONDecodeError):
                shown.append(orjson.dumps(orjson.loads(raw)).decode())
            assert record["raw"] in [t if len(t) <= 2048 else t[:2048] + "…" for t in shown]
        else:
            sent = json.loads(raw)
            assert record["qmp"] == sent["event"]
            assert record["data"] == sent.get("data", {})


@FUZZ_SETTINGS
@given(blob=byte_blobs)
def test_arbitrary_bytes_each_line_one_record_and_session_lives(blob: bytes) -> None:
    """Arbitrary bytes: one record per line, the session is never dropped, replies still route."""
    blob += b"\n"
    with tempfile.TemporaryDirectory(prefix="qw-", dir="/tmp") as tmp, rendered_log() as log:
        records = asyncio.run(stream_through_watch(log, Path(tmp) / "f.qmp", blob))
    check_one_record_per_line(blob, records)


@FUZZ_SETTINGS
@given(objs=st.lists(messages, min_size=1, max_size=8))
def test_arbitrary_json_each_message_one_record_and_session_lives(objs: list[Any]) -> None:
    """Arbitrary JSON messages: an event with its data as sent, or a decode error; reads on."""
    blob = b"".join(line(obj) for obj in objs)
    with tempfile.TemporaryDirectory(prefix="qw-", dir="/tmp") as tmp, rendered_log() as log:
        records = asyncio.run(stream_through_watch(log, Path(tmp) / "f.qmp", blob))
    check_one_record_per_line(blob, records)


# ---------------------------------------------------------------------------------------------
# Scripted: the real daemon, a hostile fake monitor ("bad") and a real QEMU ("good")

FAST = {"timeout_s": 1.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}


@contextlib.asynccontextmanager
async def bad_and_good(
    tmp_path: Path, sock_dir: Path, fake: FakeQmp
) -> AsyncIterator[tuple[DaemonProcess, LabVM]]:
    """The daemon watching the fake monitor (vm "bad") and a real QEMU (vm "good")."""
    async with LabVM.start(LabSpec(name="good"), sock_dir) as vm:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[
                {"name": "bad", "socket": str(fake.path), "no_shutdown": False},
                {"name": "good", "socket": str(vm.watch_socket)},
            ],
            sections={"connect": FAST},
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="good")
            yield daemon, vm
            assert not daemon.find("internal_error")
            assert not daemon.bad_lines
            assert await daemon.stop() == 0


async def still_watching(daemon: DaemonProcess, session: FakeSession, vm: LabVM, n: int) -> None:
    """A valid event on the hostile monitor and one on the real QEMU are both logged."""
    mark = daemon.mark()
    await session.event("RTC_CHANGE", {"offset": n, "qom-path": "/machine/rtc"})
    offset: dict[str, Any] = {"data.offset": n}
    await daemon.wait_for("qmp_event", vm="bad", qmp="RTC_CHANGE", after=mark, **offset)
    await vm.system_reset()
    await daemon.wait_for("qmp_event", vm="good", qmp="RESET", after=mark)


@contextlib.asynccontextmanager
async def serving(sock_dir: Path, **kw: Any) -> AsyncIterator[FakeQmp]:
    async with FakeQmp.serve(sock_dir / "bad.qmp", **kw) as fake:
        yield fake


def decode_errors(daemon: DaemonProcess, after: int) -> list[Record]:
    return daemon.find("qmp_decode_error", vm="bad", after=after)


GARBAGE: list[tuple[bytes, str]] = [
    (b"garbage\r\n", "not JSON"),
    (b"\x00\x01\x02\x03\r\n", "not JSON"),
    (b'{"event": "STOP", "timestamp": \r\n', "not JSON"),
    (b"\r\n", "not JSON"),
    (b"[1, 2, 3]\r\n", "not a JSON object"),
    (b'"just a string"\r\n', "not a JSON object"),
    (b"{}\r\n", "not a QMP message: no event, return or error key"),
    (b'{"QMP": {"version": {}, "capabilities": []}}\r\n', "a second greeting"),
    (b'{"event": "RESET", "data": {"reason": "\xff\xfe"}, "timestamp": {}}\r\n', "not JSON"),
    (b"[" * 2000 + b"]" * 2000 + b"\r\n", "not JSON"),  # beyond the parser's depth limit
    (event_line("RESET", {"deep": json.loads("[" * 300 + "]" * 300)}),
     "nested deeper than 250 levels"),  # parses, but no log line could hold it
]  # fmt: skip


@pytest.mark.qemu
async def test_garbage_lines_are_decode_errors_and_the_session_reads_on(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Garbage, bad UTF-8, absurd nesting: one qmp_decode_error each, same session, events go on."""
    async with serving(sock_dir) as fake, bad_and_good(tmp_path, sock_dir, fake) as (daemon, vm):
        await daemon.wait_for("vm_connected", vm="bad")
        session = await fake.session(1)
        mark = daemon.mark()
        await session.send(*(raw for raw, _ in GARBAGE))
        await still_watching(daemon, session, vm, 1)
        errors = decode_errors(daemon, mark)
        assert len(errors) == len(GARBAGE)
        for (raw, why), error in zip(GARBAGE, errors, strict=True):
            assert error["error"].startswith(why), (raw[:60], error["error"])
        assert errors[8]["raw"].startswith('{"event": "RESET", "data": {"reason": "\ufffd\ufffd"}')
        assert errors[9]["raw_length"] == 4002
        assert errors[9]["raw"].endswith("…")
        assert not daemon.find("vm_disconnected", vm="bad")
        assert fake.connections == 1


@pytest.mark.qemu
async def test_truncated_line_then_eof_is_reported_and_the_vm_reattached(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A line cut off by EOF: decode error, a crash (EOF without SHUTDOWN), then a new session."""
    async with serving(sock_dir) as fake, bad_and_good(tmp_path, sock_dir, fake) as (daemon, vm):
        await daemon.wait_for("vm_connected", vm="bad")
        session = await fake.session(1)
        mark = daemon.mark()
        await session.send(b'{"event": "STOP", "timestamp": {"seconds": 17')
        session.close()
        error = await daemon.wait_for("qmp_decode_error", vm="bad", after=mark)
        assert error["error"] == "truncated message at end of stream"
        assert error["raw"] == '{"event": "STOP", "timestamp": {"seconds": 17'
        await daemon.wait_for("vm_disconnected", vm="bad", cause="eof", after=mark)
        await daemon.wait_for("alert", vm="bad", alert="vm_crashed", after=mark)
        await daemon.wait_for("vm_connected", vm="bad", after=mark)
        await daemon.wait_for("alert_resolved", vm="bad", alert="vm_crashed", after=mark)
        await still_watching(daemon, await fake.session(2), vm, 2)
        assert not daemon.find("qmp_event", vm="bad", qmp="STOP")


@pytest.mark.qemu
async def test_line_over_the_read_limit_is_dropped_and_the_session_reads_on(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A line longer than READ_LIMIT: one decode error, the rest of it skipped, same session."""
    async with serving(sock_dir) as fake, bad_and_good(tmp_path, sock_dir, fake) as (daemon, vm):
        await daemon.wait_for("vm_connected", vm="bad")
        session = await fake.session(1)
        mark = daemon.mark()
        huge = event_line("RESET", {"reason": "x" * READ_LIMIT})
        await session.send(huge[: len(huge) // 3], huge[len(huge) // 3 :])
        await still_watching(daemon, session, vm, 3)
        errors = decode_errors(daemon, mark)
        assert [e["error"] for e in errors] == [f"line longer than {READ_LIMIT} bytes, dropped"]
        assert not daemon.find("qmp_event", vm="bad", qmp="RESET")
        assert not daemon.find("vm_disconnected", vm="bad")


@pytest.mark.qemu
async def test_replies_nobody_asked_for_are_decode_errors_and_replies_still_route(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Unknown ids, unhashable ids, id-less errors: decode errors; query-status still answered."""
    unroutable: list[tuple[bytes, str]] = [
        (line({"return": {}, "id": "nobody"}), "reply with unknown id 'nobody'"),
        (line({"return": {}, "id": ["un", "hashable"]}),
         "reply id: expected a string, got an array"),
        (line({"return": {}, "id": 7}), "reply id: expected a string, got a number"),
        (line({"error": {"class": "GenericError", "desc": "JSON parse error"}}),
         "a reply without an id"),
        (line({"return": {}}), "a reply without an id"),
        (line({"error": "not an object", "id": {"a": 1}}),
         "reply id: expected a string, got an object"),
    ]  # fmt: skip

    def noisy_status(session: FakeSession, command: dict[str, Any]) -> list[bytes]:
        stray = line({"return": {"status": "running"}, "id": "someone-else"})
        return [stray, reply_line({"status": "paused", "running": False}, command)]

    async with serving(sock_dir) as fake, bad_and_good(tmp_path, sock_dir, fake) as (daemon, vm):
        await daemon.wait_for("vm_connected", vm="bad")
        session = await fake.session(1)
        mark = daemon.mark()
        await session.send(*(raw for raw, _ in unroutable))
        fake.replies["query-status"] = noisy_status
        await session.event("STOP")
        alert = await daemon.wait_for("alert", vm="bad", after=mark)
        assert alert["alert"] == "vm_stopped_unexpected"
        assert alert["details"]["status"] == "paused"
        await still_watching(daemon, session, vm, 4)
        errors = decode_errors(daemon, mark)
        assert len(errors) == len(unroutable) + 1
        for (raw, why), error in zip(unroutable, errors, strict=False):
            assert error["error"].startswith(why), (raw, error["error"])
        assert errors[-1]["error"].startswith("reply with unknown id 'someone-else'")
        assert not daemon.find("vm_disconnected", vm="bad")
        assert not daemon.find("alert", vm="bad", alert="vm_crashed")


T0 = {"seconds": 1, "microseconds": 0}
ENDPOINT = {"host": "h", "port": "1", "family": "ipv4"}
WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"event": 5, "timestamp": T0}, "event: expected a string, got a number"),
    ({"event": None, "timestamp": T0, "return": {}}, "event: expected a string, got null"),
    ({"event": "STOP", "timestamp": "yesterday"}, "timestamp: expected an object, got a string"),
    ({"event": "STOP", "timestamp": {"seconds": "1", "microseconds": 0}},
     "timestamp.seconds: expected an integer"),
    ({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 10**7}},
     "timestamp: out of range"),
    ({"event": "STOP", "timestamp": T0, "data": [1]}, "data: expected an object, got an array"),
    ({"event": "BLOCK_IO_ERROR", "timestamp": T0,
      "data": {"device": 5, "operation": "read", "action": "stop"}},
     "data.device: expected a string, got a number"),
    ({"event": "WATCHDOG", "timestamp": T0, "data": {"action": None}},
     "data.action: expected a string, got null"),
    ({"event": "RTC_CHANGE", "timestamp": T0, "data": {"offset": "soon"}},
     "data.offset: expected a number, got a string"),
    ({"event": "SPICE_INITIALIZED", "timestamp": T0,
      "data": {"server": ENDPOINT, "client": {**ENDPOINT, "tls": "yes"}}},
     "data.client.tls: expected a boolean, got a string"),
]  # fmt: skip


@pytest.mark.qemu
async def test_events_with_wrong_types_are_decode_errors_naming_the_field(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Events that break the spec's types: a decode error naming the field; nothing acts on them."""
    async with serving(sock_dir) as fake, bad_and_good(tmp_path, sock_dir, fake) as (daemon, vm):
        await daemon.wait_for("vm_connected", vm="bad")
        session = await fake.session(1)
        mark = daemon.mark()
        await session.send(*(line(obj) for obj, _ in WRONG_TYPES))
        await still_watching(daemon, session, vm, 5)
        errors = decode_errors(daemon, mark)
        assert len(errors) == len(WRONG_TYPES)
        for (obj, why), error in zip(WRONG_TYPES, errors, strict=True):
            assert error["error"].startswith(why), (obj, error["error"])
            assert json.loads(error["raw"]) == obj
        assert not daemon.find("qmp_event", vm="bad", after=mark, qmp="STOP")
        assert not daemon.find("alert", vm="bad")
        assert session.commands_named("query-status") == session.commands[1:2]  # resync only


BAD_GREETINGS: list[tuple[bytes | None, str, str]] = [
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "bad_greeting", "not JSON"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "bad_greeting", "not JSON"),
    (b"\xff\xfe\xfd\xfc\r\n", "bad_greeting", "not JSON"),
    (b'["QMP"]\r\n', "bad_greeting", "not a JSON object"),
    (b'{"hello": "world"}\r\n', "bad_greeting", "Did not understand Greeting"),
    (b'{"QMP": "yes"}\r\n', "bad_greeting", "Did not understand Greeting"),
    # QEMU 10 can send an event ahead of its greeting: the client takes it and waits on
    (b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}\r\n', "no_greeting",
     "no QMP greeting within 1 s"),
    (b"x" * (READ_LIMIT + 10), "bad_greeting", "line longer than"),
    (None, "no_greeting", "no QMP greeting within 1 s"),
]  # fmt: skip


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("greeting", "reason", "why"), BAD_GREETINGS, ids=lambda v: repr(v)[:24] if v else "none"
)
async def test_a_monitor_that_does_not_greet_with_qmp_is_a_connect_failure(
    tmp_path: Path, sock_dir: Path, greeting: bytes | None, reason: str, why: str
) -> None:
    """Not a QMP greeting: vm_connect_failed with a reason and the cause; a real one attaches."""
    async with (
        serving(sock_dir, greeting=greeting) as fake,
        bad_and_good(tmp_path, sock_dir, fake) as (daemon, vm),
    ):
        failed = await daemon.wait_for("vm_connect_failed", vm="bad")
        assert failed["reason"] == reason
        assert why in failed["error"], failed["error"]
        assert failed["retry_in_s"] > 0
        assert not daemon.find("vm_connected", vm="bad")
        assert not daemon.find("qmp_decode_error", vm="bad")
        fake.greeting = GREETING
        await daemon.wait_for("vm_connected", vm="bad")
        await still_watching(daemon, await fake.session(fake.connections), vm, 6)


@pytest.mark.qemu
async def test_a_monitor_that_hangs_up_during_the_handshake_is_a_connect_failure(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Greeting then EOF, or a refused negotiation: vm_connect_failed with its reason; retried."""
    async with (
        serving(sock_dir, close_after_greeting=True) as fake,
        bad_and_good(tmp_path, sock_dir, fake) as (daemon, vm),
    ):
        failed = await daemon.wait_for("vm_connect_failed", vm="bad")
        assert failed["reason"] == "closed_during_handshake"
        mark = daemon.mark()
        fake.close_after_greeting = False
        fake.replies["qmp_capabilities"] = lambda s, c: [
            line({"error": {"class": "GenericError", "desc": "no capabilities for you"}})
        ]
        failed = await daemon.wait_for("vm_connect_failed", vm="bad", after=mark)
        assert failed["reason"] == "bad_greeting"
        assert "Negotiation failed" in failed["error"]
        del fake.replies["qmp_capabilities"]
        await daemon.wait_for("vm_connected", vm="bad")
        await still_watching(daemon, await fake.session(fake.connections), vm, 7)
        assert not daemon.find("alert", vm="bad")


@pytest.mark.qemu
async def test_a_monitor_that_never_answers_the_resync_is_unresponsive_not_crashed(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Resync unanswered: vm_unresponsive, no crash alert; attached once it answers."""
    async with serving(sock_dir) as fake:
        fake.replies["query-status"] = lambda s, c: []
        async with bad_and_good(tmp_path, sock_dir, fake) as (daemon, vm):
            gone = await daemon.wait_for("vm_unresponsive", vm="bad")
            assert "query-status" in gone["error"]
            del fake.replies["query-status"]
            await daemon.wait_for("vm_connected", vm="bad")
            await still_watching(daemon, await fake.session(fake.connections), vm, 8)
            assert not daemon.find("alert", vm="bad")


@pytest.mark.qemu
async def test_huge_data_is_logged_whole_up_to_the_read_limit(sock_dir: Path) -> None:
    """1 MiB of data and the longest line accepted are logged whole; a byte more is dropped."""
    longest = READ_LIMIT + 1  # StreamReader's limit counts the bytes before the newline
    base = len(event_line("RTC_CHANGE", {"offset": 3, "blob": ""}, seconds=SENTINEL_SECONDS))
    with rendered_log() as log:
        log.reset()
        store = SignallingStore()
        async with (
            FakeQmp.serve(sock_dir / "big.qmp") as fake,
            LabVM.start(LabSpec(name="good"), sock_dir) as vm,
        ):
            targets = [("big", fake.path), ("good", vm.watch_socket)]
            tasks = [asyncio.create_task(vm_connection(n, p, store).run()) for n, p in targets]
            try:
                await log.wait_for("vm_connected", vm="big")
                await log.wait_for("vm_connected", vm="good")
                session = await fake.session(1)
                for offset, size in ((1, 1 << 20), (2, longest - base), (3, longest - base + 1)):
                    blob = "z" * size
                    await session.event("RTC_CHANGE", {"offset": offset, "blob": blob},
                                        seconds=SENTINEL_SECONDS)  # fmt: skip
                await session.event("RTC_CHANGE", {"offset": 4})
                await log.wait_for("qmp_event", vm="big", **{"data.offset": 4})
                await vm.system_reset()
                await log.wait_for("qmp_event", vm="good", qmp="RESET")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        events = log.find("qmp_event", vm="big", qmp="RTC_CHANGE")
        assert [e["data"]["offset"] for e in events] == [1, 2, 4]
        assert len(events[0]["data"]["blob"]) == 1 << 20
        assert len(events[1]["data"]["blob"]) == longest - base
        errors = log.find("qmp_decode_error", vm="big")
        assert [e["error"] for e in errors] == [f"line longer than {READ_LIMIT} bytes, dropped"]
        assert not log.find("vm_disconnected", vm="big", cause="eof")
        assert not log.bad_lines
