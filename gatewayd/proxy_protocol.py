"""The PROXY protocol (HAProxy, versions 1 and 2), receiving side. Pure: no I/O, no trio.

A load balancer that forwards TCP (AWS NLB, HAProxy in ``mode tcp``, ...)
hides the client's address from us; with ``proxy_protocol = true`` on a
``[[listener]]`` it sends one header in front of the client's bytes saying
who the client is. The server reads bytes until :func:`parse` returns a
:class:`ProxyHeader`, then passes ``buffer[header.length:]`` on to TLS (or
HTTP): those bytes are the client's.

Theory of operation
-------------------
Follows https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt (the
"spec" below), receiver side, strictly: a listener with the option *requires*
the header (spec section 2: "the receiver MUST ... not try to guess whether
the protocol header is present or not"), so anything else is an error and the
connection is closed, never served with the proxy's address.

* Version 1 (spec 2.1): one ASCII line ``PROXY TCP4|TCP6|UNKNOWN ...\\r\\n`` of
  at most 107 bytes with the CRLF. Addresses and ports are checked (an IPv4
  address with TCP4, decimal ports 0-65535). With ``UNKNOWN`` the rest of the
  line is ignored and the connection's own peer address stays in force.
* Version 2 (spec 2.2): the 12-byte signature, a version/command byte
  (version 2; ``LOCAL`` = the proxy's own connection, such as a health check,
  whose addresses are ignored; ``PROXY``), a family/protocol byte, a 16-bit
  length, then the addresses and TLVs. ``AF_INET``/``AF_INET6`` over
  ``STREAM`` give the client's address; ``AF_UNSPEC`` and ``AF_UNIX`` keep the
  peer's (spec: "the receiver ... must use the real connection endpoints").
  ``DGRAM`` is refused (a WebSocket is a stream). TLVs (spec 2.2.7) are skipped.
  Headers longer than :data:`MAX_V2_LENGTH` are refused to bound memory.

:func:`parse` needs at most :data:`MAX_HEADER_BYTES` bytes to decide, so the
caller's buffer is bounded.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

from gatewayd.errors import ProxyProtocolError

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "parse",
]

#: Version 2 signature (spec 2.2): "\r\n\r\n\0\r\nQUIT\n".
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX: Final = b"PROXY "
#: Longest version 1 line, CRLF included (spec 2.1: 107 bytes).
MAX_V1_LENGTH: Final = 107
#: Longest version 2 address block + TLVs we accept (the field allows 65535;
#: load balancers send a few dozen to a few hundred bytes).
MAX_V2_LENGTH: Final = 4096
_V2_FIXED: Final = 16
#: Most bytes :func:`parse` ever needs to see before it decides.
MAX_HEADER_BYTES: Final = _V2_FIXED + MAX_V2_LENGTH

_V2_LOCAL: Final = 0x20
_V2_PROXY: Final = 0x21
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM = 0x0, 0x1, 0x2
# Address block sizes (spec 2.2): IPv4 4+4+2+2, IPv6 16+16+2+2, UNIX 108+108.
_ADDRESS_SIZES: Final = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY header.

    Attributes:
        version: 1 or 2.
        command: "PROXY" (a relayed client) or "LOCAL" (the proxy's own
            connection; v1 "UNKNOWN" is reported as "LOCAL" too).
        source: the client's (address, port), or None when the header does
            not carry one (LOCAL, UNKNOWN, AF_UNSPEC, AF_UNIX): the
            connection's own peer address is then the client's.
        destination: the address the client connected to, when given.
        length: bytes the header took; what follows is the client's stream.
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int


def parse(buffer: bytes | bytearray) -> ProxyHeader | None:
    """Parse a PROXY header at the start of ``buffer``.

    Returns:
        The header, or None when more bytes are needed to decide (never once
        ``len(buffer) >= MAX_HEADER_BYTES``).

    Raises:
        ProxyProtocolError: the bytes are not a valid PROXY v1 or v2 header
            (including "no header at all").
    """
    data = bytes(buffer[:MAX_HEADER_BYTES])
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(_V1_PREFIX):
        return _parse_v1(data)
    if V2_SIGNATURE.startswith(data) or _V1_PREFIX.startswith(data):
        return None  # a prefix of one of the two: wait for more
    raise ProxyProtocolError("no PROXY protocol header", data[:16])


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(data) >= MAX_V1_LENGTH or b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError(
                f"PROXY v1 line not ended by CRLF within {MAX_V1_LENGTH} bytes", data[:MAX_V1_LENGTH]
            )
        return None
    line = data[:end]
    length = end + 2
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII", line) from None
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        # Spec 2.1: "the receiver must ignore anything presented before the
        # CRLF is found" after UNKNOWN, and use the real connection endpoints.
        return ProxyHeader(1, "LOCAL", None, None, length)
    if len(fields) != 6:
        raise ProxyProtocolError("PROXY v1 line does not have 6 fields", line)
    _, family, source, destination, source_port, destination_port = fields
    if family not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1 protocol {family!r} is not TCP4, TCP6 or UNKNOWN", line)
    version = 4 if family == "TCP4" else 6
    return ProxyHeader(
        1,
        "PROXY",
        (_v1_address(source, version, line), _v1_port(source_port, line)),
        (_v1_address(destination, version, line), _v1_port(destination_port, line)),
        length,
    )


def _v1_address(text: str, version: int, line: bytes) -> str:
    # Plain address literals only (spec 2.1): ipaddress would also take an
    # IPv6 zone ID ("::1%anything"), and the address goes into headers.
    if not text or any(c not in "0123456789abcdefABCDEF:." for c in text):
        raise ProxyProtocolError(f"PROXY v1 address {text!r} is not an IP address", line)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1 address {text!r} is not an IP address", line) from None
    if address.version != version:
        raise ProxyProtocolError(f"PROXY v1 address {text!r} is not IPv{version}", line)
    return str(address)


def _v1_port(text: str, line: bytes) -> int:
    # Spec 2.1: decimal, 0-65535, without leading zeros.
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"PROXY v1 port {text!r} is not a decimal port", line)
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"PROXY v1 port {port} is out of range", line)
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_FIXED:
        return None
    version_command, family_protocol, size = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 version {version_command >> 4} is not 2", data[:16])
    if version_command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"PROXY v2 command {version_command & 0xF} is unknown", data[:16])
    if size > MAX_V2_LENGTH:
        raise ProxyProtocolError(
            f"PROXY v2 header of {size} bytes is over {MAX_V2_LENGTH}", data[:16]
        )
    length = _V2_FIXED + size
    if len(data) < length:
        return None
    if version_command == _V2_LOCAL:
        # Spec 2.2: LOCAL: the receiver must ignore the address information.
        return ProxyHeader(2, "LOCAL", None, None, length)
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family > _AF_UNIX or protocol > _PROTO_DGRAM:
        raise ProxyProtocolError(f"PROXY v2 family/protocol 0x{family_protocol:02x} is unknown", data[:16])
    if protocol == _PROTO_DGRAM:
        raise ProxyProtocolError("PROXY v2 announces a datagram (UDP) connection", data[:16])
    needed = _ADDRESS_SIZES.get(family, 0)
    if size < needed:
        raise ProxyProtocolError(
            f"PROXY v2 address block of {size} bytes is shorter than {needed}", data[:16]
        )
    if family == _AF_INET and protocol == _PROTO_STREAM:
        source = str(ipaddress.IPv4Address(data[16:20]))
        destination = str(ipaddress.IPv4Address(data[20:24]))
        source_port, destination_port = struct.unpack_from("!HH", data, 24)
    elif family == _AF_INET6 and protocol == _PROTO_STREAM:
        source = str(ipaddress.IPv6Address(data[16:32]))
        destination = str(ipaddress.IPv6Address(data[32:48]))
        source_port, destination_port = struct.unpack_from("!HH", data, 48)
    else:
        # AF_UNSPEC, AF_UNIX, or PROTO_UNSPEC: no address we can use; the
        # spec says to use the real connection endpoints. TLVs are skipped.
        return ProxyHeader(2, "PROXY", None, None, length)
    # The rest of the block (after the addresses) is TLVs, skipped (spec 2.2.7).
    return ProxyHeader(2, "PROXY", (source, source_port), (destination, destination_port), length)
