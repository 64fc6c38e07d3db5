"""Parsing and checking of single values: URLs, host names, addresses, networks.

Pure functions from a string to its checked, normalized form; each raises
:class:`Invalid` with the reason, which the builder turns into a
:class:`~gatewayd.errors.ConfigError` at the key's path and line. Also the
TOML-flavoured renderings of values that messages use (:func:`describe`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path
from typing import cast

from gatewayd.config.schema import (
    NOT_YET_SUPPORTED,
    Address,
    BackendScheme,
    BackendTarget,
    ForwardAuth,
    IPNetwork,
)
from gatewayd.headers import CLIENT_ADDRESS_HEADERS, HOP_BY_HOP

# Headers the gateway sets itself on the backend request, and hop-by-hop ones.
_SET_BY_GATEWAY = HOP_BY_HOP | CLIENT_ADDRESS_HEADERS | {"host", "content-length"}
# An auth answer may not supply them (nor the handshake's Sec-WebSocket-* headers).
NOT_COPYABLE_HEADERS = _SET_BY_GATEWAY | {
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "sec-websocket-accept",
}

# RFC 7230 section 3.2.6 token characters (subprotocol names, RFC 6455 4.1).
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")

# Header names the gateway itself sets or removes on the backend request (and
# Sec-WebSocket-*): client_subject_header must not be one of them.
RESERVED_HEADERS = _SET_BY_GATEWAY
# AF_UNIX sun_path holds 108 bytes on Linux, including the final NUL.
_MAX_UNIX_PATH_BYTES = 107


def toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def describe(value: object) -> str:
    """A TOML-flavoured description of a value for messages: ``string 'yes'``."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {quote(value)}"
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


def quote(value: str) -> str:
    if len(value) > 60:
        value = value[:57] + "..."
    return repr(value)


def toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    return str(value)


class Invalid(Exception):
    """A value failed a parsing helper; the message says why (for ConfigError)."""


def check_path(value: str) -> None:
    """Check a URL path (route path or prefix, backend path).

    Raises:
        Invalid: when it does not start with "/", has "?" or "#", whitespace,
            control or non-ASCII characters.
    """
    if not value.startswith("/"):
        raise Invalid(f"must start with '/', got {quote(value)}")
    if "?" in value:
        raise Invalid(
            f"must not contain '?' (a query is never part of a path), got {quote(value)}"
        )
    if "#" in value:
        raise Invalid(f"must not contain '#', got {quote(value)}")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise Invalid(f"must not contain whitespace or control characters, got {quote(value)}")
    if not value.isascii():
        raise Invalid(
            f"must be ASCII: percent-encode other characters as they appear in "
            f"requests, got {quote(value)}"
        )


def check_host_name(name: str, *, wildcard: bool) -> str:  # noqa: C901 (arch-config removes it, issue #10 part 4)
    """Validate and normalize a host name or IP literal.

    Args:
        name: a DNS name (letters, digits, hyphens, dots), an IPv4 literal or
            an IPv6 literal (with or without brackets).
        wildcard: allow ``*`` as the whole first label (``*.example.org``).

    Returns:
        The name lowercased without a trailing dot, or the IP in its
        canonical form (IPv6 without brackets).

    Raises:
        Invalid: with the reason.
    """
    text = name.strip()
    if text != name:
        raise Invalid(f"must not have surrounding whitespace, got {quote(name)}")
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise Invalid(f"not an IPv6 address: {quote(name)}") from None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass  # not an IP literal: checked as a DNS name below
    if not text.isascii():
        hint = ""
        try:
            hint = f" ({quote(text.encode('idna').decode('ascii'))})"
        except UnicodeError:
            hint = ""
        raise Invalid(f"non-ASCII name {quote(name)}: write its IDNA form{hint}")
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise Invalid("must not be empty")
    if len(text) > 253:
        raise Invalid(f"longer than 253 characters: {quote(name)}")
    labels = text.split(".")
    if "*" in text:
        if not wildcard:
            raise Invalid(f"wildcards are not allowed here: {quote(name)}")
        if labels[0] != "*" or "*" in ".".join(labels[1:]) or len(labels) < 2:
            raise Invalid(
                f"'*' is only allowed as the whole first label, as in '*.example.org': "
                f"{quote(name)}"
            )
        labels = labels[1:]
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise Invalid(
                f"not a valid host name: {quote(name)} (labels are 1-63 letters, digits "
                f"or hyphens, not starting or ending with a hyphen)"
            )
    if labels[-1].isdigit():
        raise Invalid(f"not a valid host name or IP address: {quote(name)}")
    return text


def parse_port(text: str, *, minimum: int) -> int:
    if not text.isdigit() or not text.isascii():
        raise Invalid(f"port must be a number, got {quote(text)}")
    port = int(text)
    if not minimum <= port <= 65535:
        raise Invalid(f"port must be between {minimum} and 65535, got {port}")
    return port


def parse_authority(text: str, *, what: str) -> tuple[str, str | None, bool]:
    """Split ``host[:port]`` / ``[v6][:port]`` into (host, port text, bracketed).

    Raises:
        Invalid: on a missing host, an unclosed bracket or an unbracketed IPv6.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise Invalid(f"{what}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise Invalid(f"{what}: unexpected {quote(rest)} after ']'")
        return host, (rest[1:] if rest else None), True
    if text.count(":") > 1:
        raise Invalid(f"{what}: IPv6 addresses must be in brackets, as in '[::1]:9000'")
    host, sep, port = text.partition(":")
    return host, (port if sep else None), False


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


def url_authority(authority: str, url: str, subject: str, what: str) -> tuple[str, str | None]:
    """The checked host (IPv6 without brackets) and port text of a URL's authority.

    Args:
        authority: the part between "//" and the path.
        url: the whole URL, for messages.
        subject: how messages name the URL ("a backend URL").
        what: how messages name the host ("backend host").
    """
    if "@" in authority:
        raise Invalid(f"{subject} must not have user information ('user@'): {quote(url)}")
    host, port_text, bracketed = parse_authority(authority, what=what)
    if not host:
        the = "the " + subject.split(" ", 1)[1]
        raise Invalid(f"{the} has no host: {quote(url)}")
    if bracketed:
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise Invalid(f"not an IPv6 address in brackets: {quote(host)}") from None
    else:
        host = check_host_name(host, wildcard=False)
    return host, port_text


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
    if not sep or not _SCHEME_RE.fullmatch(scheme):
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


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def parse_origin(text: str) -> str:
    """Normalize an allowed Origin: lowercase ``scheme://host[:port]`` or "null".

    The default port of http/https is dropped, as browsers never send it
    (RFC 6454 section 6.2).

    Raises:
        Invalid: with the reason.
    """
    example = "an origin is 'scheme://host[:port]', as in 'https://chat.example.com'"
    if text.lower() == "null":
        return "null"
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise Invalid(f"{example}, got {quote(text)}")
    scheme = scheme.lower()
    if rest.endswith("/") and not any(c in rest[:-1] for c in "/?#"):
        raise Invalid(f"{example} with no trailing '/', got {quote(text)}")
    if any(c in rest for c in "/?#"):
        raise Invalid(f"{example} with no path, query or fragment, got {quote(text)}")
    if "@" in rest:
        raise Invalid(f"{example} with no user information, got {quote(text)}")
    host, port_text, bracketed = parse_authority(rest, what=example)
    if not host:
        raise Invalid(f"{example}, got {quote(text)}: the host is missing")
    if bracketed:
        try:
            host = f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            raise Invalid(f"not an IPv6 address in brackets: {quote(host)}") from None
    elif "*" in host:
        raise Invalid(f"wildcards are not supported in origins; list each one: {quote(text)}")
    else:
        host = check_host_name(host, wildcard=False)
    result = f"{scheme}://{host}"
    if port_text is not None:
        port = parse_port(port_text, minimum=1)
        if _DEFAULT_PORTS.get(scheme) != port:
            result += f":{port}"
    return result


_REDIRECT_SCHEMES = ("http", "https", "ws", "wss")


def parse_redirect(text: str) -> tuple[str, str | None, str | None]:
    """Split a ``redirect`` URL into (``scheme://authority``, path, query).

    The URL must be absolute (http, https, ws or wss) with a host, and printable
    ASCII without spaces: it is sent as the Location header, so CR and LF are
    impossible by construction. No fragment, no user information.

    Raises:
        Invalid: with the reason.
    """
    example = "an absolute URL such as 'wss://new.example.com/chat' (http, https, ws or wss)"
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in text):
        raise Invalid(
            "must not contain spaces, control characters (CR, LF) or non-ASCII characters "
            f"(percent-encode them), got {quote(text)}"
        )
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise Invalid(f"expected {example}, got {quote(text)}")
    if scheme.lower() not in _REDIRECT_SCHEMES:
        raise Invalid(f"unsupported scheme '{scheme}://' in {quote(text)}: expected {example}")
    if "#" in rest:
        raise Invalid(f"a redirect URL must not have a fragment ('#'): {quote(text)}")
    before_query, has_query, query = rest.partition("?")
    slash = before_query.find("/")
    authority, path = (
        (before_query, None) if slash < 0 else (before_query[:slash], before_query[slash:])
    )
    if "@" in authority:
        raise Invalid(f"a redirect URL must not have user information ('user@'): {quote(text)}")
    host, port_text, bracketed = parse_authority(authority, what="redirect host")
    if not host:
        raise Invalid(f"the redirect URL has no host: {quote(text)}")
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(f"not an IPv6 address in brackets: {quote(host)}") from None
    else:
        check_host_name(host, wildcard=False)
    if port_text is not None:
        parse_port(port_text, minimum=1)
    if path is not None:
        check_path(path)
    return f"{scheme.lower()}://{authority}", path, (query if has_query else None)


def check_realm(realm: str) -> str:
    """A realm goes into ``WWW-Authenticate: Basic realm="..."`` (RFC 7617)."""
    if not realm:
        raise Invalid("must not be empty")
    if not all(0x20 <= ord(c) <= 0x7E for c in realm) or '"' in realm or "\\" in realm:
        raise Invalid(
            "must be printable ASCII without '\"' or '\\' (it is sent as a quoted string), "
            f"got {quote(realm)}"
        )
    return realm


def check_copyable_header(name: str) -> str:
    if not TOKEN_RE.fullmatch(name):
        raise Invalid(
            f"not a valid header name (letters, digits and !#$%&'*+-.^_`|~), got {quote(name)}"
        )
    if name.lower() in NOT_COPYABLE_HEADERS:
        raise Invalid(
            f"{quote(name)} cannot be copied to the backend request: the gateway sets it "
            "itself (or it is hop-by-hop)"
        )
    return name


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
    if not sep or not _SCHEME_RE.fullmatch(scheme):
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


def parse_network(text: str) -> IPNetwork:
    """A CIDR network, IPv4-mapped IPv6 ones as IPv4 (client addresses compare that way)."""
    network = ipaddress.ip_network(text, strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def check_network(text: str) -> str:
    """Validate and normalize one ``allow``/``deny`` entry (host bits are dropped)."""
    example = "an IP address or CIDR network, as in '10.0.0.0/8', '192.0.2.7' or '2001:db8::/32'"
    if text.lower() == "all":
        raise Invalid(f"expected {example}; for every address write '0.0.0.0/0' and '::/0'")
    try:
        network = parse_network(text)
    except ValueError:
        raise Invalid(f"expected {example}, got {quote(text)}") from None
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        # '10.1.2.3/8' is almost always a typo, and in an access or trust list
        # a silent guess at what was meant is a security decision: refuse it.
        raise Invalid(
            f"{quote(text)} has host bits set: write the network, {quote(str(network))}"
        ) from None
    return str(network)


# ---------------------------------------------------------------------------
# The locator: key path -> line, since tomllib keeps no positions.
# ---------------------------------------------------------------------------


def check_server_name(value: str) -> str:
    return check_host_name(value, wildcard=True)


def check_token(value: str) -> str:
    if not TOKEN_RE.fullmatch(value):
        raise Invalid(
            f"not a valid subprotocol name (an RFC 7230 token: letters, digits and "
            f"!#$%&'*+-.^_`|~), got {quote(value)}"
        )
    return value


def file_problem(path: Path) -> str | None:
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
