"""Tiny real VNC and SPICE clients: just enough protocol to make QEMU emit its display events.

- `vnc_session`: RFB 3.8 handshake with security type None, ClientInit, ServerInit, close
  → VNC_CONNECTED, VNC_INITIALIZED, VNC_DISCONNECTED.
- `spice_connect_close`: a bare TCP connect and close → SPICE_CONNECTED, SPICE_DISCONNECTED.
- `spice_link_main_channel`: the SPICE link handshake for the main channel with the
  "spice" auth mechanism and an (empty) RSA-OAEP encrypted ticket → SPICE_INITIALIZED too.

Test-only (uses `cryptography`). Every function is bounded by ``timeout`` and always closes
its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "DisplayProtocolError",
    "SpiceLinkResult",
    "VncServerInit",
    "spice_connect_close",
    "spice_link_main_channel",
    "vnc_session",
]

_RFB_VERSION: Final = b"RFB 003.008\n"
_RFB_SECURITY_NONE: Final = 1

_SPICE_MAGIC: Final = b"REDQ"
_SPICE_VERSION: Final = (2, 2)
_SPICE_CHANNEL_MAIN: Final = 1
_SPICE_COMMON_CAP_AUTH_SELECTION: Final = 0
_SPICE_COMMON_CAP_AUTH_SPICE: Final = 1
_SPICE_AUTH_MECHANISM_SPICE: Final = 1
_SPICE_TICKET_PUBKEY_BYTES: Final = 162
_SPICE_LINK_ERR_OK: Final = 0
# SpiceLinkMess: connection_id u32, channel_type u8, channel_id u8,
# num_common_caps u32, num_channel_caps u32, caps_offset u32.
_SPICE_LINK_MESS: Final = struct.Struct("<IBBIII")
_SPICE_LINK_HEADER: Final = struct.Struct("<4sIII")
# SpiceLinkReply after the public key: num_common_caps, num_channel_caps, caps_offset.
_SPICE_REPLY_CAPS: Final = struct.Struct("<III")


class DisplayProtocolError(Exception):
    """The server answered something this tiny client does not expect."""


@dataclass(frozen=True, slots=True)
class VncServerInit:
    """What QEMU's VNC server announced in ServerInit."""

    width: int
    height: int
    name: str


@dataclass(frozen=True, slots=True)
class SpiceLinkResult:
    """The server's side of a successful SPICE link."""

    common_caps: tuple[int, ...]
    channel_caps: tuple[int, ...]


@contextlib.asynccontextmanager
async def _connection(
    host: str, port: int
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def vnc_session(host: str, port: int, *, timeout: float = 5.0) -> VncServerInit:
    """Connect, complete the RFB 3.8 handshake with no authentication, then close."""
    async with asyncio.timeout(timeout), _connection(host, port) as (reader, writer):
        version = await reader.readexactly(12)
        if not version.startswith(b"RFB "):
            raise DisplayProtocolError(f"not an RFB server: {version!r}")
        writer.write(_RFB_VERSION)
        (count,) = await reader.readexactly(1)
        if count == 0:
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            reason = (await reader.readexactly(length)).decode(errors="replace")
            raise DisplayProtocolError(f"VNC server refused the connection: {reason}")
        types = await reader.readexactly(count)
        if _RFB_SECURITY_NONE not in types:
            raise DisplayProtocolError(f"VNC server does not offer security None: {list(types)}")
        writer.write(bytes([_RFB_SECURITY_NONE]))
        (result,) = struct.unpack(">I", await reader.readexactly(4))
        if result != 0:
            raise DisplayProtocolError(f"VNC security handshake failed: {result}")
        writer.write(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", await reader.readexactly(4))
        await reader.readexactly(16)  # pixel format
        (name_length,) = struct.unpack(">I", await reader.readexactly(4))
        name = (await reader.readexactly(name_length)).decode(errors="replace")
        return VncServerInit(width=width, height=height, name=name)


async def spice_connect_close(host: str, port: int, *, timeout: float = 5.0) -> None:
    """Open a TCP connection to the SPICE port and close it without a word."""
    async with asyncio.timeout(timeout), _connection(host, port):
        pass


async def spice_link_main_channel(
    host: str, port: int, *, password: bytes = b"", timeout: float = 5.0
) -> SpiceLinkResult:
    """Link the SPICE main channel (auth mechanism "spice", ``password`` as ticket), close."""
    caps = 1 << _SPICE_COMMON_CAP_AUTH_SELECTION | 1 << _SPICE_COMMON_CAP_AUTH_SPICE
    link = _SPICE_LINK_MESS.pack(0, _SPICE_CHANNEL_MAIN, 0, 1, 0, _SPICE_LINK_MESS.size)
    link += struct.pack("<I", caps)
    header = _SPICE_LINK_HEADER.pack(_SPICE_MAGIC, *_SPICE_VERSION, len(link))
    async with asyncio.timeout(timeout), _connection(host, port) as (reader, writer):
        writer.write(header + link)
        magic, major, _minor, size = _SPICE_LINK_HEADER.unpack(
            await reader.readexactly(_SPICE_LINK_HEADER.size)
        )
        if magic != _SPICE_MAGIC or major != _SPICE_VERSION[0]:
            raise DisplayProtocolError(f"not a SPICE 2.x server: {magic!r} {major}")
        reply = await reader.readexactly(size)
        (error,) = struct.unpack_from("<I", reply, 0)
        if error != _SPICE_LINK_ERR_OK:
            raise DisplayProtocolError(f"SPICE link refused: error {error}")
        key_der = reply[4 : 4 + _SPICE_TICKET_PUBKEY_BYTES]
        n_common, n_channel, caps_offset = _SPICE_REPLY_CAPS.unpack_from(
            reply, 4 + _SPICE_TICKET_PUBKEY_BYTES
        )
        words = struct.unpack_from(f"<{n_common + n_channel}I", reply, caps_offset)
        public_key = serialization.load_der_public_key(key_der)
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise DisplayProtocolError("SPICE server key is not RSA")
        ticket = public_key.encrypt(
            password + b"\0",
            padding.OAEP(
                mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
            ),
        )
        writer.write(struct.pack("<I", _SPICE_AUTH_MECHANISM_SPICE) + ticket)
        (result,) = struct.unpack("<I", await reader.readexactly(4))
        if result != _SPICE_LINK_ERR_OK:
            raise DisplayProtocolError(f"SPICE authentication failed: error {result}")
        return SpiceLinkResult(
            common_caps=tuple(words[:n_common]), channel_caps=tuple(words[n_common:])
        )
