"""One plain HTTP request and its response on a client connection, over h11.

Theory of operation
-------------------
The request loop (:mod:`gatewayd.connection`) reads each request head
itself (bounded by ``handshake_timeout`` and ``max_request_head``) and parses
it with :func:`gatewayd.handshake.parse_request_head`. A plain request on an
``http`` or ``static`` route then gets an :class:`Exchange`: a fresh
``h11.Connection`` in the server role, fed the head and whatever the client
sent after it. h11 delimits the body (Content-Length or chunked, rejecting
bad chunk sizes), frames our response (Content-Length or chunked, no body
for HEAD/204/304, close-delimited for HTTP/1.0) and, once both are done,
hands back the bytes after the request (``trailing_data``): the start of the
next request, which the loop reads on from. Requests are thus answered
strictly in order, and pipelined bytes are never part of a body.

A fresh h11 connection per request, rather than one per client
connection, is what lets an HTTP/1.0 client that asked for keep-alive keep
its connection (h11 itself closes every HTTP/1.0 connection): for such a
client, when the answer's length is known, the response is written by a
second h11 connection primed with an HTTP/1.1 request of the same method,
so the status line says ``HTTP/1.1`` (SPEC section 7) and
``Connection: keep-alive`` is kept.

Every read from and write to the client is bounded by ``io_timeout``
(``http_timeout``, as nginx's ``client_body_timeout`` and ``send_timeout``):
a client that stops reading or sending ends its connection, never the
gateway. Memory is bounded: h11 holds at most one receive of
:data:`RECEIVE_SIZE` bytes beyond what the caller took.

Users: :mod:`gatewayd.httpproxy` (``http = true``) and :mod:`gatewayd.static`.
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence

import h11
import trio

from gatewayd.errors import ClientDisconnected, HandshakeRejected, PeerError
from gatewayd.handshake import REASONS, RequestHead, render_refusal
from gatewayd.http import ChunkSizes, wants_keep_alive
from gatewayd.record import Reason

#: Bytes asked of the client stream per read.
RECEIVE_SIZE = 65536


def http_date() -> str:
    """The current time as an HTTP date (RFC 9110 section 5.6.7)."""
    return email.utils.formatdate(usegmt=True)


def _bad_body(detail: str) -> HandshakeRejected:
    return HandshakeRejected(Reason.BAD_BODY, detail)


class Exchange:
    """One request/response on the client connection (h11, server role).

    Attributes:
        request: the parsed request head.
        status: the status of the response sent (None until its head is out).
        bytes_in: bytes received from the client for this request (head included).
        bytes_out: bytes sent to the client for this request.
        keep_alive: the connection may serve another request after this one
            (cleared by ``Connection: close``, an HTTP/1.0 client that did not
            ask for keep-alive, an unread body, a rejection or a failure).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        head: bytes,
        rest: bytes,
        request: RequestHead,
        *,
        io_timeout: float,
        server_header: str = "",
    ) -> None:
        self.stream = stream
        self.request = request
        self.io_timeout = io_timeout
        self.server_header = server_header
        self.status: int | None = None
        #: The gateway-made error answer this request got, if any (its access line says why).
        self.refusal: PeerError | None = None
        self.bytes_in = len(head) + len(rest)
        self.bytes_out = 0
        self.keep_alive = wants_keep_alive(request)
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
        self._conn.receive_data(head + rest)
        #: The declared chunk sizes of a chunked body, followed on the bytes
        #: h11 is fed, so an absurd or over-limit one is refused before its
        #: data is waited for (h11 does not expose them).
        self._chunks: ChunkSizes | None = None
        if request.get_all("transfer-encoding"):
            self._chunks = ChunkSizes()
            self._chunks.feed(rest)
        event = self._conn.next_event()
        # parse_request_head accepted these very bytes with h11: same verdict.
        assert isinstance(event, h11.Request), event
        self._writer = self._conn
        #: Answer bytes not sent yet (``flush=False``): a head and the body
        #: piece that came with it go out in one write (one TLS record, no
        #: Nagle wait between them).
        self._out = bytearray()
        self._continue_sent = False
        self._body_done = False
        lengths = request.get_all("content-length")
        if not request.get_all("transfer-encoding") and all(v.strip() == "0" for v in lengths):
            # No body: h11's next event is the request's end, no I/O needed.
            end = self._conn.next_event()
            assert isinstance(end, h11.EndOfMessage), end
            self._body_done = True

    # ------------------------------------------------------------------ state

    @property
    def head_sent(self) -> bool:
        """Whether the response head went out (after it, a failure closes the connection)."""
        return self.status is not None

    @property
    def http10(self) -> bool:
        return self.request.http_version != "1.1"

    @property
    def waiting_for_continue(self) -> bool:
        """The client sent ``Expect: 100-continue`` and waits for our 100 before its body."""
        return self._conn.they_are_waiting_for_100_continue and not self._continue_sent

    @property
    def continue_sent(self) -> bool:
        return self._continue_sent

    def leftover(self) -> bytes | None:
        """The bytes after this request (the next one's start), or None: close the connection.

        Only once the request was read to its end, the response was sent
        whole, and nothing asked for the connection to close.
        """
        if not self.keep_alive or not self._body_done:
            return None
        if self._writer.our_state is not h11.DONE:
            return None
        data, closed = self._conn.trailing_data
        if closed:
            return None
        return bytes(data)

    # ------------------------------------------------------------------ reading

    def limit_body(self, limit: int) -> None:
        """Refuse (413, on the next :meth:`receive_data`) a chunked body declaring more than ``limit``.

        A Content-Length over it is refused from the head
        (:func:`gatewayd.http.check_declared_length`); this is the same for
        chunk sizes, as they are read, before their data is awaited.
        """
        if self._chunks is not None:
            self._chunks.set_limit(limit)

    async def receive_data(self) -> bytes | None:
        """The next piece of the request body, or None at its end.

        Raises:
            HandshakeRejected: 400 for a malformed body (bad chunk size, a
                body cut short by the client's EOF).
            ClientDisconnected: the client reset, closed or stalled for ``io_timeout``.
        """
        while True:
            if self._body_done:
                return None
            if self._chunks is not None and self._chunks.error is not None:
                # Refused on its declared chunk sizes: no byte of it is
                # handed on, none more is awaited.
                self.keep_alive = False
                raise self._chunks.error
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.keep_alive = False
                raise _bad_body(f"h11: {exc}") from None
            if event is h11.NEED_DATA:
                data = await self._receive()
                self.bytes_in += len(data)
                if self._chunks is not None:
                    self._chunks.feed(data)
                self._conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                self._body_done = True
                return None
            # ConnectionClosed / PAUSED cannot come before EndOfMessage.
            self.keep_alive = False
            raise _bad_body(f"unexpected {type(event).__name__} in the request body")

    async def drain_body(self) -> None:
        """Read (and drop) the rest of the request body, for an answer sent before it."""
        while await self.receive_data() is not None:
            pass

    async def _receive(self) -> bytes:
        try:
            with trio.fail_after(self.io_timeout):
                data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
        except trio.TooSlowError:
            self.keep_alive = False
            raise ClientDisconnected(f"no request body data for {self.io_timeout:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.keep_alive = False
            raise ClientDisconnected(f"reset while sending its request: {exc}") from None
        if not data:
            # h11 makes a body cut short a protocol error on the next event.
            self.keep_alive = False
        return data

    # ------------------------------------------------------------------ writing

    async def send_continue(self) -> None:
        """``100 Continue`` (RFC 9110 section 10.1.1), when the client waits for it."""
        if self.waiting_for_continue:
            self._continue_sent = True
            event = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            await self._send(self._conn.send(event))

    async def send_informational(
        self, status: int, headers: Sequence[tuple[str, str]], reason: bytes = b""
    ) -> None:
        """Relay a 1xx answer (never to an HTTP/1.0 client: RFC 9110 section 15.2)."""
        if self.http10 or self.head_sent:
            return
        if status == 100:
            self._continue_sent = True
        # A backend's empty reason phrase gets the standard one, as on final answers.
        reason = reason or REASONS.get(status, "").encode("ascii")
        event = h11.InformationalResponse(status_code=status, headers=list(headers), reason=reason)
        await self._send(self._conn.send(event))

    async def send_head(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        reason: bytes = b"",
        own: bool = False,
        flush: bool = True,
    ) -> None:
        """Send the response head; the body follows with :meth:`send_data`, then :meth:`end`.

        Args:
            headers: end-to-end headers; a ``Content-Length`` among them frames
                the body, else h11 chunks it (or closes after it, HTTP/1.0).
            own: a response the gateway makes itself (static files): it gets
                our ``Server`` header.
            flush: False to hold the bytes until the next write or :meth:`flush`.
        """
        out = list(headers)
        names = {name.lower() for name, _ in out}
        if "date" not in names:
            out.append(("Date", http_date()))
        if own and self.server_header and "server" not in names:
            out.insert(0, ("Server", self.server_header))
        if not self._body_done and self.request.method != "HEAD":
            # Answered before the whole body was read: the next request's
            # start is unknown, the connection ends with this answer.
            self.keep_alive = False
        if self.http10 and self.keep_alive:
            if "content-length" in names or status in (204, 304) or self.request.method == "HEAD":
                self._writer = _http11_writer(self.request.method)
                out.append(("Connection", "keep-alive"))
            else:
                self.keep_alive = False   # close-delimited body (RFC 9112 section 6.3)
        if not self.keep_alive:
            out.append(("Connection", "close"))
        if not reason:
            reason = REASONS.get(status, "").encode("ascii")
        data = self._writer.send(h11.Response(status_code=status, headers=out, reason=reason))
        self.status = status
        await self._send(data, flush)

    async def send_data(self, data: bytes, *, flush: bool = True) -> None:
        if data:
            await self._send(self._writer.send(h11.Data(data=data)), flush)

    async def end(self, *, flush: bool = True) -> None:
        """End the response body."""
        await self._send(self._writer.send(h11.EndOfMessage()), flush)

    async def flush(self) -> None:
        """Send what ``flush=False`` writes held back."""
        await self._send(b"", True)

    async def reject(self, error: PeerError) -> None:
        """A gateway-made error answer, the error's row of :data:`~gatewayd.errors.ANSWERS`.

        SPEC section 3's form (``Connection: close``). Only before the
        response head went out; after it the caller closes the connection
        instead (no error in the middle of a body). ``refusal`` keeps it for
        the request's access line.
        """
        assert not self.head_sent, "a rejection after the response head"
        answer = render_refusal(error, server_header=self.server_header, date=http_date())
        assert answer is not None and error.status is not None, "a request refusal has an answer"
        self.keep_alive = False
        self.status = error.status
        self.refusal = error
        await self._send(answer)

    async def _send(self, data: bytes | None, flush: bool = True) -> None:
        if data:
            self._out += data
        if not flush or not self._out:
            return
        data, self._out = bytes(self._out), bytearray()
        try:
            with trio.fail_after(self.io_timeout):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            self.keep_alive = False
            raise ClientDisconnected(f"did not read its answer for {self.io_timeout:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.keep_alive = False
            raise ClientDisconnected(f"reset while receiving its answer: {exc}") from None
        self.bytes_out += len(data)


def _http11_writer(method: str) -> h11.Connection:
    """An h11 server connection that believes it got ``method`` over HTTP/1.1.

    For an HTTP/1.0 client that asked for keep-alive (see the module
    docstring): h11 frames the response for the real request's method and
    keeps our ``Connection: keep-alive``.
    """
    writer = h11.Connection(h11.SERVER)
    writer.receive_data(f"{method} / HTTP/1.1\r\nHost: keep-alive\r\n\r\n".encode("ascii"))
    request = writer.next_event()
    end = writer.next_event()
    assert isinstance(request, h11.Request) and isinstance(end, h11.EndOfMessage)
    return writer
