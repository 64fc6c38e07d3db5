"""The one-screen summary ``gatewayd check`` prints for a valid configuration.

The lines that list plain settings (``gateway``, ``timeouts``, ``log``) show
the keys whose declaration names that line (``summary="timeouts"``), in
declaration order, each as its kind shows a value; the rest is written out
here, as it describes what keys combine into (routes, backends, access).
"""

from __future__ import annotations

from collections.abc import Sequence

from gatewayd.config.schema import (
    BRIDGE_DEFAULT_SUBPROTOCOL,
    PLACES,
    AccessList,
    AcmeSettings,
    BackendTarget,
    BasicAuth,
    Config,
    ForwardAuth,
    HostConfig,
    RouteConfig,
)
from gatewayd.config.values import toml_string

# The timeouts line names each timeout without the suffix the line says.
_LABEL_SUFFIX = {"timeouts": "_timeout"}


def _listed(settings: object, place: str, line: str) -> str:
    """The keys of ``place`` declared with ``summary=line``, with their values."""
    suffix = _LABEL_SUFFIX.get(line, "")
    parts = []
    for key in PLACES[place].keys.values():
        if key.summary != line:
            continue
        label = key.name.removesuffix(suffix) if suffix else key.name
        parts.append(f"{label} {key.kind.show(getattr(settings, key.field))}")
    return ", ".join(parts)


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
        "gateway   " + _listed(gateway, "gateway", "gateway"),
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
        "timeouts  " + _listed(gateway, "gateway", "timeouts"),
        "http      " + _listed(gateway, "gateway", "http"),
        "log       " + _listed(config.log, "log", "log"),
        "acme      "
        + (
            f"{config.acme.directory}, state_dir {config.acme.state_dir}, "
            f"challenges {', '.join(config.acme.challenges)}, "
            f"renew_before {config.acme.renew_before:g} days"
            + (f", ca_bundle {config.acme.ca_bundle}" if config.acme.ca_bundle else "")
            if config.acme is not None
            else "off (no [acme] table)"
        ),
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
    route_rows = [_route_row(route) for host in config.hosts for route in host.routes]
    aligned_routes = iter(_align(route_rows, indent="      "))
    # Details go under the backend column: "      " + label + "  " + kind + "  ->  ".
    detail_indent = " " * (
        6
        + max((len(row[0]) for row in route_rows), default=0)
        + 2
        + max((len(row[1]) for row in route_rows), default=0)
        + 6
    )
    for host in config.hosts:
        lines.extend(_host_lines(host, tls=config.needs_tls, acme=config.acme))
        for route in host.routes:
            lines.append(next(aligned_routes))
            lines.extend(detail_indent + detail for detail in _route_details(route))
            rules = _route_access_label(route)
            if rules:
                lines.append(f"        access: {rules}")
    return "\n".join(lines)


def _route_row(route: RouteConfig) -> list[str]:
    """A route's row in the aligned routes table."""
    if route.static is not None:
        cache = f"cache_control: {route.cache_control}" if route.cache_control else ""
        return [
            route.label, route_kind(route), "->", f"{route.static}", f"index: {route.index}", cache, ""
        ]
    if route.backend is None:
        redirect = route.redirect
        assert redirect is not None, "a route without a backend is a redirect"
        return [
            route.label, route_kind(route), "->", f"redirect {redirect.status} {redirect.url}", "", "", ""
        ]
    if len(route.backends) > 1:
        target = f"{len(route.backends)} backends, {route.balance}"
    else:
        target = _backend_label(route.backend)
    return [
        route.label,
        route_kind(route),
        "->",
        target,
        "origins: " + (", ".join(route.origins) if route.origins else "any"),
        "subprotocols: " + _subprotocols_label(route),
        "extensions: " + _extensions_label(route),
    ]


def route_kind(route: RouteConfig) -> str:
    """What a route serves, the summary's kind column (SPEC section 7).

    ``websocket`` (passthrough), ``websocket+http`` (``http = true``: plain
    requests proxied too), ``bridge`` (``tcp://``), ``redirect``, ``static``
    (files from a folder).
    """
    if route.static is not None:
        return "static"
    if route.redirect is not None:
        return "redirect"
    if route.bridge:
        return "bridge"
    return "websocket+http" if route.http else "websocket"


def _host_lines(host: HostConfig, *, tls: bool, acme: AcmeSettings | None = None) -> list[str]:
    """A host's lines above its routes: names, certificates, TLS, mTLS, access."""
    default = "  (default)" if host.default else ""
    lines = [f"  {host.key_path}  {', '.join(host.names)}{default}"]
    if host.acme and acme is not None:
        lines.append(f"    certificate  ACME ({acme.state_dir / 'certificates' / host.names[0]}.pem)")
    if host.certificate is not None:
        lines.append(f"    certificate  {host.certificate}")
    if host.private_key is not None:
        lines.append(f"    private_key  {host.private_key}")
    for pair in host.certificates:
        lines.append(f"    certificate  {pair.certificate} (key {pair.private_key})")
    if tls:
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
    return lines


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
            f"auth basic (realm {toml_string(auth.realm)}, {count} user{'s' if count != 1 else ''} "
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
    if route.http and route.max_body_size is not None:
        size = f"{route.max_body_size} bytes" if route.max_body_size else "unlimited"
        details.append(f"http: max_body_size {size}")
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


