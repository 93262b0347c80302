"""The decoder: a raw QMP message (text, bytes or a parsed object) -> a typed, frozen event.

Pure. Every event of the QMP events document has a class whose documented fields are checked;
anything QEMU adds is kept, and what breaks the document is a `DecodeError` with the raw text
(docs/architecture.md, "The decoder").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, TypeVar

import orjson

from qmpwatch.core.errors import DecodeError
from qmpwatch.core.times import iso_utc

MAX_TIMESTAMP_S = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second ISO 8601 can show
# Deepest nesting of a message that is decoded: orjson writes at most 254 levels, and a log
# record puts `data` two levels down. Real QEMU nests a few levels; deeper is a DecodeError.
MAX_DEPTH = 250


@dataclass(frozen=True, slots=True)
class Event:
    """A QMP event; subclasses add the typed fields of documented events.

    An event holds its name, QEMU's timestamp and its data exactly as received; the typed
    fields of a subclass are read from `data`, whose types the decoder checked before it made
    the event. (Storing them again cost more than the rest of decoding: an event is made for
    every message, and a typed field is read for a few.)
    """

    name: str
    seconds: int
    microseconds: int
    data: Mapping[str, Any]

    @property
    def time(self) -> float:
        """QEMU's timestamp as seconds since the epoch."""
        return self.seconds + self.microseconds / 1_000_000

    @property
    def qemu_time(self) -> str:
        """QEMU's timestamp as ISO 8601, UTC, with microseconds."""
        return iso_utc(self.seconds, self.microseconds)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of a VNC or SPICE connection (VNC's `service` is the port)."""

    host: str
    port: str
    family: str


def _field(event: Event, key: str) -> Any:
    return event.data.get(key)


def _endpoint_of(event: Event, key: str, port_key: str) -> Endpoint:
    side = event.data[key]
    return Endpoint(side["host"], side[port_key], side["family"])


class BlockIoError(Event):
    __slots__ = ()

    @property
    def device(self) -> str:
        return _field(self, "device")  # type: ignore[no-any-return]

    @property
    def operation(self) -> str:
        return _field(self, "operation")  # type: ignore[no-any-return]

    @property
    def action(self) -> str:
        return _field(self, "action")  # type: ignore[no-any-return]

    @property
    def nospace(self) -> bool | None:
        return _field(self, "nospace")  # type: ignore[no-any-return]

    @property
    def reason(self) -> str | None:
        return _field(self, "reason")  # type: ignore[no-any-return]


class _GuestOrHost(Event):
    """RESET and SHUTDOWN: whether the guest asked for it, and QEMU's reason."""

    __slots__ = ()

    @property
    def guest(self) -> bool | None:
        return _field(self, "guest")  # type: ignore[no-any-return]

    @property
    def reason(self) -> str | None:
        return _field(self, "reason")  # type: ignore[no-any-return]


class Reset(_GuestOrHost):
    __slots__ = ()


class Resume(Event):
    __slots__ = ()


class RtcChange(Event):
    __slots__ = ()

    @property
    def offset(self) -> int | float:
        return _field(self, "offset")  # type: ignore[no-any-return]


class Shutdown(_GuestOrHost):
    __slots__ = ()


class Stop(Event):
    __slots__ = ()


class Powerdown(Event):
    __slots__ = ()


class _Connection(Event):
    """An event about a display connection: its `server` and `client` endpoints."""

    __slots__ = ()
    _PORT_KEY: ClassVar[str] = "port"  # the key of an endpoint's port in `data`

    @property
    def server(self) -> Endpoint:
        return _endpoint_of(self, "server", self._PORT_KEY)

    @property
    def client(self) -> Endpoint:
        return _endpoint_of(self, "client", self._PORT_KEY)

    @property
    def auth(self) -> str | None:
        return self.data["server"].get("auth")  # type: ignore[no-any-return]


class SpiceEvent(_Connection):
    """SPICE_CONNECTED and SPICE_DISCONNECTED."""

    __slots__ = ()


class VncEvent(_Connection):
    """VNC_CONNECTED, VNC_INITIALIZED and VNC_DISCONNECTED (`name` tells which)."""

    __slots__ = ()
    _PORT_KEY = "service"


class SpiceInitialized(SpiceEvent):
    __slots__ = ()

    @property
    def connection_id(self) -> int:
        return self.data["client"]["connection-id"]  # type: ignore[no-any-return]

    @property
    def channel_type(self) -> int:
        return self.data["client"]["channel-type"]  # type: ignore[no-any-return]

    @property
    def channel_id(self) -> int:
        return self.data["client"]["channel-id"]  # type: ignore[no-any-return]

    @property
    def tls(self) -> bool:
        return self.data["client"]["tls"]  # type: ignore[no-any-return]


class Watchdog(Event):
    __slots__ = ()

    @property
    def action(self) -> str:
        return _field(self, "action")  # type: ignore[no-any-return]


class GuestPanicked(Event):
    __slots__ = ()

    @property
    def action(self) -> str:
        return _field(self, "action")  # type: ignore[no-any-return]


class Generic(Event):
    """An event qmpwatch has no class for; logged as it is."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Control:
    """A QMP message that is not an event: the greeting, or a command's reply."""

    kind: str  # "greeting" | "return" | "error"
    body: Mapping[str, Any]


Message = Event | Control


# ---------------------------------------------------------------------------------------------
# Decoding

_T = TypeVar("_T")


def _constructor(cls: type[_T]) -> Callable[..., _T]:
    """`cls(*fields)` for a frozen slots dataclass, without the frozen `__init__`'s cost.

    The frozen `__init__` goes through `object.__setattr__` once per field; this sets the
    slots through their descriptors, which takes half the time (decoding runs per event).
    The object is the same: every field positional, no defaults, no `__post_init__`.
    """
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(cls))  # type: ignore[arg-type]
    assert not hasattr(cls, "__post_init__")
    args = ", ".join(names)
    body = "".join(f"    _set_{n}(obj, {n})\n" for n in names)
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_set_{n}": getattr(cls, n).__set__ for n in names})
    exec(f"def make({args}):\n    obj = _new(_cls)\n{body}    return obj\n", namespace)
    make: Callable[..., _T] = namespace["make"]
    return make


class _Bad(Exception):
    """Internal: a documented field breaks its type; turned into DecodeError with the raw text."""


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


type_name = _type_name  # "a string", "an object", ...: for messages about a JSON value


def deeper_than(value: object, limit: int) -> bool:
    """Whether `value` (parsed JSON) nests objects/arrays more than `limit` levels deep."""
    level: list[object] = [value]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[object] = []
        for item in level:
            if type(item) is dict:
                below.extend(v for v in item.values() if type(v) is dict or type(v) is list)
            elif type(item) is list:
                below.extend(v for v in item if type(v) is dict or type(v) is list)
        level = below
    return False


def _req_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if type(value) is not str:
        raise _Bad(f"{where}.{key}: expected a string, got {_type_name(value)}")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and type(value) is not str:
        raise _Bad(f"{where}.{key}: expected a string, got {_type_name(value)}")
    return value


def _opt_bool(obj: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = obj.get(key)
    if value is not None and type(value) is not bool:
        raise _Bad(f"{where}.{key}: expected a boolean, got {_type_name(value)}")
    return value


def _req_int(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if type(value) is not int:
        raise _Bad(f"{where}.{key}: expected an integer, got {_type_name(value)}")
    return value


def _req_obj(obj: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if type(value) is not dict:
        raise _Bad(f"{where}.{key}: expected an object, got {_type_name(value)}")
    return value


def _is_endpoint(obj: Mapping[str, Any], port_key: str) -> bool:
    """Whether host, the port key and family are all strings (`_check_endpoint` says why not)."""
    return (
        type(obj.get("host")) is str
        and type(obj.get(port_key)) is str
        and type(obj.get("family")) is str
    )


def _check_endpoint(data: Mapping[str, Any], key: str, port_key: str) -> Mapping[str, Any]:
    obj = _req_obj(data, key, "data")
    where = f"data.{key}"
    for field_key in ("host", port_key, "family"):
        _req_str(obj, field_key, where)
    return obj


_Builder = Callable[[str, int, int, Mapping[str, Any]], Event]


# Each builder below checks the documented fields of its event (the common, valid case in one
# go; anything else field by field, in document order, to say what is wrong) and makes the
# event with `_make` (see `_constructor`).


def _block_io_error(n: str, s: int, us: int, d: Mapping[str, Any]) -> Event:
    nospace = d.get("nospace")
    reason = d.get("reason")
    if not (
        type(d.get("device")) is str
        and type(d.get("operation")) is str
        and type(d.get("action")) is str
        and (nospace is None or type(nospace) is bool)
        and (reason is None or type(reason) is str)
    ):
        _req_str(d, "device", "data")
        _req_str(d, "operation", "data")
        _req_str(d, "action", "data")
        _opt_bool(d, "nospace", "data")
        _opt_str(d, "reason", "data")
    return _new_block_io_error(n, s, us, d)


def _guest_and_reason(d: Mapping[str, Any]) -> None:
    guest = d.get("guest")
    reason = d.get("reason")
    if not ((guest is None or type(guest) is bool) and (reason is None or type(reason) is str)):
        _opt_bool(d, "guest", "data")
        _opt_str(d, "reason", "data")


def _reset(n: str, s: int, us: int, d: Mapping[str, Any]) -> Event:
    _guest_and_reason(d)
    return _new_reset(n, s, us, d)


def _shutdown(n: str, s: int, us: int, d: Mapping[str, Any]) -> Event:
    _guest_and_reason(d)
    return _new_shutdown(n, s, us, d)


def _rtc_change(n: str, s: int, us: int, d: Mapping[str, Any]) -> Event:
    offset = d.get("offset")
    if type(offset) is not int and type(offset) is not float:
        raise _Bad(f"data.offset: expected a number, got {_type_name(offset)}")
    return _new_rtc_change(n, s, us, d)


def _vnc(n: str, s: int, us: int, d: Mapping[str, Any]) -> Event:
    server = d.get("server")
    client = d.get("client")
    if type(server) is dict and type(client) is dict:
        auth = server.get("auth")
        x509 = client.get("x509_dname")
        sasl = client.get("sasl_username")
        if (
            (auth is None or type(auth) is str)
            and (x509 is None or type(x509) is str)
            and (sasl is None or type(sasl) is str)
            and _is_endpoint(server, "service")
            and _is_endpoint(client, "service")
        ):
            return _new_vnc(n, s, us, d)
    server = _check_endpoint(d, "server", "service")
    client = _check_endpoint(d, "client", "service")
    _opt_str(client, "x509_dname", "data.client")
    _opt_str(client, "sasl_username", "data.client")
    _opt_str(server, "auth", "data.server")
    return _new_vnc(n, s, us, d)


def _spice(n: str, s: int, us: int, d: Mapping[str, Any]) -> Event:
    _check_endpoint(d, "server", "port")
    _check_endpoint(d, "client", "port")
    return _new_spice(n, s, us, d)


def _spice_initialized(n: str, s: int, us: int, d: Mapping[str, Any]) -> Event:
    server = _check_endpoint(d, "server", "port")
    client = _check_endpoint(d, "client", "port")
    tls = client.get("tls")
    if type(tls) is not bool:
        raise _Bad(f"data.client.tls: expected a boolean, got {_type_name(tls)}")
    _opt_str(server, "auth", "data.server")
    _req_int(client, "connection-id", "data.client")
    _req_int(client, "channel-type", "data.client")
    _req_int(client, "channel-id", "data.client")
    return _new_spice_initialized(n, s, us, d)


def _watchdog(n: str, s: int, us: int, d: Mapping[str, Any]) -> Event:
    _req_str(d, "action", "data")
    return _new_watchdog(n, s, us, d)


def _guest_panicked(n: str, s: int, us: int, d: Mapping[str, Any]) -> Event:
    _req_str(d, "action", "data")
    return _new_guest_panicked(n, s, us, d)


_new_block_io_error = _constructor(BlockIoError)
_new_reset = _constructor(Reset)
_new_shutdown = _constructor(Shutdown)
_new_rtc_change = _constructor(RtcChange)
_new_vnc = _constructor(VncEvent)
_new_spice = _constructor(SpiceEvent)
_new_spice_initialized = _constructor(SpiceInitialized)
_new_watchdog = _constructor(Watchdog)
_new_guest_panicked = _constructor(GuestPanicked)


BUILDERS: dict[str, _Builder] = {
    "BLOCK_IO_ERROR": _block_io_error,
    "RESET": _reset,
    "RESUME": _constructor(Resume),
    "RTC_CHANGE": _rtc_change,
    "SHUTDOWN": _shutdown,
    "STOP": _constructor(Stop),
    "POWERDOWN": _constructor(Powerdown),
    "VNC_CONNECTED": _vnc,
    "VNC_DISCONNECTED": _vnc,
    "VNC_INITIALIZED": _vnc,
    "SPICE_CONNECTED": _spice,
    "SPICE_DISCONNECTED": _spice,
    "SPICE_INITIALIZED": _spice_initialized,
    "WATCHDOG": _watchdog,
    "GUEST_PANICKED": _guest_panicked,
}
_generic: _Builder = _constructor(Generic)
_EMPTY: Mapping[str, Any] = {}


def _raw_text(raw: object) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        return raw
    try:
        return orjson.dumps(raw).decode()
    except TypeError:
        return repr(raw)


def decode_object(obj: Mapping[str, Any], raw: object = None) -> Message:
    """Decode a parsed QMP message; `raw` (the original text, if any) goes into a DecodeError."""
    try:
        if "event" not in obj:
            return _control(obj)
        name = obj["event"]
        if type(name) is not str:
            raise _Bad(f"event: expected a string, got {_type_name(name)}")
        ts = obj.get("timestamp")
        if type(ts) is not dict:
            raise _Bad(f"timestamp: expected an object, got {_type_name(ts)}")
        seconds = ts.get("seconds")
        if type(seconds) is not int:
            seconds = _req_int(ts, "seconds", "timestamp")  # raises, saying why
        micro = ts.get("microseconds")
        if type(micro) is not int:
            micro = _req_int(ts, "microseconds", "timestamp")
        if not (0 <= seconds <= MAX_TIMESTAMP_S and 0 <= micro < 1_000_000):
            raise _Bad(f"timestamp: out of range ({seconds} s, {micro} µs)")
        data = obj.get("data", _EMPTY)
        if type(data) is not dict and data is not _EMPTY:
            raise _Bad(f"data: expected an object, got {_type_name(data)}")
        return BUILDERS.get(name, _generic)(name, seconds, micro, data)
    except _Bad as bad:
        raise DecodeError(str(bad), _raw_text(obj if raw is None else raw)) from None


def _control(obj: Mapping[str, Any]) -> Control:
    for kind in ("return", "error"):
        if kind in obj:
            return Control(kind, obj)
    if "QMP" in obj:
        return Control("greeting", obj)
    raise _Bad("not a QMP message: no event, return, error or QMP key")


def decode(raw: bytes | str) -> Message:
    """Decode one QMP message from its JSON text."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise DecodeError(f"not JSON: {err}", _raw_text(raw)) from None
    if type(obj) is not dict:
        raise DecodeError(f"not a JSON object: got {_type_name(obj)}", _raw_text(raw))
    if len(raw) > 2 * MAX_DEPTH and deeper_than(obj, MAX_DEPTH):
        raise DecodeError(f"nested deeper than {MAX_DEPTH} levels", _raw_text(raw))
    return decode_object(obj, raw)
