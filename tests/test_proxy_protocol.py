"""gatewayd.proxy_protocol: PROXY v1/v2 parsing, one case per rule of the HAProxy spec."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.errors import ProxyProtocolError
from gatewayd.proxy_protocol import (
    MAX_HEADER_BYTES,
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    parse,
)


def v2(
    command: int = 0x21,
    family: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    *,
    length: int | None = None,
) -> bytes:
    body = addresses + tlvs
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


GOOD = [
    ("v1-tcp4", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
     ProxyHeader(1, "PROXY", ("192.0.2.1", 56324), ("198.51.100.2", 443), 45)),
    ("v1-tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
     ProxyHeader(1, "PROXY", ("2001:db8::1", 1), ("2001:db8::2", 65535), 44)),
    ("v1-tcp6-normalized", b"PROXY TCP6 2001:DB8:0::1 ::1 0 443\r\n",
     ProxyHeader(1, "PROXY", ("2001:db8::1", 0), ("::1", 443), 36)),
    ("v1-unknown", b"PROXY UNKNOWN\r\n", ProxyHeader(1, "LOCAL", None, None, 15)),
    ("v1-unknown-with-junk", b"PROXY UNKNOWN ffff::1 whatever\r\n",
     ProxyHeader(1, "LOCAL", None, None, 32)),
    ("v2-inet", v2(addresses=inet("203.0.113.9", "10.0.0.1", 40000, 443)),
     ProxyHeader(2, "PROXY", ("203.0.113.9", 40000), ("10.0.0.1", 443), 28)),
    ("v2-inet6", v2(family=0x21, addresses=inet("2001:db8::7", "2001:db8::1", 5, 443)),
     ProxyHeader(2, "PROXY", ("2001:db8::7", 5), ("2001:db8::1", 443), 52)),
    ("v2-inet-with-tlvs",
     v2(addresses=inet("203.0.113.9", "10.0.0.1", 1, 2), tlvs=b"\x04\x00\x04abcd\x20\x00\x00"),
     ProxyHeader(2, "PROXY", ("203.0.113.9", 1), ("10.0.0.1", 2), 38)),
    ("v2-local", v2(command=0x20, family=0x00), ProxyHeader(2, "LOCAL", None, None, 16)),
    ("v2-local-ignores-addresses", v2(command=0x20, addresses=inet("1.2.3.4", "5.6.7.8", 1, 2)),
     ProxyHeader(2, "LOCAL", None, None, 28)),
    ("v2-unspec", v2(family=0x00), ProxyHeader(2, "PROXY", None, None, 16)),
    ("v2-unix", v2(family=0x31, addresses=b"\x00" * 216), ProxyHeader(2, "PROXY", None, None, 232)),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_good_headers(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected
    # What follows the header is the client's, untouched.
    header = parse(data + b"\x16\x03\x01rest")
    assert header is not None and header.length == expected.length


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_every_prefix_asks_for_more(data: bytes, expected: ProxyHeader) -> None:
    for end in range(len(data)):
        assert parse(data[:end]) is None, end


BAD = [
    ("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "no PROXY protocol header"),
    ("plain-http", b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
    ("lowercase", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY protocol header"),
    ("v1-bare-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "not ended by CRLF"),
    ("v1-too-long", b"PROXY UNKNOWN " + b"x" * 100, "not ended by CRLF within 107 bytes"),
    ("v1-five-fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "does not have 6 fields"),
    ("v1-double-space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "does not have 6 fields"),
    ("v1-udp", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "'UDP4' is not TCP4, TCP6 or UNKNOWN"),
    ("v1-v6-in-tcp4", b"PROXY TCP4 ::1 ::1 1 2\r\n", "'::1' is not IPv4"),
    ("v1-v4-in-tcp6", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "'1.2.3.4' is not IPv6"),
    ("v1-hostname", b"PROXY TCP4 lb.local 5.6.7.8 1 2\r\n", "'lb.local' is not an IP address"),
    ("v1-port-too-big", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "65536 is out of range"),
    ("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "'080' is not a decimal port"),
    ("v1-port-sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", "'+80' is not a decimal port"),
    ("v1-non-ascii", "PROXY TCP4 1.2.3.4 5.6.7.8 ١ 2\r\n".encode(), "not ASCII"),
    ("v1-cr-injection", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", "is not a decimal port"),
    ("v2-version-1", V2_SIGNATURE + b"\x11\x11\x00\x00", "version 1 is not 2"),
    ("v2-command-2", V2_SIGNATURE + b"\x22\x11\x00\x00", "command 2 is unknown"),
    ("v2-family-4", v2(family=0x41), "family/protocol 0x41 is unknown"),
    ("v2-udp", v2(family=0x12, addresses=inet("1.2.3.4", "5.6.7.8", 1, 2)), "datagram"),
    ("v2-short-inet", v2(addresses=b"\x01\x02\x03\x04"), "shorter than 12"),
    ("v2-short-inet6", v2(family=0x21, addresses=inet("1.2.3.4", "5.6.7.8", 1, 2)),
     "shorter than 36"),
    ("v2-too-long", v2(length=MAX_V2_LENGTH + 1), f"over {MAX_V2_LENGTH}"),
]


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_headers(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse(data)
    assert message in str(info.value)


def test_v1_limit_is_107_bytes() -> None:
    # The longest valid line (spec 2.1) parses; one byte more does not.
    longest = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    assert len(longest) == 104 <= MAX_V1_LENGTH
    assert parse(longest) is not None
    with pytest.raises(ProxyProtocolError):
        parse(b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 15) + b"\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_HEADER_BYTES + 64))
def test_any_bytes_give_a_header_a_wait_or_a_protocol_error(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyProtocolError:
        return
    if header is None:
        assert len(data) < MAX_HEADER_BYTES
    else:
        assert 0 < header.length <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=40))
def test_v2_with_mutated_bytes_never_crashes(tail: bytes, cut: int) -> None:
    data = v2(addresses=inet("203.0.113.9", "10.0.0.1", 1, 2))[:cut] + tail
    try:
        parse(data)
    except ProxyProtocolError:
        pass


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP6 ::1%eth0 ::1 1234 443\r\n",
        b"PROXY TCP6 ::1%x,6.6.6.6 ::1 1234 443\r\n",
        b'PROXY TCP6 ::1%" ::1 1234 443\r\n',
        b"PROXY TCP4 1.2.3.4 5.6.7.8%1 1234 443\r\n",
    ],
    ids=["zone", "zone-with-comma", "zone-with-quote", "v4-with-percent"],
)
def test_v1_refuses_anything_but_plain_address_literals(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(line)
