"""ACME challenge answers: key authorizations and the TLS-ALPN-01 certificate.

Pure: builds bytes with ``cryptography`` and ``josepy`` (no I/O, no trio, no
OpenSSL). What the gateway serves for a pending challenge:

* **HTTP-01** (RFC 8555 section 8.3): ``GET /.well-known/acme-challenge/TOKEN``
  on a plain listener is answered ``200`` with the key authorization
  ``TOKEN.THUMBPRINT`` as the body (``application/octet-stream``).
* **TLS-ALPN-01** (RFC 8737 section 3): a ClientHello for the name that offers
  ALPN ``acme-tls/1`` gets a self-signed certificate whose only
  subjectAltName is that name and which carries the critical
  ``id-pe-acmeIdentifier`` extension holding SHA-256 of the key
  authorization; ``acme-tls/1`` is selected and the connection ends after the
  handshake.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from josepy.b64 import b64encode
from josepy.jwk import JWK

#: The ALPN protocol ID of TLS-ALPN-01 (RFC 8737 section 6.2).
ACME_TLS_ALPN: Final = b"acme-tls/1"
#: id-pe-acmeIdentifier (RFC 8737 section 6.1): 1.3.6.1.5.5.7.1.31.
ACME_IDENTIFIER_OID: Final = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
#: The path prefix of HTTP-01 answers (RFC 8555 section 8.3).
HTTP01_PREFIX: Final = "/.well-known/acme-challenge/"

# RFC 8555 section 8.1: a token is base64url without padding (RFC 4648
# section 5), so anything else in the path is not one of ours.
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{16,256}")


def key_authorization(token: str, account_key: JWK) -> str:
    """``token || '.' || base64url(JWK thumbprint)`` (RFC 8555 section 8.1)."""
    thumbprint = b64encode(account_key.public_key().thumbprint(hash_function=hashes.SHA256))
    return f"{token}.{thumbprint.decode('ascii')}"


def valid_token(token: str) -> bool:
    """Whether ``token`` can be an ACME token (and so a safe file name)."""
    return _TOKEN.fullmatch(token) is not None


def http01_token(path: str) -> str | None:
    """The token a request path asks for, or None when it is not an HTTP-01 path.

    The query string (RFC 8555 section 8.3 validators send none) is ignored.
    """
    path = path.partition("?")[0]
    if not path.startswith(HTTP01_PREFIX):
        return None
    token = path[len(HTTP01_PREFIX) :]
    return token if valid_token(token) else None


def http01_request(method: str, path: str, host: str | None, names: frozenset[str]) -> str | None:
    """The token of an HTTP-01 validation request for one of ``names``, or None.

    RFC 8555 section 8.3: ``GET /.well-known/acme-challenge/TOKEN`` with the
    validated name in ``Host`` (a port and a trailing dot ignored, as
    everywhere in gatewayd).
    """
    if method != "GET" or host is None:
        return None
    name = host.strip().lower()
    if name.startswith("["):
        return None  # an IP literal is never an ACME host name here
    name = name.rpartition(":")[0] if ":" in name else name
    if name.rstrip(".") not in names:
        return None
    return http01_token(path)


def tls_alpn01_certificate(
    name: str, key_auth: str, *, now: datetime.datetime | None = None
) -> bytes:
    """The RFC 8737 challenge certificate for ``name``: PEM certificate, then PEM key.

    A fresh P-256 key each time; valid from a day ago for a week (the
    validator checks the extension and the name, not the dates, but a sane
    validity keeps TLS stacks from refusing it first).
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_auth.encode("ascii")).digest()
    # extnValue is the DER of Authorization ::= OCTET STRING (SIZE (32)).
    acme_identifier = b"\x04\x20" + digest
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gatewayd ACME challenge")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, acme_identifier), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
