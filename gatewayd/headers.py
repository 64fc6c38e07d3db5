"""Header names that several modules must agree on (pure).

One list each, so that the handshake (what is forwarded) and the
configuration (which names an operator may pick) can never disagree.
"""

from __future__ import annotations

#: Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded in either
#: direction, never copied from an auth answer, never a client_subject_header.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: The headers the gateway writes about the client on the backend request
#: (SPEC section 3): a client's or an auth service's copies never pass.
CLIENT_ADDRESS_HEADERS = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-real-ip",
        "forwarded",
    }
)
