"""URLs and addresses that become schema objects: listen addresses, backend and auth URLs.

Pure, like :mod:`~gatewayd.config.values` (whose checks these build on);
each parser raises :class:`~gatewayd.config.values.Invalid` with the reason.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import cast

from gatewayd.config.schema import (
    NOT_YET_SUPPORTED,
    Address,
    BackendScheme,
    BackendTarget,
    ForwardAuth,
)
from gatewayd.config.values import (
    SCHEME_RE,
    Invalid,
    check_host_name,
    check_path,
    parse_authority,
    parse_port,
    quote,
    url_authority,
)

# AF_UNIX sun_path holds 108 bytes on Linux, including the final NUL.
_MAX_UNIX_PATH_BYTES = 107


def parse_listen_address(text: str) -> Address:
    what = "expected 'host:port' or '[ipv6]:port'"
    host, port_text, bracketed = parse_authority(text, what=what)
    if port_text is None:
        raise Invalid(f"{what} (e.g. '0.0.0.0:8443'), got {quote(text)}: the port is missing")
    if not host:
        raise Invalid(
            f"{what}, got {quote(text)}: the host is missing "
            "(use '0.0.0.0:PORT' for every IPv4 address or '[::]:PORT' for IPv6)"
        )
    port = parse_port(port_text, minimum=0)
    if bracketed:
        try:
            return Address(str(ipaddress.IPv6Address(host)), port)
        except ValueError:
            raise Invalid(f"not an IPv6 address in brackets: {quote(host)}") from None
    return Address(check_host_name(host, wildcard=False), port)


_SUPPORTED_BACKENDS = (
    "supported: 'ws://host[:port][/path]', 'wss://host[:port][/path]', "
    "'unix:/path/to.sock[:/path]', 'tcp://host:port' and 'unix+tcp:/path/to.sock'"
)
_DEFAULT_BACKEND_PORTS = {"ws": 80, "wss": 443}


def parse_backend(text: str, base: Path) -> BackendTarget:
    """Parse a backend URL.

    Raises:
        Invalid: for a malformed URL or an unsupported scheme.
    """
    lowered = text.lower()
    if lowered.startswith("unix+tcp:"):
        return _parse_unix_backend(text, base, bridge=True)
    if lowered.startswith("unix:"):
        return _parse_unix_backend(text, base, bridge=False)
    scheme, sep, rest = text.partition("://")
    if not sep or not SCHEME_RE.fullmatch(scheme):
        raise Invalid(f"not a backend URL: {quote(text)}; {_SUPPORTED_BACKENDS}")
    scheme = scheme.lower()
    for item in NOT_YET_SUPPORTED:
        if item.place == "backend-scheme" and item.key == scheme:
            raise Invalid(f"{scheme}:// backends are not supported by this version yet")
    if scheme not in ("ws", "wss", "tcp"):
        raise Invalid(f"unsupported backend scheme '{scheme}://'; {_SUPPORTED_BACKENDS}")
    if "#" in rest:
        raise Invalid(f"a backend URL must not have a fragment ('#'): {quote(text)}")
    if "?" in rest:
        raise Invalid(f"a backend URL must not have a query ('?'): {quote(text)}")
    slash = rest.find("/")
    authority, path = (rest, None) if slash < 0 else (rest[:slash], rest[slash:])
    host, port_text = url_authority(authority, text, "a backend URL", "backend host")
    if scheme == "tcp":
        # A TCP service has no default port and no path (websockify's target).
        if port_text is None:
            raise Invalid(
                f"a tcp:// backend needs a port, as in 'tcp://127.0.0.1:5900': {quote(text)}"
            )
        if path is not None and path != "/":
            raise Invalid(
                "a tcp:// backend has no path (the bridge carries bytes, not requests): "
                f"{quote(text)}"
            )
        path = None
    port = _DEFAULT_BACKEND_PORTS[scheme] if port_text is None else parse_port(port_text, minimum=1)
    if path is not None:
        check_path(path)
    return BackendTarget(
        url=text, scheme=cast(BackendScheme, scheme), host=host, port=port, path=path
    )


def _parse_unix_backend(text: str, base: Path, *, bridge: bool) -> BackendTarget:
    prefix = "unix+tcp:" if bridge else "unix:"
    rest = text[len(prefix) :]
    if "?" in rest or "#" in rest:
        raise Invalid(f"a backend URL must not have a query or fragment: {quote(text)}")
    socket, sep, uri = rest.partition(":/")
    path = "/" + uri if sep else None
    if not socket:
        raise Invalid(f"the {prefix} backend names no socket file: {quote(text)}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in socket):
        raise Invalid(f"the socket path has control characters: {quote(text)}")
    if bridge and path is not None:
        raise Invalid(
            "a unix+tcp: backend has no path (the bridge carries bytes, not requests): "
            f"{quote(text)}"
        )
    if path is not None:
        check_path(path)
    unix_path = Path(os.path.abspath(os.path.join(base, socket)))
    if len(os.fsencode(unix_path)) > _MAX_UNIX_PATH_BYTES:
        raise Invalid(
            f"socket path {str(unix_path)!r} is too long for a unix socket "
            f"(at most {_MAX_UNIX_PATH_BYTES} bytes)"
        )
    return BackendTarget(
        url=text, scheme="unix+tcp" if bridge else "unix", unix_path=unix_path, path=path
    )


def parse_auth_url(text: str, base: Path) -> ForwardAuth:
    """Parse ``auth_url``: ``http://host[:port][/path][?query]`` or ``unix:/path.sock[:/uri]``.

    Raises:
        Invalid: with the reason.
    """
    supported = "supported: 'http://host[:port][/path]' and 'unix:/path/to.sock[:/path]'"
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in text):
        raise Invalid(
            f"must not contain spaces, control or non-ASCII characters, got {quote(text)}"
        )
    if "#" in text:
        raise Invalid(f"an auth_url must not have a fragment ('#'): {quote(text)}")
    if text.lower().startswith("unix:"):
        rest = text[len("unix:") :]
        socket, sep, uri = rest.partition(":/")
        if not socket:
            raise Invalid(f"the unix: auth_url names no socket file: {quote(text)}")
        target = "/" + uri if sep else "/"
        check_path(target.partition("?")[0])
        unix_path = Path(os.path.abspath(os.path.join(base, socket)))
        if len(os.fsencode(unix_path)) > _MAX_UNIX_PATH_BYTES:
            raise Invalid(
                f"socket path {str(unix_path)!r} is too long for a unix socket "
                f"(at most {_MAX_UNIX_PATH_BYTES} bytes)"
            )
        return ForwardAuth(url=text, scheme="unix", target=target, unix_path=unix_path)
    scheme, sep, rest = text.partition("://")
    if not sep or not SCHEME_RE.fullmatch(scheme):
        raise Invalid(f"not an auth service URL: {quote(text)}; {supported}")
    if scheme.lower() == "https":
        raise Invalid(
            "https:// auth services are not supported: use http:// on a local or private "
            f"network, or a unix: socket; {supported}"
        )
    if scheme.lower() != "http":
        raise Invalid(f"unsupported auth service scheme '{scheme}://'; {supported}")
    before_query, has_query, query = rest.partition("?")
    slash = before_query.find("/")
    authority, path = (
        (before_query, "/") if slash < 0 else (before_query[:slash], before_query[slash:])
    )
    host, port_text = url_authority(authority, text, "an auth_url", "auth service host")
    port = 80 if port_text is None else parse_port(port_text, minimum=1)
    check_path(path)
    target = f"{path}?{query}" if has_query else path
    return ForwardAuth(url=text, scheme="http", target=target, host=host, port=port)

