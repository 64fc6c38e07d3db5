"""Certificate, key and OCSP files: load them, check them, say what is wrong.

Pure file reading with ``cryptography`` (OpenSSL gets the loaded objects in
:mod:`gatewayd.tls.context`). Each loader returns its result or a problem
text naming the file, for :class:`~gatewayd.errors.ConfigErrors`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509 import ocsp

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = [
    "TLSPrivateKey",
    "key_kind",
    "load_certificates",
    "load_ocsp_response",
    "load_pair",
    "load_private_key",
    "read_pem_file",
]

logger = logging.getLogger("gatewayd.tls")

def read_pem_file(path: Path, what: str) -> tuple[bytes | None, str | None]:
    try:
        return path.read_bytes(), None
    except FileNotFoundError:
        return None, f"{what} file not found: {path}"
    except IsADirectoryError:
        return None, f"{what} file is a directory: {path}"
    except OSError as exc:
        return None, f"cannot read {what} file {path}: {exc.strerror or exc}"


def load_certificates(path: Path) -> tuple[list[x509.Certificate], str | None]:
    data, problem = read_pem_file(path, "certificate")
    if data is None:
        return [], problem
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        return [], f"{path} is not a PEM certificate file (expected '-----BEGIN CERTIFICATE-----')"
    return chain, None


# The key types a TLS server can sign with (DSA is gone from TLS 1.3).
TLSPrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def load_private_key(path: Path) -> tuple[TLSPrivateKey | None, str | None]:
    data, problem = read_pem_file(path, "private key")
    if data is None:
        return None, problem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        return None, f"private key {path} is encrypted; gatewayd needs an unencrypted key"
    except ValueError:
        return None, f"{path} is not a PEM private key (expected '-----BEGIN ... PRIVATE KEY-----')"
    except UnsupportedAlgorithm as exc:
        return None, f"private key {path} uses an unsupported algorithm: {exc}"
    if not isinstance(
        key,
        (
            rsa.RSAPrivateKey,
            ec.EllipticCurvePrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        return None, f"private key {path} is a {type(key).__name__}, which TLS servers cannot use"
    return key, None


def _public_key_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_pair(
    where: str, cert_file: Path, key_file: Path, problem: Callable[[str, str], None]
) -> tuple[list[x509.Certificate], TLSPrivateKey] | None:
    """Load one certificate file and its key and check they match; report problems."""
    chain, cert_problem = load_certificates(cert_file)
    if cert_problem is not None:
        problem(f"{where}.certificate", cert_problem)
    key, key_problem = load_private_key(key_file)
    if key_problem is not None:
        problem(f"{where}.private_key", key_problem)
    if not chain or key is None:
        return None
    if _public_key_der(chain[0].public_key()) != _public_key_der(key.public_key()):
        problem(
            f"{where}.private_key",
            f"private key {key_file} does not match certificate {cert_file} "
            "(the first certificate in the file must be the host's own)",
        )
        return None
    return chain, key


def key_kind(key: TLSPrivateKey) -> str:
    """The OpenSSL certificate slot a key goes to."""
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    return "Ed448"


def load_ocsp_response(
    path: Path, leaves: Sequence[x509.Certificate]
) -> tuple[int, bytes] | str | None:
    """Read a DER OCSP response to staple.

    Returns:
        (serial number of the certificate it is for, DER bytes); or a problem
        (str) when the file cannot be used at all; or None (with a warning
        logged) when it is valid but out of date, so nothing is stapled
        rather than a response clients would reject.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read OCSP response file {path}: {exc.strerror or exc}"
    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError:
        return f"{path} is not a DER OCSP response (RFC 6960; e.g. from 'openssl ocsp -respout')"
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"OCSP response {path} is not successful: {response.response_status.name}"
    serials = {leaf.serial_number for leaf in leaves}
    if response.serial_number not in serials:
        return (
            f"OCSP response {path} is for certificate serial {response.serial_number:x}, "
            "not for a certificate of this host"
        )
    now = datetime.now(timezone.utc)
    next_update = response.next_update_utc
    if next_update is not None and next_update < now:
        logger.warning(
            "OCSP response %s expired on %s; not stapled until the file is refreshed (SIGHUP)",
            path,
            next_update.isoformat(),
        )
        return None
    if response.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        logger.warning("OCSP response %s says the certificate is REVOKED", path)
    return response.serial_number, data
