"""Routing: SNI / Host / path -> virtual host, route and backend target. Pure.

Rules (SPEC section 2):

* Host names compare case-insensitively; a trailing dot in SNI or Host is
  ignored, and so is a port in Host.
* ``*.example.org`` matches exactly one label in front of ``example.org``
  (``a.example.org``, not ``example.org`` nor ``a.b.example.org``), as for
  certificates (RFC 6125 section 6.4.3). An exact name beats a wildcard.
* A host with ``default = true`` serves SNI that names no host, and requests
  without SNI; on plain listeners it serves Host values that name no host.
* Inside a host an exact ``path`` beats any ``path_prefix``; among prefixes the
  longest wins.
* The backend path is rewritten like nginx ``proxy_pass``: when the backend URL
  has a path, the matched part of the request path is replaced by it; without
  one the request path goes through unchanged. The query is always kept.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from gatewayd.config import HostConfig, RouteConfig


def normalize_name(name: str) -> str:
    """Lowercase a DNS name and drop one trailing dot."""
    name = name.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    return name


_REG_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?\.?$")


def host_from_header(value: str) -> str | None:
    """The name part of a Host header value, normalized; None if it is malformed.

    ``Example.COM.:443`` -> ``example.com``; ``[::1]:8443`` -> ``::1``.
    Only DNS-style names (letters, digits, ``-``, ``_``, ``.``), IPv4
    addresses and bracketed IPv6 addresses are accepted, with an optional
    numeric port: a Host value is forwarded to backends, so nothing else
    (commas, quotes, semicolons, control characters) may pass.
    """
    value = value.strip()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        rest = value[end + 1 :]
        if rest and not (rest.startswith(":") and _is_port(rest[1:])):
            return None
        try:
            address = ipaddress.IPv6Address(value[1:end])
        except ValueError:
            return None
        return str(address)
    if value.count(":") >= 2:
        # An IPv6 address without brackets (RFC 3986 wants them, but some
        # clients, trio-websocket among them, send "Host: ::1"): no port then.
        try:
            return str(ipaddress.IPv6Address(value))
        except ValueError:
            return None
    name, sep, port = value.rpartition(":")
    if sep:
        if not _is_port(port):
            return None
        value = name
    if not _REG_NAME_RE.match(value) or ".." in value:
        return None
    return normalize_name(value)


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")


def normalize_path(path: str) -> str | None:
    """The path routes are matched on and backends receive, like nginx's URI
    normalization; None when the percent-encoding is invalid.

    Percent-encoded unreserved characters are decoded (``%61`` -> ``a``,
    ``%2e`` -> ``.``) and other escapes upper-cased (RFC 3986 section 6.2.2);
    runs of slashes are merged (nginx ``merge_slashes``); then dot-segments are
    removed (RFC 3986 section 5.2.4), so ``/public/../admin`` and
    ``//admin`` are matched, and forwarded, as ``/admin``. ``%2F`` and ``%00``
    stay encoded (``%00`` is refused), so a path can never gain a segment
    boundary or a NUL by decoding.
    """
    if path[:1] == "/" and "%" not in path and "//" not in path and "/." not in path:
        return path   # nothing to decode, merge or remove: the usual path, as is
    out: list[str] = []
    i = 0
    while i < len(path):
        ch = path[i]
        if ch == "%":
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                return None
            decoded = chr(int(pair, 16))
            if decoded == "\x00":
                return None
            out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
            i += 3
            continue
        out.append(ch)
        i += 1
    merged = re.sub(r"/{2,}", "/", "".join(out))
    segments: list[str] = []
    parts = merged.split("/")
    for index, segment in enumerate(parts[1:], start=1):
        last = index == len(parts) - 1
        if segment == ".":
            if last:
                segments.append("")
            continue
        if segment == "..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def name_matches(pattern: str, name: str) -> bool:
    """True if ``name`` (normalized) matches ``pattern`` (exact or ``*.`` wildcard)."""
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label) and dot == "." and rest == pattern[2:]
    return pattern == name


class HostTable:
    """Looks up the virtual host for a name; built once per configuration."""

    def __init__(self, hosts: Sequence[HostConfig]) -> None:
        self.hosts = tuple(hosts)
        self._exact: dict[str, HostConfig] = {}
        self._wildcard: dict[str, HostConfig] = {}
        self.default: HostConfig | None = None
        #: Every host's client_subject_header (lowercase): a client's copy of
        #: any of them is removed on every host, so that a backend shared by
        #: an mTLS host and another host never sees a forged subject.
        self.subject_headers = frozenset(
            host.client_subject_header.lower() for host in hosts if host.client_subject_header
        )
        for host in self.hosts:
            for pattern in host.names:
                if pattern.startswith("*."):
                    self._wildcard.setdefault(pattern[2:], host)
                else:
                    self._exact.setdefault(pattern, host)
            if host.default and self.default is None:
                self.default = host

    def find(self, name: str | None) -> HostConfig | None:
        """The host whose names match ``name`` exactly or by wildcard, else None."""
        if not name:
            return None
        name = normalize_name(name)
        host = self._exact.get(name)
        if host is not None:
            return host
        label, dot, rest = name.partition(".")
        if label and dot:
            return self._wildcard.get(rest)
        return None

    def lookup(self, name: str | None) -> HostConfig | None:
        """Like :meth:`find`, falling back to the ``default`` host (or None)."""
        host = self.find(name)
        return host if host is not None else self.default


def host_serves(host: HostConfig, name: str) -> bool:
    """True if ``name`` (normalized) is one of ``host``'s names (row 6, the 421 check)."""
    return any(name_matches(pattern, name) for pattern in host.names)


def select_route(host: HostConfig, path: str) -> RouteConfig | None:
    """The route for ``path`` (no query): exact ``path`` first, then the longest prefix."""
    best: RouteConfig | None = None
    best_len = -1
    for route in host.routes:
        if route.path is not None:
            if route.path == path:
                return route
        elif (
            route.path_prefix is not None
            and path.startswith(route.path_prefix)
            and len(route.path_prefix) > best_len
        ):
            best, best_len = route, len(route.path_prefix)
    return best


def rewrite_path(route: RouteConfig, path: str, new_base: str | None) -> str:
    """``path`` with the part ``route`` matched replaced by ``new_base`` (nginx
    ``proxy_pass``); unchanged when ``new_base`` is None (a URL without a path)."""
    if new_base is None:
        return path
    matched = route.path if route.path is not None else route.path_prefix
    assert matched is not None
    return new_base + path[len(matched) :]


def rewrite_target(route: RouteConfig, path: str, query: str | None) -> str:
    """The request-target sent to the backend (nginx ``proxy_pass`` rules).

    Args:
        route: the matched route.
        path: the request path, without the query.
        query: the query string without "?", or None when the request had no "?".
    """
    backend_path = route.backend.path if route.backend is not None else None
    new_path = rewrite_path(route, path, backend_path)
    if not new_path.startswith("/"):
        new_path = "/" + new_path
    if query is not None:
        return f"{new_path}?{query}"
    return new_path
