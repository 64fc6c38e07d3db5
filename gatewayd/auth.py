"""Authentication that needs I/O: bcrypt checks and forward-auth requests (SPEC row 14a).

Theory of operation
-------------------
:func:`gatewayd.handshake.decide` settles everything pure about row 14a:
Basic credentials that are missing or malformed get their 401 there, and
well-formed ones arrive here in :attr:`Accepted.credentials`. The server
then calls :meth:`Authenticator.authorize`, after the decision and before
the backend (rows 15-20), with one :class:`Authenticator` per configuration
generation, so a reload brings the users file it re-read and empty caches.

``auth = "basic"`` (RFC 7617): the user name is looked up without an early
exit (every entry is compared, digests of equal length, with
:func:`hmac.compare_digest`), and bcrypt runs even for an unknown user,
against a dummy hash of the file's usual cost, so neither the lookup nor the
check tells an observer which users exist. ``bcrypt.checkpw`` compares in
constant time and runs in a worker thread (one per CPU at a time, at least two),
so the event loop never blocks on it. bcrypt only reads a password's first
72 bytes; we pass at most those, as Apache's htpasswd does.

``auth = "request"`` (nginx ``auth_request``, Traefik ``forwardAuth``): a
``GET`` to ``auth_url`` with the client's method, URI, Host, Origin, Cookie,
Authorization and address in the conventional headers, over a fresh
connection (``Connection: close``), parsed with h11, all under
``min(backend_connect_timeout, 5 s)``. A 2xx lets the handshake go on and
yields the ``auth_response_headers`` the backend gets; 401 and 403 are
relayed to the client (:class:`~gatewayd.errors.AuthDenied`); anything else,
a refused connection or the timeout is :class:`~gatewayd.errors.AuthServiceFailed`
(the server answers 503 with Retry-After). With ``auth_cache_seconds``, 2xx
answers are cached per route, keyed on a digest of the Cookie and
Authorization values (:class:`gatewayd.access.AnswerCache`).

Nothing here logs or puts into an error a password, a cookie, an
Authorization value or a query string.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import hmac
import logging
import os
import socket
from dataclasses import replace

import bcrypt
import h11
import trio

from gatewayd.access import (
    AnswerCache,
    BasicCredentials,
    Headers,
    credential_key,
    unauthorized,
)
from gatewayd.backend import read_answer_body
from gatewayd.config import BasicAuth, Config, ForwardAuth, RouteConfig
from gatewayd.errors import AuthDenied, AuthServiceFailed, HandshakeRejected
from gatewayd.handshake import Accepted, ClientInfo
from gatewayd.record import Reason

logger = logging.getLogger("gatewayd.auth")

#: The longest a forward-auth exchange may take (less if backend_connect_timeout is less).
AUTH_TIMEOUT_MAX = 5.0
#: Largest answer head read from an auth service.
MAX_AUTH_HEAD = 16384
#: Largest body of a 401/403 relayed from an auth service.
MAX_AUTH_BODY = 4096
#: bcrypt reads at most this many bytes of a password.
BCRYPT_MAX_PASSWORD = 72
_RECEIVE_SIZE = 16384

_BCRYPT_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "gatewayd_bcrypt_limiter"
)


def _bcrypt_limiter() -> trio.CapacityLimiter:
    """One limiter per trio run: at most one bcrypt thread per CPU."""
    try:
        return _BCRYPT_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        _BCRYPT_LIMITER.set(limiter)
        return limiter


class UserTable:
    """The users of one ``auth = "basic"`` route, ready for uniform-time checks."""

    def __init__(self, auth: BasicAuth) -> None:
        self._entries = [(hashlib.sha256(user).digest(), hashed) for user, hashed in auth.users]
        costs = collections.Counter(hashed[4:6] for _, hashed in auth.users)
        cost = costs.most_common(1)[0][0] if costs else b"10"
        # A well-formed bcrypt hash no password matches: the salt and hash
        # are all zero bits, the cost is the file's most common one.
        self.dummy = b"$2b$" + cost + b"$" + b"." * 53

    def verify(self, credentials: BasicCredentials) -> bool:
        """True if the user exists and the password matches. Blocking (bcrypt):
        run it in a worker thread."""
        wanted = hashlib.sha256(credentials.user).digest()
        found: bytes | None = None
        for digest, hashed in self._entries:
            if hmac.compare_digest(digest, wanted):
                found = hashed  # no break: every entry is compared
        matched = bcrypt.checkpw(
            credentials.password[:BCRYPT_MAX_PASSWORD], found if found is not None else self.dummy
        )
        return matched and found is not None


def service_request_headers(
    service: ForwardAuth, accepted: Accepted, client: ClientInfo
) -> list[tuple[bytes, bytes]]:
    """The headers of the GET sent to a forward-auth service (pure).

    The conventional names of nginx ``auth_request`` and Traefik
    ``forwardAuth``: ``X-Forwarded-Method``, ``-Proto``, ``-Host``, ``-Uri``,
    ``X-Original-URI``, ``X-Forwarded-For``, ``X-Real-IP``; plus the client's
    ``Origin``, ``Cookie`` and ``Authorization`` as sent.
    """
    request = accepted.request
    uri = request.path if request.query is None else f"{request.path}?{request.query}"
    headers = [
        ("Host", service.host_header),
        ("X-Forwarded-Method", request.method),
        ("X-Forwarded-Proto", "https" if client.tls else "http"),
        ("X-Forwarded-Host", accepted.host_header),
        ("X-Forwarded-Uri", uri),
        ("X-Original-URI", uri),
        ("X-Forwarded-For", client.address),
        ("X-Real-IP", client.address),
    ]
    for name in ("Origin", "Cookie", "Authorization"):
        headers.extend((name, value) for value in request.get_all(name))
    headers.append(("Connection", "close"))
    return [(name.encode("ascii"), value.encode("latin-1")) for name, value in headers]


async def _open(service: ForwardAuth) -> trio.SocketStream:
    try:
        if service.scheme == "unix":
            assert service.unix_path is not None
            return await trio.open_unix_socket(str(service.unix_path))
        assert service.host is not None and service.port is not None
        stream = await trio.open_tcp_stream(service.host, service.port)
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, "") or type(exc).__name__
        raise AuthServiceFailed(
            service.url, f"connect failed: {reason} {exc.strerror or exc}"
        ) from None
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


async def _receive(stream: trio.abc.Stream, service: ForwardAuth) -> bytes:
    try:
        return bytes(await stream.receive_some(_RECEIVE_SIZE))
    except trio.BrokenResourceError:
        raise AuthServiceFailed(service.url, "connection reset before the answer") from None


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, service: ForwardAuth) -> bytes:
    """Up to MAX_AUTH_BODY bytes of the answer's body."""
    body = bytearray()
    await read_answer_body(conn, stream, body, MAX_AUTH_BODY)
    return bytes(body[:MAX_AUTH_BODY])


async def ask_service(service: ForwardAuth, accepted: Accepted, client: ClientInfo) -> Headers:
    """Ask ``service`` about the request; the caller bounds the time.

    Returns:
        On a 2xx answer, the ``auth_response_headers`` it carried (as
        (configured name, value) pairs, in the answer's order).

    Raises:
        AuthDenied: the service answered 401 or 403 (to be relayed).
        AuthServiceFailed: refused, reset, malformed, or another status.
    """
    stream = await _open(service)
    try:
        return await _exchange(stream, service, accepted, client)
    finally:
        stream.socket.close()


async def _exchange(
    stream: trio.SocketStream, service: ForwardAuth, accepted: Accepted, client: ClientInfo
) -> Headers:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_AUTH_HEAD)
    data = conn.send(
        h11.Request(
            method="GET",
            target=service.target,
            headers=service_request_headers(service, accepted, client),
        )
    )
    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError:
        raise AuthServiceFailed(service.url, "connection reset while sending the request") from None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise AuthServiceFailed(service.url, f"malformed answer: {exc}") from None
        if event is h11.NEED_DATA:
            conn.receive_data(await _receive(stream, service))
            continue
        if isinstance(event, h11.InformationalResponse):
            continue  # 100 Continue and the like
        if isinstance(event, h11.ConnectionClosed):
            raise AuthServiceFailed(service.url, "closed the connection before answering")
        if not isinstance(event, h11.Response):
            raise AuthServiceFailed(service.url, f"unexpected answer event {type(event).__name__}")
        status = event.status_code
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in event.headers.raw_items()
        ]
        if 200 <= status < 300:
            wanted = {name.lower(): name for name in service.response_headers}
            return tuple(
                (wanted[name.lower()], value) for name, value in headers if name.lower() in wanted
            )
        if status in (401, 403):
            body = await _read_body(conn, stream, service)
            relayed = [(n, v) for n, v in headers if n.lower() == "www-authenticate"]
            content_type = next((v for n, v in headers if n.lower() == "content-type"), None)
            raise AuthDenied(
                status,
                headers=relayed,
                payload=body,
                content_type=content_type if body else None,
                detail=f"auth service {service.url} answered {status}",
            )
        raise AuthServiceFailed(service.url, f"answered {status} (only 2xx, 401 and 403 are meaningful)")


class Authenticator:
    """Row 14a's I/O half for one configuration generation.

    Built from a validated configuration (no I/O at construction); holds each
    basic-auth route's :class:`UserTable` and each caching forward-auth
    route's :class:`~gatewayd.access.AnswerCache`, by route key path.
    """

    def __init__(self, config: Config) -> None:
        self._users: dict[str, UserTable] = {}
        self._caches: dict[str, AnswerCache] = {}
        for host in config.hosts:
            for route in host.routes:
                if isinstance(route.auth, BasicAuth):
                    self._users[route.key_path] = UserTable(route.auth)
                elif isinstance(route.auth, ForwardAuth) and route.auth.cache_seconds > 0:
                    self._caches[route.key_path] = AnswerCache(route.auth.cache_seconds)
        self.service_timeout = min(config.gateway.backend_connect_timeout, AUTH_TIMEOUT_MAX)
        self.password_timeout = config.gateway.handshake_timeout

    def cache_of(self, route: RouteConfig) -> AnswerCache | None:
        """The answer cache of a forward-auth route (None when it does not cache)."""
        return self._caches.get(route.key_path)

    async def authorize(self, accepted: Accepted, client: ClientInfo) -> Accepted:
        """Finish row 14a for ``accepted``.

        Returns:
            ``accepted``, with the forward-auth service's headers for the
            backend in :attr:`Accepted.auth_headers`.

        Raises:
            HandshakeRejected: 401 (wrong user or password), or 503 when the
                password checks are too busy to finish in time.
            AuthDenied: the auth service's 401/403, to relay.
            AuthServiceFailed: the auth service failed (503).
        """
        route = accepted.route
        if isinstance(route.auth, BasicAuth):
            await self._check_password(route, route.auth, accepted.credentials)
            return accepted
        if isinstance(route.auth, ForwardAuth):
            headers = await self._ask(route, route.auth, accepted, client)
            return replace(accepted, auth_headers=headers)
        return accepted

    async def _check_password(
        self, route: RouteConfig, auth: BasicAuth, credentials: BasicCredentials | None
    ) -> None:
        assert credentials is not None, "decide() parses Basic credentials first"
        table = self._users[route.key_path]
        with trio.move_on_after(self.password_timeout) as scope:
            ok = await trio.to_thread.run_sync(
                table.verify, credentials, limiter=_bcrypt_limiter()
            )
        if scope.cancelled_caught:
            raise HandshakeRejected(
                Reason.AUTH_BUSY,
                f"password check for {route.key_path} not done within {self.password_timeout}s",
            )
        if not ok:
            raise unauthorized(auth, "wrong user name or password")

    async def _ask(
        self, route: RouteConfig, service: ForwardAuth, accepted: Accepted, client: ClientInfo
    ) -> Headers:
        cache = self._caches.get(route.key_path)
        key: bytes | None = None
        if cache is not None:
            request = accepted.request
            key = credential_key(
                request.get_all("cookie"),
                request.get_all("authorization"),
                (
                    ("method", request.method),
                    ("host", accepted.host_header),
                    ("uri", request.target),
                    *(("origin", origin) for origin in request.get_all("origin")),
                    ("client", client.address),
                ),
            )
            if key is not None:
                cached = cache.get(key, trio.current_time())
                if cached is not None:
                    return cached
        try:
            with trio.fail_after(self.service_timeout):
                headers = await ask_service(service, accepted, client)
        except trio.TooSlowError:
            raise AuthServiceFailed(
                service.url, f"no answer within {self.service_timeout:g}s"
            ) from None
        if cache is not None and key is not None:
            cache.put(key, headers, trio.current_time())
        return headers
