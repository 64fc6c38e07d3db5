"""Access control, the pure parts: redirects, address lists, Basic credentials, a cache.

No I/O, no trio. :func:`gatewayd.handshake.decide` calls the checks here at
their places in SPEC section 3:

* **Row 9a** (:func:`redirect_rejection`): a route with ``redirect`` answers
  ``redirect_status`` (308 by default) with a ``Location`` built like nginx
  ``proxy_pass`` rewrites paths (:func:`redirect_location`). RFC 6455 section
  4.2.2 step 3 lets the server redirect before it accepts.
* **Row 9b** (:func:`check_addresses`): the host's ``allow``/``deny``, then the
  route's, against the client's address, with nginx semantics (deny wins;
  a non-empty allow refuses everyone else). IPv4-mapped IPv6 addresses
  (``::ffff:192.0.2.7``, seen on dual-stack sockets) compare as IPv4.
* **Row 14a, first half** (:func:`basic_credentials`): for ``auth = "basic"``
  the ``Authorization`` header must be present and well-formed (RFC 7617);
  otherwise 401 with ``WWW-Authenticate``. Checking the password (bcrypt, in
  a worker thread) and asking a forward-auth service are I/O and live in
  :mod:`gatewayd.auth`, which uses :class:`AnswerCache` and
  :func:`credential_key` from here.

Nothing here puts a credential, a cookie or a query string into an error's
``detail`` (which is logged).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from gatewayd.config import AccessList, BasicAuth, HostConfig, RouteConfig
from gatewayd.errors import HandshakeRejected, Redirected
from gatewayd.record import Reason
from gatewayd.routing import rewrite_path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Entries kept per route in a forward-auth answer cache (least recently used go first).
CACHE_MAX_ENTRIES = 10_000

# RFC 9110 section 11.2: token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


# --------------------------------------------------------------------------- row 9a


def redirect_location(route: RouteConfig, path: str, query: str | None) -> str:
    """The Location for a request to a redirect route.

    The path follows nginx ``proxy_pass``: when the redirect URL has a path,
    the part of the request path the route matched is replaced by it (for a
    prefix route the rest of the path is appended; for an exact route nothing
    is); without one the request path is appended whole. The request's query
    is appended, after the URL's own query if it has one.

    Args:
        route: a route with ``redirect``.
        path: the request path, without the query.
        query: the request's query without "?", or None.
    """
    redirect = route.redirect
    assert redirect is not None, "only redirect routes have a Location"
    location = redirect.origin + rewrite_path(route, path, redirect.path)
    queries = [q for q in (redirect.query, query) if q]
    if queries:
        location += "?" + "&".join(queries)
    return location


def redirect_rejection(route: RouteConfig, path: str, query: str | None) -> Redirected:
    """The row 9a answer: ``redirect_status`` with Location."""
    redirect = route.redirect
    assert redirect is not None, "only redirect routes have a Location"
    return Redirected(
        redirect_location(route, path, query),
        redirect.status,
        # The log gets the configured URL: the client's query stays out of it.
        f"{route.key_path}.redirect to {redirect.url} ({redirect.status})",
    )


# --------------------------------------------------------------------------- row 9b


def client_ip(address: str) -> IPAddress | None:
    """The client's address as an IP, IPv4-mapped IPv6 as IPv4; None if not an IP.

    A zone (``fe80::1%eth0``) and brackets are ignored.
    """
    text = address.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def refusal(access: AccessList, ip: IPAddress | None) -> str | None:
    """Why ``access`` refuses ``ip``, or None when it lets it in.

    nginx semantics: an address in ``deny`` is refused even if ``allow`` has
    it too; when ``allow`` is not empty, an address outside it is refused.
    An unknown address is refused by any non-empty list (fail closed).
    """
    if not access:
        return None
    if ip is None:
        return "the client address is not an IP address"
    for network in access.deny:
        if ip in network:
            return f"in deny {network}"
    if access.allow and not any(ip in network for network in access.allow):
        return "not in allow"
    return None


def check_addresses(host: HostConfig, route: RouteConfig, address: str) -> None:
    """Row 9b: the host's lists apply to every route and are checked first.

    Raises:
        HandshakeRejected: 403 when either list refuses ``address``.
    """
    ip: IPAddress | None = None
    for access, where in ((host.access, host.key_path), (route.access, route.key_path)):
        if not access:
            continue
        ip = ip if ip is not None else client_ip(address)
        reason = refusal(access, ip)
        if reason is not None:
            raise HandshakeRejected(
                Reason.ADDRESS_DENIED, f"client {address} refused by {where}: {reason}"
            )


# --------------------------------------------------------------------------- row 14a


@dataclass(frozen=True)
class BasicCredentials:
    """A user name and password from ``Authorization: Basic`` (RFC 7617).

    Bytes, as sent (UTF-8 by the ``charset="UTF-8"`` we announce); the
    password never appears in a repr.
    """

    user: bytes
    password: bytes = field(repr=False)


def www_authenticate(realm: str) -> str:
    """The challenge of RFC 7617 section 2 (realm validated at load: no quote, no backslash)."""
    return f'Basic realm="{realm}", charset="UTF-8"'


def unauthorized(auth: BasicAuth, detail: str) -> HandshakeRejected:
    """Row 14a for Basic: 401 with the challenge (RFC 9110 section 15.5.2)."""
    return HandshakeRejected(
        Reason.UNAUTHORIZED, detail, headers=[("WWW-Authenticate", www_authenticate(auth.realm))]
    )


def parse_basic_authorization(values: Sequence[str]) -> BasicCredentials:
    """Parse the Authorization header values of a request as Basic credentials.

    Args:
        values: every ``Authorization`` value of the request, in order.

    Raises:
        ValueError: missing, repeated, another scheme, not base64, or no
            colon; the message says which and never holds the credentials.
    """
    if not values:
        raise ValueError("no Authorization header")
    if len(values) > 1:
        raise ValueError("repeated Authorization header")
    scheme, _, rest = values[0].strip().partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("Authorization scheme is not Basic")
    token = rest.strip(" ")
    if not _TOKEN68_RE.fullmatch(token):
        raise ValueError("Basic credentials are not a base64 token")
    try:
        decoded = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("Basic credentials are not valid base64") from None
    user, colon, password = decoded.partition(b":")
    if not colon:
        raise ValueError("Basic credentials have no ':' between user and password")
    return BasicCredentials(user=user, password=password)


def basic_credentials(authorizations: Sequence[str], auth: BasicAuth) -> BasicCredentials:
    """Row 14a's pure half for ``auth = "basic"``: well-formed credentials, or 401.

    Raises:
        HandshakeRejected: 401 with ``WWW-Authenticate``.
    """
    try:
        return parse_basic_authorization(authorizations)
    except ValueError as exc:
        raise unauthorized(auth, str(exc)) from None


def credential_key(
    cookies: Sequence[str],
    authorizations: Sequence[str],
    context: Sequence[tuple[str, str]] = (),
) -> bytes | None:
    """The forward-auth cache key of a request, or None when it carries no
    credential (never cached: such an answer is not about a credential).

    A digest of the Cookie and Authorization values and of ``context``:
    everything else the auth service is told and may decide on (method, Host,
    URI with query, Origin, client address), so that a cached "yes" for one
    path, origin or address is never reused for another. The credentials
    themselves are not kept.
    """
    if not cookies and not authorizations:
        return None
    digest = hashlib.sha256()
    for name, values in ((b"cookie", cookies), (b"authorization", authorizations)):
        for value in values:
            digest.update(name + b"\0" + value.encode("latin-1") + b"\0")
    for label, text in context:
        digest.update(label.encode("latin-1") + b"\1" + text.encode("latin-1") + b"\0")
    return digest.digest()


Headers = tuple[tuple[str, str], ...]


class AnswerCache:
    """Positive forward-auth answers, kept ``ttl`` seconds; least recently used
    entries go first beyond ``max_entries``.

    Pure: the caller passes the time (``trio.current_time()``), so tests can
    drive it with any clock.
    """

    def __init__(self, ttl: float, max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[float, Headers]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Headers | None:
        """The headers cached for ``key``, or None (absent or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, headers = entry
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return headers

    def put(self, key: bytes, headers: Headers, now: float) -> None:
        """Remember a positive answer for ``key`` until ``now + ttl``."""
        if self.ttl <= 0:
            return
        self._entries[key] = (now + self.ttl, headers)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
