"""The tcp:// bridge as a synchronous sans-I/O engine: bytes in, bytes out, no trio, no sockets.

SPEC section 4, "Bridge": WebSocket messages on the client side, a byte
stream on the other. This is the one implementation of the bridge's
semantics, written for a data plane that serves every connection from one
epoll loop (no task, no ``await`` per connection). The caller owns the
sockets and the timers; this class only decides. Two callers drive it: the
data plane (``gatewayd.dataplane.BridgeTunnel``, every tunnel whose ends
are sockets) and :class:`gatewayd.bridge.Bridge`, the same inside a
connection's task for streams that cannot leave trio.

Theory of operation
-------------------
The caller feeds what it read and drains what the engine wrote:

* inputs: :meth:`BridgeEngine.client_data` / ``client_eof`` /
  ``client_error``, :meth:`BridgeEngine.backend_data` / ``backend_eof`` /
  ``backend_error``, :meth:`BridgeEngine.go_away` (shutdown drain,
  ``max_connection_age``, ``idle_timeout``) and
  :meth:`BridgeEngine.close_timed_out` (the timer the engine asked for ran out);
* outputs: ``to_client`` and ``to_backend`` (bytearrays: the caller writes
  them and deletes, in place, what was written), ``shut_backend`` /
  ``close_backend`` / ``shut_client`` (what to do to a socket once its buffer
  is written), ``closing_deadline_wanted`` (arm a timer), ``done`` (the
  connection is over once the buffers are written), ``end`` / ``error`` and
  the byte counts.

**client -> TCP.** Each read from the client is parsed at once, frame by
frame, and the payload of every text or binary frame (or of the part of one
that this read holds: fragmented and large messages are streamed, never
reassembled) is appended to ``to_backend``. ``wants_client_data`` is false
while ``to_backend`` holds anything (and while ``to_client`` holds more than
one backend message: pongs for a client that does not read), so a slow TCP
peer slows the client down, and memory per connection stays at one read in
each direction plus a partial frame header (at most 13 bytes) or a partial
control frame (at most 130).
A ping is answered with a pong; a close frame is answered (RFC 6455 section
5.5.1) and the TCP write side is shut (``shut_backend``). A message growing
past ``max_message_size`` closes with 1009; a frame that breaks RFC 6455
closes with 1002, invalid UTF-8 in a text message or a close reason with
1007. The TCP side is then closed (``close_backend``) after what this read
passed on before the violation (the wsproto-based bridge this engine
replaced had written it too), and nothing more is passed on.

**The frame parser** is this module's own (:meth:`BridgeEngine._parse`), a
line-for-line rendering of wsproto's ``FrameDecoder`` / ``MessageDecoder``
checks, in wsproto's order and at the same byte: a header is judged as soon
as the bytes that decide it are in (an unknown opcode with its first two
bytes), the message-level checks (continuation order, UTF-8) at the first
payload byte of a frame, the close frame's checks when it is whole.
``tests/test_wsbridge.py`` runs wsproto beside it on every violation class
and on generated streams (hypothesis), and asserts the same verdict, the
same close code and the same bytes passed on. The reason for not calling
wsproto any more is cost: its per-event objects and pure-Python unmasking
were most of the bridge's CPU per message (``bench/frames.py``); unmasking
here is the C ``apply_mask`` of the ``websockets`` package, UTF-8 checking
is the codec's incremental decoder (in C), and a frame to the client is a
two- or four-byte header written straight into ``to_client``.

UTF-8 across reads: a text payload is passed on only up to its last whole
code point; the one to three bytes of a code point cut by the read are held
until the next read completes (or breaks) it, so the service never receives
bytes of an invalid sequence, just as with wsproto (which passed on decoded
text).

**TCP -> client.** Each :meth:`BridgeEngine.backend_data` call (the caller
reads at most ``CHUNK`` bytes) becomes one binary message.
``wants_backend_data`` is false while ``to_client`` holds anything, and for
good once a close was decided. TCP EOF sends close 1000; a TCP error (read
or write, or the caller's stall bound) sends close 1011.

Closing: one decision, made once (the invariant the wsproto-based bridge
had to keep across its two pump tasks, here trivially true: nothing runs
between two statements of one call). Whichever input first decides to close (a
client violation, TCP EOF or error, going away, the client's own close)
records the code, ``end`` and ``error``; every later attempt is a no-op. The
close frame is the one frame queued after the decision; no data frame
follows it. The decision asks for a timer, ``CLOSE_TIMEOUT`` (after TCP EOF:
``half_close_timeout`` when shorter; after a client violation:
``FAIL_LINGER``), and :meth:`BridgeEngine.close_timed_out` then ends the
connection, so a client that does not answer (or does not read) cannot hold
it. After our close frame we keep parsing what the client sends (data for a
still-open TCP write side is passed on, unless the connection failed) until
the client's close frame: the client then sees our close code rather than a
reset.

After a frame that cannot be parsed nothing more can be, so the client's
close frame will never be seen: the engine asks for the client's write side
to be shut after our close frame (``shut_client``; RFC 6455 section 7.1.1 has
the server close the TCP connection first) and drops what the client still
sends for ``FAIL_LINGER``, so our close frame is not destroyed by a reset.

Close reasons are short fixed texts, one per code (:data:`REASONS`); the
detail (the parser's description of the violation, the backend's error)
goes to ``error``, which the connection logs.

Byte counts: ``bytes_up`` counts every byte fed by ``client_data`` (not the
``early`` bytes, which whoever read the request head counted);
``bytes_down`` is what left ``to_client``, so bytes queued but never
written (a client that stopped reading) are not counted.
"""

from __future__ import annotations

import enum
import struct
from codecs import IncrementalDecoder, getincrementaldecoder
from typing import Final

try:  # the C unmasking of websockets (built in its wheels); 30-60x wsproto's
    from websockets.speedups import apply_mask
except ImportError:  # a build without its C extension
    from websockets.utils import apply_mask

from gatewayd.record import End

#: How long we wait for the client's close frame after queueing ours.
CLOSE_TIMEOUT: Final = 5.0
#: After a frame that cannot be parsed: how long we read (and drop) what the client still sends.
FAIL_LINGER: Final = 1.0
#: After idle_timeout fired (go_away(End.IDLE_TIMEOUT)), the caller's hard stop
#: (close_timed_out) comes this much after the idle deadline, if no traffic moved it.
IDLE_GRACE: Final = 1.0
#: What the caller reads from the backend at once (= gatewayd.splice.CHUNK; a test checks).
CHUNK: Final = 16384
#: Client reads pause while ``to_client`` holds more than one backend message:
#: pongs for a client that sends pings and does not read stay bounded.
CLIENT_OUT_BOUND: Final = CHUNK + 16

# RFC 6455 section 7.4.1 status codes we send.
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
TOO_BIG: Final = 1009
INTERNAL_ERROR: Final = 1011

#: The reason sent with each code (docs/backends.md lists them). The detail goes to the log only.
REASONS: Final[dict[int, str]] = {
    NORMAL: "",
    GOING_AWAY: "going away",
    PROTOCOL_ERROR: "protocol error",
    INVALID_DATA: "invalid payload data",
    TOO_BIG: "message too big",
    INTERNAL_ERROR: "backend error",
}
#: 1001 for idle_timeout says so (the other 1001s: shutdown, max_connection_age).
IDLE_REASON: Final = "idle timeout"

# RFC 6455 section 5.2 opcodes.
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_OPCODE_NAMES: Final = {_CONT: "CONTINUATION", _TEXT: "TEXT", _BINARY: "BINARY"}
_VALID_OPCODES: Final = frozenset((_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG))

# Section 7.4: close codes a peer may send. Below 3000 only the registered
# ones (wsproto's CloseReason: 1000-1003, 1007-1013), never 1005/1006/1015.
_PEER_CLOSE_CODES: Final = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))
_NO_STATUS = 1005

_HEADER16 = struct.Struct("!BBH")
_HEADER64 = struct.Struct("!BBQ")
_utf8_decoder = getincrementaldecoder("utf-8")


class _State(enum.Enum):
    """Where the closing handshake is (wsproto's ConnectionState, less the transient one)."""

    OPEN = "open"              # no close frame either way
    LOCAL_CLOSING = "closing"  # our close frame is queued; the client's answer is awaited
    CLOSED = "closed"          # both close frames: the handshake is complete


class _Violation(Exception):
    """The client broke RFC 6455: fail the connection with ``code`` (wsproto's ParseFailed)."""

    def __init__(self, detail: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(detail)
        self.code = code


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A server close frame (unmasked): ``code`` None sends no status (RFC 6455 section 5.5.1)."""
    if code is None:
        return b"\x88\x00"
    payload = code.to_bytes(2, "big") + _truncate_utf8(reason.encode(), 123)
    return bytes((0x88, len(payload))) + payload


def _truncate_utf8(data: bytes, size: int) -> bytes:
    # A close reason is at most 123 bytes (section 5.5); cut at a code point.
    if len(data) <= size:
        return data
    return data[:size].decode("utf-8", errors="ignore").encode()


class BridgeEngine:
    """One bridged connection, after our 101: see the module doc for the protocol with the caller.

    Args:
        max_message_size: largest WebSocket message accepted from the client (1009 above it).
        early: the client's bytes that came after its upgrade request head
            (its first frames); parsed at once, not counted in ``bytes_up``.
        half_close_timeout: after the TCP side's EOF (close 1000 queued), how
            long the client has to answer with its close frame (0 = only the
            closing handshake's ``CLOSE_TIMEOUT``, which also caps it); when
            it runs out the end is ``half_close_timeout``.

    Attributes:
        to_client: bytes to write to the client; the caller deletes what it wrote (in place).
        to_backend: bytes to write to the backend; likewise.
        shut_backend: half-close the backend's write side once ``to_backend`` is written.
        close_backend: close the backend connection once ``to_backend`` is written
            (the engine empties ``to_backend`` itself when the close must be at
            once; a caller that closes without writing empties it too).
        shut_client: half-close the client's write side (TLS close_notify, FIN)
            once ``to_client`` is written (after a frame that could not be parsed).
        closing_deadline_wanted: seconds from now: after a call that set it,
            the caller keeps the earlier of its armed timer (if any) and now +
            this, and calls :meth:`close_timed_out` when it runs out. The
            engine sets it when it wants a timer (the decision: CLOSE_TIMEOUT,
            or half_close_timeout; a violation: FAIL_LINGER); the caller may
            set it back to None once armed (a timer is never moved later).
        done: the connection is over once ``to_client`` and ``to_backend`` are
            written (and the shut / close flags carried out): close both sides.
        end: why it ended (the access log's ``end``), set by the close decision.
        error: the detail for the log, never sent to the client.
        bytes_up: bytes fed from the client.
    """

    __slots__ = (
        "_closing",
        "_decoder",
        "_failed",
        "_fin",
        "_first_piece",
        "_frame_opcode",
        "_half_close",
        "_half_closed",
        "_head",
        "_hold",
        "_mask",
        "_mask_offset",
        "_max_message_size",
        "_message_opcode",
        "_message_size",
        "_parsing",
        "_queued_down",
        "_remaining",
        "_state",
        "_backend_open",
        "_client_open",
        "bytes_up",
        "close_backend",
        "closing_deadline_wanted",
        "done",
        "end",
        "error",
        "shut_backend",
        "shut_client",
        "to_backend",
        "to_client",
    )

    def __init__(
        self, max_message_size: int, early: bytes = b"", *, half_close_timeout: float = 0.0
    ) -> None:
        self.to_client = bytearray()
        self.to_backend = bytearray()
        self.shut_backend = False
        self.close_backend = False
        self.shut_client = False
        self.closing_deadline_wanted: float | None = None
        self.done = False
        self.end: End | None = None
        self.error = ""
        self.bytes_up = 0
        self._max_message_size = max_message_size
        self._half_close = half_close_timeout
        self._half_closed = False     # the TCP side ended first: its close 1000 is decided
        self._state = _State.OPEN
        #: The close decision (our code, or the client's echoed): set once.
        self._closing: int | None = None
        self._failed = False          # closed for an error: pass nothing more on
        self._client_open = True      # the client may still send (no EOF, no error)
        self._backend_open = True     # the backend may still send (no EOF, no error)
        self._queued_down = 0         # bytes ever put in to_client (less those dropped)
        # The parser (wsproto's FrameDecoder + MessageDecoder state).
        self._parsing = True          # False after the client's close frame or a violation
        self._head = b""              # an incomplete frame header (or control frame) from the last read
        self._remaining = 0           # payload bytes of the current data frame still to come
        self._mask = b""              # its masking key
        self._mask_offset = 0         # where in the key its next payload byte is
        self._frame_opcode = _CONT
        self._fin = False
        self._first_piece = False     # the frame's first payload has not been judged yet
        self._message_opcode: int | None = None   # TEXT or BINARY inside a message
        self._decoder: IncrementalDecoder | None = None   # the text message's UTF-8 decoder
        self._hold = b""              # the cut code point at the end of the last text payload
        self._message_size = 0
        if early:
            self._parse(early)

    # ------------------------------------------------------------------ state the caller reads

    @property
    def bytes_down(self) -> int:
        """Bytes written to the client: queued ones less those still in ``to_client``."""
        return self._queued_down - len(self.to_client)

    @property
    def wants_client_data(self) -> bool:
        """Read the client now? False when its data would not be taken, or while the backend is behind."""
        return (
            not self.done
            and self._client_open
            and not self.to_backend
            and len(self.to_client) <= CLIENT_OUT_BOUND
        )

    @property
    def wants_backend_data(self) -> bool:
        """Read the backend now? False once a close is decided, or while the client is behind."""
        return (
            not self.done
            and self._backend_open
            and self._closing is None
            and not self.to_client
        )

    # ------------------------------------------------------------------ client inputs

    def client_data(self, data: bytes) -> None:
        """Bytes read from the client (at most one read's worth: ``CHUNK``)."""
        self.bytes_up += len(data)
        if self._parsing and not self.done:
            self._parse(data)

    def client_eof(self) -> None:
        """The client's TCP (or TLS) stream ended."""
        self._client_open = False
        if self.done:
            return
        # EOF without a close frame (1006, abnormal closure): the client is gone.
        self._end(End.CLIENT_CLOSE, "client: EOF without a close frame")
        self._shut_backend()
        self.done = True

    def client_error(self, text: str) -> None:
        """Reading from or writing to the client failed; ``text`` is the detail (logged)."""
        self._client_open = False
        if self.done:
            return
        self._end(End.CLIENT_ERROR, f"client: {text}")
        self._drop_to_client()
        self._close_backend_now()
        self.done = True

    # ------------------------------------------------------------------ backend inputs

    def backend_data(self, data: bytes) -> None:
        """Bytes read from the backend (at most ``CHUNK``): one binary message to the client.

        Dropped once a close is decided (no data frame follows our close frame).
        """
        if self._closing is not None or self.done or not data:
            return
        out = self.to_client
        size = len(data)
        if size < 126:
            out.append(0x82)
            out.append(size)
            self._queued_down += size + 2
        elif size < 65536:
            out += _HEADER16.pack(0x82, 126, size)
            self._queued_down += size + 4
        else:
            out += _HEADER64.pack(0x82, 127, size)
            self._queued_down += size + 10
        out += data

    def backend_eof(self) -> None:
        """The backend's side ended: close 1000, while the client's data still flows to it."""
        self._backend_open = False
        if self.done:
            return
        if self._decide(NORMAL, End.BACKEND_CLOSE):
            # Until the client's close frame, for half_close_timeout at most
            # (and the closing handshake's CLOSE_TIMEOUT, set by the decision).
            self._half_closed = True
            if 0 < self._half_close < CLOSE_TIMEOUT:
                self.closing_deadline_wanted = self._half_close
            self._send_close(NORMAL)

    def backend_error(self, text: str) -> None:
        """Reading from or writing to the backend failed, or it stalled; ``text`` is the detail."""
        self._backend_open = False
        if self.done:
            return
        self._fail(INTERNAL_ERROR, End.BACKEND_ERROR, f"backend: {text}")
        self.to_backend.clear()   # at once: it cannot take more

    # ------------------------------------------------------------------ the caller's timers

    def go_away(self, end: End) -> None:
        """Close 1001 (Going Away), once: ``end`` is SHUTDOWN, MAX_AGE or IDLE_TIMEOUT.

        The caller keeps the timers (the engine has no clock): the drain and
        ``max_connection_age`` deadlines, and ``idle_timeout`` counted from
        the last byte read from or written to the client, with its hard stop
        ``IDLE_GRACE`` later (then :meth:`close_timed_out`).
        """
        if self.done:
            return
        reason = IDLE_REASON if end is End.IDLE_TIMEOUT else None
        if self._decide(GOING_AWAY, end):
            self._send_close(GOING_AWAY, reason)

    def close_timed_out(self) -> None:
        """The timer of ``closing_deadline_wanted`` ran out: the connection is over now."""
        if self.done:
            return
        if self._half_closed and self._state is _State.LOCAL_CLOSING:
            # The TCP side ended and the client never answered our close 1000:
            # the half-closed state ran out (SPEC section 4; half_close_timeout).
            self.end = End.HALF_CLOSE_TIMEOUT
            self.error = "client: no close frame after the backend's EOF"
        self._drop_to_client()
        self._close_backend_now()
        self.done = True

    # ------------------------------------------------------------------ the close decision

    def _end(self, reason: End, error: str = "") -> None:
        if self.end is None:
            self.end = reason
            self.error = error

    def _decide(self, code: int, end: End, error: str = "") -> bool:
        """Record the close decision unless one was made; True if this call made it."""
        if self._closing is not None:
            return False
        self._closing = code
        self._end(end, error)
        self.closing_deadline_wanted = CLOSE_TIMEOUT
        return True

    def _send_close(self, code: int, reason: str | None = None) -> None:
        # Our close frame, unless the client's close was answered already.
        if self._state is not _State.OPEN:
            return
        frame = close_frame(code, REASONS[code] if reason is None else reason)
        self.to_client += frame
        self._queued_down += len(frame)
        self._state = _State.LOCAL_CLOSING

    def _fail(self, code: int, end: End, error: str) -> None:
        """Fail the connection (RFC 6455 section 7.1.7): the TCP side closed, our close frame."""
        self._failed = True
        if self._decide(code, end, error):
            self._send_close(code)
        self.close_backend = True
        self.shut_backend = False

    def _shut_backend(self) -> None:
        if not self._failed:
            self.shut_backend = True

    def _close_backend_now(self) -> None:
        self.to_backend.clear()
        self.close_backend = True
        self.shut_backend = False

    def _drop_to_client(self) -> None:
        self._queued_down -= len(self.to_client)
        self.to_client.clear()

    # ------------------------------------------------------------------ client -> TCP

    def _parse(self, data: bytes) -> None:
        try:
            self._frames(data)
        except _Violation as exc:
            self._violation(exc.code, str(exc))

    def _frames(self, data: bytes) -> None:  # noqa: C901  (one ordered sequence of RFC 6455 checks)
        """Parse ``data`` (after what is left of the last read), acting on each frame in order.

        The checks are wsproto's (``FrameDecoder.parse_header``,
        ``parse_extended_payload_length``, ``extension_processing``), made
        as soon as the bytes that decide them are in.
        """
        if self._head:
            data = self._head + data
            self._head = b""
        pos = 0
        size = len(data)
        while self._parsing:
            remaining = self._remaining
            if remaining:
                # Inside a data frame's payload: what this read holds of it.
                count = size - pos
                if count <= 0:
                    return
                if count > remaining:
                    count = remaining
                mask = self._mask
                offset = self._mask_offset
                if offset:
                    mask = mask[offset:] + mask[:offset]
                # A large piece is unmasked straight from the read (no slice copy).
                piece = data[pos : pos + count] if count < 4096 else memoryview(data)[pos : pos + count]
                payload = apply_mask(piece, mask)
                pos += count
                self._remaining = remaining - count
                self._mask_offset = (offset + count) & 3
                self._piece(payload, count == remaining)
                continue
            start = pos
            if size - pos < 2:
                break
            first = data[pos]
            second = data[pos + 1]
            opcode = first & 0x0F
            if opcode not in _VALID_OPCODES:
                raise _Violation(f"Invalid opcode {opcode:#x}")
            fin = first & 0x80
            control = opcode & 0x08
            if control and not fin:
                raise _Violation("Invalid attempt to fragment control frame")
            length = second & 0x7F
            pos += 2
            if control and length > 125:
                raise _Violation("Control frame with payload len > 125")
            if length == 126:
                if size - pos < 2:
                    pos = start
                    break
                length = int.from_bytes(data[pos : pos + 2], "big")
                pos += 2
                if length <= 125:
                    raise _Violation("Payload length used 2 bytes when 1 would have sufficed")
            elif length == 127:
                if size - pos < 8:
                    pos = start
                    break
                length = int.from_bytes(data[pos : pos + 8], "big")
                pos += 8
                if length <= 0xFFFF:
                    raise _Violation("Payload length used 8 bytes when 2 would have sufficed")
                if length >> 63:
                    raise _Violation("8-byte payload length with non-zero MSB")
            if first & 0x70:
                # No extension is ever negotiated (SPEC section 4): no RSV bit may be set.
                raise _Violation("Reserved bit set unexpectedly")
            if not second & 0x80:
                # Section 5.1: a client frame must be masked.
                raise _Violation("server received unexpected unmasked frame")
            if size - pos < 4:
                pos = start
                break
            mask = data[pos : pos + 4]
            pos += 4
            if control:
                # A control frame is judged whole (at most 125 bytes).
                if size - pos < length:
                    pos = start
                    break
                payload = apply_mask(data[pos : pos + length], mask)
                pos += length
                self._control(opcode, payload)
                continue
            self._mask = mask
            self._mask_offset = 0
            self._frame_opcode = opcode
            self._fin = bool(fin)
            self._first_piece = True
            self._remaining = length
            if not length:
                self._piece(b"", True)
        else:
            return  # the client's close frame, or a violation: the rest is never parsed
        if pos < size:
            self._head = bytes(data[pos:]) if pos else bytes(data)

    def _piece(self, payload: bytes, frame_done: bool) -> None:
        """A data frame's payload, or the part of it this read holds (wsproto's MessageDecoder)."""
        if self._first_piece:
            self._first_piece = False
            opcode = self._frame_opcode
            if self._message_opcode is None:
                if opcode == _CONT:
                    raise _Violation("unexpected CONTINUATION")
                self._message_opcode = opcode
            elif opcode != _CONT:
                raise _Violation(f"expected CONTINUATION, got {_OPCODE_NAMES[opcode]}")
            if opcode == _TEXT:
                self._decoder = _utf8_decoder()
                self._hold = b""
        finished = frame_done and self._fin
        decoder = self._decoder
        if decoder is not None:
            try:
                decoder.decode(payload, finished)
            except UnicodeDecodeError as exc:
                raise _Violation(str(exc), INVALID_DATA) from None
            # Pass on whole code points only: a cut one waits for the next read.
            cut = 0 if finished else len(decoder.getstate()[0])
            if self._hold or cut:
                payload = self._hold + payload
                self._hold = payload[len(payload) - cut :] if cut else b""
                if cut:
                    payload = payload[: len(payload) - cut]
        if finished:
            self._message_opcode = None
            self._decoder = None
        if self._failed:
            return
        self._message_size += len(payload)
        if self._message_size > self._max_message_size:
            self._fail(
                TOO_BIG,
                End.CLIENT_ERROR,
                f"client: message over max_message_size ({self._max_message_size} bytes)",
            )
            return
        if finished:
            self._message_size = 0
        if payload:
            self.to_backend += payload

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == _PING:
            if self._state is _State.OPEN:
                # Section 5.5.3: the pong carries the ping's payload.
                self.to_client.append(0x8A)
                self.to_client.append(len(payload))
                self.to_client += payload
                self._queued_down += len(payload) + 2
        elif opcode == _CLOSE:
            code, reason = _parse_close(payload)
            self._parsing = False   # nothing after a close frame is parsed (section 5.5.1)
            self._client_close(code, reason)
        # A pong (unsolicited: we never ping) is ignored (section 5.5.3).

    def _client_close(self, code: int, reason: str) -> None:
        if self._state is _State.OPEN:
            # The client closes first: answer (echoing its code and reason,
            # section 5.5.1), then pass the end on to TCP as a half-close.
            self._decide(code, End.CLIENT_CLOSE)
            frame = close_frame(None if code == _NO_STATUS else code, reason)
            self.to_client += frame
            self._queued_down += len(frame)
        # Else the client's answer to our close frame: the handshake is complete.
        self._state = _State.CLOSED
        self._shut_backend()
        self.done = True

    def _violation(self, code: int, detail: str) -> None:
        # Nothing more can be parsed, so the client's close frame will not be
        # seen: fail, shut our write side after our close frame (section
        # 7.1.1 has the server close the TCP connection first) and only drain
        # briefly, so our close frame is not destroyed by a reset.
        self._parsing = False
        self._head = b""
        self._fail(code, End.CLIENT_ERROR, f"client: {code} {detail}")
        self.shut_client = True
        wanted = self.closing_deadline_wanted
        self.closing_deadline_wanted = FAIL_LINGER if wanted is None else min(wanted, FAIL_LINGER)


def _parse_close(payload: bytes) -> tuple[int, str]:
    """A client close frame's code and reason (wsproto's ``_process_close`` checks, in order)."""
    if not payload:
        # "If this Close control frame contains no status code, _The
        # WebSocket Connection Close Code_ is considered to be 1005".
        return _NO_STATUS, ""
    if len(payload) == 1:
        raise _Violation("CLOSE with 1 byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code < 1000 or code > 4999:
        raise _Violation("CLOSE with invalid code")
    if code in (1005, 1006, 1015):
        raise _Violation("remote CLOSE with local-only reason")
    if code <= 2999 and code not in _PEER_CLOSE_CODES:
        raise _Violation("CLOSE with unknown reserved code")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Violation(f"Error decoding CLOSE reason: {exc}", INVALID_DATA) from None
    return code, reason
