"""The configuration's shape: frozen dataclasses, the keys each table accepts.

Pure: no I/O, no trio, no OpenSSL. :mod:`gatewayd.config.build` fills these
dataclasses from a parsed file; every other module of gatewayd reads them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gatewayd.errors import ConfigError

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


@dataclass(frozen=True)
class Address:
    """A listen address. ``host`` has no brackets ("::" for IPv6 any)."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


BackendScheme = Literal["ws", "wss", "unix", "tcp", "unix+tcp"]
Balance = Literal["round_robin", "least_connections", "random_two", "source_ip"]

BALANCE_MODES: tuple[Balance, ...] = ("round_robin", "least_connections", "random_two", "source_ip")
#: tcp:// bridge: a larger WebSocket message closes the connection with 1009 (SPEC section 4).
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: The subprotocol a bridge route without ``subprotocols`` selects when the
#: client offers it, as websockify does: noVNC offers it, and browsers fail a
#: connection whose offered subprotocols were all ignored.
BRIDGE_DEFAULT_SUBPROTOCOL = "binary"


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


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AccessList:
    """``allow`` / ``deny`` CIDR lists of a host or a route (SPEC row 9b).

    nginx semantics: an address in ``deny`` is refused even when ``allow``
    lists it too; when ``allow`` is not empty, an address outside it is
    refused. IPv4-mapped IPv6 networks are stored as IPv4 networks.
    """

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)


@dataclass(frozen=True)
class Redirect:
    """A route's ``redirect`` (SPEC row 9a): answered with ``status`` and a Location.

    ``url`` is split at load into ``origin`` (``scheme://authority``), ``path``
    (None when the URL has none: the request path is then appended whole, as
    nginx ``proxy_pass`` does) and ``query`` (None when it has none).
    """

    url: str
    origin: str
    path: str | None = None
    query: str | None = None
    status: int = 308


@dataclass(frozen=True)
class BasicAuth:
    """``auth = "basic"``: users and their bcrypt hashes, read from ``auth_users``.

    The file is read at load (and so at every reload). ``users`` pairs each
    user name (UTF-8 bytes) with its hash; it never appears in a repr.
    """

    users_file: Path
    users: tuple[tuple[bytes, bytes], ...] = field(repr=False, default=())
    realm: str = "gatewayd"


@dataclass(frozen=True)
class ForwardAuth:
    """``auth = "request"``: ask an HTTP service, like nginx ``auth_request``.

    ``auth_url`` is ``http://host[:port][/path][?query]`` or
    ``unix:/path.sock[:/uri]``; ``target`` is the request-target sent to it.
    """

    url: str
    scheme: Literal["http", "unix"]
    target: str = "/"
    host: str | None = None              # http: name or IP (no brackets)
    port: int | None = None              # http: port
    unix_path: Path | None = None        # unix: socket file (absolute)
    response_headers: tuple[str, ...] = ()   # copied from a 2xx answer to the backend
    cache_seconds: float = 0.0           # 0 = no cache of positive answers

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
    is set (a redirect route never reaches a backend).
    """

    path: str | None
    path_prefix: str | None
    backend: BackendTarget | None
    origins: tuple[str, ...] = ()        # lowercase ASCII serializations; () = any
    subprotocols: tuple[str, ...] = ()   # server preference order; () = no filtering
    extensions: bool = True
    key_path: str = ""                   # "host[0].route[1]"
    redirect: Redirect | None = None
    auth: BasicAuth | ForwardAuth | None = None
    auth_forward: bool = False           # pass the client's Authorization to the backend
    access: AccessList = field(default_factory=AccessList)
    backends: tuple[BackendTarget, ...] = ()   # () is filled in with (backend,) unless redirect
    balance: Balance = "round_robin"
    max_fails: int = 1                   # failed attempts in a row before a backend is skipped
    fail_timeout: float = 10.0           # ... for this long, in seconds (0 max_fails = never)
    health_check: str = ""               # "" off, "tcp" connect only, "/path" WebSocket probe
    health_interval: float = 5.0         # seconds between two active checks of a backend
    backend_ca: Path | None = None       # wss://: CA file (absolute); None = system CAs
    backend_tls_verify: bool = True      # wss://: False = no certificate verification (warned)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE   # bridge: bytes; larger -> close 1009
    backend_max_connections: int = 0     # per backend, for this route; 0 = unlimited
    http: bool = False                   # plain HTTP requests proxied to the backend too (SPEC 7)
    static: Path | None = None           # serve the files under this folder (SPEC 7)
    max_body_size: int | None = None     # http: request body bytes, None = the gateway's value

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

    min_version: TLSVersion = "TLSv1.2"
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"   # OpenSSL cipher list for TLS 1.2
    profile: TLSProfile = "intermediate"


@dataclass(frozen=True)
class CertificatePair:
    """One extra ``certificates = [{certificate, private_key}]`` entry of a host."""

    certificate: Path
    private_key: Path
    key_path: str = ""                   # "host[0].certificates[1]"


#: ACME challenge types gatewayd answers itself, in its default preference.
ACME_CHALLENGES: tuple[str, ...] = ("tls-alpn-01", "http-01")


@dataclass(frozen=True)
class AcmeSettings:
    """The ``[acme]`` table: automatic certificates (RFC 8555) for hosts with ``acme = true``."""

    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str = ""                      # account contact; "" = none
    state_dir: Path = Path("/var/lib/gatewayd/acme")   # absolute (resolved against the config folder)
    ca_bundle: Path | None = None        # PEM CAs to verify the ACME server with (default: system CAs)
    renew_before: float = 30.0           # days before expiry (at most a third of the lifetime)
    challenges: tuple[str, ...] = ACME_CHALLENGES  # types allowed, in preference order


@dataclass(frozen=True)
class HostConfig:
    """One ``[[host]]`` (a virtual host)."""

    names: tuple[str, ...]               # lowercase, no trailing dot; "*.x.org" wildcards
    routes: tuple[RouteConfig, ...]
    certificate: Path | None = None      # absolute (resolved against the config folder)
    private_key: Path | None = None
    default: bool = False
    tls: TLSSettings = field(default_factory=TLSSettings)   # effective: [tls] + host overrides
    index: int = 0                       # position in the file: host[index]
    certificates: tuple[CertificatePair, ...] = ()   # extra pairs (ECDSA beside RSA)
    ocsp_response: Path | None = None    # DER OCSP response stapled to handshakes
    client_ca: Path | None = None        # PEM CAs: clients must present a certificate
    client_subject_header: str = ""      # header carrying the verified client subject
    access: AccessList = field(default_factory=AccessList)  # checked before each route's
    acme: bool = False                   # certificate from [acme] instead of certificate/private_key

    @property
    def key_path(self) -> str:
        return f"host[{self.index}]"


@dataclass(frozen=True)
class ListenerConfig:
    """One ``[[listener]]``."""

    address: Address
    tls: bool = True
    proxy_protocol: bool = False
    index: int = 0


@dataclass(frozen=True)
class GatewaySettings:
    """The ``[gateway]`` table. Durations in seconds."""

    workers: int = 1                     # processes sharing the listeners; "auto" = CPUs, resolved at load
    max_connections: int = 10000
    handshake_timeout: float = 10.0
    backend_connect_timeout: float = 5.0
    idle_timeout: float = 0.0            # 0 = never
    shutdown_timeout: float = 30.0
    max_request_head: int = 16384        # bytes
    server_header: str = "gatewayd"      # "" = omit the Server header
    max_connection_age: float = 0.0      # retire connections older than this; 0 = never
    max_connections_per_ip: int = 0      # open connections per client address; 0 = no limit
    handshakes_per_ip_per_second: float = 0.0   # token bucket rate per client address; 0 = off
    trusted_proxies: tuple[IPNetwork, ...] = ()  # peers whose X-Forwarded-For is extended
    http_keepalive_timeout: float = 75.0  # idle time allowed between two HTTP requests
    max_requests_per_connection: int = 1000
    max_body_size: int = 1048576         # bytes of one proxied request body; 0 = no limit
    http_timeout: float = 60.0           # backend response head, and between two body reads


@dataclass(frozen=True)
class LogSettings:
    """The ``[log]`` table."""

    level: LogLevel = "info"
    format: LogFormat = "text"
    access_log: bool = True


#: ``[admin] listen`` when the table is present without it: loopback only.
DEFAULT_ADMIN_ADDRESS = Address("127.0.0.1", 9901)


@dataclass(frozen=True)
class AdminSettings:
    """The ``[admin]`` table: plain HTTP ``/healthz``, ``/readyz``, ``/metrics``.

    The table's absence (``Config.admin is None``) disables the endpoint.
    """

    listen: Address = DEFAULT_ADMIN_ADDRESS


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration."""

    path: Path                           # the file it came from (absolute)
    listeners: tuple[ListenerConfig, ...]
    hosts: tuple[HostConfig, ...]
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    log: LogSettings = field(default_factory=LogSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    admin: AdminSettings | None = None   # None: no [admin] table, endpoint off
    acme: AcmeSettings | None = None     # None: no [acme] table, no automatic certificates
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
# The schema: which keys are valid where, and which are not implemented yet.
# ---------------------------------------------------------------------------

# Route keys about the backends (SPEC: backends work): a redirect route has none.
BACKEND_KEYS = (
    "balance",
    "max_fails",
    "fail_timeout",
    "health_check",
    "health_interval",
    "backend_ca",
    "backend_tls_verify",
    "max_message_size",
    "backend_max_connections",
)
# Which `auth` kind each auth key belongs to (None: either kind).
AUTH_KEYS: tuple[tuple[str, str | None], ...] = (
    ("auth_users", "basic"),
    ("realm", "basic"),
    ("auth_url", "request"),
    ("auth_response_headers", "request"),
    ("auth_cache_seconds", "request"),
    ("auth_forward", None),
)

#: Keys accepted in each place. "" is the top level of the file.
KNOWN_KEYS: Mapping[str, tuple[str, ...]] = {
    "": ("gateway", "log", "admin", "tls", "acme", "listener", "host"),
    "gateway": (
        "workers",
        "max_connections",
        "handshake_timeout",
        "backend_connect_timeout",
        "idle_timeout",
        "shutdown_timeout",
        "max_request_head",
        "server_header",
        "max_connection_age",
        "max_connections_per_ip",
        "handshakes_per_ip_per_second",
        "trusted_proxies",
        "http_keepalive_timeout",
        "max_requests_per_connection",
        "max_body_size",
        "http_timeout",
    ),
    "log": ("level", "format", "access_log"),
    "admin": ("listen",),
    "tls": ("min_version", "ciphers"),
    "acme": ("directory", "email", "state_dir", "ca_bundle", "renew_before", "challenges"),
    "listener": ("address", "tls", "proxy_protocol"),
    "host": (
        "names",
        "certificate",
        "private_key",
        "default",
        "min_version",
        "ciphers",
        "profile",
        "certificates",
        "ocsp_response",
        "client_ca",
        "client_subject_header",
        "allow",
        "deny",
        "acme",
        "route",
    ),
    "certificates": ("certificate", "private_key"),
    "route": (
        "path",
        "path_prefix",
        "backend",
        "origins",
        "subprotocols",
        "extensions",
        "backends",
        *BACKEND_KEYS,
        "redirect",
        "redirect_status",
        "auth",
        *(key for key, _ in AUTH_KEYS),
        "allow",
        "deny",
        "http",
        "max_body_size",
    ),
}


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
#: enable a key: delete its row, add it to KNOWN_KEYS and validate it in
#: Builder (a scheme: parse it in parse_backend).
NOT_YET_SUPPORTED: tuple[NotYetSupported, ...] = ()

NOT_SUPPORTED_MESSAGE = "not supported by this version of gatewayd yet"

# Route keys that replace `backend` (a route using one needs no `backend`).
BACKEND_ALTERNATIVES = ("backends", "redirect")

#: ``redirect_status`` values: the redirect statuses RFC 9110 section 15.4 defines
#: with a Location (300, 303, 304 and 305 make no sense for a WebSocket GET).
REDIRECT_STATUSES = (301, 302, 307, 308)
AUTH_KINDS = ("basic", "request")
# Route keys a redirect route never gets to (row 9a answers before them).
NOT_WITH_REDIRECT = (
    "http",
    "max_body_size",
    "origins",
    "subprotocols",
    "extensions",
    "auth",
    *(key for key, _ in AUTH_KEYS),
    "allow",
    "deny",
)

#: Upper bound of ``[gateway] workers``.
MAX_WORKERS = 256
