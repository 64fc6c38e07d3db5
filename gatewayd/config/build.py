"""The builder: parsed TOML -> :class:`~gatewayd.config.schema.Config`, every error at once.

:class:`Builder` walks the parsed data table by table, as caddy's
Provision/Validate: it fills defaults, checks each value, then the rules
between keys. Every problem becomes one ``ConfigError`` with its key path and
line, and the walk goes on with the default in place of the bad value, so that
one run reports every problem.

The builder holds no list of keys of its own. Which keys a table accepts, each
key's default, and how a value is checked all come from the declarations in
:mod:`~gatewayd.config.schema`: :meth:`Builder.read` reads one key by its
declared kind, :meth:`Builder.read_all` every such key of a table. What stays
here is what a declaration cannot say: the rules between keys (a
``backend_ca`` needs a ``wss://`` backend, ``profile = "modern"`` excludes
``min_version = "TLSv1.2"``) and the keys that need a step of their own (the
route's match and backends, ``auth``), each named in its declaration.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from gatewayd.config.htpasswd import parse_users
from gatewayd.config.locate import Locator, format_key_path
from gatewayd.config.schema import (
    AUTH_KEYS,
    AUTH_KINDS,
    BACKEND_ALTERNATIVES,
    BACKEND_KEYS,
    NOT_SUPPORTED_MESSAGE,
    NOT_WITH_REDIRECT,
    NOT_YET_SUPPORTED,
    NOTHING,
    PLACES,
    REQUIRED,
    AccessList,
    AcmeSettings,
    Address,
    AdminSettings,
    BackendTarget,
    BasicAuth,
    CertificatePair,
    Config,
    ForwardAuth,
    GatewaySettings,
    HostConfig,
    Key,
    ListenerConfig,
    LogSettings,
    Redirect,
    RouteConfig,
    TLSProfile,
    TLSSettings,
    declarations,
)
from gatewayd.config.urls import parse_auth_url, parse_backend, parse_listen_address
from gatewayd.config.values import (
    Invalid,
    KeyPath,
    StrList,
    Value,
    check_path,
    describe,
    parse_redirect,
    quote,
    toml_literal,
)
from gatewayd.errors import ConfigError

_Table = dict[str, object]

_LISTENER = PLACES["listener"].keys
_HOST = PLACES["host"].keys
_ROUTE = PLACES["route"].keys


class Builder:
    """Fills defaults and validates, one table at a time, collecting errors."""

    def __init__(self, file: str, path: Path, locator: Locator) -> None:
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
        known = PLACES[place].keys
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
                    message += f" (only {key} = {toml_literal(accepted)} is accepted)"
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
            self.error(path + (key,), f"expected a table ([{key}]), got {describe(value)}")
            return {}
        return cast(_Table, value)

    def table_array(self, path: KeyPath, parent: _Table, key: str, header: str) -> list[_Table]:
        """The array of tables ``key`` of ``parent``; bad elements are reported and skipped."""
        value = parent.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(
                path + (key,), f"expected an array of tables ([[{header}]]), got {describe(value)}"
            )
            return []
        tables: list[_Table] = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                tables.append(cast(_Table, item))
            else:
                self.error(
                    path + (key, index), f"expected a table ([[{header}]]), got {describe(item)}"
                )
                tables.append({})
        return tables

    # -- keys, by their declarations --------------------------------------------

    def read(self, path: KeyPath, table: _Table, key: Key, default: object = REQUIRED) -> Any:
        """The value of ``key`` in the table at ``path``, checked by its declared kind.

        Args:
            default: the value when the key is absent or bad; the declared
                default unless given (a host's ``ciphers`` default to ``[tls]``'s).
        """
        kind = key.kind
        assert isinstance(kind, Value), f"{key.name} is read by Builder.{getattr(kind, 'builder', '?')}"
        fallback = key.default if default is REQUIRED else default
        if key.name not in table:
            return fallback
        return kind.read(self, path + (key.name,), table[key.name], fallback)

    def read_all(
        self, path: KeyPath, table: _Table, keys: Iterable[Key], *, defaults: object = None
    ) -> dict[str, Any]:
        """:meth:`read` for every key of ``keys`` that has a value kind, by field name.

        Args:
            defaults: an object whose attributes give the defaults (the
                ``[tls]`` settings for a host), instead of the declared ones.
        """
        return {
            key.field: self.read(
                path, table, key, REQUIRED if defaults is None else getattr(defaults, key.field)
            )
            for key in keys
            if isinstance(key.kind, Value)
        }

    def read_indexed(self, path: KeyPath, table: _Table, key: Key) -> list[tuple[int, str]] | None:
        """A :class:`~gatewayd.config.values.StrList` key's items with their indices.

        Returns:
            None when the key is absent or not an array (reported).
        """
        kind = key.kind
        assert isinstance(kind, StrList), f"{key.name} is not a list of strings"
        if key.name not in table:
            return None
        return kind.read_indexed(self, path + (key.name,), table[key.name])

    # -- the file, table by table --------------------------------------------

    def build(self, data: _Table) -> Config | None:
        """Validate the whole document; returns None when a required part failed."""
        self.check_keys((), data, "")
        gateway = self.gateway(self.table((), data, "gateway"))
        log = self.log(self.table((), data, "log"))
        admin = self.admin(data)
        tls = self.tls_settings(("tls",), self.table((), data, "tls"), TLSSettings())
        acme = self.acme(data)

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
        self.check_acme(acme, hosts, listeners)

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
            acme=acme,
            warnings=tuple(sorted(self.warnings, key=lambda w: w.line or 0)),
        )

    def gateway(self, table: _Table) -> GatewaySettings:
        path: KeyPath = ("gateway",)
        self.check_keys(path, table, "gateway")
        return GatewaySettings(**self.read_all(path, table, PLACES["gateway"].keys.values()))

    def log(self, table: _Table) -> LogSettings:
        path: KeyPath = ("log",)
        self.check_keys(path, table, "log")
        return LogSettings(**self.read_all(path, table, PLACES["log"].keys.values()))

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
            self.error(path + ("listen",), f"expected a string 'host:port', got {describe(text)}")
            return AdminSettings()
        try:
            return AdminSettings(listen=parse_listen_address(text))
        except Invalid as exc:
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
                address = parse_listen_address(text)
            except Invalid:
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
        return TLSSettings(**self.read_all(path, table, PLACES["tls"].keys.values(), defaults=defaults))

    def listeners(self, tables: list[_Table]) -> list[ListenerConfig]:
        listeners: list[ListenerConfig] = []
        seen: dict[Address, int] = {}
        for index, table in enumerate(tables):
            path: KeyPath = ("listener", index)
            self.check_keys(path, table, "listener")
            tls = self.read(path, table, _LISTENER["tls"])
            proxy_protocol = self.read(path, table, _LISTENER["proxy_protocol"])
            redirect_https = self.read(path, table, _LISTENER["redirect_https"])
            if redirect_https and tls:
                self.error(
                    path + ("redirect_https",),
                    "only used on a plain listener (tls = false): it sends HTTP clients to "
                    "the https:// listener",
                )
                redirect_https = False
            if "address" not in table:
                self.error(path + ("address",), "required key is missing")
                continue
            text = table["address"]
            if not isinstance(text, str):
                self.error(
                    path + ("address",), f"expected a string 'host:port', got {describe(text)}"
                )
                continue
            try:
                address = parse_listen_address(text)
            except Invalid as exc:
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
                    redirect_https=redirect_https,
                    index=index,
                )
            )
        return listeners

    def acme(self, data: _Table) -> AcmeSettings | None:
        """The ``[acme]`` table, or None when the file has none (no automatic certificates)."""
        if "acme" not in data:
            return None
        path: KeyPath = ("acme",)
        table = self.table((), data, "acme")
        self.check_keys(path, table, "acme")
        values = self.read_all(path, table, PLACES["acme"].keys.values())
        if table.get("challenges") == []:
            self.error(path + ("challenges",), "must list at least one challenge type")
        if not values["challenges"]:
            values["challenges"] = AcmeSettings().challenges
        return AcmeSettings(**values)

    def host_acme(self, path: KeyPath, table: _Table, names: list[tuple[int, str]]) -> bool:
        """``acme = true``: no certificate keys beside it, and names a CA can validate here."""
        acme: bool = self.read(path, table, _HOST["acme"])
        if not acme:
            return False
        for key in ("certificate", "private_key", "certificates"):
            if key in table:
                self.error(
                    path + (key,),
                    "acme = true gets this host's certificate from [acme]: "
                    "remove certificate, private_key and certificates",
                )
        for index, name in names:
            if name.startswith("*."):
                self.error(
                    path + ("names", index),
                    f"{quote(name)}: a wildcard needs the DNS-01 challenge, which gatewayd "
                    "does not answer (TLS-ALPN-01 and HTTP-01 validate one name each); "
                    "give this host certificate and private_key instead",
                )
            elif _is_ip(name):
                self.error(
                    path + ("names", index),
                    f"{quote(name)}: acme = true needs DNS names, not IP addresses",
                )
        return True

    def check_acme(
        self, acme: AcmeSettings | None, hosts: list[HostConfig], listeners: list[ListenerConfig]
    ) -> None:
        """``acme = true`` needs ``[acme]``, a usable state_dir and a listener a challenge works on."""
        acme_hosts = [host for host in hosts if host.acme]
        if not acme_hosts:
            return
        if acme is None:
            for host in acme_hosts:
                self.error(
                    ("host", host.index, "acme"),
                    "acme = true needs an [acme] table (directory, state_dir, ...)",
                )
            return
        problem = state_dir_problem(acme.state_dir)
        if problem is not None:
            self.error(("acme", "state_dir"), problem)
        if not usable_challenges(acme.challenges, listeners):
            self.error(
                ("acme", "challenges"),
                "no listener can answer these challenges: tls-alpn-01 needs a tls = true "
                "listener, http-01 a tls = false one",
            )

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

        indexed_names = self.read_indexed(path, table, _HOST["names"])
        names = None if indexed_names is None else tuple(name for _, name in indexed_names)
        if "names" not in table:
            self.error(path + ("names",), "required key is missing")
            ok = False
        elif names is None:
            ok = False
        elif table["names"] == []:
            self.error(path + ("names",), "must list at least one host name")
            ok = False
        default = self.read(path, table, _HOST["default"])
        self.host_facts.append((index, indexed_names or [], default))

        certificate = self.read(path, table, _HOST["certificate"])
        private_key = self.read(path, table, _HOST["private_key"])
        acme = self.host_acme(path, table, indexed_names or [])
        pair = ("certificate", "private_key")
        for key, other in (pair, pair[::-1]):
            if key in table or acme:
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
        ocsp_response = self.read(path, table, _HOST["ocsp_response"])
        if ocsp_response is not None and "certificate" not in table:
            self.error(path + ("ocsp_response",), "needs certificate: OCSP responses are stapled to TLS handshakes")
        client_ca = self.read(path, table, _HOST["client_ca"])
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
                        f"{quote(client_subject_header)} is this host's client_subject_header "
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
            acme=acme,
        )

    def host_tls_settings(self, path: KeyPath, table: _Table, defaults: TLSSettings) -> TLSSettings:
        """The host's ``min_version``/``ciphers`` over ``[tls]``, and its ``profile``.

        ``profile = "modern"`` is TLS 1.3 only, so it sets ``min_version`` to
        TLSv1.3; writing ``min_version = "TLSv1.2"`` beside it is an error.
        """
        settings = self.tls_settings(path, table, defaults)
        profile: TLSProfile = self.read(path, table, _HOST["profile"])
        if profile == "modern":
            if table.get("min_version", "TLSv1.3") != "TLSv1.3":
                self.error(
                    path + ("min_version",),
                    f"profile = \"modern\" is TLS 1.3 only; remove min_version "
                    f"or use profile = \"intermediate\" (got {quote(settings.min_version)})",
                )
            return replace(settings, min_version="TLSv1.3", profile=profile)
        return replace(settings, profile=profile)

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
            for key in PLACES["certificates"].keys.values():
                if key.name not in item:
                    self.error(item_path + (key.name,), "required key is missing")
                    files[key.name] = None
                else:
                    files[key.name] = self.read(item_path, item, key)
            cert, key_file = files["certificate"], files["private_key"]
            if cert is not None and key_file is not None:
                pairs.append(CertificatePair(cert, key_file, format_key_path(item_path)))
        return tuple(pairs)

    def client_subject_header(self, path: KeyPath, table: _Table, has_client_ca: bool) -> str:
        """A header name for the verified client subject; needs ``client_ca``."""
        name: str = self.read(path, table, _HOST["client_subject_header"])
        if name and not has_client_ca:
            self.error(
                path + ("client_subject_header",),
                "needs client_ca: only a certificate verified against client_ca has a "
                "subject to pass on",
            )
            return ""
        return name

    def route(
        self, path: KeyPath, table: _Table, exact: dict[str, int], prefixes: dict[str, int]
    ) -> RouteConfig | None:
        self.check_keys(path, table, "route")
        ok, match_path, match_prefix = self.route_match(path, table, exact, prefixes)
        if "static" in table:
            return self.static_route(path, table, ok, match_path, match_prefix)
        for name in ("index", "cache_control"):
            if name in table:
                self.error(path + (name,), "only used together with static")
                ok = False
        backends = self.route_backends(path, table)
        if "redirect" in table:
            return self.redirect_route(path, table, ok, match_path, match_prefix)
        if "redirect_status" in table:
            self.error(path + ("redirect_status",), "only used together with redirect")
            ok = False

        origins = self.read(path, table, _ROUTE["origins"])
        subprotocols = self.read(path, table, _ROUTE["subprotocols"])
        extensions = self.read(path, table, _ROUTE["extensions"])
        auth, auth_ok = self.route_auth(path, table)
        auth_forward = self.read(path, table, _ROUTE["auth_forward"])
        access = self.access_list(path, table)
        settings = self.backend_settings(path, table, backends)
        if backends and backends[0].bridge:
            ok = self.bridge_rules(path, auth, auth_forward) and ok
        http, max_body_size, http_ok = self.route_http(path, table, backends)

        if not ok or not auth_ok or not http_ok or not backends:
            return None
        return RouteConfig(
            path=match_path,
            path_prefix=match_prefix,
            backend=backends[0],
            origins=origins,
            subprotocols=subprotocols,
            extensions=extensions,
            key_path=format_key_path(path),
            auth=auth,
            auth_forward=auth_forward,
            access=access,
            backends=tuple(backends),
            http=http,
            max_body_size=max_body_size,
            **settings,
        )

    def route_http(
        self, path: KeyPath, table: _Table, backends: list[BackendTarget]
    ) -> tuple[bool, int | None, bool]:
        """``http`` and ``max_body_size`` (SPEC section 7), and whether both are valid."""
        ok = True
        http: bool = self.read(path, table, _ROUTE["http"])
        if http and backends and backends[0].bridge:
            self.error(
                path + ("http",),
                "plain HTTP is proxied to ws://, wss:// and unix: backends only; tcp:// and "
                "unix+tcp: bridge backends carry WebSocket messages, not HTTP requests",
            )
            ok = False
        max_body_size: int | None = self.read(path, table, _ROUTE["max_body_size"])
        if "max_body_size" in table and not http:
            self.error(
                path + ("max_body_size",),
                "only used with http = true (a WebSocket handshake has no body)",
            )
            ok = False
        return http, max_body_size, ok

    def route_match(
        self, path: KeyPath, table: _Table, exact: dict[str, int], prefixes: dict[str, int]
    ) -> tuple[bool, str | None, str | None]:
        """``path`` or ``path_prefix``: exactly one, valid, not used twice in the host.

        Returns:
            (whether both keys were valid, the exact path, the prefix).
        """
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
                self.error(path + (key,), f"expected a string, got {describe(value)}")
                ok = False
                continue
            try:
                check_path(value)
            except Invalid as exc:
                self.error(path + (key,), str(exc))
                ok = False
                continue
            route_index = cast(int, path[-1])
            if value in seen:
                other = path[:-1] + (seen[value], key)
                self.error(
                    path + (key,),
                    f"duplicate {kind} {quote(value)} in this host: "
                    f"already used by {self.where(other)}",
                )
                ok = False
                continue
            seen[value] = route_index
            if key == "path":
                match_path = value
            else:
                match_prefix = value
        return ok, match_path, match_prefix

    def redirect_route(
        self,
        path: KeyPath,
        table: _Table,
        ok: bool,
        match_path: str | None,
        match_prefix: str | None,
    ) -> RouteConfig | None:
        """A route with ``redirect``: no backend, and none of the keys it would never reach."""
        redirect = self.redirect(path, table)
        for key in ("backend", "backends"):
            if key in table:
                self.error(
                    path + ("redirect",),
                    f"set either {key} or redirect, not both (a redirect route has no "
                    "backend)",
                )
                return None
        for key in NOT_WITH_REDIRECT:
            if key in table:
                self.error(
                    path + (key,),
                    "not used on a redirect route: the redirect is answered before it "
                    "would be checked",
                )
                ok = False
        for key in BACKEND_KEYS:
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

    def static_route(
        self,
        path: KeyPath,
        table: _Table,
        ok: bool,
        match_path: str | None,
        match_prefix: str | None,
    ) -> RouteConfig | None:
        """A ``static = "DIR"`` route (SPEC 7): the files under DIR instead of a backend.

        ``allow``/``deny`` and ``auth`` apply as on any route (the request
        loop runs rows 9b and 14a for every kind of request); nothing about a
        backend or a WebSocket does.
        """
        for name in ("backend", "backends", "redirect"):
            if name in table:
                self.error(
                    path + ("static",),
                    f"set either {name} or static, not both (a static route serves files "
                    "and has no backend)",
                )
                return None
        for name in (
            *BACKEND_KEYS,
            "redirect_status",
            "origins",
            "subprotocols",
            "extensions",
            "http",
            "max_body_size",
            "auth_forward",
            "auth_response_headers",
        ):
            if name in table:
                self.error(
                    path + (name,),
                    "not used on a static route: it serves files, with no backend to pass "
                    "anything on to and no WebSocket",
                )
                ok = False
        folder = self.static_folder(path, table)
        auth, auth_ok = self.route_auth(path, table)
        index = self.read(path, table, _ROUTE["index"])
        cache_control = self.read(path, table, _ROUTE["cache_control"])
        access = self.access_list(path, table)
        if not ok or not auth_ok or folder is None:
            return None
        return RouteConfig(
            path=match_path,
            path_prefix=match_prefix,
            backend=None,
            key_path=format_key_path(path),
            auth=auth,
            access=access,
            static=folder,
            index=index,
            cache_control=cache_control,
        )

    def static_folder(self, path: KeyPath, table: _Table) -> Path | None:
        """``static``: a folder resolved against the config file's folder, readable now."""
        value = table["static"]
        if not isinstance(value, str) or not value:
            self.error(
                path + ("static",), f"expected a folder name (string), got {describe(value)}"
            )
            return None
        folder = Path(os.path.abspath(os.path.join(self.base, value)))
        problem = None
        if not folder.exists():
            problem = f"folder not found: {folder}"
        elif not folder.is_dir():
            problem = f"not a folder: {folder}"
        elif not os.access(folder, os.R_OK | os.X_OK):
            problem = f"folder not readable: {folder}"
        if problem is not None:
            self.error(path + ("static",), problem)
            return None
        return folder

    def bridge_rules(
        self, path: KeyPath, auth: BasicAuth | ForwardAuth | None, auth_forward: bool
    ) -> bool:
        """A bridge route's auth keys; False when one cannot apply.

        A bridge sends no HTTP request on to its tcp:// backend, so nothing
        from the client's request or the auth answer can reach it.
        """
        ok = True
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
        return ok

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
                    path + ("backend",), f"expected a backend URL string, got {describe(value)}"
                )
                return []
            try:
                return [parse_backend(value, self.base)]
            except Invalid as exc:
                self.error(path + ("backend",), str(exc))
                return []
        if "backends" in table:
            return self.backend_list(path + ("backends",), table["backends"])
        if not any(key in table for key in BACKEND_ALTERNATIVES):
            self.error(path + ("backend",), "required key is missing")
        return []

    def backend_list(self, path: KeyPath, value: object) -> list[BackendTarget]:
        """The ``backends`` array: every URL valid, no duplicates, one kind, one path."""
        if not isinstance(value, list):
            hint = f' (write backends = ["{value}"])' if isinstance(value, str) else ""
            self.error(path, f"expected an array of backend URLs, got {describe(value)}{hint}")
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
                self.error(item_path, f"expected a backend URL string, got {describe(item)}")
                continue
            try:
                target = parse_backend(item, self.base)
            except Invalid as exc:
                self.error(item_path, str(exc))
                continue
            if target.endpoint in seen:
                self.error(
                    item_path,
                    f"{quote(item)} is listed twice "
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
                    f"backends (ws://, wss://, unix:): {quote(item)} here, "
                    f"{quote(first[1].url)} at {self.where(path + (first[0],))}",
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
    ) -> dict[str, Any]:
        """Balancing, health and backend TLS keys of a route, checked against its backends.

        A key that has no effect on this route's kind of backend is an error
        when set to anything but its default (``backend_ca`` without a
        ``wss://`` backend, ``max_message_size`` without a bridge), so that a
        setting is never silently ignored.

        Returns:
            The RouteConfig fields of the ``"backend"`` key group, by name.
        """
        kinds = {"bridge" if b.bridge else "passthrough" for b in backends}
        has_wss = any(b.tls for b in backends)
        urls = ", ".join(b.url for b in backends if b.tls)
        # Read in this order, each rule right after the keys it needs, so that
        # problems on one line are reported in the order they always were.
        balance = self.read(path, table, _ROUTE["balance"])
        max_fails = self.read(path, table, _ROUTE["max_fails"])
        fail_timeout = self.read(path, table, _ROUTE["fail_timeout"])

        health_check = self.read(path, table, _ROUTE["health_check"])
        if health_check.startswith("/") and "bridge" in kinds:
            self.error(
                path + ("health_check",),
                "a WebSocket handshake probe needs WebSocket backends; check tcp:// "
                "and unix+tcp: backends with health_check = \"tcp\"",
            )
            health_check = _ROUTE["health_check"].default
        health_interval = self.read(path, table, _ROUTE["health_interval"])

        backend_tls_verify = self.read(path, table, _ROUTE["backend_tls_verify"])
        backend_ca = self.read(path, table, _ROUTE["backend_ca"])
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

        max_message_size = self.read(path, table, _ROUTE["max_message_size"])
        if max_message_size != _ROUTE["max_message_size"].default and kinds == {"passthrough"}:
            self.error(
                path + ("max_message_size",),
                "only applies to tcp:// and unix+tcp: bridge backends (passthrough "
                "backends see the frames themselves)",
            )
        backend_max_connections = self.read(path, table, _ROUTE["backend_max_connections"])
        return {
            "balance": balance,
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
        status = self.read(path, table, _ROUTE["redirect_status"])
        if not isinstance(value, str):
            self.error(
                path + ("redirect",), f"expected an absolute URL string, got {describe(value)}"
            )
            return None
        try:
            origin, redirect_path, query = parse_redirect(value)
        except Invalid as exc:
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
                    f'expected a string ("basic" or "request"), got {describe(value)}',
                )
                return None, False
            if value not in AUTH_KINDS:
                self.error(path + ("auth",), f"must be one of 'basic', 'request', got {quote(value)}")
                return None, False
            kind = value
        for key, needs in AUTH_KEYS:
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
        errors_before = len(self.errors)
        realm = self.read(path, table, _ROUTE["realm"])
        # A realm that is not a string falls back to the default and the users
        # file is still checked; a bad realm string stops before the file.
        realm_ok = len(self.errors) == errors_before or not isinstance(table.get("realm"), str)
        if "auth_users" not in table:
            self.error(
                path + ("auth_users",),
                'required with auth = "basic": an htpasswd-style file of bcrypt hashes '
                "(htpasswd -B)",
            )
            return None
        errors_before = len(self.errors)
        users_file = self.read(path, table, _ROUTE["auth_users"])
        if users_file is None or len(self.errors) > errors_before or not realm_ok:
            return None
        try:
            raw = users_file.read_bytes()
        except OSError as exc:
            self.error(path + ("auth_users",), f"cannot read {users_file}: {exc.strerror or exc}")
            return None
        users, problems = parse_users(raw, str(users_file))
        for problem in problems:
            self.error(path + ("auth_users",), problem)
        if problems:
            return None
        return BasicAuth(users_file=users_file, users=tuple(users), realm=realm)

    def forward_auth(self, path: KeyPath, table: _Table) -> ForwardAuth | None:
        ok = True
        headers = self.read_indexed(path, table, _ROUTE["auth_response_headers"])
        seen: dict[str, int] = {}
        for index, name in headers or []:
            first = seen.setdefault(name.lower(), index)
            if first != index:
                self.error(
                    path + ("auth_response_headers", index),
                    f"{quote(name)} is listed twice (header names ignore case; also "
                    f"{self.where(path + ('auth_response_headers', first))})",
                )
                ok = False
        cache_seconds = self.read(path, table, _ROUTE["auth_cache_seconds"])
        if "auth_url" not in table:
            self.error(
                path + ("auth_url",),
                'required with auth = "request": the URL of the authentication service, '
                "as in 'http://127.0.0.1:9100/check'",
            )
            return None
        value = table["auth_url"]
        if not isinstance(value, str):
            self.error(path + ("auth_url",), f"expected a URL string, got {describe(value)}")
            return None
        try:
            service = parse_auth_url(value, self.base)
        except Invalid as exc:
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
        return AccessList(**self.read_all(path, table, declarations(AccessList)))

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
                    f"{quote(name)} is already a name of host[{first[0]}]: "
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


def usable_challenges(
    challenges: Sequence[str], listeners: Sequence[ListenerConfig]
) -> tuple[str, ...]:
    """The allowed challenge types some listener can answer (tls-alpn-01: TLS; http-01: plain)."""
    return tuple(
        kind
        for kind in challenges
        if (kind == "tls-alpn-01" and any(listener.tls for listener in listeners))
        or (kind == "http-01" and any(not listener.tls for listener in listeners))
    )


def state_dir_problem(folder: Path) -> str | None:
    """Why ``[acme] state_dir`` cannot be used, or None (it may not exist yet).

    It is created at start (0700) when missing, so its nearest existing
    parent must be a folder this user can write to.
    """
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"state_dir {folder}: {probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == folder:
            return f"state_dir {folder} is not writable by this user"
        return f"state_dir {folder} does not exist and {probe} is not writable by this user"
    return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _path_of(target: BackendTarget) -> str:
    return "no path" if target.path is None else f"path {quote(target.path)}"
