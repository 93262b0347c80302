"""`daemon.log_target = "journal"`: records as journal entries through journald's native
protocol (qmpwatch.output.journal), checked here against a socket that reads that protocol.
The same against a real journald, with `journalctl QMPWATCH_VM=...`, is in
tests/service/test_systemd_service.py."""

from __future__ import annotations

import array
import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from qmpwatch.core.config import load_config
from qmpwatch.core.errors import ConfigError
from qmpwatch.output import journal
from qmpwatch.output.journal import JournalWriter, entry, message_id, open_stream
from qmpwatch.service.daemon import run_daemon

RECORD = {
    "timestamp": "2026-11-21T14:12:20.513752Z",
    "level": "critical",
    "event": "alert",
    "vm": "web01",
    "alert": "vm_stopped_io_error",
    "severity": "critical",
    "summary": "VM web01 paused: read error on drive0 (No space left on device)",
    "fingerprint": "3b1e5c0a9d7f2e41",
    "details": {"device": "drive0"},
}


def parse(datagram: bytes) -> dict[str, bytes]:
    """journald's native protocol: KEY=VALUE lines, or KEY, a 64-bit length, the value."""
    fields: dict[str, bytes] = {}
    i = 0
    while i < len(datagram):
        end = datagram.index(b"\n", i)
        key, sep, value = datagram[i:end].partition(b"=")
        if sep:
            fields[key.decode()] = value
            i = end + 1
            continue
        (size,) = struct.unpack("<Q", datagram[end + 1 : end + 9])
        fields[key.decode()] = datagram[end + 9 : end + 9 + size]
        assert datagram[end + 9 + size : end + 10 + size] == b"\n"
        i = end + 10 + size
    return fields


@pytest.fixture
def journald(sock_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket where journald's would be: (its path, the socket to read from)."""
    path = str(sock_dir / "journal.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        yield path, sock


def receive(sock: socket.socket) -> dict[str, bytes]:
    """One entry: from the datagram, or from the memfd it carries (an entry too large)."""
    data, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
    for level, kind, payload in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fd = array.array("i", payload[:4])[0]
            with os.fdopen(fd, "rb") as memfd:
                memfd.seek(0)
                return parse(memfd.read())
    return parse(data)


def line(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def test_message_ids_are_stable_uuids_one_per_kind() -> None:
    """MESSAGE_ID = uuid5(NAMESPACE_URL, "urn:qmpwatch:record:" + kind), 32 hex digits."""
    assert message_id("alert") == uuid.uuid5(uuid.NAMESPACE_URL, "urn:qmpwatch:record:alert").hex
    assert message_id("alert") == "fe04bd6a9499533882fee94173d5c751"  # never changes
    assert len({message_id(k) for k in ("alert", "alert_resolved", "qmp_event")}) == 3


def test_a_record_becomes_one_entry_with_its_fields(journald: tuple[str, socket.socket]) -> None:
    """MESSAGE is the console line without the clock, PRIORITY the level, QMPWATCH_* the keys,
    QMPWATCH_JSON the whole JSON line."""
    path, sock = journald
    with open_stream(path) as stream:
        stream.write(line(RECORD))
        stream.flush()
    fields = receive(sock)
    assert fields["MESSAGE"] == (
        b"web01 ALERT critical vm_stopped_io_error: "
        b"VM web01 paused: read error on drive0 (No space left on device)"
    )
    assert fields["PRIORITY"] == b"2"
    assert fields["MESSAGE_ID"] == message_id("alert").encode()
    assert fields["SYSLOG_IDENTIFIER"] == b"qmpwatch"
    assert fields["QMPWATCH_EVENT"] == b"alert"
    assert fields["QMPWATCH_VM"] == b"web01"
    assert fields["QMPWATCH_ALERT"] == b"vm_stopped_io_error"
    assert "QMPWATCH_QMP" not in fields
    assert orjson.loads(fields["QMPWATCH_JSON"]) == RECORD


def test_levels_and_records_without_a_vm() -> None:
    """PRIORITY follows the level (warning 4, info 6, error 3); a daemon record has no VM
    field and its console line as MESSAGE; a qmp_event names its event."""
    warning = dict(entry(line({"level": "warning", "event": "vm_connect_failed", "vm": "a"})[:-1]))
    assert warning["PRIORITY"] == 4
    daemon = dict(entry(line({"level": "info", "event": "daemon_started", "vms": 3})[:-1]))
    assert daemon["PRIORITY"] == 6
    assert "QMPWATCH_VM" not in daemon
    assert daemon["MESSAGE"] == "daemon_started vms=3"
    error = dict(entry(line({"level": "error", "event": "internal_error", "error": "x"})[:-1]))
    assert error["PRIORITY"] == 3
    event = {"level": "info", "event": "qmp_event", "vm": "a", "qmp": "STOP", "data": {}}
    stop = dict(entry(line(event)[:-1]))
    assert (stop["QMPWATCH_QMP"], stop["MESSAGE"]) == ("STOP", "a STOP")


def test_lines_cut_across_writes_are_joined() -> None:
    """The buffered stream may hand over part of a line: it waits for the rest."""
    sent: list[dict[str, Any]] = []
    writer = JournalWriter(lambda fields: sent.append(dict(fields)))
    data = line(RECORD) + line({**RECORD, "vm": "web02"})
    for i in range(0, len(data), 7):
        writer.write(data[i : i + 7])
    assert [e["QMPWATCH_VM"] for e in sent] == ["web01", "web02"]


def test_an_entry_larger_than_a_datagram_goes_in_a_memfd(
    journald: tuple[str, socket.socket],
) -> None:
    """A record bigger than the socket takes (a 1 MiB QMP event) still arrives whole."""
    path, sock = journald
    big = {**RECORD, "details": {"raw": "x" * (1 << 20)}}
    with open_stream(path) as stream:
        stream.write(line(big))
    assert orjson.loads(receive(sock)["QMPWATCH_JSON"]) == big


def test_a_failed_send_loses_that_entry_only() -> None:
    """journald not taking an entry costs that entry; the next ones still go."""
    sent: list[str] = []

    def send(fields: Any) -> None:
        vm = dict(fields)["QMPWATCH_VM"]
        if vm == "web01":
            raise ConnectionRefusedError
        sent.append(vm)

    writer = JournalWriter(send)
    writer.write(line(RECORD) + line({**RECORD, "vm": "web02"}))
    assert sent == ["web02"]
    assert writer.lost == 1


def test_log_target_is_a_config_key(tmp_path: Path) -> None:
    """daemon.log_target: "stdout" by default, "journal"; nothing else, and not with log_file."""
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nlog_target = "journal"\n')
    assert load_config(path).daemon.log_target == "journal"
    path.write_text("")
    assert load_config(path).daemon.log_target == "stdout"
    path.write_text('[daemon]\nlog_target = "syslog"\n')
    refused = r'daemon\.log_target: expected one of "stdout", "journal"'
    with pytest.raises(ConfigError, match=refused):
        load_config(path)
    path.write_text('[daemon]\nlog_target = "journal"\nlog_file = "/var/log/q.log"\n')
    with pytest.raises(ConfigError, match=r"daemon\.log_target: .*log_file must be empty"):
        load_config(path)


def test_the_daemon_does_not_start_without_journald(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """log_target = "journal" with no journald listening: exit status 2, saying so."""
    monkeypatch.setattr(journal, "SOCKET", str(tmp_path / "no-journald.sock"))
    config = tmp_path / "c.toml"
    config.write_text('[daemon]\nlog_target = "journal"\nmetrics_listen = ""\n')
    assert run_daemon(config) == 2
    assert "daemon.log_target: cannot reach journald at" in capsys.readouterr().err
