"""The decoder: spec examples of both revisions, real-QEMU messages, bad input, and fuzzing."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpwatch.core.errors import DecodeError
from qmpwatch.core.events import (
    MAX_TIMESTAMP_S,
    BlockIoError,
    Control,
    Endpoint,
    Event,
    Generic,
    GuestPanicked,
    Message,
    Reset,
    Resume,
    RtcChange,
    Shutdown,
    SpiceEvent,
    SpiceInitialized,
    Stop,
    VncEvent,
    Watchdog,
    decode,
    decode_object,
)
from tests.support.spec_examples import NEWEST, OLDER, examples

# ---------------------------------------------------------------------------------------------
# The examples of the QMP events document, both revisions

# The typed fields each example of the document must decode to, written out by hand from the
# document's text (not computed from the decoder).
SASL_SERVER = Endpoint(host="0.0.0.0", port="5901", family="ipv4")
EXPECTED_FIELDS: dict[str, tuple[type[Event], dict[str, Any]]] = {
    "BLOCK_IO_ERROR": (
        BlockIoError,
        {
            "device": "ide0-hd1",
            "operation": "write",
            "action": "stop",
            "nospace": None,
            "reason": None,
        },
    ),
    "RESET": (Reset, {"guest": None, "reason": None}),
    "RESUME": (Resume, {}),
    "RTC_CHANGE": (RtcChange, {"offset": 78}),
    "SHUTDOWN": (Shutdown, {"guest": None, "reason": None}),
    "STOP": (Stop, {}),
    "VNC_CONNECTED": (
        VncEvent,
        {
            "server": SASL_SERVER,
            "client": Endpoint(host="127.0.0.1", port="58425", family="ipv4"),
            "auth": "sasl",
        },
    ),
    "VNC_DISCONNECTED": (
        VncEvent,
        {
            "server": SASL_SERVER,
            "client": Endpoint(host="127.0.0.1", port="58425", family="ipv4"),
            "auth": "sasl",
        },
    ),
    "VNC_INITIALIZED": (
        VncEvent,
        {
            "server": SASL_SERVER,
            "client": Endpoint(host="127.0.0.1", port="46089", family="ipv4"),
            "auth": "sasl",
        },
    ),
    "SPICE_CONNECTED": (
        SpiceEvent,
        {
            "server": Endpoint(host="127.0.0.1", port="5920", family="ipv4"),
            "client": Endpoint(host="127.0.0.1", port="52873", family="ipv4"),
        },
    ),
    "SPICE_INITIALIZED": (
        SpiceInitialized,
        {
            "server": Endpoint(host="127.0.0.1", port="5921", family="ipv4"),
            "client": Endpoint(host="127.0.0.1", port="49004", family="ipv4"),
            "auth": "spice",
            "connection_id": 1804289383,
            "channel_type": 3,
            "channel_id": 0,
            "tls": True,
        },
    ),
    "WATCHDOG": (Watchdog, {"action": "reset"}),
}

SPEC_EXAMPLES = [
    pytest.param(obj, id=f"{path.name}:{section}")
    for path in (NEWEST, OLDER)
    for section, obj in examples(path)
]


def test_the_corpus_holds_every_example_of_both_revisions() -> None:
    """The newest document has 12 examples (one per section), the older one 8, STOP mislabelled."""
    newest = [(section, obj["event"]) for section, obj in examples(NEWEST)]
    older = [(section, obj["event"]) for section, obj in examples(OLDER)]
    assert [event for _, event in newest] == [
        "BLOCK_IO_ERROR",
        "RESET",
        "RESUME",
        "RTC_CHANGE",
        "SHUTDOWN",
        "STOP",
        "VNC_CONNECTED",
        "VNC_DISCONNECTED",
        "VNC_INITIALIZED",
        "SPICE_CONNECTED",
        "SPICE_INITIALIZED",
        "WATCHDOG",
    ]
    assert older == [
        ("BLOCK_IO_ERROR", "BLOCK_IO_ERROR"),
        ("RESET", "RESET"),
        ("RTC_CHANGE", "RTC_CHANGE"),
        ("SHUTDOWN", "SHUTDOWN"),
        ("STOP", "SHUTDOWN"),
        ("VNC_CONNECTED", "VNC_CONNECTED"),
        ("VNC_DISCONNECTED", "VNC_DISCONNECTED"),
        ("VNC_INITIALIZED", "VNC_INITIALIZED"),
    ]


@pytest.mark.parametrize("obj", SPEC_EXAMPLES)
def test_spec_example_decodes_to_its_typed_class(obj: dict[str, Any]) -> None:
    """Every example of both revisions decodes to its event's class with the documented fields."""
    event = decode(json.dumps(obj))
    cls, fields = EXPECTED_FIELDS[obj["event"]]
    assert type(event) is cls
    assert isinstance(event, Event)
    assert event.name == obj["event"]
    assert event.seconds == obj["timestamp"]["seconds"]
    assert event.microseconds == obj["timestamp"]["microseconds"]
    assert event.data == obj.get("data", {})
    for field, value in fields.items():
        assert getattr(event, field) == value, field


@pytest.mark.parametrize("obj", SPEC_EXAMPLES)
def test_spec_example_decodes_from_the_documents_own_text(obj: dict[str, Any]) -> None:
    """The example as printed (multi-line, bytes) and as a QEMU line (\\r\\n) decode the same."""
    pretty = json.dumps(obj, indent=4).encode()
    line = json.dumps(obj).encode() + b"\r\n"
    assert decode(pretty) == decode(line) == decode_object(obj)


def test_older_revisions_mislabelled_stop_example_is_a_shutdown() -> None:
    """The older document's STOP section shows a SHUTDOWN message, and it decodes as SHUTDOWN."""
    (stop_section,) = [obj for section, obj in examples(OLDER) if section == "STOP"]
    event = decode(json.dumps(stop_section))
    assert type(event) is Shutdown
    assert event.name == "SHUTDOWN"
    assert event.qemu_time == "2010-02-24T20:02:10.281295Z"


def test_qemu_time_is_iso_8601_utc_with_microseconds() -> None:
    """The BLOCK_IO_ERROR example's timestamp reads 2010-02-01T17:10:30.450486Z."""
    event = decode(json.dumps(examples(NEWEST)[0][1]))
    assert isinstance(event, Event)
    assert event.qemu_time == "2010-02-01T17:10:30.450486Z"
    assert event.time == pytest.approx(1265044230.450486, abs=1e-6)


def test_reset_example_keeps_small_microseconds_zero_padded() -> None:
    """9518 µs is shown as .009518, not .9518."""
    event = decode(
        b'{"event": "RESET", "timestamp": {"seconds": 1267041653, "microseconds": 9518}}'
    )
    assert isinstance(event, Event)
    assert event.qemu_time == "2010-02-24T20:00:53.009518Z"


# ---------------------------------------------------------------------------------------------
# Messages exactly as QEMU 7.2 writes them: timestamp first, ", " separators, \r\n line ends,
# and fields the document does not list.

QEMU_LINES: dict[str, bytes] = {
    "block_io_error": (
        b'{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": '
        b'"BLOCK_IO_ERROR", "data": {"device": "drive0", "nospace": false, "node-name": '
        b'"#block148", "reason": "Input/output error", "operation": "read", "action": "stop"}}'
        b"\r\n"
    ),
    "block_io_error_nospace": (
        b'{"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": "BLOCK_IO_ERROR", '
        b'"data": {"device": "", "nospace": true, "node-name": "disk0", "reason": '
        b'"No space left on device", "operation": "write", "action": "report"}}\r\n'
    ),
    "shutdown": (
        b'{"timestamp": {"seconds": 1700000001, "microseconds": 1}, "event": "SHUTDOWN", '
        b'"data": {"guest": true, "reason": "guest-shutdown"}}\r\n'
    ),
    "reset": (
        b'{"timestamp": {"seconds": 1700000002, "microseconds": 2}, "event": "RESET", '
        b'"data": {"guest": false, "reason": "host-qmp-system-reset"}}\r\n'
    ),
    "vnc": (
        b'{"timestamp": {"seconds": 1700000003, "microseconds": 3}, "event": "VNC_CONNECTED", '
        b'"data": {"server": {"auth": "none", "family": "ipv4", "service": "5900", '
        b'"host": "127.0.0.1", "websocket": false}, "client": {"family": "ipv4", '
        b'"service": "41234", "host": "127.0.0.1", "websocket": false}}}\r\n'
    ),
    "spice_initialized": (
        b'{"timestamp": {"seconds": 1700000004, "microseconds": 4}, "event": '
        b'"SPICE_INITIALIZED", "data": {"server": {"auth": "spice", "port": "5930", "family": '
        b'"ipv4", "host": "127.0.0.1"}, "client": {"port": "51422", "family": "ipv4", '
        b'"channel-type": 1, "connection-id": -1398566489, "host": "127.0.0.1", '
        b'"channel-id": 0, "tls": false}}}\r\n'
    ),
    "rtc_change": (
        b'{"timestamp": {"seconds": 1700000005, "microseconds": 5}, "event": "RTC_CHANGE", '
        b'"data": {"offset": -31536000, "qom-path": "/machine/unattached/device[4]"}}\r\n'
    ),
    "watchdog_inject_nmi": (
        b'{"timestamp": {"seconds": 1700000006, "microseconds": 6}, "event": "WATCHDOG", '
        b'"data": {"action": "inject-nmi"}}\r\n'
    ),
    "unknown_event": (
        b'{"timestamp": {"seconds": 1700000007, "microseconds": 7}, "event": '
        b'"BLOCK_JOB_READY", "data": {"device": "job0", "len": 18446744073709551615, '
        b'"offset": 0, "speed": 0, "type": "mirror"}}\r\n'
    ),
}


def _data_of(line: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(line)["data"]
    return data


def test_qemu_block_io_error_keeps_node_name_reason_and_nospace() -> None:
    """QEMU's BLOCK_IO_ERROR decodes with nospace and reason typed and node-name kept in data."""
    event = decode(QEMU_LINES["block_io_error"])
    assert isinstance(event, BlockIoError)
    assert (event.device, event.operation, event.action) == ("drive0", "read", "stop")
    assert event.nospace is False
    assert event.reason == "Input/output error"
    assert event.data == _data_of(QEMU_LINES["block_io_error"])
    assert event.data["node-name"] == "#block148"


def test_qemu_block_io_error_of_a_blockdev_has_an_empty_device() -> None:
    """A -blockdev disk reports device "" and its node-name; nospace true is kept."""
    event = decode(QEMU_LINES["block_io_error_nospace"])
    assert isinstance(event, BlockIoError)
    assert event.device == ""
    assert event.nospace is True
    assert event.data["node-name"] == "disk0"


@pytest.mark.parametrize(
    ("key", "cls", "guest", "reason"),
    [
        ("shutdown", Shutdown, True, "guest-shutdown"),
        ("reset", Reset, False, "host-qmp-system-reset"),
    ],
)
def test_qemu_shutdown_and_reset_keep_guest_and_reason(
    key: str, cls: type[Event], guest: bool, reason: str
) -> None:
    """SHUTDOWN and RESET from QEMU carry guest and reason, both typed and kept in data."""
    event = decode(QEMU_LINES[key])
    assert type(event) is cls
    assert isinstance(event, Shutdown | Reset)
    assert (event.guest, event.reason) == (guest, reason)
    assert event.data == _data_of(QEMU_LINES[key])


def test_qemu_vnc_event_with_websocket_and_auth_is_kept() -> None:
    """VNC_CONNECTED with websocket:false on both sides and auth in server decodes, data intact."""
    event = decode(QEMU_LINES["vnc"])
    assert isinstance(event, VncEvent)
    assert event.server == Endpoint("127.0.0.1", "5900", "ipv4")
    assert event.client == Endpoint("127.0.0.1", "41234", "ipv4")
    assert event.auth == "none"
    assert event.data["server"]["websocket"] is False
    assert event.data["client"]["websocket"] is False


def test_qemu_spice_initialized_with_negative_connection_id() -> None:
    """SPICE_INITIALIZED's connection-id can be negative; it is an int like any other."""
    event = decode(QEMU_LINES["spice_initialized"])
    assert isinstance(event, SpiceInitialized)
    assert event.connection_id == -1398566489
    assert (event.channel_type, event.channel_id, event.tls) == (1, 0, False)
    assert event.auth == "spice"


def test_qemu_rtc_change_keeps_qom_path() -> None:
    """RTC_CHANGE's qom-path (not in the document) is kept beside the typed offset."""
    event = decode(QEMU_LINES["rtc_change"])
    assert isinstance(event, RtcChange)
    assert event.offset == -31536000
    assert event.data["qom-path"] == "/machine/unattached/device[4]"


def test_rtc_change_offset_may_be_fractional() -> None:
    """A json-number offset that is not an integer is accepted."""
    event = decode_object(
        {
            "event": "RTC_CHANGE",
            "data": {"offset": 0.5},
            "timestamp": {"seconds": 1, "microseconds": 0},
        }
    )
    assert isinstance(event, RtcChange)
    assert event.offset == 0.5


def test_unknown_watchdog_action_is_kept_as_is() -> None:
    """A WATCHDOG action the document does not list (inject-nmi) is kept, not rejected."""
    event = decode(QEMU_LINES["watchdog_inject_nmi"])
    assert isinstance(event, Watchdog)
    assert event.action == "inject-nmi"


def test_unknown_event_is_generic_with_its_data_as_received() -> None:
    """An event without a class decodes as Generic; its data (a u64 too) is kept exactly."""
    event = decode(QEMU_LINES["unknown_event"])
    assert type(event) is Generic
    assert event.name == "BLOCK_JOB_READY"
    assert event.data == _data_of(QEMU_LINES["unknown_event"])
    assert event.data["len"] == 18446744073709551615


def test_guest_panicked_with_info_is_typed() -> None:
    """GUEST_PANICKED keeps its action typed and its info object in data."""
    event = decode(
        b'{"timestamp": {"seconds": 1700000008, "microseconds": 8}, "event": "GUEST_PANICKED", '
        b'"data": {"action": "pause", "info": {"type": "hyper-v", "arg1": 0}}}\r\n'
    )
    assert isinstance(event, GuestPanicked)
    assert event.action == "pause"
    assert event.data["info"] == {"type": "hyper-v", "arg1": 0}


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (
            b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": '
            b'"Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}\r\n',
            "greeting",
        ),
        (  # QEMU 10.0
            b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": '
            b'"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}\r\n',
            "greeting",
        ),
        (b'{"return": {}}\r\n', "return"),
        (
            b'{"return": {"status": "io-error", "singlestep": false, "running": false}}\r\n',
            "return",
        ),
        (b'{"return": {"status": "io-error", "running": false}}\r\n', "return"),  # 10.0
        (b'{"error": {"class": "CommandNotFound", "desc": "no such command"}}\r\n', "error"),
    ],
)
def test_non_event_messages_are_control(raw: bytes, kind: str) -> None:
    """The greeting and command replies decode as Control, with the message as body."""
    message = decode(raw)
    assert isinstance(message, Control)
    assert message.kind == kind
    assert message.body == json.loads(raw)


# ---------------------------------------------------------------------------------------------
# Bad input


def _event(name: str, data: object) -> str:
    return json.dumps(
        {"event": name, "data": data, "timestamp": {"seconds": 1700000000, "microseconds": 0}}
    )


SPICE_CLIENT = {
    "port": "1",
    "family": "ipv4",
    "host": "h",
    "channel-type": 1,
    "connection-id": 1,
    "channel-id": 0,
}
SPICE_SERVER = {"port": "5930", "family": "ipv4", "host": "h"}
VNC_SERVER = {"service": "5900", "family": "ipv4", "host": "h"}

BAD_INPUT = [
    pytest.param("this is not json", "not JSON", id="not-json"),
    pytest.param("", "not JSON", id="empty"),
    pytest.param('{"event": "STOP", "timestamp": {"seconds', "not JSON", id="truncated"),
    pytest.param("[1, 2, 3]", "not a JSON object: got an array", id="array"),
    pytest.param("42", "not a JSON object: got a number", id="number"),
    pytest.param('"STOP"', "not a JSON object: got a string", id="string"),
    pytest.param("null", "not a JSON object: got null", id="null"),
    pytest.param('{"foo": 1}', "not a QMP message", id="no-event-return-error-or-QMP"),
    pytest.param(
        _event("BLOCK_IO_ERROR", {"device": 5, "operation": "read", "action": "stop"}),
        "data.device: expected a string, got a number",
        id="device-5",
    ),
    pytest.param(
        _event("BLOCK_IO_ERROR", {"device": "d", "operation": "read"}),
        "data.action: expected a string, got null",
        id="action-missing",
    ),
    pytest.param(
        _event("BLOCK_IO_ERROR", {"device": "d", "operation": "r", "action": "s", "nospace": "no"}),
        "data.nospace: expected a boolean, got a string",
        id="nospace-string",
    ),
    pytest.param(
        _event("RTC_CHANGE", {"offset": "x"}),
        "data.offset: expected a number, got a string",
        id="offset-x",
    ),
    pytest.param(
        _event("RTC_CHANGE", {"offset": True}),
        "data.offset: expected a number, got a boolean",
        id="offset-bool",
    ),
    pytest.param(
        _event(
            "SPICE_INITIALIZED", {"server": SPICE_SERVER, "client": SPICE_CLIENT | {"tls": "yes"}}
        ),
        "data.client.tls: expected a boolean, got a string",
        id="tls-yes",
    ),
    pytest.param(
        _event("SPICE_INITIALIZED", {"server": SPICE_SERVER, "client": SPICE_CLIENT}),
        "data.client.tls: expected a boolean, got null",
        id="tls-missing",
    ),
    pytest.param(
        _event(
            "SPICE_INITIALIZED",
            {"server": SPICE_SERVER, "client": SPICE_CLIENT | {"tls": True, "connection-id": "7"}},
        ),
        "data.client.connection-id: expected an integer, got a string",
        id="connection-id-string",
    ),
    pytest.param(
        _event("VNC_CONNECTED", {"server": VNC_SERVER}),
        "data.client: expected an object, got null",
        id="vnc-client-missing",
    ),
    pytest.param(
        _event("VNC_CONNECTED", {"server": VNC_SERVER, "client": VNC_SERVER | {"service": 5900}}),
        "data.client.service: expected a string, got a number",
        id="vnc-service-number",
    ),
    pytest.param(
        _event(
            "VNC_DISCONNECTED", {"server": VNC_SERVER, "client": VNC_SERVER | {"sasl_username": 1}}
        ),
        "data.client.sasl_username: expected a string, got a number",
        id="vnc-sasl-username-number",
    ),
    pytest.param(
        _event("WATCHDOG", {"action": ["reset"]}),
        "data.action: expected a string, got an array",
        id="watchdog-action-array",
    ),
    pytest.param(_event("STOP", []), "data: expected an object, got an array", id="data-array"),
    pytest.param(_event("STOP", None), "data: expected an object, got null", id="data-null"),
    pytest.param('{"event": "STOP"}', "timestamp: expected an object, got null", id="no-timestamp"),
    pytest.param(
        '{"event": "STOP", "timestamp": 1700000000}',
        "timestamp: expected an object, got a number",
        id="timestamp-number",
    ),
    pytest.param(
        '{"event": "STOP", "timestamp": {"seconds": "1700000000", "microseconds": 0}}',
        "timestamp.seconds: expected an integer, got a string",
        id="seconds-string",
    ),
    pytest.param(
        '{"event": "STOP", "timestamp": {"seconds": 1700000000}}',
        "timestamp.microseconds: expected an integer, got null",
        id="microseconds-missing",
    ),
    pytest.param(
        '{"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 1000000}}',
        "timestamp: out of range",
        id="microseconds-a-million",
    ),
    pytest.param(
        '{"event": "STOP", "timestamp": {"seconds": -1, "microseconds": 0}}',
        "timestamp: out of range",
        id="seconds-negative",
    ),
    pytest.param(
        '{"event": "STOP", "timestamp": {"seconds": 253402300800, "microseconds": 0}}',
        "timestamp: out of range",
        id="seconds-past-year-9999",
    ),
    pytest.param(
        '{"event": 5, "timestamp": {"seconds": 1, "microseconds": 0}}',
        "event: expected a string, got a number",
        id="event-number",
    ),
    pytest.param("[" * 5000 + "]" * 5000, "not JSON", id="deeply-nested-array"),
    pytest.param('{"a":' * 5000 + "1" + "}" * 5000, "not JSON", id="deeply-nested-object"),
]


@pytest.mark.parametrize(("raw", "error"), BAD_INPUT)
def test_bad_text_is_a_decode_error_with_raw_and_reason(raw: str, error: str) -> None:
    """Bad messages raise DecodeError whose .raw is the text and .error says what is wrong."""
    with pytest.raises(DecodeError) as caught:
        decode(raw)
    assert error in caught.value.error
    assert caught.value.raw == raw
    assert str(caught.value) == caught.value.error


@pytest.mark.parametrize(("raw", "error"), BAD_INPUT)
def test_bad_bytes_are_a_decode_error_too(raw: str, error: str) -> None:
    """The same bad messages as bytes (with QEMU's \\r\\n) give the same error and the raw text."""
    with pytest.raises(DecodeError) as caught:
        decode(raw.encode() + b"\r\n")
    assert error in caught.value.error
    assert caught.value.raw == raw + "\r\n"


def test_invalid_utf8_is_a_decode_error_with_readable_raw() -> None:
    """Invalid UTF-8 bytes are a DecodeError; .raw shows them as replacement characters."""
    raw = b'{"event": "STOP", "data": {"x": "\xff\xfe"}}\r\n'
    with pytest.raises(DecodeError) as caught:
        decode(raw)
    assert "not JSON" in caught.value.error
    assert "UTF-8" in caught.value.error
    assert caught.value.raw == '{"event": "STOP", "data": {"x": "\ufffd\ufffd"}}\r\n'


def test_decode_object_error_carries_the_given_raw_text() -> None:
    """decode_object puts the caller's raw text into the DecodeError, or the object as JSON."""
    obj = {"event": "STOP", "timestamp": {"seconds": "soon", "microseconds": 0}}
    with pytest.raises(DecodeError) as caught:
        decode_object(obj, raw="the line as read")
    assert caught.value.raw == "the line as read"
    with pytest.raises(DecodeError) as caught:
        decode_object(obj)
    assert json.loads(caught.value.raw) == obj


# ---------------------------------------------------------------------------------------------
# Properties

# JSON values as QMP can carry them: integers within int64/uint64 (QEMU's widest), finite floats.
QMP_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOAT = st.floats(allow_nan=False, allow_infinity=False)
JSON_SCALAR = st.none() | st.booleans() | QMP_INT | FLOAT | st.text()
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
EVENT_NAMES = st.sampled_from(
    [*sorted(EXPECTED_FIELDS), "SPICE_DISCONNECTED", "POWERDOWN", "GUEST_PANICKED"]
)
TIMESTAMP = st.fixed_dictionaries(
    {
        "seconds": st.integers(min_value=0, max_value=MAX_TIMESTAMP_S),
        "microseconds": st.integers(min_value=0, max_value=999_999),
    }
)


def _outcome(call: Callable[[], Message]) -> Message | DecodeError:
    """The decoded message, or the DecodeError raised; any other exception propagates."""
    try:
        return call()
    except DecodeError as err:
        return err


@given(st.binary())
def test_decoder_raises_only_decode_error_on_arbitrary_bytes(raw: bytes) -> None:
    """Whatever bytes arrive, decode returns a message or raises DecodeError with the text."""
    result = _outcome(lambda: decode(raw))
    if isinstance(result, DecodeError):
        assert result.error
        assert result.raw == raw.decode("utf-8", "replace")


@given(st.text())
def test_decoder_raises_only_decode_error_on_arbitrary_text(raw: str) -> None:
    """Whatever text arrives, decode returns a message or raises DecodeError keeping the text."""
    result = _outcome(lambda: decode(raw))
    if isinstance(result, DecodeError):
        assert result.error
        assert result.raw == raw


@given(
    st.dictionaries(st.sampled_from(["event", "timestamp", "data", "return", "QMP"]), JSON_VALUE)
)
def test_decode_object_raises_only_decode_error_on_arbitrary_objects(obj: dict[str, Any]) -> None:
    """Any JSON object with QMP-ish keys decodes or raises DecodeError, nothing else."""
    result = _outcome(lambda: decode_object(obj))
    if isinstance(result, DecodeError):
        assert result.error
        assert json.loads(result.raw) == obj


@given(st.sampled_from([obj for _, obj in examples(NEWEST)]), st.data())
def test_decode_object_raises_only_decode_error_on_mutated_spec_examples(
    example: dict[str, Any], draw: st.DataObject
) -> None:
    """A spec example with any one data field (also nested) replaced decodes or is DecodeError."""
    obj = json.loads(json.dumps(example))
    target = obj.setdefault("data", {})
    nested = [k for k, v in target.items() if isinstance(v, dict)]
    go_deeper: bool = draw.draw(st.booleans())
    if nested and go_deeper:
        target = target[draw.draw(st.sampled_from(nested))]
    keys = [*sorted(target), "extra", "tls", "connection-id", "offset", "action"]
    target[draw.draw(st.sampled_from(keys))] = draw.draw(JSON_VALUE)
    result = _outcome(lambda: decode_object(obj))
    if isinstance(result, DecodeError):
        assert result.error.startswith("data")
        assert json.loads(result.raw) == obj
    else:
        assert isinstance(result, Event)
        assert result.data == obj["data"]


def _valid_data(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Documented fields of `name` with valid values (optional ones sometimes absent), plus
    fields the document does not list."""
    text = st.text(max_size=8)
    ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)
    side = {"host": text, "family": text}
    vnc = st.fixed_dictionaries(
        {
            "server": st.fixed_dictionaries(side | {"service": text}, optional={"auth": text}),
            "client": st.fixed_dictionaries(
                side | {"service": text}, optional={"sasl_username": text, "x509_dname": text}
            ),
        }
    )
    spice_server = st.fixed_dictionaries(side | {"port": text}, optional={"auth": text})
    spice_client = st.fixed_dictionaries(side | {"port": text})
    spice_initialized_client = st.fixed_dictionaries(
        side
        | {
            "port": text,
            "tls": st.booleans(),
            "connection-id": ints,
            "channel-type": ints,
            "channel-id": ints,
        }
    )
    documented: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "BLOCK_IO_ERROR": st.fixed_dictionaries(
            {"device": text, "operation": text, "action": text},
            optional={"nospace": st.booleans(), "reason": text, "node-name": text},
        ),
        "RESET": st.fixed_dictionaries({}, optional={"guest": st.booleans(), "reason": text}),
        "SHUTDOWN": st.fixed_dictionaries({}, optional={"guest": st.booleans(), "reason": text}),
        "RTC_CHANGE": st.fixed_dictionaries(
            {"offset": QMP_INT | FLOAT},
            optional={"qom-path": text},
        ),
        "VNC_CONNECTED": vnc,
        "VNC_INITIALIZED": vnc,
        "VNC_DISCONNECTED": vnc,
        "SPICE_CONNECTED": st.fixed_dictionaries({"server": spice_server, "client": spice_client}),
        "SPICE_DISCONNECTED": st.fixed_dictionaries(
            {"server": spice_server, "client": spice_client}
        ),
        "SPICE_INITIALIZED": st.fixed_dictionaries(
            {"server": spice_server, "client": spice_initialized_client}
        ),
        "WATCHDOG": st.fixed_dictionaries({"action": text}),
        "GUEST_PANICKED": st.fixed_dictionaries({"action": text}),
    }
    base = documented.get(name, st.fixed_dictionaries({}))
    extra = st.dictionaries(st.text(min_size=1).map(lambda k: "x-" + k), JSON_VALUE, max_size=3)
    return st.tuples(base, extra).map(lambda pair: pair[0] | pair[1])


@given(st.data(), EVENT_NAMES | st.text(), TIMESTAMP)
def test_valid_events_round_trip_with_data_as_received(
    draw: st.DataObject, name: str, timestamp: dict[str, int]
) -> None:
    """A valid event, documented or not, decodes with its name, time and data exactly as sent."""
    data = draw.draw(_valid_data(name))
    message: dict[str, Any] = {"timestamp": timestamp, "event": name}
    with_empty_data: bool = draw.draw(st.booleans())
    if data or with_empty_data:
        message["data"] = data
    line = orjson.dumps(message) + b"\r\n"
    event = decode(line)
    assert isinstance(event, Event)
    assert event.name == name
    assert (event.seconds, event.microseconds) == (timestamp["seconds"], timestamp["microseconds"])
    assert event.data == data
    # exactly as received: same JSON text, so no int became a float nor a bool an int
    assert orjson.dumps(event.data) == orjson.dumps(data)
    shown = datetime.fromtimestamp(timestamp["seconds"], UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert event.qemu_time == f"{shown}.{timestamp['microseconds']:06d}Z"
    if name in EXPECTED_FIELDS:
        assert type(event) is EXPECTED_FIELDS[name][0]
