"""``gatewayd proxy --from ADDR --to URL``: a gateway without a configuration file.

Like ``caddy reverse-proxy``: the command line is turned into the TOML text of
an ordinary configuration (one listener, one default host, one route for every
path), which goes through the normal loader and validation, so the proxy is
exactly the gateway that file describes; ``--print-config`` prints that file
(it passes ``gatewayd check``, and ``gatewayd run -c`` serves the same thing).

This module is pure: arguments in, TOML text out (and the names a
``--self-signed`` certificate needs). The CLI makes the certificate and runs it.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

#: Backend schemes gatewayd knows (docs/backends.md); a bare HOST:PORT means ws://.
BACKEND_SCHEMES = ("ws://", "wss://", "unix:", "tcp://", "unix+tcp:")


class UsageError(ValueError):
    """A command line that cannot describe a gateway (exit 2)."""


@dataclass(frozen=True)
class From:
    """Where to listen and for which name: ``--from [ws://|wss://][HOST][:PORT]``."""

    tls: bool
    address: str  # what [[listener]] address says: "0.0.0.0:443", "[::1]:8443"
    name: str | None  # a host name given in --from (not an address)
    port: int


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_from(text: str) -> From:
    """``:8443``, ``127.0.0.1:8443``, ``[::1]:8443``, ``chat.example.com``, ``ws://:8080``."""
    tls = True
    rest = text
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme not in ("ws", "wss"):
            raise UsageError(f"--from {text!r}: the scheme is ws:// (plain) or wss:// (TLS, the default)")
        tls = scheme == "wss"
    if "/" in rest:
        raise UsageError(f"--from {text!r}: an address has no path (every path is proxied)")
    if rest.startswith("[") and not is_ip(rest[1:].partition("]")[0]):
        raise UsageError(f"--from {text!r}: {rest[1:].partition(']')[0]!r} is not an IPv6 address")
    parts = urlsplit(f"//{rest}")
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise UsageError(f"--from {text!r}: the port is not a number from 1 to 65535") from None
    host = parts.hostname or ""
    if host and is_ip(host):
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return From(tls, address, None, port)
    # A name (or nothing): every interface, like Caddy; the name is the host's.
    return From(tls, f"0.0.0.0:{port}", host.lower() or None, port)


def parse_to(text: str) -> str:
    """A backend URL; ``HOST:PORT`` or ``:PORT`` alone means ``ws://`` (Caddy's ``--to``)."""
    if text.startswith(BACKEND_SCHEMES):
        return text
    if "://" in text:
        raise UsageError(
            f"--to {text!r}: unsupported scheme; one of ws://, wss://, unix:, tcp://, unix+tcp: (docs/backends.md)"
        )
    host = text.rpartition(":")[0] if ":" in text else ""
    if text.startswith(":"):
        text = f"127.0.0.1{text}"
    elif not host:
        raise UsageError(f"--to {text!r}: give a URL (ws://HOST:PORT/PATH) or HOST:PORT")
    return f"ws://{text}"


def certificate_names(path: Path) -> list[str]:
    """The DNS names (else the CN) of a PEM certificate, for ``names`` when --from has none."""
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(name) for name in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    # Wildcards are valid host names too ("*.example.org" = exactly one label).
    return [name.lower() for name in names if name]


def toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for these characters)."""
    return json.dumps(text, ensure_ascii=True)


def host_names(where: From, self_signed: str | None, cert_names: Sequence[str]) -> list[str]:
    names: list[str] = []
    for name in (where.name, self_signed, *cert_names):
        if name and name not in names:
            names.append(name)
    return names or ["localhost"]


def render(
    where: From,
    backends: Sequence[str],
    *,
    certificate: Path | None,
    private_key: Path | None,
    names: Sequence[str],
    admin: str | None,
    command: Sequence[str],
) -> str:
    """The configuration the command line describes, as a commented TOML file."""
    if not backends:
        raise UsageError("--to is required (the backend URL)")
    shown = [word for word in command if word != "--print-config"]
    lines = [
        "# Written by: " + shlex.join(["gatewayd", *shown]),
        "# The same gateway as a file: gatewayd run -c THIS_FILE (docs/configuration.md)",
        "",
    ]
    if admin:
        lines += ["[admin]", f"listen = {toml_string(admin)}", ""]
    lines += ["[[listener]]", f"address = {toml_string(where.address)}"]
    if not where.tls:
        lines.append("tls = false")
    lines += [
        "",
        "[[host]]",
        "names = [" + ", ".join(toml_string(name) for name in names) + "]",
        "default = true                 # every SNI and Host is served",
    ]
    if where.tls:
        if certificate is None or private_key is None:
            raise UsageError(
                "a TLS listener needs --cert FILE --key FILE or --self-signed NAME "
                "(or --from ws://... to listen without TLS)"
            )
        lines += [f"certificate = {toml_string(str(certificate))}", f"private_key = {toml_string(str(private_key))}"]
    lines += ["", "[[host.route]]", 'path_prefix = "/"              # every path, sent on unchanged']
    if len(backends) == 1:
        lines.append(f"backend = {toml_string(backends[0])}")
    else:
        lines.append("backends = [" + ", ".join(toml_string(url) for url in backends) + "]")
    return "\n".join(lines) + "\n"
