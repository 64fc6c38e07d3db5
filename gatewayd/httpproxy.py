"""The HTTP proxy of ``http = true`` routes: one plain request to the route's backend.

Theory of operation
-------------------
:meth:`HTTPProxy.proxy` takes one :class:`~gatewayd.exchange.Exchange` (the
client side, h11 in the server role) and an accepted plain request, and
relays it to one backend of the route over a second h11 connection in the
client role (SPEC section 7, "HTTP proxy"):

1. **framing** (:func:`gatewayd.http.request_framing`): ambiguous framing is
   400, a declared body over ``max_body_size`` 413, before anything else.
2. ``Expect: 100-continue``: our own ``100 Continue`` (the backend never
   sees the Expect), then the body's first piece is read *before* a backend
   is chosen, so a body that is malformed from its first byte (a bad chunk
   size) gets 400 with nothing sent anywhere.
3. **backend**: the connection kept from this client connection's previous
   request when it is to the same route and its backend is not marked down
   ("prefer the last server", like HAProxy's keep-alive), else one chosen,
   connected and retried exactly as for upgrades
   (:func:`gatewayd.backend.connect`: balancing, passive health,
   ``backend_max_connections``, 502/503/504 by SPEC rows 15-17). A backend
   connection belongs to one client connection only.
4. **exchange**: the request head rebuilt from the parsed parts
   (:func:`gatewayd.http.proxy_request_headers`), then two tasks: the
   *upload* carries the body's pieces to the backend as they arrive, the
   *download* reads the backend's answer and relays it as it arrives: 1xx
   relayed (a 101 is a 502: never a tunnel), the head with hop-by-hop
   headers removed, the body re-framed by h11. Each side waits for the
   other's reads (``send_all`` returns when the bytes are taken), so a slow
   reader slows the writer and at most one piece of each direction is held
   in memory. ``http_timeout`` bounds the wait for the answer head and each
   read of its body.
5. **after**: the backend connection is kept for the next request when both
   of its h11 sides are DONE; otherwise it is closed. A failure after the
   answer head went out closes the client connection (no 502 in the middle
   of a body).

A kept backend connection that the backend closed while it was idle is
noticed before it is used (it is readable: its EOF) and replaced by a fresh
one. A request without a body sent on a kept connection that the backend
closed just as we sent is sent once more on a fresh connection when its
method is idempotent (RFC 9112 section 9.3.1); any other gets 502.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable
from dataclasses import dataclass

import h11
import trio

from gatewayd.backend import BackendPool, connect, open_stream_by
from gatewayd.balancer import BackendState, Balancer
from gatewayd.config import BackendTarget, GatewaySettings, RouteConfig
from gatewayd.errors import (
    BackendBadUpgrade,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ClientDisconnected,
    HandshakeRejected,
    NoBackendAvailable,
)
from gatewayd.exchange import Exchange
from gatewayd.handshake import Accepted, ClientInfo
from gatewayd.http import (
    BodyFraming,
    body_limit,
    check_declared_length,
    may_retry,
    proxy_request_headers,
    relayed_response_headers,
    request_framing,
    too_large,
)

logger = logging.getLogger("gatewayd.httpproxy")

#: Bytes asked of the backend stream per read.
RECEIVE_SIZE = 65536
#: Bound on closing a backend stream (TLS close_notify to a peer that does not read).
CLOSE_SECONDS = 1.0

#: (backend URL, error or None, seconds) after each connect attempt, for metrics.
Report = Callable[[str, "BackendError | None", float], None]


class BackendGone(Exception):
    """The backend failed after the answer head went out: the client connection ends."""


@dataclass(eq=False)
class BackendSession:
    """A backend connection of one client connection, kept between its requests.

    Attributes:
        stream: the byte stream to the backend.
        conn: h11 in the client role, between two requests when kept.
        balancer / state: the lease it holds (released when it closes).
        route_key: the route it was opened for (``host[0].route[1]``).
        generation: the configuration generation it was opened under.
        reused: it served a request before (a failure before any answer may
            then be the backend closing an idle connection).
    """

    stream: trio.abc.Stream
    conn: h11.Connection
    balancer: Balancer
    state: BackendState
    route_key: str
    generation: int
    reused: bool = False
    closed: bool = False

    @property
    def url(self) -> str:
        return self.state.url

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.balancer.release(self.state)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_SECONDS) as scope:
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # gone already: nothing to close cleanly
            if scope.cancelled_caught:
                _abort(self.stream)


def _closed_by_peer(stream: trio.abc.Stream) -> bool:
    """Whether a kept backend connection has something to read: its EOF (the
    backend closed it while idle) or bytes no request asked for. Either way it
    cannot carry the next request. A zero-timeout ``select``: no wait."""
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(transport, trio.SocketStream):
        return False
    try:
        readable, _, _ = select.select([transport.socket.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _abort(stream: trio.abc.Stream) -> None:
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(transport, trio.SocketStream):
        transport.socket.close()


@dataclass
class _Flow:
    """What the two halves of one exchange tell each other."""

    upload_done: bool = False     # the whole body reached the backend
    upload_broken: bool = False   # the backend stopped taking the body
    body_bytes: int = 0


class HTTPProxy:
    """The HTTP proxy state of one client connection: at most one kept backend connection.

    Usage (by the request loop)::

        proxy = HTTPProxy(report=...)
        try:
            for each plain request on an http route:
                await proxy.proxy(exchange, accepted, client, pool, settings, generation)
        finally:
            await proxy.aclose()
    """

    def __init__(self, report: Report | None = None) -> None:
        self.session: BackendSession | None = None
        self.report = report
        #: The backend URL the last request went to (for its access line).
        self.backend: str | None = None

    async def aclose(self) -> None:
        """Close the kept backend connection, if any."""
        session, self.session = self.session, None
        if session is not None:
            await session.aclose()

    async def proxy(
        self,
        exchange: Exchange,
        accepted: Accepted,
        client: ClientInfo,
        pool: BackendPool,
        settings: GatewaySettings,
        generation: int = 0,
    ) -> None:
        """Relay one plain request and its answer (see the module docstring).

        Gateway-made answers (400, 413, 502-504) go to the client through
        ``exchange.reject``; ``exchange.keep_alive`` tells the caller whether
        the connection may serve another request.

        Raises:
            ClientDisconnected: the client reset, closed or stalled.
            BackendGone: the backend failed after the answer head went out.
        """
        self.backend = None
        request = accepted.request
        route = accepted.route
        try:
            framing = request_framing(request)
            limit = body_limit(route, settings)
            check_declared_length(framing, limit)
            exchange.limit_body(limit)
        except HandshakeRejected as error:
            await exchange.reject(error)
            return
        first: bytes | None = None
        if framing.has_body:
            await exchange.send_continue()
            try:
                first = await exchange.receive_data()
            except HandshakeRejected as error:
                await exchange.reject(error)
                return
            if first is not None and limit and len(first) > limit:
                await exchange.reject(too_large(limit))
                return
        attempts = 2 if may_retry(request, framing) else 1
        for attempt in range(attempts):
            try:
                session = await self._session(route, client, pool, settings, generation)
            except BackendError as error:
                self.backend = None if isinstance(error, NoBackendAvailable) else error.backend
                logger.warning("%s (client %s)", error, client.address)
                await exchange.reject(error)
                return
            self.backend = session.url
            try:
                await self._exchange(session, exchange, accepted, client, framing, first, limit, settings)
            except _RetryFresh:
                await self._discard()
                if attempt + 1 < attempts:
                    logger.debug("kept connection to %s closed before answering: retrying", session.url)
                    continue
                await exchange.reject(BackendUnavailable(session.url, "closed before answering"))
                return
            except BaseException:
                await self._discard()
                raise
            break
        await self._keep_or_close(exchange)

    async def _discard(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            _abort(session.stream)
            await session.aclose()

    async def _keep_or_close(self, exchange: Exchange) -> None:
        session = self.session
        if session is None:
            return
        conn = session.conn
        if (
            exchange.keep_alive
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
        ):
            conn.start_next_cycle()
            session.reused = True
            return
        await self._discard()

    async def _session(
        self,
        route: RouteConfig,
        client: ClientInfo,
        pool: BackendPool,
        settings: GatewaySettings,
        generation: int,
    ) -> BackendSession:
        """The kept backend connection if it fits this request, else a new one.

        Raises:
            NoBackendAvailable, BackendUnavailable, BackendTimeout: as for upgrades.
        """
        balancer = pool.balancer(route)
        kept = self.session
        if kept is not None:
            fits = (
                kept.route_key == route.key_path
                and kept.generation == generation
                and any(state is kept.state for state in balancer.states)
                and not balancer.is_down(kept.state, trio.current_time())
            )
            if fits and not _closed_by_peer(kept.stream):
                return kept
            await self._discard()
        tls = pool.tls_for(route)

        async def attempt(target: BackendTarget, deadline: float) -> trio.abc.Stream:
            return await open_stream_by(target, tls, deadline)

        stream, state = await connect(
            route,
            balancer,
            client.address,
            settings.backend_connect_timeout,
            attempt,
            report=self.report,
        )
        self.session = BackendSession(
            stream=stream,
            conn=h11.Connection(h11.CLIENT),
            balancer=balancer,
            state=state,
            route_key=route.key_path,
            generation=generation,
        )
        return self.session

    async def _exchange(
        self,
        session: BackendSession,
        exchange: Exchange,
        accepted: Accepted,
        client: ClientInfo,
        framing: BodyFraming,
        first: bytes | None,
        limit: int,
        settings: GatewaySettings,
    ) -> None:
        conn = session.conn
        headers = proxy_request_headers(accepted, client, framing)
        head = conn.send(
            h11.Request(
                method=accepted.request.method,
                target=accepted.target,
                headers=headers,
            )
        )
        flow = _Flow()
        answered = False
        try:
            with trio.fail_after(settings.http_timeout):
                await session.stream.send_all(head or b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            if session.reused:
                raise _RetryFresh() from None
            error = BackendUnavailable(session.url, f"reset while sending the request ({exc})")
            self._failed(session, error)
            await exchange.reject(error)
            return

        upload_error: HandshakeRejected | ClientDisconnected | None = None
        download_error: _RetryFresh | BackendGone | ClientDisconnected | None = None
        async with trio.open_nursery() as nursery:

            async def upload() -> None:
                nonlocal upload_error
                try:
                    await self._upload(session, exchange, first, flow, limit, settings)
                except (HandshakeRejected, ClientDisconnected) as error:
                    upload_error = error
                    nursery.cancel_scope.cancel()

            if framing.has_body:
                nursery.start_soon(upload)
            else:
                flow.upload_done = True
                # Nothing to send: end the request (h11 needs EndOfMessage to read the answer).
                conn.send(h11.EndOfMessage())
            # Exceptions are carried out of the nursery by hand: raised in
            # its body they would come out wrapped in an ExceptionGroup.
            try:
                answered = await self._download(session, exchange, flow, settings)
            except (_RetryFresh, BackendGone, ClientDisconnected) as error:
                download_error = error
            finally:
                if not flow.upload_done:
                    # Answered before the body was all sent (or failed):
                    # the rest of the body is never read.
                    exchange.keep_alive = False
                nursery.cancel_scope.cancel()
        if download_error is not None:
            raise download_error
        if upload_error is not None and not answered:
            if isinstance(upload_error, HandshakeRejected):
                if not exchange.head_sent:
                    await exchange.reject(upload_error)
                    return
                raise ClientDisconnected(f"request body refused mid-answer: {upload_error}")
            raise upload_error

    async def _upload(
        self,
        session: BackendSession,
        exchange: Exchange,
        first: bytes | None,
        flow: _Flow,
        limit: int,
        settings: GatewaySettings,
    ) -> None:
        """The request body, piece by piece, client -> backend (backpressured).

        Raises:
            HandshakeRejected: 400 (malformed body), 413 (over ``limit``).
            ClientDisconnected: the client went away.
        """
        conn = session.conn
        piece = first
        while True:
            if piece is None:
                event: h11.Data | h11.EndOfMessage = h11.EndOfMessage()
            else:
                flow.body_bytes += len(piece)
                if limit and flow.body_bytes > limit:
                    raise too_large(limit)
                event = h11.Data(data=piece)
            data = conn.send(event)
            if not flow.upload_broken and data:
                try:
                    with trio.fail_after(settings.http_timeout):
                        await session.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                    # The backend stopped taking the body; its answer (if
                    # any) still comes through the download.
                    flow.upload_broken = True
                    return
            if piece is None:
                flow.upload_done = True
                return
            piece = await exchange.receive_data()

    async def _download(
        self, session: BackendSession, exchange: Exchange, flow: _Flow, settings: GatewaySettings
    ) -> bool:
        """The answer, backend -> client, as it arrives. Returns True once it was relayed whole.

        Gateway-made errors before the head are sent here (502, 504).

        Raises:
            _RetryFresh: a kept connection closed before any answer.
            BackendGone: the backend failed after the head went out.
            ClientDisconnected: the client went away.
        """
        conn = session.conn
        got_any = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return await self._backend_failed(
                    session, exchange, BackendBadUpgrade(session.url, f"malformed answer: {exc}")
                )
            if event is h11.NEED_DATA:
                # What the last receive gave is relayed before waiting for more.
                await exchange.flush()
                try:
                    with trio.fail_after(settings.http_timeout):
                        data = bytes(await session.stream.receive_some(RECEIVE_SIZE))
                except trio.TooSlowError:
                    error: BackendError = BackendTimeout(
                        session.url,
                        f"no answer within http_timeout ({settings.http_timeout:g}s)"
                        if not exchange.head_sent
                        else f"answer stalled for http_timeout ({settings.http_timeout:g}s)",
                    )
                    return await self._backend_failed(session, exchange, error)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    if session.reused and not got_any:
                        raise _RetryFresh() from None
                    return await self._backend_failed(
                        session, exchange, BackendUnavailable(session.url, f"connection reset ({exc})")
                    )
                if data:
                    got_any = True
                elif session.reused and not got_any:
                    raise _RetryFresh()
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    # Our request asked for no upgrade: never a tunnel (SPEC section 7).
                    return await self._backend_failed(
                        session,
                        exchange,
                        BackendBadUpgrade(session.url, "answered 101 to a request that asked no upgrade"),
                    )
                if event.status_code == 100 and exchange.continue_sent:
                    continue  # the client had ours already
                await exchange.send_informational(
                    event.status_code, _text_headers(event.headers.raw_items()), event.reason
                )
                continue
            if isinstance(event, h11.Response):
                session.balancer.record_success(session.state)
                headers = relayed_response_headers(
                    _text_headers(event.headers.raw_items()), event.status_code
                )
                await exchange.send_head(event.status_code, headers, reason=event.reason, flush=False)
                continue
            if isinstance(event, h11.Data):
                await exchange.send_data(bytes(event.data), flush=False)
                continue
            if isinstance(event, h11.EndOfMessage):
                await exchange.end()
                return True
            # ConnectionClosed before the end of the answer.
            return await self._backend_failed(
                session, exchange, BackendUnavailable(session.url, "closed before the end of its answer")
            )

    async def _backend_failed(
        self, session: BackendSession, exchange: Exchange, error: BackendError
    ) -> bool:
        self._failed(session, error)
        if exchange.head_sent:
            raise BackendGone(str(error))
        logger.warning("%s (%s %s)", error, exchange.request.method, exchange.request.path)
        await exchange.reject(error)
        return False

    def _failed(self, session: BackendSession, error: BackendError) -> None:
        """A backend that reset or timed out before answering counts as a failure (SPEC 2)."""
        if isinstance(error, (BackendUnavailable, BackendTimeout)):
            session.balancer.record_failure(session.state, trio.current_time())
        if self.report is not None:
            self.report(session.url, error, 0.0)


class _RetryFresh(Exception):
    """A kept backend connection closed before answering: try a fresh one."""


def _text_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
