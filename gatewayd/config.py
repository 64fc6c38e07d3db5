"""Configuration: the TOML file, validated into frozen dataclasses.

Pure: this module never imports trio or OpenSSL. Checking that certificate
files load and match their keys needs OpenSSL and so lives in
:mod:`gatewayd.tls`; here we only check that they exist and can be read.

Theory of operation
-------------------

Loading runs in three passes, like caddy's Provision/Validate:

1. **Parse.** ``tomllib`` turns the text into plain dicts and lists. A syntax
   error stops here, as one :class:`~gatewayd.errors.ConfigError` carrying the
   line and column ``tomllib`` reports.
2. **Locate.** ``tomllib`` keeps no positions, so :class:`_Locator` scans the
   text once more, tracking table headers (``[gateway]``, ``[[host]]``,
   ``[[host.route]]`` with one counter per array of tables and parent),
   ``key = value`` lines (bare, quoted and dotted keys), arrays and inline
   tables, and multi-line strings, and maps every key path it sees, such as
   ``("host", 1, "route", 0, "backend")``, to its line. A key path that is
   not in the file (a missing required key) gets the line of its nearest
   enclosing table.
3. **Fill defaults, then validate.** :class:`_Builder` walks the parsed data
   table by table. Every problem becomes one ``ConfigError`` with its key path
   and line, and the walk goes on with the default in place of the bad value,
   so one run reports *every* problem; they are raised together, in file
   order, as :class:`~gatewayd.errors.ConfigErrors`.

Keys the SPEC lists but this version does not implement are kept in one
table, :data:`NOT_YET_SUPPORTED`: using one is an error that says so, not an
"unknown key" and not silently ignored. Enabling a key later means removing
its row there and validating it in :class:`_Builder`.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import os
import re
import sys
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict, cast

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from gatewayd.errors import ConfigError, ConfigErrors

DEFAULT_CONFIG_PATH = "/etc/gatewayd/gatewayd.toml"
CONFIG_ENV_VAR = "GATEWAYD_CONFIG"

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
    or ``static`` is set (neither route reaches a backend).
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
    static: Path | None = None           # static files: the folder (absolute) served
    index: str = "index.html"            # static: the file served for a directory
    cache_control: str = ""              # static: Cache-Control value ("" = none)

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
    redirect_https: bool = False         # tls = false only: every request gets 308 to https://


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
    #: Valid but risky settings (``backend_tls_verify = false``), in the error
    #: format; logged at start and reload and printed by ``gatewayd check``.
    warnings: tuple[ConfigError, ...] = ()

    @property
    def needs_tls(self) -> bool:
        return any(listener.tls for listener in self.listeners)


# ---------------------------------------------------------------------------
# The schema: which keys are valid where, and which are not implemented yet.
# ---------------------------------------------------------------------------

# Route keys about the backends (SPEC: backends work): a redirect route has none.
_BACKEND_KEYS = (
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
# Route keys of a static route (SPEC 7): `static` replaces the backend.
_STATIC_KEYS = ("static", "index", "cache_control")
# Which `auth` kind each auth key belongs to (None: either kind).
_AUTH_KEYS: tuple[tuple[str, str | None], ...] = (
    ("auth_users", "basic"),
    ("realm", "basic"),
    ("auth_url", "request"),
    ("auth_response_headers", "request"),
    ("auth_cache_seconds", "request"),
    ("auth_forward", None),
)

#: Keys accepted in each place. "" is the top level of the file.
KNOWN_KEYS: Mapping[str, tuple[str, ...]] = {
    "": ("gateway", "log", "admin", "tls", "listener", "host"),
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
    ),
    "log": ("level", "format", "access_log"),
    "admin": ("listen",),
    "tls": ("min_version", "ciphers"),
    "listener": ("address", "tls", "proxy_protocol", "redirect_https"),
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
        *_BACKEND_KEYS,
        "redirect",
        "redirect_status",
        *_STATIC_KEYS,
        "auth",
        *(key for key, _ in _AUTH_KEYS),
        "allow",
        "deny",
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
#: _Builder (a scheme: parse it in _parse_backend).
NOT_YET_SUPPORTED: tuple[NotYetSupported, ...] = ()

NOT_SUPPORTED_MESSAGE = "not supported by this version of gatewayd yet"

# Route keys that replace `backend` (a route using one needs no `backend`).
_BACKEND_ALTERNATIVES = ("backends", "redirect", "static")

#: ``redirect_status`` values: the redirect statuses RFC 9110 section 15.4 defines
#: with a Location (300, 303, 304 and 305 make no sense for a WebSocket GET).
REDIRECT_STATUSES = (301, 302, 307, 308)
AUTH_KINDS = ("basic", "request")
# Route keys a redirect route never gets to (row 9a answers before them).
_NOT_WITH_REDIRECT = (
    "origins",
    "subprotocols",
    "extensions",
    "auth",
    *(key for key, _ in _AUTH_KEYS),
    "allow",
    "deny",
)
# Headers the gateway sets itself on the backend request (or hop-by-hop ones):
# an auth answer may not supply them.
_NOT_COPYABLE_HEADERS = frozenset(
    {
        "host",
        "connection",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "content-length",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-real-ip",
        "forwarded",
    }
)
# bcrypt as htpasswd -B writes it: $2y$ (or $2b$/$2a$), a two-digit cost, 22
# characters of salt (the last one carries 2 bits: . O e u) and 31 of hash.
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{31}")
#: bcrypt costs accepted in users files: htpasswd -B allows 4 to 17; above
#: that one login costs seconds of CPU.
BCRYPT_MIN_COST = 4
BCRYPT_MAX_COST = 17

# A header value we send as configured: printable ASCII and spaces (RFC 9110 5.5).
_HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]*")
# RFC 7230 section 3.2.6 token characters (subprotocol names, RFC 6455 4.1).
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")
# A number, boolean or date-time value; "1979-05-27 07:32:00" has one inner space.
_SCALAR_RE = re.compile(r"[^\s,\]}#]+(?: \d\d:[^\s,\]}#]*)?")
# The "(at line N, column M)" suffix of a TOMLDecodeError message.
_TOML_POSITION_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_AT_END_RE = re.compile(r"\s*\(at end of document\)\s*$")
# Header names the gateway itself sets or removes on the backend request (and
# Sec-WebSocket-*): client_subject_header must not be one of them.
_RESERVED_HEADERS = frozenset(
    {
        "host", "connection", "upgrade", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "content-length", "proxy-authenticate", "proxy-authorization",
        "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
        "x-real-ip", "forwarded",
    }
)
# AF_UNIX sun_path holds 108 bytes on Linux, including the final NUL.
_MAX_UNIX_PATH_BYTES = 107

KeyPath = tuple[str | int, ...]


#: Upper bound of ``[gateway] workers``.
MAX_WORKERS = 256


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, so taskset and cgroups count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_config_path() -> str:
    """The configuration file to use when ``-c`` is not given.

    Returns:
        ``$GATEWAYD_CONFIG`` when it is set and not empty, else
        ``/etc/gatewayd/gatewayd.toml``.
    """
    return os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


def load(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a configuration file.

    Args:
        path: the TOML file. Relative paths inside it are resolved against its
            folder.

    Returns:
        The validated configuration.

    Raises:
        ConfigErrors: every problem found (a missing or unreadable file, a
            file that is not UTF-8, a syntax error, or all schema errors).
    """
    file = os.fspath(path)
    try:
        with open(file, "rb") as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise ConfigErrors([ConfigError(file, "", "configuration file not found")]) from None
    except IsADirectoryError:
        raise ConfigErrors(
            [ConfigError(file, "", "is a directory, not a configuration file")]
        ) from None
    except PermissionError:
        raise ConfigErrors(
            [ConfigError(file, "", "cannot read the configuration file: permission denied")]
        ) from None
    except OSError as exc:
        raise ConfigErrors(
            [ConfigError(file, "", f"cannot read the configuration file: {exc.strerror or exc}")]
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigErrors(
            [
                ConfigError(
                    file,
                    "",
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); TOML files must be UTF-8",
                    line=line,
                    column=column,
                )
            ]
        ) from None
    return loads(text, file)


def loads(text: str, path: str | os.PathLike[str]) -> Config:
    """Parse and validate a configuration given as text.

    Args:
        text: the TOML document.
        path: where it came from: its folder is the base for relative paths
            and it names the file in error messages (as given).

    Returns:
        The validated configuration.

    Raises:
        ConfigErrors: every problem found, sorted by line.
    """
    file = os.fspath(path)
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark, as some editors write
        text = text[1:]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors([_syntax_error(file, text, exc)]) from None
    builder = _Builder(file, Path(os.path.abspath(file)), _Locator.scan(text))
    config = builder.build(data)
    if builder.errors or config is None:
        raise ConfigErrors(sorted(builder.errors, key=lambda e: e.line or 0))
    return config


def summary(config: Config) -> str:
    """The one-screen text ``gatewayd check`` prints for a valid configuration.

    Args:
        config: a validated configuration.

    Returns:
        Several lines (no trailing newline): the file, the gateway, log and
        admin settings, the listeners, and each host with its certificate, TLS
        settings and routes, in aligned columns.
    """
    gateway = config.gateway
    lines = [
        f"configuration {config.path}",
        "gateway   "
        f"workers {gateway.workers}, "
        f"max_connections {gateway.max_connections}, "
        f"max_request_head {gateway.max_request_head} bytes, "
        f"server_header {_toml_string(gateway.server_header)}",
        "limits    "
        f"per ip: connections {gateway.max_connections_per_ip or 'unlimited'}, "
        "handshakes "
        + (
            f"{gateway.handshakes_per_ip_per_second:g}/s"
            if gateway.handshakes_per_ip_per_second
            else "unlimited"
        )
        + "; trusted_proxies "
        + (", ".join(str(n) for n in gateway.trusted_proxies) or "none"),
        "timeouts  "
        f"handshake {_seconds(gateway.handshake_timeout)}, "
        f"backend_connect {_seconds(gateway.backend_connect_timeout)}, "
        f"idle {_seconds(gateway.idle_timeout) if gateway.idle_timeout else 'never'}, "
        f"shutdown {_seconds(gateway.shutdown_timeout)}",
        "log       "
        f"level {config.log.level}, format {config.log.format}, "
        f"access_log {'on' if config.log.access_log else 'off'}",
        "admin     "
        + (
            f"http://{config.admin.listen}  /healthz /readyz /metrics"
            if config.admin is not None
            else "off (no [admin] table)"
        ),
        "",
        f"listeners ({len(config.listeners)}):",
    ]
    listener_rows = [
        [
            str(listener.address),
            ("tls" if listener.tls else "plain")
            + (" proxy_protocol" if listener.proxy_protocol else "")
            + (" redirect_https" if listener.redirect_https else ""),
            "(any free port)" if listener.address.port == 0 else "",
        ]
        for listener in config.listeners
    ]
    lines.extend(_align(listener_rows, indent="  "))
    lines.append("")
    lines.append(f"hosts ({len(config.hosts)}):")
    route_rows: list[list[str]] = []
    for host in config.hosts:
        for route in host.routes:
            if route.static is not None:
                cache = f"cache_control: {route.cache_control}" if route.cache_control else ""
                route_rows.append(
                    [route.label, "->", f"static {route.static}", f"index: {route.index}", cache, ""]
                )
                continue
            if route.backend is None:
                redirect = route.redirect
                assert redirect is not None, "a route without a backend is a redirect"
                route_rows.append(
                    [route.label, "->", f"redirect {redirect.status} {redirect.url}", "", "", ""]
                )
                continue
            if len(route.backends) > 1:
                target = f"{len(route.backends)} backends, {route.balance}"
            else:
                target = _backend_label(route.backend)
            if route.bridge:
                target += " (bridge)"
            route_rows.append(
                [
                    route.label,
                    "->",
                    target,
                    "origins: " + (", ".join(route.origins) if route.origins else "any"),
                    "subprotocols: " + _subprotocols_label(route),
                    "extensions: " + _extensions_label(route),
                ]
            )
    aligned_routes = iter(_align(route_rows, indent="      "))
    # Details go under the backend column: "      " + label + "  ->  ".
    detail_indent = " " * (6 + max((len(row[0]) for row in route_rows), default=0) + 6)
    for host in config.hosts:
        default = "  (default)" if host.default else ""
        lines.append(f"  {host.key_path}  {', '.join(host.names)}{default}")
        if host.certificate is not None:
            lines.append(f"    certificate  {host.certificate}")
        if host.private_key is not None:
            lines.append(f"    private_key  {host.private_key}")
        for pair in host.certificates:
            lines.append(f"    certificate  {pair.certificate} (key {pair.private_key})")
        if config.needs_tls:
            lines.append(
                f"    tls          profile {host.tls.profile}, "
                f"min_version {host.tls.min_version}, ciphers {host.tls.ciphers}"
            )
        if host.ocsp_response is not None:
            lines.append(f"    ocsp         {host.ocsp_response}")
        if host.client_ca is not None:
            header = host.client_subject_header or "not passed on"
            lines.append(f"    client_ca    {host.client_ca} (subject header: {header})")
        if host.access:
            lines.append(f"    access       {_access_list_label(host.access)} (every route)")
        lines.append(f"    routes ({len(host.routes)}):")
        for route in host.routes:
            lines.append(next(aligned_routes))
            lines.extend(detail_indent + detail for detail in _route_details(route))
            rules = _route_access_label(route)
            if rules:
                lines.append(f"        access: {rules}")
    return "\n".join(lines)


def _access_list_label(access: AccessList) -> str:
    parts = []
    if access.allow:
        parts.append("allow " + ", ".join(str(n) for n in access.allow))
    if access.deny:
        parts.append("deny " + ", ".join(str(n) for n in access.deny))
    return "; ".join(parts)


def _route_access_label(route: RouteConfig) -> str:
    """A route's access rules for the summary: auth kind and address lists."""
    parts = []
    auth = route.auth
    if isinstance(auth, BasicAuth):
        count = len(auth.users)
        parts.append(
            f"auth basic (realm {_toml_string(auth.realm)}, {count} user{'s' if count != 1 else ''} "
            f"from {auth.users_file})"
        )
    elif isinstance(auth, ForwardAuth):
        details = []
        if auth.response_headers:
            details.append("copies " + ", ".join(auth.response_headers))
        if auth.cache_seconds:
            details.append(f"cache {_seconds(auth.cache_seconds)}")
        text = f"auth request {_auth_url_label(auth)}"
        parts.append(text + (f" ({'; '.join(details)})" if details else ""))
    if auth is not None:
        parts.append("Authorization " + ("forwarded" if route.auth_forward else "removed"))
    if route.access:
        parts.append(_access_list_label(route.access))
    return "; ".join(parts)


def _auth_url_label(auth: ForwardAuth) -> str:
    if auth.scheme == "unix" and auth.unix_path is not None:
        return f"unix:{auth.unix_path}:{auth.target}"
    return auth.url


# ---------------------------------------------------------------------------
# Helpers shared by the loader and the summary.
# ---------------------------------------------------------------------------


def format_key_path(path: KeyPath) -> str:
    """Render a key path as written in messages: ``host[1].route[0].backend``.

    Keys that are not bare TOML keys are quoted: ``gateway."max conn"``.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY_RE.fullmatch(part) else _toml_string(part)
            text += f".{name}" if text else name
    return text


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _backend_label(backend: BackendTarget) -> str:
    if backend.unix_path is not None:
        text = f"{backend.scheme}:{backend.unix_path}"
        if backend.path is not None:
            text += f":{backend.path}"
        return text
    return backend.url


def _subprotocols_label(route: RouteConfig) -> str:
    if route.subprotocols:
        return ", ".join(route.subprotocols)
    return BRIDGE_DEFAULT_SUBPROTOCOL + " if offered" if route.bridge else "any"


def _extensions_label(route: RouteConfig) -> str:
    if route.bridge:
        return "none (bridge)"
    return "on" if route.extensions else "off"


def _route_details(route: RouteConfig) -> list[str]:
    """The summary lines under a route: its backends and their settings, when not plain."""
    details: list[str] = []
    several = len(route.backends) > 1
    if several:
        details.extend(_backend_label(backend) for backend in route.backends)
        details.append(
            f"passive health: max_fails {route.max_fails}, "
            f"fail_timeout {_seconds(route.fail_timeout)}"
            if route.max_fails
            else "passive health: off (max_fails 0)"
        )
    if route.health_check:
        probe = "tcp connect" if route.health_check == "tcp" else (
            f"WebSocket handshake {route.health_check}"
        )
        details.append(f"health_check {probe} every {_seconds(route.health_interval)}")
    if route.backend_max_connections:
        details.append(f"backend_max_connections {route.backend_max_connections} per backend")
    if any(backend.tls for backend in route.backends):
        if not route.backend_tls_verify:
            details.append("backend TLS: certificates NOT verified (backend_tls_verify = false)")
        elif route.backend_ca is not None:
            details.append(f"backend TLS: verified against backend_ca {route.backend_ca}")
        else:
            details.append("backend TLS: verified against the system CAs")
    if route.bridge:
        details.append(f"bridge: max_message_size {route.max_message_size} bytes")
    return details


def _align(rows: Sequence[Sequence[str]], indent: str) -> list[str]:
    """Left-align columns of text, two spaces apart, without trailing spaces."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _describe(value: object) -> str:
    """A TOML-flavoured description of a value for messages: ``string 'yes'``."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime.datetime):
        return f"datetime {value.isoformat()}"
    if isinstance(value, datetime.date):
        return f"date {value.isoformat()}"
    if isinstance(value, datetime.time):
        return f"time {value.isoformat()}"
    return type(value).__name__


def _quote(value: str) -> str:
    if len(value) > 60:
        value = value[:57] + "..."
    return repr(value)


def _toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    return str(value)


def _syntax_error(file: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """One ConfigError with the line and column of a TOML syntax error."""
    message = str(exc)
    line = getattr(exc, "lineno", None)
    column = getattr(exc, "colno", None)
    found = _TOML_POSITION_RE.search(message)
    if found is not None:
        message = message[: found.start()]
        if not isinstance(line, int) or not isinstance(column, int):
            line, column = int(found.group(1)), int(found.group(2))
    else:
        at_end = _TOML_AT_END_RE.search(message)
        if at_end is not None:
            message = message[: at_end.start()] + " (at end of file)"
            if not isinstance(line, int) or not isinstance(column, int):
                lines = text.split("\n")
                line, column = len(lines), len(lines[-1]) + 1
    if message[:1].isupper() and not message[1:2].isupper():
        message = message[0].lower() + message[1:]
    return ConfigError(
        file,
        "",
        f"TOML syntax error: {message}",
        line=line if isinstance(line, int) else None,
        column=column if isinstance(column, int) else None,
    )


class _Invalid(Exception):
    """A value failed a parsing helper; the message says why (for ConfigError)."""


def _check_path(value: str) -> None:
    """Check a URL path (route path or prefix, backend path).

    Raises:
        _Invalid: when it does not start with "/", has "?" or "#", whitespace,
            control or non-ASCII characters.
    """
    if not value.startswith("/"):
        raise _Invalid(f"must start with '/', got {_quote(value)}")
    if "?" in value:
        raise _Invalid(
            f"must not contain '?' (a query is never part of a path), got {_quote(value)}"
        )
    if "#" in value:
        raise _Invalid(f"must not contain '#', got {_quote(value)}")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise _Invalid(f"must not contain whitespace or control characters, got {_quote(value)}")
    if not value.isascii():
        raise _Invalid(
            f"must be ASCII: percent-encode other characters as they appear in "
            f"requests, got {_quote(value)}"
        )


def _check_host_name(name: str, *, wildcard: bool) -> str:
    """Validate and normalize a host name or IP literal.

    Args:
        name: a DNS name (letters, digits, hyphens, dots), an IPv4 literal or
            an IPv6 literal (with or without brackets).
        wildcard: allow ``*`` as the whole first label (``*.example.org``).

    Returns:
        The name lowercased without a trailing dot, or the IP in its
        canonical form (IPv6 without brackets).

    Raises:
        _Invalid: with the reason.
    """
    text = name.strip()
    if text != name:
        raise _Invalid(f"must not have surrounding whitespace, got {_quote(name)}")
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise _Invalid(f"not an IPv6 address: {_quote(name)}") from None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass  # not an IP literal: checked as a DNS name below
    if not text.isascii():
        hint = ""
        try:
            hint = f" ({_quote(text.encode('idna').decode('ascii'))})"
        except UnicodeError:
            hint = ""
        raise _Invalid(f"non-ASCII name {_quote(name)}: write its IDNA form{hint}")
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise _Invalid("must not be empty")
    if len(text) > 253:
        raise _Invalid(f"longer than 253 characters: {_quote(name)}")
    labels = text.split(".")
    if "*" in text:
        if not wildcard:
            raise _Invalid(f"wildcards are not allowed here: {_quote(name)}")
        if labels[0] != "*" or "*" in ".".join(labels[1:]) or len(labels) < 2:
            raise _Invalid(
                f"'*' is only allowed as the whole first label, as in '*.example.org': "
                f"{_quote(name)}"
            )
        labels = labels[1:]
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise _Invalid(
                f"not a valid host name: {_quote(name)} (labels are 1-63 letters, digits "
                f"or hyphens, not starting or ending with a hyphen)"
            )
    if labels[-1].isdigit():
        raise _Invalid(f"not a valid host name or IP address: {_quote(name)}")
    return text


def _parse_port(text: str, *, minimum: int) -> int:
    if not text.isdigit() or not text.isascii():
        raise _Invalid(f"port must be a number, got {_quote(text)}")
    port = int(text)
    if not minimum <= port <= 65535:
        raise _Invalid(f"port must be between {minimum} and 65535, got {port}")
    return port


def _parse_authority(text: str, *, what: str) -> tuple[str, str | None, bool]:
    """Split ``host[:port]`` / ``[v6][:port]`` into (host, port text, bracketed).

    Raises:
        _Invalid: on a missing host, an unclosed bracket or an unbracketed IPv6.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _Invalid(f"{what}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _Invalid(f"{what}: unexpected {_quote(rest)} after ']'")
        return host, (rest[1:] if rest else None), True
    if text.count(":") > 1:
        raise _Invalid(f"{what}: IPv6 addresses must be in brackets, as in '[::1]:9000'")
    host, sep, port = text.partition(":")
    return host, (port if sep else None), False


def _parse_listen_address(text: str) -> Address:
    what = "expected 'host:port' or '[ipv6]:port'"
    host, port_text, bracketed = _parse_authority(text, what=what)
    if port_text is None:
        raise _Invalid(f"{what} (e.g. '0.0.0.0:8443'), got {_quote(text)}: the port is missing")
    if not host:
        raise _Invalid(
            f"{what}, got {_quote(text)}: the host is missing "
            "(use '0.0.0.0:PORT' for every IPv4 address or '[::]:PORT' for IPv6)"
        )
    port = _parse_port(port_text, minimum=0)
    if bracketed:
        try:
            return Address(str(ipaddress.IPv6Address(host)), port)
        except ValueError:
            raise _Invalid(f"not an IPv6 address in brackets: {_quote(host)}") from None
    return Address(_check_host_name(host, wildcard=False), port)


_SUPPORTED_BACKENDS = (
    "supported: 'ws://host[:port][/path]', 'wss://host[:port][/path]', "
    "'unix:/path/to.sock[:/path]', 'tcp://host:port' and 'unix+tcp:/path/to.sock'"
)
_DEFAULT_BACKEND_PORTS = {"ws": 80, "wss": 443}


def _url_authority(authority: str, url: str, subject: str, what: str) -> tuple[str, str | None]:
    """The checked host (IPv6 without brackets) and port text of a URL's authority.

    Args:
        authority: the part between "//" and the path.
        url: the whole URL, for messages.
        subject: how messages name the URL ("a backend URL").
        what: how messages name the host ("backend host").
    """
    if "@" in authority:
        raise _Invalid(f"{subject} must not have user information ('user@'): {_quote(url)}")
    host, port_text, bracketed = _parse_authority(authority, what=what)
    if not host:
        the = "the " + subject.split(" ", 1)[1]
        raise _Invalid(f"{the} has no host: {_quote(url)}")
    if bracketed:
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _Invalid(f"not an IPv6 address in brackets: {_quote(host)}") from None
    else:
        host = _check_host_name(host, wildcard=False)
    return host, port_text


def _parse_backend(text: str, base: Path) -> BackendTarget:
    """Parse a backend URL.

    Raises:
        _Invalid: for a malformed URL or an unsupported scheme.
    """
    lowered = text.lower()
    if lowered.startswith("unix+tcp:"):
        return _parse_unix_backend(text, base, bridge=True)
    if lowered.startswith("unix:"):
        return _parse_unix_backend(text, base, bridge=False)
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise _Invalid(f"not a backend URL: {_quote(text)}; {_SUPPORTED_BACKENDS}")
    scheme = scheme.lower()
    for item in NOT_YET_SUPPORTED:
        if item.place == "backend-scheme" and item.key == scheme:
            raise _Invalid(f"{scheme}:// backends are not supported by this version yet")
    if scheme not in ("ws", "wss", "tcp"):
        raise _Invalid(f"unsupported backend scheme '{scheme}://'; {_SUPPORTED_BACKENDS}")
    if "#" in rest:
        raise _Invalid(f"a backend URL must not have a fragment ('#'): {_quote(text)}")
    if "?" in rest:
        raise _Invalid(f"a backend URL must not have a query ('?'): {_quote(text)}")
    slash = rest.find("/")
    authority, path = (rest, None) if slash < 0 else (rest[:slash], rest[slash:])
    host, port_text = _url_authority(authority, text, "a backend URL", "backend host")
    if scheme == "tcp":
        # A TCP service has no default port and no path (websockify's target).
        if port_text is None:
            raise _Invalid(
                f"a tcp:// backend needs a port, as in 'tcp://127.0.0.1:5900': {_quote(text)}"
            )
        if path is not None and path != "/":
            raise _Invalid(
                "a tcp:// backend has no path (the bridge carries bytes, not requests): "
                f"{_quote(text)}"
            )
        path = None
    if port_text is None:
        port = _DEFAULT_BACKEND_PORTS[scheme]
    else:
        port = _parse_port(port_text, minimum=1)
    if path is not None:
        _check_path(path)
    return BackendTarget(
        url=text, scheme=cast(BackendScheme, scheme), host=host, port=port, path=path
    )


def _parse_unix_backend(text: str, base: Path, *, bridge: bool) -> BackendTarget:
    prefix = "unix+tcp:" if bridge else "unix:"
    rest = text[len(prefix) :]
    if "?" in rest or "#" in rest:
        raise _Invalid(f"a backend URL must not have a query or fragment: {_quote(text)}")
    socket, sep, uri = rest.partition(":/")
    path = "/" + uri if sep else None
    if not socket:
        raise _Invalid(f"the {prefix} backend names no socket file: {_quote(text)}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in socket):
        raise _Invalid(f"the socket path has control characters: {_quote(text)}")
    if bridge and path is not None:
        raise _Invalid(
            "a unix+tcp: backend has no path (the bridge carries bytes, not requests): "
            f"{_quote(text)}"
        )
    if path is not None:
        _check_path(path)
    unix_path = Path(os.path.abspath(os.path.join(base, socket)))
    if len(os.fsencode(unix_path)) > _MAX_UNIX_PATH_BYTES:
        raise _Invalid(
            f"socket path {str(unix_path)!r} is too long for a unix socket "
            f"(at most {_MAX_UNIX_PATH_BYTES} bytes)"
        )
    return BackendTarget(
        url=text, scheme="unix+tcp" if bridge else "unix", unix_path=unix_path, path=path
    )


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _parse_origin(text: str) -> str:
    """Normalize an allowed Origin: lowercase ``scheme://host[:port]`` or "null".

    The default port of http/https is dropped, as browsers never send it
    (RFC 6454 section 6.2).

    Raises:
        _Invalid: with the reason.
    """
    example = "an origin is 'scheme://host[:port]', as in 'https://chat.example.com'"
    if text.lower() == "null":
        return "null"
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise _Invalid(f"{example}, got {_quote(text)}")
    scheme = scheme.lower()
    if rest.endswith("/") and not any(c in rest[:-1] for c in "/?#"):
        raise _Invalid(f"{example} with no trailing '/', got {_quote(text)}")
    if any(c in rest for c in "/?#"):
        raise _Invalid(f"{example} with no path, query or fragment, got {_quote(text)}")
    if "@" in rest:
        raise _Invalid(f"{example} with no user information, got {_quote(text)}")
    host, port_text, bracketed = _parse_authority(rest, what=example)
    if not host:
        raise _Invalid(f"{example}, got {_quote(text)}: the host is missing")
    if bracketed:
        try:
            host = f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            raise _Invalid(f"not an IPv6 address in brackets: {_quote(host)}") from None
    elif "*" in host:
        raise _Invalid(f"wildcards are not supported in origins; list each one: {_quote(text)}")
    else:
        host = _check_host_name(host, wildcard=False)
    result = f"{scheme}://{host}"
    if port_text is not None:
        port = _parse_port(port_text, minimum=1)
        if _DEFAULT_PORTS.get(scheme) != port:
            result += f":{port}"
    return result


_REDIRECT_SCHEMES = ("http", "https", "ws", "wss")


def _parse_redirect(text: str) -> tuple[str, str | None, str | None]:
    """Split a ``redirect`` URL into (``scheme://authority``, path, query).

    The URL must be absolute (http, https, ws or wss) with a host, and printable
    ASCII without spaces: it is sent as the Location header, so CR and LF are
    impossible by construction. No fragment, no user information.

    Raises:
        _Invalid: with the reason.
    """
    example = "an absolute URL such as 'wss://new.example.com/chat' (http, https, ws or wss)"
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in text):
        raise _Invalid(
            "must not contain spaces, control characters (CR, LF) or non-ASCII characters "
            f"(percent-encode them), got {_quote(text)}"
        )
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise _Invalid(f"expected {example}, got {_quote(text)}")
    if scheme.lower() not in _REDIRECT_SCHEMES:
        raise _Invalid(f"unsupported scheme '{scheme}://' in {_quote(text)}: expected {example}")
    if "#" in rest:
        raise _Invalid(f"a redirect URL must not have a fragment ('#'): {_quote(text)}")
    before_query, has_query, query = rest.partition("?")
    slash = before_query.find("/")
    authority, path = (
        (before_query, None) if slash < 0 else (before_query[:slash], before_query[slash:])
    )
    if "@" in authority:
        raise _Invalid(f"a redirect URL must not have user information ('user@'): {_quote(text)}")
    host, port_text, bracketed = _parse_authority(authority, what="redirect host")
    if not host:
        raise _Invalid(f"the redirect URL has no host: {_quote(text)}")
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"not an IPv6 address in brackets: {_quote(host)}") from None
    else:
        _check_host_name(host, wildcard=False)
    if port_text is not None:
        _parse_port(port_text, minimum=1)
    if path is not None:
        _check_path(path)
    return f"{scheme.lower()}://{authority}", path, (query if has_query else None)


def _check_realm(realm: str) -> str:
    """A realm goes into ``WWW-Authenticate: Basic realm="..."`` (RFC 7617)."""
    if not realm:
        raise _Invalid("must not be empty")
    if not all(0x20 <= ord(c) <= 0x7E for c in realm) or '"' in realm or "\\" in realm:
        raise _Invalid(
            "must be printable ASCII without '\"' or '\\' (it is sent as a quoted string), "
            f"got {_quote(realm)}"
        )
    return realm


def _hash_kind(value: str) -> str | None:
    """What kind of htpasswd hash ``value`` is, in words; None for usable bcrypt.

    Never returns (part of) the value itself: it may be a plain-text password.
    """
    found = _BCRYPT_RE.fullmatch(value)
    if found is not None:
        cost = int(found.group(1))
        if BCRYPT_MIN_COST <= cost <= BCRYPT_MAX_COST:
            return None
        return (
            f"a bcrypt hash with cost {cost}, outside {BCRYPT_MIN_COST}..{BCRYPT_MAX_COST} "
            "(htpasswd -B -C 10 is a good choice)"
        )
    if value.startswith("$2"):
        return "a malformed bcrypt hash"
    if value.startswith("$apr1$"):
        return "an MD5-apr1 hash ($apr1$, htpasswd -m)"
    if value.startswith("$1$"):
        return "an MD5-crypt hash ($1$)"
    if value.startswith("$5$"):
        return "a SHA-256-crypt hash ($5$)"
    if value.startswith("$6$"):
        return "a SHA-512-crypt hash ($6$)"
    if value.startswith("$"):
        return "a crypt(3) hash of another kind"
    if value.upper().startswith("{SHA}"):
        return "an unsalted SHA-1 hash ({SHA}, htpasswd -s)"
    if value.upper().startswith("{SSHA}"):
        return "a salted SHA-1 hash ({SSHA})"
    if re.fullmatch(r"[./0-9A-Za-z]{13}", value):
        return "a DES crypt hash (htpasswd -d), or a plain-text password"
    return "a plain-text password (htpasswd -p) or a hash of an unknown kind"


def _parse_users(raw: bytes, name: str) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """Parse an htpasswd-style users file: ``user:hash`` lines, bcrypt only.

    Blank lines and lines starting with ``#`` are skipped. Every problem is
    reported as ``FILE:LINE: ...``, naming the user but never the hash.

    Returns:
        ((user, hash) pairs in file order, problems).
    """
    problems: list[str] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw.count(b"\n", 0, exc.start) + 1
        return [], [f"{name}:{bad_line}: not valid UTF-8"]
    users: list[tuple[bytes, bytes]] = []
    first_line: dict[str, int] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            problems.append(f"{name}:{number}: expected 'user:bcrypt-hash' (as htpasswd -B writes)")
            continue
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
            problems.append(f"{name}:{number}: user {user!r}: control characters in the line")
            continue
        kind = _hash_kind(hashed)
        if kind is not None:
            problems.append(
                f"{name}:{number}: user {user!r} has {kind}; only bcrypt hashes "
                f"($2y$, $2b$, $2a$) are accepted: re-create it with "
                f"'htpasswd -B {name} {user}'"
            )
            continue
        if user in first_line:
            problems.append(
                f"{name}:{number}: user {user!r} is listed twice (also line {first_line[user]})"
            )
            continue
        first_line[user] = number
        users.append((user.encode("utf-8"), hashed.encode("ascii")))
    if not users and not problems:
        problems.append(f"{name}: no users in the file (lines are 'user:bcrypt-hash')")
    return users, problems


def _check_copyable_header(name: str) -> str:
    if not _TOKEN_RE.fullmatch(name):
        raise _Invalid(
            f"not a valid header name (letters, digits and !#$%&'*+-.^_`|~), got {_quote(name)}"
        )
    if name.lower() in _NOT_COPYABLE_HEADERS:
        raise _Invalid(
            f"{_quote(name)} cannot be copied to the backend request: the gateway sets it "
            "itself (or it is hop-by-hop)"
        )
    return name


def _parse_auth_url(text: str, base: Path) -> ForwardAuth:
    """Parse ``auth_url``: ``http://host[:port][/path][?query]`` or ``unix:/path.sock[:/uri]``.

    Raises:
        _Invalid: with the reason.
    """
    supported = "supported: 'http://host[:port][/path]' and 'unix:/path/to.sock[:/path]'"
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in text):
        raise _Invalid(
            f"must not contain spaces, control or non-ASCII characters, got {_quote(text)}"
        )
    if "#" in text:
        raise _Invalid(f"an auth_url must not have a fragment ('#'): {_quote(text)}")
    if text.lower().startswith("unix:"):
        rest = text[len("unix:") :]
        socket, sep, uri = rest.partition(":/")
        if not socket:
            raise _Invalid(f"the unix: auth_url names no socket file: {_quote(text)}")
        target = "/" + uri if sep else "/"
        _check_path(target.partition("?")[0])
        unix_path = Path(os.path.abspath(os.path.join(base, socket)))
        if len(os.fsencode(unix_path)) > _MAX_UNIX_PATH_BYTES:
            raise _Invalid(
                f"socket path {str(unix_path)!r} is too long for a unix socket "
                f"(at most {_MAX_UNIX_PATH_BYTES} bytes)"
            )
        return ForwardAuth(url=text, scheme="unix", target=target, unix_path=unix_path)
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise _Invalid(f"not an auth service URL: {_quote(text)}; {supported}")
    if scheme.lower() == "https":
        raise _Invalid(
            "https:// auth services are not supported: use http:// on a local or private "
            f"network, or a unix: socket; {supported}"
        )
    if scheme.lower() != "http":
        raise _Invalid(f"unsupported auth service scheme '{scheme}://'; {supported}")
    before_query, has_query, query = rest.partition("?")
    slash = before_query.find("/")
    authority, path = (
        (before_query, "/") if slash < 0 else (before_query[:slash], before_query[slash:])
    )
    host, port_text = _url_authority(authority, text, "an auth_url", "auth service host")
    port = 80 if port_text is None else _parse_port(port_text, minimum=1)
    _check_path(path)
    target = f"{path}?{query}" if has_query else path
    return ForwardAuth(url=text, scheme="http", target=target, host=host, port=port)


def _network(text: str) -> IPNetwork:
    """A CIDR network, IPv4-mapped IPv6 ones as IPv4 (client addresses compare that way)."""
    network = ipaddress.ip_network(text, strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _check_network(text: str) -> str:
    """Validate and normalize one ``allow``/``deny`` entry (host bits are dropped)."""
    example = "an IP address or CIDR network, as in '10.0.0.0/8', '192.0.2.7' or '2001:db8::/32'"
    if text.lower() == "all":
        raise _Invalid(f"expected {example}; for every address write '0.0.0.0/0' and '::/0'")
    try:
        network = _network(text)
    except ValueError:
        raise _Invalid(f"expected {example}, got {_quote(text)}") from None
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        # '10.1.2.3/8' is almost always a typo, and in an access or trust list
        # a silent guess at what was meant is a security decision: refuse it.
        raise _Invalid(
            f"{_quote(text)} has host bits set: write the network, {_quote(str(network))}"
        ) from None
    return str(network)


# ---------------------------------------------------------------------------
# The locator: key path -> line, since tomllib keeps no positions.
# ---------------------------------------------------------------------------


class _ScanError(Exception):
    """The locator met something it does not understand; it skips the line."""


class _Locator:
    """Maps key paths to the line they are written on (best effort).

    Array-of-tables elements are indexed per parent (``[[host.route]]`` after
    the second ``[[host]]`` is ``("host", 1, "route", n)``), array elements get
    the line where they start, and inline-table keys their own line.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[KeyPath, int] = {}
        self._aot_counts: dict[KeyPath, int] = {}
        self._starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        self._current: KeyPath = ()

    @classmethod
    def scan(cls, text: str) -> _Locator:
        """Scan a TOML document (already known to parse) and return its locator."""
        locator = cls(text)
        locator._scan()
        return locator

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path`` or, when it is not written, of its nearest parent."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    # -- scanning ----------------------------------------------------------

    def _line_at(self, pos: int) -> int:
        return bisect_right(self._starts, pos)

    def _peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def _record(self, path: KeyPath, pos: int) -> None:
        self.lines.setdefault(path, self._line_at(pos))

    def _scan(self) -> None:
        while True:
            self._skip_space(newlines=True)
            if self.pos >= len(self.text):
                return
            try:
                if self._peek() == "[":
                    self._header()
                else:
                    self._key_value(self._current)
            except _ScanError:
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end + 1

    def _skip_space(self, *, newlines: bool) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\r" or (newlines and char == "\n"):
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def _header(self) -> None:
        start = self.pos
        array = self.text.startswith("[[", self.pos)
        self.pos += 2 if array else 1
        key = self._key()
        self._skip_space(newlines=False)
        closing = "]]" if array else "]"
        if not self.text.startswith(closing, self.pos):
            raise _ScanError
        self.pos += len(closing)
        resolved: KeyPath = ()
        for i, part in enumerate(key):
            resolved += (part,)
            if array and i == len(key) - 1:
                index = self._aot_counts.get(resolved, 0)
                self._aot_counts[resolved] = index + 1
                self._record(resolved, start)
                resolved += (index,)
            elif resolved in self._aot_counts:
                resolved += (self._aot_counts[resolved] - 1,)
        self._record(resolved, start)
        self._current = resolved

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self._skip_space(newlines=False)
            char = self._peek()
            if char == '"':
                parts.append(self._basic_string())
            elif char == "'":
                parts.append(self._literal_string())
            else:
                found = _BARE_KEY_RE.match(self.text, self.pos)
                if found is None:
                    raise _ScanError
                parts.append(found.group())
                self.pos = found.end()
            self._skip_space(newlines=False)
            if self._peek() != ".":
                return tuple(parts)
            self.pos += 1

    def _key_value(self, table: KeyPath) -> None:
        start = self.pos
        key = self._key()
        if self._peek() != "=":
            raise _ScanError
        self.pos += 1
        for end in range(1, len(key) + 1):
            self._record(table + key[:end], start)
        self._skip_space(newlines=False)
        self._value(table + key)

    def _value(self, path: KeyPath) -> None:
        text = self.text
        char = self._peek()
        if text.startswith('"""', self.pos) or text.startswith("'''", self.pos):
            self._multiline_string()
        elif char == '"':
            self._basic_string()
        elif char == "'":
            self._literal_string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            found = _SCALAR_RE.match(text, self.pos)
            if found is None:
                raise _ScanError
            self.pos = found.end()

    def _basic_string(self) -> str:
        text = self.text
        self.pos += 1
        out: list[str] = []
        while self.pos < len(text):
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\n":
                raise _ScanError
            if char == "\\":
                code = text[self.pos + 1 : self.pos + 2]
                simple = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b",
                          '"': '"', "\\": "\\"}
                if code in simple:
                    out.append(simple[code])
                    self.pos += 2
                elif code in ("u", "U"):
                    size = 4 if code == "u" else 8
                    digits = text[self.pos + 2 : self.pos + 2 + size]
                    try:
                        out.append(chr(int(digits, 16)))
                    except ValueError:
                        raise _ScanError from None
                    self.pos += 2 + size
                else:
                    raise _ScanError
                continue
            out.append(char)
            self.pos += 1
        raise _ScanError

    def _literal_string(self) -> str:
        end = self.text.find("'", self.pos + 1)
        if end < 0 or "\n" in self.text[self.pos : end]:
            raise _ScanError
        value = self.text[self.pos + 1 : end]
        self.pos = end + 1
        return value

    def _multiline_string(self) -> None:
        text = self.text
        quote = text[self.pos] * 3
        index = self.pos + 3
        while index < len(text):
            if quote == '"""' and text[index] == "\\":
                index += 2
                continue
            if text.startswith(quote, index):
                end = index + 3
                # Up to two quotes may directly precede the closing delimiter.
                while end < len(text) and text[end] == quote[0] and end - index < 5:
                    end += 1
                self.pos = end
                return
            index += 1
        raise _ScanError

    def _array(self, path: KeyPath) -> None:
        self.pos += 1
        index = 0
        while True:
            self._skip_space(newlines=True)
            if self._peek() == "]":
                self.pos += 1
                return
            self._record(path + (index,), self.pos)
            self._value(path + (index,))
            index += 1
            self._skip_space(newlines=True)
            if self._peek() == ",":
                self.pos += 1
            elif self._peek() == "]":
                self.pos += 1
                return
            else:
                raise _ScanError

    def _inline_table(self, path: KeyPath) -> None:
        self.pos += 1
        while True:
            self._skip_space(newlines=True)
            if self._peek() == "}":
                self.pos += 1
                return
            self._key_value(path)
            self._skip_space(newlines=True)
            if self._peek() == ",":
                self.pos += 1
            elif self._peek() == "}":
                self.pos += 1
                return
            else:
                raise _ScanError


# ---------------------------------------------------------------------------
# The builder: parsed TOML -> Config, collecting every error.
# ---------------------------------------------------------------------------

_Table = dict[str, object]


class _BackendSettings(TypedDict):
    """The RouteConfig fields that :meth:`_Builder.backend_settings` checks."""

    balance: Balance
    max_fails: int
    fail_timeout: float
    health_check: str
    health_interval: float
    backend_ca: Path | None
    backend_tls_verify: bool
    max_message_size: int
    backend_max_connections: int


class _Builder:
    """Fills defaults and validates, one table at a time, collecting errors."""

    def __init__(self, file: str, path: Path, locator: _Locator) -> None:
        self.file = file
        self.path = path
        self.base = path.parent
        self.locator = locator
        self.errors: list[ConfigError] = []
        self.warnings: list[ConfigError] = []
        # (host index, [(names index, normalized name)], default) for every host.
        self.host_facts: list[tuple[int, list[tuple[int, str]], bool]] = []

    # -- reporting -----------------------------------------------------------

    def error(self, path: KeyPath, message: str, *, suggestion: str | None = None) -> None:
        """Record one problem at ``path`` (its line comes from the locator)."""
        self.errors.append(
            ConfigError(
                self.file,
                format_key_path(path),
                message,
                line=self.locator.line_of(path),
                suggestion=suggestion,
            )
        )

    def warn(self, path: KeyPath, message: str) -> None:
        """Record a warning at ``path``: valid, but the operator must hear about it."""
        self.warnings.append(
            ConfigError(self.file, format_key_path(path), message, line=self.locator.line_of(path))
        )

    def where(self, path: KeyPath) -> str:
        """``host[0].names[1] (line 7)``: how a message points at another place."""
        line = self.locator.line_of(path)
        text = format_key_path(path)
        return f"{text} (line {line})" if line is not None else text

    # -- tables and keys -----------------------------------------------------

    def check_keys(self, path: KeyPath, table: _Table, place: str) -> None:
        """Report unknown keys (with a suggestion) and not-yet-supported ones."""
        known = KNOWN_KEYS[place]
        later = {item.key: item for item in NOT_YET_SUPPORTED if item.place == place}
        for key, value in table.items():
            if key in known:
                continue
            item = later.get(key)
            if item is not None:
                accepted = item.accepted
                if accepted is not NOTHING and type(value) is type(accepted) and value == accepted:
                    continue
                message = NOT_SUPPORTED_MESSAGE
                if accepted is not NOTHING:
                    message += f" (only {key} = {_toml_literal(accepted)} is accepted)"
                self.error(path + (key,), message)
                continue
            matches = difflib.get_close_matches(key, [*known, *later], n=1, cutoff=0.6)
            self.error(path + (key,), "unknown key", suggestion=matches[0] if matches else None)

    def table(self, path: KeyPath, parent: _Table, key: str) -> _Table:
        """The sub-table ``key`` of ``parent`` ({} when absent or not a table)."""
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path + (key,), f"expected a table ([{key}]), got {_describe(value)}")
            return {}
        return cast(_Table, value)

    def table_array(self, path: KeyPath, parent: _Table, key: str, header: str) -> list[_Table]:
        """The array of tables ``key`` of ``parent``; bad elements are reported and skipped."""
        value = parent.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(
                path + (key,), f"expected an array of tables ([[{header}]]), got {_describe(value)}"
            )
            return []
        tables: list[_Table] = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                tables.append(cast(_Table, item))
            else:
                self.error(
                    path + (key, index), f"expected a table ([[{header}]]), got {_describe(item)}"
                )
                tables.append({})
        return tables

    def get_bool(self, path: KeyPath, table: _Table, key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            self.error(path + (key,), f"expected a boolean (true or false), got {_describe(value)}")
            return default
        return value

    def get_int(
        self,
        path: KeyPath,
        table: _Table,
        key: str,
        default: int,
        *,
        minimum: int,
        maximum: int | None = None,
    ) -> int:
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(path + (key,), f"expected an integer, got {_describe(value)}")
            return default
        if maximum is not None and not minimum <= value <= maximum:
            self.error(path + (key,), f"must be between {minimum} and {maximum}, got {value}")
            return default
        if value < minimum:
            self.error(path + (key,), f"must be at least {minimum}, got {value}")
            return default
        return value

    def get_duration(
        self, path: KeyPath, table: _Table, key: str, default: float, *, positive: bool
    ) -> float:
        value = table.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.error(
                path + (key,),
                f"expected a number of seconds (integer or float), got {_describe(value)}",
            )
            return default
        seconds = float(value)
        if not math.isfinite(seconds):
            self.error(path + (key,), f"must be a finite number of seconds, got {value}")
            return default
        if positive and seconds <= 0:
            self.error(path + (key,), f"must be greater than 0 seconds, got {value}")
            return default
        if seconds < 0:
            self.error(path + (key,), f"must not be negative, got {value}")
            return default
        return seconds

    def get_rate(self, path: KeyPath, table: _Table, key: str, default: float) -> float:
        """A non-negative finite number (a rate per second; 0 = off)."""
        value = table.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.error(path + (key,), f"expected a number (integer or float), got {_describe(value)}")
            return default
        if not math.isfinite(value) or value < 0:
            self.error(path + (key,), f"must be a finite number, 0 or more, got {value}")
            return default
        return float(value)

    def get_str(self, path: KeyPath, table: _Table, key: str, default: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str):
            self.error(path + (key,), f"expected a string, got {_describe(value)}")
            return default
        return value

    def get_choice(
        self, path: KeyPath, table: _Table, key: str, default: str, choices: Sequence[str]
    ) -> str:
        value = self.get_str(path, table, key, default)
        if value not in choices:
            allowed = ", ".join(repr(choice) for choice in choices)
            self.error(path + (key,), f"must be one of {allowed}, got {_quote(value)}")
            return default
        return value

    def get_list(
        self, path: KeyPath, table: _Table, key: str, check: Callable[[str], str], *, what: str
    ) -> tuple[str, ...] | None:
        """Like :meth:`get_indexed_list`, without the indices."""
        items = self.get_indexed_list(path, table, key, check, what=what)
        return None if items is None else tuple(value for _, value in items)

    def get_indexed_list(
        self, path: KeyPath, table: _Table, key: str, check: Callable[[str], str], *, what: str
    ) -> list[tuple[int, str]] | None:
        """A list of strings, each passed through ``check``; duplicates are errors.

        Returns:
            (index in the file, checked value) pairs in order, or None when the
            key is absent or is not an array (reported). Invalid items are
            reported and left out.
        """
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            hint = f' (write {key} = ["{value}"])' if isinstance(value, str) else ""
            self.error(path + (key,), f"expected an array of {what}, got {_describe(value)}{hint}")
            return None
        seen: dict[str, int] = {}
        result: list[tuple[int, str]] = []
        for index, item in enumerate(value):
            item_path = path + (key, index)
            if not isinstance(item, str):
                self.error(item_path, f"expected a string, got {_describe(item)}")
                continue
            try:
                checked = check(item)
            except _Invalid as exc:
                self.error(item_path, str(exc))
                continue
            if checked in seen:
                self.error(
                    item_path,
                    f"{_quote(checked)} is listed twice "
                    f"(also {self.where(path + (key, seen[checked]))})",
                )
                continue
            seen[checked] = index
            result.append((index, checked))
        return result

    def get_file(
        self, path: KeyPath, table: _Table, key: str, *, empty_is_off: bool = False
    ) -> Path | None:
        """A file path resolved against the config folder, checked to be readable.

        With ``empty_is_off``, "" (the key's documented default) means no file.
        """
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, str):
            self.error(path + (key,), f"expected a file name (string), got {_describe(value)}")
            return None
        if not value:
            if not empty_is_off:
                self.error(path + (key,), "must not be empty")
            return None
        resolved = Path(os.path.abspath(os.path.join(self.base, value)))
        problem = _file_problem(resolved)
        if problem is not None:
            self.error(path + (key,), problem)
        return resolved

    # -- the file, table by table --------------------------------------------

    def build(self, data: _Table) -> Config | None:
        """Validate the whole document; returns None when a required part failed."""
        self.check_keys((), data, "")
        gateway = self.gateway(self.table((), data, "gateway"))
        log = self.log(self.table((), data, "log"))
        admin = self.admin(data)
        tls = self.tls_settings(("tls",), self.table((), data, "tls"), TLSSettings())

        listener_tables = self.table_array((), data, "listener", "listener")
        if data.get("listener", []) == []:
            self.error(("listener",), "at least one [[listener]] is required")
        listeners = self.listeners(listener_tables)
        self.check_admin_address(admin, listener_tables)
        # Decided on the raw tables, so that a listener with a bad address
        # still makes every host need a certificate.
        tls_listener = next(
            (i for i, table in enumerate(listener_tables) if table.get("tls", True) is not False),
            None,
        )

        host_tables = self.table_array((), data, "host", "host")
        if data.get("host", []) == []:
            self.error(("host",), "at least one [[host]] is required")
        hosts: list[HostConfig] = []
        for index, host_table in enumerate(host_tables):
            host = self.host(index, host_table, tls, tls_listener)
            if host is not None:
                hosts.append(host)
        self.check_hosts_together()

        if self.errors:
            return None
        return Config(
            path=self.path,
            listeners=tuple(listeners),
            hosts=tuple(hosts),
            gateway=gateway,
            log=log,
            tls=tls,
            admin=admin,
            warnings=tuple(sorted(self.warnings, key=lambda w: w.line or 0)),
        )

    def gateway(self, table: _Table) -> GatewaySettings:
        path: KeyPath = ("gateway",)
        self.check_keys(path, table, "gateway")
        d = GatewaySettings()
        server_header = self.get_str(path, table, "server_header", d.server_header)
        if server_header and not all(0x20 <= ord(c) <= 0x7E for c in server_header):
            self.error(
                path + ("server_header",),
                f"must be printable ASCII (no CR, LF or other control characters), "
                f"got {_quote(server_header)}",
            )
            server_header = d.server_header
        elif server_header != server_header.strip(" "):
            self.error(
                path + ("server_header",),
                f"must not start or end with a space, got {_quote(server_header)}",
            )
            server_header = d.server_header
        return GatewaySettings(
            workers=self.workers(path, table, d.workers),
            max_connections=self.get_int(
                path, table, "max_connections", d.max_connections, minimum=1
            ),
            handshake_timeout=self.get_duration(
                path, table, "handshake_timeout", d.handshake_timeout, positive=True
            ),
            backend_connect_timeout=self.get_duration(
                path, table, "backend_connect_timeout", d.backend_connect_timeout, positive=True
            ),
            idle_timeout=self.get_duration(
                path, table, "idle_timeout", d.idle_timeout, positive=False
            ),
            shutdown_timeout=self.get_duration(
                path, table, "shutdown_timeout", d.shutdown_timeout, positive=True
            ),
            max_request_head=self.get_int(
                path, table, "max_request_head", d.max_request_head, minimum=1024, maximum=1048576
            ),
            server_header=server_header,
            max_connection_age=self.get_duration(
                path, table, "max_connection_age", d.max_connection_age, positive=False
            ),
            max_connections_per_ip=self.get_int(
                path, table, "max_connections_per_ip", d.max_connections_per_ip, minimum=0
            ),
            handshakes_per_ip_per_second=self.get_rate(
                path, table, "handshakes_per_ip_per_second", d.handshakes_per_ip_per_second
            ),
            trusted_proxies=self.trusted_proxies(path, table),
        )

    def workers(self, path: KeyPath, table: _Table, default: int) -> int:
        """``workers``: a count, or "auto" for one per CPU this process may run on."""
        value = table.get("workers", default)
        if value == "auto":
            return available_cpus()
        if isinstance(value, str):
            self.error(path + ("workers",), f'expected an integer or "auto", got {_quote(value)}')
            return default
        return self.get_int(path, table, "workers", default, minimum=1, maximum=MAX_WORKERS)

    def trusted_proxies(self, path: KeyPath, table: _Table) -> tuple[IPNetwork, ...]:
        """``trusted_proxies``: CIDRs, written and normalized like ``allow`` lists."""
        items = self.get_list(path, table, "trusted_proxies", _check_network, what="CIDRs")
        return tuple(_network(item) for item in items or ())

    def log(self, table: _Table) -> LogSettings:
        path: KeyPath = ("log",)
        self.check_keys(path, table, "log")
        d = LogSettings()
        return LogSettings(
            level=cast(LogLevel, self.get_choice(path, table, "level", d.level, LOG_LEVELS)),
            format=cast(LogFormat, self.get_choice(path, table, "format", d.format, LOG_FORMATS)),
            access_log=self.get_bool(path, table, "access_log", d.access_log),
        )

    def admin(self, data: _Table) -> AdminSettings | None:
        """The ``[admin]`` table, or None when the file has none (endpoint off)."""
        if "admin" not in data:
            return None
        path: KeyPath = ("admin",)
        table = self.table((), data, "admin")
        self.check_keys(path, table, "admin")
        if "listen" not in table:
            return AdminSettings()
        text = table["listen"]
        if not isinstance(text, str):
            self.error(path + ("listen",), f"expected a string 'host:port', got {_describe(text)}")
            return AdminSettings()
        try:
            return AdminSettings(listen=_parse_listen_address(text))
        except _Invalid as exc:
            self.error(path + ("listen",), str(exc))
            return AdminSettings()

    def check_admin_address(self, admin: AdminSettings | None, listeners: list[_Table]) -> None:
        """``[admin] listen`` must not be a ``[[listener]]`` address (port 0 never clashes)."""
        if admin is None or admin.listen.port == 0:
            return
        for index, table in enumerate(listeners):
            text = table.get("address")
            if not isinstance(text, str):
                continue
            try:
                address = _parse_listen_address(text)
            except _Invalid:
                continue  # reported with the listener
            if address == admin.listen:
                self.error(
                    ("admin", "listen"),
                    f"duplicate address {admin.listen}: already used by "
                    f"{self.where(('listener', index, 'address'))}",
                )
                return

    def tls_settings(self, path: KeyPath, table: _Table, defaults: TLSSettings) -> TLSSettings:
        """``min_version`` and ``ciphers`` from ``table``, else from ``defaults``."""
        if path == ("tls",):
            self.check_keys(path, table, "tls")
        min_version = self.get_choice(
            path, table, "min_version", defaults.min_version, TLS_VERSIONS
        )
        ciphers = self.get_str(path, table, "ciphers", defaults.ciphers)
        if not ciphers.strip() or not all(0x21 <= ord(c) <= 0x7E or c == " " for c in ciphers):
            self.error(
                path + ("ciphers",),
                f"must be a non-empty OpenSSL cipher list (printable ASCII), got {_quote(ciphers)}",
            )
            ciphers = defaults.ciphers
        return TLSSettings(min_version=cast(TLSVersion, min_version), ciphers=ciphers)

    def listeners(self, tables: list[_Table]) -> list[ListenerConfig]:
        listeners: list[ListenerConfig] = []
        seen: dict[Address, int] = {}
        for index, table in enumerate(tables):
            path: KeyPath = ("listener", index)
            self.check_keys(path, table, "listener")
            tls = self.get_bool(path, table, "tls", True)
            proxy_protocol = self.get_bool(path, table, "proxy_protocol", False)
            redirect_https = self.get_bool(path, table, "redirect_https", False)
            if redirect_https and tls:
                self.error(
                    path + ("redirect_https",),
                    "only used on a plain listener (tls = false): it sends HTTP clients to "
                    "the https:// listener",
                )
            if "address" not in table:
                self.error(path + ("address",), "required key is missing")
                continue
            text = table["address"]
            if not isinstance(text, str):
                self.error(
                    path + ("address",), f"expected a string 'host:port', got {_describe(text)}"
                )
                continue
            try:
                address = _parse_listen_address(text)
            except _Invalid as exc:
                self.error(path + ("address",), str(exc))
                continue
            # Port 0 asks the kernel for any free port: two of them never clash.
            if address.port != 0 and address in seen:
                other = ("listener", seen[address], "address")
                self.error(
                    path + ("address",),
                    f"duplicate address {address}: already used by {self.where(other)}",
                )
                continue
            seen.setdefault(address, index)
            listeners.append(
                ListenerConfig(
                    address=address,
                    tls=tls,
                    proxy_protocol=proxy_protocol,
                    index=index,
                    redirect_https=redirect_https and not tls,
                )
            )
        return listeners

    def host(
        self,
        index: int,
        table: _Table,
        tls_defaults: TLSSettings,
        tls_listener: int | None,
    ) -> HostConfig | None:
        path: KeyPath = ("host", index)
        self.check_keys(path, table, "host")
        ok = True

        indexed_names = self.get_indexed_list(
            path, table, "names", _check_server_name, what="host names"
        )
        names = None if indexed_names is None else tuple(name for _, name in indexed_names)
        if "names" not in table:
            self.error(path + ("names",), "required key is missing")
            ok = False
        elif names is None:
            ok = False
        elif table["names"] == []:
            self.error(path + ("names",), "must list at least one host name")
            ok = False
        default = self.get_bool(path, table, "default", False)
        self.host_facts.append((index, indexed_names or [], default))

        certificate = self.get_file(path, table, "certificate")
        private_key = self.get_file(path, table, "private_key")
        pair = ("certificate", "private_key")
        for key, other in (pair, pair[::-1]):
            if key in table:
                continue
            if tls_listener is not None:
                self.error(
                    path + (key,),
                    f"required key is missing: listener[{tls_listener}] uses TLS, so "
                    "every host needs certificate and private_key",
                )
            elif other in table:
                self.error(path + (key,), f"required key is missing: {other} is set")

        tls = self.host_tls_settings(path, table, tls_defaults)
        certificates = self.certificate_pairs(path, table, certificate is not None)
        ocsp_response = self.get_file(path, table, "ocsp_response", empty_is_off=True)
        if ocsp_response is not None and "certificate" not in table:
            self.error(path + ("ocsp_response",), "needs certificate: OCSP responses are stapled to TLS handshakes")
        client_ca = self.get_file(path, table, "client_ca", empty_is_off=True)
        client_subject_header = self.client_subject_header(path, table, client_ca is not None)
        access = self.access_list(path, table)

        routes: list[RouteConfig] = []
        route_tables = self.table_array(path, table, "route", "host.route")
        if table.get("route", []) == []:
            self.error(path + ("route",), "at least one [[host.route]] is required")
        exact: dict[str, int] = {}
        prefixes: dict[str, int] = {}
        for route_index, route_table in enumerate(route_tables):
            route = self.route(path + ("route", route_index), route_table, exact, prefixes)
            if route is not None:
                routes.append(route)
                if (
                    client_subject_header
                    and isinstance(route.auth, ForwardAuth)
                    and client_subject_header.lower()
                    in (h.lower() for h in route.auth.response_headers)
                ):
                    # Two sources for one header: the backend could not tell the
                    # verified certificate subject from the auth service's value.
                    self.error(
                        path + ("route", route_index, "auth_response_headers"),
                        f"{_quote(client_subject_header)} is this host's client_subject_header "
                        f"({self.where(path + ('client_subject_header',))}): it carries the verified "
                        "client certificate subject and cannot also come from the auth service",
                    )

        if not ok or names is None:
            return None
        return HostConfig(
            names=names,
            routes=tuple(routes),
            certificate=certificate,
            private_key=private_key,
            default=default,
            tls=tls,
            index=index,
            certificates=certificates,
            ocsp_response=ocsp_response,
            client_ca=client_ca,
            client_subject_header=client_subject_header,
            access=access,
        )

    def host_tls_settings(self, path: KeyPath, table: _Table, defaults: TLSSettings) -> TLSSettings:
        """The host's ``min_version``/``ciphers`` over ``[tls]``, and its ``profile``.

        ``profile = "modern"`` is TLS 1.3 only, so it sets ``min_version`` to
        TLSv1.3; writing ``min_version = "TLSv1.2"`` beside it is an error.
        """
        settings = self.tls_settings(path, table, defaults)
        profile = cast(
            TLSProfile, self.get_choice(path, table, "profile", "intermediate", TLS_PROFILES)
        )
        if profile == "modern":
            if table.get("min_version", "TLSv1.3") != "TLSv1.3":
                self.error(
                    path + ("min_version",),
                    f"profile = \"modern\" is TLS 1.3 only; remove min_version "
                    f"or use profile = \"intermediate\" (got {_quote(settings.min_version)})",
                )
            return TLSSettings(min_version="TLSv1.3", ciphers=settings.ciphers, profile=profile)
        return TLSSettings(
            min_version=settings.min_version, ciphers=settings.ciphers, profile=profile
        )

    def certificate_pairs(
        self, path: KeyPath, table: _Table, has_main: bool
    ) -> tuple[CertificatePair, ...]:
        """``certificates = [{certificate, private_key}, ...]``: extra pairs beside the main one."""
        if "certificates" in table and not has_main and "certificate" not in table:
            self.error(
                path + ("certificates",),
                "needs certificate and private_key: the extra pairs go beside the main one",
            )
        pairs: list[CertificatePair] = []
        for index, item in enumerate(self.table_array(path, table, "certificates", "host.certificates")):
            item_path = path + ("certificates", index)
            self.check_keys(item_path, item, "certificates")
            files: dict[str, Path | None] = {}
            for key in ("certificate", "private_key"):
                if key not in item:
                    self.error(item_path + (key,), "required key is missing")
                    files[key] = None
                else:
                    files[key] = self.get_file(item_path, item, key)
            cert, key_file = files["certificate"], files["private_key"]
            if cert is not None and key_file is not None:
                pairs.append(CertificatePair(cert, key_file, format_key_path(item_path)))
        return tuple(pairs)

    def client_subject_header(self, path: KeyPath, table: _Table, has_client_ca: bool) -> str:
        """A header name for the verified client subject; needs ``client_ca``."""
        name = self.get_str(path, table, "client_subject_header", "")
        if not name:
            return ""
        key = path + ("client_subject_header",)
        if not _TOKEN_RE.fullmatch(name):
            self.error(key, f"not a valid header name (an RFC 9110 token), got {_quote(name)}")
            return ""
        lowered = name.lower()
        if lowered in _RESERVED_HEADERS or lowered.startswith("sec-websocket-"):
            self.error(
                key,
                f"{_quote(name)} is a header the gateway sets itself; "
                "choose another name, such as 'X-Client-Subject'",
            )
            return ""
        if not has_client_ca:
            self.error(
                key,
                "needs client_ca: only a certificate verified against client_ca has a "
                "subject to pass on",
            )
            return ""
        return name

    def route(
        self, path: KeyPath, table: _Table, exact: dict[str, int], prefixes: dict[str, int]
    ) -> RouteConfig | None:
        self.check_keys(path, table, "route")
        ok = True

        has_path, has_prefix = "path" in table, "path_prefix" in table
        if has_path and has_prefix:
            self.error(path, "set either path (exact match) or path_prefix, not both")
            ok = False
        elif not has_path and not has_prefix:
            self.error(path, "one of path (exact match) or path_prefix is required")
            ok = False
        match_path: str | None = None
        match_prefix: str | None = None
        for key, seen, kind in (("path", exact, "path"), ("path_prefix", prefixes, "prefix")):
            if key not in table:
                continue
            value = table[key]
            if not isinstance(value, str):
                self.error(path + (key,), f"expected a string, got {_describe(value)}")
                ok = False
                continue
            try:
                _check_path(value)
            except _Invalid as exc:
                self.error(path + (key,), str(exc))
                ok = False
                continue
            route_index = cast(int, path[-1])
            if value in seen:
                other = path[:-1] + (seen[value], key)
                self.error(
                    path + (key,),
                    f"duplicate {kind} {_quote(value)} in this host: "
                    f"already used by {self.where(other)}",
                )
                ok = False
                continue
            seen[value] = route_index
            if key == "path":
                match_path = value
            else:
                match_prefix = value

        if "static" in table:
            return self.static_route(path, table, match_path, match_prefix, ok)
        for key in _STATIC_KEYS[1:]:
            if key in table:
                self.error(path + (key,), "only used together with static")
                ok = False

        backends = self.route_backends(path, table)

        if "redirect" in table:
            redirect = self.redirect(path, table)
            for key in ("backend", "backends"):
                if key in table:
                    self.error(
                        path + ("redirect",),
                        f"set either {key} or redirect, not both (a redirect route has no "
                        "backend)",
                    )
                    return None
            for key in _NOT_WITH_REDIRECT:
                if key in table:
                    self.error(
                        path + (key,),
                        "not used on a redirect route: the redirect is answered before it "
                        "would be checked",
                    )
                    ok = False
            for key in _BACKEND_KEYS:
                if key in table:
                    self.error(
                        path + (key,),
                        "not used on a redirect route: it has no backend to balance, check "
                        "or connect to",
                    )
                    ok = False
            if not ok or redirect is None:
                return None
            return RouteConfig(
                path=match_path,
                path_prefix=match_prefix,
                backend=None,
                key_path=format_key_path(path),
                redirect=redirect,
            )
        if "redirect_status" in table:
            self.error(path + ("redirect_status",), "only used together with redirect")
            ok = False

        origins = self.get_list(path, table, "origins", _parse_origin, what="origins")
        subprotocols = self.get_list(
            path, table, "subprotocols", _check_token, what="subprotocol names"
        )
        extensions = self.get_bool(path, table, "extensions", True)
        auth, auth_ok = self.route_auth(path, table)
        auth_forward = self.get_bool(path, table, "auth_forward", False)
        access = self.access_list(path, table)
        settings = self.backend_settings(path, table, backends)
        if backends and backends[0].bridge:
            # A bridge sends no HTTP request on to its tcp:// backend, so nothing
            # from the client's request or the auth answer can reach it.
            if auth_forward:
                self.error(
                    path + ("auth_forward",),
                    "not used with tcp:// and unix+tcp: bridge backends: the bridge sends "
                    "no HTTP request (and so no Authorization) to the backend",
                )
                ok = False
            if isinstance(auth, ForwardAuth) and auth.response_headers:
                self.error(
                    path + ("auth_response_headers",),
                    "not used with tcp:// and unix+tcp: bridge backends: the bridge sends "
                    "no HTTP request (and so no headers) to the backend",
                )
                ok = False

        if not ok or not auth_ok or not backends:
            return None
        return RouteConfig(
            path=match_path,
            path_prefix=match_prefix,
            backend=backends[0],
            origins=origins or (),
            subprotocols=subprotocols or (),
            extensions=extensions,
            key_path=format_key_path(path),
            auth=auth,
            auth_forward=auth_forward,
            access=access,
            backends=tuple(backends),
            **settings,
        )

    def static_route(
        self,
        path: KeyPath,
        table: _Table,
        match_path: str | None,
        match_prefix: str | None,
        ok: bool,
    ) -> RouteConfig | None:
        """A ``static = "DIR"`` route (SPEC 7): files under DIR instead of a backend."""
        for key in ("backend", "backends", "redirect"):
            if key in table:
                self.error(
                    path + ("static",),
                    f"set either {key} or static, not both (a static route serves files "
                    "and has no backend)",
                )
                return None
        for key in (
            *_BACKEND_KEYS,
            "redirect_status",
            "origins",
            "subprotocols",
            "extensions",
            "auth",
            *(key for key, _ in _AUTH_KEYS),
        ):
            if key in table:
                self.error(
                    path + (key,),
                    "not used on a static route: it serves files, with no backend and no "
                    "WebSocket (limit who may read them with allow/deny)",
                )
                ok = False
        folder = self.static_folder(path, table)
        index = self.get_str(path, table, "index", "index.html")
        if not index or "/" in index or index.startswith(".") or "\x00" in index:
            self.error(
                path + ("index",),
                f"must be a file name inside the folder (no '/', not starting with '.'), "
                f"got {_quote(index)}",
            )
            ok = False
        cache_control = self.get_str(path, table, "cache_control", "")
        if not _HEADER_VALUE_RE.fullmatch(cache_control):
            self.error(
                path + ("cache_control",),
                f"must be a header value (printable ASCII), got {_quote(cache_control)}",
            )
            ok = False
        access = self.access_list(path, table)
        if not ok or folder is None:
            return None
        return RouteConfig(
            path=match_path,
            path_prefix=match_prefix,
            backend=None,
            key_path=format_key_path(path),
            access=access,
            static=folder,
            index=index,
            cache_control=cache_control.strip(),
        )

    def static_folder(self, path: KeyPath, table: _Table) -> Path | None:
        """``static``: a folder resolved against the config folder, checked to be readable."""
        value = table["static"]
        if not isinstance(value, str) or not value:
            self.error(
                path + ("static",), f"expected a folder name (string), got {_describe(value)}"
            )
            return None
        folder = Path(os.path.abspath(os.path.join(self.base, value)))
        if not folder.exists():
            self.error(path + ("static",), f"folder not found: {folder}")
            return None
        if not folder.is_dir():
            self.error(path + ("static",), f"not a folder: {folder}")
            return None
        if not os.access(folder, os.R_OK | os.X_OK):
            self.error(path + ("static",), f"folder not readable: {folder}")
            return None
        return folder

    def route_backends(self, path: KeyPath, table: _Table) -> list[BackendTarget]:
        """``backend`` (one URL) or ``backends`` (several): the parsed targets, [] on errors."""
        if "backend" in table and "backends" in table:
            self.error(
                path + ("backends",),
                "set either backend (one URL) or backends (several URLs), not both",
            )
            return []
        if "backend" in table:
            value = table["backend"]
            if not isinstance(value, str):
                self.error(
                    path + ("backend",), f"expected a backend URL string, got {_describe(value)}"
                )
                return []
            try:
                return [_parse_backend(value, self.base)]
            except _Invalid as exc:
                self.error(path + ("backend",), str(exc))
                return []
        if "backends" in table:
            return self.backend_list(path + ("backends",), table["backends"])
        if not any(key in table for key in _BACKEND_ALTERNATIVES):
            self.error(path + ("backend",), "required key is missing")
        return []

    def backend_list(self, path: KeyPath, value: object) -> list[BackendTarget]:
        """The ``backends`` array: every URL valid, no duplicates, one kind, one path."""
        if not isinstance(value, list):
            hint = f' (write backends = ["{value}"])' if isinstance(value, str) else ""
            self.error(path, f"expected an array of backend URLs, got {_describe(value)}{hint}")
            return []
        if not value:
            self.error(path, "must list at least one backend URL")
            return []
        errors_before = len(self.errors)
        targets: list[BackendTarget] = []
        seen: dict[tuple[object, ...], int] = {}
        first: tuple[int, BackendTarget] | None = None
        for index, item in enumerate(value):
            item_path = path + (index,)
            if not isinstance(item, str):
                self.error(item_path, f"expected a backend URL string, got {_describe(item)}")
                continue
            try:
                target = _parse_backend(item, self.base)
            except _Invalid as exc:
                self.error(item_path, str(exc))
                continue
            if target.endpoint in seen:
                self.error(
                    item_path,
                    f"{_quote(item)} is listed twice "
                    f"(also {self.where(path + (seen[target.endpoint],))})",
                )
                continue
            seen[target.endpoint] = index
            if first is None:
                first = (index, target)
            elif target.bridge != first[1].bridge:
                self.error(
                    item_path,
                    "a route cannot mix tcp:// / unix+tcp: bridge backends with WebSocket "
                    f"backends (ws://, wss://, unix:): {_quote(item)} here, "
                    f"{_quote(first[1].url)} at {self.where(path + (first[0],))}",
                )
                continue
            elif target.path != first[1].path:
                self.error(
                    item_path,
                    "every backend of a route must have the same path (the request path is "
                    f"rewritten once per route): {_path_of(target)} here, "
                    f"{_path_of(first[1])} at {self.where(path + (first[0],))}",
                )
                continue
            targets.append(target)
        return targets if len(self.errors) == errors_before else []

    def backend_settings(
        self, path: KeyPath, table: _Table, backends: list[BackendTarget]
    ) -> _BackendSettings:
        """Balancing, health and backend TLS keys of a route, checked against its backends.

        A key that has no effect on this route's kind of backend is an error
        when set to anything but its default (``backend_ca`` without a
        ``wss://`` backend, ``max_message_size`` without a bridge), so that a
        setting is never silently ignored.
        """
        d = RouteConfig(path="/", path_prefix=None, backend=BackendTarget(url="", scheme="ws"))
        kinds = {"bridge" if b.bridge else "passthrough" for b in backends}
        has_wss = any(b.tls for b in backends)
        urls = ", ".join(b.url for b in backends if b.tls)

        balance = self.get_choice(path, table, "balance", d.balance, BALANCE_MODES)
        max_fails = self.get_int(path, table, "max_fails", d.max_fails, minimum=0)
        fail_timeout = self.get_duration(
            path, table, "fail_timeout", d.fail_timeout, positive=True
        )

        health_check = self.get_str(path, table, "health_check", d.health_check)
        if health_check not in ("", "tcp"):
            problem: str | None = None
            if not health_check.startswith("/"):
                problem = (
                    "must be \"\" (off), \"tcp\" (connect only) or a path such as "
                    f"\"/healthz\" (a WebSocket handshake probe), got {_quote(health_check)}"
                )
            else:
                try:
                    _check_path(health_check)
                except _Invalid as exc:
                    problem = str(exc)
                if problem is None and "bridge" in kinds:
                    problem = (
                        "a WebSocket handshake probe needs WebSocket backends; check tcp:// "
                        "and unix+tcp: backends with health_check = \"tcp\""
                    )
            if problem is not None:
                self.error(path + ("health_check",), problem)
                health_check = d.health_check
        health_interval = self.get_duration(
            path, table, "health_interval", d.health_interval, positive=True
        )

        backend_tls_verify = self.get_bool(
            path, table, "backend_tls_verify", d.backend_tls_verify
        )
        backend_ca: Path | None = None
        if table.get("backend_ca") != "":
            backend_ca = self.get_file(path, table, "backend_ca")
        if backend_ca is not None and backends and not has_wss:
            self.error(
                path + ("backend_ca",),
                "only used to verify wss:// backends, and this route has none",
            )
        elif backend_ca is not None and not backend_tls_verify:
            self.error(
                path + ("backend_ca",),
                "not used with backend_tls_verify = false; remove one of the two",
            )
        if not backend_tls_verify:
            if backends and not has_wss:
                self.error(
                    path + ("backend_tls_verify",),
                    "only applies to wss:// backends, and this route has none",
                )
            elif has_wss:
                self.warn(
                    path + ("backend_tls_verify",),
                    f"set to false: the TLS certificates of {urls} are NOT verified, so anyone on "
                    "the network path to the backend can impersonate it; prefer "
                    "backend_ca = \"ca.pem\"",
                )

        max_message_size = self.get_int(
            path, table, "max_message_size", d.max_message_size, minimum=1
        )
        if max_message_size != d.max_message_size and kinds == {"passthrough"}:
            self.error(
                path + ("max_message_size",),
                "only applies to tcp:// and unix+tcp: bridge backends (passthrough "
                "backends see the frames themselves)",
            )
        backend_max_connections = self.get_int(
            path, table, "backend_max_connections", d.backend_max_connections, minimum=0
        )
        return {
            "balance": cast(Balance, balance),
            "max_fails": max_fails,
            "fail_timeout": fail_timeout,
            "health_check": health_check,
            "health_interval": health_interval,
            "backend_ca": backend_ca,
            "backend_tls_verify": backend_tls_verify,
            "max_message_size": max_message_size,
            "backend_max_connections": backend_max_connections,
        }

    def redirect(self, path: KeyPath, table: _Table) -> Redirect | None:
        """``redirect`` and ``redirect_status`` (SPEC row 9a); None when invalid."""
        value = table["redirect"]
        status = table.get("redirect_status", 308)
        if not isinstance(status, int) or isinstance(status, bool):
            self.error(
                path + ("redirect_status",), f"expected an integer, got {_describe(status)}"
            )
            status = 308
        elif status not in REDIRECT_STATUSES:
            allowed = ", ".join(str(code) for code in REDIRECT_STATUSES)
            self.error(path + ("redirect_status",), f"must be one of {allowed}, got {status}")
            status = 308
        if not isinstance(value, str):
            self.error(
                path + ("redirect",), f"expected an absolute URL string, got {_describe(value)}"
            )
            return None
        try:
            origin, redirect_path, query = _parse_redirect(value)
        except _Invalid as exc:
            self.error(path + ("redirect",), str(exc))
            return None
        return Redirect(url=value, origin=origin, path=redirect_path, query=query, status=status)

    def route_auth(self, path: KeyPath, table: _Table) -> tuple[BasicAuth | ForwardAuth | None, bool]:
        """``auth`` and the keys that go with it (SPEC row 14a).

        Returns:
            The route's authentication (None without ``auth``) and whether
            every auth key was valid.
        """
        kind: str | None = None
        ok = True
        if "auth" in table:
            value = table["auth"]
            if not isinstance(value, str):
                self.error(
                    path + ("auth",),
                    f'expected a string ("basic" or "request"), got {_describe(value)}',
                )
                return None, False
            if value not in AUTH_KINDS:
                self.error(path + ("auth",), f"must be one of 'basic', 'request', got {_quote(value)}")
                return None, False
            kind = value
        for key, needs in _AUTH_KEYS:
            if key not in table or kind is not None and needs in (None, kind):
                continue
            if needs is None:
                message = 'only used with auth ("basic" or "request"); this route has no auth'
            elif kind is None:
                message = f'only used with auth = "{needs}"; this route has no auth'
            else:
                message = f'only used with auth = "{needs}", not with auth = "{kind}"'
            self.error(path + (key,), message)
            ok = False
        if kind == "basic":
            basic = self.basic_auth(path, table)
            return basic, ok and basic is not None
        if kind == "request":
            forward = self.forward_auth(path, table)
            return forward, ok and forward is not None
        return None, ok

    def basic_auth(self, path: KeyPath, table: _Table) -> BasicAuth | None:
        realm = self.get_str(path, table, "realm", "gatewayd")
        realm_ok = True
        try:
            _check_realm(realm)
        except _Invalid as exc:
            self.error(path + ("realm",), str(exc))
            realm_ok = False
        if "auth_users" not in table:
            self.error(
                path + ("auth_users",),
                'required with auth = "basic": an htpasswd-style file of bcrypt hashes '
                "(htpasswd -B)",
            )
            return None
        errors_before = len(self.errors)
        users_file = self.get_file(path, table, "auth_users")
        if users_file is None or len(self.errors) > errors_before or not realm_ok:
            return None
        try:
            raw = users_file.read_bytes()
        except OSError as exc:
            self.error(path + ("auth_users",), f"cannot read {users_file}: {exc.strerror or exc}")
            return None
        users, problems = _parse_users(raw, str(users_file))
        for problem in problems:
            self.error(path + ("auth_users",), problem)
        if problems:
            return None
        return BasicAuth(users_file=users_file, users=tuple(users), realm=realm)

    def forward_auth(self, path: KeyPath, table: _Table) -> ForwardAuth | None:
        ok = True
        headers = self.get_indexed_list(
            path, table, "auth_response_headers", _check_copyable_header, what="header names"
        )
        seen: dict[str, int] = {}
        for index, name in headers or []:
            first = seen.setdefault(name.lower(), index)
            if first != index:
                self.error(
                    path + ("auth_response_headers", index),
                    f"{_quote(name)} is listed twice (header names ignore case; also "
                    f"{self.where(path + ('auth_response_headers', first))})",
                )
                ok = False
        cache_seconds = self.get_duration(path, table, "auth_cache_seconds", 0.0, positive=False)
        if "auth_url" not in table:
            self.error(
                path + ("auth_url",),
                'required with auth = "request": the URL of the authentication service, '
                "as in 'http://127.0.0.1:9100/check'",
            )
            return None
        value = table["auth_url"]
        if not isinstance(value, str):
            self.error(path + ("auth_url",), f"expected a URL string, got {_describe(value)}")
            return None
        try:
            service = _parse_auth_url(value, self.base)
        except _Invalid as exc:
            self.error(path + ("auth_url",), str(exc))
            return None
        if not ok:
            return None
        return ForwardAuth(
            url=service.url,
            scheme=service.scheme,
            target=service.target,
            host=service.host,
            port=service.port,
            unix_path=service.unix_path,
            response_headers=tuple(name for _, name in headers or []),
            cache_seconds=cache_seconds,
        )

    def access_list(self, path: KeyPath, table: _Table) -> AccessList:
        """``allow`` and ``deny`` of a host or a route (SPEC row 9b)."""
        lists: list[tuple[IPNetwork, ...]] = []
        for key in ("allow", "deny"):
            texts = self.get_list(path, table, key, _check_network, what="IP networks (CIDR)")
            lists.append(tuple(_network(text) for text in texts or ()))
        return AccessList(allow=lists[0], deny=lists[1])

    def check_hosts_together(self) -> None:
        """Names unique across hosts, and at most one default host.

        Runs on what every host declared, valid or not, so that one bad route
        does not hide a clash between host names.
        """
        owner: dict[str, tuple[int, int]] = {}
        default_index: int | None = None
        for host_index, names, default in self.host_facts:
            for name_index, name in names:
                first = owner.get(name)
                if first is None:
                    owner[name] = (host_index, name_index)
                    continue
                other: KeyPath = ("host", first[0], "names", first[1])
                self.error(
                    ("host", host_index, "names", name_index),
                    f"{_quote(name)} is already a name of host[{first[0]}]: "
                    f"{self.where(other)}; a name may belong to one host only",
                )
            if default:
                if default_index is None:
                    default_index = host_index
                else:
                    self.error(
                        ("host", host_index, "default"),
                        f"only one host may be the default; "
                        f"{self.where(('host', default_index, 'default'))} already is",
                    )


def _check_server_name(value: str) -> str:
    return _check_host_name(value, wildcard=True)


def _check_token(value: str) -> str:
    if not _TOKEN_RE.fullmatch(value):
        raise _Invalid(
            f"not a valid subprotocol name (an RFC 7230 token: letters, digits and "
            f"!#$%&'*+-.^_`|~), got {_quote(value)}"
        )
    return value


def _path_of(target: BackendTarget) -> str:
    return "no path" if target.path is None else f"path {_quote(target.path)}"


def _file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an input file, or None if it is readable."""
    try:
        if not path.exists():
            return f"file not found: {path}"
        if not path.is_file():
            return f"not a regular file: {path}"
        with open(path, "rb"):
            pass
    except PermissionError:
        return f"cannot read {path}: permission denied"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None
