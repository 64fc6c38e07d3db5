"""What a host's certificate says: validity dates and the names it covers.

Pure: reads PEM files with ``cryptography.x509`` (not OpenSSL, which only
:mod:`gatewayd.tls` imports) and never touches trio. Used for the
``gatewayd_certificate_expiry_timestamp_seconds`` gauge and for the warnings
``gatewayd check`` prints: a certificate that expires soon, or one that does
not cover each of its host's names.

Name matching follows RFC 6125 section 6.4:

* DNS-IDs (subjectAltName ``dNSName``) are compared case-insensitively,
  trailing dots ignored (6.4.1).
* A wildcard is honoured only as the complete left-most label (``*.example.org``)
  and stands for exactly one label (6.4.3); partial-label wildcards
  (``w*.example.org``) and wildcards elsewhere match nothing, as in browsers
  and the CA/Browser Forum rules.
* The subject's Common Name is used only when the certificate has no
  subjectAltName extension at all (6.4.4).
* IP-address host names match ``iPAddress`` entries (RFC 5280 4.2.1.6).

A host name that is itself a wildcard (``*.example.org`` in ``names``) is
covered only by the same wildcard in the certificate: the gateway answers for
every one-label name under it, and a certificate for ``a.example.org`` does
not cover them all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from gatewayd.config import Config

#: ``gatewayd check`` warns about certificates expiring within this long.
EXPIRY_WARNING = timedelta(days=14)

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class CertificateInfo:
    """The facts gatewayd reads from one host's leaf certificate.

    Attributes:
        path: the PEM file.
        not_before: start of validity (UTC, timezone-aware).
        not_after: end of validity (UTC, timezone-aware).
        dns_names: subjectAltName dNSName entries, lowercase, without trailing dot.
        ip_addresses: subjectAltName iPAddress entries.
        common_names: the subject's CN values, lowercase (used only without SAN).
        has_san: whether the certificate has a subjectAltName extension.
    """

    path: Path
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    common_names: tuple[str, ...] = ()
    has_san: bool = False

    @property
    def identities(self) -> list[str]:
        """The names the certificate is for, as an operator reads them."""
        if not self.has_san:
            return [f"CN={name}" for name in self.common_names]
        return [*self.dns_names, *(str(ip) for ip in self.ip_addresses)]


@dataclass(frozen=True)
class HostCertificate:
    """A host (by its first name, the metrics label) and its certificate."""

    host: str
    key_path: str
    names: tuple[str, ...]
    info: CertificateInfo


def read_certificate(path: Path) -> CertificateInfo:
    """Read the first (leaf) certificate of a PEM file.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file holds no PEM certificate or it does not parse.
    """
    data = path.read_bytes()
    start = data.find(_PEM_BEGIN)
    if start < 0:
        raise ValueError(f"no PEM certificate in {path}")
    leaf = x509.load_pem_x509_certificate(data[start:])
    return describe(leaf, path)


def describe(certificate: x509.Certificate, path: Path) -> CertificateInfo:
    """The :class:`CertificateInfo` of a parsed certificate."""
    dns_names: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    has_san = False
    try:
        san = certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        ).value
    except x509.ExtensionNotFound:
        pass  # no SAN: RFC 6125 6.4.4 falls back to the Common Name below
    else:
        assert isinstance(san, x509.SubjectAlternativeName)
        has_san = True
        dns_names = [_normalize(name) for name in san.get_values_for_type(x509.DNSName)]
        for ip in san.get_values_for_type(x509.IPAddress):
            if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                ips.append(ip)
    common_names = [
        _normalize(str(attribute.value))
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    return CertificateInfo(
        path=path,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ips),
        common_names=tuple(common_names),
        has_san=has_san,
    )


def host_certificates(config: Config) -> tuple[HostCertificate, ...]:
    """The certificate of every host, when a listener uses TLS (else none is in use).

    Raises:
        OSError, ValueError: a certificate file cannot be read or parsed
            (the TLS contexts are built first and report this as a ConfigError).
    """
    if not config.needs_tls:
        return ()
    found: list[HostCertificate] = []
    for host in config.hosts:
        if host.certificate is not None:
            found.append(
                HostCertificate(host.names[0], host.key_path, host.names, read_certificate(host.certificate))
            )
        elif host.acme and config.acme is not None:
            # Issued into state_dir; none yet (or unreadable) is reported by the ACME manager.
            path = config.acme.state_dir / "certificates" / f"{host.names[0]}.pem"
            try:
                found.append(HostCertificate(host.names[0], host.key_path, host.names, read_certificate(path)))
            except (OSError, ValueError):
                continue
    return tuple(found)


def _normalize(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _wildcard_matches(pattern: str, name: str) -> bool:
    """RFC 6125 6.4.3: ``*`` as the whole left-most label, standing for one label."""
    label, dot, rest = pattern.partition(".")
    if label != "*" or not dot or not rest or "*" in rest:
        return False
    name_label, name_dot, name_rest = name.partition(".")
    return bool(name_label) and bool(name_dot) and name_rest == rest


def covers(info: CertificateInfo, name: str) -> bool:
    """Whether the certificate is valid for host name ``name`` (see module doc)."""
    name = _normalize(name)
    ip = _ip(name)
    if info.has_san:
        if ip is not None:
            return ip in info.ip_addresses
        candidates: Sequence[str] = info.dns_names
    else:
        candidates = info.common_names
    if ip is not None:
        return name in candidates or any(_ip(c) == ip for c in candidates)
    if name.startswith("*."):
        # A wildcard host name needs the same wildcard in the certificate.
        return name in candidates
    return any(c == name or _wildcard_matches(c, name) for c in candidates)


def _in_words(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 2 * 86400:
        return f"{round(seconds / 86400)} days"
    if seconds >= 2 * 3600:
        return f"{round(seconds / 3600)} hours"
    return f"{max(1, round(seconds / 60))} minutes"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def warnings(
    certificates: Sequence[HostCertificate],
    now: datetime,
    *,
    within: timedelta = EXPIRY_WARNING,
) -> list[str]:
    """Warnings for ``gatewayd check``: expiry within ``within``, names not covered.

    Args:
        certificates: from :func:`host_certificates`.
        now: the current time (UTC, timezone-aware).
        within: how close an expiry date must be to be reported.

    Returns:
        One line per problem, ``host[0] (chat.example.com): certificate ...``.
    """
    lines: list[str] = []
    for item in certificates:
        info = item.info
        where = f"{item.key_path} ({', '.join(item.names)}): certificate {info.path}"
        if info.not_after <= now:
            lines.append(f"{where} expired on {_when(info.not_after)}")
        elif info.not_after - now <= within:
            lines.append(
                f"{where} expires in {_in_words(info.not_after - now)}, "
                f"on {_when(info.not_after)}"
            )
        if info.not_before > now:
            lines.append(f"{where} is not valid before {_when(info.not_before)}")
        missing = [name for name in item.names if not covers(info, name)]
        if missing:
            identities = ", ".join(info.identities) or "no names"
            lines.append(
                f"{where} does not cover {', '.join(missing)} (it is for {identities})"
            )
    return lines


def expiry_by_host(certificates: Sequence[HostCertificate]) -> dict[str, float]:
    """Each host's (first name's) certificate expiry as a Unix timestamp."""
    return {item.host: item.info.not_after.timestamp() for item in certificates}

