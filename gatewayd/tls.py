"""TLS for client connections: one OpenSSL context per virtual host, chosen by
SNI, and the TLS stream that runs over each accepted TCP connection.

This is the only module of gatewayd that imports OpenSSL (pyOpenSSL). It gives:

* :class:`ServerTLS`, built once per configuration generation by
  :meth:`ServerTLS.from_config`: it loads and checks every host's certificate
  and key (reporting every problem at once, as :class:`~gatewayd.errors.ConfigErrors`)
  and wraps accepted connections with :meth:`ServerTLS.wrap`.
* :class:`TLSStream`, a :class:`trio.abc.HalfCloseableStream` that speaks TLS
  over any trio stream, server side (from :meth:`ServerTLS.wrap`) or client side
  (tests, benchmarks).

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

# Theory of operation
# ===================
#
# Engine. OpenSSL runs over two memory BIOs (``SSL.Connection(ctx, None)``),
# exactly like trio's own ``trio.SSLStream`` (src/trio/_ssl.py, whose design and
# comments this module follows; read its header first). Every OpenSSL call
# (do_handshake, read, write, shutdown) only touches memory: it may append
# bytes to the outgoing BIO, consume bytes from the incoming BIO, or fail with
# WantReadError ("feed me more bytes from the peer, then call me again"). It
# never blocks and never raises WantWriteError, because a memory BIO always
# accepts more bytes. Our async code moves bytes between the BIOs and the
# transport stream. The alternative, OpenSSL on the socket fd in non-blocking
# mode, was measured (bench/tls_engine.py, docs/tls-engine.md): for bulk data
# the two cost about the same (one syscall per 64 KiB here, one or two per
# 16 KiB record there), but memory BIOs take about twice the CPU per small
# message and ~20% more per handshake (Python plumbing, as much as
# trio.SSLStream's), and more memory per idle connection after bulk traffic
# (see "Memory"). They were chosen for what socket mode cannot do: look at
# the first bytes before OpenSSL sees them (row 2), run over any trio Stream
# (trio's conformance checks over in-memory and clogged streams; a
# PROXY-protocol listener hands us a stream it has already read from), and
# reuse trio's proven full-duplex design.
#
# _retry(fn) is the one place that drives OpenSSL. It loops:
#   1. call fn() (synchronously: OpenSSL state is shared, so no await between
#      calling OpenSSL and collecting its output);
#   2. take everything OpenSSL wrote to the outgoing BIO;
#   3. make progress with exactly one step: if there is output, send it
#      (under the inner send lock); otherwise, if OpenSSL wants input, feed it
#      the next whole record already received, or if there is none, receive
#      one chunk from the transport (under the inner receive lock); otherwise
#      we are done.
# Sending first matters: output must reach the wire in the order OpenSSL
# produced it, so a task holding output must queue for the (strict FIFO) send
# lock before anything else can happen. (TLS 1.3 session tickets held back
# at the end of the handshake, see below, go out in front of any later
# output, alerts included.)
#
# Memory. OpenSSL's memory BIOs only ever grow, so neither is allowed to hold
# more than one TLS record: each record written is taken out at once, and
# received chunks wait in a Python buffer from which whole records are fed
# one at a time (a small framer on the 5-byte record header). The BIOs then
# keep ~22 KiB each at most, instead of ~88 KiB each after a 64 KiB burst.
#
# Full duplex. One task may be in send_all while another is in receive_some
# (the splice does exactly that). Both use _retry, so both may want the
# transport: a read can produce output (a TLS 1.3 KeyUpdate answer) and, in
# principle, a write can need input. Hence two levels of locking:
#   * outer conflict detectors: two concurrent send_all (or send_all and
#     send_eof / wait_send_all_might_not_block), or two concurrent receive_some,
#     are caller bugs and raise trio.BusyResourceError at once;
#   * inner locks: the transport's send side is used by one task at a time
#     (StrictFIFOLock, FIFO so output order is kept), and so is its receive
#     side. If a task wants input while another task is already receiving from
#     the transport, it does not receive again: it waits for the lock, sees from
#     _inner_recv_count that someone else fed the BIO meanwhile, and retries its
#     OpenSSL call instead (receiving again could wait forever for bytes that
#     will never come).
# Renegotiation, the main source of "reads that write and writes that read",
# is refused (OP_NO_RENEGOTIATION) and does not exist in TLS 1.3, but the
# locking does not rely on that.
#
# Handshake. Done once, by do_handshake() or implicitly by the first I/O call;
# concurrent callers wait for the first one. On the server side the first
# chunk received is checked before it reaches OpenSSL (row 2). The SNI choice
# happens inside OpenSSL's servername callback (see _ServerNameSelector), which
# switches the connection to the host's SSL_CTX (certificate, cipher list) or
# makes OpenSSL fail the handshake with the alert we choose. After any fatal
# OpenSSL error we still send what OpenSSL queued (the alert) before raising,
# so clients see *why* (unrecognized_name, protocol_version, ...). TLS 1.3
# servers emit session tickets right at the end of the handshake; like trio we
# hold them back and send them in front of our first write, so a handshake
# never blocks on a peer that is not reading yet.
#
# Closing. receive_some returns b"" only for a close_notify. A transport EOF
# without close_notify raises trio.BrokenResourceError, as trio.SSLStream does
# with https_compatible=False: a truncated TLS stream is not a clean end, and
# the splice must pass "reset" (not "half-close") on to the backend. send_eof
# sends close_notify then half-closes the transport (TLS 1.3 allows the other
# direction to continue, RFC 8446 section 6.1). aclose sends close_notify
# without waiting for the peer's (allowed by RFC 8446 section 6.1), bounded by
# CLOSE_NOTIFY_TIMEOUT, then closes the transport; a cancelled aclose still
# closes the transport.
#
# Cancellation. Cancelling an operation that has handed bytes to OpenSSL but
# not yet to the transport (a handshake, or a send_all in progress) leaves the
# TLS state unrecoverable: the stream becomes broken (every later call raises
# trio.BrokenResourceError) and aclose() just closes the transport. Cancelling
# a receive_some that is waiting for bytes is harmless. Handshake timeouts are
# the caller's cancel scope.

from __future__ import annotations

import enum
import hashlib
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509 import ocsp
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from gatewayd import errors
from gatewayd.acme.challenges import ACME_TLS_ALPN
from gatewayd.acme.store import Store, StoredCertificate
from gatewayd.clienthello import ClientHelloReader
from gatewayd.config import Config, HostConfig, TLSSettings
from gatewayd.routing import HostTable, normalize_name
from gatewayd.sockio import SocketIO

if TYPE_CHECKING:
    from types import TracebackType

    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = ["CLOSE_NOTIFY_TIMEOUT", "ServerTLS", "TLSStream"]

logger = logging.getLogger("gatewayd.tls")

T = TypeVar("T")

#: Seconds aclose() spends trying to send close_notify (and a failed
#: handshake spends sending its alert) before closing the transport anyway:
#: a peer that does not read for this long gets a bare TCP close.
CLOSE_NOTIFY_TIMEOUT: Final = 3.0

# First receive size guess for receive_some() without max_bytes (trio's value);
# afterwards the largest chunk the transport returned is used.
_STARTING_RECEIVE_SIZE: Final = 16384

# At most this much plaintext is encrypted per trip to the transport: four
# full TLS records. Bounds the memory a huge send_all() holds at once.
_MAX_WRITE: Final = 65536

# Largest TLS record payload (RFC 8446 section 5.1). A full record in a
# read means a bulk sender: more records are probably buffered already.
_MAX_RECORD_PLAINTEXT: Final = 16384

# TLS record framing (RFC 8446 section 5.1, RFC 5246 section 6.2): a 5-byte
# header whose last two bytes are the length of the body, which is at most
# 2^14 + 2048 (TLS 1.2; TLS 1.3 allows 2^14 + 256).
_RECORD_HEADER: Final = 5
_MAX_RECORD_BODY: Final = 16384 + 2048
_MAX_RECORD_SIZE: Final = _RECORD_HEADER + _MAX_RECORD_BODY

# OpenSSL's memory BIOs never give memory back (their buffer only grows by a
# third more than needed), so a BIO that once held a 64 KiB burst would keep
# ~88 KiB for the life of an idle connection, defeating
# SSL_MODE_RELEASE_BUFFERS; hence one record at a time ("Memory" above).

# RFC 8446 section 5.1: ContentType.handshake. A ClientHello starts with it.
_HANDSHAKE_RECORD: Final = 0x16

# TLS alert codes (RFC 8446 section 6).
_ALERT_PROTOCOL_VERSION: Final = 70
_ALERT_UNRECOGNIZED_NAME: Final = 112
_ALERT_INTERNAL_ERROR: Final = 80
_ALERT_NO_APPLICATION_PROTOCOL: Final = 120

# Session ID context: the same on every context so that sessions (TLS 1.2
# session IDs and tickets, TLS 1.3 tickets) resume across the SNI switch.
# OpenSSL checks it against the SSL_CTX the connection started with, before
# the servername callback runs.
_SESSION_ID_CONTEXT: Final = b"gatewayd"

_PROTOCOL_VERSIONS: Final = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

# Key exchange groups of Mozilla's profiles (intermediate and modern alike:
# X25519, prime256v1, secp384r1), led by the X25519+ML-KEM hybrid where the
# OpenSSL build has it (post-quantum; outside the profile's list but not a
# downgrade of anything). OpenSSL's default list also offers X448 and
# secp521r1, which the profile rejects.
_GROUPS: Final = (b"X25519MLKEM768:X25519:prime256v1:secp384r1", b"X25519:prime256v1:secp384r1")

# Session ID context of hosts that require client certificates: their own,
# so that no session made without a verified certificate (on another host)
# resumes on them (see _host_tls).
_MTLS_SESSION_PREFIX: Final = b"gatewayd-mtls:"

_ALPN_HTTP_1_1: Final = b"http/1.1"


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raise trio.BusyResourceError when two tasks enter at once (caller bug)."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._held = False


class _HandshakeInfo:
    """What the servername callback decided, kept as the Connection's app data.

    A separate object (not the stream) so that Connection and stream do not
    reference each other.
    """

    __slots__ = ("acme_challenge", "hello", "host", "offered_alpn", "refusal", "staples")

    def __init__(self) -> None:
        self.host: HostConfig | None = None
        self.refusal: errors.TLSHandshakeFailed | None = None
        #: The chosen host's OCSP responses by certificate serial number.
        self.staples: dict[int, bytes] = {}
        #: Server side: reads the ALPN offer from the ClientHello records.
        self.hello: ClientHelloReader | None = None
        #: The ALPN protocols the ClientHello offered (None: it could not be read).
        self.offered_alpn: tuple[bytes, ...] | None = None
        #: The TLS-ALPN-01 challenge certificate was chosen (RFC 8737).
        self.acme_challenge = False


def _select_alpn(
    connection: SSL.Connection, offered: list[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    info = connection.get_app_data()
    if isinstance(info, _HandshakeInfo) and info.acme_challenge:
        # RFC 8737 section 3: the challenge certificate goes with acme-tls/1.
        return ACME_TLS_ALPN
    # RFC 7301 section 3.2 lets a server that shares no protocol with the
    # client either fail with no_application_protocol or ignore the
    # extension; we ignore it (nginx >= 1.21.4 fails instead), so a client
    # offering only h2 still gets its handshake and then an HTTP/1.1 answer.
    if _ALPN_HTTP_1_1 in offered:
        return _ALPN_HTTP_1_1
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _ssl_error_text(exc: SSL.Error) -> str:
    """The OpenSSL reasons in a pyOpenSSL exception, for logs."""
    if isinstance(exc, SSL.SysCallError):
        return str(exc.args[1]) if len(exc.args) > 1 else "system call error"
    if isinstance(exc, SSL.ZeroReturnError):
        return "close_notify received"
    if exc.args and isinstance(exc.args[0], list):
        reasons = [
            entry[2] for entry in exc.args[0] if isinstance(entry, tuple) and len(entry) == 3
        ]
        if reasons:
            return "; ".join(str(reason) for reason in reasons)
    return str(exc) or type(exc).__name__


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over a trio stream, driven through OpenSSL memory BIOs.

    Server-side streams come from :meth:`ServerTLS.wrap`; client-side streams
    (tests, benchmarks) are built directly with a client ``SSL.Context``. The
    client side sends SNI but does not check the server's host name: the
    context's verification settings are all it applies.

    Errors, after the handshake: :meth:`receive_some` returns ``b""`` once the
    peer sent close_notify; a transport EOF without close_notify and a peer
    reset raise :class:`trio.BrokenResourceError`; any TLS protocol error
    breaks the stream (:class:`trio.BrokenResourceError` from then on). Using
    the stream after :meth:`aclose` raises :class:`trio.ClosedResourceError`.

    Attributes:
        transport_stream: the stream the TLS records travel on.
        server_name: the SNI name (lowercase, no trailing dot): server side,
            the one the client sent, known once the handshake has ended, also
            when it failed after the ClientHello; client side, the one given.
            None when there was none.
        host: server side: the host chosen by SNI, after the handshake.
        client_subject: server side, on a host with ``client_ca``: the
            verified client certificate's subject (RFC 4514, printable ASCII),
            after the handshake; else None.
        tls_version: negotiated protocol ("TLSv1.3"), after the handshake.
        cipher: negotiated cipher suite (OpenSSL name), after the handshake.
        alpn_protocol: negotiated ALPN protocol ("http/1.1"), or None.
        acme_challenge: server side: the handshake answered an ACME
            TLS-ALPN-01 validation (RFC 8737) with the challenge certificate;
            the connection must end without any application data.
    """

    # No per-instance dict: thousands of idle connections each hold one.
    __slots__ = (
        "transport_stream", "server_name", "host", "tls_version", "cipher", "alpn_protocol",
        "acme_challenge",
        "client_subject",
        "_server_side", "_state", "_info", "_conn", "_sniff_pending", "_transport_eof_received",
        "_transport_eof_sent", "_eof_sent", "_handshake_started", "_handshake_done",
        "_handshake_finished", "_delayed_outgoing", "_pending_read_error", "_produced", "_backlog",
        "_backlog_view", "_backlog_start", "_estimated_receive_size", "_inner_send_lock",
        "_inner_recv_lock", "_inner_recv_count", "_outer_send_conflict", "_outer_recv_conflict",
        "_debug", "_io",
    )

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        alpn_protocols: Sequence[str] = (),
    ) -> None:
        """Wrap ``transport_stream``; the handshake has not started yet.

        Args:
            transport_stream: the connected transport (a TCP SocketStream).
            context: the OpenSSL context. Server side: the SNI context of a
                :class:`ServerTLS`, or any server context with a certificate.
            server_side: True for the server end of the connection.
            server_hostname: client side: the SNI name to send.
            alpn_protocols: client side: ALPN protocols to offer.
        """
        self.transport_stream: trio.abc.Stream = transport_stream
        self.server_name: str | None = None
        self.host: HostConfig | None = None
        self.client_subject: str | None = None
        self.tls_version: str | None = None
        self.cipher: str | None = None
        self.alpn_protocol: str | None = None
        #: Server side: the handshake answered an ACME TLS-ALPN-01 validation
        #: (RFC 8737): nothing else may happen on this connection.
        self.acme_challenge = False

        self._server_side = server_side
        self._state = _State.OK
        self._info = _HandshakeInfo()
        self._conn = SSL.Connection(context, None)
        self._conn.set_app_data(self._info)
        if server_side:
            self._conn.set_accept_state()
            self._info.hello = ClientHelloReader()
        else:
            self._conn.set_connect_state()
            if server_hostname is not None:
                self.server_name = normalize_name(server_hostname)
                self._conn.set_tlsext_host_name(self.server_name.encode("idna"))
            if alpn_protocols:
                self._conn.set_alpn_protos([p.encode("ascii") for p in alpn_protocols])

        # Row 2: the first chunk from a client is checked before OpenSSL sees it.
        self._sniff_pending = server_side
        self._transport_eof_received = False
        self._transport_eof_sent = False
        self._eof_sent = False
        # Handshake once, shared by concurrent callers.
        self._handshake_started = False
        self._handshake_done = False
        self._handshake_finished = trio.Event()
        # TLS 1.3 session tickets held back until our first write.
        self._delayed_outgoing: bytes | None = None
        # An error met after a read already returned data: raised next time.
        self._pending_read_error: SSL.Error | None = None
        # Ciphertext taken out of the outgoing BIO, not yet sent.
        self._produced: list[bytes] = []
        # Received bytes not yet fed to the incoming BIO ("Memory" above):
        # self._backlog[self._backlog_start:] is the unfed part.
        self._backlog = b""
        self._backlog_view = memoryview(self._backlog)
        self._backlog_start = 0
        self._estimated_receive_size = _STARTING_RECEIVE_SIZE

        self._inner_send_lock = trio.StrictFIFOLock()
        self._inner_recv_lock = trio.Lock()
        self._inner_recv_count = 0
        self._outer_send_conflict = _ConflictDetector(
            "another task is currently sending data on this TLSStream"
        )
        self._outer_recv_conflict = _ConflictDetector(
            "another task is currently receiving data on this TLSStream"
        )
        self._debug = logger.isEnabledFor(logging.DEBUG)
        # Over TCP, the transport is driven through SocketIO (fewer scheduler
        # round trips and exceptions per record; see gatewayd/sockio.py).
        self._io = SocketIO(transport_stream) if isinstance(transport_stream, trio.SocketStream) else None

    # -- status ---------------------------------------------------------------

    def _check_status(self) -> None:
        if self._state is _State.OK:
            return
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("the TLS stream is broken")
        raise trio.ClosedResourceError("the TLS stream was closed")

    def _check_send_status(self) -> None:
        self._check_status()
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this TLS stream")

    # -- the engine (see "Theory of operation") -------------------------------

    def _collect_outgoing(self) -> None:
        """Move what OpenSSL wrote to the outgoing BIO into self._produced."""
        while _bio_pending(self._conn._from_ssl):
            chunk = self._conn.bio_read(_MAX_RECORD_SIZE)
            self._produced.append(chunk)
            if len(chunk) < _MAX_RECORD_SIZE:
                # A memory BIO hands out all it holds, so it is empty now.
                return

    def _input_needed(self) -> bool:
        """True when SSL_read could only ask for more input now (so skip the call).

        Nothing decrypted and unread, no received byte OpenSSL has not taken,
        no close_notify already seen, no error held back: the receive then
        goes to the transport first (about a third of the Python time of a
        small message was SSL_read raising WantReadError on an empty BIO).
        """
        conn = self._conn
        return (
            self._pending_read_error is None
            and self._backlog_start >= len(self._backlog)
            and not self._transport_eof_received
            and not _bio_pending(conn._into_ssl)
            and not conn.pending()
            and not conn.get_shutdown() & SSL.RECEIVED_SHUTDOWN
        )

    def _take_outgoing(self) -> bytes:
        """All ciphertext produced so far and not yet sent."""
        self._collect_outgoing()
        produced = self._produced
        if not produced:
            return b""
        self._produced = []
        return produced[0] if len(produced) == 1 else b"".join(produced)

    def _feed_backlog(self) -> bool:
        """Feed the next whole received record to OpenSSL; False if there is none.

        An incomplete record stays in the backlog until the rest arrives (or
        the transport ends, see _feed_incoming). A length beyond the TLS
        maximum is fed as is, for OpenSSL to reject with the right alert.
        """
        backlog = self._backlog
        start = self._backlog_start
        available = len(backlog) - start
        if available < _RECORD_HEADER:
            return False
        size = _RECORD_HEADER + (backlog[start + 3] << 8 | backlog[start + 4])
        if size > _MAX_RECORD_SIZE:
            size = available
        elif size > available:
            return False
        end = start + size
        hello = self._info.hello
        if hello is not None:
            # Until the ClientHello is complete, its records are read for the
            # ALPN offer too (TLS-ALPN-01, see gatewayd/clienthello.py).
            hello.feed(self._backlog_view[start:end])
            if hello.done:
                self._info.hello = None
                self._info.offered_alpn = hello.alpn
        self._conn.bio_write(self._backlog_view[start:end])
        if end == len(backlog):
            self._set_backlog(b"")  # an idle connection keeps no chunk
        else:
            self._backlog_start = end
        return True

    async def _retry(
        self,
        fn: Callable[[], T],
        *,
        ignore_want_read: bool = False,
        is_handshake: bool = False,
        input_first: bool = False,
        checkpoint: bool = True,
        stall: float = math.inf,
    ) -> T | None:
        # The trickiest function of gatewayd; trio's SSLStream._retry, adapted
        # to pyOpenSSL. Between calling OpenSSL and starting the one await that
        # makes progress, nothing may yield (see "Theory of operation").
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        finished = False
        result: T | None = None
        while not finished:
            want_read = False
            if input_first:
                # The caller knows fn() would raise WantReadError: as if it had.
                input_first = False
                want_read = True
            else:
                try:
                    result = fn()
                except SSL.WantReadError:
                    want_read = True
                except SSL.Error as exc:
                    self._state = _State.BROKEN
                    await self._send_alert()
                    raise trio.BrokenResourceError(f"TLS error: {_ssl_error_text(exc)}") from exc
                else:
                    finished = True
            if ignore_want_read:
                want_read = False
                finished = True
            to_send = self._take_outgoing()

            # trio issue #819: a TLS 1.3 server's handshake ends by writing
            # session tickets the client is not waiting for. Sending them now
            # could block on a peer that is not reading yet, so they go out in
            # front of our first write instead (as BoringSSL does).
            if (
                is_handshake
                and finished
                and self._server_side
                and self._conn.get_protocol_version_name() == "TLSv1.3"
            ):
                assert self._delayed_outgoing is None
                self._delayed_outgoing = to_send
                to_send = b""

            if to_send and self._transport_eof_sent:
                # After our close_notify and FIN nothing more may be sent (RFC
                # 8446 section 6.1); OpenSSL only produces such bytes when
                # answering post-handshake messages, which is moot now.
                if self._debug:
                    logger.debug("dropping %d TLS bytes produced after send_eof", len(to_send))
                to_send = b""

            # The inner locks are taken without a checkpoint when free (the
            # transport call that follows is the checkpoint; trio's Lock
            # would yield to the scheduler even when free, and a round trip
            # takes four of these). Every branch below that takes a lock
            # then awaits the transport, so `yielded` stays true to its name.
            if to_send:
                # Strict FIFO: output reaches the wire in the order OpenSSL
                # produced it. Once OpenSSL has produced these bytes, failing
                # to send them (error or cancellation, even while waiting for
                # the lock) leaves the TLS stream unrecoverable.
                send_lock = self._inner_send_lock
                try:
                    try:
                        send_lock.acquire_nowait()
                    except trio.WouldBlock:
                        await send_lock.acquire()
                    try:
                        if self._delayed_outgoing is not None:
                            to_send = self._delayed_outgoing + to_send
                            self._delayed_outgoing = None
                        if self._io is not None:
                            # Yields only if the socket buffer was full; the
                            # final checkpoint below covers the other case.
                            if await self._io.send_all(to_send, stall=stall):
                                yielded = True
                        elif stall != math.inf:
                            yielded = True
                            with trio.fail_after(stall):
                                await self.transport_stream.send_all(to_send)
                        else:
                            yielded = True
                            await self.transport_stream.send_all(to_send)
                    finally:
                        send_lock.release()
                except BaseException:
                    if self._state is _State.OK:
                        self._state = _State.BROKEN
                    raise
            elif want_read and self._feed_backlog():
                # Bytes received earlier were waiting; OpenSSL has them now.
                pass
            elif want_read:
                # If another task is already receiving from the transport, we
                # wait for it and retry with what it brought instead of
                # receiving ourselves. (Getting the lock at once means nobody
                # else was receiving, so the count cannot have moved.)
                recv_count = self._inner_recv_count
                recv_lock = self._inner_recv_lock
                try:
                    recv_lock.acquire_nowait()
                except trio.WouldBlock:
                    await recv_lock.acquire()
                try:
                    yielded = True
                    if recv_count == self._inner_recv_count:
                        data: bytes | bytearray
                        if self._io is not None:
                            data = await self._io.receive()
                        else:
                            data = await self.transport_stream.receive_some()
                        self._feed_incoming(data)
                        self._inner_recv_count += 1
                finally:
                    recv_lock.release()
        if not yielded and checkpoint:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def _feed_incoming(self, data: bytes | bytearray) -> None:
        if self._sniff_pending and data:
            self._sniff_pending = False
            if data[0] != _HANDSHAKE_RECORD:
                # Row 2: not a TLS record; OpenSSL never saw it and nothing
                # was sent, so the caller can still answer in plain text.
                self._state = _State.BROKEN
                raise errors.NotTLS(bytes(data))
        if not data:
            # The end: what is left is an incomplete record; OpenSSL gets it
            # anyway, so it reports the truncation.
            self._transport_eof_received = True
            rest = self._backlog[self._backlog_start :]
            if rest:
                self._conn.bio_write(rest)
            self._set_backlog(b"")
            self._conn.bio_shutdown()
            return
        self._estimated_receive_size = max(self._estimated_receive_size, len(data))
        if self._backlog_start < len(self._backlog):
            # The last chunk ended inside a record: join (copies this chunk).
            self._set_backlog(self._backlog[self._backlog_start :] + data)
        else:
            self._set_backlog(bytes(data))
        self._feed_backlog()

    def _set_backlog(self, data: bytes) -> None:
        self._backlog = data
        self._backlog_view = memoryview(data)
        self._backlog_start = 0

    async def _send_alert(self) -> None:
        """After a fatal TLS error, send what OpenSSL queued (the alert), if we can.

        Best effort and bounded: the transport's send side must be free (a
        task blocked sending owns it), and the peer gets CLOSE_NOTIFY_TIMEOUT.
        """
        data = self._take_outgoing()
        if self._delayed_outgoing is not None:
            # Records encrypted earlier must go first, or the peer cannot
            # decrypt the alert (record sequence numbers).
            data = self._delayed_outgoing + data
            self._delayed_outgoing = None
        if not data or self._transport_eof_sent or self._inner_send_lock.locked():
            return
        with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
            async with self._inner_send_lock:
                try:
                    await self.transport_stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    # The peer is gone; the TLS error being raised says why.
                    if self._debug:
                        logger.debug("TLS alert not sent: %r", exc)

    # -- handshake ------------------------------------------------------------

    async def _ensure_handshake(self, *, checkpoint: bool) -> None:
        if self._handshake_done:
            if checkpoint:
                await trio.lowlevel.checkpoint()
            return
        if self._handshake_started:
            await self._handshake_finished.wait()
            if not self._handshake_done:
                self._check_status()
                raise trio.BrokenResourceError("the TLS handshake failed")
            return
        self._handshake_started = True
        try:
            await self._run_handshake()
        finally:
            self._handshake_finished.set()

    async def _run_handshake(self) -> None:
        try:
            await self._retry(self._conn.do_handshake, is_handshake=True)
        except errors.TLSHandshakeFailed:
            self._state = _State.BROKEN
            raise
        except trio.BrokenResourceError as exc:
            self._state = _State.BROKEN
            raise self._handshake_failure(exc) from exc
        except BaseException:
            # Cancelled, or ClosedResourceError because aclose() ran.
            if self._state is _State.OK:
                self._state = _State.BROKEN
            raise
        finally:
            if self._server_side:
                # Known once the ClientHello was read, even if the handshake
                # failed afterwards (the access log wants it).
                raw = self._conn.get_servername()
                self.server_name = _decode_server_name(raw) if raw else None
        conn = self._conn
        if self._server_side:
            host = self._info.host
            if host is not None and host.client_ca is not None:
                try:
                    self.client_subject = _verified_client_subject(conn)
                except errors.ClientCertificateRequired:
                    self._state = _State.BROKEN
                    raise
        self._handshake_done = True
        self.tls_version = conn.get_protocol_version_name()
        self.cipher = conn.get_cipher_name()
        self.alpn_protocol = conn.get_alpn_proto_negotiated().decode("ascii") or None
        if self._server_side:
            self.host = self._info.host
            self.acme_challenge = self._info.acme_challenge
        if self._debug:
            logger.debug(
                "TLS handshake done: sni=%s host=%s version=%s cipher=%s alpn=%s",
                self.server_name,
                self.host.key_path if self.host is not None else None,
                self.tls_version,
                self.cipher,
                self.alpn_protocol,
            )

    def _handshake_failure(self, exc: trio.BrokenResourceError) -> errors.TLSHandshakeFailed:
        """The TLSHandshakeFailed that explains a broken handshake."""
        if self._info.refusal is not None:
            return self._info.refusal
        if self._transport_eof_received:
            return errors.TLSHandshakeFailed(
                "connection closed by the peer during the TLS handshake"
            )
        cause = exc.__cause__
        if isinstance(cause, SSL.Error):
            return errors.TLSHandshakeFailed(f"TLS handshake failed: {_ssl_error_text(cause)}")
        return errors.TLSHandshakeFailed(f"connection broken during the TLS handshake: {exc!r}")

    async def _handshake_for_io(self) -> None:
        """The implicit handshake of the first I/O call; failures break the stream."""
        try:
            await self._ensure_handshake(checkpoint=False)
        except errors.TLSHandshakeFailed as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def do_handshake(self) -> None:
        """Perform the TLS handshake, or wait for the one in progress; idempotent.

        You need not call it: the first I/O call does the handshake. The server
        calls it to apply its handshake deadline (a cancel scope) and to learn
        the chosen host before reading.

        Raises:
            errors.UnknownServerName: SNI names no host and there is no default
                host; the unrecognized_name alert was sent (SPEC row 1).
            errors.NotTLS: the client's first bytes are not TLS (SPEC row 2);
                nothing was sent; ``exc.data`` holds the bytes.
            errors.TLSHandshakeFailed: any other failure: an alert sent or
                received, EOF or reset during the handshake.
            trio.BrokenResourceError: the handshake failed earlier, or was
                cancelled earlier.
            trio.ClosedResourceError: the stream was closed.
        """
        self._check_status()
        await self._ensure_handshake(checkpoint=True)

    # -- I/O ------------------------------------------------------------------

    def _read(self, max_bytes: int) -> bytes:
        """Decrypt up to max_bytes; b"" on close_notify. Raises WantReadError."""
        error = self._pending_read_error
        if error is not None:
            self._pending_read_error = None
            raise error
        try:
            data = self._conn.recv(max_bytes)
        except SSL.ZeroReturnError:
            return b""
        # SSL_read returns one record (16 KiB at most) per call. After a full
        # record, collect the records already buffered so a bulk reader gets
        # big chunks; after a short one (the end of a write) do not bother.
        if len(data) < _MAX_RECORD_PLAINTEXT or len(data) >= max_bytes:
            return data
        chunks = [data]
        total = len(data)
        while total < max_bytes and len(chunks[-1]) >= _MAX_RECORD_PLAINTEXT:
            # The record just read was the only one in the BIO: feed the next
            # one first (no WantReadError round trip), if it has arrived.
            if not self._conn.pending() and not self._feed_backlog():
                break
            try:
                more = self._conn.recv(max_bytes - total)
            except SSL.WantReadError:
                break  # not enough for a record after all
            except SSL.ZeroReturnError:
                break  # the next call reports the EOF
            except SSL.Error as exc:
                # Return the good data first; the error comes next time.
                self._pending_read_error = exc
                break
            chunks.append(more)
            total += len(more)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _write(self, view: memoryview) -> int:
        """Encrypt as much of view as OpenSSL takes now; returns the count."""
        total = 0
        size = len(view)
        while total < size:
            try:
                # One record per call (SSL_MODE_ENABLE_PARTIAL_WRITE), taken
                # out of the BIO at once to keep the BIO small.
                total += self._conn.send(view[total:])
            except SSL.WantReadError:
                if total:
                    # Report progress; the caller retries with the rest, which
                    # is the same data OpenSSL expects (it starts at total).
                    break
                raise
            self._collect_outgoing()
        return total

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive and decrypt some data.

        Returns:
            Between 1 and ``max_bytes`` bytes, or ``b""`` after the peer's
            close_notify.

        Raises:
            trio.BrokenResourceError: EOF without close_notify, peer reset,
                TLS error, or failed handshake (``__cause__`` says which).
            trio.ClosedResourceError: the stream was closed.
            trio.BusyResourceError: another task is receiving.
        """
        with self._outer_recv_conflict:
            if max_bytes is not None:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_status()
            if not self._handshake_done:
                await self._handshake_for_io()
            if max_bytes is None:
                max_bytes = max(self._estimated_receive_size, self._conn.pending())
            data = await self._retry(partial(self._read, max_bytes), input_first=self._input_needed())
            assert data is not None
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``.

        Raises:
            trio.BrokenResourceError: peer reset or gone, TLS error, failed
                handshake; also after a cancelled send_all (the stream cannot
                know how much was sent).
            trio.ClosedResourceError: the stream was closed, or send_eof() was called.
            trio.BusyResourceError: another task is sending.
        """
        await self._send_all(data, checkpoint=True)

    async def send_all_in_loop(
        self, data: bytes | bytearray | memoryview, *, stall: float = math.inf
    ) -> None:
        """:meth:`send_all` for a loop that checkpoints in its receive (the splice).

        The same, except that it does not yield to the scheduler when nothing
        had to wait (a task switch per relayed chunk otherwise), and that it
        raises :class:`trio.TooSlowError` (the stream is then broken) when the
        transport takes nothing for ``stall`` seconds. A caller that sends in
        a loop without receiving must use :meth:`send_all`.
        """
        await self._send_all(data, checkpoint=False, stall=stall)

    async def _send_all(
        self, data: bytes | bytearray | memoryview, *, checkpoint: bool, stall: float = math.inf
    ) -> None:
        with self._outer_send_conflict:
            self._check_send_status()
            if not self._handshake_done:
                await self._handshake_for_io()
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            while view:
                written = await self._retry(
                    partial(self._write, view[:_MAX_WRITE]), checkpoint=checkpoint, stall=stall
                )
                assert written is not None
                view = view[written:]

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport can take data (see trio.abc.SendStream)."""
        with self._outer_send_conflict:
            self._check_send_status()
            # A task in receive_some may be sending on the transport (a
            # post-handshake answer); waiting for the inner lock is right,
            # our send_all could not proceed before that anyway.
            async with self._inner_send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify, then half-close the transport; receiving goes on.

        A second call does nothing. The transport is half-closed only when it
        is a :class:`trio.abc.HalfCloseableStream` (a TCP stream is).
        """
        with self._outer_send_conflict:
            if self._eof_sent and self._state is _State.OK:
                await trio.lowlevel.checkpoint()
                return
            self._check_status()
            await self._handshake_for_io()
            self._eof_sent = True
            await self._retry(self._conn.shutdown, ignore_want_read=True)
            transport = self.transport_stream
            if isinstance(transport, trio.abc.HalfCloseableStream):
                async with self._inner_send_lock:
                    self._transport_eof_sent = True
                    await transport.send_eof()

    async def aclose(self) -> None:
        """Close: send close_notify (best effort, bounded), then close the transport.

        Does not wait for the peer's close_notify. Before a completed handshake,
        and on a broken stream, it just closes the transport. A cancelled
        aclose() still closes the transport. Closing twice is fine.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        transport = self.transport_stream
        try:
            if self._state is _State.OK and self._handshake_done and not self._eof_sent:
                self._eof_sent = True
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT) as scope:
                    try:
                        await self._retry(self._conn.shutdown, ignore_want_read=True)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        # The peer went away first (or the transport was closed
                        # under us); the connection is closed either way.
                        if self._debug:
                            logger.debug("close_notify not sent: %r", exc)
                if scope.cancelled_caught and self._debug:
                    logger.debug("close_notify not sent within %ss", CLOSE_NOTIFY_TIMEOUT)
        except BaseException:
            self._state = _State.CLOSED
            await trio.aclose_forcefully(transport)
            raise
        self._state = _State.CLOSED
        await transport.aclose()


def _bio_pending(bio: Any) -> int:
    """Bytes held by a memory BIO (``BIO_get_mem_data`` with no pointer: its length).

    pyOpenSSL's bio_read reports an empty BIO by raising WantReadError,
    about a microsecond each time, and an empty BIO is the common case.
    """
    return int(_lib.BIO_get_mem_data(bio, _ffi.NULL))


def _decode_server_name(raw: bytes) -> str:
    # SNI carries A-labels (RFC 6066 section 3); anything else cannot name a
    # host, and escaping keeps it printable for the access log.
    return normalize_name(raw.decode("ascii", "backslashreplace"))


# -- contexts -------------------------------------------------------------------


class _SNIContext(SSL.Context):
    """The context every server connection starts with; owns the SNI callback.

    The cffi callback object must live as long as the SSL_CTX that points to
    it, so the context holds it (pyOpenSSL does the same for its own callbacks).
    """

    _gatewayd_servername_callback: object = None


@dataclass(frozen=True)
class _HostTLS:
    context: SSL.Context
    min_version: int
    #: Verify client certificates (``client_ca``): the mode is per connection
    #: in OpenSSL, so the servername callback sets it after the switch.
    verify_clients: bool = False
    #: OCSP responses to staple, by the serial number of the certificate they vouch for.
    staples: dict[int, bytes] | None = None


# Client certificate required and verified once (no renegotiation anyway).
_VERIFY_CLIENTS: Final = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE


def rfc4514_subject(name: x509.Name) -> str:
    """A certificate subject as an RFC 4514 string of printable ASCII only.

    cryptography's ``rfc4514_string`` escapes RFC 4514's special characters
    but passes control characters (CR, LF) and non-ASCII text through; those
    are escaped here as ``\\XX`` hex pairs of their UTF-8 bytes, which RFC
    4514 section 2.4 allows for any character. The result can go in an HTTP
    header as is: no CR, LF or NUL by construction.
    """
    out: list[str] = []
    for char in name.rfc4514_string():
        if 0x20 <= ord(char) < 0x7F:
            out.append(char)
        else:
            out.extend(f"\\{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _verified_client_subject(conn: SSL.Connection) -> str:
    """The verified client certificate's subject; raises ClientCertificateRequired."""
    cert = conn.get_peer_certificate()
    if cert is None:
        raise errors.ClientCertificateRequired("the client presented no certificate")
    if _lib.SSL_get_verify_result(conn._ssl) != _lib.X509_V_OK:
        raise errors.ClientCertificateRequired("the client certificate was not verified")
    return rfc4514_subject(cert.to_cryptography().subject)


def _staple(connection: SSL.Connection, data: object) -> bytes:
    """The OCSP server callback: the response for the certificate being sent, or none."""
    info = connection.get_app_data()
    if not isinstance(info, _HandshakeInfo) or not info.staples:
        return b""
    # OpenSSL has chosen the certificate (RSA or ECDSA) before asking.
    cert = connection.get_certificate()
    if cert is None:
        return b""
    return info.staples.get(cert.get_serial_number(), b"")


class _ServerNameSelector:
    """The servername callback: SNI -> host -> that host's SSL_CTX, or an alert.

    OpenSSL calls it for every ClientHello, with or without SNI, after it has
    chosen the protocol version and before it chooses the cipher and the
    certificate, so switching the SSL_CTX here gives the host's certificate and
    TLS 1.2 cipher list. The minimum version cannot be switched that way, so it
    is enforced here with a protocol_version alert.
    """

    def __init__(
        self,
        table: HostTable,
        hosts: dict[int, _HostTLS],
        challenges: _AcmeChallenges | None = None,
        pending: frozenset[int] = frozenset(),
    ) -> None:
        self._table = table
        self._hosts = hosts
        self._challenges = challenges
        #: id() of the ACME hosts that have no certificate yet.
        self._pending = pending

    def __call__(self, connection: SSL.Connection) -> int | None:
        """Returns None to go on, or the alert to fail the handshake with."""
        info = connection.get_app_data()
        assert isinstance(info, _HandshakeInfo)
        raw = connection.get_servername()
        name = _decode_server_name(raw) if raw else None
        info.host = None
        host = self._table.lookup(name)
        if host is None:
            info.refusal = errors.UnknownServerName(name)
            return _ALERT_UNRECOGNIZED_NAME
        offered = info.offered_alpn or ()
        if ACME_TLS_ALPN in offered:
            # RFC 8737 section 3: a validation for exactly this name gets its
            # challenge certificate; the challenge of another name never.
            context = None
            if self._challenges is not None and host.acme and name in host.names:
                context = self._challenges.context_for(name)
            if context is not None:
                connection.set_context(context)
                info.acme_challenge = True
                info.host = host
                info.refusal = None
                return None
            if b"http/1.1" not in offered:
                info.refusal = errors.TLSHandshakeFailed(
                    f"ACME TLS-ALPN-01 validation for {name}, but no challenge is pending "
                    "for that name"
                )
                return _ALERT_NO_APPLICATION_PROTOCOL
        entry = self._hosts.get(id(host))
        if entry is None and id(host) in self._pending:
            info.refusal = errors.TLSHandshakeFailed(
                f"{host.key_path} ({host.names[0]}) has no certificate yet: "
                "ACME issuance pending"
            )
            return _ALERT_INTERNAL_ERROR
        if entry is None:
            # Only possible when the configuration has no TLS listener and a
            # host without certificate is picked; treat it as unknown.
            logger.warning("%s has no certificate; TLS client refused", host.key_path)
            info.refusal = errors.UnknownServerName(name)
            return _ALERT_UNRECOGNIZED_NAME
        version = connection.get_protocol_version()
        if version < entry.min_version:
            info.refusal = errors.TLSHandshakeFailed(
                f"client negotiated {connection.get_protocol_version_name()} but "
                f"{host.key_path} requires {host.tls.min_version} or later"
            )
            return _ALERT_PROTOCOL_VERSION
        connection.set_context(entry.context)
        if entry.verify_clients:
            connection.set_verify(_VERIFY_CLIENTS)
        info.host = host
        info.staples = entry.staples or {}
        info.refusal = None
        return None


def _log_callback_error(
    exc_type: type[BaseException] | None,
    exc_value: BaseException | None,
    traceback: TracebackType | None,
) -> None:
    # A bug in _ServerNameSelector: it cannot propagate through OpenSSL, so it
    # is logged and the handshake fails (the callback's `error` value).
    logger.error(
        "bug in the TLS servername callback; handshake refused",
        exc_info=exc_value,
    )


def _install_servername_callback(
    context: _SNIContext, select: Callable[[SSL.Connection], int | None]
) -> None:
    """Register ``select`` as the context's servername callback.

    pyOpenSSL's ``set_tlsext_servername_callback`` can only fail a handshake
    by raising from the callback, which prints a traceback through
    ``sys.excepthook`` and cannot choose the alert. OpenSSL's callback
    contract is simple (RFC 6066 section 3 alerts; ``*al`` and
    ``SSL_TLSEXT_ERR_ALERT_FATAL``), so we register our own cffi callback
    through the bindings pyOpenSSL itself uses, and map the ``SSL *`` back to
    its Connection the way pyOpenSSL's wrapper does.
    """

    def on_servername(ssl: Any, alert: Any, arg: Any) -> int:
        connection = SSL.Connection._reverse_mapping[ssl]
        alert_code = select(connection)
        if alert_code is None:
            return int(_lib.SSL_TLSEXT_ERR_OK)
        alert[0] = alert_code
        return int(_lib.SSL_TLSEXT_ERR_ALERT_FATAL)

    callback = _ffi.callback(
        "int (*)(SSL *, int *, void *)",
        on_servername,
        error=_lib.SSL_TLSEXT_ERR_ALERT_FATAL,
        onerror=_log_callback_error,
    )
    _lib.SSL_CTX_set_tlsext_servername_callback(context._context, callback)
    context._gatewayd_servername_callback = callback


def _server_context(
    min_version: int, ciphers: str, context_class: type[SSL.Context] = SSL.Context
) -> SSL.Context:
    """A server context with gatewayd's settings; raises SSL.Error for bad ciphers."""
    context = context_class(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(min_version)
    context.set_max_proto_version(0)  # 0 = the highest OpenSSL supports
    context.set_options(
        SSL.OP_ALL  # OpenSSL's interoperability workarounds, as CPython's ssl enables
        | SSL.OP_NO_COMPRESSION  # CRIME
        | SSL.OP_NO_RENEGOTIATION  # client-initiated renegotiation refused
        | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    # Free the 34 KiB read/write buffers of idle connections (CPython and
    # nginx do the same).
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # TLS 1.2 only; TLS 1.3 suites stay at OpenSSL's defaults, and so do the
    # key exchange groups (X25519 first, then the NIST curves).
    context.set_cipher_list(ciphers.encode("ascii"))
    for groups in _GROUPS:
        if _lib.SSL_CTX_set1_curves_list(context._context, groups) == 1:
            break
    else:  # pragma: no cover - every OpenSSL since 1.1.0 knows these three
        raise SSL.Error("no key exchange group of the Mozilla profiles is available")
    _lib.ERR_clear_error()  # a refused first list leaves an error queued
    context.set_session_id(_SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_alpn_select_callback(_select_alpn)
    # Client certificates only on hosts with client_ca (_host_tls).
    context.set_verify(SSL.VERIFY_NONE)
    # OCSP staples come from the chosen host (_HandshakeInfo.staples); the
    # callback is looked up on the connection's current SSL_CTX, so every
    # context has it.
    context.set_ocsp_server_callback(_staple)
    return context


def _cipher_problem(ciphers: str) -> str | None:
    """Why ``ciphers`` cannot be used as a TLS 1.2 cipher list, or None."""
    try:
        ciphers.encode("ascii")
    except UnicodeEncodeError:
        return f"cipher list {ciphers!r} is not ASCII"
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        probe.set_cipher_list(ciphers.encode("ascii"))
    except SSL.Error:
        return f"no cipher matches {ciphers!r} (OpenSSL cipher list syntax, e.g. 'ECDHE+AESGCM')"
    return None


def _read_pem_file(path: Path, what: str) -> tuple[bytes | None, str | None]:
    try:
        return path.read_bytes(), None
    except FileNotFoundError:
        return None, f"{what} file not found: {path}"
    except IsADirectoryError:
        return None, f"{what} file is a directory: {path}"
    except OSError as exc:
        return None, f"cannot read {what} file {path}: {exc.strerror or exc}"


def _load_certificates(path: Path) -> tuple[list[x509.Certificate], str | None]:
    data, problem = _read_pem_file(path, "certificate")
    if data is None:
        return [], problem
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        return [], f"{path} is not a PEM certificate file (expected '-----BEGIN CERTIFICATE-----')"
    return chain, None


# The key types a TLS server can sign with (DSA is gone from TLS 1.3).
_TLSPrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def _load_private_key(path: Path) -> tuple[_TLSPrivateKey | None, str | None]:
    data, problem = _read_pem_file(path, "private key")
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


class ServerTLS:
    """Per-generation TLS state: one ``OpenSSL.SSL.Context`` per ``[[host]]``, chosen by SNI.

    Built by :meth:`from_config` when a configuration is loaded or reloaded;
    connections accepted afterwards are wrapped with :meth:`wrap`. Established
    connections keep the generation they started with (their contexts stay
    alive as long as they do).

    Sessions (TLS 1.3 tickets, TLS 1.2 tickets and session IDs) resume across
    the SNI switch: one ticket key and one session cache per generation, so a
    client offering host A's session to host B would resume it (RFC 8446
    section 4.6.1 forbids clients to do so). A reload starts a new key and
    cache: clients do one full handshake after it.
    """

    def __init__(
        self,
        config: Config,
        hosts: HostTable,
        context: SSL.Context,
        host_contexts: dict[int, _HostTLS],
    ) -> None:
        """Use :meth:`from_config`."""
        self.config = config
        self.hosts = hosts
        self._context = context
        self._host_contexts = host_contexts

    @classmethod
    def from_config(cls, config: Config) -> ServerTLS:
        """Build contexts for every host of ``config`` that has a certificate.

        Reads each certificate file (PEM: leaf, then its chain) and private key,
        checks that they load and that the key matches the leaf, and applies
        the host's effective ``min_version`` and ``ciphers``.

        Raises:
            errors.ConfigErrors: every problem found, each a ConfigError naming
                the file and key path (``host[1].certificate``,
                ``host[1].private_key``, ``host[1].ciphers``; ``tls.ciphers``
                when the ``[tls]`` default itself is bad).
        """
        file = str(config.path)
        problems: list[errors.ConfigError] = []

        def problem(key_path: str, message: str) -> None:
            problems.append(errors.ConfigError(file, key_path, message))

        default_cipher_problem = _cipher_problem(config.tls.ciphers)
        if default_cipher_problem is not None:
            problem("tls.ciphers", default_cipher_problem)

        hosts: dict[int, _HostTLS] = {}
        pending: set[int] = set()
        store = Store(config.acme.state_dir) if config.acme is not None else None
        for host in config.hosts:
            if host.acme and store is not None:
                acme_entry = _acme_host_tls(host, config, store)
                if acme_entry is None:
                    pending.add(id(host))
                else:
                    hosts[id(host)] = acme_entry
                continue
            entry = _host_tls(host, config, default_cipher_problem is not None, problem)
            if entry is not None:
                hosts[id(host)] = entry
        if problems:
            raise errors.ConfigErrors(problems)

        # The context connections start with: it only carries the settings
        # OpenSSL reads before the servername callback (the lowest minimum
        # version of all hosts, options, session ID context); certificates
        # and cipher lists come from the host contexts after the switch.
        versions = [entry.min_version for entry in hosts.values()]
        lowest = min(versions) if versions else _PROTOCOL_VERSIONS[config.tls.min_version]
        context = _server_context(lowest, config.tls.ciphers, _SNIContext)
        assert isinstance(context, _SNIContext)
        table = HostTable(config.hosts)
        challenges = (
            _AcmeChallenges(store, config.tls.ciphers)
            if store is not None and config.acme_hosts
            else None
        )
        _install_servername_callback(
            context, _ServerNameSelector(table, hosts, challenges, frozenset(pending))
        )
        return cls(config, table, context, hosts)

    def wrap(self, transport: trio.abc.Stream) -> TLSStream:
        """Server-side TLS stream over an accepted connection (handshake not done).

        Args:
            transport: the accepted TCP stream (any trio Stream works).
        """
        return TLSStream(transport, self._context, server_side=True)


def _host_tls(
    host: HostConfig,
    config: Config,
    default_ciphers_bad: bool,
    problem: Callable[[str, str], None],
) -> _HostTLS | None:
    """Load one host's certificate and key into a context; report problems."""
    key_path = host.key_path
    if host.certificate is None:
        if config.needs_tls:
            problem(f"{key_path}.certificate", "required when a listener has tls = true")
        return None
    settings: TLSSettings = host.tls
    ok = True

    min_version = _PROTOCOL_VERSIONS.get(settings.min_version)
    if min_version is None:
        problem(
            f"{key_path}.min_version",
            f"unknown TLS version {settings.min_version!r} (use 'TLSv1.2' or 'TLSv1.3')",
        )
        ok = False

    if settings.ciphers == config.tls.ciphers:
        if default_ciphers_bad:
            ok = False  # already reported once, as tls.ciphers
    else:
        cipher_problem = _cipher_problem(settings.ciphers)
        if cipher_problem is not None:
            problem(f"{key_path}.ciphers", cipher_problem)
            ok = False

    # The main pair, then the extra ones (certificates = [...]).
    pairs: list[tuple[str, Path, Path]] = []
    if host.private_key is None:
        problem(f"{key_path}.private_key", "required with certificate")
        ok = False
        cert_problem = _load_certificates(host.certificate)[1]
        if cert_problem is not None:
            problem(f"{key_path}.certificate", cert_problem)
    else:
        pairs.append((key_path, host.certificate, host.private_key))
    pairs += [(pair.key_path, pair.certificate, pair.private_key) for pair in host.certificates]
    loaded: list[tuple[str, Path, list[x509.Certificate], _TLSPrivateKey]] = []
    key_types: dict[str, str] = {}
    for where, cert_file, key_file in pairs:
        pair = _load_pair(where, cert_file, key_file, problem)
        if pair is None:
            ok = False
            continue
        chain, key = pair
        kind = _key_kind(key)
        if kind in key_types:
            problem(
                f"{where}.certificate",
                f"a second {kind} certificate ({cert_file}; {key_types[kind]} has one): "
                "OpenSSL holds one certificate per key type (RSA, ECDSA, Ed25519, Ed448), "
                "chosen by what the client supports",
            )
            ok = False
            continue
        key_types[kind] = where
        loaded.append((where, cert_file, chain, key))

    staples: dict[int, bytes] = {}
    if host.ocsp_response is not None and loaded:
        staple = _load_ocsp_response(host.ocsp_response, [chain[0] for _, _, chain, _ in loaded])
        if isinstance(staple, str):
            problem(f"{key_path}.ocsp_response", staple)
            ok = False
        elif staple is not None:
            staples[staple[0]] = staple[1]

    if host.client_ca is not None:
        ca_problem = _load_certificates(host.client_ca)[1]
        if ca_problem is not None:
            problem(f"{key_path}.client_ca", ca_problem.replace("certificate file", "CA file"))
            ok = False
    if not ok or min_version is None or not loaded:
        return None

    context = _server_context(min_version, settings.ciphers)
    try:
        for _, cert_file, _, key in loaded:
            # Per certificate: its own chain (an ECDSA leaf and an RSA leaf
            # usually have different intermediates), then its key, which
            # OpenSSL files under the key's type beside the others.
            context.use_certificate_chain_file(str(cert_file))
            context.use_privatekey(key)
            context.check_privatekey()
        if host.client_ca is not None:
            # RFC 8446 section 4.3.2: certificate_authorities tells the client
            # which certificates we accept; verification uses the same file.
            context.load_verify_locations(str(host.client_ca))
            context.load_client_ca(str(host.client_ca).encode())
            context.set_session_id(
                _MTLS_SESSION_PREFIX + hashlib.sha256(
                    f"{key_path}:{host.client_ca}".encode()
                ).digest()[:16]
            )
    except SSL.Error as exc:
        problem(
            f"{key_path}.certificate",
            f"OpenSSL refused the certificate or key: {_ssl_error_text(exc)}",
        )
        return None

    now = datetime.now(timezone.utc)
    for where, cert_file, chain, _ in loaded:
        leaf = chain[0]
        if leaf.not_valid_after_utc < now:
            logger.warning(
                "%s: certificate %s expired on %s",
                where,
                cert_file,
                leaf.not_valid_after_utc.isoformat(),
            )
        elif leaf.not_valid_before_utc > now:
            logger.warning(
                "%s: certificate %s is not valid before %s",
                where,
                cert_file,
                leaf.not_valid_before_utc.isoformat(),
            )
    return _HostTLS(
        context=context,
        min_version=min_version,
        verify_clients=host.client_ca is not None,
        staples=staples,
    )


def _acme_host_tls(host: HostConfig, config: Config, store: Store) -> _HostTLS | None:
    """An ACME host's context from its certificate in state_dir; None while it has none.

    A stored file that is unreadable or refused by OpenSSL counts as none
    (logged): the manager issues a new one.
    """
    stored = store.load_certificate(host.names[0])
    if stored is None:
        return None
    min_version = _PROTOCOL_VERSIONS.get(host.tls.min_version, SSL.TLS1_2_VERSION)
    try:
        context = _server_context(min_version, host.tls.ciphers)
        _use_stored(context, stored)
    except SSL.Error as exc:
        logger.warning(
            "%s: the ACME certificate %s is refused by OpenSSL (%s); it will be reissued",
            host.key_path,
            stored.path,
            _ssl_error_text(exc),
        )
        return None
    return _HostTLS(context=context, min_version=min_version)


def _use_stored(context: SSL.Context, stored: StoredCertificate) -> None:
    """Load a certificate file of the ACME store (key, leaf, chain) into ``context``."""
    key = serialization.load_pem_private_key(stored.key_pem, password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        raise SSL.Error(f"unusable key type {type(key).__name__}")
    context.use_certificate(stored.leaf)
    for extra in stored.chain[1:]:
        context.add_extra_chain_cert(extra)
    context.use_privatekey(key)
    context.check_privatekey()


class _AcmeChallenges:
    """TLS-ALPN-01 challenge contexts, from the answers the ACME leader publishes in state_dir.

    Read when a validation's ClientHello arrives (rare), so a challenge
    published by another process is seen at once; a context is built once
    per published answer.
    """

    def __init__(self, store: Store, ciphers: str) -> None:
        self._store = store
        self._ciphers = ciphers
        self._contexts: dict[str, tuple[bytes, SSL.Context]] = {}

    def context_for(self, name: str) -> SSL.Context | None:
        try:
            pem = self._store.tls_alpn01_answer(name)
        except OSError as exc:
            logger.warning("cannot read the ACME challenge for %s: %s", name, exc)
            pem = None
        if pem is None:
            self._contexts.pop(name, None)
            return None
        cached = self._contexts.get(name)
        if cached is not None and cached[0] == pem:
            return cached[1]
        start = pem.find(b"-----BEGIN CERTIFICATE-----")
        try:
            certificate = x509.load_pem_x509_certificate(pem[start:])
            key = serialization.load_pem_private_key(pem[pem.find(b"-----BEGIN PRIVATE KEY-----") :], password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("not an EC key")
            context = _server_context(SSL.TLS1_2_VERSION, self._ciphers)
            context.use_certificate(certificate)
            context.use_privatekey(key)
        except (ValueError, SSL.Error) as exc:
            logger.warning("the ACME challenge for %s is unusable: %s", name, exc)
            return None
        self._contexts[name] = (pem, context)
        return context


def _load_pair(
    where: str, cert_file: Path, key_file: Path, problem: Callable[[str, str], None]
) -> tuple[list[x509.Certificate], _TLSPrivateKey] | None:
    """Load one certificate file and its key and check they match; report problems."""
    chain, cert_problem = _load_certificates(cert_file)
    if cert_problem is not None:
        problem(f"{where}.certificate", cert_problem)
    key, key_problem = _load_private_key(key_file)
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


def _key_kind(key: _TLSPrivateKey) -> str:
    """The OpenSSL certificate slot a key goes to."""
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    return "Ed448"


def _load_ocsp_response(
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
