"""The heads parsed without h11 (the usual request head, a backend's plain 101).

:func:`gatewayd.handshake.parse_request_head` and
:func:`gatewayd.handshake.parse_plain_101` take the usual case themselves and
hand everything else to h11. They must never accept a head h11 refuses, nor
parse one differently: checked here against h11 itself on hand-picked heads
and on generated ones (odd bytes in every place of a line), and the usual
heads must take the fast path (so that the comparison is not vacuous).
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd import handshake
from gatewayd.errors import HandshakeRejected
from gatewayd.handshake import BackendAnswer, parse_plain_101, parse_request_head

ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
PLAIN_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + ACCEPT.encode() + b"\r\n\r\n"
)
PLAIN_REQUEST = (
    b"GET /echo?x=1 HTTP/1.1\r\nHost: bench.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def h11_answer(head: bytes) -> BackendAnswer | str:
    """What h11 makes of ``head`` as the answer to an upgrade request."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
    conn.send(
        h11.Request(
            method="GET", target="/",
            headers=[("Host", "b"), ("Connection", "Upgrade"), ("Upgrade", "websocket")],
        )
    )
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return "refused"
    if not isinstance(event, (h11.InformationalResponse, h11.Response)):
        return type(event).__name__
    return BackendAnswer(
        status=event.status_code,
        reason=event.reason.decode("latin-1"),
        headers=tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers.raw_items()
        ),
    )


def h11_request(head: bytes) -> object:
    """parse_request_head's result with every head going through h11."""
    original = handshake._plain_request
    handshake._plain_request = lambda lines: None   # type: ignore[assignment]
    try:
        return parse_request_head(head)
    except HandshakeRejected as refused:
        return (refused.reason, refused.detail)
    finally:
        handshake._plain_request = original   # type: ignore[assignment]


def fast_request(head: bytes) -> object:
    try:
        return parse_request_head(head)
    except HandshakeRejected as refused:
        return (refused.reason, refused.detail)


def test_the_usual_heads_take_the_fast_path() -> None:
    answer = parse_plain_101(PLAIN_101)
    assert answer == h11_answer(PLAIN_101)
    assert answer is not None and answer.get_all("sec-websocket-accept") == [ACCEPT]
    lines = PLAIN_REQUEST.split(b"\n")
    assert handshake._plain_request(lines) is not None
    assert fast_request(PLAIN_REQUEST) == h11_request(PLAIN_REQUEST)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 101\r\nUpgrade: websocket\r\n\r\n",            # no reason phrase
        b"HTTP/1.1 101 \r\nUpgrade: websocket\r\n\r\n",           # empty reason
        b"HTTP/1.1 101 Sw\titch \x80\xff\r\nUpgrade:websocket  \r\n\n",
        b"HTTP/1.1 101 OK\nUpgrade: websocket\nConnection: Upgrade\n\n",   # bare LF
        b"HTTP/1.1 101 OK\r\nX-Empty:\r\nX-Spaces: \t \r\n\r\n",
        b"HTTP/1.1 101 OK\r\nX-Obs: caf\xe9\r\n\r\n",
    ],
)
def test_plain_101_variants_equal_h11(head: bytes) -> None:
    answer = parse_plain_101(head)
    assert answer is not None
    assert answer == h11_answer(head)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n folded\r\n\r\n",      # obs-fold
        b"HTTP/1.1 101 OK\r\nContent-Length: 0\r\n\r\n",                 # h11 validates it
        b"HTTP/1.1 101 OK\r\nTransfer-Encoding: gzip\r\n\r\n",           # h11 refuses it
        b"HTTP/1.1 101 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nX: a\rb\r\n\r\n",
        b"HTTP/1.1 101 O\x00K\r\n\r\n",
        b"HTTP/1.1  101 OK\r\n\r\n",
        b"\r\nHTTP/1.1 101 OK\r\n\r\n",
    ],
)
def test_unusual_answers_go_to_h11(head: bytes) -> None:
    assert parse_plain_101(head) is None


_BYTES = st.sampled_from(
    [b"a", b"Z", b"0", b"-", b":", b" ", b"\t", b"\r", b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff",
     b"/", b"?", b"#", b"%", b"\"", b"\\", b",", b";", b"=", b"\x0b", b"\x0c"]
)
_TEXT = st.lists(_BYTES, max_size=12).map(b"".join)
_NAMES = st.sampled_from(
    [b"Upgrade", b"Connection", b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"X-A", b"Sec-WebSocket-Accept"]
)
_HEADER = st.one_of(
    st.tuples(_NAMES, st.sampled_from([b":", b": ", b":\t", b" :"]), _TEXT).map(b"".join),
    _TEXT,
)
_EOL = st.sampled_from([b"\r\n", b"\n"])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([b"HTTP/1.1 101", b"HTTP/1.1 101 ", b"HTTP/1.0 101", b"HTTP/1.1 200", b"HTTP/2.0 101"]),
    _TEXT,
    st.lists(st.tuples(_HEADER, _EOL), max_size=5),
    _EOL,
)
def test_generated_answers_never_differ_from_h11(
    status: bytes, reason: bytes, headers: list[tuple[bytes, bytes]], end: bytes
) -> None:
    head = status + reason + b"\r\n" + b"".join(line + eol for line, eol in headers) + end
    match = handshake.ANSWER_HEAD_END_RE.search(head)
    if match is None or match.end() != len(head):
        return   # a blank line inside: not one head
    answer = parse_plain_101(head)
    if answer is not None:
        assert answer == h11_answer(head)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([b"GET /echo HTTP/1.1", b"GET /echo HTTP/1.0", b"GET  /echo HTTP/1.1", b"G:T / HTTP/1.1",
                     b"GET http://bench.test/x HTTP/1.1", b"GET /\x80 HTTP/1.1", b"GET / HTTP/1.2"]),
    st.lists(st.tuples(_HEADER, _EOL), max_size=6),
    _EOL,
)
def test_generated_requests_parse_as_through_h11(
    request_line: bytes, headers: list[tuple[bytes, bytes]], end: bytes
) -> None:
    head = request_line + b"\r\n" + b"".join(line + eol for line, eol in headers) + end
    if handshake.find_head_end(head) != len(head):
        return   # a blank line inside: not one head
    assert fast_request(head) == h11_request(head)
