"""The RFC 6455 server opening handshake, as pure functions. No I/O, no trio.

Theory of operation
-------------------
The server reads one request head (never a body) and feeds it to
:func:`parse_request_head`, which uses h11 to parse it; :func:`decide` then
applies the checks of SPEC section 3 in order, each raising
:class:`~gatewayd.errors.HandshakeRejected` carrying the answer to send.
Rows 1-4 (TLS, timeouts and the head size) belong to the I/O layer; rows
5-14a are here, with the access rows (9a redirect, 9b address lists, the
Basic-credentials half of 14a) delegated to :mod:`gatewayd.access`. The rest
of row 14a (checking a password, asking a forward-auth service) is I/O:
:mod:`gatewayd.auth` does it after :func:`decide`, before a backend is
chosen (row 15) and connected to. An accepted request yields an
:class:`Accepted` holding the route and everything needed to talk to the
backend:
:func:`build_backend_request` renders the upgrade request sent on (RFC 6455
section 4.1 from the backend's point of view), and :func:`check_backend_response`
validates the backend's 101 the way a client must (section 4.1, the
"If the response lacks ..." steps) before :func:`render_switching_protocols`
renders our own 101 (section 4.2.2 step 5).

Invariants:

* Every byte of every header value we send comes either from h11-validated
  client input (no CR, LF or NUL) or from our validated configuration, so a
  header injection is impossible by construction; :func:`_header_line` checks
  again anyway.
* The ``Sec-WebSocket-Accept`` value is computed over the key exactly as the
  client sent it, without surrounding whitespace (h11 strips it) and without
  the line's CR.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import h11

from gatewayd.access import (
    BasicCredentials,
    basic_credentials,
    check_addresses,
    redirect_rejection,
)
from gatewayd.config import (
    BRIDGE_DEFAULT_SUBPROTOCOL,
    BasicAuth,
    ForwardAuth,
    HostConfig,
    RouteConfig,
)
from gatewayd.errors import (
    AuthDenied,
    BackendBadUpgrade,
    BackendRefusedUpgrade,
    HandshakeRejected,
    PeerError,
)
from gatewayd.headers import CLIENT_ADDRESS_HEADERS, HOP_BY_HOP
from gatewayd.record import Reason
from gatewayd.routing import (
    HostTable,
    host_from_header,
    normalize_path,
    rewrite_target,
    select_route,
)

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Reason phrases for every status the gateway itself sends (RFC 9110 section 15).
REASONS: dict[int, str] = {
    101: "Switching Protocols",
    200: "OK",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    307: "Temporary Redirect",
    304: "Not Modified",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    412: "Precondition Failed",
    413: "Content Too Large",
    416: "Range Not Satisfiable",
    421: "Misdirected Request",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

# Headers the gateway sets itself on the backend request; a client's copies are dropped.
_REPLACED_ON_FORWARD = frozenset(
    {
        "host",
        "content-length",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
    }
) | CLIENT_ADDRESS_HEADERS

# Headers of the backend's answers that we set ourselves on what we relay.
_REPLACED_ON_RELAY = frozenset(
    {
        "content-length",
        "sec-websocket-accept",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
    }
)

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# The end of a head: a line break followed by an empty line, CRLF or bare LF.
_BLANK_LINE_RE = re.compile(rb"\r?\n\r?\n")
# Control characters no header value may hold (RFC 9110 section 5.5: field-vchar
# is VCHAR / obs-text; only SP and HTAB are allowed besides).
_CTL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: Most header lines a request head may have (nginx/Apache use 100 too): 431 above.
MAX_HEADER_LINES = 100
#: Longest single line of a request head, CRLF excluded (nginx's
#: large_client_header_buffers default): 431 above. Only matters when
#: ``max_request_head`` is raised above it.
MAX_HEADER_LINE = 8192


# h11's grammar (h11/_abnf.py, RFC 9110/9112), for the heads parsed without it
# (the usual request head, a backend's plain 101): a head is taken only when
# h11 would parse it to the same event; any other goes to h11.
_H11_OWS = rb"[ \t]*"
_H11_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_H11_FIELD_VCHAR = rb"[^\x00\s]"
_H11_FIELD_CONTENT = _H11_FIELD_VCHAR + rb"+(?:[ \t]+" + _H11_FIELD_VCHAR + rb"+)*"
_H11_HEADER_FIELD_RE = re.compile(
    rb"(?P<name>" + _H11_TOKEN + rb"):" + _H11_OWS
    + rb"(?P<value>(?:" + _H11_FIELD_CONTENT + rb")?)" + _H11_OWS
)
_H11_REQUEST_LINE_RE = re.compile(
    rb"(?P<method>" + _H11_TOKEN + rb") (?P<target>[\x21-\x7e]+) HTTP/(?P<version>1\.[01])"
)
# "HTTP/1.1 101", then optionally a space and the reason phrase.
_H11_STATUS_101_RE = re.compile(rb"HTTP/1\.1 101(?: (?P<reason>(?:[ \t]|" + _H11_FIELD_VCHAR + rb")*))?")

# --------------------------------------------------------------------------- head


def find_head_end(buffer: bytes | bytearray) -> int | None:
    """Index just past the blank line ending the request head, or None if incomplete.

    Accepts CRLF and, as h11 does, bare LF line endings. Leading empty lines
    before the request line are skipped (RFC 9112 section 2.2).
    """
    start = 0
    while buffer.startswith(b"\r\n", start) or buffer.startswith(b"\n", start):
        start += 2 if buffer.startswith(b"\r\n", start) else 1
    match = _BLANK_LINE_RE.search(buffer, start)
    return match.end() if match else None


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request head.

    ``headers`` keeps the client's order and name case; ``get``/``get_all``
    compare names case-insensitively.
    """

    method: str
    target: str
    path: str
    query: str | None
    headers: tuple[tuple[str, str], ...]
    authority: str | None = None   # from an absolute-form target (RFC 9112 3.2.2)
    http_version: str = "1.1"      # "1.1" or "1.0" (1.0 only reaches http/static routes)
    #: The values by lowercase name, in order (made once: the decision asks
    #: for a dozen headers of every request).
    _by_name: dict[str, list[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, list[str]] = {}
        for name, value in self.headers:
            lowered = name.lower()
            values = by_name.get(lowered)
            if values is None:
                by_name[lowered] = [value]
            else:
                values.append(value)
        object.__setattr__(self, "_by_name", by_name)

    def get_all(self, name: str) -> list[str]:
        values = self._by_name.get(name.lower())
        return list(values) if values is not None else []

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None


def _malformed(detail: str) -> HandshakeRejected:
    return HandshakeRejected(Reason.MALFORMED, detail)


def parse_request_head(head: bytes) -> RequestHead:
    """Parse one complete request head (as delimited by :func:`find_head_end`).

    Raises:
        HandshakeRejected: 431 for more than :data:`MAX_HEADER_LINES` header
            lines or a line longer than :data:`MAX_HEADER_LINE` bytes (row 4,
            before any parsing); 400 for anything malformed (SPEC row 5): a
            bad request line or header syntax, obs-fold, NUL/CR/LF in a
            value, a duplicate Host, a missing Host, an HTTP version other
            than 1.1 or 1.0, a request-target that is not origin-form or
            absolute-form. HTTP/1.0 is refused by :func:`decide` (row 5)
            unless the route serves plain HTTP (SPEC section 7).
    """
    head = head.lstrip(b"\r\n")
    lines = head.split(b"\n")
    _check_lines(lines)
    parsed = _plain_request(lines)
    method, target, http_version, headers = parsed if parsed is not None else _h11_request(head)
    form = _target_form(method, target)
    if form is None:
        # Well-formed asterisk- and authority-form requests (RFC 9112 3.2.3,
        # 3.2.4): not malformed, just not a WebSocket handshake -> row 8 (405).
        return RequestHead(
            method=method,
            target=target,
            path=target,
            query=None,
            headers=headers,
            http_version=http_version,
        )
    authority, path_and_query = form
    if "#" in path_and_query:
        raise _malformed("fragment in request-target")
    raw_path, sep, query = path_and_query.partition("?")
    path = normalize_path(raw_path)
    if path is None:
        raise _malformed(f"invalid percent-encoding in the path {raw_path!r}")
    return RequestHead(
        method=method,
        target=target,
        path=path,
        query=query if sep else None,
        headers=headers,
        authority=authority,
        http_version=http_version,
    )


def _check_lines(lines: list[bytes]) -> None:
    """What h11 would accept but we refuse, checked on the raw lines first.

    Row 4 (too many or too long lines: 431), then row 5's obs-fold and
    repeated Content-Length (400).
    """
    # The head ends with an empty line (two when it ends with CRLF CRLF: the
    # split leaves a last empty piece); the first line is the request line.
    header_lines = sum(1 for line in lines[1:] if line.rstrip(b"\r"))
    if header_lines > MAX_HEADER_LINES:
        raise HandshakeRejected(
            Reason.TOO_MANY_HEADERS, f"{header_lines} header lines (at most {MAX_HEADER_LINES})"
        )
    longest = max(len(line) for line in lines)
    if longest > MAX_HEADER_LINE + 1:  # + the CR of CRLF
        raise HandshakeRejected(
            Reason.HEADER_LINE_TOO_LONG, f"a line of {longest} bytes (at most {MAX_HEADER_LINE})"
        )
    # h11 unfolds obs-fold continuation lines; RFC 9112 section 5.2 lets a
    # server reject them with 400 instead, which SPEC row 5 asks for.
    lengths = 0
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise _malformed("obs-fold continuation line in the request head")
        field_name, colon, field_value = line.partition(b":")
        if colon and field_name.lower() == b"content-length":
            lengths += 1 + field_value.count(b",")
    if lengths > 1:
        # h11 merges equal lengths into one; a proxy must not (RFC 9112
        # section 6.3: a repeated length is a smuggling vector), so 400.
        raise _malformed("more than one Content-Length")


def _h11_request(head: bytes) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """h11's parse of the head: (method, target, HTTP version, headers), row 5 checked."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise _malformed(f"h11: {_without_data(exc)}") from None
    if not isinstance(event, h11.Request):
        raise _malformed("incomplete request head")
    if event.http_version not in (b"1.1", b"1.0"):
        raise _malformed(f"HTTP/{event.http_version.decode('ascii', 'replace')} is not HTTP/1.1")
    try:
        method = event.method.decode("ascii")
        target = event.target.decode("ascii")
        headers = tuple(
            (name.decode("ascii"), value.decode("latin-1"))
            for name, value in event.headers.raw_items()
        )
    except UnicodeDecodeError:
        raise _malformed("non-ASCII request line") from None
    for name, value in headers:
        if _CTL_RE.search(value):
            raise _malformed(f"control character in the {name} header")
    return method, target, event.http_version.decode("ascii"), headers


def _plain_request(lines: list[bytes]) -> tuple[str, str, str, tuple[tuple[str, str], ...]] | None:
    """:func:`_h11_request`'s result without h11, for a head h11 accepts as is.

    ``lines`` are the head split at LF (the last two empty, :func:`_check_lines`
    passed). Only the plain case: a request line and header lines each
    matching h11's own grammar (``request_line``, ``header_field``), HTTP/1.1
    with one Host or HTTP/1.0 with at most one, no Content-Length or
    Transfer-Encoding (h11 validates and merges those). h11 parses such a
    head to exactly these values; None for anything else, which goes to h11
    (same verdict, same error text).

    Raises:
        HandshakeRejected: 400 for a control character in a value, as
            :func:`_h11_request` (after h11 accepted the head).
    """
    if len(lines) < 3 or lines[-1] or lines[-2] not in (b"", b"\r"):
        return None
    first = lines[0]
    request = _H11_REQUEST_LINE_RE.fullmatch(first[:-1] if first.endswith(b"\r") else first)
    if request is None:
        return None
    version = request["version"]
    headers: list[tuple[str, str]] = []
    hosts = 0
    for line in lines[1:-2]:
        if line.endswith(b"\r"):
            line = line[:-1]
        header = _H11_HEADER_FIELD_RE.fullmatch(line)
        if header is None:
            return None
        name = header["name"].decode("ascii")
        lowered = name.lower()
        if lowered == "host":
            hosts += 1
        elif lowered in ("content-length", "transfer-encoding"):
            return None
        headers.append((name, header["value"].decode("latin-1")))
    if hosts > 1 or (hosts == 0 and version == b"1.1"):
        return None   # h11 refuses both, in its words
    for name, value in headers:
        if _CTL_RE.search(value):
            raise _malformed(f"control character in the {name} header")
    return request["method"].decode("ascii"), request["target"].decode("ascii"), version.decode(), tuple(headers)


def _target_form(method: str, target: str) -> tuple[str | None, str] | None:
    """(authority, path and query) of an origin- or absolute-form target.

    None for a well-formed asterisk- or authority-form target (``OPTIONS *``,
    ``CONNECT host:port``).

    Raises:
        HandshakeRejected: 400 for any other target.
    """
    if target.startswith("/"):
        return None, target
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", target):
        # absolute-form (RFC 9112 section 3.2.2): a server must accept it, and
        # its authority takes the place of Host.
        after_scheme = target.split("://", 1)[1]
        slash = after_scheme.find("/")
        question = after_scheme.find("?")
        cut = min(i for i in (slash, question, len(after_scheme)) if i >= 0)
        path_and_query = after_scheme[cut:]
        if not path_and_query.startswith("/"):
            path_and_query = "/" + path_and_query
        return after_scheme[:cut], path_and_query
    if (method == "OPTIONS" and target == "*") or (
        method == "CONNECT" and re.match(r"^[^/?#\s]+:\d+$", target)
    ):
        return None
    # (the path only: a query string may carry a token, and detail is logged)
    raise _malformed(f"request-target {target.partition('?')[0]!r} is not origin-form")


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What the I/O layer knows about the connection a request arrived on.

    Attributes:
        address: the client's IP address (from the PROXY header on a
            ``proxy_protocol`` listener, else the TCP peer's).
        port: the client's source port.
        tls: True on a TLS listener.
        tls_host: on a TLS listener, the host the TLS handshake chose by SNI.
        server_name: the SNI the client sent, if any.
        trusted_proxy: ``address`` is in ``[gateway] trusted_proxies``: its
            X-Forwarded-For and Forwarded are extended, not replaced.
        client_subject: on a host with ``client_ca``, the verified client
            certificate's subject (RFC 4514, printable ASCII).
    """

    address: str
    port: int
    tls: bool
    tls_host: HostConfig | None = None
    server_name: str | None = None
    trusted_proxy: bool = False
    client_subject: str | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """A request that passed every check up to the backend connection.

    Attributes:
        request: the parsed request head.
        host: the virtual host.
        route: the matched route.
        target: the request-target for the backend (path rewritten, query kept).
        key: the client's Sec-WebSocket-Key, exactly as sent.
        accept: the Sec-WebSocket-Accept value for ``key``.
        subprotocols: the client's offer after the route's filter (client order).
        extensions: the extension offers forwarded (empty when the route strips them).
        host_header: the client's Host header value, as sent.
        credentials: for ``auth = "basic"``, the well-formed credentials
            still to be verified (row 14a, by :mod:`gatewayd.auth`).
        auth_headers: for ``auth = "request"``, the headers the service's
            2xx answer gave, sent to the backend in place of any client copy.
    """

    request: RequestHead
    host: HostConfig
    route: RouteConfig
    target: str
    key: str
    accept: str
    subprotocols: tuple[str, ...]
    extensions: tuple[str, ...]
    host_header: str
    credentials: BasicCredentials | None = None
    auth_headers: tuple[tuple[str, str], ...] = ()
    subject_headers: frozenset[str] = frozenset()   # every host's client_subject_header


def accept_value(key: str) -> str:
    """Sec-WebSocket-Accept for ``key`` (RFC 6455 section 4.2.2, step 5.4)."""
    digest = hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def split_tokens(values: Iterable[str]) -> list[str]:
    """The comma-separated list elements of one or more header values (RFC 9110 5.6.1)."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item:
                out.append(item)
    return out


def _has_token(values: Iterable[str], token: str) -> bool:
    return any(item.lower() == token for item in split_tokens(values))


def _key_is_valid(key: str) -> bool:
    # RFC 6455 section 4.1 step 7: a base64-encoded 16-byte nonce (24 characters).
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


def extension_name(offer: str) -> str:
    """The extension token of one Sec-WebSocket-Extensions element (before ';')."""
    return offer.split(";", 1)[0].strip().lower()


def split_extensions(values: Iterable[str]) -> list[str]:
    """Extension elements of Sec-WebSocket-Extensions values (commas outside quotes split)."""
    out: list[str] = []
    for value in values:
        current: list[str] = []
        quoted = False
        for ch in value:
            if ch == '"':
                quoted = not quoted
            if ch == "," and not quoted:
                item = "".join(current).strip()
                if item:
                    out.append(item)
                current = []
            else:
                current.append(ch)
        item = "".join(current).strip()
        if item:
            out.append(item)
    return out


def decide(request: RequestHead, client: ClientInfo, hosts: HostTable) -> Accepted:
    """Apply SPEC section 3 rows 5-14a to a WebSocket handshake, in SPEC section 7's order.

    :func:`route_request` first (rows 5-7, 9, 9a, 9b), then
    :func:`decide_upgrade` (rows 5's HTTP/1.0, 8, 10-14a). Row 14a is decided
    here only as far as it is pure: for ``auth = "basic"`` missing or
    malformed credentials get their 401 here, and well-formed ones travel in
    :attr:`Accepted.credentials` to be verified by :mod:`gatewayd.auth`,
    which also asks forward-auth services. Requests on ``http``/``static``
    routes are dispatched by :func:`gatewayd.http.decide_request`.

    Raises:
        HandshakeRejected: the first check that fails, carrying its answer.
    """
    host, route = route_request(request, client, hosts)
    try:
        accepted = decide_upgrade(request, client, host, route)
    except HandshakeRejected as error:
        # The access log names the route even when the answer is a rejection.
        error.host, error.route = host, route
        raise
    return replace(accepted, subject_headers=hosts.subject_headers)


def request_host_name(request: RequestHead) -> str:
    """The host name a request is for: its one Host header, or an absolute-form
    target's authority, which replaces it (RFC 9112 section 3.2.2).

    Raises:
        HandshakeRejected: 400 for a missing, repeated or malformed Host.
    """
    host_values = request.get_all("host")
    if len(host_values) != 1:
        raise _malformed("missing or repeated Host header")
    name = host_from_header(host_values[0])
    if name is None:
        raise _malformed(f"malformed Host header {host_values[0]!r}")
    if request.authority is not None:
        authority_name = host_from_header(request.authority)
        if authority_name is None:
            raise _malformed(f"malformed authority in request-target {request.target!r}")
        name = authority_name
    return name


def route_request(
    request: RequestHead, client: ClientInfo, hosts: HostTable
) -> tuple[HostConfig, RouteConfig]:
    """Rows 5-7 (Host), the route (row 9), then rows 9a and 9b: SPEC section 7's order.

    An asterisk-form (``OPTIONS *``) or authority-form (``CONNECT``) request
    names no resource of ours: row 8's 405, before any route is looked up.

    Raises:
        HandshakeRejected: the first check that fails (``host`` and ``route``
            set on it once known, for the access log).
    """
    name = request_host_name(request)

    # Rows 6 and 7: which virtual host.
    if client.tls:
        host = client.tls_host
        assert host is not None, "TLS connections always have an SNI-selected host"
        # Misdirected unless Host names the same virtual host TLS chose. A Host
        # that names no host at all is accepted only when TLS itself fell back
        # to the default host (no SNI, e.g. a client connecting to an IP
        # address, or an SNI naming no host): then it has nothing to contradict.
        found_by_host = hosts.find(name)
        sni_matched = hosts.find(client.server_name) is host
        fallback = found_by_host is None and not sni_matched and host is hosts.default
        if found_by_host is not host and not fallback:
            raise HandshakeRejected(
                Reason.SNI_HOST_MISMATCH,
                f"Host {name!r} is not served by the host chosen by SNI "
                f"{client.server_name!r} ({host.key_path})",
            )
    else:
        found = hosts.lookup(name)
        if found is None:
            raise HandshakeRejected(Reason.UNKNOWN_HOST, f"Host {name!r} names no host")
        host = found

    if not request.path.startswith("/"):
        # OPTIONS * and CONNECT host:port (RFC 9112 3.2.3, 3.2.4): row 8.
        raise HandshakeRejected(Reason.TARGET_FORM, f"{request.method} {request.target}")

    # Row 9.
    route = select_route(host, request.path)
    if route is None:
        raise HandshakeRejected(Reason.NO_ROUTE, f"no route for {request.path!r}")
    try:
        # Row 9a (RFC 6455 section 4.2.2 step 3: the server may redirect the client).
        if route.redirect is not None:
            raise redirect_rejection(route, request.path, request.query)
        # Row 9b: the host's allow/deny, then the route's.
        check_addresses(host, route, client.address)
    except HandshakeRejected as error:
        error.host, error.route = host, route
        raise
    return host, route


def decide_upgrade(
    request: RequestHead, client: ClientInfo, host: HostConfig, route: RouteConfig
) -> Accepted:
    """Rows 5 (HTTP/1.0), 8 and 10-14a, once :func:`route_request` chose the route."""
    if request.http_version != "1.1":
        # A WebSocket handshake needs HTTP/1.1 (RFC 6455 section 4.1 step 2).
        raise _malformed(f"HTTP/{request.http_version} is not HTTP/1.1")

    # Row 8.
    if request.method != "GET":
        raise HandshakeRejected(Reason.METHOD, f"method {request.method}")

    # Row 10: a handshake never has a body (RFC 6455 section 4.1 step 2 is a plain GET).
    if request.get_all("transfer-encoding"):
        raise HandshakeRejected(Reason.REQUEST_BODY, "request with Transfer-Encoding (a body)")
    for length in request.get_all("content-length"):
        if length.strip() != "0":
            raise HandshakeRejected(Reason.REQUEST_BODY, "request with a body (Content-Length > 0)")

    # Row 11: both are token lists; Firefox sends "Connection: keep-alive, Upgrade".
    if not _has_token(request.get_all("upgrade"), "websocket") or not _has_token(
        request.get_all("connection"), "upgrade"
    ):
        raise HandshakeRejected(
            Reason.NOT_UPGRADE, "no 'Upgrade: websocket' / 'Connection: upgrade' tokens"
        )

    # Row 12 (RFC 6455 section 4.2.2 step 4 / 4.4).
    versions = request.get_all("sec-websocket-version")
    if len(versions) != 1 or versions[0].strip() != "13":
        raise HandshakeRejected(Reason.VERSION, f"Sec-WebSocket-Version {versions!r}")

    # Row 13.
    keys = request.get_all("sec-websocket-key")
    if len(keys) != 1 or not _key_is_valid(keys[0]):
        raise HandshakeRejected(Reason.BAD_KEY, f"Sec-WebSocket-Key {keys!r} is not base64 of 16 bytes")
    key = keys[0]

    # Row 14 (RFC 6455 section 4.2.2 step 4 / 10.2): ASCII-lowercase comparison.
    if route.origins:
        origins = request.get_all("origin")
        if len(origins) != 1 or origins[0].strip().lower() not in route.origins:
            raise HandshakeRejected(
                Reason.ORIGIN_NOT_ALLOWED, f"Origin {origins!r} is not in {route.key_path}.origins"
            )

    # Row 14a, its pure half (RFC 6455 section 4.2.2 step 2, RFC 7617).
    credentials: BasicCredentials | None = None
    if isinstance(route.auth, BasicAuth):
        credentials = basic_credentials(request.get_all("authorization"), route.auth)

    offered = split_tokens(request.get_all("sec-websocket-protocol"))
    if route.subprotocols:
        allowed = set(route.subprotocols)
        offered = [p for p in offered if p in allowed]
    extensions: list[str] = []
    if route.extensions:
        extensions = split_extensions(request.get_all("sec-websocket-extensions"))

    return Accepted(
        request=request,
        host=host,
        route=route,
        target=rewrite_target(route, request.path, request.query),
        key=key,
        accept=accept_value(key),
        subprotocols=tuple(dict.fromkeys(offered)),
        extensions=tuple(extensions),
        host_header=request.get_all("host")[0].strip(),
        credentials=credentials,
    )


# --------------------------------------------------------------------------- rendering


_UNSAFE_VALUE_RE = re.compile("[\r\n\x00]")


def _header_line(name: str, value: str) -> bytes:
    if not _TOKEN_RE.match(name) or _UNSAFE_VALUE_RE.search(value):
        raise ValueError(f"refusing to render unsafe header {name!r}")
    return f"{name}: {value}\r\n".encode("latin-1")


def render_response(
    status: int,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    reason: str | None = None,
    server_header: str = "",
    date: str | None = None,
    content_type: str | None = "text/plain; charset=utf-8",
    content_length: bool = True,
) -> bytes:
    """A complete HTTP/1.1 response that ends the connection (Connection: close).

    ``content_length=False`` is for 204 and 304, which carry neither a body
    nor Content-Length (RFC 9110 sections 8.6, 15.3.5, 15.4.5).
    """
    reason = reason if reason is not None else REASONS.get(status, "Unknown")
    out = bytearray(f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1"))
    if server_header:
        out += _header_line("Server", server_header)
    if date:
        out += _header_line("Date", date)
    connection = "close"
    for name, value in headers:
        if name.lower() == "connection":
            connection = value
            continue
        out += _header_line(name, value)
    if content_type is not None:
        out += _header_line("Content-Type", content_type)
    if content_length:
        out += _header_line("Content-Length", str(len(body)))
    out += _header_line("Connection", connection)
    out += b"\r\n"
    if content_length:
        out += body
    return bytes(out)


def render_refusal(
    failure: PeerError, *, server_header: str = "", date: str | None = None
) -> bytes | None:
    """The answer to a refused connection or request: its row of :data:`~gatewayd.errors.ANSWERS`.

    The row's status, fixed headers and one-line text, with the values the
    error carries (Location, WWW-Authenticate, Retry-After). A relayed row
    sends the peer's own answer: the forward-auth service's 401/403 with its
    body and Content-Type, or a backend's non-101 (row 18, hop-by-hop
    headers removed). None when the row has no HTTP answer (the connection
    is just closed).
    """
    if isinstance(failure, AuthDenied):
        return render_response(
            failure.status,
            failure.headers,
            failure.payload,
            server_header=server_header,
            date=date,
            content_type=failure.content_type,
        )
    if isinstance(failure, BackendRefusedUpgrade):
        answer = BackendAnswer(failure.response_status, failure.reason_phrase, failure.response_headers)
        return render_relayed(answer, failure.body, date=date)
    status = failure.status
    if status is None:
        return None
    return render_response(
        status,
        failure.headers,
        (failure.text + "\n").encode("utf-8"),
        server_header=server_header,
        date=date,
    )


_QUOTED_BYTES_RE = re.compile(r"(?:bytearray\()?b['\"]")


def _without_data(exc: h11.ProtocolError) -> str:
    """h11's message without the bytes it quotes (a header line may hold a cookie)."""
    # h11 quotes them as b'...' or bytearray(b'...'): cut from the quote on.
    return _QUOTED_BYTES_RE.split(str(exc), maxsplit=1)[0].rstrip(": ")


@functools.lru_cache(maxsize=4096)
def _forwarded_node(address: str) -> str:
    # RFC 7239 section 6: IPv6 addresses are bracketed and the value quoted.
    try:
        if ipaddress.ip_address(address).version == 6:
            return f'"[{address}]"'
    except ValueError:
        return f'"{address}"'
    return address


def _forwarded_value(value: str) -> str:
    if _TOKEN_RE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def client_request_headers(
    accepted: Accepted, client: ClientInfo, *, drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """Host and the client's end-to-end headers, as the backend gets them.

    The client's headers go on in their order with hop-by-hop headers (and
    any header named in Connection), the headers the gateway sets itself and
    ``drop`` (lowercase names) removed; then the verified client subject and
    the forward-auth service's headers. Shared by the upgrade request
    (:func:`build_backend_request`) and plain HTTP requests
    (:func:`gatewayd.http.proxy_request_headers`).

    On a host with ``client_subject_header``, the client's copies of that
    header are always removed and the verified subject, if any, is sent in
    it. On a route with ``auth``, the client's Authorization is removed
    unless ``auth_forward = true``; with ``auth = "request"``, the client's
    copies of every ``auth_response_headers`` name are removed (whether or
    not the service's answer had them, so a client can never supply them)
    and the service's values are added.
    """
    request = accepted.request
    route = accepted.route
    named_in_connection = {t.lower() for t in split_tokens(request.get_all("connection"))}
    subject_header = accepted.host.client_subject_header
    removed: set[str] = set(accepted.subject_headers) | drop
    if subject_header:
        removed.add(subject_header.lower())
    if route.auth is not None and not route.auth_forward:
        removed.add("authorization")
    if isinstance(route.auth, ForwardAuth):
        removed.update(name.lower() for name in route.auth.response_headers)
    headers = [("Host", accepted.host_header)]
    for name, value in request.headers:
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in _REPLACED_ON_FORWARD:
            continue
        if lowered in named_in_connection or lowered in removed:
            continue
        headers.append((name, value))
    if subject_header and client.client_subject is not None:
        headers.append((subject_header, client.client_subject))
    headers.extend(accepted.auth_headers)
    return headers


def forwarding_headers(accepted: Accepted, client: ClientInfo) -> list[tuple[str, str]]:
    """X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and Forwarded (RFC 7239).

    X-Forwarded-For and Forwarded replace the client's copies, unless the
    client is a trusted proxy (``client.trusted_proxy``): then the client's
    values are kept and ours appended (SPEC section 3).
    """
    request = accepted.request
    proto = "https" if client.tls else "http"
    forwarded_for = client.address
    forwarded = (
        f"for={_forwarded_node(client.address)};"
        f"host={_forwarded_value(accepted.host_header)};proto={proto}"
    )
    if client.trusted_proxy:
        # A trusted proxy's list goes on, with its own address last (the
        # element we add names the party that talked to us).
        earlier_for = [v.strip() for v in request.get_all("x-forwarded-for") if v.strip()]
        earlier = [v.strip() for v in request.get_all("forwarded") if v.strip()]
        forwarded_for = ", ".join([*earlier_for, forwarded_for])
        forwarded = ", ".join([*earlier, forwarded])
    return [
        ("X-Forwarded-For", forwarded_for),
        ("X-Forwarded-Proto", proto),
        ("X-Forwarded-Host", accepted.host_header),
        ("Forwarded", forwarded),
    ]


def build_backend_request(accepted: Accepted, client: ClientInfo) -> bytes:
    """The upgrade request sent to the backend (SPEC section 3, "What the backend receives").

    :func:`client_request_headers` (Host, the client's end-to-end headers,
    subject and auth headers), then Upgrade, Connection, the filtered
    Sec-WebSocket-Protocol and -Extensions, then :func:`forwarding_headers`.

    No CR, LF or NUL can reach the output: client values passed h11's
    validation, ``client.address`` is an IP address (socket or PROXY header,
    both parsed), the subject is printable ASCII
    (:func:`gatewayd.tls.rfc4514_subject`), and the auth service's headers
    are validated where they are read.
    """
    headers = client_request_headers(accepted, client)
    headers += [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    if accepted.subprotocols:
        headers.append(("Sec-WebSocket-Protocol", ", ".join(accepted.subprotocols)))
    if accepted.extensions:
        headers.append(("Sec-WebSocket-Extensions", ", ".join(accepted.extensions)))
    headers += forwarding_headers(accepted, client)
    lines = [f"GET {accepted.target} HTTP/1.1\r\n".encode("latin-1")]
    lines += [_header_line(name, value) for name, value in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


# --------------------------------------------------------------------------- backend answer


@dataclass(frozen=True, slots=True)
class BackendAnswer:
    """A parsed response head from the backend."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


#: The end of an answer head as h11 finds it (a line break, optional CR, a line break).
ANSWER_HEAD_END_RE = re.compile(rb"\n\r?\n")


def parse_plain_101(head: bytes | bytearray) -> BackendAnswer | None:
    """A backend's ``HTTP/1.1 101`` head, parsed without an h11 round trip.

    ``head`` runs to the end of the blank line (:data:`ANSWER_HEAD_END_RE`).
    Only the plain case is taken: HTTP/1.1, status 101, every header line
    h11's ``header_field`` (no obs-fold), no Content-Length or
    Transfer-Encoding. For such a head h11 yields exactly this answer (same
    reason, names as sent, values without surrounding whitespace). None for
    anything else, which the caller hands to h11 (same verdict, same error
    text as always: SPEC row 19's strictness is h11's).
    """
    lines = bytes(head).split(b"\n")
    if len(lines) < 3 or lines[-1] or lines[-2] not in (b"", b"\r"):
        return None
    del lines[-2:]
    status = _H11_STATUS_101_RE.fullmatch(lines[0][:-1] if lines[0].endswith(b"\r") else lines[0])
    if status is None:
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line.endswith(b"\r"):
            line = line[:-1]
        header = _H11_HEADER_FIELD_RE.fullmatch(line)
        if header is None:
            return None   # obs-fold, a bad line: h11 decides (and words the error)
        name = header["name"].decode("latin-1")
        if name.lower() in ("content-length", "transfer-encoding"):
            return None   # h11 validates these (and merges lengths)
        headers.append((name, header["value"].decode("latin-1")))
    reason = status["reason"]
    return BackendAnswer(
        status=101,
        reason=reason.decode("latin-1") if reason is not None else "",
        headers=tuple(headers),
    )


@dataclass(frozen=True, slots=True)
class Upgraded:
    """A backend 101 that passed validation: what we tell the client."""

    subprotocol: str | None
    extensions: tuple[str, ...]
    extra_headers: tuple[tuple[str, str], ...]


def end_to_end_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` without hop-by-hop ones and without those named in Connection."""
    headers = list(headers)
    named = {
        t.lower()
        for t in split_tokens(v for k, v in headers if k.lower() == "connection")
    }
    return [
        (k, v)
        for k, v in headers
        if k.lower() not in HOP_BY_HOP and k.lower() not in named
    ]


def check_backend_response(
    accepted: Accepted, answer: BackendAnswer, backend: str
) -> Upgraded:
    """Validate a backend's 101 like a client must (RFC 6455 section 4.1, SPEC row 19).

    Raises:
        BackendBadUpgrade: wrong accept value, Upgrade/Connection missing, or a
            subprotocol / extension the client (after the route filter) did not offer.
    """
    if answer.status != 101:
        raise ValueError("check_backend_response is for 101 answers")
    if not _has_token(answer.get_all("upgrade"), "websocket"):
        raise BackendBadUpgrade(backend, "101 without 'Upgrade: websocket'")
    if not _has_token(answer.get_all("connection"), "upgrade"):
        raise BackendBadUpgrade(backend, "101 without 'Connection: Upgrade'")
    accepts = answer.get_all("sec-websocket-accept")
    if len(accepts) != 1 or accepts[0].strip() != accepted.accept:
        raise BackendBadUpgrade(
            backend, f"101 with a wrong Sec-WebSocket-Accept {accepts!r}"
        )
    protocols = split_tokens(answer.get_all("sec-websocket-protocol"))
    subprotocol: str | None = None
    if protocols:
        if len(protocols) != 1 or protocols[0] not in accepted.subprotocols:
            raise BackendBadUpgrade(
                backend,
                f"101 selects subprotocol {protocols!r}, offered {list(accepted.subprotocols)!r}",
            )
        subprotocol = protocols[0]
    chosen = split_extensions(answer.get_all("sec-websocket-extensions"))
    offered_names = {extension_name(e) for e in accepted.extensions}
    for ext in chosen:
        if extension_name(ext) not in offered_names:
            raise BackendBadUpgrade(
                backend, f"101 selects extension {extension_name(ext)!r} that was not offered"
            )
    extra = [
        (k, _CTL_RE.sub(" ", v))
        for k, v in end_to_end_headers(answer.headers)
        if k.lower() not in _REPLACED_ON_RELAY
    ]
    return Upgraded(subprotocol=subprotocol, extensions=tuple(chosen), extra_headers=tuple(extra))


def bridge_upgraded(accepted: Accepted) -> Upgraded:
    """What a tcp:// bridge route answers itself (SPEC section 3, "Subprotocols").

    The subprotocol is the first of the route's ``subprotocols`` (server
    preference) that the client offered; a route without the list selects
    ``binary`` when offered, as websockify does (noVNC offers it, and a
    browser fails a connection whose offered subprotocols were all
    ignored). No extension is negotiated.
    """
    preference = accepted.route.subprotocols or (BRIDGE_DEFAULT_SUBPROTOCOL,)
    offered = set(accepted.subprotocols)
    chosen = next((name for name in preference if name in offered), None)
    return Upgraded(subprotocol=chosen, extensions=(), extra_headers=())


def render_switching_protocols(accepted: Accepted, upgraded: Upgraded) -> bytes:
    """Our 101 to the client (RFC 6455 section 4.2.2 step 5; SPEC row 20)."""
    lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
    lines.append(_header_line("Upgrade", "websocket"))
    lines.append(_header_line("Connection", "Upgrade"))
    lines.append(_header_line("Sec-WebSocket-Accept", accepted.accept))
    if upgraded.subprotocol:
        lines.append(_header_line("Sec-WebSocket-Protocol", upgraded.subprotocol))
    if upgraded.extensions:
        lines.append(_header_line("Sec-WebSocket-Extensions", ", ".join(upgraded.extensions)))
    for name, value in upgraded.extra_headers:
        lines.append(_header_line(name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


def render_relayed(
    answer: BackendAnswer, body: bytes, *, date: str | None = None
) -> bytes:
    """A backend's non-101 answer, relayed (SPEC row 18): hop-by-hop headers
    removed, our own Content-Length and Connection: close."""
    # Control characters a backend put in a value become spaces (RFC 9110
    # section 5.5 lets a recipient do that) rather than reach the client.
    headers = [
        (k, _CTL_RE.sub(" ", v))
        for k, v in end_to_end_headers(answer.headers)
        if k.lower() not in _REPLACED_ON_RELAY
    ]
    if answer.status == 426:
        # A 426 must say which protocol to upgrade to (RFC 9110 section
        # 15.5.22); Upgrade is hop-by-hop, so keep the backend's explicitly.
        upgrade = [v for k, v in answer.headers if k.lower() == "upgrade"]
        if upgrade:
            headers += [("Upgrade", _CTL_RE.sub(" ", upgrade[0])), ("Connection", "Upgrade, close")]
    has_date = any(k.lower() == "date" for k, _ in headers)
    reason = _CTL_RE.sub(" ", answer.reason) if answer.reason else REASONS.get(answer.status, "Unknown")
    no_body = answer.status in (204, 304)
    # The backend's own Content-Type (if any) is among the relayed headers.
    return render_response(
        answer.status,
        headers,
        b"" if no_body else body,
        reason=reason,
        date=None if has_date else date,
        content_type=None,
        content_length=not no_body,
    )
