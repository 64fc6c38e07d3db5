"""What is recorded about a connection: how it ended, where it was, the access record.

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
        bytes_in / bytes_out: bytes from / to the client, on the wire as TLS
            carries them (request head and answers included).
        duration: seconds from accept to the end.
        end: why it ended.
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

    def fields(self) -> dict[str, Any]:
        """The record as the log formatters take it (``extra={"access": ...}``), in line order."""
        return {
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
