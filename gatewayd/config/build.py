"""The builder: parsed TOML -> :class:`~gatewayd.config.schema.Config`, every error at once.

:class:`Builder` walks the parsed data table by table, as caddy's
Provision/Validate: it fills defaults, checks each value, then the rules
between keys. Every problem becomes one ``ConfigError`` with its key path and
line, and the walk goes on with the default in place of the bad value, so that
one run reports every problem.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict, cast

from gatewayd.config.htpasswd import parse_users
from gatewayd.config.locate import KeyPath, Locator, format_key_path
from gatewayd.config.schema import (
    ACME_CHALLENGES,
    AUTH_KEYS,
    AUTH_KINDS,
    BACKEND_ALTERNATIVES,
    BACKEND_KEYS,
    BALANCE_MODES,
    KNOWN_KEYS,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    NOT_SUPPORTED_MESSAGE,
    NOT_WITH_REDIRECT,
    NOT_YET_SUPPORTED,
    NOTHING,
    REDIRECT_STATUSES,
    TLS_PROFILES,
    TLS_VERSIONS,
    AccessList,
    AcmeSettings,
    Address,
    AdminSettings,
    BackendTarget,
    Balance,
    BasicAuth,
    CertificatePair,
    Config,
    ForwardAuth,
    GatewaySettings,
    HostConfig,
    IPNetwork,
    ListenerConfig,
    LogFormat,
    LogLevel,
    LogSettings,
    Redirect,
    RouteConfig,
    TLSProfile,
    TLSSettings,
    TLSVersion,
)
from gatewayd.config.values import (
    RESERVED_HEADERS,
    TOKEN_RE,
    Invalid,
    check_copyable_header,
    check_network,
    check_path,
    check_realm,
    check_server_name,
    check_token,
    describe,
    file_problem,
    parse_auth_url,
    parse_backend,
    parse_listen_address,
    parse_network,
    parse_origin,
    parse_redirect,
    quote,
    toml_literal,
)
from gatewayd.errors import ConfigError


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, so taskset and cgroups count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)



_Table = dict[str, object]


class _BackendSettings(TypedDict):
    """The RouteConfig fields that :meth:`Builder.backend_settings` checks."""

    balance: Balance
    max_fails: int
    fail_timeout: float
    health_check: str
    health_interval: float
    backend_ca: Path | None
    backend_tls_verify: bool
    max_message_size: int
    backend_max_connections: int


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

    def get_bool(self, path: KeyPath, table: _Table, key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            self.error(path + (key,), f"expected a boolean (true or false), got {describe(value)}")
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
            self.error(path + (key,), f"expected an integer, got {describe(value)}")
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
                f"expected a number of seconds (integer or float), got {describe(value)}",
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
            self.error(path + (key,), f"expected a number (integer or float), got {describe(value)}")
            return default
        if not math.isfinite(value) or value < 0:
            self.error(path + (key,), f"must be a finite number, 0 or more, got {value}")
            return default
        return float(value)

    def get_str(self, path: KeyPath, table: _Table, key: str, default: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str):
            self.error(path + (key,), f"expected a string, got {describe(value)}")
            return default
        return value

    def get_choice(
        self, path: KeyPath, table: _Table, key: str, default: str, choices: Sequence[str]
    ) -> str:
        value = self.get_str(path, table, key, default)
        if value not in choices:
            allowed = ", ".join(repr(choice) for choice in choices)
            self.error(path + (key,), f"must be one of {allowed}, got {quote(value)}")
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
            self.error(path + (key,), f"expected an array of {what}, got {describe(value)}{hint}")
            return None
        seen: dict[str, int] = {}
        result: list[tuple[int, str]] = []
        for index, item in enumerate(value):
            item_path = path + (key, index)
            if not isinstance(item, str):
                self.error(item_path, f"expected a string, got {describe(item)}")
                continue
            try:
                checked = check(item)
            except Invalid as exc:
                self.error(item_path, str(exc))
                continue
            if checked in seen:
                self.error(
                    item_path,
                    f"{quote(checked)} is listed twice "
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
            self.error(path + (key,), f"expected a file name (string), got {describe(value)}")
            return None
        if not value:
            if not empty_is_off:
                self.error(path + (key,), "must not be empty")
            return None
        resolved = Path(os.path.abspath(os.path.join(self.base, value)))
        problem = file_problem(resolved)
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
        d = GatewaySettings()
        server_header = self.get_str(path, table, "server_header", d.server_header)
        if server_header and not all(0x20 <= ord(c) <= 0x7E for c in server_header):
            self.error(
                path + ("server_header",),
                f"must be printable ASCII (no CR, LF or other control characters), "
                f"got {quote(server_header)}",
            )
            server_header = d.server_header
        elif server_header != server_header.strip(" "):
            self.error(
                path + ("server_header",),
                f"must not start or end with a space, got {quote(server_header)}",
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
            http_keepalive_timeout=self.get_duration(
                path, table, "http_keepalive_timeout", d.http_keepalive_timeout, positive=True
            ),
            max_requests_per_connection=self.get_int(
                path, table, "max_requests_per_connection", d.max_requests_per_connection,
                minimum=1,
            ),
            max_body_size=self.get_int(path, table, "max_body_size", d.max_body_size, minimum=0),
            http_timeout=self.get_duration(
                path, table, "http_timeout", d.http_timeout, positive=True
            ),
        )

    def workers(self, path: KeyPath, table: _Table, default: int) -> int:
        """``workers``: a count, or "auto" for one per CPU this process may run on."""
        value = table.get("workers", default)
        if value == "auto":
            return available_cpus()
        if isinstance(value, str):
            self.error(path + ("workers",), f'expected an integer or "auto", got {quote(value)}')
            return default
        return self.get_int(path, table, "workers", default, minimum=1, maximum=MAX_WORKERS)

    def trusted_proxies(self, path: KeyPath, table: _Table) -> tuple[IPNetwork, ...]:
        """``trusted_proxies``: CIDRs, written and normalized like ``allow`` lists."""
        items = self.get_list(path, table, "trusted_proxies", check_network, what="CIDRs")
        return tuple(parse_network(item) for item in items or ())

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
        min_version = self.get_choice(
            path, table, "min_version", defaults.min_version, TLS_VERSIONS
        )
        ciphers = self.get_str(path, table, "ciphers", defaults.ciphers)
        if not ciphers.strip() or not all(0x21 <= ord(c) <= 0x7E or c == " " for c in ciphers):
            self.error(
                path + ("ciphers",),
                f"must be a non-empty OpenSSL cipher list (printable ASCII), got {quote(ciphers)}",
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
                    address=address, tls=tls, proxy_protocol=proxy_protocol, index=index
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
        d = AcmeSettings()
        directory = self.get_str(path, table, "directory", d.directory)
        if not directory.startswith("https://") or len(directory) <= len("https://"):
            # RFC 8555 section 6.1: ACME runs over HTTPS only.
            self.error(path + ("directory",), f"must be an https:// URL, got {quote(directory)}")
            directory = d.directory
        email = self.get_str(path, table, "email", d.email)
        if email and not _plausible_email(email):
            self.error(
                path + ("email",), f"expected one e-mail address (ops@example.com), got {quote(email)}"
            )
            email = ""
        state_dir = d.state_dir
        if "state_dir" in table:
            value = table["state_dir"]
            if not isinstance(value, str) or not value:
                self.error(
                    path + ("state_dir",),
                    f"expected a folder name (non-empty string), got {describe(value)}",
                )
            else:
                state_dir = Path(os.path.abspath(os.path.join(self.base, value)))
        ca_bundle = self.get_file(path, table, "ca_bundle", empty_is_off=True)
        renew_before = d.renew_before
        value = table.get("renew_before", d.renew_before)
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            self.error(
                path + ("renew_before",),
                f"expected a number of days greater than 0, got {describe(value)}",
            )
        else:
            renew_before = float(value)
        return AcmeSettings(
            directory=directory,
            email=email,
            state_dir=state_dir,
            ca_bundle=ca_bundle,
            renew_before=renew_before,
            challenges=self.acme_challenges(path, table, d.challenges),
        )

    def acme_challenges(
        self, path: KeyPath, table: _Table, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        """``challenges``: a non-empty list of the types gatewayd answers, no repeats."""
        if "challenges" not in table:
            return default
        items = table["challenges"]
        if not isinstance(items, list) or not items:
            self.error(
                path + ("challenges",),
                f"expected a non-empty list of challenge types, got {describe(items)}",
            )
            return default
        seen: list[str] = []
        for index, item in enumerate(items):
            if item not in ACME_CHALLENGES:
                self.error(
                    path + ("challenges", index),
                    f"unknown challenge type {quote(item) if isinstance(item, str) else describe(item)} "
                    f"(gatewayd answers "
                    f"{' and '.join(quote(c) for c in ACME_CHALLENGES)})",
                )
            elif item in seen:
                self.error(path + ("challenges", index), f"{quote(item)} is listed twice")
            else:
                seen.append(item)
        return tuple(seen) or default

    def host_acme(self, path: KeyPath, table: _Table, names: list[tuple[int, str]]) -> bool:
        """``acme = true``: no certificate keys beside it, and names a CA can validate here."""
        acme = self.get_bool(path, table, "acme", False)
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

        indexed_names = self.get_indexed_list(
            path, table, "names", check_server_name, what="host names"
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
        profile = cast(
            TLSProfile, self.get_choice(path, table, "profile", "intermediate", TLS_PROFILES)
        )
        if profile == "modern":
            if table.get("min_version", "TLSv1.3") != "TLSv1.3":
                self.error(
                    path + ("min_version",),
                    f"profile = \"modern\" is TLS 1.3 only; remove min_version "
                    f"or use profile = \"intermediate\" (got {quote(settings.min_version)})",
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
        if not TOKEN_RE.fullmatch(name):
            self.error(key, f"not a valid header name (an RFC 9110 token), got {quote(name)}")
            return ""
        lowered = name.lower()
        if lowered in RESERVED_HEADERS or lowered.startswith("sec-websocket-"):
            self.error(
                key,
                f"{quote(name)} is a header the gateway sets itself; "
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

    def route(  # noqa: C901 (arch-config removes it with the key declarations, issue #10 part 4)
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
        if "redirect_status" in table:
            self.error(path + ("redirect_status",), "only used together with redirect")
            ok = False

        origins = self.get_list(path, table, "origins", parse_origin, what="origins")
        subprotocols = self.get_list(
            path, table, "subprotocols", check_token, what="subprotocol names"
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

        http, http_ok = self.route_http(path, table, backends)

        if not ok or not auth_ok or not http_ok or not backends:
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
            http=http[0],
            max_body_size=http[1],
            **settings,
        )

    def route_http(
        self, path: KeyPath, table: _Table, backends: list[BackendTarget]
    ) -> tuple[tuple[bool, int | None], bool]:
        """``http`` and ``max_body_size`` (SPEC section 7). Returns them and whether both are valid."""
        ok = True
        http = self.get_bool(path, table, "http", False)
        if http and backends and backends[0].bridge:
            self.error(
                path + ("http",),
                "plain HTTP is proxied to ws://, wss:// and unix: backends only; tcp:// and "
                "unix+tcp: bridge backends carry WebSocket messages, not HTTP requests",
            )
            ok = False
        max_body_size: int | None = None
        if "max_body_size" in table:
            max_body_size = self.get_int(path, table, "max_body_size", 0, minimum=0)
            if not http:
                self.error(
                    path + ("max_body_size",),
                    "only used with http = true (a WebSocket handshake has no body)",
                )
                ok = False
        return (http, max_body_size), ok

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
                    f"\"/healthz\" (a WebSocket handshake probe), got {quote(health_check)}"
                )
            else:
                try:
                    check_path(health_check)
                except Invalid as exc:
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
                path + ("redirect_status",), f"expected an integer, got {describe(status)}"
            )
            status = 308
        elif status not in REDIRECT_STATUSES:
            allowed = ", ".join(str(code) for code in REDIRECT_STATUSES)
            self.error(path + ("redirect_status",), f"must be one of {allowed}, got {status}")
            status = 308
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
        realm = self.get_str(path, table, "realm", "gatewayd")
        realm_ok = True
        try:
            check_realm(realm)
        except Invalid as exc:
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
        users, problems = parse_users(raw, str(users_file))
        for problem in problems:
            self.error(path + ("auth_users",), problem)
        if problems:
            return None
        return BasicAuth(users_file=users_file, users=tuple(users), realm=realm)

    def forward_auth(self, path: KeyPath, table: _Table) -> ForwardAuth | None:
        ok = True
        headers = self.get_indexed_list(
            path, table, "auth_response_headers", check_copyable_header, what="header names"
        )
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
        lists: list[tuple[IPNetwork, ...]] = []
        for key in ("allow", "deny"):
            texts = self.get_list(path, table, key, check_network, what="IP networks (CIDR)")
            lists.append(tuple(parse_network(text) for text in texts or ()))
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


def _plausible_email(email: str) -> bool:
    local, at, domain = email.partition("@")
    return (
        bool(local and at and domain)
        and "@" not in domain
        and not any(c.isspace() or ord(c) < 0x20 or c in ",<>;" for c in email)
    )


def _path_of(target: BackendTarget) -> str:
    return "no path" if target.path is None else f"path {quote(target.path)}"


