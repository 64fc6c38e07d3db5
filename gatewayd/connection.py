"""One client connection, from accept to its access line (SPEC sections 3, 4 and 6).

Theory of operation
-------------------
:meth:`Connection.run` takes a connection through the SPEC's phases in order;
each is one method below, and :attr:`Connection.phase` (a
:class:`~gatewayd.record.Phase`) says which one is running, so a timeout is
handled by the phase it hit rather than worked out from flags.

1. **Preamble** (:meth:`Connection._preamble`, SPEC rows 1-2): on a
   ``proxy_protocol`` listener the PROXY header (:mod:`gatewayd.proxy_protocol`)
   gives the client's address, and only then are the per-address limits
   applied; the bytes read past it are replayed to TLS (:class:`ReplayStream`).
   Then, on a TLS listener, the TLS handshake: SNI chooses the host, mTLS
   hosts verify the client certificate.
2. **Request loop** (:meth:`Connection._request`, rows 3-20): read one request
   head (bounded by ``max_request_head``), decide (the pure
   :func:`gatewayd.handshake.decide`, then row 14a's I/O half in
   :meth:`gatewayd.auth.Authenticator.authorize`), connect the backend
   (:func:`gatewayd.backend.connect`, rows 15-19) and answer. One request ends
   in one of three ways: answered and the connection closes
   (:attr:`Step.CLOSE`), answered and the next request may follow on the same
   connection (:attr:`Step.KEEP_ALIVE`, HTTP keep-alive, SPEC section 7), or
   upgraded: our 101 was sent and a :class:`Tunnel` is returned. Every failure
   on the way is a typed error (:mod:`gatewayd.errors`) caught in one place and
   answered by :meth:`Connection._refuse`. A WebSocket handshake's answer is
   always :attr:`Step.CLOSE` or a tunnel; a plain request on an ``http``
   route (:func:`gatewayd.http.decide_request` dispatches it, and
   :meth:`Connection._http` answers it through an
   :class:`~gatewayd.exchange.Exchange` and :class:`~gatewayd.httpproxy.HTTPProxy`)
   may keep the connection: the next head's first byte may take
   ``http_keepalive_timeout`` (:meth:`Connection._wait_next`), the head
   itself ``handshake_timeout``, and it is answered under the gateway's
   configuration of that moment. Each plain request has its own access line.
3. **Tunnel** (:meth:`Connection._tunnel`, section 4): bytes spliced both ways,
   or for a ``tcp://`` backend bridged (the engine of :mod:`gatewayd.wsbridge`),
   until either side ends it: in the data plane (gatewayd/dataplane.py) when
   both ends are sockets, else in this task (:func:`gatewayd.splice.splice`,
   :class:`gatewayd.bridge.Bridge`).
4. **Record** (:meth:`Connection._finish`): the metrics and the access line,
   from one :class:`~gatewayd.record.AccessRecord`.

The PROXY header, the TLS handshake and the first request head share one
deadline of ``handshake_timeout`` (row 3): a slowloris client that dribbles
bytes gains nothing by spreading them over the phases. Each later request
head of a kept-alive connection gets a deadline of its own.

What a connection needs from the gateway it gets as narrow arguments: the
:class:`~gatewayd.server.Generation` it was accepted under (configuration,
TLS contexts, hosts, authenticator, backend pool), the metrics, an ``admit``
callable for the per-address limits (used once the PROXY header named the
client) and the gateway's shutdown event (which tells a shutdown from a
``max_connection_age`` retirement). The gateway closes it early with
:meth:`Connection.close_at`.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from gatewayd import memory, staticio
from gatewayd.acme.challenges import http01_request
from gatewayd.acme.store import Store
from gatewayd.backend import BackendConnection, connect, open_stream_by, upgrade
from gatewayd.balancer import BackendState, Balancer
from gatewayd.bridge import Bridge
from gatewayd.config import BackendTarget, ListenerConfig
from gatewayd.dataplane import BridgeTunnel, DataPlane, can_take, take_over
from gatewayd.dataplane import Tunnel as PlaneTunnel
from gatewayd.errors import (
    AuthServiceFailed,
    BackendError,
    BackendRefusedUpgrade,
    ClientDisconnected,
    HandshakeRejected,
    HandshakeTimeout,
    NoBackendAvailable,
    NotTLS,
    PeerError,
    ProxyProtocolError,
    TLSHandshakeFailed,
    UnknownServerName,
)
from gatewayd.exchange import Exchange
from gatewayd.handshake import (
    Accepted,
    ClientInfo,
    RequestHead,
    bridge_upgraded,
    find_head_end,
    parse_request_head,
    render_refusal,
    render_response,
    render_switching_protocols,
)
from gatewayd.http import Kind, decide_request
from gatewayd.httpproxy import BackendGone, HTTPProxy
from gatewayd.limits import client_key
from gatewayd.log import ACCESS_LOGGER
from gatewayd.metrics import UNROUTED, Metrics
from gatewayd.proxy_protocol import MAX_HEADER_BYTES
from gatewayd.proxy_protocol import parse as parse_proxy_header
from gatewayd.record import AccessRecord, End, Phase, Reason
from gatewayd.routing import HostTable
from gatewayd.splice import CHUNK, SpliceStats, splice
from gatewayd.static import https_redirect
from gatewayd.transport import send_and_linger

if TYPE_CHECKING:
    from gatewayd.server import Generation

# Connection events keep the logger name they always had: operators filter on it.
logger = logging.getLogger("gatewayd.server")
access_logger = logging.getLogger(ACCESS_LOGGER)

#: Bound on closing a stream (a TLS close_notify to a peer that does not read).
CLOSE_SECONDS = 1.0
#: Bound on delivering a final (non-101) answer: a client that never reads
#: must not hold its connection slot forever.
FINAL_ANSWER_SECONDS = 10.0

#: ``admit(key, address, generation)``: apply the per-address limits to a
#: client; True when admitted (the gateway releases ``key`` when the
#: connection ends), False when refused.
Admit = Callable[[str, str, "Generation"], bool]


class Step(enum.Enum):
    """How one answered request leaves the connection (the request loop's outcome)."""

    KEEP_ALIVE = "keep_alive"   # the next request may follow on this connection (SPEC 7)
    CLOSE = "close"             # close the connection (every WebSocket handshake answer)


@dataclass(frozen=True, slots=True)
class Tunnel:
    """A request that got its 101: what the tunnel phase needs, nothing more.

    (The handshake's parsed head and decision are dropped before the tunnel:
    about 2 KiB less per idle connection.)

    Attributes:
        backend: the backend stream, past its 101 (passthrough) or raw (bridge).
        bridge: True for a ``tcp://`` backend: WebSocket messages <-> bytes.
        max_message_size: the bridge's message limit (close 1009 above it).
        early: for the bridge, the client's bytes that came with its head
            (its first frames); a passthrough tunnel has passed them on already.
    """

    backend: trio.abc.Stream
    bridge: bool = False
    max_message_size: int = 0
    early: bytes = b""


class _ClientGone(Exception):
    """The client closed or reset the connection before its request was complete."""

    def __init__(self, end: End) -> None:
        super().__init__(end.value)
        self.end = end


def _http_date() -> str:
    return email.utils.formatdate(usegmt=True)


async def close_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream`` within CLOSE_SECONDS, even while being cancelled."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(CLOSE_SECONDS) as scope:
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, TLSHandshakeFailed):
                pass  # the peer is gone already; nothing left to close cleanly
        if scope.cancelled_caught:
            # Down the wrappers (TLS, PROXY replay) to the socket.
            transport: object = stream
            while not isinstance(transport, trio.SocketStream):
                inner = getattr(transport, "transport_stream", None)
                if inner is None:
                    return
                transport = inner
            transport.socket.close()


class ReplayStream(trio.abc.HalfCloseableStream):
    """A stream that first returns bytes already read from its transport.

    After the PROXY header, the rest of what was read (the start of the
    client's TLS ClientHello or request) must reach TLS first: TLSStream
    wraps any trio stream, so it wraps this one.
    """

    def __init__(self, transport_stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.transport_stream = transport_stream
        self._prefix = prefix
        self._closed = False
        self._receiving = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if not self._prefix:
            return await self.transport_stream.receive_some(max_bytes)
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
        finally:
            self._receiving = False
        size = len(self._prefix) if max_bytes is None else max_bytes
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        return data

    def take_prefix(self) -> bytes:
        """The bytes not returned yet, taken out (the data plane takes the socket over)."""
        prefix, self._prefix = self._prefix, b""
        return prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        self._prefix = b""
        await self.transport_stream.aclose()


def _is_trusted(address: str, networks: tuple[Any, ...]) -> bool:
    """Whether ``address`` is in ``[gateway] trusted_proxies``."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


async def send_and_close(stream: trio.abc.Stream, data: bytes) -> None:
    """Send a final response, half-close, drain what the client still sends, close.

    All of it within FINAL_ANSWER_SECONDS (plus the close bound): a client
    that does not read its answer is closed anyway.
    """
    try:
        with trio.move_on_after(FINAL_ANSWER_SECONDS):
            await _deliver_and_linger(stream, data)
    finally:
        await close_quietly(stream)


async def _deliver_and_linger(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await send_and_linger(stream, data, receive_size=CHUNK)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass  # the client went away first; the answer was best effort


def peer_address(stream: trio.SocketStream) -> tuple[str, int]:
    """The TCP peer's (address, port); ``("-", 0)`` once it is gone."""
    try:
        peer: Any = stream.socket.getpeername()
    except OSError:
        return ("-", 0)
    if isinstance(peer, tuple):
        return (str(peer[0]), int(peer[1]))
    return (str(peer) or "unix", 0)


#: What a handshake timeout was waiting for, by the phase it hit (row 3).
_WAITING_FOR = {
    Phase.PROXY_HEADER: "PROXY header",
    Phase.TLS: "TLS handshake",
    Phase.REQUEST_HEAD: "request head",
}
#: The ``reason`` label of ``gatewayd_tls_handshake_failures_total`` by refusal.
_TLS_FAILURE_KIND = {Reason.PLAIN_HTTP: "plain_http", Reason.UNKNOWN_SNI: "unknown_sni"}


def _with_implied_host(request: RequestHead, client: ClientInfo, hosts: HostTable) -> RequestHead:
    """An HTTP/1.0 request without Host is for the host the connection is on.

    Host is optional in HTTP/1.0 (RFC 1945); nginx serves such a request from
    the server TLS chose (or the default server). It gets that host's name as
    its Host: the SNI name when TLS matched it, else the host's first exact
    name (a plain listener: the default host's). Without such a host it stays
    as it is (400, row 5, like an HTTP/1.1 request without Host).
    """
    if request.http_version != "1.0" or request.get_all("host"):
        return request
    host = client.tls_host if client.tls else hosts.default
    if host is None:
        return request
    name = client.server_name if client.tls and hosts.find(client.server_name) is host else None
    if name is None:
        name = next((n for n in host.names if not n.startswith("*.")), None)
    if name is None:
        return request
    return replace(request, headers=(*request.headers, ("Host", name)))


class Connection:
    """One client connection, from accept to the access log line.

    Args:
        stream: the accepted TCP stream.
        listener: the ``[[listener]]`` it came in on.
        generation: the configuration it runs on, to the end.
        metrics: where its events are counted.
        admit: the per-address limits, for a client named by a PROXY header
            (see :data:`Admit`).
        shutdown: set when the gateway began shutting down.
        limit_key: the per-address limits' key when the gateway admitted the
            client at accept (no PROXY header); released when it ends.
        https_port: the port of the first TLS listener now (None: none), for
            a ``redirect_https`` listener's Location.
    """

    # Slots: an idle connection holds one of these for hours (docs/performance.md).
    __slots__ = (
        "transport",
        "raw",
        "stream",
        "listener",
        "generation",
        "settings",
        "metrics",
        "_admit",
        "_shutdown",
        "_method",
        "limit_key",
        "client_address",
        "client_port",
        "started",
        "accepted_at",
        "phase",
        "_head_started",
        "stats",
        "backend",
        "lease",
        "bridge",
        "scope",
        "labels",
        "record",
        "_current",
        "accepted_generation",
        "requests",
        "_pending",
        "_idle",
        "proxy",
        "_line_owed",
        "_nodelay",
        "_https_port",
        "_dataplane",
        "_done",
        "handed_off",
        "_plane_tunnel",
        "_bridged",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        listener: ListenerConfig,
        generation: Generation,
        *,
        metrics: Metrics,
        admit: Admit,
        shutdown: trio.Event,
        limit_key: str | None = None,
        current: Callable[[], Generation] | None = None,
        https_port: Callable[[], int | None] = lambda: None,
        dataplane: DataPlane | None = None,
        done: Callable[[Connection], None] | None = None,
    ) -> None:
        self.transport = stream
        #: What TLS (or HTTP) reads from: the transport, or after a PROXY
        #: header a ReplayStream giving the bytes read past it first.
        self.raw: trio.abc.HalfCloseableStream = stream
        #: What the request loop reads from and answers on: ``raw``, or TLS over it.
        self.stream: trio.abc.Stream = stream
        self.listener = listener
        self.generation = generation
        self.settings = generation.config.gateway
        self.metrics = metrics
        self._admit = admit
        self._shutdown = shutdown
        #: The per-address limits' key once admitted (released at the end).
        self.limit_key = limit_key
        self.client_address, self.client_port = peer_address(stream)
        self.started = time.monotonic()
        self.accepted_at = trio.current_time()
        self.phase = (
            Phase.PROXY_HEADER if listener.proxy_protocol
            else Phase.TLS if listener.tls
            else Phase.REQUEST_HEAD
        )
        #: Whether a byte of the current request head arrived (a 408 then, row 3).
        self._head_started = False
        self.stats = SpliceStats()
        self.backend: trio.abc.Stream | None = None
        #: The backend this connection counts against, released when it ends.
        self.lease: tuple[Balancer, BackendState] | None = None
        self.bridge: Bridge | None = None
        self.scope = trio.CancelScope()
        #: (host, route) metric labels: UNROUTED until decide() chose a route.
        self.labels = UNROUTED
        self.record = AccessRecord(client=f"{self.client_address}:{self.client_port}")
        # The request loop (SPEC section 7). ``current`` gives the gateway's
        # configuration now: a kept-alive connection's next request uses it.
        self._current = current
        self._https_port = https_port
        self.accepted_generation = generation
        #: Requests read on this connection so far.
        self.requests = 0
        #: Bytes received after the last request: the start of the next one.
        self._pending = b""
        #: The wait for a kept-alive connection's next request (a shutdown cancels it).
        self._idle: trio.CancelScope | None = None
        #: Plain HTTP: the backend connection kept between requests (made by
        #: the first plain request: a WebSocket connection never needs one).
        self.proxy: HTTPProxy | None = None
        #: False when the last request had its own access line (plain HTTP):
        #: the connection's own line would only repeat it.
        self._line_owed = True
        #: The method of the request being answered (None before its head is parsed).
        self._method: str | None = None
        self._nodelay = False
        #: The process's data plane (gatewayd.dataplane): spliced connections
        #: leave this task for it. None: the tunnel stays in this task.
        self._dataplane = dataplane
        #: Called once when the connection is over, wherever it ended (the
        #: gateway's bookkeeping): at the end of run(), or from the data plane.
        self._done = done
        #: True once the tunnel was handed to the data plane: run() returns
        #: then, and the data plane ends the connection (:meth:`_plane_ended`).
        self.handed_off = False
        self._plane_tunnel: PlaneTunnel | BridgeTunnel | None = None
        self._bridged = False

    def close_at(self, deadline: float) -> None:
        """Close this connection at ``deadline`` (trio time) at the latest.

        A bridged connection is asked to send close 1001 (Going Away) then,
        and is cut ``CLOSE_SECONDS`` later if the client does not answer.
        """
        if self._plane_tunnel is not None:
            self._plane_tunnel.close_at(deadline, self._closed_by_gateway())
            return
        if self.bridge is not None:
            self.bridge.go_away_at(deadline, self._closed_by_gateway())
            deadline += CLOSE_SECONDS
        self.scope.deadline = min(self.scope.deadline, deadline)

    def close_if_idle(self) -> None:
        """Shutdown: a kept-alive connection waiting for its next request closes now (SPEC 7)."""
        if self._idle is not None:
            self._idle.cancel()

    def _closed_by_gateway(self) -> End:
        return End.SHUTDOWN if self._shutdown.is_set() else End.MAX_AGE

    async def run(self) -> None:
        """All the phases, then close what is open and write the record.

        A tunnel handed to the data plane returns at once; the data plane
        ends the connection later (:meth:`_plane_ended`).
        """
        try:
            with self.scope:
                await self._serve()
            if self.handed_off:
                return
            if self.scope.cancelled_caught and self.record.end is None:
                self.record.end = self._closed_by_gateway()
        except trio.Cancelled:
            if self.record.end is None:
                self.record.end = End.SHUTDOWN
            raise
        finally:
            if not self.handed_off:
                if self.proxy is not None:
                    await self.proxy.aclose()
                self._release_backend()
                if self.backend is not None:
                    await close_quietly(self.backend)
                await close_quietly(self.stream)
                self._finish()
                if self._done is not None:
                    self._done(self)

    def _release_backend(self) -> None:
        if self.lease is not None:
            balancer, state = self.lease
            self.lease = None
            balancer.release(state)

    async def _serve(self) -> None:
        """Preamble, the request loop, the tunnel; ``run`` closes what is open afterwards."""
        # One deadline for the PROXY header, TLS and the first head (row 3).
        deadline = trio.current_time() + self.settings.handshake_timeout
        with trio.move_on_at(deadline) as timer:
            try:
                ready = await self._preamble()
            except _ClientGone as gone:
                self.record.end = gone.end
                return
        if timer.cancelled_caught:
            await self._timed_out()
            return
        if not ready:
            return
        while True:
            outcome = await self._request(deadline)
            if isinstance(outcome, Tunnel):
                break
            if outcome is Step.CLOSE:
                return
            # Step.KEEP_ALIVE: the next head gets a deadline of its own,
            # from its first byte on.
            if not await self._wait_next():
                return
            deadline = trio.current_time() + self.settings.handshake_timeout
        await self._tunnel(outcome)

    async def _wait_next(self) -> bool:
        """Between two requests of a kept-alive connection (SPEC section 7, "Keep-alive").

        The next request uses the gateway's configuration now (a reload in
        between applies to it). Its first byte may take
        ``http_keepalive_timeout``; a shutdown ends the wait at once
        (:meth:`close_if_idle`). False when the connection is to close.
        """
        if self._shutdown.is_set():
            self.record.end = End.SHUTDOWN
            return False
        if not self._pending and not await self._wait_first_byte():
            return False
        # The configuration of the moment the request came (a reload while
        # the connection was idle applies to it).
        if self._current is not None and self._current() is not self.generation:
            self.generation = self._current()
            self.settings = self.generation.config.gateway
            if self.proxy is not None:
                await self.proxy.aclose()   # its backends belong to the old configuration
        return True

    async def _wait_first_byte(self) -> bool:
        """Up to ``http_keepalive_timeout`` for the next request's first byte."""
        with trio.move_on_after(self.settings.http_keepalive_timeout) as idle:
            self._idle = idle
            try:
                data = bytes(await self.stream.receive_some(CHUNK))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.record.end = End.CLIENT_ERROR
                return False
            finally:
                self._idle = None
        if idle.cancelled_caught:
            self.record.end = End.SHUTDOWN if self._shutdown.is_set() else End.KEEPALIVE_TIMEOUT
            return False
        if not data:
            self.record.end = End.CLIENT_CLOSE
            return False
        self.record.bytes_in += len(data)
        self._pending = data
        return True

    # ------------------------------------------------------------------ 1. preamble

    async def _preamble(self) -> bool:
        """The PROXY header, then TLS (rows 1-2). False when the connection is to end."""
        if self.listener.proxy_protocol and not await self._read_proxy_header():
            return False
        if self.listener.tls:
            self.phase = Phase.TLS
            if not await self._tls_handshake():
                return False
        return True

    async def _read_proxy_header(self) -> bool:
        """Read the PROXY header; the client's address comes from it (SPEC 2, listener).

        Then apply the per-address limits to that address.

        Returns:
            False when the connection is to be closed (bad header, or a limit).
        """
        buffer = bytearray()
        while True:
            try:
                header = parse_proxy_header(buffer)
            except ProxyProtocolError as error:
                self.metrics.proxy_protocol_failed()
                logger.info(
                    "%s: bad PROXY protocol header (%s): %r; closed",
                    self.record.client, error, error.data[:48],
                )
                await self._refuse(error)
                return False
            if header is not None:
                break
            try:
                data = await self.transport.receive_some(MAX_HEADER_BYTES - len(buffer))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _ClientGone(End.CLIENT_ERROR) from None
            if not data:
                raise _ClientGone(End.CLIENT_CLOSE)
            self.record.bytes_in += len(data)
            buffer += data
        proxy = self.record.client
        if header.source is not None:
            self.client_address, self.client_port = header.source
            self.record.client = f"{self.client_address}:{self.client_port}"
        rest = bytes(buffer[header.length :])
        if rest:
            # Bytes that came in the same segment as the header (AWS NLB and
            # HAProxy send them so) go first to TLS, or, on a plain listener,
            # to the request-head reader.
            self.raw = ReplayStream(self.transport, rest)
            if not self.listener.tls:
                self.stream = self.raw
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "PROXY v%d %s from %s: client %s", header.version, header.command, proxy,
                self.record.client,
            )
        key = client_key(self.client_address)
        if not self._admit(key, self.client_address, self.generation):
            self.record.end = End.LIMITED
            return False
        self.limit_key = key
        return True

    async def _tls_handshake(self) -> bool:
        """The TLS handshake (rows 1-2). False when the connection is to be closed."""
        tls = self.generation.tls
        assert tls is not None, "a generation with a TLS listener has TLS contexts"
        if self.raw is self.transport:
            # An OpenSSL connection object costs ~20 KiB: a client that sends
            # nothing (half-open floods) gets none until its first byte.
            await trio.lowlevel.wait_readable(self.transport.socket)
        tls_stream = tls.wrap(self.raw)
        try:
            await tls_stream.do_handshake()
        except TLSHandshakeFailed as failure:
            self.metrics.tls_failed(_TLS_FAILURE_KIND.get(failure.reason, "handshake_error"))
            if isinstance(failure, NotTLS):
                logger.debug(
                    "%s sent plain HTTP to a TLS port (%d bytes)", self.record.client, len(failure.data)
                )
            elif isinstance(failure, UnknownServerName):
                self.record.sni = failure.server_name
                logger.info("%s: %s; alert unrecognized_name sent", self.record.client, failure)
            else:
                self.record.sni = tls_stream.server_name
                logger.info("TLS handshake with %s failed: %s", self.record.client, failure)
            # Row 2's 400 goes in plain text like nginx, on the raw transport.
            await self._refuse(failure, self.raw)
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.metrics.tls_failed("handshake_error")
            self.record.end = End.TLS_ERROR
            logger.debug("TLS handshake with %s failed: %s", self.record.client, exc)
            return False
        self.stream = tls_stream
        self.record.sni = tls_stream.server_name
        if tls_stream.acme_challenge:
            # RFC 8737 section 3: the validator reads the challenge certificate
            # from the handshake and sends nothing more; no HTTP, no backend.
            self.record.end = End.ACME_CHALLENGE
            self.metrics.acme_challenge_answered("tls-alpn-01")
            logger.info(
                "%s: ACME TLS-ALPN-01 validation for %s answered with the challenge certificate",
                self.record.client, tls_stream.server_name,
            )
            return False
        return True

    async def _timed_out(self) -> None:
        """The handshake deadline passed: handled by the phase it hit (row 3)."""
        if self.phase is Phase.PROXY_HEADER:
            self.metrics.proxy_protocol_failed()
            logger.info("%s sent no complete PROXY header in time", self.record.client)
        elif self.phase is Phase.TLS:
            self.metrics.tls_failed("timeout")
        await self._refuse(
            HandshakeTimeout(
                _WAITING_FOR[self.phase],
                self.settings.handshake_timeout,
                head_started=self.phase is Phase.REQUEST_HEAD and self._head_started,
            )
        )

    # ------------------------------------------------------------------ 2. request loop

    async def _request(self, deadline: float) -> Step | Tunnel:
        """One request: read its head by ``deadline``, decide, then answer or upgrade."""
        self.phase = Phase.REQUEST_HEAD
        self._head_started = bool(self._pending)
        self.requests += 1
        self._line_owed = True
        self._method = None
        if self.requests > 1:
            record = self.record
            record.path = record.host = record.route = record.backend = None
            record.status = None
        try:
            with trio.move_on_at(deadline) as timer:
                head, early = await self._read_head()
            if timer.cancelled_caught:
                await self._timed_out()
                return Step.CLOSE
            self.phase = Phase.REQUEST
            if not self.listener.tls and self.generation.acme_names and await self._answer_http01(head):
                return Step.CLOSE
            kind, accepted, client = await self._decide(head)
            if kind is not Kind.UPGRADE:
                return await self._http(kind, accepted, client, head, early)
            backend = await self._connect_backend(accepted, client)
        except _ClientGone as gone:
            self.record.end = gone.end
            return Step.CLOSE
        except (HandshakeRejected, AuthServiceFailed, BackendError) as failure:
            self._log_refusal(failure)
            await self._refuse(failure)
            return Step.CLOSE
        return await self._switch_protocols(accepted, backend, early)

    async def _read_head(self) -> tuple[bytes, bytes]:
        """Read one request head; returns (head, bytes after it).

        Raises:
            HandshakeRejected: 431 past ``max_request_head`` (row 4).
            _ClientGone: the client closed or reset first.
        """
        limit = self.settings.max_request_head
        buffer = bytearray(self._pending)   # what a kept-alive connection read ahead
        self._pending = b""
        while True:
            end = find_head_end(buffer)
            if end is not None:
                if end > limit:
                    break
                return bytes(buffer[:end]), bytes(buffer[end:])
            if len(buffer) > limit:
                break
            try:
                data = await self.stream.receive_some(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _ClientGone(End.CLIENT_ERROR) from None
            if not data:
                raise _ClientGone(End.CLIENT_CLOSE)
            self._head_started = True
            self.record.bytes_in += len(data)
            buffer += data
        raise HandshakeRejected(
            Reason.HEAD_TOO_LARGE, f"request head over max_request_head ({limit} bytes)"
        )

    async def _answer_http01(self, head: bytes) -> bool:
        """A pending ACME HTTP-01 token is answered before anything else (redirects included).

        RFC 8555 section 8.3: ``200`` with the key authorization as the body.
        Other tokens, and requests for other names, go on to the usual
        handling (a ``404`` most likely). Returns whether it answered.
        """
        try:
            request = parse_request_head(head)
        except HandshakeRejected:
            return False  # malformed: the usual path answers 400
        token = http01_request(
            request.method, request.path, request.get("host"), self.generation.acme_names
        )
        acme = self.generation.config.acme
        if token is None or acme is None:
            return False
        try:
            answer = Store(acme.state_dir).http01_answer(token)
        except OSError as exc:
            logger.warning("cannot read the ACME HTTP-01 answer for token %s: %s", token, exc)
            return False
        if answer is None:
            return False
        self.record.path = request.path
        self.record.host = request.get("host")
        self._answered(200)
        self.record.end = End.ACME_CHALLENGE
        self.metrics.acme_challenge_answered("http-01")
        logger.info("%s: ACME HTTP-01 validation for %s answered", self.record.client, request.get("host"))
        response = render_response(
            200,
            (),
            answer,
            server_header=self.settings.server_header,
            date=_http_date(),
            content_type="application/octet-stream",
        )
        self.record.bytes_out += len(response)
        await send_and_close(self.stream, response)
        return True

    def _client_info(self) -> ClientInfo:
        """What the decision knows about this connection, under the current generation.

        After a reload the host TLS chose by SNI is looked up again in the new
        host table, the way the TLS handshake chose it.

        Raises:
            _ClientGone: a reload removed that host (the connection closes).
        """
        tls_host = getattr(self.stream, "host", None)
        if tls_host is not None and self.generation is not self.accepted_generation:
            hosts = self.generation.hosts
            tls_host = hosts.find(self.record.sni) or hosts.default
            if tls_host is None:
                raise _ClientGone(End.HOST_REMOVED)
        return ClientInfo(
            address=self.client_address,
            port=self.client_port,
            tls=self.listener.tls,
            tls_host=tls_host,
            server_name=self.record.sni,
            trusted_proxy=_is_trusted(self.client_address, self.settings.trusted_proxies),
            client_subject=getattr(self.stream, "client_subject", None),
        )

    async def _decide(self, head: bytes) -> tuple[Kind, Accepted, ClientInfo]:
        """Rows 5-14a and SPEC section 7's dispatch (pure), then row 14a's I/O half.

        Authorization is complete before a backend is chosen, for bridge
        routes and plain HTTP requests too.

        Raises:
            HandshakeRejected: the first check that fails (AuthDenied included).
            AuthServiceFailed: the forward-auth service failed (503).
        """
        generation = self.generation
        client = self._client_info()
        request = _with_implied_host(parse_request_head(head), client, generation.hosts)
        self._method = request.method
        self.record.path = request.path
        self.record.host = request.get("host")
        if not self.listener.tls:
            self._before_routing(request)
        kind, accepted = decide_request(request, client, generation.hosts)
        self.record.route = f"{accepted.host.key_path}:{accepted.route.label}"
        labels = (accepted.host.names[0], accepted.route.label)
        if labels != self.labels:
            # Counted once per connection and route (a kept-alive connection's
            # requests to the same route are one routed connection).
            self.labels = labels
            self.metrics.connection_routed(labels)
        accepted = await generation.auth.authorize(accepted, client)
        return kind, accepted, client

    def _before_routing(self, request: RequestHead) -> None:
        """What a plain listener answers before any host or route is chosen.

        The ACME HTTP-01 answers (``/.well-known/acme-challenge/TOKEN``, RFC
        8555 section 8.3) come before this (:meth:`_answer_http01`), so that a
        ``redirect_https`` listener can still prove a name; then
        ``redirect_https``: every other request gets 308 to https (or 404 for
        a Host naming no host; SPEC 7).

        Raises:
            HandshakeRejected: the answer, when one of them applies.
        """
        if self.listener.redirect_https:
            raise https_redirect(request, self.generation.hosts, self._https_port())

    async def _http(
        self, kind: Kind, accepted: Accepted, client: ClientInfo, head: bytes, early: bytes
    ) -> Step:
        """A plain request on an ``http`` or ``static`` route (SPEC section 7), with its
        own access line."""
        started = time.monotonic()
        generation = self.generation
        request = accepted.request
        if not self._nodelay:
            # Answers are written in pieces (head, body, next request's
            # answer): without this, Nagle holds each small write until the
            # client's delayed ACK (tens of ms per request). nginx's tcp_nodelay.
            with contextlib.suppress(OSError):
                self.transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._nodelay = True
        exchange = Exchange(
            self.stream,
            head,
            early,
            request,
            io_timeout=self.settings.http_timeout,
            server_header=self.settings.server_header,
        )
        if self.requests >= self.settings.max_requests_per_connection or self._shutdown.is_set():
            exchange.keep_alive = False   # the answer says Connection: close
        end = End.KEEP_ALIVE
        backend: str | None = None
        try:
            if kind is Kind.STATIC:
                try:
                    await staticio.serve(exchange, accepted.route)
                except (OSError, EOFError) as failure:
                    # The file failed after its head was sent: the body is
                    # short of its Content-Length, so the connection ends here.
                    end = End.ERROR
                    logger.warning(
                        "%s %s from %s: reading the file failed: %s; connection closed",
                        request.method, request.path, self.record.client, failure,
                    )
            else:
                if self.proxy is None:
                    self.proxy = HTTPProxy(report=self._report_backend)
                await self.proxy.proxy(
                    exchange, accepted, client, generation.backends, self.settings,
                    generation.number,
                )
                backend = self.proxy.backend
        except ClientDisconnected as gone:
            end = End.CLIENT_ERROR
            logger.debug("%s %s %s: %s", self.record.client, request.method, request.path, gone)
        except BackendGone as failure:
            end = End.BACKEND_ERROR
            logger.warning(
                "%s %s from %s: %s; connection closed",
                request.method, request.path, self.record.client, failure,
            )
        leftover = exchange.leftover() if end is End.KEEP_ALIVE else None
        if leftover is None and end is End.KEEP_ALIVE:
            end = End.DONE
        duration = time.monotonic() - started
        # The connection's totals: the head (and what came with it) was
        # counted when it was read.
        record = self.record
        record.bytes_in += exchange.bytes_in - len(head) - len(early)
        record.bytes_out += exchange.bytes_out
        record.status = exchange.status
        record.backend = backend
        route = record.route or ""
        self.metrics.http_request(route, exchange.status or 0, duration)
        if generation.config.log.access_log:
            line = AccessRecord(
                client=record.client,
                sni=record.sni,
                host=record.host,
                path=request.path,
                route=route,
                backend=backend,
                status=exchange.status,
                bytes_in=exchange.bytes_in,
                bytes_out=exchange.bytes_out,
                duration=round(duration, 3),
                end=end,
                reason=exchange.refusal.reason if exchange.refusal is not None else None,
                detail=exchange.refusal.detail if exchange.refusal is not None else None,
            ).fields()
            line["method"] = request.method
            access_logger.info("access", extra={"access": line})
        self._line_owed = False
        if leftover is None:
            record.end = end
            if end is End.DONE:
                # Lingering close: a client still sending (a 413, an answer
                # before its body) gets the answer, not a reset.
                with trio.move_on_after(FINAL_ANSWER_SECONDS):
                    await _deliver_and_linger(self.stream, b"")
            return Step.CLOSE
        self._pending = leftover
        return Step.KEEP_ALIVE

    def _report_backend(self, url: str, error: BackendError | None, seconds: float) -> None:
        if error is None:
            self.metrics.backend_connected(url, seconds)
        else:
            self.metrics.backend_failed(url, error)

    async def _connect_backend(
        self, accepted: Accepted, client: ClientInfo
    ) -> BackendConnection | trio.abc.Stream:
        """Rows 15-19 under one budget of ``backend_connect_timeout``.

        Returns:
            the upgraded backend connection (passthrough), or the raw stream
            (a ``tcp://`` bridge). It counts against its backend from here.

        Raises:
            BackendError: no backend (503), unreachable (502), too slow (504),
                a relayed non-101 (row 18) or a bad 101 (502).
        """
        route = accepted.route
        assert route.backend is not None, "decide() answers redirect routes (row 9a)"
        self.record.backend = route.backend.url if len(route.backends) == 1 else None
        pool = self.generation.backends
        balancer = pool.balancer(route)
        tls = pool.tls_for(route)

        async def passthrough(target: BackendTarget, deadline: float) -> BackendConnection:
            return await upgrade(target, accepted, client, tls=tls, deadline=deadline)

        async def bridged(target: BackendTarget, deadline: float) -> trio.abc.Stream:
            return await open_stream_by(target, tls, deadline)

        def report(url: str, error: BackendError | None, seconds: float) -> None:
            if error is None:
                self.metrics.backend_connected(url, seconds)
            else:
                self.metrics.backend_failed(url, error)

        result: BackendConnection | trio.abc.Stream
        result, state = await connect(
            route,
            balancer,
            self.client_address,
            self.settings.backend_connect_timeout,
            bridged if route.bridge else passthrough,
            report=report,
        )
        self.lease = (balancer, state)
        self.record.backend = state.url
        self.backend = result.stream if isinstance(result, BackendConnection) else result
        return result

    async def _switch_protocols(
        self, accepted: Accepted, backend: BackendConnection | trio.abc.Stream, early: bytes
    ) -> Step | Tunnel:
        """Row 20: our 101, and for passthrough the early bytes both ways (section 3)."""
        self._answered(101)
        if not isinstance(backend, BackendConnection):
            switching = render_switching_protocols(accepted, bridge_upgraded(accepted))
            try:
                await self.stream.send_all(switching)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.record.end = End.CLIENT_ERROR
                logger.debug("connection lost while switching protocols: %s", exc)
                return Step.CLOSE
            self.record.bytes_out += len(switching)
            return Tunnel(
                backend, bridge=True, max_message_size=accepted.route.max_message_size, early=early
            )
        try:
            switching = render_switching_protocols(accepted, backend.upgraded)
            # Bounded like the handshake: a client that stops reading right
            # after its request must not pin the connection before the splice
            # (whose idle_timeout takes over from here).
            with trio.fail_after(self.settings.handshake_timeout):
                await self.stream.send_all(switching + backend.early)
                self.record.bytes_out += len(switching) + len(backend.early)
                if early:
                    # (already counted in bytes_in when the head was read)
                    await backend.stream.send_all(early)
        except trio.TooSlowError:
            self.record.end = End.CLIENT_ERROR
            logger.debug("%s did not take the 101 in time", self.record.client)
            return Step.CLOSE
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.record.end = End.CLIENT_ERROR
            logger.debug("connection lost while switching protocols: %s", exc)
            return Step.CLOSE
        return Tunnel(backend.stream)

    # ------------------------------------------------------------------ answers

    def _answered(self, status: int, labels: tuple[str, str] | None = None) -> None:
        """Record the answer (every one the client gets, 101 included), under its route."""
        self.record.status = status
        self.metrics.answered(status, labels or self.labels)

    def _log_refusal(self, failure: PeerError) -> None:
        """What a refused request means for the operator, beyond its access line."""
        if isinstance(failure, BackendRefusedUpgrade):
            logger.info(
                "backend %s answered %d to %s %s: relayed, connection closed",
                failure.backend, failure.response_status, self.record.client, self.record.path,
            )
        elif isinstance(failure, NoBackendAvailable):
            logger.warning("%s: 503 to %s", failure, self.record.client)
            self.metrics.no_backend(self.labels)
        elif isinstance(failure, (BackendError, AuthServiceFailed)):
            # Every backend attempt was counted by connect's report; this is the answer.
            logger.warning("%s (client %s)", failure, self.record.client)
        else:
            logger.debug("rejected %s: %s", self.record.client, failure.detail)

    async def _refuse(self, failure: PeerError, stream: trio.abc.Stream | None = None) -> None:
        """Answer ``failure`` by its row of :data:`~gatewayd.errors.ANSWERS`, then close.

        The one place a refusal is answered and recorded: status, bytes,
        ``end``, ``reason`` and ``detail``. ``stream`` is where the answer
        goes (the request stream; the raw transport for row 2).
        """
        record = self.record
        record.end = failure.answer.end
        record.reason = failure.reason
        record.detail = failure.detail
        if isinstance(failure, BackendError) and not isinstance(failure, NoBackendAvailable):
            record.backend = failure.backend
        labels = self.labels
        if isinstance(failure, HandshakeRejected) and failure.route is not None:
            if record.route is None:
                record.route = f"{failure.host.key_path}:{failure.route.label}"
            if labels == UNROUTED:
                # Rows 9a-14: refused once the route was chosen (not counted as routed).
                labels = (failure.host.names[0], failure.route.label)
        answer = render_refusal(failure, server_header=self.settings.server_header, date=_http_date())
        if answer is None:
            return
        if self._method == "HEAD":
            # The answer to a HEAD has no content (RFC 9110 section 9.3.2): the
            # same head, Content-Length included, as from nginx.
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        status = failure.status
        assert status is not None, "every answer has a status"
        self._answered(status, labels)
        record.bytes_out += len(answer)
        await send_and_close(stream if stream is not None else self.stream, answer)

    # ------------------------------------------------------------------ 3. tunnel

    async def _tunnel(self, tunnel: Tunnel) -> None:
        """Section 4: splice (passthrough) or bridge (``tcp://``) until the end.

        A tunnel over sockets (passthrough or bridge) is handed to the data
        plane (gatewayd/dataplane.py) and this task returns; streams that
        cannot leave trio (``dataplane.can_take``: in-memory test streams, for
        one) are spliced or bridged here (the bridge: the same engine, driven
        by :class:`Bridge`).
        """
        self.phase = Phase.TUNNEL
        plane = self._dataplane
        if plane is not None and plane.running and can_take(self.stream, tunnel.backend):
            await self._hand_over(plane, tunnel)
            return
        if tunnel.bridge:
            self.bridge = Bridge(
                self.stream,
                tunnel.backend,
                self.stats,
                max_message_size=tunnel.max_message_size,
                idle_timeout=self.settings.idle_timeout,
                half_close_timeout=self.settings.half_close_timeout,
            )
            self._retire_by_age()
            await self.bridge.run(tunnel.early)
        else:
            self._retire_by_age()
            await splice(
                self.stream,
                tunnel.backend,
                self.stats,
                idle_timeout=self.settings.idle_timeout,
                half_close_timeout=self.settings.half_close_timeout,
            )
        self._log_tunnel_error(tunnel.bridge)

    def _log_tunnel_error(self, bridged: bool) -> None:
        if self.stats.error:
            # A bridge client got a fixed close reason (bridge.REASONS): the
            # detail is logged here, where the operator sees it by default.
            level = logging.INFO if bridged else logging.DEBUG
            logger.log(level, "%s ended: %s", self.record.client, self.stats.error)

    async def _hand_over(self, plane: DataPlane, tunnel: Tunnel) -> None:
        """Give both sockets to the data plane; from then on it ends the connection."""
        try:
            client = await take_over(self.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.stats.end = End.CLIENT_ERROR
            self.stats.error = f"client: {type(exc).__name__}: {exc}"
            return
        backend = await take_over(tunnel.backend)
        # Nothing left to close here: the sockets belong to the data plane.
        self.handed_off = True
        self.backend = None
        settings = self.settings
        self._bridged = tunnel.bridge
        if tunnel.bridge:
            self._plane_tunnel = plane.bridge(
                client,
                backend,
                self.stats,
                max_message_size=tunnel.max_message_size,
                early=tunnel.early,
                idle_timeout=settings.idle_timeout,
                half_close_timeout=settings.half_close_timeout,
                on_end=self._plane_ended,
            )
        else:
            self._plane_tunnel = plane.splice(
                client,
                backend,
                self.stats,
                idle_timeout=settings.idle_timeout,
                half_close_timeout=settings.half_close_timeout,
                on_end=self._plane_ended,
            )
        self._retire_by_age()

    def _plane_ended(self, end: End | None) -> None:
        """The data plane ended the tunnel (None: at the gateway's close time)."""
        self._plane_tunnel = None
        if end is None and self.record.end is None:
            self.record.end = self._closed_by_gateway()
        self._release_backend()
        self._log_tunnel_error(self._bridged)
        self._finish()
        if self._done is not None:
            self._done(self)

    def _retire_by_age(self) -> None:
        age = self.settings.max_connection_age
        if age > 0:
            # Retire it at its age plus up to 10%, so connections opened
            # together (a reconnect storm) are not all closed together.
            self.close_at(self.accepted_at + age * (1 + random.uniform(0, 0.1)))

    # ------------------------------------------------------------------ 4. record

    def _finish(self) -> None:
        """Totals once the connection is over: the metrics, then the access line."""
        record = self.record
        record.duration = round(time.monotonic() - self.started, 3)
        record.bytes_in += self.stats.bytes_up
        record.bytes_out += self.stats.bytes_down
        if record.end is None:
            record.end = self.stats.end or End.ERROR
        self.metrics.connection_closed(self.labels, record.bytes_in, record.bytes_out)
        # Its relay buffers go back to the system soon (gatewayd.memory).
        memory.note_release(self.stats.bytes_up + self.stats.bytes_down)
        # A connection refused by a per-address limit gets no line (a metric
        # instead), nor one whose last request had its own (plain HTTP).
        if (
            self.generation.config.log.access_log
            and record.end is not End.LIMITED
            and self._line_owed
        ):
            access_logger.info("access", extra={"access": record.fields()})
