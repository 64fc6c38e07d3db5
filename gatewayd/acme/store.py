"""The ACME state directory (``[acme] state_dir``): what survives a restart.

Layout (everything created 0700, private files 0600)::

    state_dir/
      lock                           flock: its holder is the one process talking to the CA
      accounts/<ca>/key.pem          account key (P-256), one account per ACME directory URL
      accounts/<ca>/account.json     {"directory": URL, "uri": account URL}
      certificates/<name>.pem        private key, then leaf and chain (one file: swapped atomically)
      certificates/<name>.json       last attempt, failures in a row, last error, next attempt
      challenges/http-01/<token>     key authorization of a pending HTTP-01 challenge
      challenges/tls-alpn-01/<name>.pem   RFC 8737 certificate and key of a pending TLS-ALPN-01 challenge

``<name>`` is the host's first name (lowercase; ``*`` never occurs, wildcard
hosts cannot use ACME here) and ``<ca>`` the first 16 hex digits of SHA-256
of the directory URL. Every write goes to a temporary file in the same
folder, is fsynced, then renamed over the old one, so a reader (another
worker, ``gatewayd check``, the TLS code) sees the old file or the new one,
never a mix. Only the lock holder writes; every process reads.

Plain file I/O, no trio: the files are small and the callers either run in a
worker thread (the issuer) or read one file per rare event (an ACME
validation's handshake or request).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gatewayd.acme.challenges import valid_token

_PEM_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"

logger = logging.getLogger("gatewayd.acme")


@dataclass(frozen=True)
class StoredCertificate:
    """A certificate file as read back: the key and the chain, parsed."""

    path: Path
    key_pem: bytes
    chain_pem: bytes
    chain: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


class Store:
    """Paths and atomic reads and writes under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir

    # -- layout ------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.root / "lock"

    def account_dir(self, directory_url: str) -> Path:
        digest = hashlib.sha256(directory_url.encode()).hexdigest()[:16]
        return self.root / "accounts" / digest

    def certificate_path(self, name: str) -> Path:
        return self.root / "certificates" / f"{name}.pem"

    def status_path(self, name: str) -> Path:
        return self.root / "certificates" / f"{name}.json"

    def http01_path(self, token: str) -> Path:
        if not valid_token(token):
            raise ValueError(f"not an ACME token: {token!r}")
        return self.root / "challenges" / "http-01" / token

    def tls_alpn01_path(self, name: str) -> Path:
        return self.root / "challenges" / "tls-alpn-01" / f"{name}.pem"

    # -- set-up ------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the folders (0700); raises OSError when state_dir is not usable."""
        for folder in (
            self.root,
            self.root / "accounts",
            self.root / "certificates",
            self.root / "challenges" / "http-01",
            self.root / "challenges" / "tls-alpn-01",
        ):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def writable_problem(self) -> str | None:
        """Why state_dir cannot be used (for ``gatewayd check``), or None.

        Creates the folder when it is missing, as ``run`` would.
        """
        try:
            self.prepare()
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".check-"):
                pass
        except OSError as exc:
            return f"state_dir {self.root} is not writable: {exc.strerror or exc}"
        return None

    # -- atomic files --------------------------------------------------------------

    def write_atomic(self, path: Path, data: bytes, mode: int = 0o600) -> None:
        """Replace ``path`` with ``data`` all at once (temporary file, fsync, rename)."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), mode)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        with contextlib.suppress(OSError):
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    @staticmethod
    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    @staticmethod
    def remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    @staticmethod
    def read_or_log(path: Path) -> bytes | None:
        """Like :meth:`read`, but a file that exists and cannot be read is logged and None."""
        try:
            return Store.read(path)
        except OSError as exc:
            logger.warning("acme: cannot read %s: %s", path, exc.strerror or exc)
            return None

    def read_json(self, path: Path) -> dict[str, Any] | None:
        """A JSON object file; None when missing, unreadable (logged) or not an object."""
        data = self.read_or_log(path)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def write_json(self, path: Path, value: dict[str, Any]) -> None:
        self.write_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    # -- certificates ----------------------------------------------------------------

    def save_certificate(self, name: str, key_pem: bytes, chain_pem: bytes) -> None:
        self.write_atomic(self.certificate_path(name), key_pem.rstrip(b"\n") + b"\n" + chain_pem)

    def load_certificate(self, name: str) -> StoredCertificate | None:
        """The stored certificate of host ``name``; None when missing or unreadable (logged)."""
        path = self.certificate_path(name)
        data = self.read_or_log(path)
        if data is None:
            return None
        return parse_certificate_file(path, data)

    # -- challenges --------------------------------------------------------------------

    def publish_http01(self, token: str, key_authorization: str) -> None:
        self.write_atomic(self.http01_path(token), key_authorization.encode("ascii"), 0o644)

    def http01_answer(self, token: str) -> bytes | None:
        """The key authorization for a pending HTTP-01 token, or None."""
        if not valid_token(token):
            return None
        return self.read(self.http01_path(token))

    def publish_tls_alpn01(self, name: str, pem: bytes) -> None:
        self.write_atomic(self.tls_alpn01_path(name), pem)

    def tls_alpn01_answer(self, name: str) -> bytes | None:
        """The challenge certificate and key (PEM) pending for ``name``, or None."""
        if not name or "/" in name or name.startswith("."):
            return None
        return self.read(self.tls_alpn01_path(name))

    # -- the lock ----------------------------------------------------------------------

    def lock(self) -> CALock:
        return CALock(self.lock_path)


class CALock:
    """The CA lock: its holder is the one process of this state_dir talking to the CA.

    ``flock`` on ``state_dir/lock``: released by the kernel when the holder
    exits, however it exits, so a dead worker's role is taken over by the
    next process that tries.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire_nowait(self) -> bool:
        """Take the lock if no other process holds it; whether we hold it now."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


FileSignature = tuple[int, int, int]


def file_signature(path: Path) -> FileSignature | None:
    """(inode, size, mtime): changes whenever the file is replaced; None when missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def parse_certificate_file(path: Path, data: bytes) -> StoredCertificate | None:
    """Split a ``key, leaf, chain`` PEM file; None when it does not hold that."""
    start = data.find(_PEM_BEGIN_CERT)
    if start <= 0:
        return None
    key_pem, chain_pem = data[:start], data[start:]
    try:
        serialization.load_pem_private_key(key_pem, password=None)
        chain = tuple(x509.load_pem_x509_certificates(chain_pem))
    except (ValueError, TypeError):
        return None
    if not chain:
        return None
    return StoredCertificate(path, key_pem, chain_pem, chain)
