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

A pyOpenSSL upgrade may remove any of these. :func:`missing` lists what is
gone, by name, checked on real objects; tests/test_tls_openssl.py fails with that
list, so the upgrade fails loudly in the test suite rather than with an
AttributeError on a client's connection. The bound functions below are
looked up once, at import, which also saves an attribute lookup per call on
the hot path.
"""

from __future__ import annotations

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
    "NoOverlappingProtocols",
    "ServernameContext",
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
