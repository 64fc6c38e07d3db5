"""The exceptions gatewayd raises, in one hierarchy.

Peer faults (a client or backend that broke a rule) and operator faults (a bad
configuration) are kept apart from our own bugs, which are ordinary Python
exceptions and are never caught broadly.

Tree::

    GatewayError
    ├── ConfigError                  one problem in a configuration file
    ├── ConfigErrors                 every problem found in one load (a list of ConfigError)
    ├── ClientDisconnected           a client reset, closed or stalled in the middle of a request
    └── PeerError                    the gateway refuses: carries a Reason (a row of ANSWERS)
        ├── HandshakeRejected        the client's request gets a non-101 answer (rows 4-14a)
        │   ├── Redirected           row 9a: the route's redirect_status with Location
        │   ├── BodyTooLarge         a plain request's body over max_body_size (SPEC 7) -> 413
        │   └── AuthDenied           the forward-auth service said 401/403: its answer, relayed
        ├── AuthServiceFailed        the forward-auth service is down, slow or broken -> 503
        ├── BackendError             the backend could not give us a usable 101
        │   ├── NoBackendAvailable   every backend of the route is down or full     -> 503
        │   ├── BackendUnavailable   refused / unreachable / reset before answering -> 502
        │   ├── BackendTimeout       no connection or answer in time               -> 504
        │   ├── BackendRefusedUpgrade answered with a non-101 status               -> relayed
        │   └── BackendBadUpgrade    answered 101 but broke RFC 6455 4.2.2 / 4.1   -> 502
        ├── TLSHandshakeFailed       the TLS handshake with a client did not complete
        │   ├── UnknownServerName    SNI names no host and none is default (alert sent, row 1)
        │   ├── NotTLS               the first bytes were not a TLS ClientHello (row 2) -> 400
        │   └── ClientCertificateRequired  an mTLS host's client has no verified certificate
        ├── ProxyProtocolError       a PROXY-protocol listener got no valid PROXY header (closed)
        └── HandshakeTimeout         PROXY header, TLS or request head not done in time (row 3)

The answers
-----------
Every peer error carries a :class:`Reason`, and :data:`ANSWERS`, the table
below, maps each reason to the answer the gateway makes (like h11's
``error_status_hint``, but in one table): the status, the one-line text, the
fixed headers, and the access log's ``end``. A status of ``None`` means no
HTTP answer at all (the connection is closed, after a TLS alert for row 1);
``relayed`` rows send a peer's own answer (the forward-auth service's 401/403,
a backend's non-101). The only values an error adds are those that vary per
request: ``Location``, ``WWW-Authenticate``'s realm, row 15's ``Retry-After``,
and a redirect's configured status. :func:`gatewayd.handshake.render_refusal`
renders every one of them.

The reason is also the access log's ``reason`` field, with ``detail`` beside
it: the text sent to a peer never shows internals, ``detail`` is for our log
only and never holds a credential, a cookie or a query string.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gatewayd.record import End, Reason


@dataclass(frozen=True)
class Answer:
    """What the gateway answers for one :class:`Reason` (a row of :data:`ANSWERS`).

    Attributes:
        status: the HTTP status, or None for no HTTP answer (closed).
        text: the one-line body (``{location}``, ``{limit}``: the error's fields).
        headers: fixed headers of the answer, beside those the error adds.
        end: the access log's ``end`` for a connection refused so.
        relayed: the answer is a peer's own (status, headers and body from the error).
    """

    status: int | None
    text: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    end: End = End.REJECTED
    relayed: bool = False


#: Retry-After (seconds) on the 503 for an auth service that failed or
#: password checks too busy to finish.
AUTH_RETRY_AFTER = 5

_MALFORMED = "Bad Request: malformed HTTP request"
_UNAVAILABLE = "Bad Gateway: the service is unavailable"

#: The one failure -> answer table (SPEC section 3's rows; ``Retry-After``,
#: ``Location`` and ``WWW-Authenticate`` values come with the error).
ANSWERS: Mapping[Reason, Answer] = {
    Reason.PROXY_HEADER: Answer(None, end=End.PROXY_PROTOCOL_ERROR),
    Reason.UNKNOWN_SNI: Answer(None, end=End.UNKNOWN_SNI),
    Reason.TLS_HANDSHAKE: Answer(None, end=End.TLS_ERROR),
    Reason.CLIENT_CERTIFICATE: Answer(None, end=End.TLS_ERROR),
    Reason.PLAIN_HTTP: Answer(
        400, "Bad Request: plain HTTP sent to a TLS port", end=End.PLAIN_HTTP_ON_TLS
    ),
    Reason.TIMEOUT: Answer(None, end=End.HANDSHAKE_TIMEOUT),
    Reason.HEAD_TIMEOUT: Answer(408, "Request Timeout", end=End.HANDSHAKE_TIMEOUT),
    Reason.HEAD_TOO_LARGE: Answer(431, "Request Header Fields Too Large"),
    Reason.TOO_MANY_HEADERS: Answer(431, "Request Header Fields Too Large: too many header lines"),
    Reason.HEADER_LINE_TOO_LONG: Answer(
        431, "Request Header Fields Too Large: a header line is too long"
    ),
    Reason.MALFORMED: Answer(400, _MALFORMED),
    Reason.TARGET_FORM: Answer(405, "Method Not Allowed", (("Allow", "GET"),)),
    Reason.SNI_HOST_MISMATCH: Answer(
        421, "Misdirected Request: this connection cannot serve that host"
    ),
    Reason.UNKNOWN_HOST: Answer(404, "Not Found: no such host"),
    Reason.METHOD: Answer(
        405, "Method Not Allowed: a WebSocket handshake is a GET", (("Allow", "GET"),)
    ),
    Reason.NO_ROUTE: Answer(404, "Not Found: no route for this path"),
    # The status is the route's redirect_status (301, 302, 307, 308).
    Reason.REDIRECT: Answer(308, "Moved: this endpoint is now {location}"),
    Reason.ADDRESS_DENIED: Answer(403, "Forbidden: your address may not use this endpoint"),
    Reason.REQUEST_BODY: Answer(400, _MALFORMED),
    # RFC 9110 section 15.5.22: 426 names the protocol to upgrade to, and
    # Upgrade means something only with "Connection: Upgrade".
    Reason.NOT_UPGRADE: Answer(
        426,
        "Upgrade Required: this endpoint speaks WebSocket only",
        (("Upgrade", "websocket"), ("Connection", "Upgrade, close")),
    ),
    Reason.VERSION: Answer(
        426,
        "Upgrade Required: unsupported WebSocket version, use 13",
        (("Sec-WebSocket-Version", "13"),),
    ),
    Reason.BAD_KEY: Answer(400, _MALFORMED),
    Reason.ORIGIN_NOT_ALLOWED: Answer(403, "Forbidden: origin not allowed"),
    Reason.UNAUTHORIZED: Answer(401, "Unauthorized: valid credentials are required"),
    Reason.AUTH_DENIED: Answer(None, relayed=True),
    Reason.AUTH_BUSY: Answer(
        503,
        "Service Unavailable: too many logins at once, try again shortly",
        (("Retry-After", str(AUTH_RETRY_AFTER)),),
    ),
    Reason.AUTH_UNAVAILABLE: Answer(
        503,
        "Service Unavailable: authentication is unavailable, try again later",
        (("Retry-After", str(AUTH_RETRY_AFTER)),),
    ),
    Reason.NO_BACKEND: Answer(
        503, "Service Unavailable: no backend can take the connection, retry later"
    ),
    Reason.BACKEND_UNAVAILABLE: Answer(502, _UNAVAILABLE),
    Reason.BACKEND_TIMEOUT: Answer(504, "Gateway Timeout: the service did not answer in time"),
    Reason.BACKEND_REFUSED: Answer(None, end=End.BACKEND_REFUSED, relayed=True),
    Reason.BACKEND_BAD_UPGRADE: Answer(502, _UNAVAILABLE),
    Reason.STATIC_UPGRADE: Answer(404, "Not Found: not a WebSocket resource"),
    Reason.STATIC_METHOD: Answer(405, "Method Not Allowed", (("Allow", "GET, HEAD"),)),
    Reason.BAD_BODY: Answer(400, "Bad Request: malformed request body"),
    # RFC 9110 section 15.5.14.
    Reason.BODY_TOO_LARGE: Answer(413, "Content Too Large: the request body may have at most {limit} bytes"),
}


class GatewayError(Exception):
    """Base class of every error gatewayd raises on purpose."""


class ConfigError(GatewayError):
    """One problem in a configuration file.

    Attributes:
        file: the configuration file's path, as given.
        key_path: where the problem is, as ``host[1].route[0].backend`` ("" for the whole file).
        message: what is wrong, in words an operator can act on.
        line: 1-based line of the key or syntax error, when known.
        column: 1-based column of a syntax error, when known.
        suggestion: the nearest known key, for an unknown key.
    """

    def __init__(
        self,
        file: str,
        key_path: str,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
        suggestion: str | None = None,
    ) -> None:
        super().__init__(file, key_path, message)
        self.file = file
        self.key_path = key_path
        self.message = message
        self.line = line
        self.column = column
        self.suggestion = suggestion

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: "
        if self.key_path:
            text += f"{self.key_path}: "
        text += self.message
        if self.suggestion:
            text += f" (did you mean '{self.suggestion}'?)"
        return text


class ConfigErrors(GatewayError):
    """Every problem found while loading one configuration file."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: Sequence[ConfigError] = tuple(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        count = len(self.errors)
        head = f"{count} configuration error{'s' if count != 1 else ''}"
        return "\n".join([head + ":", *(f"  {e}" for e in self.errors)])


class PeerError(GatewayError):
    """A peer broke a rule, or a service we depend on failed: the gateway refuses.

    Attributes:
        reason: which row of :data:`ANSWERS` answers it.
        detail: why, for our log only (never a credential, cookie or query string).
    """

    reason: Reason = Reason.MALFORMED
    detail: str = ""

    @property
    def answer(self) -> Answer:
        """This error's row of :data:`ANSWERS`."""
        return ANSWERS[self.reason]

    @property
    def status(self) -> int | None:
        """The status sent for it (None: the connection is closed without an answer)."""
        return self.answer.status

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Every header of the answer: the row's fixed ones, then :attr:`extra_headers`."""
        return self.answer.headers + self.extra_headers

    @property
    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        """Headers whose values vary per request (Location, WWW-Authenticate, Retry-After)."""
        return ()

    @property
    def text(self) -> str:
        """The one-line body sent to the client."""
        return self.answer.text


class HandshakeRejected(PeerError):
    """The client's request is answered with a non-101 response (rows 4-14a, SPEC 7).

    Attributes:
        reason: the row that refused it; :data:`ANSWERS` gives the answer.
        detail: why, for our log only.
        headers: the row's fixed headers, then the ones given to the
            constructor: the values that vary per request (WWW-Authenticate,
            Retry-After), kept as :attr:`extra_headers`.
        host, route: the virtual host and route the request had reached,
            when it got that far (for the access log).
    """

    def __init__(
        self, reason: Reason, detail: str = "", *, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail or ANSWERS[reason].text
        self._headers = tuple(headers)
        # HostConfig / RouteConfig; typed loosely: errors.py imports no config.
        self.host: Any = None
        self.route: Any = None

    @property
    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        return self._headers

    @property
    def body(self) -> str:
        """The one-line text body (kept for callers that render it themselves)."""
        return self.text

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}"


class Redirected(HandshakeRejected):
    """Row 9a: the route's ``redirect_status`` with ``Location``.

    Attributes:
        location: where the client is sent (the request's path suffix and query appended).
        redirect_status: 301, 302, 307 or 308 (validated with the configuration).
    """

    def __init__(self, location: str, redirect_status: int, detail: str) -> None:
        super().__init__(Reason.REDIRECT, detail, headers=[("Location", location)])
        self.location = location
        self.redirect_status = redirect_status

    @property
    def status(self) -> int:
        return self.redirect_status

    @property
    def text(self) -> str:
        return self.answer.text.format(location=self.location)


class BodyTooLarge(HandshakeRejected):
    """A plain request's body is over ``max_body_size``: 413 (SPEC section 7).

    Attributes:
        limit: the route's (or the gateway's) ``max_body_size``.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(Reason.BODY_TOO_LARGE, f"request body over max_body_size ({limit} bytes)")
        self.limit = limit

    @property
    def text(self) -> str:
        return self.answer.text.format(limit=self.limit)


class AuthDenied(HandshakeRejected):
    """The forward-auth service answered 401 or 403: relayed to the client (row 14a).

    Attributes:
        service_status: the service's status, 401 or 403.
        payload: the service's body (at most a few KiB), sent as is.
        content_type: the service's Content-Type for ``payload``, if any.
    """

    def __init__(
        self,
        status: int,
        *,
        headers: Sequence[tuple[str, str]] = (),
        payload: bytes = b"",
        content_type: str | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(Reason.AUTH_DENIED, detail or f"the auth service answered {status}", headers=headers)
        self.service_status = status
        self.payload = payload
        self.content_type = content_type

    @property
    def status(self) -> int:
        return self.service_status


class AuthServiceFailed(PeerError):
    """The forward-auth service could not answer usefully: 503 (row 14a).

    Refused, unreachable, no answer in time, a malformed answer, or a status
    other than 2xx, 401 and 403 (nginx ``auth_request`` treats those as errors).
    """

    reason = Reason.AUTH_UNAVAILABLE

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(url, detail)
        self.url = url
        self.detail = detail

    def __str__(self) -> str:
        return f"auth service {self.url}: {self.detail}"


class BackendError(PeerError):
    """The backend could not give us a usable 101 answer.

    Attributes:
        backend: the backend URL.
        detail: what went wrong, for our log.
        retryable: True when no byte of the upgrade request was answered, so
            another backend of the route may be tried (nginx
            ``proxy_next_upstream error timeout``).
    """

    reason = Reason.BACKEND_UNAVAILABLE

    def __init__(self, backend: str, detail: str, *, retryable: bool = False) -> None:
        super().__init__(backend, detail)
        self.backend = backend
        self.detail = detail
        self.retryable = retryable

    def __str__(self) -> str:
        return f"backend {self.backend}: {self.detail}"


class NoBackendAvailable(BackendError):
    """No backend of the route can take a connection (all down, or all at their
    ``backend_max_connections``): 503 with ``Retry-After`` (SPEC row 15).

    Attributes:
        retry_after: whole seconds for the Retry-After header.
    """

    reason = Reason.NO_BACKEND

    def __init__(self, route: str, detail: str, retry_after: int) -> None:
        super().__init__(route, detail)
        self.retry_after = retry_after

    @property
    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        return (("Retry-After", str(self.retry_after)),)

    def __str__(self) -> str:
        return f"route {self.backend}: {self.detail}"


class BackendUnavailable(BackendError):
    """Refused, unreachable, TLS failure, or reset before answering: 502 (SPEC row 16)."""

    reason = Reason.BACKEND_UNAVAILABLE

    def __init__(self, backend: str, detail: str, *, retryable: bool = True) -> None:
        super().__init__(backend, detail, retryable=retryable)


class BackendTimeout(BackendError):
    """No connection or no answer within ``backend_connect_timeout``: 504 (row 17)."""

    reason = Reason.BACKEND_TIMEOUT

    def __init__(self, backend: str, detail: str, *, retryable: bool = True) -> None:
        super().__init__(backend, detail, retryable=retryable)


class BackendBadUpgrade(BackendError):
    """A 101 answer that breaks RFC 6455 section 4.1's client checks: 502 (row 19)."""

    reason = Reason.BACKEND_BAD_UPGRADE


class BackendRefusedUpgrade(BackendError):
    """A non-101 answer; it is relayed to the client and never tunnelled (row 18).

    Attributes:
        response_status: the backend's status code.
        reason_phrase: the backend's reason phrase.
        response_headers: the backend's end-to-end headers (hop-by-hop already removed).
        body: the backend's body, at most 64 KiB.
    """

    reason = Reason.BACKEND_REFUSED

    def __init__(
        self,
        backend: str,
        response_status: int,
        reason: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> None:
        super().__init__(backend, f"answered {response_status} instead of 101")
        self.response_status = response_status
        self.reason_phrase = reason
        self.response_headers = tuple(headers)
        self.body = body

    @property
    def status(self) -> int:
        return self.response_status


class ClientDisconnected(GatewayError):
    """A client reset, closed or stalled (past ``http_timeout``) in the middle of a
    plain HTTP request or its answer: the connection ends, no answer is owed."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class TLSHandshakeFailed(PeerError):
    """The TLS handshake with a client did not complete (alert sent or received, EOF, reset)."""

    reason = Reason.TLS_HANDSHAKE

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class UnknownServerName(TLSHandshakeFailed):
    """SNI names no host (or is absent) and no host is ``default``: the
    ``unrecognized_name`` alert was sent (SPEC row 1)."""

    reason = Reason.UNKNOWN_SNI

    def __init__(self, server_name: str | None) -> None:
        super().__init__(f"SNI {server_name!r} names no host and no host is default")
        self.server_name = server_name


class NotTLS(TLSHandshakeFailed):
    """The first bytes on a TLS listener are not a TLS handshake record (SPEC row 2).

    Attributes:
        data: the bytes received so far (nothing was sent to the peer yet), so
            the caller can answer ``400`` in plain text, like nginx.
    """

    reason = Reason.PLAIN_HTTP

    def __init__(self, data: bytes) -> None:
        super().__init__("plain HTTP (not a TLS ClientHello) sent to a TLS port")
        self.data = data


class ClientCertificateRequired(TLSHandshakeFailed):
    """A host with ``client_ca`` ended a handshake without a verified client certificate.

    OpenSSL refuses clients without a certificate during the handshake; this
    is the check after it, for a resumed session that carries none.
    """

    reason = Reason.CLIENT_CERTIFICATE


class ProxyProtocolError(PeerError):
    """The bytes at the start of a PROXY-protocol connection are not a valid header.

    Attributes:
        detail: what is wrong, for our log.
        data: the first bytes received (at most a header's worth), for the log.
    """

    reason = Reason.PROXY_HEADER

    def __init__(self, detail: str, data: bytes = b"") -> None:
        super().__init__(detail, data)
        self.detail = detail
        self.data = data

    def __str__(self) -> str:
        return self.detail


class HandshakeTimeout(PeerError):
    """The handshake deadline passed (SPEC row 3): in ``waiting_for``.

    A request head that had begun gets ``408``; anything else is closed
    without an answer (a client that sent nothing is owed none).

    Attributes:
        waiting_for: what was not done in time ("PROXY header", "TLS handshake", "request head").
        seconds: the deadline, ``handshake_timeout``.
        head_started: some bytes of the request head had arrived.
    """

    def __init__(self, waiting_for: str, seconds: float, *, head_started: bool = False) -> None:
        super().__init__(waiting_for, seconds)
        self.waiting_for = waiting_for
        self.seconds = seconds
        self.reason = Reason.HEAD_TIMEOUT if head_started else Reason.TIMEOUT
        self.detail = f"{waiting_for} not complete within {seconds:g}s"

    def __str__(self) -> str:
        return self.detail
