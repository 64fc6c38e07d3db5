"""Configuration: the TOML file, validated into frozen dataclasses.

Pure: this module never imports trio or OpenSSL. Loading is "fill defaults, then
validate" (caddy's Provision/Validate): every problem in the file is collected
with its key path (``host[1].route[0].backend``) and line, and raised together
as one :class:`~gatewayd.errors.ConfigErrors`. Checking that certificate files
load and match their keys needs OpenSSL and so lives in :mod:`gatewayd.tls`.

SCHEMA-ONLY SKELETON: the dataclasses below are the interface the rest of the
package uses; ``load()`` / ``loads()`` / ``summary()`` are filled in by the
config work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_CONFIG_PATH = "/etc/gatewayd/gatewayd.toml"

TLSVersion = Literal["TLSv1.2", "TLSv1.3"]


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

    ``ws://host[:port][/path]`` (port defaults to 80) or ``unix:/abs/path.sock``
    (optionally ``unix:/abs/path.sock:/uri`` as in nginx, to give a path).
    ``path`` is None when the URL has no path (or only "/"? no: "/" is a path),
    in which case the request path is sent on unchanged (nginx proxy_pass).
    """

    url: str
    scheme: Literal["ws", "unix"]
    host: str | None = None          # ws: host name or IP (no brackets)
    port: int | None = None          # ws: port
    unix_path: Path | None = None    # unix: socket file
    path: str | None = None          # None = no path in the URL

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class RouteConfig:
    """One ``[[host.route]]``. Exactly one of ``path`` / ``path_prefix`` is set."""

    path: str | None
    path_prefix: str | None
    backend: BackendTarget
    origins: tuple[str, ...] = ()        # lowercase ASCII serializations; () = any
    subprotocols: tuple[str, ...] = ()   # server preference order; () = no filtering
    extensions: bool = True
    key_path: str = ""                   # "host[0].route[1]"

    @property
    def label(self) -> str:
        """How the route is named in logs: "/chat" (exact) or "/chat/*" (prefix)."""
        if self.path is not None:
            return self.path
        return f"{self.path_prefix}*"


@dataclass(frozen=True)
class TLSSettings:
    """The ``[tls]`` table, or a host's effective TLS settings."""

    min_version: TLSVersion = "TLSv1.2"
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"


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

    workers: int = 1
    max_connections: int = 10000
    handshake_timeout: float = 10.0
    backend_connect_timeout: float = 5.0
    idle_timeout: float = 0.0            # 0 = never
    shutdown_timeout: float = 30.0
    max_request_head: int = 16384        # bytes
    server_header: str = "gatewayd"      # "" = omit the Server header


@dataclass(frozen=True)
class LogSettings:
    """The ``[log]`` table."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    access_log: bool = True


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration."""

    path: Path                           # the file it came from (absolute)
    listeners: tuple[ListenerConfig, ...]
    hosts: tuple[HostConfig, ...]
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    log: LogSettings = field(default_factory=LogSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)

    @property
    def needs_tls(self) -> bool:
        return any(listener.tls for listener in self.listeners)
