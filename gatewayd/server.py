"""The server: listeners, one task per connection, drain on shutdown.

Theory of operation
-------------------
:class:`Gateway` binds every ``[[listener]]`` and runs one accept loop per
listener inside a nursery; each accepted connection gets its own task
(:meth:`Gateway._handle_connection`) in a second nursery, so one connection's
failure never reaches another or the accept loops.

Before a connection gets a task, the accept loop applies the limits that
cost nothing to check: ``max_connections`` and, on listeners without the
PROXY protocol, the per-address limits (:mod:`gatewayd.limits`); a refused
connection is closed at once, before any TLS work, and not logged one by one
(a warning at most once a second, and a metric). When ``accept`` fails for
lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), the loop logs
it at most once a second, sleeps briefly and retries: connections already
open are served meanwhile, and accepting resumes as soon as they free
descriptors.

A connection goes through these phases, each bounded:

1. **handshake** (one deadline of ``handshake_timeout`` for the PROXY
   header, TLS and the request head, SPEC rows 1-4; a slowloris client that
   dribbles bytes gains nothing): on a ``proxy_protocol`` listener the PROXY
   header (:mod:`gatewayd.proxy_protocol`) gives the client's address, and
   only then are the per-address limits applied; the bytes read past it are
   replayed to TLS (:class:`ReplayStream`). Then the TLS handshake (SNI
   chooses the host; mTLS hosts verify the client certificate), then the
   request head is read up to ``max_request_head`` bytes.
2. **decision** (:func:`gatewayd.handshake.decide`, pure, rows 5-14a): a
   rejection is answered and the connection closed cleanly. Then the I/O
   half of row 14a (:meth:`gatewayd.auth.Authenticator.authorize`): a
   password checked by bcrypt in a worker thread, or a forward-auth service
   asked under its own short deadline. Authorization is complete before a
   backend is chosen, for bridge routes too.
3. **backend** (one budget of ``backend_connect_timeout``, rows 15-19,
   :func:`gatewayd.backend.connect`): choose a backend of the route, connect
   (retrying other backends after a failure that got no answer), and for
   passthrough backends forward the upgrade and validate the answer.
4. **splice** (:func:`gatewayd.splice.splice`): our 101 plus any bytes the
   backend sent after its own, then any bytes the client sent after its
   head, then both ways until the end. Or, for a ``tcp://`` backend,
   **bridge** (:class:`gatewayd.bridge.Bridge`): our own 101, then WebSocket
   messages on one side and a byte stream on the other.

Everything a connection needs from the configuration is captured once, at
accept, in a :class:`Generation` (config, TLS contexts, host table, backend
pool), so a connection keeps running on the configuration it was accepted
under. Backend state (connection counts, passive and active health) is kept
per backend URL across generations (:class:`gatewayd.balancer.Registry`);
the active health checks of the current generation run in the Gateway's
nursery and are replaced by a reload.

Shutdown (:meth:`Gateway.shutdown`): accept loops stop and listeners close
at once; connections get ``shutdown_timeout`` to finish, then are cancelled.
The admin endpoint (:mod:`gatewayd.admin`, when ``[admin]`` is configured)
answers throughout the drain (``/readyz`` says 503) and closes last.

Metrics (:mod:`gatewayd.metrics`) are counted at the phase boundaries above,
O(1) per event: accept, route chosen, every answer sent (``_answered``),
backend success or failure, TLS failure, and once when the connection ends
(bytes, open gauge).
"""

from __future__ import annotations

import email.utils
import errno
import ipaddress
import logging
import math
import random
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from gatewayd import health
from gatewayd.admin import AdminServer
from gatewayd.auth import AUTH_RETRY_AFTER, Authenticator
from gatewayd.backend import BackendPool, connect, open_stream_by, upgrade
from gatewayd.balancer import Balancer, BackendState
from gatewayd.bridge import Bridge
from gatewayd.certinfo import HostCertificate, expiry_by_host, host_certificates
from gatewayd.config import Address, BackendTarget, Config, HostConfig, ListenerConfig
from gatewayd.errors import (
    AuthServiceFailed,
    BackendError,
    ClientDisconnected,
    BackendRefusedUpgrade,
    ConfigError,
    ConfigErrors,
    HandshakeRejected,
    NoBackendAvailable,
    NotTLS,
    ProxyProtocolError,
    TLSHandshakeFailed,
    UnknownServerName,
)
from gatewayd.exchange import Exchange
from gatewayd.handshake import (
    Accepted,
    BackendAnswer,
    ClientInfo,
    bridge_upgraded,
    find_head_end,
    parse_request_head,
    render_rejection,
    render_relayed,
    render_response,
    render_switching_protocols,
)
from gatewayd.http import Kind, decide_request
from gatewayd.httpproxy import BackendGone, HTTPProxy
from gatewayd.limits import Limiter, client_key
from gatewayd.log import ACCESS_LOGGER
from gatewayd.metrics import UNROUTED, Metrics
from gatewayd.proxy_protocol import MAX_HEADER_BYTES
from gatewayd.proxy_protocol import parse as parse_proxy_header
from gatewayd.routing import HostTable
from gatewayd.splice import CHUNK, EndReason, SpliceStats, splice
from gatewayd.tls import ServerTLS

logger = logging.getLogger("gatewayd.server")
access_logger = logging.getLogger(ACCESS_LOGGER)

#: After a rejection we half-close and read (and discard) what the client
#: still sends, so the answer is not destroyed by a TCP reset (nginx's
#: "lingering close"), for at most this long and this many bytes.
LINGER_SECONDS = 1.0
LINGER_BYTES = 65536
#: Bound on closing a stream (a TLS close_notify to a peer that does not read).
CLOSE_SECONDS = 1.0
#: Connections still open when the drain ends are closed spread over this
#: many seconds (at most a tenth of shutdown_timeout), not all at once.
FORCED_CLOSE_SPREAD = 2.0
#: Accept errors meaning "out of descriptors/memory": wait and retry.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True)
class Generation:
    """One loaded configuration and what was built from it.

    ``auth`` holds the users files' tables and the forward-auth caches of
    this configuration: a reload starts with the users it re-read and empty
    caches. ``backends`` is the backend pool: its per-URL state (connection
    counts, health) is carried over from the previous generation.
    """

    number: int
    config: Config
    tls: ServerTLS | None
    hosts: HostTable
    auth: Authenticator
    backends: BackendPool
    certificates: tuple[HostCertificate, ...] = ()

    @classmethod
    def build(
        cls, config: Config, number: int = 1, previous: Generation | None = None
    ) -> Generation:
        """Build TLS contexts, routing tables, the authenticator and the backend pool.

        Args:
            previous: the generation being replaced: the state of every backend
                URL the new configuration still names is carried over.

        Raises:
            ConfigErrors: bad certificates, or a bad ``backend_ca`` file.
        """
        tls = ServerTLS.from_config(config) if config.needs_tls else None
        pool = BackendPool.build(config, previous.backends.registry if previous else None)
        try:
            # ServerTLS has just loaded these files: this only fails if one
            # changed in between, which is then reported like a bad file.
            certificates = host_certificates(config)
        except (OSError, ValueError) as exc:
            problem = ConfigError(str(config.path), "", f"cannot read a certificate: {exc}")
            raise ConfigErrors([problem]) from None
        return cls(
            number=number,
            config=config,
            tls=tls,
            hosts=HostTable(config.hosts),
            auth=Authenticator(config),
            backends=pool,
            certificates=certificates,
        )

    @property
    def certificate_expiry(self) -> dict[str, float]:
        """Each host's certificate expiry (Unix time) by the host's first name."""
        return expiry_by_host(self.certificates)


class _ClientGone(Exception):
    """The client closed or reset the connection during the handshake phase."""


def _http_date() -> str:
    return email.utils.formatdate(usegmt=True)


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
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


#: Bound on delivering a final (non-101) answer: a client that never reads
#: must not hold its connection slot forever.
FINAL_ANSWER_SECONDS = 10.0


async def _send_and_close(stream: trio.abc.Stream, data: bytes) -> None:
    """Send a final response, half-close, drain what the client still sends, close.

    All of it within FINAL_ANSWER_SECONDS (plus the close bound): a client
    that does not read its answer is closed anyway.
    """
    try:
        with trio.move_on_after(FINAL_ANSWER_SECONDS):
            await _deliver_and_linger(stream, data)
    finally:
        await _close_quietly(stream)


async def _deliver_and_linger(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(LINGER_SECONDS):
            drained = 0
            while drained < LINGER_BYTES:
                chunk = await stream.receive_some(CHUNK)
                if not chunk:
                    break
                drained += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass  # the client went away first; the answer was best effort


def _peer(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        peer: Any = stream.socket.getpeername()
    except OSError:
        return ("-", 0)
    if isinstance(peer, tuple):
        return (str(peer[0]), int(peer[1]))
    return (str(peer) or "unix", 0)


@dataclass
class _Slot:
    """One listening socket and the ``[[listener]]`` it serves (updated by reloads)."""

    config: ListenerConfig
    listener: trio.SocketListener
    bound: tuple[str, int]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def key(self) -> str:
        return address_key(self.config.address)


def address_key(address: Address) -> str:
    """What makes two listen addresses the same socket: the resolved IP and port.

    ``localhost:8443`` and ``127.0.0.1:8443`` are one socket, so a reload that
    rewrites one as the other keeps it instead of binding a second one.
    """
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return str(address)
    host = str(infos[0][4][0])
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


class ReloadAbandoned(Exception):
    """A reload that started before shutdown and had nothing left to swap into."""


@dataclass(frozen=True)
class ReloadResult:
    """What a successful reload changed (for the log and the metrics)."""

    generation: int
    changes: tuple[str, ...]

    def describe(self) -> str:
        return "; ".join(self.changes) if self.changes else "no changes (certificates re-read)"


class Gateway:
    """The gateway server.

    Usage::

        gateway = Gateway(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            ...
            await gateway.reload(new_config)   # atomically, established connections untouched
            gateway.shutdown()                 # drain, then serve() returns

    ``gateway.metrics`` holds its Prometheus registry (its own, not the
    process-global one), served on ``[admin] listen`` when configured.
    """

    def __init__(
        self,
        config: Config,
        *,
        generation: Generation | None = None,
        inherited: dict[str, trio.socket.SocketType] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.generation = generation if generation is not None else Generation.build(config)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.configuration_loaded(self.generation.number, self.generation.certificate_expiry)
        self.metrics.watch_backends(self._backend_view)
        self.active_connections = 0
        self.reloads = 0
        self._slots: list[_Slot] = []
        self._inherited = dict(inherited or {})
        self._shutdown = trio.Event()
        self._shutting_down = False
        self._last_resource_log = -math.inf
        self._last_limit_log = -math.inf
        #: Per-address counts and buckets: kept across reloads (limits are read per call).
        self.limiter = Limiter()
        self._idle = trio.Event()
        self._idle.set()
        self._live: set[Connection] = set()
        self._reload_lock = trio.Lock()
        self._acceptors: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._services: trio.Nursery | None = None
        self._admin: AdminServer | None = None
        self._serving = False
        self._health_scope = trio.CancelScope()
        _log_warnings(self.generation.config)

    @property
    def config(self) -> Config:
        return self.generation.config

    @property
    def listen_addresses(self) -> list[tuple[ListenerConfig, tuple[str, int]]]:
        """Each listener with the address it is bound to (the real port for port 0)."""
        return [(slot.config, slot.bound) for slot in self._slots]

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """The address the admin endpoint is bound to (the real port for port 0), or None."""
        return self._admin.bound if self._admin is not None else None

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def ready(self) -> bool:
        """``/readyz``: the listeners accept, on a loaded configuration, and no shutdown began."""
        return self._serving and not self._shutting_down

    def offer_sockets(self, sockets: dict[str, trio.socket.SocketType]) -> None:
        """Listening sockets for the next bind or reload to use instead of binding.

        Keyed by ``str(listener.address)``: socket activation, or the sockets a
        supervisor bound (``[gateway] workers``).
        """
        self._inherited.update(sockets)

    def take_unused_sockets(self) -> list[trio.socket.SocketType]:
        """The offered sockets no listener took; the caller closes them."""
        unused = list(self._inherited.values())
        self._inherited.clear()
        return unused

    # ------------------------------------------------------------------ lifecycle

    async def _open_slot(self, listener: ListenerConfig) -> _Slot:
        sock = self._inherited.pop(str(listener.address), None)
        if sock is None:
            sock = await _bind(listener)
        else:
            logger.info("using the inherited socket for %s (socket activation)", listener.address)
        name = sock.getsockname()
        return _Slot(listener, trio.SocketListener(sock), (str(name[0]), int(name[1])))

    async def _open_admin(self, address: Address) -> AdminServer:
        sock = await _bind_address(address)
        return AdminServer(address, sock, ready=lambda: self.ready, metrics=self.metrics.render)

    async def bind(self) -> None:
        """Bind every listener and the admin endpoint (raises OSError naming the address)."""
        opened: list[_Slot] = []
        admin: AdminServer | None = None
        try:
            for listener in self.config.listeners:
                opened.append(await self._open_slot(listener))
            if self.config.admin is not None:
                admin = await self._open_admin(self.config.admin.listen)
        except OSError:
            for slot in opened:
                slot.listener.socket.close()
            raise
        self._slots = opened
        self._admin = admin

    async def serve(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind (unless :meth:`bind` ran), serve until :meth:`shutdown` has drained."""
        if not self._slots:
            await self.bind()
        async with trio.open_nursery() as services:
            # The admin endpoint outlives the drain: /readyz says 503 meanwhile.
            self._services = services
            if self._admin is not None:
                self._start_admin(self._admin)
            async with trio.open_nursery() as connections:
                self._connections = connections
                async with trio.open_nursery() as acceptors:
                    self._acceptors = acceptors
                    for slot in self._slots:
                        self._start_accepting(slot)
                    self._start_health_checks()
                    self._serving = True
                    task_status.started(self)
                    await self._shutdown.wait()
                    acceptors.cancel_scope.cancel()
                for slot in self._slots:
                    await slot.listener.aclose()
                await self._drain()
            services.cancel_scope.cancel()
        logger.info("stopped")

    def _start_admin(self, admin: AdminServer) -> None:
        assert self._services is not None
        self._services.start_soon(admin.serve)
        logger.info("admin endpoint on %s (/healthz, /readyz, /metrics)", admin.url)

    async def _drain(self) -> None:
        timeout = self.config.gateway.shutdown_timeout
        logger.info(
            "shutting down: no longer accepting; %d connection(s) may drain for up to %ss",
            self.active_connections,
            timeout,
        )
        with trio.move_on_after(timeout):
            await self._idle.wait()
        if not self.active_connections:
            return
        # Close what is left spread over a short window, so that clients do not
        # all reconnect (to the next instance) in the same instant.
        spread = min(FORCED_CLOSE_SPREAD, timeout / 10) if timeout > 0 else 0.0
        logger.info(
            "closing %d connection(s) left after the drain, spread over %.1fs",
            self.active_connections,
            spread,
        )
        live = list(self._live)
        random.shuffle(live)
        for index, connection in enumerate(live):
            connection.close_at(trio.current_time() + spread * index / max(1, len(live)))
        with trio.move_on_after(spread + CLOSE_SECONDS * 2):
            await self._idle.wait()
        if self._connections is not None:
            self._connections.cancel_scope.cancel()

    def shutdown(self) -> None:
        """Stop accepting now; connections drain for ``shutdown_timeout``.

        Kept-alive connections waiting for their next request close at once
        (SPEC section 7); a request in progress may finish.
        """
        self._shutting_down = True
        self._shutdown.set()
        for connection in list(self._live):
            connection.close_if_idle()

    def abort(self) -> None:
        """Close every connection now (a second SIGTERM/SIGINT)."""
        self.shutdown()
        for connection in list(self._live):
            connection.close_at(trio.current_time())

    # ------------------------------------------------------------------ reload

    async def reload(self, config: Config) -> ReloadResult:
        """Swap to ``config`` atomically, or change nothing at all.

        Certificates are re-read (Generation.build); listeners whose address
        is unchanged keep their socket (no moment without a listening
        socket); new addresses are bound before anything is swapped, so a
        bind failure leaves the old configuration running; removed ones stop
        accepting. Established connections keep the generation they were
        accepted under. The admin endpoint is handled like a listener: kept
        while ``[admin] listen`` is unchanged, else bound anew before the swap
        and the old one closed after it. Reloads are serialized. The outcome
        is counted in the metrics either way.

        Raises:
            ConfigErrors: the new configuration is invalid (certificates included).
            OSError: a new listen address cannot be bound.
            ReloadAbandoned: shutdown began meanwhile; nothing changed.
        """
        async with self._reload_lock:
            if self._shutting_down:
                raise ReloadAbandoned("shutting down")
            try:
                result = await self._swap(config)
            except (ConfigErrors, OSError):
                self.metrics.reload_failed()
                raise
            # ReloadAbandoned is neither: the file was not judged, nothing is counted.
            self.metrics.reload_succeeded(result.generation, self.generation.certificate_expiry)
            return result

    async def _swap(self, config: Config) -> ReloadResult:
        old = self.generation
        new = Generation.build(config, old.number + 1, previous=old)
        current = {slot.key: slot for slot in self._slots}
        wanted = {address_key(listener.address): listener for listener in config.listeners}
        wanted_admin = config.admin.listen if config.admin is not None else None
        # Like a listener: the same resolved address keeps its socket.
        keep_admin = (
            self._admin is not None
            and wanted_admin is not None
            and address_key(self._admin.address) == address_key(wanted_admin)
        )
        added: list[_Slot] = []
        new_admin: AdminServer | None = None
        try:
            for key, listener in wanted.items():
                if key not in current:
                    added.append(await self._open_slot(listener))
            if wanted_admin is not None and not keep_admin:
                new_admin = await self._open_admin(wanted_admin)
        except OSError:
            for slot in added:
                slot.listener.socket.close()
            raise
        if self._shutting_down:
            # serve() has stopped accepting; there is nothing to swap into.
            for slot in added:
                slot.listener.socket.close()
            if new_admin is not None:
                new_admin.listener.socket.close()
            raise ReloadAbandoned("shutting down")
        # Past this point nothing can fail: the swap is atomic for new connections.
        changes = describe_changes(old.config, config)
        removed = [slot for key, slot in current.items() if key not in wanted]
        for slot in self._slots:
            if slot.key in wanted:
                slot.config = wanted[slot.key]
        self.generation = new
        self._slots = [slot for slot in self._slots if slot.key in wanted] + added
        for slot in removed:
            slot.scope.cancel()
            await slot.listener.aclose()
        for slot in added:
            self._start_accepting(slot)
        if not keep_admin:
            old_admin, self._admin = self._admin, new_admin
            if old_admin is not None:
                if self._services is not None:
                    old_admin.stop()  # its serve() closes the socket
                else:
                    old_admin.listener.socket.close()  # bound, never served
                logger.info("admin endpoint on %s closed", old_admin.url)
            if new_admin is not None and self._services is not None:
                self._start_admin(new_admin)
        self._start_health_checks()
        _log_warnings(config)
        self.reloads += 1
        return ReloadResult(new.number, tuple(changes))

    # ------------------------------------------------------------------ health checks

    def _backend_view(self) -> list[tuple[str, bool, int]]:
        """Each backend URL of the current configuration: available now?, open connections."""
        try:
            now = trio.current_time()
        except RuntimeError:  # scraped outside trio (a test): passive state unknown
            now = math.inf
        return [
            (state.url, state.healthy and now >= state.down_until, state.active)
            for state in self.generation.backends.registry
        ]

    def _start_health_checks(self) -> None:
        """(Re)start the active health checks of the current generation.

        The previous generation's checks stop; verdicts live in the backend
        states, so a backend that stays in the configuration keeps its own.
        Before :meth:`serve` runs there is nowhere to run them: it starts them.
        """
        if self._acceptors is None:
            return
        self._health_scope.cancel()
        generation = self.generation
        generation.backends.registry.keep_checks(generation.config)
        checks = health.checks_for(generation.config, generation.backends)
        self._health_scope = trio.CancelScope()
        if checks:
            self._acceptors.start_soon(
                self._run_health_checks,
                self._health_scope,
                checks,
                generation.config.gateway.backend_connect_timeout,
            )

    async def _run_health_checks(
        self, scope: trio.CancelScope, checks: list[health.Check], timeout: float
    ) -> None:
        with scope:
            await health.run_checks(checks, timeout)

    # ------------------------------------------------------------------ accepting

    def _start_accepting(self, slot: _Slot) -> None:
        assert self._acceptors is not None
        self._acceptors.start_soon(self._accept_loop, slot)
        host, port = slot.bound
        logger.info(
            "listening on %s (%s)",
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "tls" if slot.config.tls else "plain",
        )

    async def _accept_loop(self, slot: _Slot) -> None:
        assert self._connections is not None
        with slot.scope:
            while True:
                try:
                    stream = await slot.listener.accept()
                except OSError as exc:
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    now = time.monotonic()
                    if now - self._last_resource_log >= 1.0:
                        self._last_resource_log = now
                        logger.error(
                            "accept on %s failed: %s; serving existing connections and retrying",
                            slot.config.address,
                            exc.strerror,
                        )
                    await trio.sleep(0.1)
                    continue
                generation = self.generation
                if self.active_connections >= generation.config.gateway.max_connections:
                    # Over the limit: closed at once, before any TLS work (SPEC 2).
                    stream.socket.close()
                    self.metrics.over_limit()
                    now = time.monotonic()
                    if now - self._last_resource_log >= 1.0:
                        self._last_resource_log = now
                        logger.warning(
                            "max_connections (%d) reached: closing new connections",
                            generation.config.gateway.max_connections,
                        )
                    continue
                limit_key: str | None = None
                if not slot.config.proxy_protocol:
                    # The peer is the client: limit it now, before any TLS work.
                    # (Behind the PROXY protocol this waits for the header.)
                    address = _peer(stream)[0]
                    limit_key = client_key(address)
                    if not self.admit(limit_key, address, generation):
                        stream.socket.close()
                        continue
                self.active_connections += 1
                self.metrics.connection_opened()
                if self._idle.is_set():
                    self._idle = trio.Event()
                connection = Connection(self, stream, slot.config, generation, limit_key=limit_key)
                self._live.add(connection)
                self._connections.start_soon(self._run_connection, connection)

    def admit(self, key: str, address: str, generation: Generation) -> bool:
        """Apply the per-address limits to a new connection from ``address``.

        Returns:
            True when admitted: ``self.limiter.release(key)`` must follow when
            it ends. False when refused (counted and, at most once a second,
            logged): the caller closes the connection at once.
        """
        settings = generation.config.gateway
        refusal = self.limiter.admit(
            key,
            time.monotonic(),
            max_connections=settings.max_connections_per_ip,
            handshakes_per_second=settings.handshakes_per_ip_per_second,
        )
        if refusal is None:
            return True
        self.metrics.limited(refusal)
        now = time.monotonic()
        if now - self._last_limit_log >= 1.0:
            self._last_limit_log = now
            if refusal == "per_ip_connections":
                why = f"max_connections_per_ip ({settings.max_connections_per_ip}) reached"
            else:
                why = (
                    "handshakes_per_ip_per_second "
                    f"({settings.handshakes_per_ip_per_second:g}) exceeded"
                )
            logger.warning("%s by %s: closing its new connections before TLS", why, key)
        return False

    async def _run_connection(self, connection: Connection) -> None:
        try:
            await connection.run()
        except Exception:
            # A bug of ours in one connection: log it with its traceback and
            # end that connection only (its streams were closed by run()'s
            # finally); the accept loops and every other connection go on.
            logger.exception(
                "internal error on the connection from %s; connection closed",
                connection.access.get("client"),
            )
        finally:
            if connection.limit_key is not None:
                self.limiter.release(connection.limit_key)
            self._live.discard(connection)
            self.active_connections -= 1
            if self.active_connections == 0:
                self._idle.set()


def _log_warnings(config: Config) -> None:
    for warning in config.warnings:
        logger.warning("%s", warning)


def describe_changes(old: Config, new: Config) -> list[str]:
    """Human-readable differences between two configurations, for the reload log."""
    changes: list[str] = []

    def diff(kind: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        added = [k for k in after if k not in before]
        removed = [k for k in before if k not in after]
        changed = [k for k in after if k in before and after[k] != before[k]]
        for label, keys in (("added", added), ("removed", removed), ("changed", changed)):
            if keys:
                changes.append(f"{kind} {label}: {', '.join(keys)}")

    diff(
        "listeners",
        {str(l.address): (l.tls, l.proxy_protocol) for l in old.listeners},
        {str(l.address): (l.tls, l.proxy_protocol) for l in new.listeners},
    )

    def host_key(host: HostConfig) -> str:
        return ",".join(host.names)

    def host_view(host: HostConfig) -> tuple[Any, ...]:
        return (host.certificate, host.private_key, host.default, host.tls, host.access)

    old_hosts = {host_key(h): h for h in old.hosts}
    new_hosts = {host_key(h): h for h in new.hosts}
    diff(
        "hosts",
        {k: host_view(h) for k, h in old_hosts.items()},
        {k: host_view(h) for k, h in new_hosts.items()},
    )
    before_routes: dict[str, Any] = {}
    after_routes: dict[str, Any] = {}
    for hosts, routes in ((old_hosts, before_routes), (new_hosts, after_routes)):
        for key, host in hosts.items():
            for route in host.routes:
                routes[f"{host.names[0]}{route.label}"] = replace(route, key_path="")
    diff("routes", before_routes, after_routes)
    if old.gateway != new.gateway:
        changes.append("[gateway] settings changed")
    if old.log != new.log:
        changes.append("[log] settings changed")
    if old.admin != new.admin:
        before = str(old.admin.listen) if old.admin is not None else "off"
        after = str(new.admin.listen) if new.admin is not None else "off"
        changes.append(f"[admin] listen: {before} -> {after}")
    return changes


class Connection:
    """One client connection, from accept to the access log line."""

    def __init__(
        self,
        gateway: Gateway,
        stream: trio.SocketStream,
        listener: ListenerConfig,
        generation: Generation,
        *,
        limit_key: str | None = None,
    ) -> None:
        self.gateway = gateway
        self.transport = stream
        #: What TLS (or HTTP) reads from: the transport, or after a PROXY
        #: header a ReplayStream giving the bytes read past it first.
        self.raw: trio.abc.HalfCloseableStream = stream
        #: The per-address limits' key once admitted (released at the end).
        self.limit_key = limit_key
        #: False for connections refused by a per-address limit: no access line.
        self.log_access = True
        self.proxy_done = not listener.proxy_protocol
        self.listener = listener
        self.generation = generation
        #: The generation accepted under (the TLS host came from it).
        self.accepted_generation = generation
        self.settings = generation.config.gateway
        #: Request loop (SPEC section 7): requests answered so far, the next
        #: head to answer, the wait for it (cancelled by a shutdown), the
        #: kept backend connection of plain requests.
        self.requests = 0
        self._next: tuple[bytes, bytes] | None = None
        self.idle: trio.CancelScope | None = None
        self.proxy = HTTPProxy(report=self._report_backend)
        #: False once the last request had its own access line (plain HTTP):
        #: the connection's line then is not logged.
        self.access_pending = True
        self.client_address, self.client_port = _peer(stream)
        self.stream: trio.abc.Stream = stream
        self.started = time.monotonic()
        self.accepted_at = trio.current_time()
        self.received_any = False
        self.stats = SpliceStats()
        self.backend: trio.abc.Stream | None = None
        # The backend this connection counts against, released when it ends.
        self.lease: tuple[Balancer, BackendState] | None = None
        self.bridge: Bridge | None = None
        self.scope = trio.CancelScope()
        self.metrics = gateway.metrics
        #: (host, route) metric labels: UNROUTED until decide() chose a route.
        self.labels = UNROUTED
        self.tls_done = False
        self.access: dict[str, Any] = {
            "client": f"{self.client_address}:{self.client_port}",
            "sni": None,
            "host": None,
            "path": None,
            "route": None,
            "backend": None,
            "status": None,
            "bytes_in": 0,
            "bytes_out": 0,
            "duration": 0.0,
            "end": "",
        }

    def close_at(self, deadline: float) -> None:
        """Close this connection at ``deadline`` (trio time) at the latest.

        A bridged connection is asked to send close 1001 (Going Away) then,
        and is cut ``CLOSE_SECONDS`` later if the client does not answer.
        """
        if self.bridge is not None:
            reason = EndReason.SHUTDOWN if self.gateway.shutting_down else EndReason.MAX_AGE
            self.bridge.go_away_at(deadline, reason)
            deadline += CLOSE_SECONDS
        self.scope.deadline = min(self.scope.deadline, deadline)

    async def run(self) -> None:
        try:
            with self.scope:
                await self._serve()
            if self.scope.cancelled_caught and not self.access["end"]:
                self.access["end"] = (
                    EndReason.SHUTDOWN if self.gateway.shutting_down else EndReason.MAX_AGE
                )
        except trio.Cancelled:
            if not self.access["end"]:
                self.access["end"] = EndReason.SHUTDOWN
            raise
        finally:
            await self.proxy.aclose()
            if self.lease is not None:
                balancer, state = self.lease
                balancer.release(state)
            if self.backend is not None:
                await _close_quietly(self.backend)
            await _close_quietly(self.stream)
            self._finish()

    def _finish(self) -> None:
        """Totals once the connection is over: the metrics, then the access line."""
        self.access["duration"] = round(time.monotonic() - self.started, 3)
        self.access["bytes_in"] += self.stats.bytes_up
        self.access["bytes_out"] += self.stats.bytes_down
        if not self.access["end"]:
            self.access["end"] = self.stats.end or "error"
        self.metrics.connection_closed(self.labels, self.access["bytes_in"], self.access["bytes_out"])
        if self.generation.config.log.access_log and self.log_access and self.access_pending:
            access_logger.info("access", extra={"access": self.access})

    def _report_backend(self, url: str, error: BackendError | None, seconds: float) -> None:
        if error is None:
            self.metrics.backend_connected(url, seconds)
        else:
            self.metrics.backend_failed(url, error)

    def _answered(self, status: int) -> None:
        """Record the handshake answer (every one the client gets, 101 included)."""
        self.access["status"] = status
        self.metrics.answered(status)

    async def _reject(self, error: HandshakeRejected) -> None:
        self._answered(error.status)
        self.access["end"] = "rejected"
        if error.route is not None and self.access["route"] is None:
            self.access["route"] = f"{error.host.key_path}:{error.route.label}"
        logger.debug("rejected %s: %s", self.access["client"], error.detail)
        response = render_rejection(
            error, server_header=self.settings.server_header, date=_http_date()
        )
        self.access["bytes_out"] += len(response)
        await _send_and_close(self.stream, response)

    async def _serve(self) -> None:
        """Run the phases; ``run`` closes what is open afterwards.

        Phase 1 (PROXY header, TLS, the first request head) runs under the
        handshake deadline; then the request loop (SPEC section 7,
        "Keep-alive"): each head is answered by :meth:`_request`, and while
        the answer leaves the connection open for another request
        (a plain request on an ``http`` route), the next head is read by
        :meth:`_read_next`. A WebSocket upgrade or a rejection ends the loop.
        """
        head: bytes | None = None
        early = b""
        # Phase 1: TLS + request head under one deadline (SPEC rows 1-4).
        with trio.move_on_after(self.settings.handshake_timeout) as deadline:
            try:
                if not self.proxy_done:
                    await self._read_proxy_header()
                    if self.access["end"]:
                        return
                await self._tls_handshake()
                if self.access["end"]:
                    return
                head, early = await self._read_head()
            except HandshakeRejected as error:
                await self._reject(error)
                return
            except _ClientGone as gone:
                self.access["end"] = str(gone) or EndReason.CLIENT_CLOSE
                return
        if deadline.cancelled_caught or head is None:
            self.access["end"] = "handshake_timeout"
            if not self.proxy_done:
                self.metrics.proxy_protocol_failed()
                logger.info("%s sent no complete PROXY header in time", self.access["client"])
            elif self.listener.tls and not self.tls_done:
                self.metrics.tls_failed("timeout")
            if self.received_any:
                await self._reject(
                    HandshakeRejected(408, "Request Timeout", detail="request head not complete in time")
                )
                self.access["end"] = "handshake_timeout"
            return
        # The request loop. The head travels in self._next so that no frame
        # keeps it (or the parsed request) alive during a tunnel.
        self._next = (head, early)
        del head, early
        while self._next is not None:
            leftover = await self._request()
            if leftover is None:
                return
            await self._read_next(leftover)

    def _client_info(self) -> ClientInfo | None:
        """What the decision needs to know about this connection, under the current generation.

        After a reload, the host TLS chose is looked up again by SNI in the
        new host table (None when no host serves it any more).
        """
        tls_host = getattr(self.stream, "host", None)
        if tls_host is not None and self.generation is not self.accepted_generation:
            hosts = self.generation.hosts
            tls_host = hosts.find(self.access["sni"]) or hosts.default
            if tls_host is None:
                return None
        return ClientInfo(
            address=self.client_address,
            port=self.client_port,
            tls=self.listener.tls,
            tls_host=tls_host,
            server_name=self.access["sni"],
            trusted_proxy=_is_trusted(self.client_address, self.settings.trusted_proxies),
            client_subject=getattr(self.stream, "client_subject", None),
        )

    async def _read_next(self, leftover: bytes) -> None:
        """Wait for the next request head of a kept-alive connection (SPEC section 7).

        Its first byte may take ``http_keepalive_timeout`` (a shutdown ends
        the wait at once: :meth:`close_if_idle`); the whole head then
        ``handshake_timeout`` and ``max_request_head`` as for the first one
        (rows 3, 4). Sets ``self._next``, or leaves it None to close.
        Requests after a reload use the new configuration.
        """
        if self.gateway.shutting_down:
            self.access["end"] = EndReason.SHUTDOWN
            return
        if self.generation is not self.gateway.generation:
            self.generation = self.gateway.generation
            self.settings = self.generation.config.gateway
            await self.proxy.aclose()  # its backends belong to the old configuration
        if not leftover:
            data = b""
            with trio.move_on_after(self.settings.http_keepalive_timeout) as idle:
                self.idle = idle
                try:
                    data = bytes(await self.stream.receive_some(CHUNK))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.access["end"] = EndReason.CLIENT_ERROR
                    return
                finally:
                    self.idle = None
            if idle.cancelled_caught:
                self.access["end"] = (
                    EndReason.SHUTDOWN if self.gateway.shutting_down else "keepalive_timeout"
                )
                return
            if not data:
                self.access["end"] = EndReason.CLIENT_CLOSE
                return
            self.access["bytes_in"] += len(data)
            leftover = data
        self.received_any = True
        with trio.move_on_after(self.settings.handshake_timeout) as deadline:
            try:
                self._next = await self._read_head(leftover)
            except HandshakeRejected as error:
                self.access_pending = True
                await self._reject(error)
                return
            except _ClientGone as gone:
                self.access["end"] = str(gone) or EndReason.CLIENT_CLOSE
                return
        if deadline.cancelled_caught:
            self.access_pending = True
            await self._reject(
                HandshakeRejected(408, "Request Timeout", detail="request head not complete in time")
            )
            self.access["end"] = "handshake_timeout"

    def close_if_idle(self) -> None:
        """Shutdown: a kept-alive connection waiting for its next request closes now."""
        if self.idle is not None:
            self.idle.cancel()

    async def _request(self) -> bytes | None:
        """Answer one request head (``self._next``).

        Returns:
            The bytes the client sent after this request (the start of the
            next one) when the connection may serve another request, else None.
        """
        assert self._next is not None
        head, early = self._next
        self._next = None
        self.requests += 1
        self.access_pending = True
        generation = self.generation
        # Phase 2: the pure decision (rows 5-14a, SPEC section 7's dispatch),
        # then row 14a's I/O half.
        client = self._client_info()
        if client is None:
            self.access["end"] = "host_removed"
            return None
        try:
            request = parse_request_head(head)
            self.access["path"] = request.path
            self.access["host"] = request.get("host")
            kind, accepted = decide_request(request, client, generation.hosts)
            self.access["route"] = f"{accepted.host.key_path}:{accepted.route.label}"
            labels = (accepted.host.names[0], accepted.route.label)
            if labels != self.labels:
                self.metrics.connection_routed(labels)
                self.labels = labels
            accepted = await generation.auth.authorize(accepted, client)
        except HandshakeRejected as error:
            await self._reject(error)
            return None
        except AuthServiceFailed as failure:
            logger.warning("%s (client %s)", failure, self.access["client"])
            await self._reject(
                HandshakeRejected(
                    503,
                    "Service Unavailable: authentication is unavailable, try again later",
                    headers=[("Retry-After", str(AUTH_RETRY_AFTER))],
                    detail=str(failure),
                )
            )
            return None
        if kind is Kind.PROXY:
            return await self._http(accepted, client, head, early)
        await self._upgrade(accepted, client, head, early)
        return None

    async def _http(
        self, accepted: Accepted, client: ClientInfo, head: bytes, early: bytes
    ) -> bytes | None:
        """A plain request on an ``http = true`` route (SPEC section 7), with its access line."""
        started = time.monotonic()
        generation = self.generation
        request = accepted.request
        exchange = Exchange(
            self.stream,
            head,
            early,
            request,
            io_timeout=self.settings.http_timeout,
            server_header=self.settings.server_header,
        )
        if (
            self.requests >= self.settings.max_requests_per_connection
            or self.gateway.shutting_down
        ):
            exchange.keep_alive = False
        end = "keep_alive"
        try:
            await self.proxy.proxy(
                exchange, accepted, client, generation.backends, self.settings, generation.number
            )
        except ClientDisconnected as gone:
            end = EndReason.CLIENT_ERROR
            logger.debug("%s %s %s: %s", self.access["client"], request.method, request.path, gone)
        except BackendGone as failure:
            end = EndReason.BACKEND_ERROR
            logger.warning(
                "%s %s from %s: %s; connection closed",
                request.method, request.path, self.access["client"], failure,
            )
        leftover = exchange.leftover() if end == "keep_alive" else None
        if leftover is None and end == "keep_alive":
            end = "close"
        # Counted once for the connection: the head (and what came with it)
        # was counted when it was read.
        self.access["bytes_in"] += exchange.bytes_in - len(head) - len(early)
        self.access["bytes_out"] += exchange.bytes_out
        self.access["status"] = exchange.status
        self.access["backend"] = self.proxy.backend
        duration = time.monotonic() - started
        route_label = self.access["route"]
        self.metrics.http_request(route_label, exchange.status or 0, duration)
        if generation.config.log.access_log:
            line = {
                "client": self.access["client"],
                "sni": self.access["sni"],
                "host": self.access["host"],
                "path": request.path,
                "route": route_label,
                "backend": self.proxy.backend,
                "status": exchange.status,
                "bytes_in": exchange.bytes_in,
                "bytes_out": exchange.bytes_out,
                "duration": round(duration, 3),
                "end": end,
                "method": request.method,
            }
            access_logger.info("access", extra={"access": line})
        self.access_pending = False
        if leftover is None:
            self.access["end"] = end if end != "keep_alive" else "close"
            if end == "close":
                # Lingering close: a client still sending (a 413, an answer
                # before its body) must get the answer, not a reset.
                with trio.move_on_after(FINAL_ANSWER_SECONDS):
                    await _deliver_and_linger(self.stream, b"")
        return leftover

    async def _upgrade(
        self, accepted: Accepted, client: ClientInfo, head: bytes, early: bytes
    ) -> None:
        """Phases 3 and 4 of a WebSocket handshake: the backend, then the tunnel."""
        generation = self.generation
        request = accepted.request
        # Authorized: only now is a backend chosen (row 15) and connected to.
        route = accepted.route
        assert route.backend is not None, "decide() answers redirect routes (row 9a)"
        self.access["backend"] = route.backend.url if len(route.backends) == 1 else None
        pool = generation.backends
        balancer = pool.balancer(route)
        tls = pool.tls_for(route)

        async def passthrough(target: BackendTarget, deadline: float) -> Any:
            return await upgrade(target, accepted, client, tls=tls, deadline=deadline)

        async def bridged(target: BackendTarget, deadline: float) -> Any:
            return await open_stream_by(target, tls, deadline)

        def report(url: str, error: BackendError | None, seconds: float) -> None:
            if error is None:
                self.metrics.backend_connected(url, seconds)
            else:
                self.metrics.backend_failed(url, error)

        # Phase 3: the backend (rows 15-19).
        try:
            result, state = await connect(
                route,
                balancer,
                self.client_address,
                self.settings.backend_connect_timeout,
                bridged if route.bridge else passthrough,
                report=report,
            )
        except NoBackendAvailable as error:
            logger.warning("%s: 503 to %s", error, self.access["client"])
            self.metrics.no_backend(self.labels)
            await self._reject(
                HandshakeRejected(
                    503,
                    "Service Unavailable: no backend can take the connection, retry later",
                    headers=[("Retry-After", str(error.retry_after))],
                    detail=str(error),
                )
            )
            return
        except BackendRefusedUpgrade as refused:
            self.access["backend"] = refused.backend
            self._answered(refused.response_status)
            self.access["end"] = "backend_refused"
            logger.info(
                "backend %s answered %d to %s %s: relayed, connection closed",
                refused.backend, refused.response_status, self.access["client"], request.path,
            )
            answer = render_relayed_from(refused)
            self.access["bytes_out"] += len(answer)
            await _send_and_close(self.stream, answer)
            return
        except BackendError as failure:
            self.access["backend"] = failure.backend
            await self._backend_failed(failure)
            return
        self.lease = (balancer, state)
        self.access["backend"] = state.url

        if route.bridge:
            await self._bridge(accepted, result, early)
            return

        backend = result
        self.backend = backend.stream
        # Phase 4: our 101, early bytes both ways, then splice (row 20, section 4).
        self._answered(101)
        try:
            switching = render_switching_protocols(accepted, backend.upgraded)
            # Bounded like the handshake: a client that stops reading right
            # after its request must not pin the connection before the splice
            # (whose idle_timeout takes over from here).
            with trio.fail_after(self.settings.handshake_timeout):
                await self.stream.send_all(switching + backend.early)
                self.access["bytes_out"] += len(switching) + len(backend.early)
                if early:
                    # (already counted in bytes_in when the head was read)
                    await backend.stream.send_all(early)
        except trio.TooSlowError:
            self.access["end"] = EndReason.CLIENT_ERROR
            logger.debug("%s did not take the 101 in time", self.access["client"])
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.access["end"] = EndReason.CLIENT_ERROR
            logger.debug("connection lost while switching protocols: %s", exc)
            return
        self._retire_by_age()
        # This frame lives as long as the connection: what the handshake
        # parsed is not needed any more (about 2 KiB per idle connection).
        backend_stream = backend.stream
        del head, early, request, accepted, client, result, backend, switching, passthrough, bridged
        await splice(
            self.stream, backend_stream, self.stats, idle_timeout=self.settings.idle_timeout
        )
        if self.stats.error:
            logger.debug("%s ended: %s", self.access["client"], self.stats.error)

    def _retire_by_age(self) -> None:
        age = self.settings.max_connection_age
        if age > 0:
            # Retire it at its age plus up to 10%, so connections opened
            # together (a reconnect storm) are not all closed together.
            self.close_at(self.accepted_at + age * (1 + random.uniform(0, 0.1)))

    async def _bridge(self, accepted: Accepted, stream: trio.abc.Stream, early: bytes) -> None:
        """Phase 4 for tcp:// backends: our own 101, then WebSocket <-> bytes (SPEC section 4)."""
        self.backend = stream
        self._answered(101)
        switching = render_switching_protocols(accepted, bridge_upgraded(accepted))
        try:
            await self.stream.send_all(switching)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.access["end"] = EndReason.CLIENT_ERROR
            logger.debug("connection lost while switching protocols: %s", exc)
            return
        self.access["bytes_out"] += len(switching)
        self.bridge = Bridge(
            self.stream,
            stream,
            self.stats,
            max_message_size=accepted.route.max_message_size,
            idle_timeout=self.settings.idle_timeout,
        )
        self._retire_by_age()
        await self.bridge.run(early)
        if self.stats.error:
            logger.debug("%s ended: %s", self.access["client"], self.stats.error)

    async def _backend_failed(self, error: BackendError) -> None:
        # Every attempt was counted by backend (connect's report); this is the answer.
        logger.warning("%s (client %s)", error, self.access["client"])
        status = error.status
        await self._reject(
            HandshakeRejected(
                status,
                "Gateway Timeout: the service did not answer in time"
                if status == 504
                else "Bad Gateway: the service is unavailable",
                detail=str(error),
            )
        )

    async def _tls_handshake(self) -> None:
        if not self.listener.tls:
            return
        tls = self.generation.tls
        assert tls is not None
        if self.raw is self.transport:
            # An OpenSSL connection object costs ~20 KiB: a client that sends
            # nothing (half-open floods) gets none until its first byte.
            await trio.lowlevel.wait_readable(self.transport.socket)
        tls_stream = tls.wrap(self.raw)
        try:
            await tls_stream.do_handshake()
        except NotTLS as exc:
            # Row 2: answer in plain text like nginx, on the raw transport.
            self.received_any = True
            self.metrics.tls_failed("plain_http")
            self._answered(400)
            self.access["end"] = "plain_http_on_tls"
            await _send_and_close(
                self.raw,
                render_response(
                    400,
                    (),
                    b"Bad Request: plain HTTP sent to a TLS port\n",
                    server_header=self.settings.server_header,
                    date=_http_date(),
                ),
            )
            logger.debug("%s sent plain HTTP to a TLS port (%d bytes)", self.access["client"], len(exc.data))
            return
        except UnknownServerName as exc:
            self.metrics.tls_failed("unknown_sni")
            self.access["sni"] = exc.server_name
            self.access["end"] = "unknown_sni"
            logger.info("%s: %s; alert unrecognized_name sent", self.access["client"], exc)
            return
        except TLSHandshakeFailed as exc:
            self.metrics.tls_failed("handshake_error")
            self.access["sni"] = tls_stream.server_name
            self.access["end"] = "tls_error"
            logger.info("TLS handshake with %s failed: %s", self.access["client"], exc)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.metrics.tls_failed("handshake_error")
            self.access["end"] = "tls_error"
            logger.debug("TLS handshake with %s failed: %s", self.access["client"], exc)
            return
        self.tls_done = True
        self.stream = tls_stream
        self.received_any = False
        self.access["sni"] = tls_stream.server_name

    async def _read_proxy_header(self) -> None:
        """Read the PROXY header; the client's address comes from it (SPEC 2, listener).

        Then apply the per-address limits to that address. Sets
        ``access["end"]`` when the connection is to be closed.
        """
        buffer = bytearray()
        while True:
            try:
                header = parse_proxy_header(buffer)
            except ProxyProtocolError as error:
                self.metrics.proxy_protocol_failed()
                self.access["end"] = "proxy_protocol_error"
                logger.info(
                    "%s: bad PROXY protocol header (%s): %r; closed",
                    self.access["client"], error, error.data[:48],
                )
                return
            if header is not None:
                break
            try:
                data = await self.transport.receive_some(MAX_HEADER_BYTES - len(buffer))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _ClientGone(EndReason.CLIENT_ERROR) from None
            if not data:
                raise _ClientGone(EndReason.CLIENT_CLOSE)
            self.access["bytes_in"] += len(data)
            buffer += data
        self.proxy_done = True
        proxy = self.access["client"]
        if header.source is not None:
            self.client_address, self.client_port = header.source
            self.access["client"] = f"{self.client_address}:{self.client_port}"
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
                self.access["client"],
            )
        key = client_key(self.client_address)
        if not self.gateway.admit(key, self.client_address, self.generation):
            self.access["end"] = "limited"
            self.log_access = False
            return
        self.limit_key = key

    async def _read_head(self, prefix: bytes = b"") -> tuple[bytes, bytes]:
        """Read the request head; returns (head, bytes after it).

        ``prefix``: bytes already received (a kept-alive connection's next request).
        """
        limit = self.settings.max_request_head
        buffer = bytearray(prefix)
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
                raise _ClientGone(EndReason.CLIENT_ERROR) from None
            if not data:
                raise _ClientGone(EndReason.CLIENT_CLOSE)
            self.received_any = True
            self.access["bytes_in"] += len(data)
            buffer += data
        raise HandshakeRejected(
            431,
            "Request Header Fields Too Large",
            detail=f"request head over max_request_head ({limit} bytes)",
        )


def render_relayed_from(refused: BackendRefusedUpgrade) -> bytes:
    """Render a backend's non-101 answer for the client (row 18)."""
    return render_relayed(
        BackendAnswer(status=refused.response_status, reason=refused.reason, headers=refused.headers),
        refused.body,
        date=_http_date(),
    )


async def _bind(listener: ListenerConfig) -> trio.socket.SocketType:
    """A listening socket for ``listener`` (IPv6 sockets are v6-only, like nginx)."""
    return await _bind_address(listener.address)


async def _bind_address(address: Address) -> trio.socket.SocketType:
    """A listening socket on ``address`` (raises OSError naming it)."""
    try:
        infos = await trio.socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve listener address {address}: {exc.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return sock
