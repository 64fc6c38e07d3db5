"""The server: listeners, one task per connection, drain on shutdown.

Theory of operation
-------------------
:class:`Gateway` binds every ``[[listener]]`` and runs one accept loop per
listener inside a nursery; each accepted connection gets its own task
(:meth:`Gateway._run_connection`) in a second nursery, so one connection's
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

Each connection is a :class:`gatewayd.connection.Connection`, which runs
the SPEC's phases (preamble, request loop, tunnel, record); the gateway gives
it narrow arguments only: its generation, the metrics, :meth:`Gateway.admit`
for the per-address limits behind a PROXY header, and the shutdown event.

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

Metrics (:mod:`gatewayd.metrics`) are counted O(1) per event: here at
accept (and for the limits), by the connection at its phase boundaries (route
chosen, every answer sent, backend success or failure, TLS failure) and once
when it ends (bytes, open gauge).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from gatewayd import health, memory
from gatewayd.acme.manager import AcmeManager
from gatewayd.acme.store import FileSignature, Store, file_signature
from gatewayd.admin import AdminServer
from gatewayd.auth import Authenticator
from gatewayd.backend import BackendPool
from gatewayd.certinfo import HostCertificate, expiry_by_host, host_certificates
from gatewayd.config import Address, Config, HostConfig, ListenerConfig
from gatewayd.connection import CLOSE_SECONDS, Connection, peer_address
from gatewayd.dataplane import DataPlane
from gatewayd.errors import ConfigError, ConfigErrors
from gatewayd.limits import Limits, client_key
from gatewayd.listen import address_key, bind_address, bind_listener
from gatewayd.metrics import Metrics
from gatewayd.routing import HostTable
from gatewayd.static import first_tls_port
from gatewayd.tls import TICKET_KEY_ROTATION, ServerTLS

logger = logging.getLogger("gatewayd.server")

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
    #: The ACME certificate files the TLS contexts were loaded from, by host
    #: first name (see :class:`gatewayd.acme.manager.AcmeManager`).
    acme_files: Mapping[str, FileSignature | None] = field(default_factory=dict)

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
        acme_files, tls, certificates = _load_certificates(config)
        pool = BackendPool.build(config, previous.backends.registry if previous else None)
        return cls(
            number=number,
            config=config,
            tls=tls,
            hosts=HostTable(config.hosts),
            auth=Authenticator(config),
            backends=pool,
            certificates=certificates,
            acme_files=acme_files,
        )

    def rotated(self) -> Generation:
        """The same configuration with every certificate read again (ACME renewals).

        Like a SIGHUP certificate rotation, but nothing else is rebuilt: the
        backend pool, authenticator caches and generation number stay.

        Raises:
            ConfigErrors: a certificate file of a host without ACME went bad meanwhile.
        """
        acme_files, tls, certificates = _load_certificates(self.config)
        return replace(self, tls=tls, certificates=certificates, acme_files=acme_files)

    @functools.cached_property
    def acme_names(self) -> frozenset[str]:
        """Every name of the ``acme = true`` hosts (HTTP-01 answers only for these)."""
        return frozenset(name for host in self.config.acme_hosts for name in host.names)

    @property
    def certificate_expiry(self) -> dict[str, float]:
        """Each host's certificate expiry (Unix time) by the host's first name."""
        return expiry_by_host(self.certificates)


def _load_certificates(
    config: Config,
) -> tuple[dict[str, FileSignature | None], ServerTLS | None, tuple[HostCertificate, ...]]:
    """TLS contexts and certificate facts of ``config``, and which ACME files they came from."""
    acme_files: dict[str, FileSignature | None] = {}
    if config.acme is not None:
        store = Store(config.acme.state_dir)
        # Before loading: a file replaced meanwhile is picked up next round.
        acme_files = {
            host.names[0]: file_signature(store.certificate_path(host.names[0]))
            for host in config.acme_hosts
        }
    tls = ServerTLS.from_config(config) if config.needs_tls else None
    try:
        # ServerTLS has just loaded these files: this only fails if one
        # changed in between, which is then reported like a bad file.
        certificates = host_certificates(config)
    except (OSError, ValueError) as exc:
        problem = ConfigError(str(config.path), "", f"cannot read a certificate: {exc}")
        raise ConfigErrors([problem]) from None
    return acme_files, tls, certificates


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
        limits: Limits | None = None,
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
        #: The connection total, per-address counts and buckets: kept across
        #: reloads (limits are read per call); a worker's is shared with the
        #: other workers (gatewayd.limits).
        self.limits = limits if limits is not None else Limits.local(config.gateway.max_connections)
        self._idle = trio.Event()
        self._idle.set()
        self._live: set[Connection] = set()
        self.dataplane = DataPlane()
        self._reload_lock = trio.Lock()
        self._acceptors: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._services: trio.Nursery | None = None
        self._admin: AdminServer | None = None
        self._serving = False
        self._health_scope = trio.CancelScope()
        #: Issues and renews the ``acme = true`` hosts' certificates (None without any).
        self.acme: AcmeManager | None = None
        if self.config.acme_hosts:
            self.acme = self._acme_manager(self.config)
        _log_warnings(self.generation.config)

    def _acme_manager(self, config: Config) -> AcmeManager:
        return AcmeManager(
            config,
            self.metrics,
            self.rotate_certificates,
            lambda: self.generation.acme_files,
        )

    def rotate_certificates(self) -> None:
        """Read every certificate again and swap them in for new connections.

        Established connections keep the contexts they started with, as on a
        reload. Called by the ACME manager when a certificate file changed.

        Raises:
            ConfigErrors: a certificate went bad meanwhile; nothing changed.
        """
        self.generation = self.generation.rotated()
        self.metrics.certificates_rotated(self.generation.certificate_expiry)
        logger.info(
            "certificates reloaded from disk (ACME); new connections use them, open ones are untouched"
        )

    @property
    def config(self) -> Config:
        return self.generation.config

    @property
    def listen_addresses(self) -> list[tuple[ListenerConfig, tuple[str, int]]]:
        """Each listener with the address it is bound to (the real port for port 0)."""
        return [(slot.config, slot.bound) for slot in self._slots]

    def https_port(self) -> int | None:
        """The port the first TLS listener (in the file's order) is bound to; None without one.

        A ``redirect_https`` listener sends clients there (SPEC 7); asked per
        request, so a reload that moves the TLS listener is followed.
        """
        slots = sorted(self._slots, key=lambda slot: slot.config.index)
        return first_tls_port((slot.config.tls, slot.bound[1]) for slot in slots)

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
            sock = await bind_listener(listener)
        else:
            logger.info("using the inherited socket for %s (socket activation)", listener.address)
        name = sock.getsockname()
        return _Slot(listener, trio.SocketListener(sock), (str(name[0]), int(name[1])))

    async def _open_admin(self, address: Address) -> AdminServer:
        sock = await bind_address(address)
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
            # Freed relay buffers go back to the system after bursts.
            services.start_soon(memory.trim_while_marked)
            async with trio.open_nursery() as connections:
                self._connections = connections
                # Spliced connections leave their tasks for the data plane
                # (gatewayd/dataplane.py); cancelled with the connections at
                # the end of the drain, it ends those it holds as shutdown.
                await connections.start(self.dataplane.run)
                async with trio.open_nursery() as acceptors:
                    self._acceptors = acceptors
                    for slot in self._slots:
                        self._start_accepting(slot)
                    self._start_health_checks()
                    if self.acme is not None:
                        services.start_soon(self.acme.run)
                    acceptors.start_soon(self._rotate_ticket_keys)
                    self._serving = True
                    task_status.started(self)
                    await self._shutdown.wait()
                    acceptors.cancel_scope.cancel()
                for slot in self._slots:
                    await slot.listener.aclose()
                await self._drain()
                # Every connection is over: only the data plane's task is left.
                connections.cancel_scope.cancel()
            services.cancel_scope.cancel()
        logger.info("stopped")

    async def _rotate_ticket_keys(self) -> None:
        """With ``[tls] session_tickets`` on: a new ticket key every ``TICKET_KEY_ROTATION`` s.

        A reload makes a new key too (a new generation's contexts).
        """
        while True:
            await trio.sleep(TICKET_KEY_ROTATION)
            tls = self.generation.tls
            if tls is not None and tls.session_tickets:
                tls.rotate_ticket_key()
                logger.info("TLS session ticket key replaced (every %gs)", TICKET_KEY_ROTATION)

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
            self._replace_admin(new_admin)
        self._start_health_checks()
        self._reconfigure_acme(config)
        _log_warnings(config)
        self._fit_limits(config.gateway.max_connections)
        self.reloads += 1
        return ReloadResult(new.number, tuple(changes))

    def _reconfigure_acme(self, config: Config) -> None:
        """After a reload: the ACME manager takes the new hosts (one starts with the first)."""
        if self.acme is not None:
            self.acme.configure(config)
        elif config.acme_hosts:
            self.acme = self._acme_manager(config)
            if self._services is not None:
                self._services.start_soon(self.acme.run)

    def _replace_admin(self, new_admin: AdminServer | None) -> None:
        """The reload's admin swap: the old endpoint closes, the new one (if any) serves."""
        old_admin, self._admin = self._admin, new_admin
        if old_admin is not None:
            if self._services is not None:
                old_admin.stop()  # its serve() closes the socket
            else:
                old_admin.listener.socket.close()  # bound, never served
            logger.info("admin endpoint on %s closed", old_admin.url)
        if new_admin is not None and self._services is not None:
            self._start_admin(new_admin)

    def _fit_limits(self, max_connections: int) -> None:
        """After a reload: a bigger ``max_connections`` needs a bigger per-address table."""
        if self.limits.fits(max_connections):
            return
        if not self.limits.shared:
            self.limits = self.limits.grown(max_connections)
            return
        logger.warning(
            "max_connections %d: the per-address table shared by the workers was sized at start "
            "(%d entries); new addresses may be refused (per_ip_table_full) until gatewayd restarts",
            max_connections, self.limits.capacity,
        )

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
                if not self.limits.admit_connection(generation.config.gateway.max_connections):
                    # Over the limit (of the whole gateway, every worker's
                    # connections counted): closed at once, before any TLS work.
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
                    address = peer_address(stream)[0]
                    limit_key = client_key(address)
                    if not self.admit(limit_key, address, generation):
                        self.limits.release_connection()
                        stream.socket.close()
                        continue
                self.active_connections += 1
                self.metrics.connection_opened()
                if self._idle.is_set():
                    self._idle = trio.Event()
                connection = Connection(
                    stream,
                    slot.config,
                    generation,
                    metrics=self.metrics,
                    admit=self.admit,
                    shutdown=self._shutdown,
                    limit_key=limit_key,
                    current=self.current_generation,
                    https_port=self.https_port,
                    dataplane=self.dataplane,
                    done=self._connection_done,
                )
                self._live.add(connection)
                self._connections.start_soon(self._run_connection, connection)

    def current_generation(self) -> Generation:
        """The configuration new requests use now (a kept-alive connection's next one too)."""
        return self.generation

    def admit(self, key: str, address: str, generation: Generation) -> bool:
        """Apply the per-address limits to a new connection from ``address``.

        Returns:
            True when admitted: ``self.limits.release(key)`` must follow when
            it ends. False when refused (counted and, at most once a second,
            logged): the caller closes the connection at once.
        """
        settings = generation.config.gateway
        refusal = self.limits.admit(
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
            elif refusal == "per_ip_table_full":
                why = (
                    f"the per-address table is full ({self.limits.capacity} entries, sized for "
                    "max_connections at start: restart gatewayd after raising it)"
                )
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
                connection.record.client,
            )
            if connection in self._live:
                self._connection_done(connection)

    def _connection_done(self, connection: Connection) -> None:
        """A connection is over (its task returned, or the data plane ended it)."""
        if connection not in self._live:
            return
        if connection.limit_key is not None:
            self.limits.release(connection.limit_key)
        self.limits.release_connection()
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
        {str(lst.address): (lst.tls, lst.proxy_protocol) for lst in old.listeners},
        {str(lst.address): (lst.tls, lst.proxy_protocol) for lst in new.listeners},
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
        for host in hosts.values():
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
