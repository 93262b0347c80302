"""RecordLogger's direct rendering writes byte for byte what structlog's chain writes."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from qmpwatch.core.events import Event, decode
from qmpwatch.core.times import iso_from_epoch
from qmpwatch.output import logs
from qmpwatch.output.logs import RecordLogger, qmp_event_fields

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(["vm", "qmp", "data", "level", "event", "timestamp", "x"]) | st.text(
    max_size=8
)
fields_dicts = st.dictionaries(field_names, json_values, max_size=5)
levels = st.sampled_from(["info", "warning", "error", "critical", "debug", "warn"])
times = st.floats(min_value=0, max_value=2**33, allow_nan=False)


@pytest.fixture(scope="module")
def buffer() -> Iterator[io.BytesIO]:
    """structlog configured for JSON lines into a buffer; the defaults are restored after."""
    out = io.BytesIO()
    logs.configure("json", out)
    try:
        yield out
    finally:
        logs.unconfigure()


def written(out: io.BytesIO, write: Any) -> bytes | type[BaseException]:
    """What one call writes (outside an event loop every line is written at once)."""
    out.seek(0)
    out.truncate()
    try:
        write()
    except Exception as err:
        return type(err)
    return out.getvalue()


@given(kind=st.text(min_size=1, max_size=12), level=levels, now=times, fields=fields_dicts)
def test_direct_rendering_equals_structlogs_chain(
    buffer: io.BytesIO, kind: str, level: str, now: float, fields: dict[str, Any]
) -> None:
    """Any record: the same bytes as the bound logger's processor chain (the same TypeError
    only for fields named `timestamp` or `event`, which no caller may pass)."""
    records = RecordLogger("web01")
    direct = written(buffer, lambda: records.record(kind, level, now, dict(fields)))
    chain = written(
        buffer,
        lambda: getattr(records._log, level)(kind, timestamp=iso_from_epoch(now), **fields),
    )
    assert direct == chain
    if not {"timestamp", "event"} & fields.keys():  # keys no caller may pass: a TypeError
        assert isinstance(direct, bytes)  # both paths rendering, not both crashing alike
    else:
        assert direct is TypeError


def test_a_qmp_event_record_is_rendered_like_the_chain(buffer: io.BytesIO) -> None:
    """The per-event record (nested data, unicode) takes the direct path and matches."""
    event = decode(
        b'{"timestamp": {"seconds": 1700000000, "microseconds": 74}, "event": "VNC_CONNECTED",'
        b' "data": {"server": {"host": "0.0.0.0", "service": "5900", "family": "ipv4"},'
        b' "client": {"host": "\\u00e9", "service": "1", "family": "ipv4"}}}'
    )
    assert isinstance(event, Event)
    fields = {"qmp": "VNC_CONNECTED", "qemu_time": event.qemu_time, "data": event.data}
    records = RecordLogger("web01")
    direct = written(buffer, lambda: records.record("qmp_event", "info", 1700000000.5, fields))
    chain = written(
        buffer,
        lambda: records._log.info("qmp_event", timestamp=iso_from_epoch(1700000000.5), **fields),
    )
    assert direct == chain
    assert isinstance(direct, bytes)
    assert direct.startswith(
        b'{"timestamp":"2023-11-14T22:13:20.500000Z","level":"info","event":"qmp_event",'
        b'"vm":"web01","qmp":"VNC_CONNECTED"'
    )


@given(
    name=st.text(max_size=12),
    seconds=st.integers(0, 253_402_300_799),
    micro=st.integers(0, 999_999),
    data=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    nows=st.lists(times, min_size=1, max_size=3),
)
def test_qmp_event_records_equal_structlogs_chain(
    buffer: io.BytesIO,
    name: str,
    seconds: int,
    micro: int,
    data: dict[str, Any],
    nows: list[float],
) -> None:
    """`qmp_event()` writes what the chain writes for `qmp_event_fields`, for any event, also
    when records come one after another with the same or another time."""
    event = Event(name, seconds, micro, data)
    records = RecordLogger("web01")
    for now in [*nows, nows[-1]]:
        direct = written(buffer, lambda now=now: records.qmp_event(event, now))
        chain = written(
            buffer,
            lambda now=now: records._log.info(
                "qmp_event", timestamp=iso_from_epoch(now), **qmp_event_fields(event)
            ),
        )
        assert direct == chain
        assert isinstance(direct, bytes)  # any event renders: no error shared by both paths


def test_capture_logs_still_sees_records(buffer: io.BytesIO) -> None:
    """Under capture_logs() records go through structlog (as dicts), not straight to the file."""
    records = RecordLogger("web01")
    buffer.seek(0)
    buffer.truncate()
    with capture_logs() as captured:
        records.record("qmp_event", "info", 0.0, {"qmp": "STOP"})
    assert buffer.getvalue() == b""
    assert captured == [
        {
            "event": "qmp_event",
            "log_level": "info",
            "vm": "web01",
            "timestamp": "1970-01-01T00:00:00.000000Z",
            "qmp": "STOP",
        }
    ]
