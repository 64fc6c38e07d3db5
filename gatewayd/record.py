"""What is recorded about a connection: how it ended, why it was refused, the access record.

Pure data, no I/O: :mod:`gatewayd.connection` fills an :class:`AccessRecord`
while a connection runs and hands it to the access logger when it ends;
:mod:`gatewayd.splice` and :mod:`gatewayd.bridge` report how a tunnel ended
as an :class:`End`.

Invariants:

* The ``end`` values written to the access log are exactly the
  :class:`End` values (operators grep and alert on them; they never change
  spelling).
* Every access record has an ``end`` by the time it is logged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class End(str, enum.Enum):
    """Why a connection ended: the access log's ``end`` field.

    A ``str`` enum: a value compares equal to its text, so both log formats
    write the text itself.
    """

    # The tunnel (splice or bridge) ended by one side, a timer, or the gateway.
    CLIENT_CLOSE = "client_close"
    BACKEND_CLOSE = "backend_close"
    IDLE_TIMEOUT = "idle_timeout"
    HALF_CLOSE_TIMEOUT = "half_close_timeout"  # one direction ended, the other did not in time
    SHUTDOWN = "shutdown"
    MAX_AGE = "max_age"
    CLIENT_ERROR = "client_error"
    BACKEND_ERROR = "backend_error"
    # The connection ended before a tunnel.
    REJECTED = "rejected"                      # the gateway answered with an HTTP error
    BACKEND_REFUSED = "backend_refused"        # a backend's non-101 answer was relayed (row 18)
    HANDSHAKE_TIMEOUT = "handshake_timeout"    # PROXY header, TLS or head not done in time (row 3)
    UNKNOWN_SNI = "unknown_sni"                # TLS alert unrecognized_name (row 1)
    TLS_ERROR = "tls_error"                    # the TLS handshake failed
    PLAIN_HTTP_ON_TLS = "plain_http_on_tls"    # row 2's 400
    PROXY_PROTOCOL_ERROR = "proxy_protocol_error"
    ACME_CHALLENGE = "acme_challenge"          # an ACME validation was answered (TLS-ALPN-01, HTTP-01)
    LIMITED = "limited"                        # a per-address limit (no access line)
    ERROR = "error"                            # a fault of ours; the log has the traceback
    # Plain HTTP requests (SPEC section 7): each has its own access line.
    KEEP_ALIVE = "keep_alive"                  # answered; the connection waits for the next one
    DONE = "done"                              # answered; the connection closed after it
    KEEPALIVE_TIMEOUT = "keepalive_timeout"    # no next request within http_keepalive_timeout
    HOST_REMOVED = "host_removed"              # a reload removed the host TLS had chosen

    def __str__(self) -> str:
        return self.value


class Reason(str, enum.Enum):
    """Why the gateway refused a connection or a request (the access log's ``reason``).

    The values are an interface: operators alert on them, docs/logging.md
    lists them; :data:`gatewayd.errors.ANSWERS` maps each to its answer.
    Rows are SPEC section 3's.
    """

    # Before any HTTP: the connection is closed.
    PROXY_HEADER = "proxy_header"                  # no valid PROXY header
    UNKNOWN_SNI = "unknown_sni"                    # row 1 (alert unrecognized_name)
    TLS_HANDSHAKE = "tls_handshake"                # the TLS handshake failed
    CLIENT_CERTIFICATE = "client_certificate"      # an mTLS host got no verified certificate
    PLAIN_HTTP = "plain_http"                      # row 2
    TIMEOUT = "timeout"                            # row 3, before any byte of a head
    # The request head.
    HEAD_TIMEOUT = "head_timeout"                  # row 3, a head begun but not done
    HEAD_TOO_LARGE = "head_too_large"              # row 4
    TOO_MANY_HEADERS = "too_many_headers"          # row 4
    HEADER_LINE_TOO_LONG = "header_line_too_long"  # row 4
    MALFORMED = "malformed"                        # row 5
    TARGET_FORM = "target_form"                    # row 8: OPTIONS * or CONNECT host:port
    # The decision (rows 6-14a).
    SNI_HOST_MISMATCH = "sni_host_mismatch"        # row 6
    UNKNOWN_HOST = "unknown_host"                  # row 7
    METHOD = "method"                              # row 8
    NO_ROUTE = "no_route"                          # row 9
    REDIRECT = "redirect"                          # row 9a
    ADDRESS_DENIED = "address_denied"              # row 9b
    REQUEST_BODY = "request_body"                  # row 10
    NOT_UPGRADE = "not_upgrade"                    # row 11
    VERSION = "version"                            # row 12
    BAD_KEY = "bad_key"                            # row 13
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"      # row 14
    UNAUTHORIZED = "unauthorized"                  # row 14a, basic
    AUTH_DENIED = "auth_denied"                    # row 14a, the auth service's 401/403
    AUTH_BUSY = "auth_busy"                        # row 14a, password checks saturated
    AUTH_UNAVAILABLE = "auth_unavailable"          # row 14a, the auth service failed
    # The backend (rows 15-19).
    NO_BACKEND = "no_backend"                      # row 15
    BACKEND_UNAVAILABLE = "backend_unavailable"    # row 16
    BACKEND_TIMEOUT = "backend_timeout"            # row 17
    BACKEND_REFUSED = "backend_refused"            # row 18 (its answer relayed)
    BACKEND_BAD_UPGRADE = "backend_bad_upgrade"    # row 19
    # Plain HTTP requests (SPEC section 7).
    STATIC_UPGRADE = "static_upgrade"              # a WebSocket upgrade on a static route
    STATIC_METHOD = "static_method"                # neither GET nor HEAD on a static route
    BAD_BODY = "bad_body"                          # a malformed request body (chunked framing)
    BODY_TOO_LARGE = "body_too_large"              # a request body over max_body_size

    def __str__(self) -> str:
        return self.value


class Phase(enum.Enum):
    """Where a connection is in SPEC order; a timeout is handled by the phase it hit.

    The first three run under the handshake deadline (SPEC row 3), in this
    order, each at most once per connection except ``REQUEST_HEAD``, which
    starts every request of the request loop.
    """

    PROXY_HEADER = "proxy_header"   # waiting for the PROXY v1/v2 header
    TLS = "tls"                     # the TLS handshake
    REQUEST_HEAD = "request_head"   # reading one request head
    REQUEST = "request"             # deciding, authorizing, connecting to the backend
    TUNNEL = "tunnel"               # spliced or bridged until the end


@dataclass(slots=True)
class AccessRecord:
    """One access-log line's facts (SPEC section 6), filled in as the connection runs.

    Attributes:
        client: the client's ``address:port`` (from the PROXY header when there is one).
        sni: the server name the client sent in TLS.
        host: the request's Host header.
        path: the request path (never the query).
        route: the matched route, as ``host[0]:/path``.
        backend: the backend URL connected to (or the route's only one).
        status: the status sent to the client (101 included).
        bytes_in / bytes_out: bytes from / to the client (the plaintext
            inside TLS), request head and every answer the gateway made included.
        duration: seconds from accept to the end.
        end: why it ended.
        reason: why the gateway refused the connection or its request, if it did.
        detail: the refusal in words, for the operator (never a credential,
            a cookie or a query string).
    """

    client: str
    sni: str | None = None
    host: str | None = None
    path: str | None = None
    route: str | None = None
    backend: str | None = None
    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    duration: float = 0.0
    end: End | None = None
    reason: Reason | None = None
    detail: str | None = None

    def fields(self) -> dict[str, Any]:
        """The record as the log formatters take it (``extra={"access": ...}``), in line order."""
        fields: dict[str, Any] = {
            "client": self.client,
            "sni": self.sni,
            "host": self.host,
            "path": self.path,
            "route": self.route,
            "backend": self.backend,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration": self.duration,
            "end": self.end.value if self.end is not None else "",
        }
        if self.reason is not None:
            # Only on refusals: every other line stays as it always was.
            fields["reason"] = self.reason.value
            fields["detail"] = self.detail
        return fields
