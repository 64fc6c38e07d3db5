"""The bridge engine (gatewayd.wsbridge) on its own: bytes in, bytes and flags out, no I/O.

SPEC section 4 "Bridge". Each table names one rule; the wire bytes are
exact. The frame parser is the engine's own, so every violation class is run
through wsproto as well (:class:`WsprotoBridge`, a reference model on
wsproto: the logic of the former wsproto-based ``bridge.Bridge``, without
its I/O) and the verdicts must agree, case by case and on generated streams.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from gatewayd import bridge, splice, wsbridge
from gatewayd.record import End
from gatewayd.wsbridge import CLOSE_TIMEOUT, FAIL_LINGER, BridgeEngine

MASK = b"\x37\xfa\x21\x3d"


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    form: int | None = None,
) -> bytes:
    """One client frame. ``length`` overrides the length field; ``form`` forces 7/16/64-bit."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    if form is None:
        form = 7 if size < 126 else 16 if size < 65536 else 64
    if form == 7:
        head = bytes((first, size))
    elif form == 16:
        head = bytes((first, 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, 127)) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    head = bytes((head[0], head[1] | 0x80)) + head[2:]
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def from_server(data: bytes | bytearray) -> list[Event]:
    """What a client makes of the engine's bytes (wsproto as the client)."""
    ws = Connection(ConnectionType.CLIENT)
    ws.receive_data(bytes(data))
    return list(ws.events())


def fed(engine: BridgeEngine, *reads: bytes) -> BridgeEngine:
    for data in reads:
        engine.client_data(data)
    return engine


# ------------------------------------------------------------------ the reference model, on wsproto


@dataclass
class WsprotoBridge:
    """The client side of the former wsproto-based bridge (its ``_from_client``), without I/O.

    The oracle for the engine's parser: wsproto does every bit of RFC 6455
    parsing here; same inputs, and the engine must say the same.
    """

    max_message_size: int
    ws: Connection = field(default_factory=lambda: Connection(ConnectionType.SERVER))
    forwarded: bytearray = field(default_factory=bytearray)
    sent: list[Event] = field(default_factory=list)
    closing: int | None = None
    end: End | None = None
    failed: bool = False
    parser_ok: bool = True
    done: bool = False
    size: int = 0

    def feed(self, data: bytes) -> None:
        if self.done or not self.parser_ok:
            return
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, (BytesMessage, TextMessage)):
                self._message(event)
            elif isinstance(event, Ping):
                if self.ws.state is ConnectionState.OPEN:
                    self._send(event.response())
            elif isinstance(event, CloseConnection):
                self._close(event)
                return

    def _send(self, event: Event) -> None:
        self.ws.send(event)
        self.sent.append(event)

    def _decide(self, code: int, end: End) -> bool:
        if self.closing is not None:
            return False
        self.closing, self.end = code, end
        return True

    def _fail(self, code: int) -> None:
        self.failed = True
        if self._decide(code, End.CLIENT_ERROR) and self.ws.state is ConnectionState.OPEN:
            self._send(CloseConnection(code=code, reason=wsbridge.REASONS[code]))

    def _message(self, event: BytesMessage | TextMessage) -> None:
        if self.failed:
            return
        payload = event.data.encode() if isinstance(event, TextMessage) else event.data
        self.size += len(payload)
        if self.size > self.max_message_size:
            self._fail(wsbridge.TOO_BIG)
            return
        if event.message_finished:
            self.size = 0
        self.forwarded += payload

    def _close(self, event: CloseConnection) -> None:
        if self.ws.state is ConnectionState.REMOTE_CLOSING:
            self._decide(int(event.code), End.CLIENT_CLOSE)
            self._send(event.response())
            self.done = True
        elif self.ws.state is ConnectionState.CLOSED:
            self.done = True
        else:
            self.parser_ok = False
            self._fail(int(event.code) if event.code in wsbridge.REASONS else wsbridge.PROTOCOL_ERROR)


def both(reads: Iterable[bytes], max_message_size: int = 1000) -> tuple[WsprotoBridge, BridgeEngine]:
    """The same reads through wsproto and through the engine (its to_backend collected)."""
    oracle = WsprotoBridge(max_message_size)
    engine = BridgeEngine(max_message_size)
    passed = bytearray()
    for data in reads:
        oracle.feed(data)
        engine.client_data(data)
        passed += engine.to_backend
        engine.to_backend.clear()
    engine.to_backend[:0] = passed
    return oracle, engine


def assert_same(oracle: WsprotoBridge, engine: BridgeEngine) -> None:
    """The same bytes passed on, the same frames to the client, the same decision."""
    assert bytes(engine.to_backend) == bytes(oracle.forwarded)
    expected = [
        Pong(payload=e.payload) if isinstance(e, Pong) else CloseConnection(code=e.code, reason=e.reason)
        for e in oracle.sent
    ]
    assert from_server(engine.to_client) == expected
    assert engine.end == oracle.end
    assert engine.done == oracle.done
    assert (not engine._parsing and not engine.done) == (not oracle.parser_ok)


# ------------------------------------------------------------------ RFC 6455 violations


# name: (what the client sends, the close code, a word of the logged detail).
VIOLATIONS: dict[str, tuple[bytes, int, str]] = {
    # Section 5.1: a client frame must be masked.
    "unmasked binary frame": (frame(0x2, b"hello", masked=False), 1002, "unmasked"),
    "unmasked ping": (frame(0x9, b"", masked=False), 1002, "unmasked"),
    # Section 5.2: reserved bits (no extension is ever negotiated).
    "rsv1 set": (frame(0x2, b"x", rsv=4), 1002, "reserved bit"),
    "rsv2 set": (frame(0x2, b"x", rsv=2), 1002, "reserved bit"),
    "rsv3 set": (frame(0x1, b"x", rsv=1), 1002, "reserved bit"),
    # Section 5.2: unknown opcodes.
    **{f"opcode {op:#x}": (frame(op, b"x"), 1002, "opcode") for op in (0x3, 0x7, 0xB, 0xF)},
    # Section 5.5: control frames are never fragmented, at most 125 bytes.
    "fragmented ping": (frame(0x9, b"p", fin=False), 1002, "fragment control"),
    "fragmented close": (frame(0x8, close_payload(1000), fin=False), 1002, "fragment control"),
    "ping of 126 bytes": (frame(0x9, b"p" * 126), 1002, "125"),
    "pong of 126 bytes": (frame(0xA, b"p" * 126), 1002, "125"),
    # Section 5.2: "the minimal number of bytes MUST be used to encode the length".
    "16-bit length for 125 bytes": (frame(0x2, b"m" * 125, form=16), 1002, "2 bytes"),
    "64-bit length for 65535 bytes": (frame(0x2, b"", length=65535, form=64), 1002, "8 bytes"),
    "64-bit length with its top bit set": (frame(0x2, b"", length=1 << 63, form=64), 1002, "MSB"),
    # Section 5.4: continuation frames.
    "continuation without a message": (frame(0x0, b"x"), 1002, "CONTINUATION"),
    "text inside a fragmented text": (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002, "CONTINUATION"),
    "binary inside a fragmented binary": (frame(0x2, b"a", fin=False) + frame(0x2, b"b"), 1002, "CONTINUATION"),
    "binary inside a fragmented text": (frame(0x1, b"a", fin=False) + frame(0x2, b"b"), 1002, "CONTINUATION"),
    # Section 8.1: text is UTF-8.
    "invalid utf-8": (frame(0x1, b"\xc3\x28"), 1007, "utf-8"),
    "overlong utf-8": (frame(0x1, b"\xc0\xaf"), 1007, "utf-8"),
    "utf-8 surrogate": (frame(0x1, b"\xed\xa0\x80"), 1007, "utf-8"),
    "code point beyond U+10FFFF": (frame(0x1, b"\xf4\x90\x80\x80"), 1007, "utf-8"),
    "text message ending inside a code point": (frame(0x1, "é".encode()[:1]), 1007, "utf-8"),
    "invalid utf-8 in a continuation": (frame(0x1, b"ok", fin=False) + frame(0x0, b"\xff"), 1007, "utf-8"),
    "code point cut by fragments, then broken": (
        frame(0x1, b"\xe2\x82", fin=False) + frame(0x0, b"\x28"), 1007, "utf-8",
    ),
    # Section 5.5.1 / 7.4: close frames.
    "close with a 1-byte payload": (frame(0x8, b"\x03"), 1002, "1 byte"),
    "close code 999": (frame(0x8, close_payload(999)), 1002, "invalid code"),
    "close code 5000": (frame(0x8, close_payload(5000)), 1002, "invalid code"),
    "close code 1004 (reserved)": (frame(0x8, close_payload(1004)), 1002, "reserved"),
    "close code 1014 (unassigned)": (frame(0x8, close_payload(1014)), 1002, "reserved"),
    "close code 2999 (unassigned)": (frame(0x8, close_payload(2999)), 1002, "reserved"),
    "close code 1005 (local only)": (frame(0x8, close_payload(1005)), 1002, "local-only"),
    "close code 1006 (local only)": (frame(0x8, close_payload(1006)), 1002, "local-only"),
    "close code 1015 (local only)": (frame(0x8, close_payload(1015)), 1002, "local-only"),
    "close reason not utf-8": (frame(0x8, close_payload(1000, b"\xff")), 1007, "CLOSE reason"),
}


def test_the_violation_set_has_every_class() -> None:
    # The reliability round's 31 violations, by class, plus the length and close-code edges.
    assert len(VIOLATIONS) >= 31


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_a_violation_fails_with_its_code_and_fixed_reason(name: str) -> None:
    wire, code, detail = VIOLATIONS[name]
    engine = fed(BridgeEngine(1000), wire)
    assert from_server(engine.to_client) == [CloseConnection(code=code, reason=wsbridge.REASONS[code])]
    assert engine.end is End.CLIENT_ERROR
    assert engine.error.startswith(f"client: {code} ") and detail.lower() in engine.error.lower()
    # The TCP side is closed, our write side shut after the close frame, the
    # client drained for FAIL_LINGER: nothing it sends is parsed any more.
    assert engine.close_backend and not engine.shut_backend and engine.shut_client
    assert engine.closing_deadline_wanted == FAIL_LINGER
    # What came before the violation (a first fragment) is written, then the client is drained.
    assert engine.to_backend in (b"", b"a", b"ok")
    engine.to_backend.clear()
    assert not engine.done and engine.wants_client_data and not engine.wants_backend_data
    engine.to_client.clear()
    engine.client_data(frame(0x9, b"ignored") + frame(0x8, close_payload(1000)))
    assert engine.to_client == b"" and not engine.done
    engine.client_eof()
    assert engine.done and engine.end is End.CLIENT_ERROR and not engine.shut_backend


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_a_violation_is_judged_as_wsproto_judges_it_whatever_the_reads(name: str) -> None:
    wire, _, _ = VIOLATIONS[name]
    wire = frame(0x2, b"before") + wire   # a good frame first: passed on by both
    for reads in ([wire], [wire[i : i + 1] for i in range(len(wire))], [wire[:3], wire[3:9], wire[9:]]):
        oracle, engine = both(reads)
        assert oracle.closing == engine._closing and oracle.closing in (1002, 1007)
        assert_same(oracle, engine)


def test_a_violation_is_judged_at_the_byte_that_decides_it() -> None:
    # Two bytes say "opcode 0x3": no need to wait for the mask or the payload.
    engine = fed(BridgeEngine(1000), b"\x83\x85")
    assert from_server(engine.to_client) == [CloseConnection(code=1002, reason="protocol error")]
    # A header waiting for its mask key is not judged yet, nor is a frame
    # whose message-level fault (here: a continuation out of order) needs
    # its first payload byte, exactly as in wsproto.
    for partial in (frame(0x2, b"x")[:3], frame(0x0, b"x")[:6]):
        oracle, engine = both([partial])
        assert engine._closing is None and oracle.closing is None and engine.to_client == b""


def test_a_violation_passes_on_what_came_before_it_in_the_same_read() -> None:
    engine = fed(BridgeEngine(1000), frame(0x2, b"fine") + frame(0x2, b"bad", masked=False))
    # The bytes before the violation go out (as the wsproto-based bridge wrote them),
    # then the TCP connection is closed: close_backend is "after to_backend".
    assert engine.to_backend == b"fine" and engine.close_backend


# ------------------------------------------------------------------ generated streams vs wsproto


_opcodes = st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB])
_payloads = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(str.encode),
    st.sampled_from([b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f\x98", b"\x80", b"\xff"]),
    st.integers(min_value=0, max_value=5200).map(lambda code: struct.pack("!H", code) + b"bye"),
    st.just(b"x" * 300),
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], int]:
    frames = []
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        payload = draw(_payloads)
        frames.append(
            frame(
                draw(_opcodes),
                payload,
                fin=draw(st.booleans()),
                rsv=draw(st.sampled_from([0, 0, 0, 0, 1, 4])),
                masked=draw(st.sampled_from([True] * 9 + [False])),
                form=draw(st.sampled_from([None] * 8 + [16, 64])),
            )
        )
    wire = b"".join(frames)
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(wire)), max_size=6)))
    reads = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) if b > a]
    return reads, draw(st.sampled_from([10, 100, 1000]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_generated_streams_get_the_verdicts_wsproto_gives(case: tuple[list[bytes], int]) -> None:
    reads, max_message_size = case
    oracle, engine = both(reads, max_message_size)
    assert engine._closing == oracle.closing
    assert_same(oracle, engine)


# ------------------------------------------------------------------ messages -> TCP


MESSAGES: dict[str, tuple[list[bytes], bytes]] = {
    "binary": ([frame(0x2, b"\x00\x01\x02")], b"\x00\x01\x02"),
    "text": ([frame(0x1, "héllo".encode())], "héllo".encode()),
    "empty message": ([frame(0x2, b"")], b""),
    "fragmented binary": ([frame(0x2, b"ab", fin=False) + frame(0x0, b"c", fin=False) + frame(0x0, b"d|")], b"abcd|"),
    "fragmented text": ([frame(0x1, b"frag", fin=False) + frame(0x0, "ment€d".encode())], "fragment€d".encode()),
    "ping between fragments": (
        [frame(0x1, b"a", fin=False) + frame(0x9, b"p") + frame(0x0, b"b")], b"ab",
    ),
    "a frame cut across reads": ([frame(0x2, b"0123456789")[:4], frame(0x2, b"0123456789")[4:]], b"0123456789"),
    "a code point cut across reads": (
        [frame(0x1, "€uro".encode())[:7], frame(0x1, "€uro".encode())[7:]], "€uro".encode(),
    ),
    "a 16-bit length": ([frame(0x2, b"m" * 300)], b"m" * 300),
    "a 64-bit length": ([frame(0x2, b"L" * 70000)], b"L" * 70000),
}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_messages_become_bytes_in_order(name: str) -> None:
    reads, expected = MESSAGES[name]
    oracle, engine = both(reads, max_message_size=100_000)
    assert engine.to_backend == expected
    assert_same(oracle, engine)
    assert engine._closing is None and not engine.done


def test_a_large_message_is_streamed_read_by_read_never_held_whole() -> None:
    wire = frame(0x2, os.urandom(65536 * 3))
    engine = BridgeEngine(1 << 20)
    out = bytearray()
    for offset in range(0, len(wire), splice.CHUNK):
        engine.client_data(wire[offset : offset + splice.CHUNK])
        assert len(engine.to_backend) <= splice.CHUNK   # each read's payload, at once
        out += engine.to_backend
        engine.to_backend.clear()
    assert out == bytes(b ^ MASK[i % 4] for i, b in enumerate(wire[14:]))


def test_a_cut_code_point_is_held_until_the_next_read_completes_it() -> None:
    euro = "€".encode()
    engine = fed(BridgeEngine(1000), frame(0x1, b"a" + euro)[:-2])
    assert engine.to_backend == b"a"   # the cut code point is not passed on
    engine.client_data(frame(0x1, b"a" + euro)[-2:])
    assert engine.to_backend == b"a" + euro


# ------------------------------------------------------------------ max_message_size: 1009


OVERSIZE: dict[str, tuple[list[bytes], bytes]] = {
    "one frame in one read passes nothing on": ([frame(0x2, b"y" * 1001)], b""),
    "exactly the limit is fine, one more is not": ([frame(0x2, b"x" * 1000) + frame(0x2, b"y" * 1001)], b"x" * 1000),
    "fragments adding up past the limit": (
        [frame(0x2, b"z" * 600, fin=False), frame(0x0, b"z" * 600)], b"z" * 600,
    ),
    "text counts its bytes, not its characters": ([frame(0x1, "é".encode() * 501)], b""),
    "a frame streamed across reads": (
        [frame(0x2, b"s" * 1500)[:800], frame(0x2, b"s" * 1500)[800:]], b"s" * 792,
    ),
}


@pytest.mark.parametrize("name", list(OVERSIZE))
def test_a_message_over_max_message_size_closes_with_1009(name: str) -> None:
    reads, passed = OVERSIZE[name]
    oracle, engine = both(reads)
    assert engine.to_backend == passed
    assert_same(oracle, engine)
    assert from_server(engine.to_client) == [CloseConnection(code=1009, reason="message too big")]
    assert engine.end is End.CLIENT_ERROR and engine.close_backend
    assert engine.error == "client: message over max_message_size (1000 bytes)"
    # Not a parse failure: the client's close frame is still awaited, for CLOSE_TIMEOUT.
    assert engine.closing_deadline_wanted == CLOSE_TIMEOUT and not engine.shut_client
    engine.to_client.clear()
    engine.client_data(frame(0x2, b"dropped") + frame(0x8, close_payload(1009)))
    assert engine.done and engine.to_client == b"" and not engine.shut_backend
    assert engine.to_backend == passed and engine.end is End.CLIENT_ERROR


# ------------------------------------------------------------------ ping, pong


def test_ping_is_answered_with_its_payload() -> None:
    engine = fed(BridgeEngine(1000), frame(0x9, b"are you there"))
    assert from_server(engine.to_client) == [Pong(payload=b"are you there")]
    assert engine.to_backend == b"" and engine._closing is None


def test_a_pong_is_ignored_and_no_ping_is_answered_after_our_close() -> None:
    engine = fed(BridgeEngine(1000), frame(0xA, b"unsolicited"))
    assert engine.to_client == b""
    engine.go_away(End.SHUTDOWN)
    engine.to_client.clear()
    engine.client_data(frame(0x9, b"late"))
    assert engine.to_client == b""


# ------------------------------------------------------------------ closing


def test_client_close_is_echoed_and_shuts_the_tcp_write_side() -> None:
    engine = fed(BridgeEngine(1000), frame(0x2, b"last words") + frame(0x8, close_payload(1000, b"done")))
    assert from_server(engine.to_client) == [CloseConnection(code=1000, reason="done")]
    assert engine.to_backend == b"last words"
    assert engine.done and engine.shut_backend and not engine.close_backend
    assert engine.end is End.CLIENT_CLOSE and engine.error == ""
    assert not engine.wants_client_data and not engine.wants_backend_data


def test_client_close_without_a_status_is_answered_without_one() -> None:
    engine = fed(BridgeEngine(1000), frame(0x8))
    assert bytes(engine.to_client) == b"\x88\x00"
    assert engine.done and engine.end is End.CLIENT_CLOSE


def test_nothing_after_the_client_close_frame_is_parsed() -> None:
    engine = fed(BridgeEngine(1000), frame(0x8, close_payload(4000)) + frame(0x2, b"after") + b"\x83\x80junk")
    assert from_server(engine.to_client) == [CloseConnection(code=4000, reason="")]
    assert engine.to_backend == b"" and engine.end is End.CLIENT_CLOSE


def test_tcp_eof_closes_with_1000_and_client_data_still_flows_until_its_close() -> None:
    engine = BridgeEngine(1000)
    engine.backend_data(b"bye")
    engine.backend_eof()
    assert from_server(engine.to_client) == [BytesMessage(data=b"bye"), CloseConnection(code=1000, reason="")]
    assert engine.end is End.BACKEND_CLOSE and engine.closing_deadline_wanted == CLOSE_TIMEOUT
    assert not engine.wants_backend_data and not engine.done
    engine.to_client.clear()
    engine.client_data(frame(0x2, b"more"))
    assert engine.to_backend == b"more"
    engine.to_backend.clear()
    engine.client_data(frame(0x8, close_payload(1000)))
    assert engine.done and engine.shut_backend and engine.to_client == b""   # the handshake is complete
    assert engine.end is End.BACKEND_CLOSE


@pytest.mark.parametrize(
    ("half_close_timeout", "wanted"), [(0.0, CLOSE_TIMEOUT), (0.3, 0.3), (30.0, CLOSE_TIMEOUT)]
)
def test_a_client_that_ignores_the_close_after_tcp_eof_ends_as_half_close_timeout(
    half_close_timeout: float, wanted: float
) -> None:
    engine = BridgeEngine(1000, half_close_timeout=half_close_timeout)
    engine.backend_eof()
    assert engine.closing_deadline_wanted == wanted
    engine.close_timed_out()
    assert engine.done and engine.close_backend and engine.to_client == b""
    assert engine.end is End.HALF_CLOSE_TIMEOUT
    assert engine.error == "client: no close frame after the backend's EOF"


GO_AWAY = {
    "shutdown": (End.SHUTDOWN, "going away"),
    "max_connection_age": (End.MAX_AGE, "going away"),
    "idle_timeout": (End.IDLE_TIMEOUT, "idle timeout"),
}


@pytest.mark.parametrize("name", list(GO_AWAY))
def test_going_away_sends_1001_once_and_awaits_the_answer(name: str) -> None:
    end, reason = GO_AWAY[name]
    engine = BridgeEngine(1000)
    engine.backend_data(b"pending")
    engine.go_away(end)
    engine.go_away(End.SHUTDOWN)   # a second reason changes nothing
    engine.backend_eof()           # nor does the TCP side's end
    assert from_server(engine.to_client) == [BytesMessage(data=b"pending"), CloseConnection(code=1001, reason=reason)]
    assert engine.end is end and engine.closing_deadline_wanted == CLOSE_TIMEOUT
    engine.to_client.clear()
    engine.backend_data(b"no data frame follows a close frame")
    assert engine.to_client == b"" and not engine.wants_backend_data
    engine.client_data(frame(0x2, b"still passed on") + frame(0x8, close_payload(1001)))
    assert engine.to_backend == b"still passed on"
    assert engine.done and engine.shut_backend and engine.end is end


def test_a_client_that_never_answers_the_close_is_cut_at_the_timeout() -> None:
    engine = BridgeEngine(1000)
    engine.go_away(End.SHUTDOWN)
    engine.close_timed_out()
    assert engine.done and engine.end is End.SHUTDOWN and engine.close_backend
    assert engine.to_client == b"" and engine.bytes_down == 0   # never written: not counted


def test_a_backend_error_closes_with_1011_and_the_tcp_side_at_once() -> None:
    engine = fed(BridgeEngine(1000), frame(0x2, b"unsent"))
    engine.backend_error("ConnectionResetError: [Errno 104] Connection reset by peer")
    assert from_server(engine.to_client) == [CloseConnection(code=1011, reason="backend error")]
    assert engine.end is End.BACKEND_ERROR and engine.error.startswith("backend: ConnectionResetError")
    assert engine.close_backend and engine.to_backend == b""
    engine.to_client.clear()
    # The client's answer completes the handshake; its data goes nowhere.
    engine.client_data(frame(0x2, b"x") + frame(0x8, close_payload(1011)))
    assert engine.done and engine.to_backend == b"" and not engine.shut_backend


def test_client_eof_without_a_close_frame_shuts_the_tcp_write_side() -> None:
    engine = fed(BridgeEngine(1000), frame(0x2, b"last"))
    engine.client_eof()
    assert engine.done and engine.shut_backend and engine.to_backend == b"last"
    assert engine.end is End.CLIENT_CLOSE and engine.error == "client: EOF without a close frame"


def test_a_client_error_ends_at_once() -> None:
    engine = BridgeEngine(1000)
    engine.backend_data(b"unsent")
    engine.client_error("BrokenPipeError: [Errno 32] Broken pipe")
    assert engine.done and engine.to_client == b"" and engine.close_backend
    assert engine.end is End.CLIENT_ERROR and engine.error == "client: BrokenPipeError: [Errno 32] Broken pipe"
    assert engine.bytes_down == 0


def test_the_first_decision_stands() -> None:
    # A violation after going away: 1001 was the one close frame and names the end.
    engine = BridgeEngine(1000)
    engine.go_away(End.MAX_AGE)
    engine.client_data(frame(0x2, b"bad", masked=False))
    assert from_server(engine.to_client) == [CloseConnection(code=1001, reason="going away")]
    assert engine.end is End.MAX_AGE and engine.close_backend and engine.shut_client
    assert engine.closing_deadline_wanted == FAIL_LINGER   # the linger is shorter
    # A backend error after the client's violation: still the client's fault.
    engine = fed(BridgeEngine(1000), frame(0x2, b"bad", masked=False))
    engine.backend_error("this socket was already closed")
    assert engine.end is End.CLIENT_ERROR and engine.error.startswith("client: 1002")


def test_a_violation_behind_a_data_frame_always_gets_its_close_frame_whatever_tcp_does() -> None:
    # Issue 13 finding 2, deterministically: TCP data arriving before, with
    # and after the failing read, in every order.
    bad = frame(0x2, b"fine") + frame(0x2, b"hello", masked=False)
    for before, after in ((0, 0), (1, 0), (0, 1), (3, 2)):
        engine = BridgeEngine(1000)
        for _ in range(before):
            engine.backend_data(b"c" * 4096)
        engine.client_data(bad)
        for _ in range(after):
            engine.backend_data(b"c" * 4096)
            engine.backend_error("this socket was already closed")
        events = from_server(engine.to_client)
        assert events[-1] == CloseConnection(code=1002, reason="protocol error")
        assert events[:-1] == [BytesMessage(data=b"c" * 4096)] * before
        assert engine.end is End.CLIENT_ERROR


# ------------------------------------------------------------------ backpressure


def test_the_client_is_not_read_while_the_backend_is_behind() -> None:
    engine = fed(BridgeEngine(1000), frame(0x2, b"data"))
    assert not engine.wants_client_data and engine.wants_backend_data
    del engine.to_backend[:2]
    assert not engine.wants_client_data
    del engine.to_backend[:]
    assert engine.wants_client_data


def test_the_backend_is_not_read_while_the_client_is_behind() -> None:
    engine = BridgeEngine(1000)
    engine.backend_data(b"x" * splice.CHUNK)
    assert not engine.wants_backend_data and engine.wants_client_data   # one message may wait
    del engine.to_client[:100]
    assert not engine.wants_backend_data
    del engine.to_client[:]
    assert engine.wants_backend_data


def test_pongs_for_a_client_that_does_not_read_stay_bounded() -> None:
    engine = BridgeEngine(1000)
    engine.backend_data(b"x" * splice.CHUNK)
    pings = frame(0x9, b"p" * 125) * (splice.CHUNK // 131)
    reads = 0
    while engine.wants_client_data:
        engine.client_data(pings)
        reads += 1
    assert reads == 1 and len(engine.to_client) <= 2 * splice.CHUNK + 16


def test_wants_nothing_once_done() -> None:
    engine = BridgeEngine(1000)
    engine.client_eof()
    assert engine.done and not engine.wants_client_data and not engine.wants_backend_data


# ------------------------------------------------------------------ TCP -> messages, counts


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (1, b"\x82\x01"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (splice.CHUNK, b"\x82\x7e\x40\x00"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_each_tcp_read_becomes_one_binary_message(size: int, header: bytes) -> None:
    data = os.urandom(size)
    engine = BridgeEngine(1000)
    engine.backend_data(data)
    assert bytes(engine.to_client) == header + data
    assert from_server(engine.to_client) == [BytesMessage(data=data)]


def test_bytes_are_counted_as_read_and_as_written() -> None:
    early = frame(0x2, b"EARLY")
    engine = BridgeEngine(1000, early)
    assert engine.to_backend == b"EARLY" and engine.bytes_up == 0   # counted with the request head
    engine.to_backend.clear()
    engine.client_data(frame(0x9, b"ab"))
    assert engine.bytes_up == 8
    assert engine.bytes_down == 0          # queued is not written
    del engine.to_client[:1]
    assert engine.bytes_down == 1
    engine.backend_data(b"0123456789")
    del engine.to_client[:]
    assert engine.bytes_down == 4 + 12
    engine.client_data(frame(0x8, close_payload(1000)))
    del engine.to_client[:]
    assert engine.bytes_down == 4 + 12 + 4 and engine.bytes_up == 8 + 8


def test_early_bytes_are_parsed_before_anything_is_read() -> None:
    engine = BridgeEngine(1000, frame(0x2, b"first") + frame(0x8, close_payload(1000)))
    assert engine.to_backend == b"first" and engine.done and engine.end is End.CLIENT_CLOSE


def test_the_constants_are_defined_once_and_re_exported_by_the_in_task_bridge() -> None:
    for name in ("REASONS", "CLOSE_TIMEOUT", "FAIL_LINGER", "IDLE_GRACE", "IDLE_REASON", "TOO_BIG"):
        assert getattr(bridge, name) is getattr(wsbridge, name), name
    assert wsbridge.CHUNK == splice.CHUNK
