"""Every use of pyOpenSSL's private API, in one place.

pyOpenSSL's public API lacks four things gatewayd needs, so this module
reaches under it, to the cffi bindings (``OpenSSL._util.lib``/``ffi``) and
to private attributes of its objects. Nothing else in gatewayd does (tests
included: they go through :func:`set_sigalgs_list`). What each use is for:

* :func:`outgoing_pending` / :func:`incoming_pending`: the bytes held by a
  connection's memory BIOs (``Connection._from_ssl``/``_into_ssl``,
  ``BIO_get_mem_data``). pyOpenSSL's ``bio_read`` reports an empty BIO by
  raising WantReadError, about a microsecond each time, and an empty BIO is
  the common case of the TLS stream's hot path.
* :func:`client_verified`: the verification result of the peer certificate
  (``Connection._ssl``, ``SSL_get_verify_result``), which pyOpenSSL does
  not expose.
* :func:`install_servername_callback`: a servername callback that can fail
  a handshake with the alert we choose (``SSL_CTX_set_tlsext_servername_callback``
  on ``Context._context``, mapping the ``SSL *`` back with
  ``Connection._reverse_mapping``). pyOpenSSL's own callback can only fail
  by raising, which prints a traceback and cannot pick the alert.
* :func:`set_groups_list`: the key exchange groups (``SSL_CTX_set1_curves_list``),
  with ``ERR_clear_error`` after a refused list.
* :class:`BoundTLS`: after the handshake, OpenSSL moved from the memory BIOs
  onto the socket (``SSL_set_fd``) and driven with ``SSL_read``,
  ``SSL_write``, ``SSL_shutdown`` and ``SSL_get_error`` straight through the
  bindings, return codes instead of exceptions (the data plane's hot path,
  gatewayd/dataplane.py; docs/tls-engine.md).

A pyOpenSSL upgrade may remove any of these. :func:`missing` lists what is
gone, by name, checked on real objects; tests/test_tls_openssl.py fails with that
list, so the upgrade fails loudly in the test suite rather than with an
AttributeError on a client's connection. The bound functions below are
looked up once, at import, which also saves an attribute lookup per call on
the hot path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

if TYPE_CHECKING:
    from types import TracebackType

    # Only named in annotations (the ALPN callback's "no overlap" value).
    from OpenSSL.SSL import _NoOverlappingProtocols as NoOverlappingProtocols

__all__ = [
    "BoundTLS",
    "NoOverlappingProtocols",
    "WANTS_READ",
    "buffer_pointer",
    "WANTS_WRITE",
    "ServernameContext",
    "TLSFailure",
    "clear_errors",
    "client_verified",
    "incoming_pending",
    "install_servername_callback",
    "missing",
    "outgoing_pending",
    "set_groups_list",
    "set_sigalgs_list",
]

# What this module uses, checked by missing(): binding functions and
# constants of OpenSSL._util.lib, and private attributes of pyOpenSSL objects.
_LIB_NAMES: Final = (
    "BIO_get_mem_data",
    "ERR_clear_error",
    "ERR_get_error",
    "ERR_reason_error_string",
    "SSL_ERROR_SSL",
    "SSL_ERROR_SYSCALL",
    "SSL_ERROR_WANT_READ",
    "SSL_ERROR_WANT_WRITE",
    "SSL_ERROR_ZERO_RETURN",
    "SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER",
    "SSL_MODE_ENABLE_PARTIAL_WRITE",
    "SSL_MODE_RELEASE_BUFFERS",
    "SSL_get_error",
    "SSL_read",
    "SSL_set_fd",
    "SSL_set_mode",
    "SSL_shutdown",
    "SSL_write",
    "SSL_CTX_set1_curves_list",
    "SSL_CTX_set1_sigalgs_list",
    "SSL_CTX_set_tlsext_servername_callback",
    "SSL_TLSEXT_ERR_ALERT_FATAL",
    "SSL_TLSEXT_ERR_OK",
    "SSL_get_verify_result",
    "X509_V_OK",
)
_CONNECTION_ATTRIBUTES: Final = ("_from_ssl", "_into_ssl", "_ssl")
_CONTEXT_ATTRIBUTES: Final = ("_context",)
_CLASS_ATTRIBUTES: Final = (
    (SSL.Connection, "_reverse_mapping"),
    (SSL, "_NoOverlappingProtocols"),
)


def missing() -> list[str]:
    """The private pyOpenSSL names this module uses that this pyOpenSSL lacks.

    Checked on a real Context and Connection, so instance attributes count.
    Empty on a supported pyOpenSSL.
    """
    gone = [f"OpenSSL._util.lib.{name}" for name in _LIB_NAMES if not hasattr(_lib, name)]
    if not hasattr(_ffi, "NULL") or not hasattr(_ffi, "callback"):
        gone.append("OpenSSL._util.ffi.NULL/callback")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    connection = SSL.Connection(context, None)
    gone += [f"SSL.Context.{name}" for name in _CONTEXT_ATTRIBUTES if not hasattr(context, name)]
    gone += [f"SSL.Connection.{name}" for name in _CONNECTION_ATTRIBUTES if not hasattr(connection, name)]
    gone += [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, name in _CLASS_ATTRIBUTES
        if not hasattr(owner, name)
    ]
    return gone


# -- memory BIOs (the TLS stream's hot path) -----------------------------------

_NULL: Final = _ffi.NULL
_BIO_get_mem_data: Final = _lib.BIO_get_mem_data


def outgoing_pending(conn: SSL.Connection) -> int:
    """Bytes OpenSSL wrote to the outgoing memory BIO and nobody read yet.

    ``BIO_get_mem_data`` with no pointer returns the BIO's length.
    """
    return int(_BIO_get_mem_data(conn._from_ssl, _NULL))


def incoming_pending(conn: SSL.Connection) -> int:
    """Bytes written to the incoming memory BIO that OpenSSL has not taken yet."""
    return int(_BIO_get_mem_data(conn._into_ssl, _NULL))


# -- client certificates -------------------------------------------------------


def client_verified(conn: SSL.Connection) -> bool:
    """Whether the peer's certificate passed verification (``X509_V_OK``)."""
    return bool(_lib.SSL_get_verify_result(conn._ssl) == _lib.X509_V_OK)


# -- context settings ----------------------------------------------------------


def set_groups_list(context: SSL.Context, groups: bytes) -> bool:
    """Set the key exchange groups (OpenSSL list syntax); False if refused.

    A refused list leaves an error queued: call :func:`clear_errors`.
    """
    return bool(_lib.SSL_CTX_set1_curves_list(context._context, groups) == 1)


def set_sigalgs_list(context: SSL.Context, sigalgs: bytes) -> bool:
    """Set the signature algorithms offered (OpenSSL list syntax); False if refused.

    The gateway leaves OpenSSL's defaults; tests use it to play a client
    that offers only some algorithms.
    """
    return bool(_lib.SSL_CTX_set1_sigalgs_list(context._context, sigalgs) == 1)


def clear_errors() -> None:
    """Empty this thread's OpenSSL error queue (``ERR_clear_error``)."""
    _lib.ERR_clear_error()


# -- the servername callback ---------------------------------------------------


class ServernameContext(SSL.Context):
    """An ``SSL.Context`` that can hold a servername callback of ours.

    The cffi callback object must live as long as the SSL_CTX that points to
    it, so the context holds it (pyOpenSSL does the same for its own callbacks).
    """

    _gatewayd_servername_callback: object = None


def install_servername_callback(
    context: ServernameContext,
    select: Callable[[SSL.Connection], int | None],
    on_error: Callable[[type[BaseException] | None, BaseException | None, TracebackType | None], None],
) -> None:
    """Register ``select`` as ``context``'s servername callback.

    ``select(connection)`` returns None to go on with the handshake, or the
    TLS alert code to fail it with (RFC 6066 section 3; the callback then
    returns ``SSL_TLSEXT_ERR_ALERT_FATAL`` with ``*al`` set). An exception in
    ``select`` cannot propagate through OpenSSL: ``on_error`` gets it and the
    handshake fails.

    The ``SSL *`` is mapped back to its Connection the way pyOpenSSL's own
    wrappers do.
    """
    reverse_mapping = SSL.Connection._reverse_mapping
    ok = int(_lib.SSL_TLSEXT_ERR_OK)
    fatal = int(_lib.SSL_TLSEXT_ERR_ALERT_FATAL)

    def on_servername(ssl: Any, alert: Any, arg: Any) -> int:
        alert_code = select(reverse_mapping[ssl])
        if alert_code is None:
            return ok
        alert[0] = alert_code
        return fatal

    callback = _ffi.callback(
        "int (*)(SSL *, int *, void *)",
        on_servername,
        error=fatal,
        onerror=on_error,
    )
    _lib.SSL_CTX_set_tlsext_servername_callback(context._context, callback)
    context._gatewayd_servername_callback = callback


# -- OpenSSL on the socket (the data plane) ------------------------------------

_SSL_read: Final = _lib.SSL_read
_SSL_write: Final = _lib.SSL_write
_SSL_get_error: Final = _lib.SSL_get_error
_SSL_shutdown: Final = _lib.SSL_shutdown
_from_buffer: Final = _ffi.from_buffer
_WANT_READ: Final = int(_lib.SSL_ERROR_WANT_READ)
_WANT_WRITE: Final = int(_lib.SSL_ERROR_WANT_WRITE)
_ZERO_RETURN: Final = int(_lib.SSL_ERROR_ZERO_RETURN)
_SYSCALL: Final = int(_lib.SSL_ERROR_SYSCALL)

#: What :meth:`BoundTLS.read` / :meth:`BoundTLS.write` return instead of a
#: count when OpenSSL must wait for the socket: readable, or writable.
WANTS_READ: Final = -1
WANTS_WRITE: Final = -2


def buffer_pointer(buffer: bytearray) -> Any:
    """A cffi ``char *`` into ``buffer`` (which must outlive it), for :meth:`BoundTLS.read`."""
    return _from_buffer(buffer)


class TLSFailure(Exception):
    """OpenSSL failed on the socket: a protocol error, a reset, EOF without close_notify."""


class BoundTLS:
    """An established TLS connection whose OpenSSL reads and writes the socket itself.

    Made by :meth:`gatewayd.tls.stream.TLSStream.detach` once the handshake
    (and, for the gateway, the request phase) is over: the memory BIOs are
    empty by then (their bytes were fed to OpenSSL or given to the caller),
    and ``SSL_set_fd`` replaces them with a socket BIO on ``fd`` (which
    OpenSSL never closes). The socket must be non-blocking.

    Modes: ``ENABLE_PARTIAL_WRITE`` (a write returns after each record it
    completed), ``ACCEPT_MOVING_WRITE_BUFFER`` (a write retried after
    WANTS_WRITE passes the same bytes, not necessarily at the same address),
    ``RELEASE_BUFFERS`` (an idle connection keeps no record buffer).

    Holds the pyOpenSSL ``Connection`` (it owns the ``SSL *``).
    """

    __slots__ = ("_conn", "_ssl")

    def __init__(self, conn: SSL.Connection, fd: int) -> None:
        self._conn = conn
        ssl = conn._ssl
        if _lib.SSL_set_fd(ssl, fd) != 1:
            _lib.ERR_clear_error()
            raise TLSFailure("SSL_set_fd failed")
        # SSL_set_fd freed the memory BIOs; pyOpenSSL must not touch them.
        conn._into_ssl = None
        conn._from_ssl = None
        _lib.SSL_set_mode(
            ssl,
            _lib.SSL_MODE_ENABLE_PARTIAL_WRITE
            | _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
            | _lib.SSL_MODE_RELEASE_BUFFERS,
        )
        self._ssl = ssl

    def read(self, buffer: object, size: int) -> int:
        """Decrypt into ``buffer`` (a cffi ``char *``): the count, 0 after close_notify,
        or WANTS_READ / WANTS_WRITE. Raises TLSFailure."""
        ssl = self._ssl
        count = int(_SSL_read(ssl, buffer, size))
        if count > 0:
            return count
        return self._outcome(count, eof_is_end=True)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt and send from ``data``: the count taken (at least one record's
        worth or all), or WANTS_READ / WANTS_WRITE (retry with the same bytes). Raises TLSFailure."""
        count = int(_SSL_write(self._ssl, _from_buffer(data), len(data)))
        if count > 0:
            return count
        return self._outcome(count, eof_is_end=False)

    def shutdown(self) -> int:
        """Send close_notify: 0 when sent, or WANTS_WRITE / WANTS_READ (call again). Raises TLSFailure."""
        result = int(_SSL_shutdown(self._ssl))
        if result >= 0:
            return 0
        return self._outcome(result, eof_is_end=False)

    def _outcome(self, result: int, *, eof_is_end: bool) -> int:
        error = int(_SSL_get_error(self._ssl, result))
        if error == _WANT_READ:
            return WANTS_READ
        if error == _WANT_WRITE:
            return WANTS_WRITE
        if error == _ZERO_RETURN and eof_is_end:
            return 0
        raise TLSFailure(_failure_text(error))


def _failure_text(error: int) -> str:
    """Why OpenSSL failed, and an empty error queue afterwards."""
    code = int(_lib.ERR_get_error())
    _lib.ERR_clear_error()
    if code:
        reason = _lib.ERR_reason_error_string(code)
        return _ffi.string(reason).decode("ascii", "replace") if reason != _NULL else f"error {code:#x}"
    if error == _SYSCALL:
        number = _ffi.errno
        if number:
            return f"[Errno {number}] {os.strerror(number)}"
        return "EOF without close_notify"
    if error == _ZERO_RETURN:
        return "the peer sent close_notify"
    return f"SSL error {error}"
