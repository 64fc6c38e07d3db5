"""The tcp:// bridge: WebSocket messages on the client side, a byte stream on the other.

SPEC section 4, "Bridge": what websockify does, with wsproto doing every bit
of RFC 6455 framing (we never parse a frame ourselves).

Theory of operation
-------------------
The gateway has already answered the handshake (our own 101) when
:meth:`Bridge.run` starts. Two pumps run side by side:

* **client -> TCP**: read at most ``CHUNK`` bytes from the client, feed them
  to wsproto, and for each event: the payload of a text or binary frame
  (or of a part of one: fragmented and large messages are streamed, never
  reassembled) is written to TCP before anything more is read, so a slow
  TCP peer slows the client down; a ping is answered with a pong; a close
  frame is answered (RFC 6455 section 5.5.1) and the TCP write side is shut
  (``send_eof``). A message growing past ``max_message_size`` closes the
  connection with 1009, and anything wsproto rejects (an unmasked frame, a
  bad opcode, invalid UTF-8 in text) with the code wsproto names (1002,
  1007): the TCP side is then closed at once, without passing anything on.
* **TCP -> client**: each chunk read from TCP (at most ``CHUNK`` bytes)
  becomes one binary message, written before the next read. TCP EOF sends
  close 1000; a TCP error sends close 1011.

Writes to the client come from both pumps (data, pongs, close frames), so
they go through one lock, and wsproto's state is consulted under it: no
data frame ever follows our close frame. Memory per connection is bounded by
one chunk in each direction plus wsproto's buffer of one partial frame header.

Closing: one decision, made once. Whichever side first decides to close
(a client violation, TCP EOF or error, going away, the client's own close)
records its code and the end reason in ``_closing`` / ``stats.end``
*synchronously*, before its first ``await``; every later attempt to close is
a no-op. This is what makes the close frame certain (RFC 6455 section 7.1.7:
the endpoint should send one before closing): failing the connection closes
the TCP socket, and a TCP pump that was already woken for data then reads a
closed socket. Were it free to start its own 1011 close, that close would
move wsproto's state (so the 1002 close found the state no longer open) and
could itself be cancelled before a byte went out: the client saw neither
(1006), and the access line blamed the backend. Invariants:

* the TCP pump sends data only while ``_closing`` is None, checked under the
  send lock; it is cancelled only under that lock, after ``_closing`` is set:
  so it is never cancelled in the middle of a frame;
* the close frame is the one frame sent after ``_closing`` is set, under the
  hard deadline that the decision sets (``CLOSE_TIMEOUT``), so a client that
  does not read cannot hold the connection.

After we send a close frame we keep reading from the client (data for a
still-open TCP write side is passed on, unless the connection failed) until
the client's close frame, for at most ``CLOSE_TIMEOUT``: the client then sees
our close code rather than a reset.

Close reasons are short fixed texts, one per code (:data:`REASONS`): a
client never sees our internals (a decoder's message, an enum's repr). The
detail (wsproto's description of the violation, the backend's error) goes
to ``stats.error``, which the connection logs.

Going away. The gateway's shutdown drain, ``max_connection_age`` and
``idle_timeout`` end a bridged connection with close 1001 (Going Away):
:meth:`Bridge.go_away_at` sets a deadline on the TCP read only (a pending
read is safe to cancel; a write never is, as it may leave half a frame), and
the TCP pump then sends 1001 in the normal way. The caller keeps a hard
deadline a little later, for a client that does not read any more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from gatewayd import splice
from gatewayd.record import End
from gatewayd.splice import CHUNK, SpliceStats

logger = logging.getLogger("gatewayd.bridge")

#: How long we wait for the client's close frame after sending ours.
CLOSE_TIMEOUT = 5.0
#: After a protocol error: how long we read (and drop) what the client still sends.
FAIL_LINGER = 1.0
#: After idle_timeout fires politely (close 1001), the hard stop comes this much later.
IDLE_GRACE = 1.0

# RFC 6455 section 7.4.1 status codes we send.
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009
INTERNAL_ERROR = 1011

#: The reason sent with each code: short, fixed, the same for every client
#: (docs/backends.md lists them). The detail goes to the log only.
REASONS: dict[int, str] = {
    NORMAL: "",
    GOING_AWAY: "going away",
    PROTOCOL_ERROR: "protocol error",
    INVALID_DATA: "invalid payload data",
    TOO_BIG: "message too big",
    INTERNAL_ERROR: "backend error",
}
#: 1001 for idle_timeout says so (the other 1001s: shutdown, max_connection_age).
IDLE_REASON = "idle timeout"

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Done(Exception):
    """The bridge is over (the client side closed or failed): stop both pumps."""


class Bridge:
    """One bridged connection.

    Args:
        client: the client's stream, after our 101.
        backend: the TCP (or unix socket) stream to the service.
        stats: filled in: bytes read from / written to the client (not counting
            ``early``), and why it ended.
        max_message_size: largest WebSocket message accepted from the client.
        idle_timeout: close after this long without a byte either way (0 = never).
        half_close_timeout: after the TCP side's EOF (close 1000 sent), how long
            the client has to answer with its close frame (0 = no bound but
            the closing handshake's ``CLOSE_TIMEOUT``, which also caps it).
    """

    def __init__(
        self,
        client: trio.abc.Stream,
        backend: trio.abc.Stream,
        stats: SpliceStats,
        *,
        max_message_size: int,
        idle_timeout: float = 0.0,
        half_close_timeout: float = 0.0,
    ) -> None:
        self.client = client
        self.backend = backend
        self.stats = stats
        self.max_message_size = max_message_size
        self.idle = idle_timeout if idle_timeout > 0 else math.inf
        self.half_close = half_close_timeout
        self._half_closed = False  # the TCP side ended first: its close 1000 is decided
        self.ws = WSConnection(ConnectionType.SERVER)
        self._send_lock = trio.StrictFIFOLock()
        self._scope = trio.CancelScope()          # the whole bridge
        self._tcp_pump = trio.CancelScope()       # the TCP -> client pump
        self._tcp_read: trio.CancelScope | None = None   # a pending TCP read
        self._go_away = math.inf
        self._go_away_reason = End.SHUTDOWN
        self._last_activity = trio.current_time()
        self._closing_deadline = math.inf
        #: The close decision (our code, or the client's echoed): set once, see the module doc.
        self._closing: int | None = None
        self._failed = False       # closed for an error: pass nothing more on
        self._parser_ok = True     # wsproto can still parse what the client sends
        self._message_size = 0

    # ------------------------------------------------------------------ control

    def go_away_at(self, deadline: float, reason: End) -> None:
        """Send close 1001 at ``deadline`` (trio time) at the latest, as ``reason``."""
        if deadline < self._go_away:
            self._go_away = deadline
            self._go_away_reason = reason
            if self._tcp_read is not None:
                self._tcp_read.deadline = self._read_deadline()

    def _read_deadline(self) -> float:
        return min(self._go_away, self._last_activity + self.idle)

    def _activity(self) -> None:
        if self.idle == math.inf:
            return  # deadlines only move for idle_timeout; skip the cost per message
        self._last_activity = trio.current_time()
        if self._tcp_read is not None:
            self._tcp_read.deadline = self._read_deadline()
        self._update_deadline()

    def _update_deadline(self) -> None:
        self._scope.deadline = min(
            self._closing_deadline, self._last_activity + self.idle + IDLE_GRACE
        )

    def _end(self, reason: End, error: str = "") -> None:
        if self.stats.end is None:
            self.stats.end = reason
            self.stats.error = error

    def _decide(self, code: int, end: End, error: str = "") -> bool:
        """Record the close decision unless one was made; True if this call made it.

        Never awaits: the decision is in force before anything else can run.
        """
        if self._closing is not None:
            return False
        self._closing = code
        self._end(end, error)
        # The closing handshake is bounded from now on, the close frame's send included.
        self._closing_deadline = min(
            self._closing_deadline, trio.current_time() + CLOSE_TIMEOUT
        )
        self._update_deadline()
        return True

    # ------------------------------------------------------------------ running

    async def run(self, early: bytes = b"") -> None:
        """Bridge until the WebSocket connection is closed or fails.

        Args:
            early: bytes the client sent right after its request head (its
                first frames); they are handled before anything is read.

        Does not close the streams; the caller does. Sets ``stats.end``.
        """
        self._update_deadline()
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_done, self._client_pump, early)
                nursery.start_soon(self._until_done, self._tcp_to_client)
        if self._scope.cancelled_caught and self.stats.end is None:
            self._end(End.IDLE_TIMEOUT)
        if (
            self._half_closed
            and self.ws.state is ConnectionState.LOCAL_CLOSING
            and trio.current_time() >= self._closing_deadline
        ):
            # The TCP side ended and the client never answered our close 1000:
            # the half-closed state ran out (SPEC section 4; half_close_timeout).
            self.stats.end = End.HALF_CLOSE_TIMEOUT
            self.stats.error = "client: no close frame after the backend's EOF"

    async def _until_done(self, pump: Callable[..., Awaitable[None]], *args: object) -> None:
        # _Done stops both pumps. Cancelling the other one cannot cut a frame
        # in half: _Done comes after our last frame (the close handshake is
        # over, and no data frame follows a close) or after the client
        # stream broke.
        try:
            await pump(*args)
        except _Done:
            self._scope.cancel()

    @asynccontextmanager
    async def _sending(self) -> AsyncIterator[None]:
        """Hold the client-send lock (free almost always: skip a scheduler round then)."""
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            yield
        finally:
            self._send_lock.release()

    async def _send_client(self, data: bytes) -> None:
        """Write to the client (caller holds the send lock); a failure ends the bridge."""
        try:
            await self.client.send_all(data)
        except _STREAM_ERRORS as exc:
            self._end(End.CLIENT_ERROR, f"client: {exc.__cause__ or exc}")
            raise _Done from None
        self.stats.bytes_down += len(data)
        self._activity()

    async def _close(
        self, code: int, end: End, error: str = "", reason: str | None = None
    ) -> None:
        """Start the closing handshake, unless a close was decided already.

        Our close frame (``reason``, by default the code's from
        :data:`REASONS`); the client pump then awaits the client's answer.
        """
        if self._decide(code, end, error):
            await self._send_close(code, reason)

    async def _send_close(self, code: int, reason: str | None = None) -> None:
        async with self._sending():
            # The client may have closed first (then its close was answered).
            if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                text = REASONS[code] if reason is None else reason
                await self._send_client(self.ws.send(CloseConnection(code=code, reason=text)))

    async def _fail(self, code: int, end: End, error: str) -> None:
        """Fail the connection (RFC 6455 section 7.1.7): TCP closed at once, our close frame.

        Args:
            code: the close code sent.
            end: the access log's end reason: the side at fault.
            error: the detail, for the log (never sent).
        """
        self._failed = True
        decided = self._decide(code, end, error)
        async with self._sending():
            self._tcp_pump.cancel()
        try:
            await self.backend.aclose()
        except _STREAM_ERRORS:
            pass  # gone already: closing it was the point
        if decided:
            await self._send_close(code)

    # ------------------------------------------------------------------ client -> TCP

    async def _client_pump(self, early: bytes) -> None:
        # The early bytes were counted by whoever read the request head.
        if early:
            await self._from_client(early)
        while True:
            try:
                data = bytes(await self.client.receive_some(CHUNK))
            except _STREAM_ERRORS as exc:
                self._end(End.CLIENT_ERROR, f"client: {exc.__cause__ or exc}")
                raise _Done from None
            if not data:
                # EOF without a close frame (1006, abnormal closure): the client is gone.
                self._end(End.CLIENT_CLOSE, "client: EOF without a close frame")
                await self._shut_tcp_write()
                raise _Done
            self.stats.bytes_up += len(data)
            self._activity()
            await self._from_client(data)

    async def _from_client(self, data: bytes) -> None:
        if not self._parser_ok:
            return  # failed: what the client still sends is read and dropped
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, (BytesMessage, TextMessage)):
                await self._message(event)
            elif isinstance(event, Ping):
                async with self._sending():
                    if self.ws.state is ConnectionState.OPEN:
                        await self._send_client(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                await self._client_close(event)

    async def _message(self, event: BytesMessage | TextMessage) -> None:
        if self._failed:
            return
        payload = event.data.encode("utf-8") if isinstance(event, TextMessage) else event.data
        self._message_size += len(payload)
        if self._message_size > self.max_message_size:
            await self._fail(
                TOO_BIG,
                End.CLIENT_ERROR,
                f"client: message over max_message_size ({self.max_message_size} bytes)",
            )
            return
        if event.message_finished:
            self._message_size = 0
        if not payload:
            return
        try:
            with trio.move_on_after(splice.STALL_TIMEOUT) as stall:
                await self.backend.send_all(payload)
        except _STREAM_ERRORS as exc:
            await self._fail(
                INTERNAL_ERROR, End.BACKEND_ERROR, f"backend: {exc.__cause__ or exc}"
            )
            return
        if stall.cancelled_caught:
            # The service stopped reading: see splice.STALL_TIMEOUT.
            await self._fail(
                INTERNAL_ERROR,
                End.BACKEND_ERROR,
                f"backend: read nothing for {splice.STALL_TIMEOUT:g}s",
            )

    async def _client_close(self, event: CloseConnection) -> None:
        state = self.ws.state
        if state is ConnectionState.REMOTE_CLOSING:
            # The client closes first: answer (echoing its code, RFC 6455
            # section 5.5.1), then pass the end on to TCP as a half-close.
            # If we decided to close already, our frame is out or about to
            # go: the state check under the lock settles which.
            self._decide(int(event.code), End.CLIENT_CLOSE)
            async with self._sending():
                self._tcp_pump.cancel()
                # Check again under the lock: while we waited for it, our own
                # close frame (TCP EOF, idle, shutdown) may have gone out, which
                # completed the closing handshake (state CLOSED): nothing to answer.
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._send_client(self.ws.send(event.response()))
            await self._shut_tcp_write()
            raise _Done
        if state is ConnectionState.CLOSED:
            # The client's answer to our close frame: the handshake is complete.
            await self._shut_tcp_write()
            raise _Done
        # wsproto reports a frame it could not accept as a close event
        # without a close frame having arrived (the state did not change).
        # Nothing more can be parsed, so the client's close frame will not be
        # seen: half-close at once (RFC 6455 section 7.1.1 has the server
        # close the TCP connection first) and only drain briefly, so our
        # close frame is not destroyed by a reset.
        self._parser_ok = False
        code = int(event.code) if event.code in REASONS else PROTOCOL_ERROR
        await self._fail(code, End.CLIENT_ERROR, f"client: {code} {event.reason}")
        if isinstance(self.client, trio.abc.HalfCloseableStream):
            async with self._sending():
                try:
                    await self.client.send_eof()
                except _STREAM_ERRORS:
                    raise _Done from None
        self._closing_deadline = min(self._closing_deadline, trio.current_time() + FAIL_LINGER)
        self._update_deadline()

    async def _shut_tcp_write(self) -> None:
        if self._failed:
            return
        try:
            if isinstance(self.backend, trio.abc.HalfCloseableStream):
                await self.backend.send_eof()
            else:
                await self.backend.aclose()
        except _STREAM_ERRORS:
            pass  # the service closed already; nothing to pass on

    # ------------------------------------------------------------------ TCP -> client

    async def _tcp_to_client(self) -> None:
        with self._tcp_pump:
            while True:
                with trio.CancelScope(deadline=self._read_deadline()) as read:
                    self._tcp_read = read
                    try:
                        data = bytes(await self.backend.receive_some(CHUNK))
                    except _STREAM_ERRORS as exc:
                        # After a failure this is our own close of the TCP
                        # socket, seen by a pump already woken for data: the
                        # decision stands, and _close is a no-op.
                        await self._close(
                            INTERNAL_ERROR,
                            End.BACKEND_ERROR,
                            f"backend: {exc.__cause__ or exc}",
                        )
                        return
                    finally:
                        self._tcp_read = None
                if read.cancelled_caught:
                    if trio.current_time() >= self._go_away:
                        await self._close(GOING_AWAY, self._go_away_reason)
                    else:
                        await self._close(GOING_AWAY, End.IDLE_TIMEOUT, reason=IDLE_REASON)
                    return
                if not data:
                    # The TCP side's half ended: close 1000, while the client's
                    # data still flows to TCP until its close frame, for
                    # half_close_timeout at most (and the closing handshake's
                    # CLOSE_TIMEOUT, set by the decision).
                    if self._decide(NORMAL, End.BACKEND_CLOSE):
                        self._half_closed = True
                        if self.half_close > 0:
                            self._closing_deadline = min(
                                self._closing_deadline, trio.current_time() + self.half_close
                            )
                            self._update_deadline()
                        await self._send_close(NORMAL)
                    return
                async with self._sending():
                    if self._closing is not None or self.ws.state is not ConnectionState.OPEN:
                        return
                    await self._send_client(self.ws.send(BytesMessage(data=data)))
