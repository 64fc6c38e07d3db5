"""The exceptions gatewayd raises, in one hierarchy.

Peer faults (a client or backend that broke a rule) and operator faults (a bad
configuration) are kept apart from our own bugs, which are ordinary Python
exceptions and are never caught broadly.

Tree::

    GatewayError
    ├── ConfigError              one problem in a configuration file
    ├── ConfigErrors             every problem found in one load (a list of ConfigError)
    ├── HandshakeRejected        the client's request gets a non-101 answer (carries it)
    │   └── AuthDenied           the forward-auth service said 401/403: its answer, relayed
    ├── AuthServiceFailed        the forward-auth service is down, slow or broken -> 503
    ├── BackendError             the backend could not give us a usable 101
    │   ├── NoBackendAvailable   every backend of the route is down or full     -> 503
    │   ├── BackendUnavailable   refused / unreachable / reset before answering -> 502
    │   ├── BackendTimeout       no connection or answer in time               -> 504
    │   ├── BackendRefusedUpgrade answered with a non-101 status               -> relayed
    │   └── BackendBadUpgrade    answered 101 but broke RFC 6455 4.2.2 / 4.1   -> 502
    ├── ClientDisconnected       a client reset, closed or stalled in the middle of a request
    ├── TLSHandshakeFailed       the TLS handshake with a client did not complete
    │   ├── UnknownServerName    SNI names no host and none is default (alert sent, row 1)
    │   ├── NotTLS               the first bytes were not a TLS ClientHello (row 2)
    │   └── ClientCertificateRequired  an mTLS host's client has no verified certificate
    └── ProxyProtocolError       a PROXY-protocol listener got no valid PROXY header (closed)

Each peer error carries the answer to send (``status``), like h11's
``error_status_hint``; the text sent to a peer never shows internals, the
``detail`` field is for our log only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


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


class HandshakeRejected(GatewayError):
    """The client's opening handshake is answered with a non-101 response.

    Attributes:
        status: the HTTP status code to send.
        body: the one-line text body sent to the client (no internals).
        headers: extra response headers, as (name, value) pairs.
        detail: why, for our log only.
    """

    def __init__(
        self,
        status: int,
        body: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        detail: str = "",
    ) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = tuple(headers)
        self.detail = detail or body
        # The virtual host and route the request had reached, when it got that
        # far (HostConfig / RouteConfig; typed loosely: errors.py imports no config).
        self.host: Any = None
        self.route: Any = None

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}"


class AuthDenied(HandshakeRejected):
    """The forward-auth service answered 401 or 403: relayed to the client (row 14a).

    Attributes:
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
        super().__init__(status, "", headers=headers, detail=detail)
        self.payload = payload
        self.content_type = content_type


class AuthServiceFailed(GatewayError):
    """The forward-auth service could not answer usefully: 503 (row 14a).

    Refused, unreachable, no answer in time, a malformed answer, or a status
    other than 2xx, 401 and 403 (nginx ``auth_request`` treats those as errors).
    """

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(url, detail)
        self.url = url
        self.detail = detail

    def __str__(self) -> str:
        return f"auth service {self.url}: {self.detail}"


class BackendError(GatewayError):
    """The backend could not give us a usable 101 answer.

    Attributes:
        backend: the backend URL.
        detail: what went wrong, for our log.
        retryable: True when no byte of the upgrade request was answered, so
            another backend of the route may be tried (nginx
            ``proxy_next_upstream error timeout``).
    """

    status = 502

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

    status = 503

    def __init__(self, route: str, detail: str, retry_after: int) -> None:
        super().__init__(route, detail)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"route {self.backend}: {self.detail}"


class BackendUnavailable(BackendError):
    """Refused, unreachable, TLS failure, or reset before answering: 502 (SPEC row 16)."""

    status = 502

    def __init__(self, backend: str, detail: str, *, retryable: bool = True) -> None:
        super().__init__(backend, detail, retryable=retryable)


class BackendTimeout(BackendError):
    """No connection or no answer within ``backend_connect_timeout``: 504 (row 17)."""

    status = 504

    def __init__(self, backend: str, detail: str, *, retryable: bool = True) -> None:
        super().__init__(backend, detail, retryable=retryable)


class BackendBadUpgrade(BackendError):
    """A 101 answer that breaks RFC 6455 section 4.1's client checks: 502 (row 19)."""

    status = 502


class BackendRefusedUpgrade(BackendError):
    """A non-101 answer; it is relayed to the client and never tunnelled (row 18).

    Attributes:
        response_status: the backend's status code.
        reason: the backend's reason phrase.
        headers: the backend's end-to-end headers (hop-by-hop already removed).
        body: the backend's body, at most 64 KiB.
    """

    def __init__(
        self,
        backend: str,
        response_status: int,
        reason: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> None:
        super().__init__(backend, f"answered {response_status} instead of 101")
        self.status = response_status
        self.response_status = response_status
        self.reason = reason
        self.headers = tuple(headers)
        self.body = body


class ClientDisconnected(GatewayError):
    """A client reset, closed or stalled (past ``http_timeout``) in the middle of a
    plain HTTP request or its answer: the connection ends, no answer is owed."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class TLSHandshakeFailed(GatewayError):
    """The TLS handshake with a client did not complete (alert sent or received, EOF, reset)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class UnknownServerName(TLSHandshakeFailed):
    """SNI names no host (or is absent) and no host is ``default``: the
    ``unrecognized_name`` alert was sent (SPEC row 1)."""

    def __init__(self, server_name: str | None) -> None:
        super().__init__(f"SNI {server_name!r} names no host and no host is default")
        self.server_name = server_name


class NotTLS(TLSHandshakeFailed):
    """The first bytes on a TLS listener are not a TLS handshake record (SPEC row 2).

    Attributes:
        data: the bytes received so far (nothing was sent to the peer yet), so
            the caller can answer ``400`` in plain text, like nginx.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__("plain HTTP (not a TLS ClientHello) sent to a TLS port")
        self.data = data


class ClientCertificateRequired(TLSHandshakeFailed):
    """A host with ``client_ca`` ended a handshake without a verified client certificate.

    OpenSSL refuses clients without a certificate during the handshake; this
    is the check after it, for a resumed session that carries none.
    """


class ProxyProtocolError(GatewayError):
    """The bytes at the start of a PROXY-protocol connection are not a valid header.

    Attributes:
        detail: what is wrong, for our log.
        data: the first bytes received (at most a header's worth), for the log.
    """

    def __init__(self, detail: str, data: bytes = b"") -> None:
        super().__init__(detail, data)
        self.detail = detail
        self.data = data

    def __str__(self) -> str:
        return self.detail
