"""Backend connections: choose, connect, forward the upgrade, read and judge the answer.

SPEC section 3 rows 15-19. One budget of ``backend_connect_timeout`` covers
everything for one client connection (:func:`connect`): choosing a backend of
the route (:mod:`gatewayd.balancer`), connecting (TCP, unix socket, plus TLS
for ``wss://``), and for passthrough backends sending the upgrade request and
reading the answer head. A plain ``HTTP/1.1 101`` head (the usual answer) is
parsed by :func:`gatewayd.handshake.parse_plain_101`, which takes only what
h11 would parse to the same event; any other answer is parsed by h11 in the
client role, from the first byte. After a 101 the bytes the backend sent
after its head (h11's ``trailing_data``) are delivered to the client after
our own 101, so that nothing the backend says early is lost.

Retries. An attempt that fails before any byte of an answer arrived
(refused, unreachable, TLS failure, timed out, reset after the request was
sent) is retried on another backend of the route, as nginx's
``proxy_next_upstream error timeout`` does, while budget is left; each
attempt gets an equal share of what is left, so one black-holed backend
cannot use up the whole budget. Once a backend has answered anything, its
answer stands: a non-101 is raised as
:class:`~gatewayd.errors.BackendRefusedUpgrade` to be relayed and the
connection is never tunnelled after it (row 18, no request smuggling).

TLS to ``wss://`` backends uses the standard library's ``ssl`` through
``trio.SSLStream`` (this side needs none of pyOpenSSL's server features):
SNI and the certificate check use the backend's host, against the system
CAs or the route's ``backend_ca``.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import select
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import h11
import trio

from gatewayd.balancer import BackendState, Balancer, Registry, iter_routes
from gatewayd.config import BackendTarget, Config, RouteConfig
from gatewayd.errors import (
    BackendBadUpgrade,
    BackendError,
    BackendRefusedUpgrade,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    ConfigErrors,
    NoBackendAvailable,
)
from gatewayd.handshake import (
    ANSWER_HEAD_END_RE,
    Accepted,
    BackendAnswer,
    ClientInfo,
    Upgraded,
    build_backend_request,
    check_backend_response,
    parse_plain_101,
)
from gatewayd.sockio import socket_io

logger = logging.getLogger("gatewayd.backend")

#: Largest backend answer head we read (status line + headers).
MAX_ANSWER_HEAD = 65536
#: Largest non-101 body relayed to the client (SPEC row 18).
MAX_RELAYED_BODY = 65536
#: A slow non-101 body stops being read this long before the backend deadline,
#: so what arrived is relayed instead of the deadline turning it into a 504.
BODY_DEADLINE_MARGIN = 0.1
_RECEIVE_SIZE = 65536

T = TypeVar("T")


@dataclass(slots=True)
class BackendConnection:
    """An upgraded backend connection, ready to splice.

    Attributes:
        stream: the byte stream to the backend (after its 101 head).
        upgraded: what the backend chose (subprotocol, extensions, extra headers).
        early: bytes the backend sent after its 101 head, to relay first.
    """

    stream: trio.abc.Stream
    upgraded: Upgraded
    early: bytes


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class BackendTLS:
    """How a route talks TLS to its ``wss://`` backends.

    Attributes:
        context: a client context (SNI and hostname check on, unless ``verify`` is off).
        trust: what certificates are checked against, for log lines.
    """

    context: ssl.SSLContext
    trust: str


def backend_tls(ca: Path | None, verify: bool) -> BackendTLS:
    """A client TLS context for backends: system CAs, or only those of ``ca``.

    Raises:
        ssl.SSLError, OSError: ``ca`` cannot be read or holds no certificate.
    """
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    # WebSocket is an HTTP/1.1 upgrade (RFC 8441's HTTP/2 variant is not used).
    context.set_alpn_protocols(["http/1.1"])
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return BackendTLS(context, "nothing (backend_tls_verify = false)")
    if ca is not None:
        return BackendTLS(context, f"backend_ca {ca}")
    return BackendTLS(context, "the system CAs")


# --------------------------------------------------------------------------- the pool


@dataclass
class BackendPool:
    """Everything one configuration needs to reach its backends.

    Attributes:
        registry: the state of every backend URL (carried over by reloads).
        balancers: one per route, by the route's key path.
        tls: the TLS settings of each route that has ``wss://`` backends, by key path.
    """

    registry: Registry
    balancers: dict[str, Balancer] = field(default_factory=dict)
    tls: dict[str, BackendTLS] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config, previous: Registry | None = None) -> BackendPool:
        """Balancers and backend TLS contexts for ``config`` (routes with backends).

        Args:
            config: the validated configuration.
            previous: the registry of the configuration being replaced; the
                state of each backend URL still named is kept.

        Raises:
            ConfigErrors: a ``backend_ca`` file that is not a valid PEM CA bundle.
        """
        registry = previous.carried_over(config) if previous is not None else Registry()
        pool = cls(registry)
        contexts: dict[tuple[Path | None, bool], BackendTLS] = {}
        problems: list[ConfigError] = []
        for route in iter_routes(config):
            pool.balancers[route.key_path] = Balancer.for_route(route, registry)
            if not any(backend.tls for backend in route.backends):
                continue
            key = (route.backend_ca, route.backend_tls_verify)
            if key not in contexts:
                try:
                    contexts[key] = backend_tls(*key)
                except (ssl.SSLError, OSError) as exc:
                    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
                    problems.append(
                        ConfigError(
                            str(config.path),
                            f"{route.key_path}.backend_ca",
                            f"cannot load CA certificates from {route.backend_ca}: {reason}",
                        )
                    )
                    continue
            pool.tls[route.key_path] = contexts[key]
        if problems:
            raise ConfigErrors(problems)
        return pool

    def balancer(self, route: RouteConfig) -> Balancer:
        return self.balancers[route.key_path]

    def tls_for(self, route: RouteConfig) -> BackendTLS | None:
        return self.tls.get(route.key_path)


# --------------------------------------------------------------------------- connecting


def _abort(stream: trio.abc.Stream) -> None:
    """Close ``stream``'s socket at once (no TLS close_notify): a failed attempt."""
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(transport, trio.SocketStream):
        transport.socket.close()


def _tls_failure(exc: BaseException, target: BackendTarget, tls: BackendTLS) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verification failed: {cause.verify_message} "
            f"(checked against {tls.trust}, for host {target.host})"
        )
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed: {cause.reason or cause}"
    return f"TLS handshake failed: {cause or exc or 'connection closed'}"


@functools.lru_cache(maxsize=1024)
def _ip_family(host: str) -> socket.AddressFamily | None:
    """AF_INET or AF_INET6 for an IP address literal, None for a name (or a scoped address)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


def _writable_now(sock: socket.socket) -> bool:
    """Whether ``sock`` is writable (or failed) right now: one ``poll`` with no timeout."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


async def _connect_ip(family: socket.AddressFamily, host: str, port: int) -> trio.SocketStream:
    """A TCP connection to an IP address: one non-blocking connect, no resolver.

    What ``trio.open_tcp_stream`` does for a literal address, without its
    happy-eyeballs nursery and task (a task, a nursery and three cancel
    scopes per backend connection, for one address there is nothing to race).

    Raises:
        OSError: the connect failed (errno set: ECONNREFUSED, ENETUNREACH...).
    """
    # Non-blocking from the start (no system call to make it so; trio's
    # wrapper below makes one more anyway).
    raw = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        error = raw.connect_ex((host, port))
        if error == errno.EINPROGRESS:
            if _writable_now(raw):
                # A backend on this host: the kernel completed the TCP
                # handshake inside connect(), no wait (and no scheduler pass)
                # needed; the caller's next receive is the checkpoint.
                await trio.lowlevel.checkpoint_if_cancelled()
            else:
                await trio.lowlevel.wait_writable(raw)
            error = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        if error:
            raise OSError(error, os.strerror(error))
        return trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    except BaseException:
        raw.close()
        raise


async def open_stream(
    target: BackendTarget, tls: BackendTLS | None = None
) -> trio.abc.Stream:
    """Open a stream to ``target``: TCP (``ws://``, ``tcp://``), a unix socket
    (``unix:``, ``unix+tcp:``) or TLS over TCP (``wss://``, handshake done).

    Raises:
        BackendUnavailable: connection refused, host unreachable, no such
            socket, TLS handshake or certificate verification failed.
    """
    stream: trio.SocketStream
    try:
        if target.unix_path is not None:
            stream = await trio.open_unix_socket(str(target.unix_path))
        else:
            assert target.host is not None and target.port is not None
            family = _ip_family(target.host)
            if family is None:
                # A name: trio resolves it and races its addresses (happy eyeballs).
                stream = await trio.open_tcp_stream(target.host, target.port)
            else:
                stream = await _connect_ip(family, target.host, target.port)
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, "") or type(exc).__name__
        raise BackendUnavailable(
            target.url, f"connect failed: {reason} {exc.strerror or exc}"
        ) from None
    # (trio.SocketStream sets TCP_NODELAY on TCP sockets: frames are small
    # and latency matters, Nagle would only add delay.)
    if not target.tls:
        return stream
    if tls is None:
        stream.socket.close()
        raise RuntimeError(f"no TLS settings for the wss:// backend {target.url}")
    tls_stream = trio.SSLStream(stream, tls.context, server_hostname=target.host)
    try:
        await tls_stream.do_handshake()
    except trio.BrokenResourceError as exc:
        stream.socket.close()
        raise BackendUnavailable(target.url, _tls_failure(exc, target, tls)) from None
    except BaseException:
        stream.socket.close()
        raise
    return tls_stream


async def open_stream_by(
    target: BackendTarget, tls: BackendTLS | None, deadline: float
) -> trio.abc.Stream:
    """:func:`open_stream` under ``deadline`` (trio time).

    Raises:
        BackendTimeout: not connected by ``deadline``.
        BackendUnavailable: as :func:`open_stream`.
    """
    start = trio.current_time()
    with trio.move_on_at(deadline):
        return await open_stream(target, tls)
    raise BackendTimeout(target.url, f"no connection within {deadline - start:.3g}s")


def _answer_from(event: h11.InformationalResponse | h11.Response) -> BackendAnswer:
    return BackendAnswer(
        status=event.status_code,
        reason=event.reason.decode("latin-1"),
        headers=tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in event.headers.raw_items()
        ),
    )


@dataclass(slots=True)
class _Progress:
    """How far an upgrade attempt got: decides whether it may be retried."""

    answered: bool = False


async def upgrade(
    target: BackendTarget,
    accepted: Accepted,
    client: ClientInfo,
    *,
    tls: BackendTLS | None = None,
    deadline: float = math.inf,
) -> BackendConnection:
    """Connect to ``target``, forward the upgrade request and validate the answer.

    Args:
        deadline: trio time by which the backend must have answered.

    Raises:
        BackendUnavailable: refused, unreachable, TLS failure, reset or closed
            before a full answer (502; retryable if nothing was answered).
        BackendTimeout: no connection or answer by ``deadline`` (504).
        BackendBadUpgrade: a 101 that breaks RFC 6455 section 4.1 (502).
        BackendRefusedUpgrade: any other status, to be relayed (row 18).
    """
    start = trio.current_time()
    progress = _Progress()
    with trio.move_on_at(deadline):
        stream = await open_stream(target, tls)
        try:
            return await _upgrade_on(stream, target, accepted, client, progress)
        except BaseException:
            _abort(stream)
            raise
    raise BackendTimeout(
        target.url,
        f"no connection or answer within {deadline - start:.3g}s",
        retryable=not progress.answered,
    )


Receive = Callable[[int], Awaitable["bytes | bytearray"]]


async def _receive(receive: Receive, target: BackendTarget, progress: _Progress) -> bytes:
    try:
        data = bytes(await receive(_RECEIVE_SIZE))
    except trio.BrokenResourceError as exc:
        raise BackendUnavailable(
            target.url,
            f"connection reset {'during' if progress.answered else 'before'} the answer "
            f"({exc.__cause__ or exc})",
            retryable=not progress.answered,
        ) from None
    if data:
        progress.answered = True
    return data


async def _upgrade_on(
    stream: trio.abc.Stream,
    target: BackendTarget,
    accepted: Accepted,
    client: ClientInfo,
    progress: _Progress,
) -> BackendConnection:
    # Plain TCP: the socket's own calls (gatewayd.sockio), without trio's
    # yield after each one: the receive below is the checkpoint.
    io = socket_io(stream)
    receive: Receive = io.receive if io is not None else stream.receive_some
    try:
        if io is not None:
            await io.send_all(build_backend_request(accepted, client))
        else:
            await stream.send_all(build_backend_request(accepted, client))
    except trio.BrokenResourceError as exc:
        raise BackendUnavailable(
            target.url, f"connection reset while sending the request ({exc.__cause__ or exc})"
        ) from None

    # The usual answer, a plain 101, is parsed here (handshake.parse_plain_101);
    # anything else (another status, a 100 first, obs-fold, a bad line, a
    # head over MAX_ANSWER_HEAD) goes to h11 with every byte received so far.
    buffer = bytearray()
    while True:
        data = await _receive(receive, target, progress)
        if not data:
            raise _closed_early(target, progress)
        buffer += data
        if buffer[0] < 0x21:
            break   # not a status line (h11 says why)
        match = ANSWER_HEAD_END_RE.search(buffer)
        if match is None:
            if len(buffer) > MAX_ANSWER_HEAD:
                break
            continue
        end = match.end()
        answer = parse_plain_101(buffer[:end]) if end <= MAX_ANSWER_HEAD else None
        if answer is None:
            break
        upgraded = check_backend_response(accepted, answer, target.url)
        return BackendConnection(stream=stream, upgraded=upgraded, early=bytes(buffer[end:]))
    return await _answer_by_h11(stream, receive, target, accepted, progress, bytes(buffer))


def _closed_early(target: BackendTarget, progress: _Progress) -> BackendUnavailable:
    return BackendUnavailable(
        target.url,
        "closed the connection "
        + ("in the middle of its answer" if progress.answered else "before answering"),
        retryable=not progress.answered,
    )


async def _answer_by_h11(
    stream: trio.abc.Stream,
    receive: Receive,
    target: BackendTarget,
    accepted: Accepted,
    progress: _Progress,
    received: bytes,
) -> BackendConnection:
    """The backend's answer through h11, starting with the bytes ``received`` so far."""
    # h11 must believe it sent the request to parse the answer; what it renders is discarded.
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_HEAD)
    conn.send(
        h11.Request(
            method="GET",
            target=accepted.target,
            headers=[("Host", "backend"), ("Connection", "Upgrade"), ("Upgrade", "websocket")],
        )
    )
    conn.send(h11.EndOfMessage())
    conn.receive_data(received)

    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BackendBadUpgrade(target.url, f"malformed answer: {exc}") from None
        if event is h11.NEED_DATA:
            data = await _receive(receive, target, progress)
            if not data:
                raise _closed_early(target, progress)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                answer = _answer_from(event)
                upgraded = check_backend_response(accepted, answer, target.url)
                early, _closed = conn.trailing_data
                return BackendConnection(stream=stream, upgraded=upgraded, early=bytes(early))
            continue  # 100 Continue and friends: keep reading
        if isinstance(event, h11.Response):
            answer = _answer_from(event)
            body = await _read_body(conn, stream)
            raise BackendRefusedUpgrade(
                target.url, answer.status, answer.reason, answer.headers, body
            )
        raise BackendBadUpgrade(target.url, f"unexpected answer event {type(event).__name__}")


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream) -> bytes:
    """Up to MAX_RELAYED_BODY bytes of a non-101 answer's body.

    The backend did answer (its head is here), so a body that is slow to come
    is relayed as far as it arrived before the caller's deadline rather than
    turning the answer into a 504: the read stops a little before it.
    """
    body = bytearray()
    deadline = trio.current_effective_deadline() - BODY_DEADLINE_MARGIN
    with trio.move_on_at(deadline):
        await read_answer_body(conn, stream, body, MAX_RELAYED_BODY)
    return bytes(body[:MAX_RELAYED_BODY])


async def read_answer_body(
    conn: h11.Connection, stream: trio.abc.Stream, body: bytearray, limit: int
) -> None:
    """Append an HTTP answer's body to ``body`` until it ends or holds ``limit``
    bytes (h11 undoes chunked framing; a reset or a framing error just ends it)."""
    while len(body) < limit:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            break
        if event is h11.NEED_DATA:
            try:
                data = bytes(await stream.receive_some(_RECEIVE_SIZE))
            except trio.BrokenResourceError:
                break
            # b"" tells h11 the connection closed: a close-delimited body ends there.
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Data):
            body += event.data
            continue
        break  # EndOfMessage, ConnectionClosed, PAUSED


# --------------------------------------------------------------------------- choosing


async def connect(
    route: RouteConfig,
    balancer: Balancer,
    client_address: str,
    budget: float,
    attempt: Callable[[BackendTarget, float], Awaitable[T]],
    *,
    report: Callable[[str, BackendError | None, float], None] | None = None,
) -> tuple[T, BackendState]:
    """Choose a backend of ``route`` and run ``attempt`` on it, retrying others.

    The chosen backend is *acquired* (counted as busy) when this returns; the
    caller releases it with ``balancer.release(state)`` when the connection
    ends.

    Args:
        route: the matched route.
        balancer: the route's balancer.
        client_address: the client's IP (for ``source_ip``).
        budget: ``backend_connect_timeout``: the whole time all attempts may take.
        attempt: connects to one backend by a deadline (trio time); raises a
            BackendError, with ``retryable`` set when another backend may be tried.
        report: called after every attempt with the backend URL, its error
            (None on success) and how long it took in seconds (for metrics).

    Returns:
        ``attempt``'s result and the chosen backend's state.

    Raises:
        NoBackendAvailable: no backend could take the connection at all (503).
        BackendError: the last attempt's error when every try failed, or the
            first one that may not be retried.
    """
    targets = dict(zip((state.url for state in balancer.states), route.backends, strict=True))
    end = trio.current_time() + budget
    tried: list[BackendState] = []
    last_error: BackendError | None = None
    while True:
        now = trio.current_time()
        state = balancer.choose(client_address, now, tried) if now < end else None
        if state is None:
            if last_error is not None:
                raise last_error
            down = sum(balancer.is_down(s, now) for s in balancer.states)
            raise NoBackendAvailable(
                f"{route.key_path} ({route.label})",
                f"no backend can take the connection: {down} of {len(balancer.states)} "
                f"down, {len(balancer.states) - down} at backend_max_connections",
                balancer.retry_after(now),
            )
        left = sum(
            1 for s in balancer.states if s not in tried and balancer.available(s, now)
        )
        deadline = now + (end - now) / max(1, left)
        balancer.acquire(state)
        started = trio.current_time()
        try:
            result = await attempt(targets[state.url], deadline)
        except BackendError as error:
            balancer.release(state)
            if report is not None:
                report(state.url, error, trio.current_time() - started)
            if isinstance(error, (BackendUnavailable, BackendTimeout)):
                if balancer.record_failure(state, trio.current_time()):
                    logger.warning(
                        "backend %s skipped for %gs after %d failed attempt(s) in a row (%s)",
                        state.url, balancer.fail_timeout, state.fails, route.key_path,
                    )
            else:
                balancer.record_success(state)  # it answered: alive, whatever it said
            if not error.retryable:
                raise
            tried.append(state)
            last_error = error
            if len(balancer.states) > 1:
                logger.warning("%s (client %s): trying another backend", error, client_address)
            continue
        except BaseException:
            balancer.release(state)
            raise
        balancer.record_success(state)
        if report is not None:
            report(state.url, None, trio.current_time() - started)
        return result, state
