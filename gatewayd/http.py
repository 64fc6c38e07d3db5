"""Plain HTTP requests beside WebSocket (SPEC section 7), as pure functions. No I/O, no trio.

Theory of operation
-------------------
Every request head of a client connection is parsed by
:func:`gatewayd.handshake.parse_request_head` and then dispatched by
:func:`decide_request`: :func:`gatewayd.handshake.route_request` settles
rows 5-7, 9, 9a and 9b, and the route decides the :class:`Kind` of
request:

* a WebSocket upgrade (an ``Upgrade`` header with the ``websocket`` token)
  on a WebSocket route goes through rows 8 and 10-14a
  (:func:`gatewayd.handshake.decide_upgrade`); on a ``static`` route it
  gets 404;
* any other request on an ``http = true`` route is proxied
  (:attr:`Kind.PROXY`); on a ``static`` route GET and HEAD are served
  (:attr:`Kind.STATIC`), other methods get 405; on any other route the
  upgrade rows answer it (405 or 426), as before.

For a proxied request, :func:`request_framing` judges how its body is
framed before a byte of it is read: everything that could make the gateway
and a backend disagree about where a request ends (RFC 9112 section 6.3 and
11.2, "request smuggling") is a 400. :func:`proxy_request_headers` builds
the backend request's headers from the parsed request (never raw client
bytes), and :func:`relayed_response_headers` filters the backend's answer.

Invariants:

* A request reaching :attr:`Kind.PROXY` has exactly one framing: none, one
  ``Content-Length`` of digits, or ``Transfer-Encoding: chunked`` alone.
* Hop-by-hop headers (:data:`gatewayd.handshake.HOP_BY_HOP`, and any named
  in ``Connection``) never cross the gateway in either direction; framing
  headers are set anew for each side.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace

from gatewayd.access import basic_credentials
from gatewayd.config import BasicAuth, GatewaySettings, HostConfig, RouteConfig
from gatewayd.errors import BodyTooLarge, HandshakeRejected
from gatewayd.handshake import (
    Accepted,
    ClientInfo,
    RequestHead,
    client_request_headers,
    decide_upgrade,
    end_to_end_headers,
    forwarding_headers,
    request_host_name,
    route_request,
    split_tokens,
)
from gatewayd.record import Reason
from gatewayd.routing import HostTable, host_from_header, rewrite_target
from gatewayd.static import check_request

#: Methods that may be sent again after a kept-alive backend connection
#: closed before answering (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: Request headers the gateway handles itself and never forwards: it answers
#: ``Expect: 100-continue`` on its own (like nginx), and sets the framing anew.
_NOT_FORWARDED = frozenset({"expect", "content-length", "transfer-encoding"})
#: Response headers replaced by the framing the gateway chooses for the client.
_FRAMING = frozenset({"content-length", "transfer-encoding"})


class Kind(enum.Enum):
    """What a request head is, once its route is known (SPEC section 7)."""

    UPGRADE = "upgrade"   # a WebSocket handshake (rows 8, 10-20)
    PROXY = "proxy"       # a plain request on an ``http = true`` route
    STATIC = "static"     # GET/HEAD on a ``static`` route


def _malformed(detail: str) -> HandshakeRejected:
    return HandshakeRejected(Reason.MALFORMED, detail)


def is_upgrade(request: RequestHead) -> bool:
    """Whether the request asks for a WebSocket (an ``Upgrade`` with the ``websocket`` token)."""
    return any(token.lower() == "websocket" for token in split_tokens(request.get_all("upgrade")))


def kind_of(request: RequestHead, route: RouteConfig) -> Kind:
    """The branch of SPEC section 7 a request on ``route`` takes.

    Raises:
        HandshakeRejected: 404 for an upgrade on a static route, 405 (with
            ``Allow: GET, HEAD``) for another method on a static route.
    """
    if route.static is not None:
        check_request(request.method, request.headers)
        return Kind.STATIC
    if route.http and not is_upgrade(request):
        return Kind.PROXY
    return Kind.UPGRADE


def decide_request(
    request: RequestHead, client: ClientInfo, hosts: HostTable
) -> tuple[Kind, Accepted]:
    """Route a request head and decide what it is (SPEC section 7's order of checks).

    Returns:
        The kind and the accepted request. For :attr:`Kind.UPGRADE` it passed
        rows 8 and 10-14a's pure half; for :attr:`Kind.PROXY` row 14a's pure
        half (``origins`` do not apply to plain requests) and the framing
        checks are still to come (:func:`request_framing`, which needs the
        body limit); ``key`` and ``accept`` are empty for plain requests.

    Raises:
        HandshakeRejected: the first check that fails, carrying its answer
            (``host`` and ``route`` set once known).
    """
    host, route = route_request(request, client, hosts)
    try:
        kind = kind_of(request, route)
        if kind is Kind.UPGRADE:
            accepted = decide_upgrade(request, client, host, route)
        else:
            accepted = plain_accepted(request, host, route)
    except HandshakeRejected as error:
        error.host, error.route = host, route
        raise
    return kind, replace(accepted, subject_headers=hosts.subject_headers)


def plain_accepted(request: RequestHead, host: HostConfig, route: RouteConfig) -> Accepted:
    """A plain request on an ``http``/``static`` route, as an :class:`Accepted`.

    An absolute-form target naming another host than ``Host`` gets 400
    (RFC 9112 section 3.2.2 makes the target win; a proxy in front of us and
    the backend behind us could disagree on which one counts).

    Raises:
        HandshakeRejected: 400 as above; 401 for missing or malformed Basic
            credentials (row 14a's pure half).
    """
    if request.authority is not None:
        names = {host_from_header(value) for value in request.get_all("host")}
        if names != {request_host_name(request)}:
            raise _malformed(
                f"absolute-form target {request.target!r} names another host than Host"
            )
    credentials = None
    if isinstance(route.auth, BasicAuth):
        credentials = basic_credentials(request.get_all("authorization"), route.auth)
    return Accepted(
        request=request,
        host=host,
        route=route,
        target=rewrite_target(route, request.path, request.query),
        key="",
        accept="",
        subprotocols=(),
        extensions=(),
        host_header=request.get_all("host")[0].strip(),
        credentials=credentials,
    )


# --------------------------------------------------------------------------- request body


@dataclass(frozen=True)
class BodyFraming:
    """How a request body is delimited (RFC 9112 section 6).

    Attributes:
        length: the ``Content-Length``, or None (chunked, or no body at all).
        chunked: ``Transfer-Encoding: chunked``.
    """

    length: int | None = None
    chunked: bool = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


def request_framing(request: RequestHead) -> BodyFraming:
    """Judge a plain request's body framing before any of the body is read.

    Raises:
        HandshakeRejected: 400 for ``Content-Length`` beside
            ``Transfer-Encoding`` (RFC 9112 section 6.1 lets a server reject
            it, and it is the classic smuggling vector), more than one
            ``Content-Length`` (even equal ones, also as a list in one line),
            a length that is not digits, any transfer coding other than
            exactly ``chunked``, or a body in an HTTP/1.0 chunked request.
    """
    lengths = request.get_all("content-length")
    codings = request.get_all("transfer-encoding")
    if lengths and codings:
        raise _malformed("both Content-Length and Transfer-Encoding")
    if codings:
        tokens = [t.lower() for t in split_tokens(codings)]
        if tokens != ["chunked"]:
            raise _malformed(f"Transfer-Encoding {codings!r} (only a lone 'chunked' is accepted)")
        if request.http_version != "1.1":
            raise _malformed("Transfer-Encoding in an HTTP/1.0 request")
        return BodyFraming(chunked=True)
    if not lengths:
        return BodyFraming()
    if len(lengths) != 1 or "," in lengths[0]:
        raise _malformed(f"more than one Content-Length {lengths!r}")
    value = lengths[0].strip()
    if not value.isdigit() or not value.isascii() or len(value) > 18:
        raise _malformed(f"Content-Length {value!r} is not a number of bytes")
    return BodyFraming(length=int(value))


def body_limit(route: RouteConfig, settings: GatewaySettings) -> int:
    """The route's ``max_body_size``, else the gateway's (0 = no limit, like nginx)."""
    return route.max_body_size if route.max_body_size is not None else settings.max_body_size


def too_large(limit: int) -> BodyTooLarge:
    """The 413 for a body over ``max_body_size`` (RFC 9110 section 15.5.14)."""
    return BodyTooLarge(limit)


def check_declared_length(framing: BodyFraming, limit: int) -> None:
    """413 before any byte is read (or reaches a backend) when Content-Length says so.

    Raises:
        HandshakeRejected: 413.
    """
    if limit and framing.length is not None and framing.length > limit:
        raise too_large(limit)


# --------------------------------------------------------------------------- headers


def proxy_request_headers(
    accepted: Accepted, client: ClientInfo, framing: BodyFraming
) -> list[tuple[str, str]]:
    """The headers of the request sent to the backend (SPEC section 7, "HTTP proxy").

    The client's Host and end-to-end headers minus hop-by-hop ones (the same
    rules as the upgrade request, :func:`gatewayd.handshake.client_request_headers`),
    the body's framing set anew (``Content-Length`` as the client declared
    it, or ``Transfer-Encoding: chunked``), and the ``X-Forwarded-*`` /
    ``Forwarded`` headers of SPEC section 3. ``Expect`` is not forwarded:
    the gateway answers ``100 Continue`` itself before it reads the body.
    """
    headers = client_request_headers(accepted, client, drop=_NOT_FORWARDED)
    if framing.chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    elif framing.length is not None and (framing.length or _expects_body(accepted.request.method)):
        headers.append(("Content-Length", str(framing.length)))
    headers += forwarding_headers(accepted, client)
    return headers


def _expects_body(method: str) -> bool:
    # RFC 9110 section 8.6: a user agent sends Content-Length: 0 with a POST
    # or PUT that has no body; keep that, drop a meaningless "0" elsewhere.
    return method in ("POST", "PUT", "PATCH")


def relayed_response_headers(
    headers: Iterable[tuple[str, str]], status: int
) -> list[tuple[str, str]]:
    """A backend answer's headers as the client gets them.

    Hop-by-hop headers and those named in ``Connection`` are removed, and so
    is the framing: the backend's ``Content-Length`` is kept (it is what a
    HEAD or 304 must repeat, and it lets the client connection stay open
    for HTTP/1.0 clients) except on 1xx and 204, which never carry one (RFC
    9110 section 8.6); without it h11 re-frames the body as chunked, or as
    close-delimited for an HTTP/1.0 client.
    """
    kept = end_to_end_headers(headers)
    out = [(name, value) for name, value in kept if name.lower() not in _FRAMING]
    lengths = [value for name, value in kept if name.lower() == "content-length"]
    chunked = any(name.lower() == "transfer-encoding" for name, _ in headers)
    if lengths and not chunked and status >= 200 and status != 204:
        out.append(("Content-Length", lengths[0]))
    return out


def wants_keep_alive(request: RequestHead) -> bool:
    """Whether the client lets its connection serve another request (RFC 9112 section 9.3).

    HTTP/1.1: unless it sent ``Connection: close``; HTTP/1.0: only when it
    sent ``Connection: keep-alive``.
    """
    tokens = {token.lower() for token in split_tokens(request.get_all("connection"))}
    if "close" in tokens:
        return False
    if request.http_version == "1.1":
        return True
    return "keep-alive" in tokens


def may_retry(request: RequestHead, framing: BodyFraming) -> bool:
    """Whether a request may be sent again on a fresh backend connection when a
    kept-alive one closed before answering (RFC 9112 section 9.3.1): an
    idempotent method without a body."""
    return request.method in IDEMPOTENT_METHODS and not framing.has_body



# --------------------------------------------------------------------------- chunk sizes

#: The largest chunk size taken (nginx's ``NGX_MAX_OFF_T_VALUE``): anything
#: above cannot be a real body, only an attempt to make the gateway wait.
MAX_CHUNK_SIZE = 2**63 - 1

#: Bytes of a chunk-size line (size and extensions) looked at; a longer line
#: is left to h11, which bounds it.
MAX_CHUNK_LINE = 4096


class ChunkSizes:
    """The declared sizes of a chunked request body, judged before its data is awaited.

    h11 reads a chunked body for us but does not tell how large the chunk
    it is in the middle of was declared to be, so a chunk header announcing
    more than ``max_body_size`` (or an absurd 2**80) would only be noticed
    once that many bytes came, that is, never: the gateway would wait for a
    client that is not going to send them. This follows the same bytes h11
    is fed (the grammar of h11's ``ChunkedReader``: a size of 1-20 hex
    digits, ``;`` extensions, optional trailing blanks, CRLF; each chunk's
    data then CRLF; a zero size ends it) and keeps the first verdict in
    :attr:`error`: 413 once the declared sizes add up to more than
    ``limit``, 400 for one over :data:`MAX_CHUNK_SIZE`. Anything it cannot
    follow (a malformed line, a wrong chunk end) it stops at, for h11 to
    reject with its own 400.

    Attributes:
        limit: ``max_body_size`` (0 = none).
        declared: the sum of the chunk sizes seen so far.
        error: the rejection due, once one is.
    """

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.declared = 0
        self.error: HandshakeRejected | None = None
        self._line = bytearray()
        self._in_chunk = 0  # data bytes of the current chunk still to skip
        self._footer = b""  # the CRLF after a chunk's data still to skip
        self._stopped = False  # last chunk seen, or bytes h11 will reject

    def set_limit(self, limit: int) -> None:
        """Apply ``limit`` to what was declared so far, too."""
        self.limit = limit
        self._judge()

    def feed(self, data: bytes) -> None:
        """Follow ``data``, the next bytes of the body as h11 gets them."""
        view = memoryview(data)
        while view and not self._stopped and self.error is None:
            if self._footer:
                taken = bytes(view[: len(self._footer)])
                if taken != self._footer[: len(taken)]:
                    self._stopped = True
                    return
                self._footer = self._footer[len(taken) :]
                view = view[len(taken) :]
            elif self._in_chunk:
                taken_len = min(self._in_chunk, len(view))
                self._in_chunk -= taken_len
                view = view[taken_len:]
                if not self._in_chunk:
                    self._footer = b"\r\n"
            else:
                view = self._size_line(view)

    def _size_line(self, view: memoryview) -> memoryview:
        # A "\r\n" may straddle two feeds: look from one byte before the new ones.
        start = max(0, len(self._line) - 1)
        self._line += view
        end = self._line.find(b"\r\n", start)
        if end < 0:
            if len(self._line) > MAX_CHUNK_LINE:
                self._stopped = True
            return view[len(view) :]
        rest = memoryview(bytes(self._line[end + 2 :]))
        line = bytes(self._line[:end])
        self._line.clear()
        size = _chunk_size(line)
        if size is None or size == 0:
            # Malformed (h11's 400) or the last chunk (trailers follow).
            self._stopped = True
            return rest
        if size > MAX_CHUNK_SIZE:
            self.error = HandshakeRejected(Reason.BAD_BODY, f"chunk size {size:#x} is absurd")
            return rest
        self.declared += size
        self._in_chunk = size
        self._judge()
        return rest

    def _judge(self) -> None:
        if self.error is None and self.limit and self.declared > self.limit:
            self.error = too_large(self.limit)


_HEX = frozenset(b"0123456789abcdefABCDEF")


def _chunk_size(line: bytes) -> int | None:
    """A chunk-size line's size (without its CRLF), or None where h11 would reject it."""
    if b"\n" in line:
        return None
    size, _, _extensions = line.partition(b";")
    if b";" not in line:
        size = size.rstrip(b" \t")
    if not 1 <= len(size) <= 20 or not all(c in _HEX for c in size):
        return None
    return int(size, 16)
