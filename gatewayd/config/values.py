"""Values: parsing and checking one value, and the kinds of value a key can have.

Pure: no I/O beyond checking that an input file can be read, no trio, no
OpenSSL, and no import of :mod:`~gatewayd.config.schema` (the schema imports
this module: its key declarations name the kinds defined here).

Two layers:

* **Checks** are functions from a string to its checked, normalized form
  (:func:`check_host_name`, :func:`parse_origin`, :func:`check_network` ...).
  Each raises :class:`Invalid` with the reason, phrased to follow
  ``KEY.PATH:`` in a message.
* **Kinds** (:class:`Kind` and its subclasses) are what a key declaration
  says about its value: the TOML type it must have, the range or check it
  must pass, how the docs name its type and how the summary shows it.
  :meth:`Value.read` checks one value from the parsed file and reports every
  problem through a :class:`Report` (the builder), returning the default in
  place of a bad value so that loading goes on and finds every problem.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from gatewayd.headers import CLIENT_ADDRESS_HEADERS, HOP_BY_HOP

T = TypeVar("T")

#: A place in the file: ``("host", 1, "route", 0, "backend")`` is
#: ``host[1].route[0].backend``.
KeyPath = tuple[str | int, ...]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

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
SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")

# Header names the gateway itself sets or removes on the backend request (and
# Sec-WebSocket-*): client_subject_header must not be one of them.
RESERVED_HEADERS = _SET_BY_GATEWAY


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


def check_host_name(name: str, *, wildcard: bool) -> str:
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
    address = _ip_literal(text)
    if address is not None:
        return address
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


def _ip_literal(text: str) -> str | None:
    """The canonical form of an IP literal ("[v6]" without brackets), None for a name."""
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise Invalid(f"not an IPv6 address: {quote(text)}") from None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None  # not an IP literal: checked as a DNS name


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
    if not sep or not SCHEME_RE.fullmatch(scheme):
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
    if not sep or not SCHEME_RE.fullmatch(scheme):
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


def check_server_header(value: str) -> str:
    """``server_header``: sent as a header value, so printable ASCII; "" omits it."""
    if value and not all(0x20 <= ord(c) <= 0x7E for c in value):
        raise Invalid(
            f"must be printable ASCII (no CR, LF or other control characters), "
            f"got {quote(value)}"
        )
    if value != value.strip(" "):
        raise Invalid(f"must not start or end with a space, got {quote(value)}")
    return value


def check_index_name(value: str) -> str:
    """A static route's ``index``: a file name inside the folder it serves."""
    if not value or "/" in value or value.startswith(".") or "\x00" in value:
        raise Invalid(
            "must be a file name inside the folder (no '/', not starting with '.'), "
            f"got {quote(value)}"
        )
    return value


def check_ciphers(value: str) -> str:
    """An OpenSSL cipher list; whether OpenSSL accepts it is checked by gatewayd.tls."""
    if not value.strip() or not all(0x21 <= ord(c) <= 0x7E or c == " " for c in value):
        raise Invalid(
            f"must be a non-empty OpenSSL cipher list (printable ASCII), got {quote(value)}"
        )
    return value


def check_health_check(value: str) -> str:
    """``health_check``: "" (off), "tcp" (connect only) or a path (a WebSocket probe)."""
    if value in ("", "tcp"):
        return value
    if not value.startswith("/"):
        raise Invalid(
            "must be \"\" (off), \"tcp\" (connect only) or a path such as "
            f"\"/healthz\" (a WebSocket handshake probe), got {quote(value)}"
        )
    check_path(value)
    return value


def check_subject_header(name: str) -> str:
    """``client_subject_header``: a header name the gateway does not set itself."""
    if not name:
        return name
    if not TOKEN_RE.fullmatch(name):
        raise Invalid(f"not a valid header name (an RFC 9110 token), got {quote(name)}")
    lowered = name.lower()
    if lowered in RESERVED_HEADERS or lowered.startswith("sec-websocket-"):
        raise Invalid(
            f"{quote(name)} is a header the gateway sets itself; "
            "choose another name, such as 'X-Client-Subject'"
        )
    return name


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, so taskset and cgroups count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------
# Kinds: what a key declaration says about its value.
# ---------------------------------------------------------------------------


class Report(Protocol):
    """Where a kind reports problems: the builder, which knows files and lines."""

    #: The configuration file's folder: relative file names are resolved against it.
    base: Path

    def error(self, path: KeyPath, message: str) -> None:
        """Record one problem at ``path``."""

    def where(self, path: KeyPath) -> str:
        """How a message points at another place: ``host[0].names[1] (line 7)``."""


class Kind:
    """The kind of a key's value, as its declaration gives it.

    Attributes:
        docs_type: the "type" column of the key's row in docs/configuration.md.
    """

    docs_type = "string"

    def show(self, value: object) -> str:
        """The value as ``gatewayd check``'s summary writes it."""
        return str(value)


class Value(Kind, ABC, Generic[T]):
    """A kind that checks one value on its own (the builder reads it generically)."""

    @abstractmethod
    def read(self, report: Report, path: KeyPath, value: object, default: T) -> T:
        """Check ``value`` (written at ``path``); on a problem, report it and return ``default``."""


class Step(Kind):
    """A key the builder reads in a step of its own, because rules tie it to other keys.

    Args:
        docs_type: as for every kind.
        builder: the :class:`~gatewayd.config.build.Builder` method that reads it
            (checked by the tests, so the pointer cannot go stale).
    """

    def __init__(self, docs_type: str, builder: str) -> None:
        self.docs_type = docs_type
        self.builder = builder


class Table(Step):
    """A ``[table]`` (or an inline table), read by its own builder method."""

    def __init__(self, builder: str) -> None:
        super().__init__("table", builder)


class Tables(Step):
    """An array of tables (``[[listener]]``), read by its own builder method."""

    def __init__(self, builder: str) -> None:
        super().__init__("array of tables", builder)


class Bool(Value[bool]):
    docs_type = "boolean"

    def read(self, report: Report, path: KeyPath, value: object, default: bool) -> bool:
        if not isinstance(value, bool):
            report.error(path, f"expected a boolean (true or false), got {describe(value)}")
            return default
        return value

    def show(self, value: object) -> str:
        return "on" if value else "off"


class Int(Value[int]):
    """An integer in ``minimum..maximum`` (no upper bound when ``maximum`` is None)."""

    docs_type = "integer"

    def __init__(self, *, minimum: int, maximum: int | None = None, unit: str = "") -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.unit = unit

    def read(self, report: Report, path: KeyPath, value: object, default: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            report.error(path, f"expected an integer, got {describe(value)}")
            return default
        if self.maximum is not None and not self.minimum <= value <= self.maximum:
            report.error(path, f"must be between {self.minimum} and {self.maximum}, got {value}")
            return default
        if value < self.minimum:
            report.error(path, f"must be at least {self.minimum}, got {value}")
            return default
        return value

    def show(self, value: object) -> str:
        return f"{value} {self.unit}" if self.unit else str(value)


class Workers(Int):
    """``workers``: a count, or "auto" for one per CPU this process may run on."""

    docs_type = 'integer or `"auto"`'

    def read(self, report: Report, path: KeyPath, value: object, default: int) -> int:
        if value == "auto":
            return available_cpus()
        if isinstance(value, str):
            report.error(path, f'expected an integer or "auto", got {quote(value)}')
            return default
        return super().read(report, path, value, default)


class Seconds(Value[float]):
    """A duration in seconds, integer or float: > 0 when ``positive``, else >= 0.

    ``zero`` is how the summary shows 0 when it means "off" ("never").
    """

    docs_type = "duration"

    def __init__(self, *, positive: bool, zero: str = "") -> None:
        self.positive = positive
        self.zero = zero

    def read(self, report: Report, path: KeyPath, value: object, default: float) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            report.error(
                path, f"expected a number of seconds (integer or float), got {describe(value)}"
            )
            return default
        seconds = float(value)
        if not math.isfinite(seconds):
            report.error(path, f"must be a finite number of seconds, got {value}")
            return default
        if self.positive and seconds <= 0:
            report.error(path, f"must be greater than 0 seconds, got {value}")
            return default
        if seconds < 0:
            report.error(path, f"must not be negative, got {value}")
            return default
        return seconds

    def show(self, value: object) -> str:
        if not value and self.zero:
            return self.zero
        return f"{value:g}s" if isinstance(value, (int, float)) else str(value)


class Rate(Value[float]):
    """A non-negative finite number (a rate per second; 0 = off)."""

    docs_type = "number"

    def read(self, report: Report, path: KeyPath, value: object, default: float) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            report.error(path, f"expected a number (integer or float), got {describe(value)}")
            return default
        if not math.isfinite(value) or value < 0:
            report.error(path, f"must be a finite number, 0 or more, got {value}")
            return default
        return float(value)


class Str(Value[str]):
    """A string, passed through ``check`` (which raises :class:`Invalid`) when given."""

    def __init__(self, check: Callable[[str], object] | None = None) -> None:
        self.check = check

    def read(self, report: Report, path: KeyPath, value: object, default: str) -> str:
        if not isinstance(value, str):
            report.error(path, f"expected a string, got {describe(value)}")
            return default
        if self.check is not None:
            try:
                self.check(value)
            except Invalid as exc:
                report.error(path, str(exc))
                return default
        return value

    def show(self, value: object) -> str:
        return toml_string(value) if isinstance(value, str) else str(value)


class Choice(Value[str]):
    """One string of ``choices``."""

    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)

    def read(self, report: Report, path: KeyPath, value: object, default: str) -> str:
        text = Str().read(report, path, value, default)
        if text not in self.choices:
            allowed = ", ".join(repr(choice) for choice in self.choices)
            report.error(path, f"must be one of {allowed}, got {quote(text)}")
            return default
        return text


class IntChoice(Value[int]):
    """One integer of ``choices`` (``redirect_status``)."""

    docs_type = "integer"

    def __init__(self, choices: Sequence[int]) -> None:
        self.choices = tuple(choices)

    def read(self, report: Report, path: KeyPath, value: object, default: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            report.error(path, f"expected an integer, got {describe(value)}")
            return default
        if value not in self.choices:
            allowed = ", ".join(str(code) for code in self.choices)
            report.error(path, f"must be one of {allowed}, got {value}")
            return default
        return value


class StrList(Value[tuple[str, ...]]):
    """An array of strings, each passed through ``check``; duplicates are errors.

    Args:
        check: returns the checked, normalized item or raises :class:`Invalid`.
        what: how messages name the items ("host names").
    """

    docs_type = "array of strings"

    def __init__(self, check: Callable[[str], str], *, what: str) -> None:
        self.check = check
        self.what = what

    def read(
        self, report: Report, path: KeyPath, value: object, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        items = self.read_indexed(report, path, value)
        return default if items is None else tuple(item for _, item in items)

    def read_indexed(
        self, report: Report, path: KeyPath, value: object
    ) -> list[tuple[int, str]] | None:
        """(index in the file, checked item) pairs, or None when not an array (reported).

        Invalid items are reported and left out.
        """
        if not isinstance(value, list):
            key = path[-1]
            hint = f' (write {key} = ["{value}"])' if isinstance(value, str) else ""
            report.error(path, f"expected an array of {self.what}, got {describe(value)}{hint}")
            return None
        seen: dict[str, int] = {}
        result: list[tuple[int, str]] = []
        for index, item in enumerate(value):
            item_path = path + (index,)
            if not isinstance(item, str):
                report.error(item_path, f"expected a string, got {describe(item)}")
                continue
            try:
                checked = self.check(item)
            except Invalid as exc:
                report.error(item_path, str(exc))
                continue
            if checked in seen:
                report.error(
                    item_path,
                    f"{quote(checked)} is listed twice (also {report.where(path + (seen[checked],))})",
                )
                continue
            seen[checked] = index
            result.append((index, checked))
        return result


class Networks(Value[tuple[IPNetwork, ...]]):
    """An array of IP addresses or CIDR networks (``allow``, ``deny``, ``trusted_proxies``)."""

    docs_type = "array of strings"

    def __init__(self, *, what: str) -> None:
        self.items = StrList(check_network, what=what)

    def read(
        self, report: Report, path: KeyPath, value: object, default: tuple[IPNetwork, ...]
    ) -> tuple[IPNetwork, ...]:
        texts = self.items.read_indexed(report, path, value)
        if texts is None:
            return default
        return tuple(parse_network(text) for _, text in texts)


class File(Value["Path | None"]):
    """A file name resolved against the config folder, checked to be readable.

    With ``empty_is_off``, "" (the key's documented default) means no file.
    """

    docs_type = "string (file)"

    def __init__(self, *, empty_is_off: bool = False) -> None:
        self.empty_is_off = empty_is_off

    def read(self, report: Report, path: KeyPath, value: object, default: Path | None) -> Path | None:
        if not isinstance(value, str):
            report.error(path, f"expected a file name (string), got {describe(value)}")
            return None
        if not value:
            if not self.empty_is_off:
                report.error(path, "must not be empty")
            return None
        resolved = Path(os.path.abspath(os.path.join(report.base, value)))
        problem = file_problem(resolved)
        if problem is not None:
            report.error(path, problem)
        return resolved


# -- [acme] --------------------------------------------------------------------------

#: ACME challenge types gatewayd answers itself, in its default preference.
ACME_CHALLENGES: tuple[str, ...] = ("tls-alpn-01", "http-01")


def check_acme_directory(value: str) -> str:
    """An ACME directory URL: https only (RFC 8555 section 6.1)."""
    if not value.startswith("https://") or len(value) <= len("https://") or any(
        c.isspace() or ord(c) < 0x20 for c in value
    ):
        raise Invalid(f"must be an https:// URL, got {quote(value)}")
    return value


def check_email(value: str) -> str:
    """One e-mail address (the ACME account contact), or "" for none."""
    if not value:
        return value
    local, at, domain = value.partition("@")
    if (
        not (local and at and domain)
        or "@" in domain
        or any(c.isspace() or ord(c) < 0x20 or c in ",<>;" for c in value)
    ):
        raise Invalid(f"expected one e-mail address (ops@example.com), got {quote(value)}")
    return value


def check_challenge(value: str) -> str:
    if value not in ACME_CHALLENGES:
        raise Invalid(
            f"unknown challenge type {quote(value)} (gatewayd answers "
            f"{' and '.join(quote(c) for c in ACME_CHALLENGES)})"
        )
    return value


class Folder(Value[Path]):
    """A folder name resolved against the config folder (whether it is usable is a rule)."""

    docs_type = "string (folder)"

    def read(self, report: Report, path: KeyPath, value: object, default: Path) -> Path:
        if not isinstance(value, str) or not value:
            report.error(path, f"expected a folder name (non-empty string), got {describe(value)}")
            return default
        return Path(os.path.abspath(os.path.join(report.base, value)))


class Days(Value[float]):
    """A number of days greater than 0 (integer or float)."""

    docs_type = "number (days)"

    def read(self, report: Report, path: KeyPath, value: object, default: float) -> float:
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            report.error(path, f"expected a number of days greater than 0, got {describe(value)}")
            return default
        return float(value)

    def show(self, value: object) -> str:
        return f"{value:g} days" if isinstance(value, float) else str(value)
