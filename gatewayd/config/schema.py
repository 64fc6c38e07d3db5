"""The configuration's shape: frozen dataclasses whose fields declare the keys.

Pure: no I/O, no trio, no OpenSSL. :mod:`gatewayd.config.build` fills these
dataclasses from a parsed file; every other module of gatewayd reads them.

Theory of operation
-------------------

**Each key is declared once**, on the dataclass field it fills, as hypercorn
writes its settings and caddy its struct fields::

    max_connections: int = key(10000, Int(minimum=1))

The annotation is the key's Python type, the first argument its default, the
kind (:mod:`gatewayd.config.values`) its TOML type and validation. Options
say what is not the field's own business: ``name`` when the file spells the
key differently (``Config.listeners`` is ``[[listener]]``), ``group`` for the
route rules that treat keys together, ``with_auth`` for the keys that need
``auth``, ``places`` for a key of a shared class that only some tables accept
(``profile`` is a host key, not a ``[tls]`` one), ``see`` for the docs
section that explains more, ``summary`` for the line of ``gatewayd check``'s
summary that shows the value. A field without a declaration (``index``,
``key_path``, ``BasicAuth.users``) is filled by the loader, never written.

:data:`PLACES` lists the tables of the file and the dataclasses each one's
keys come from (a ``[[host]]`` accepts :class:`HostConfig`'s keys, the
:class:`TLSSettings` overrides and the :class:`AccessList` keys). Everything
else is derived from the declarations: :data:`KNOWN_KEYS` (unknown-key errors
and their "did you mean"), the route key groups (:data:`BACKEND_KEYS`,
:data:`AUTH_KEYS`, :data:`NOT_WITH_REDIRECT`), the reading of every key whose
kind is a :class:`~gatewayd.config.values.Value` (its type, range, check and
default), the summary lines that list keys, and the tests that hold
docs/configuration.md and config/gatewayd.toml to the declarations.

Adding a key takes three steps, listed in the package docstring
(:mod:`gatewayd.config`): its declaration here, any rule it takes part in
in the builder, its row in docs/configuration.md and its line in
config/gatewayd.toml.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

from gatewayd.config.values import (
    ACME_CHALLENGES,
    Bool,
    Choice,
    Days,
    File,
    Folder,
    Int,
    IntChoice,
    IPNetwork,
    Kind,
    Networks,
    Rate,
    Seconds,
    Step,
    Str,
    StrList,
    Table,
    Tables,
    Workers,
    check_acme_directory,
    check_challenge,
    check_ciphers,
    check_copyable_header,
    check_email,
    check_health_check,
    check_index_name,
    check_realm,
    check_server_header,
    check_server_name,
    check_subject_header,
    check_token,
    parse_origin,
)
from gatewayd.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Unpack

T = TypeVar("T")

TLSVersion = Literal["TLSv1.2", "TLSv1.3"]
TLSProfile = Literal["intermediate", "modern"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]

TLS_VERSIONS: tuple[TLSVersion, ...] = ("TLSv1.2", "TLSv1.3")
#: Mozilla's server-side TLS profiles (https://wiki.mozilla.org/Security/Server_Side_TLS):
#: "intermediate" (TLS 1.2 with ECDHE AEAD suites, and TLS 1.3), "modern" (TLS 1.3 only).
TLS_PROFILES: tuple[TLSProfile, ...] = ("intermediate", "modern")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

BackendScheme = Literal["ws", "wss", "unix", "tcp", "unix+tcp"]
Balance = Literal["round_robin", "least_connections", "random_two", "source_ip"]

BALANCE_MODES: tuple[Balance, ...] = ("round_robin", "least_connections", "random_two", "source_ip")
#: tcp:// bridge: a larger WebSocket message closes the connection with 1009 (SPEC section 4).
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: The subprotocol a bridge route without ``subprotocols`` selects when the
#: client offers it, as websockify does: noVNC offers it, and browsers fail a
#: connection whose offered subprotocols were all ignored.
BRIDGE_DEFAULT_SUBPROTOCOL = "binary"
#: ``redirect_status`` values: the redirect statuses RFC 9110 section 15.4 defines
#: with a Location (300, 303, 304 and 305 make no sense for a WebSocket GET).
REDIRECT_STATUSES = (301, 302, 307, 308)
#: ``auth`` values.
AUTH_KINDS = ("basic", "request")
#: Upper bound of ``[gateway] workers``.
MAX_WORKERS = 256


# ---------------------------------------------------------------------------
# The declaration of a key.
# ---------------------------------------------------------------------------


class _Required:
    """The default of a key that has none: the file must set it (or a rule decides)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()

_METADATA = "gatewayd.config.key"


@dataclass(frozen=True)
class Key:
    """One configuration key, as declared on the dataclass field it fills.

    Attributes:
        kind: its TOML type and validation (:mod:`gatewayd.config.values`).
        name: as written in the file.
        field: the dataclass field it fills.
        default: the field's default, or :data:`REQUIRED`.
        group: ``"request"`` for the route keys about how a request is
            checked and passed on (SPEC rows 9b-14a, plain HTTP): a redirect
            route answers before any of them; ``"backend"`` for those about
            its backends (balancing, health, backend TLS).
        with_auth: the ``auth`` kind the key needs (``"basic"``,
            ``"request"``, or ``"any"`` for either), None when it needs none.
        places: the tables that accept it, when not every table its class
            is in (:data:`PLACES`).
        see: the docs/configuration.md section (its anchor) that says more.
        summary: the line of the check summary that shows it ("" = none).
    """

    kind: Kind
    name: str = ""
    field: str = ""
    default: object = REQUIRED
    group: str = ""
    with_auth: str | None = None
    places: tuple[str, ...] = ()
    see: str = ""
    summary: str = ""


class KeyOptions(TypedDict, total=False):
    """The options of :func:`key` and :func:`declared`: :class:`Key`'s attributes."""

    name: str
    group: str
    with_auth: str | None
    places: tuple[str, ...]
    see: str
    summary: str


def declared(kind: Kind, **options: Unpack[KeyOptions]) -> Mapping[str, Key]:
    """The ``metadata`` of a dataclass field that is a key: ``field(metadata=declared(...))``.

    For keys without a default; :func:`key` is the short form for the others.
    """
    return {_METADATA: Key(kind, **options)}


def key(default: T, kind: Kind, **options: Unpack[KeyOptions]) -> T:
    """A dataclass field that is a key with a default (see the module docstring)."""
    return field(default=default, metadata=declared(kind, **options))


# ---------------------------------------------------------------------------
# The dataclasses, one per table of the file, and the values inside them.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A listen address. ``host`` has no brackets ("::" for IPv6 any)."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BackendTarget:
    """A parsed backend URL.

    Passthrough (the backend speaks WebSocket): ``ws://host[:port][/path]``
    (port 80 by default), ``wss://host[:port][/path]`` (TLS to the backend,
    port 443 by default) or ``unix:/abs/path.sock`` (optionally
    ``unix:/abs/path.sock:/uri`` as in nginx, to give a path). ``path`` is
    None when the URL has no path, in which case the request path is sent on
    unchanged (nginx proxy_pass); "/" is a path.

    Bridge (the backend speaks plain TCP, like websockify):
    ``tcp://host:port`` or ``unix+tcp:/abs/path.sock``; never a path.
    """

    url: str
    scheme: BackendScheme
    host: str | None = None          # ws/wss/tcp: host name or IP (no brackets)
    port: int | None = None          # ws/wss/tcp: port
    unix_path: Path | None = None    # unix/unix+tcp: socket file (absolute)
    path: str | None = None          # None = no path in the URL

    @property
    def bridge(self) -> bool:
        """True for tcp:// and unix+tcp: (the gateway speaks WebSocket itself)."""
        return self.scheme in ("tcp", "unix+tcp")

    @property
    def tls(self) -> bool:
        """True for wss:// (TLS to the backend)."""
        return self.scheme == "wss"

    @property
    def endpoint(self) -> tuple[object, ...]:
        """The backend's network identity and the path it gets (for duplicate checks)."""
        return (self.scheme, self.host, self.port, self.unix_path, self.path)

    def __str__(self) -> str:
        return self.url


IPNetworks = tuple[IPNetwork, ...]


@dataclass(frozen=True)
class AccessList:
    """``allow`` / ``deny`` CIDR lists of a host or a route (SPEC row 9b).

    nginx semantics: an address in ``deny`` is refused even when ``allow``
    lists it too; when ``allow`` is not empty, an address outside it is
    refused. IPv4-mapped IPv6 networks are stored as IPv4 networks.
    """

    allow: IPNetworks = key(
        (), Networks(what="IP networks (CIDR)"), group="request", see="address-lists-allow-and-deny"
    )
    deny: IPNetworks = key(
        (), Networks(what="IP networks (CIDR)"), group="request", see="address-lists-allow-and-deny"
    )

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)


@dataclass(frozen=True)
class Redirect:
    """A route's ``redirect`` (SPEC row 9a): answered with ``status`` and a Location.

    ``url`` is split at load into ``origin`` (``scheme://authority``), ``path``
    (None when the URL has none: the request path is then appended whole, as
    nginx ``proxy_pass`` does) and ``query`` (None when it has none).
    """

    url: str = field(metadata=declared(Step("string", "redirect"), name="redirect", see="redirects"))
    origin: str
    path: str | None = None
    query: str | None = None
    status: int = key(308, IntChoice(REDIRECT_STATUSES), name="redirect_status")


@dataclass(frozen=True)
class BasicAuth:
    """``auth = "basic"``: users and their bcrypt hashes, read from ``auth_users``.

    The file is read at load (and so at every reload). ``users`` pairs each
    user name (UTF-8 bytes) with its hash; it never appears in a repr.
    """

    users_file: Path = field(
        metadata=declared(File(), name="auth_users", group="request", with_auth="basic")
    )
    users: tuple[tuple[bytes, bytes], ...] = field(repr=False, default=())
    realm: str = key("gatewayd", Str(check_realm), group="request", with_auth="basic")


@dataclass(frozen=True)
class ForwardAuth:
    """``auth = "request"``: ask an HTTP service, like nginx ``auth_request``.

    ``auth_url`` is ``http://host[:port][/path][?query]`` or
    ``unix:/path.sock[:/uri]``; ``target`` is the request-target sent to it.
    """

    url: str = field(
        metadata=declared(
            Step("string", "forward_auth"), name="auth_url", group="request", with_auth="request"
        )
    )
    scheme: Literal["http", "unix"]
    target: str = "/"
    host: str | None = None              # http: name or IP (no brackets)
    port: int | None = None              # http: port
    unix_path: Path | None = None        # unix: socket file (absolute)
    # Copied from a 2xx answer to the backend request.
    response_headers: tuple[str, ...] = key(
        (),
        StrList(check_copyable_header, what="header names"),
        name="auth_response_headers",
        group="request",
        with_auth="request",
    )
    # 0 = no cache of positive answers.
    cache_seconds: float = key(
        0.0, Seconds(positive=False), name="auth_cache_seconds", group="request", with_auth="request"
    )

    @property
    def host_header(self) -> str:
        """The Host header sent to the service."""
        if self.scheme == "unix" or self.host is None:
            return "localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"


@dataclass(frozen=True)
class RouteConfig:
    """One ``[[host.route]]``. Exactly one of ``path`` / ``path_prefix`` is set.

    ``backend`` is the route's first backend, ``backends`` all of them (the
    one-element tuple ``(backend,)`` for ``backend = "..."``). The loader
    checks that they share one path and one kind (all bridge or all
    passthrough), so the request is rewritten and answered the same way
    whichever of them is chosen.

    ``backend`` is None and ``backends`` is empty exactly when ``redirect``
    or ``static`` is set (neither route reaches a backend).
    """

    path: str | None = field(metadata=declared(Step("string", "route_match")))
    path_prefix: str | None = field(metadata=declared(Step("string", "route_match")))
    backend: BackendTarget | None = field(
        metadata=declared(Step("string", "route_backends"), see="backends")
    )
    # Lowercase ASCII serializations; () = any.
    origins: tuple[str, ...] = key((), StrList(parse_origin, what="origins"), group="request")
    # Server preference order; () = no filtering.
    subprotocols: tuple[str, ...] = key(
        (), StrList(check_token, what="subprotocol names"), group="request"
    )
    extensions: bool = key(True, Bool(), group="request")
    key_path: str = ""                   # "host[0].route[1]"
    redirect: Redirect | None = None     # the redirect and redirect_status keys
    auth: BasicAuth | ForwardAuth | None = key(
        None, Step("string", "route_auth"), group="request", see="authentication"
    )
    # Pass the client's Authorization to the backend.
    auth_forward: bool = key(False, Bool(), group="request", with_auth="any")
    access: AccessList = field(default_factory=AccessList)   # the allow and deny keys
    # () is filled in with (backend,) unless redirect.
    backends: tuple[BackendTarget, ...] = key(
        (), Step("array of strings", "route_backends"), see="several-backends"
    )
    balance: Balance = key("round_robin", Choice(BALANCE_MODES), group="backend")
    # Failed attempts in a row before a backend is skipped ...
    max_fails: int = key(1, Int(minimum=0), group="backend")
    # ... for this long, in seconds (0 max_fails = never).
    fail_timeout: float = key(10.0, Seconds(positive=True), group="backend")
    # "" off, "tcp" connect only, "/path" WebSocket probe.
    health_check: str = key("", Str(check_health_check), group="backend")
    # Seconds between two active checks of a backend.
    health_interval: float = key(5.0, Seconds(positive=True), group="backend")
    # wss://: CA file (absolute); None = system CAs.
    backend_ca: Path | None = key(None, File(empty_is_off=True), group="backend")
    # wss://: False = no certificate verification (warned).
    backend_tls_verify: bool = key(True, Bool(), group="backend")
    # Bridge: bytes; a larger message closes with 1009.
    max_message_size: int = key(DEFAULT_MAX_MESSAGE_SIZE, Int(minimum=1), group="backend")
    # Per backend, for this route; 0 = unlimited.
    backend_max_connections: int = key(0, Int(minimum=0), group="backend")
    # Plain HTTP requests proxied to the backend too (SPEC 7).
    http: bool = key(False, Bool(), group="request", see="plain-http-beside-websocket")
    # http: request body bytes, None = the gateway's value.
    max_body_size: int | None = key(None, Int(minimum=0), group="request")
    # Instead of a backend: the folder (absolute) whose files are served (SPEC 7).
    static: Path | None = key(None, Step("string (folder)", "static_route"), see="static-files")
    # static: the file served for a directory.
    index: str = key("index.html", Str(check_index_name))
    # static: the Cache-Control value sent with the files ("" = none).
    cache_control: str = key("", Str(check_server_header))

    def __post_init__(self) -> None:
        if not self.backends and self.backend is not None:
            object.__setattr__(self, "backends", (self.backend,))

    @property
    def bridge(self) -> bool:
        """True when the backends are tcp:// / unix+tcp: (the gateway speaks WebSocket).

        False for a redirect route (it has no backend).
        """
        return self.backend is not None and self.backend.bridge

    @property
    def label(self) -> str:
        """How the route is named in logs: "/chat" (exact) or "/chat/*" (prefix)."""
        if self.path is not None:
            return self.path
        return f"{self.path_prefix}*"


@dataclass(frozen=True)
class TLSSettings:
    """The ``[tls]`` table, or a host's effective TLS settings.

    ``profile`` is a host key: "modern" makes ``min_version`` TLSv1.3.
    """

    min_version: TLSVersion = key("TLSv1.2", Choice(TLS_VERSIONS))
    # OpenSSL cipher list for TLS 1.2.
    ciphers: str = key("ECDHE+AESGCM:ECDHE+CHACHA20", Str(check_ciphers))
    profile: TLSProfile = key("intermediate", Choice(TLS_PROFILES), places=("host",))
    # Stateless session tickets (Mozilla intermediate: off); [tls] only, as
    # every host shares the first context's session cache and ticket key.
    session_tickets: bool = key(False, Bool(), places=("tls",))


@dataclass(frozen=True)
class CertificatePair:
    """One extra ``certificates = [{certificate, private_key}]`` entry of a host."""

    certificate: Path = field(metadata=declared(File()))
    private_key: Path = field(metadata=declared(File()))
    key_path: str = ""                   # "host[0].certificates[1]"


@dataclass(frozen=True)
class HostConfig:
    """One ``[[host]]`` (a virtual host)."""

    # Lowercase, no trailing dot; "*.x.org" wildcards.
    names: tuple[str, ...] = field(
        metadata=declared(StrList(check_server_name, what="host names"), see="host-names")
    )
    routes: tuple[RouteConfig, ...] = field(metadata=declared(Tables("route"), name="route"))
    # Absolute (resolved against the config folder).
    certificate: Path | None = key(None, File())
    private_key: Path | None = key(None, File())
    default: bool = key(False, Bool())
    # Effective: [tls] + the host's min_version, ciphers and profile keys.
    tls: TLSSettings = field(default_factory=TLSSettings)
    index: int = 0                       # position in the file: host[index]
    # Extra pairs (ECDSA beside RSA).
    certificates: tuple[CertificatePair, ...] = key((), Tables("certificate_pairs"))
    # DER OCSP response stapled to handshakes.
    ocsp_response: Path | None = key(None, File(empty_is_off=True))
    # PEM CAs: clients must present a certificate.
    client_ca: Path | None = key(None, File(empty_is_off=True))
    # Header carrying the verified client subject.
    client_subject_header: str = key("", Str(check_subject_header))
    # The allow and deny keys, checked before each route's.
    access: AccessList = field(default_factory=AccessList)
    # The certificate comes from [acme] instead of certificate/private_key.
    acme: bool = key(False, Bool(), see="acme")

    @property
    def key_path(self) -> str:
        return f"host[{self.index}]"


@dataclass(frozen=True)
class ListenerConfig:
    """One ``[[listener]]``."""

    address: Address = field(metadata=declared(Step("string", "listeners")))
    tls: bool = key(True, Bool())
    proxy_protocol: bool = key(False, Bool())
    # tls = false only: every request gets 308 to https:// (SPEC 7).
    redirect_https: bool = key(False, Bool())
    index: int = 0


@dataclass(frozen=True)
class GatewaySettings:
    """The ``[gateway]`` table. Durations in seconds."""

    # Processes sharing the listeners; "auto" = CPUs, resolved at load.
    workers: int = key(1, Workers(minimum=1, maximum=MAX_WORKERS), summary="gateway")
    max_connections: int = key(10000, Int(minimum=1), summary="gateway")
    handshake_timeout: float = key(10.0, Seconds(positive=True), summary="timeouts")
    backend_connect_timeout: float = key(5.0, Seconds(positive=True), summary="timeouts")
    # 0 = never.
    idle_timeout: float = key(0.0, Seconds(positive=False, zero="never"), summary="timeouts")
    shutdown_timeout: float = key(30.0, Seconds(positive=True), summary="timeouts")
    max_request_head: int = key(
        16384, Int(minimum=1024, maximum=1048576, unit="bytes"), summary="gateway"
    )
    # "" = omit the Server header.
    server_header: str = key("gatewayd", Str(check_server_header), summary="gateway")
    # Retire connections older than this; 0 = never.
    max_connection_age: float = key(0.0, Seconds(positive=False, zero="never"))
    # Open connections per client address; 0 = no limit.
    max_connections_per_ip: int = key(0, Int(minimum=0))
    # Token bucket rate per client address; 0 = off.
    handshakes_per_ip_per_second: float = key(0.0, Rate())
    # Peers whose X-Forwarded-For is extended.
    trusted_proxies: IPNetworks = key((), Networks(what="CIDRs"))
    # Idle time allowed between two HTTP requests.
    http_keepalive_timeout: float = key(75.0, Seconds(positive=True), summary="http")
    max_requests_per_connection: int = key(1000, Int(minimum=1), summary="http")
    # Bytes of one proxied request body; 0 = no limit.
    max_body_size: int = key(1048576, Int(minimum=0, unit="bytes"), summary="http")
    # Backend response head, and between two body reads.
    http_timeout: float = key(60.0, Seconds(positive=True), summary="http")
    # Once one direction of a tunnel ended, the other has this long; 0 = for ever.
    half_close_timeout: float = key(
        10.0, Seconds(positive=False, zero="for ever"), summary="timeouts"
    )


@dataclass(frozen=True)
class LogSettings:
    """The ``[log]`` table."""

    level: LogLevel = key("info", Choice(LOG_LEVELS), summary="log")
    format: LogFormat = key("text", Choice(LOG_FORMATS), summary="log")
    access_log: bool = key(True, Bool(), summary="log")


@dataclass(frozen=True)
class AcmeSettings:
    """The ``[acme]`` table: automatic certificates (RFC 8555) for hosts with ``acme = true``.

    The table's absence (``Config.acme is None``) means no ACME.
    """

    directory: str = key("https://acme-v02.api.letsencrypt.org/directory", Str(check_acme_directory))
    # Account contact; "" = none.
    email: str = key("", Str(check_email))
    # Absolute (resolved against the config folder); created 0700 at start.
    state_dir: Path = key(Path("/var/lib/gatewayd/acme"), Folder())
    # PEM CAs to verify the ACME server with; None = the system CAs.
    ca_bundle: Path | None = key(None, File(empty_is_off=True))
    # Days before expiry (at most a third of the lifetime; ARI's time wins).
    renew_before: float = key(30.0, Days())
    # Challenge types allowed, in preference order.
    challenges: tuple[str, ...] = key(
        ACME_CHALLENGES, StrList(check_challenge, what="challenge types")
    )


#: ``[admin] listen`` when the table is present without it: loopback only.
DEFAULT_ADMIN_ADDRESS = Address("127.0.0.1", 9901)


@dataclass(frozen=True)
class AdminSettings:
    """The ``[admin]`` table: plain HTTP ``/healthz``, ``/readyz``, ``/metrics``.

    The table's absence (``Config.admin is None``) disables the endpoint.
    """

    listen: Address = key(DEFAULT_ADMIN_ADDRESS, Step("string", "admin"))


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration."""

    path: Path                           # the file it came from (absolute)
    listeners: tuple[ListenerConfig, ...] = field(
        metadata=declared(Tables("listeners"), name="listener")
    )
    hosts: tuple[HostConfig, ...] = field(metadata=declared(Tables("host"), name="host"))
    gateway: GatewaySettings = key(GatewaySettings(), Table("gateway"))
    log: LogSettings = key(LogSettings(), Table("log"))
    tls: TLSSettings = key(TLSSettings(), Table("tls_settings"))
    # None: no [admin] table, endpoint off.
    admin: AdminSettings | None = key(None, Table("admin"))
    # None: no [acme] table, no automatic certificates.
    acme: AcmeSettings | None = key(None, Table("acme"))
    #: Valid but risky settings (``backend_tls_verify = false``), in the error
    #: format; logged at start and reload and printed by ``gatewayd check``.
    warnings: tuple[ConfigError, ...] = ()

    @property
    def needs_tls(self) -> bool:
        return any(listener.tls for listener in self.listeners)

    @property
    def acme_hosts(self) -> tuple[HostConfig, ...]:
        """The hosts whose certificate comes from ACME (empty without ``[acme]``)."""
        if self.acme is None:
            return ()
        return tuple(host for host in self.hosts if host.acme)


# ---------------------------------------------------------------------------
# The tables of the file, and what is derived from the declarations.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """One kind of table in the file, and the dataclasses its keys are declared on.

    Attributes:
        name: how :data:`KNOWN_KEYS` and :class:`NotYetSupported` name it:
            "" is the top level of the file.
        header: how the file writes it (``[gateway]``, ``[[host.route]]``).
        holders: the dataclasses whose declared fields are its keys.
        docs: the docs/configuration.md section whose table lists its keys.
        keys: its keys by name, in declaration order (derived).
    """

    name: str
    header: str
    holders: tuple[type[Any], ...]
    docs: str
    keys: Mapping[str, Key] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        keys: dict[str, Key] = {}
        for holder in self.holders:
            for declaration in declarations(holder, self.name):
                if declaration.name in keys:
                    raise TypeError(f"{self.header}: key {declaration.name!r} is declared twice")
                keys[declaration.name] = declaration
        object.__setattr__(self, "keys", keys)

    def group(self, group: str) -> tuple[Key, ...]:
        """The keys of ``group`` ("request", "backend"), in declaration order."""
        return tuple(key for key in self.keys.values() if key.group == group)


def declarations(holder: type[Any], place: str = "") -> Iterator[Key]:
    """The keys declared on ``holder``'s fields, resolved (name, field, default).

    Args:
        place: leave out the keys whose ``places`` do not include it ("" keeps all).
    """
    for item in dataclasses.fields(holder):
        declaration = item.metadata.get(_METADATA)
        if not isinstance(declaration, Key):
            continue
        if place and declaration.places and place not in declaration.places:
            continue
        if item.default is not dataclasses.MISSING:
            default: object = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = REQUIRED
        yield dataclasses.replace(
            declaration, name=declaration.name or item.name, field=item.name, default=default
        )


#: Every table of the file. A ``[[host]]`` takes the :class:`TLSSettings`
#: overrides and ``allow``/``deny`` besides its own keys; a route takes the
#: keys of its redirect, of both auth kinds and ``allow``/``deny``.
PLACES: Mapping[str, Place] = {
    place.name: place
    for place in (
        Place("", "", (Config,), docs=""),
        Place("gateway", "[gateway]", (GatewaySettings,), docs="gateway"),
        Place("log", "[log]", (LogSettings,), docs="log"),
        Place("admin", "[admin]", (AdminSettings,), docs="admin"),
        Place("acme", "[acme]", (AcmeSettings,), docs="acme"),
        Place("tls", "[tls]", (TLSSettings,), docs="tls"),
        Place("listener", "[[listener]]", (ListenerConfig,), docs="listener"),
        Place("host", "[[host]]", (HostConfig, TLSSettings, AccessList), docs="host"),
        Place("certificates", "certificates = [{...}]", (CertificatePair,), docs="host"),
        Place(
            "route",
            "[[host.route]]",
            (RouteConfig, Redirect, BasicAuth, ForwardAuth, AccessList),
            docs="hostroute",
        ),
    )
}

#: Keys accepted in each place. "" is the top level of the file.
KNOWN_KEYS: Mapping[str, tuple[str, ...]] = {
    name: tuple(place.keys) for name, place in PLACES.items()
}

_ROUTE = PLACES["route"]
#: Route keys about the backends (SPEC: backends work): a redirect route has none.
BACKEND_KEYS: tuple[str, ...] = tuple(key.name for key in _ROUTE.group("backend"))
#: Which ``auth`` kind each auth key needs (None: either kind), those of one kind first.
AUTH_KEYS: tuple[tuple[str, str | None], ...] = tuple(
    (key.name, None if key.with_auth == "any" else key.with_auth)
    for key in sorted(
        (key for key in _ROUTE.keys.values() if key.with_auth is not None),
        key=lambda key: key.with_auth == "any",
    )
)


def _not_with_redirect() -> Iterator[str]:
    for key in _ROUTE.group("request"):
        if key.with_auth is None:
            yield key.name
        if key.name == "auth":
            yield from (name for name, _ in AUTH_KEYS)


#: Route keys a redirect route never gets to (row 9a answers before them).
NOT_WITH_REDIRECT: tuple[str, ...] = tuple(_not_with_redirect())
#: Route keys that replace ``backend`` (a route using one needs no ``backend``).
BACKEND_ALTERNATIVES = ("backends", "redirect", "static")


class _Nothing:
    """Marks a not-yet-supported key that has no accepted value at all."""

    def __repr__(self) -> str:
        return "NOTHING"


NOTHING = _Nothing()


@dataclass(frozen=True)
class NotYetSupported:
    """One SPEC feature that this version rejects with a clear message.

    Attributes:
        place: "" (top level), "gateway", "listener", "host", "route", or
            "backend-scheme" (``key`` is then a URL scheme such as "wss").
        key: the key (or scheme) name.
        accepted: a value that means "feature off" and is therefore accepted
            (``workers = 1``), or :data:`NOTHING` when any use is an error.
    """

    place: str
    key: str
    accepted: object = NOTHING


#: Everything the SPEC lists that this version does not implement yet. To
#: enable a key: delete its row and declare the key (see "How to add a key"
#: above; a backend scheme: parse it in gatewayd.config.urls.parse_backend).
NOT_YET_SUPPORTED: tuple[NotYetSupported, ...] = ()


NOT_SUPPORTED_MESSAGE = "not supported by this version of gatewayd yet"
