"""The TLS stream: :class:`TLSStream`, TLS over any trio stream through OpenSSL memory BIOs.

Server-side streams come from :meth:`gatewayd.tls.context.ServerTLS.wrap`
(which chooses the host's context by SNI, see :mod:`gatewayd.tls.context`);
client-side streams (tests, benchmarks) are built directly. The private
pyOpenSSL calls this engine needs are in :mod:`gatewayd.tls._openssl`.

Wire behaviour (SPEC section 3, rows 1 and 2), as seen from the stream:

* Row 1: when SNI names no host, the handshake fails with the
  ``unrecognized_name`` alert (RFC 6066 section 3) and
  :meth:`TLSStream.do_handshake` raises :class:`~gatewayd.errors.UnknownServerName`.
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
# _retry(fn) is the one place that drives OpenSSL (its steps are the methods
# _output_to_send, _send_output and _receive_input). It loops:
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
# happens inside OpenSSL's servername callback (gatewayd.tls.context), which
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
import logging
import math
import operator
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final, NamedTuple, TypeVar

import trio
from cryptography import x509
from OpenSSL import SSL

from gatewayd import errors
from gatewayd.clienthello import ClientHelloReader
from gatewayd.config import HostConfig
from gatewayd.routing import normalize_name
from gatewayd.sockio import socket_io
from gatewayd.tls._openssl import client_verified, incoming_pending, outgoing_pending
from gatewayd.transport import LoopIO, LoopStream

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "CLOSE_NOTIFY_TIMEOUT",
    "Detached",
    "HandshakeInfo",
    "TLSStream",
    "decode_server_name",
    "rfc4514_subject",
    "ssl_error_text",
]

# One logger for the package: "gatewayd.tls" in every log line, as before the split.
logger = logging.getLogger("gatewayd.tls")

T = TypeVar("T")


#: Seconds aclose() spends trying to send close_notify (and a failed
#: handshake spends sending its alert) before closing the transport anyway:
#: a peer that does not read for this long gets a bare TCP close.
CLOSE_NOTIFY_TIMEOUT: Final = 3.0

# First receive size guess for receive_some() without max_bytes (trio's value);
# afterwards the largest chunk the transport returned is used.
_STARTING_RECEIVE_SIZE: Final = 16384

# At most this much plaintext is encrypted per trip to the transport: one
# full TLS record, sent before the next is made. A destination that stops
# reading then holds one record of ciphertext besides the caller's data,
# not four (bounded memory for stalled peers; the size nginx writes too,
# its ssl_buffer_size).
_MAX_WRITE: Final = 16384

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

# Ciphertext asked of the transport per receive: one largest record. What a
# receiver does not take yet waits in the kernel's buffer, not in ours: a
# reader that stops (the splice's pump waiting on a stalled destination)
# leaves at most one record received and not decrypted here.
_TRANSPORT_RECEIVE: Final = _MAX_RECORD_SIZE

# RFC 8446 section 5.1: ContentType.handshake. A ClientHello starts with it.
_HANDSHAKE_RECORD: Final = 0x16


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


class HandshakeInfo:
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
        #: Server side, until the ClientHello is complete: reads its ALPN offer.
        self.hello: ClientHelloReader | None = None
        #: The ALPN protocols the ClientHello offered (None: it could not be read).
        self.offered_alpn: tuple[bytes, ...] | None = None
        #: The TLS-ALPN-01 challenge certificate was chosen (RFC 8737).
        self.acme_challenge = False


def ssl_error_text(exc: SSL.Error) -> str:
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


class Detached(NamedTuple):
    """What :meth:`TLSStream.detach` hands over.

    Attributes:
        conn: the established OpenSSL connection, its memory BIOs empty.
        plaintext: application data already decrypted (to pass on first).
        ending: what followed it: None, "eof" (close_notify), or a failure's text.
    """

    conn: SSL.Connection
    plaintext: bytes
    ending: str | None


class TLSStream(trio.abc.HalfCloseableStream, LoopStream):
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
        "client_subject", "acme_challenge",
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
        self.acme_challenge = False

        self._server_side = server_side
        self._state = _State.OK
        self._info = HandshakeInfo()
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
        self._io = socket_io(transport_stream)

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
        while outgoing_pending(self._conn):
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
            and not incoming_pending(conn)
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
            # Until the ClientHello is complete its records are also read for
            # the ALPN offer, which the servername callback needs to answer
            # TLS-ALPN-01 (see gatewayd/clienthello.py).
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
        """Call ``fn`` (an OpenSSL operation) until it is done, moving bytes as it asks.

        The trickiest function of gatewayd; trio's ``SSLStream._retry``, adapted
        to pyOpenSSL. Each turn of the loop is the three steps of "Theory of
        operation": call OpenSSL, take its output, make progress with exactly
        one step (send the output, or feed OpenSSL a record already received,
        or receive from the transport). Between calling OpenSSL and starting
        the one await that makes progress, nothing may yield.

        Args:
            fn: the OpenSSL call; it may raise WantReadError (more input needed).
            ignore_want_read: done even if fn wants input (shutdown: we do not
                wait for the peer's close_notify).
            is_handshake: fn is the handshake (TLS 1.3 tickets are held back).
            input_first: the caller knows fn() would want input: receive first.
            checkpoint: yield once at the end if nothing else did; False for
                a loop that checkpoints in its receive (send_all_in_loop).
            stall: raise TooSlowError when the transport takes nothing for this long.

        Returns:
            What fn returned (None when ``ignore_want_read`` cut it short).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        result: T | None = None
        while True:
            # 1. Call OpenSSL (synchronously: its state is shared).
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
                    raise trio.BrokenResourceError(f"TLS error: {ssl_error_text(exc)}") from exc
                else:
                    want_read = False
            if ignore_want_read:
                want_read = False
            finished = not want_read
            # 2. Take what it wrote.
            to_send = self._output_to_send(end_of_handshake=is_handshake and finished)
            # 3. One step of progress: output first (wire order), else input.
            if to_send:
                if await self._send_output(to_send, stall):
                    yielded = True
            elif want_read and not self._feed_backlog():
                # No whole record received earlier is waiting: go to the transport.
                await self._receive_input()
                yielded = True
            if finished:
                break
        if not yielded and checkpoint:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def _output_to_send(self, *, end_of_handshake: bool) -> bytes:
        """The ciphertext OpenSSL produced that goes to the wire now (step 2)."""
        to_send = self._take_outgoing()
        if end_of_handshake and self._server_side and self._conn.get_protocol_version_name() == "TLSv1.3":
            # trio issue #819: a TLS 1.3 server's handshake ends by writing
            # session tickets the client is not waiting for. Sending them now
            # could block on a peer that is not reading yet, so they go out in
            # front of our first write instead (as BoringSSL does).
            assert self._delayed_outgoing is None
            self._delayed_outgoing = to_send
            return b""
        if to_send and self._transport_eof_sent:
            # After our close_notify and FIN nothing more may be sent (RFC
            # 8446 section 6.1); OpenSSL only produces such bytes when
            # answering post-handshake messages, which is moot now.
            if self._debug:
                logger.debug("dropping %d TLS bytes produced after send_eof", len(to_send))
            return b""
        return to_send

    # The inner locks below are taken without a checkpoint when free (the
    # transport call that follows is the checkpoint; trio's Lock would yield
    # to the scheduler even when free, and a round trip takes four of these).

    async def _send_output(self, to_send: bytes, stall: float) -> bool:
        """Send what OpenSSL produced, under the inner send lock; returns whether it yielded.

        Strict FIFO: output reaches the wire in the order OpenSSL produced
        it. Once OpenSSL has produced these bytes, failing to send them
        (error or cancellation, even while waiting for the lock) leaves the
        TLS stream unrecoverable.
        """
        send_lock = self._inner_send_lock
        yielded = False
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
                    # Yields only if the socket buffer was full; the caller's
                    # final checkpoint covers the other case.
                    yielded = await self._io.send_all(to_send, stall=stall)
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
        return yielded

    async def _receive_input(self) -> None:
        """Receive one chunk from the transport and feed it, under the inner receive lock.

        If another task is already receiving from the transport, we wait for
        it and let the caller retry with what it brought instead of receiving
        ourselves. (Getting the lock at once means nobody else was receiving,
        so the count cannot have moved.) Always yields.
        """
        recv_count = self._inner_recv_count
        recv_lock = self._inner_recv_lock
        try:
            recv_lock.acquire_nowait()
        except trio.WouldBlock:
            await recv_lock.acquire()
        try:
            if recv_count == self._inner_recv_count:
                data: bytes | bytearray
                if self._io is not None:
                    data = await self._io.receive(_TRANSPORT_RECEIVE)
                else:
                    data = await self.transport_stream.receive_some(_TRANSPORT_RECEIVE)
                self._feed_incoming(data)
                self._inner_recv_count += 1
        finally:
            recv_lock.release()

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
                self.server_name = decode_server_name(raw) if raw else None
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
            return errors.TLSHandshakeFailed(f"TLS handshake failed: {ssl_error_text(cause)}")
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

    def loop_io(self) -> LoopIO:
        """For the splice: :meth:`receive_some` and :meth:`send_all_in_loop`."""
        return LoopIO(self.receive_some, self.send_all_in_loop)

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

    async def detach(self) -> Detached:
        """Hand OpenSSL over to the data plane (gatewayd/dataplane.py); the stream is done after.

        After the handshake, with no other call in progress: sends what
        OpenSSL still holds for the peer (TLS 1.3 session tickets held back,
        anything queued), feeds OpenSSL every byte received and not yet fed
        (the backlog; a PROXY reader's leftover, ``take_prefix``), and reads
        out all the plaintext OpenSSL can decrypt from it: application data
        that came with the client's Finished or right behind its request must
        not stay behind in a memory BIO that is about to go. A partial record
        moves into OpenSSL's own record buffer and is completed from the
        socket later. The memory BIOs are then empty, so
        :class:`gatewayd.tls._openssl.BoundTLS` can put the socket in their
        place. The stream's transport is left open (the caller takes its
        socket); closing the stream afterwards does nothing.

        Raises:
            trio.BrokenResourceError: the stream was broken, or sending failed.
        """
        with self._outer_send_conflict, self._outer_recv_conflict:
            self._check_send_status()
            if not self._handshake_done:
                raise trio.BrokenResourceError("the TLS handshake is not done")
            conn = self._conn
            transport = self.transport_stream
            take_prefix = getattr(transport, "take_prefix", None)
            if take_prefix is not None:
                prefix = take_prefix()
                if prefix:
                    conn.bio_write(prefix)
            rest = self._backlog[self._backlog_start :]
            if rest:
                conn.bio_write(rest)
            self._set_backlog(b"")
            chunks: list[bytes] = []
            ending: str | None = None
            error = self._pending_read_error
            self._pending_read_error = None
            while error is None:
                try:
                    chunks.append(conn.recv(_MAX_RECORD_PLAINTEXT))
                except SSL.WantReadError:
                    break
                except SSL.ZeroReturnError:
                    ending = "eof"
                    break
                except SSL.Error as exc:
                    error = exc
            if error is not None:
                ending = f"TLSError: {ssl_error_text(error)}"
            output = self._take_outgoing()
            if self._delayed_outgoing is not None:
                output = self._delayed_outgoing + output
                self._delayed_outgoing = None
            if output:
                async with self._inner_send_lock:
                    try:
                        await transport.send_all(output)
                    except BaseException:
                        self._state = _State.BROKEN
                        raise
            if incoming_pending(conn) or outgoing_pending(conn):
                # Cannot happen (see above); refuse rather than lose bytes.
                self._state = _State.BROKEN
                raise trio.BrokenResourceError("TLS bytes left in a memory BIO at the handover")
            self._state = _State.CLOSED
            return Detached(conn, b"".join(chunks), ending)

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


def decode_server_name(raw: bytes) -> str:
    # SNI carries A-labels (RFC 6066 section 3); anything else cannot name a
    # host, and escaping keeps it printable for the access log.
    return normalize_name(raw.decode("ascii", "backslashreplace"))



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
    text = "".join(out)
    if text.endswith(" "):
        # A trailing space (RFC 4514 escapes it as "\ ") would be cut off as
        # header whitespace (RFC 9110 section 5.5); its hex pair form is kept.
        text = text[:-1].removesuffix("\\") + "\\20"
    return text


def _verified_client_subject(conn: SSL.Connection) -> str:
    """The verified client certificate's subject; raises ClientCertificateRequired."""
    cert = conn.get_peer_certificate()
    if cert is None:
        raise errors.ClientCertificateRequired("the client presented no certificate")
    if not client_verified(conn):
        raise errors.ClientCertificateRequired("the client certificate was not verified")
    return rfc4514_subject(cert.to_cryptography().subject)

