"""Per-client-address limits: open connections and a handshake token bucket. Pure: no trio.

Theory of operation
-------------------
``[gateway] max_connections_per_ip`` bounds the connections one client
address has open at once; ``handshakes_per_ip_per_second`` bounds how fast it
may open new ones, as a token bucket (the bucket holds :data:`BURST_SECONDS`
seconds' worth of tokens, at least one; each admitted connection takes one;
tokens come back at the configured rate). Both are checked before any TLS
work: a refused connection is closed at once, which costs the attacker as
much as it costs us (a 429 after TLS would cost us a full handshake per
attempt, the very thing the limit is for).

"Client address" is the address the connection comes from after the PROXY
protocol (:mod:`gatewayd.proxy_protocol`). An IPv6 client is keyed by its
/64 prefix, the smallest block a site is given (RFC 6177): counting single
IPv6 addresses would give every attacker 2^64 separate allowances.

Memory stays bounded: an address has an entry in the connection counts only
while it has connections open, and a bucket only while it is not full (a
full bucket and no bucket are the same thing). Full buckets are swept at
most once per :data:`SWEEP_INTERVAL`, so the table holds at most the
addresses that opened a connection within the last ``BURST_SECONDS``.

The caller passes the time (monotonic seconds) in, so tests need no clock.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["BURST_SECONDS", "Limiter", "Refusal", "client_key"]

#: The bucket holds this many seconds' worth of handshakes (at least 1).
BURST_SECONDS: Final = 2.0
#: Full buckets are dropped at most this often.
SWEEP_INTERVAL: Final = 1.0

Refusal = Literal["per_ip_connections", "per_ip_handshake_rate"]


def client_key(address: str) -> str:
    """What the limits count by: an IPv4 address, or an IPv6 address's /64.

    An IPv4-mapped IPv6 address counts as its IPv4 address; anything that is
    not an IP address (a unix socket peer) is its own key.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class Limiter:
    """Per-address connection counts and token buckets, shared across reloads.

    The limits are passed at each call (they come from the configuration in
    force), so a reload changes them without losing the counts.
    """

    def __init__(self) -> None:
        self._open: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._last_sweep = -math.inf

    @property
    def tracked(self) -> int:
        """Entries held now (addresses with connections, plus non-full buckets)."""
        return len(self._open) + len(self._buckets)

    def open_count(self, key: str) -> int:
        return self._open.get(key, 0)

    def admit(
        self, key: str, now: float, *, max_connections: int, handshakes_per_second: float
    ) -> Refusal | None:
        """Count a new connection from ``key`` if the limits allow it.

        Args:
            key: from :func:`client_key`.
            now: monotonic seconds.
            max_connections: ``max_connections_per_ip`` (0 = no limit).
            handshakes_per_second: ``handshakes_per_ip_per_second`` (0 = off).

        Returns:
            None when admitted (then :meth:`release` must be called once when
            the connection ends), else which limit refused it.
        """
        self._sweep(now, handshakes_per_second)
        if max_connections and self._open.get(key, 0) >= max_connections:
            return "per_ip_connections"
        if handshakes_per_second > 0:
            burst = max(1.0, handshakes_per_second * BURST_SECONDS)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(burst, now)
            else:
                elapsed = max(0.0, now - bucket.updated)
                bucket.tokens = min(burst, bucket.tokens + elapsed * handshakes_per_second)
                bucket.updated = now
            if bucket.tokens < 1.0:
                return "per_ip_handshake_rate"
            bucket.tokens -= 1.0
        self._open[key] = self._open.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        """A connection admitted by :meth:`admit` has ended."""
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def _sweep(self, now: float, rate: float) -> None:
        if now - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = now
        if rate <= 0:
            self._buckets.clear()  # the limit is off (or was turned off by a reload)
            return
        burst = max(1.0, rate * BURST_SECONDS)
        full = [
            key
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * rate >= burst
        ]
        for key in full:
            del self._buckets[key]
