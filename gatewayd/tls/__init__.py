"""TLS for client connections: one OpenSSL context per virtual host, chosen by
SNI, and the TLS stream that runs over each accepted TCP connection.

This package is the only part of gatewayd that imports OpenSSL (pyOpenSSL).
Its modules:

* :mod:`gatewayd.tls.stream`: :class:`TLSStream`, a
  :class:`trio.abc.HalfCloseableStream` that speaks TLS over any trio stream,
  server side (from :meth:`ServerTLS.wrap`) or client side (tests,
  benchmarks): the engine over OpenSSL memory BIOs, with its theory of
  operation.
* :mod:`gatewayd.tls.context`: :class:`ServerTLS`, built once per
  configuration generation by :meth:`ServerTLS.from_config`: the contexts,
  one per host, and the servername callback that picks one by SNI (SPEC
  section 3, row 1).
* :mod:`gatewayd.tls.credentials`: loading and checking certificate, key and
  OCSP response files, each problem named with its file.
* :mod:`gatewayd.tls._openssl`: every use of pyOpenSSL's private API (its
  cffi bindings and private attributes), with :func:`~gatewayd.tls._openssl.missing`
  for the test that fails, naming the attribute, when an upgrade removes one.

Wire behaviour (SPEC section 3, rows 1 and 2):

* Row 1: the host is looked up from SNI with :meth:`gatewayd.routing.HostTable.lookup`
  (exact name, then ``*.`` wildcard, then the ``default`` host). When there is
  none, the handshake fails with the ``unrecognized_name`` alert (RFC 6066
  section 3) and :meth:`TLSStream.do_handshake` raises
  :class:`~gatewayd.errors.UnknownServerName`.
* Row 2: the first byte a client sends must be a TLS handshake record (content
  type 22, RFC 8446 section 5.1). Anything else raises
  :class:`~gatewayd.errors.NotTLS` carrying the bytes received, before anything
  was sent, so the caller can answer ``400`` in plain text like nginx.
"""

from __future__ import annotations

from gatewayd.tls.context import TICKET_KEY_ROTATION, ServerTLS
from gatewayd.tls.stream import CLOSE_NOTIFY_TIMEOUT, TLSStream, rfc4514_subject

__all__ = ["CLOSE_NOTIFY_TIMEOUT", "TICKET_KEY_ROTATION", "ServerTLS", "TLSStream", "rfc4514_subject"]
