"""The data plane: every spliced connection of a process, driven from one epoll set.

Theory of operation
-------------------
trio keeps everything up to the 101: accept, the PROXY header, the TLS
handshake, the request phase, reload and signals. Once a connection is
spliced, :meth:`DataPlane.splice` takes it over: its two sockets leave trio
(the fds are detached from trio's socket objects), TLS leaves the memory BIOs
(:meth:`gatewayd.tls.stream.TLSStream.detach`: what the BIOs held is fed to
OpenSSL or returned as plaintext, then OpenSSL is bound to the socket with
``SSL_set_fd``, :class:`gatewayd.tls._openssl.BoundTLS`), and the connection
keeps no trio task, cancel scope or trio socket. One trio task per process,
:meth:`DataPlane.run`, waits for the epoll fd to become readable
(``trio.lowlevel.wait_readable``), then serves every ready connection in one
batch, synchronously, and goes back to waiting: trio's scheduler runs once
per batch instead of several times per message.

A connection is a :class:`Tunnel` with two ends (:class:`_End`: a socket,
and for a TLS client its :class:`BoundTLS`) and two flows (:class:`_Flow`,
client to backend and back). A flow is a small state machine: it reads from
its source into the plane's one shared buffer and writes straight to its
destination; what the destination does not take at once stays in the flow
(``pending``: one read's worth at most, the only memory a stalled direction
holds) and the flow reads nothing more until it is written. Every flow waits
for exactly one thing: its source to be readable, its destination to be
writable, or - for TLS, where a read may need to write (a KeyUpdate answer)
and a write may need to read - the other readiness of the same socket.
An end's epoll interest is what its flows wait for. An end nobody waits for
is *unregistered*, not masked: EPOLLHUP and EPOLLERR cannot be masked, so a
level-triggered set holding a paused end would report its hang-up for ever
and spin. Interest changes only when a flow's wait changes (a paused or
resumed direction), so a steady echo makes no epoll_ctl call at all.

The set is level-triggered: a flow reads at most :data:`BURST` times per
event and epoll reports the rest next time, which keeps one busy connection
from starving the others and needs no list of connections with work left.
OpenSSL's record layer holds no ciphertext between reads (no read-ahead:
it reads a record's header, then its body, from the socket), so an empty
socket really means nothing more to read.

Semantics are SPEC section 4's, as :mod:`gatewayd.splice` implements them for
streams that cannot leave trio (a ``wss://`` backend, test streams): end of
stream is passed on as a half-close (a TLS close_notify and a FIN towards a
client, a FIN towards a backend), the other direction keeps flowing until it
ends too; a failure on either side ends the tunnel at once, named after that
side; EOF without close_notify from a TLS client is a failure unless the other
direction had already ended cleanly. Counters and end reasons are the same
(:class:`gatewayd.splice.SpliceStats`).

Timers: each tunnel has one deadline, the earliest of its idle deadline
(``idle_timeout`` after the last byte either way), its half-close deadline,
its stall deadline (``splice.STALL_TIMEOUT`` after a flow's destination last
took a byte) and the gateway's close time (``max_connection_age``, the
shutdown drain). They live in one heap, lazily: moving the idle deadline
later (every chunk) is one store, not a heap operation; an entry that comes
due is checked against the tunnel's real deadline and pushed again if that is
later. O(1) per event, O(log n) per timer that fires or is re-armed.

Ending a tunnel closes both sockets at once (a best-effort close_notify to a
TLS client first, if none was sent), unregisters them and calls the
tunnel's ``on_end`` with the end reason (None: closed by the gateway's close
time, which the connection names ``shutdown`` or ``max_age``). When the plane
itself is cancelled (the end of the shutdown drain) it ends every tunnel as
``shutdown``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import select
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

import trio

from gatewayd import splice
from gatewayd.record import End
from gatewayd.splice import SpliceStats
from gatewayd.tls._openssl import WANTS_READ, WANTS_WRITE, BoundTLS, TLSFailure, buffer_pointer
from gatewayd.tls.stream import TLSStream
from gatewayd.wsbridge import CHUNK, IDLE_GRACE, BridgeEngine

__all__ = ["BURST", "READ_SIZE", "BridgeTunnel", "DataPlane", "Handover", "Tunnel", "can_take", "take_over"]

logger = logging.getLogger("gatewayd.dataplane")

#: Bytes one read asks for: two TLS records' worth of plaintext, and the most a
#: stalled direction holds (bench/stalled.py: 64 KiB held ~2× nginx's per connection).
READ_SIZE: Final = 32768
#: Reads one flow makes per event before letting the others have a turn.
BURST: Final = 4
#: A full TLS record's plaintext: a read that returned less emptied the socket's
#: ready records (for now), so the flow stops reading instead of asking again.
_RECORD: Final = 16384

#: After going away (close 1001) the client has this long to answer (= connection.CLOSE_SECONDS).
_CLOSE_SECONDS: Final = 5.0

_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
_HUP_ERR: Final = select.EPOLLHUP | select.EPOLLERR


class _Failure(Exception):
    """One end failed; the message is the log text ("ConnectionResetError: ...")."""


@dataclass(slots=True)
class Handover:
    """One end of a connection, taken from trio: its socket, TLS, what was already read.

    Attributes:
        sock: the connected, non-blocking socket (owned by the data plane now).
        tls: OpenSSL on that socket, for a TLS client; else None.
        data: bytes already read from this end and not yet passed on (the
            plaintext left in the TLS memory BIOs, a PROXY reader's leftover).
        ending: what came after ``data``: None (nothing yet), "eof" (a clean
            end of stream), or the text of the failure that followed it.
    """

    sock: socket.socket
    tls: BoundTLS | MemoryTLS | None = None
    data: bytes = b""
    ending: str | None = None


class MemoryTLS:
    """A ``wss://`` backend's TLS (the standard library's, over memory BIOs) in the data plane.

    The backend's handshake and 101 ran through ``trio.SSLStream``; its
    ``ssl.SSLObject`` and memory BIOs carry on here, driven synchronously:
    a read feeds the incoming BIO from the socket until a record decrypts,
    a write encrypts into the outgoing BIO and sends what the socket takes.
    Ciphertext the socket did not take waits in :attr:`output` (its end is
    registered for writing until it is out; the next write waits for it).
    Records received beyond what a read returned stay in the BIO, where
    epoll cannot see them: :meth:`buffered` tells the plane to come back
    without waiting (its ready list).

    (The standard library's ssl cannot be moved onto the socket, unlike
    OpenSSL through pyOpenSSL, :class:`BoundTLS`.)
    """

    __slots__ = ("_incoming", "_obj", "_outgoing", "_shut_sent", "_sock", "output")

    def __init__(
        self, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, sock: socket.socket
    ) -> None:
        self._obj = obj
        self._incoming = incoming
        self._outgoing = outgoing
        self._sock = sock
        self._shut_sent = False
        #: Ciphertext produced and not yet taken by the socket.
        self.output = b""

    def buffered(self) -> bool:
        """Whether a read could return data without the socket (decrypted or undecrypted bytes held)."""
        return bool(self._incoming.pending or self._obj.pending())

    def flush(self) -> bool:
        """Send held ciphertext; True once none is left. Raises TLSFailure."""
        if self._outgoing.pending:
            self.output += self._outgoing.read()
        output = self.output
        if not output:
            return True
        try:
            sent = self._sock.send(output)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise TLSFailure(f"{type(exc).__name__}: {exc}") from None
        self.output = output[sent:]
        return not self.output

    def read(self, view: memoryview, size: int) -> int:
        """Decrypt into ``view``: the count, 0 after close_notify, or WANTS_READ / WANTS_WRITE."""
        obj = self._obj
        while True:
            try:
                # With a buffer, read() returns the count (typeshed says bytes).
                count = cast(int, obj.read(size, view))
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLError as exc:
                raise TLSFailure(exc.reason or str(exc)) from None
            else:
                if self._outgoing.pending and not self.flush():
                    pass  # a post-handshake answer; its end waits to be writable
                return count
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return WANTS_READ
            except OSError as exc:
                raise TLSFailure(f"{type(exc).__name__}: {exc}") from None
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt and send: the count taken, or WANTS_WRITE while earlier ciphertext waits."""
        if self.output and not self.flush():
            return WANTS_WRITE
        try:
            count = self._obj.write(data)
        except ssl.SSLError as exc:
            raise TLSFailure(exc.reason or str(exc)) from None
        self.flush()
        return count

    def shutdown(self) -> int:
        """close_notify, then 0 once it is sent (WANTS_WRITE until then)."""
        if not self._shut_sent:
            self._shut_sent = True
            try:
                self._obj.unwrap()
            except ssl.SSLWantReadError:
                pass  # the peer's close_notify is not awaited (RFC 8446 section 6.1)
            except ssl.SSLError as exc:
                raise TLSFailure(exc.reason or str(exc)) from None
        return 0 if self.flush() else WANTS_WRITE


#: trio.SSLStream's private attributes a wss:// backend's handover uses (see missing_trio_names).
_SSLSTREAM_ATTRIBUTES: Final = ("_ssl_object", "_incoming", "_outgoing", "_state")


def missing_trio_names(stream: trio.SSLStream[trio.SocketStream]) -> list[str]:
    """The private trio.SSLStream attributes the handover needs that this trio lacks (tests check)."""
    return [name for name in _SSLSTREAM_ATTRIBUTES if not hasattr(stream, name)]


def _take_stdlib_tls(stream: trio.SSLStream[trio.SocketStream], sock: socket.socket) -> Handover:
    """A wss:// backend's TLS, after its 101: what the BIOs hold is read out now."""
    obj: ssl.SSLObject = stream._ssl_object
    tls = MemoryTLS(obj, stream._incoming, stream._outgoing, sock)
    chunks: list[bytes] = []
    ending: str | None = None
    while tls.buffered():
        try:
            chunks.append(obj.read(65536))
        except ssl.SSLWantReadError:
            break
        except ssl.SSLZeroReturnError:
            ending = "eof"
            break
        except ssl.SSLError as exc:
            ending = f"TLSError: {exc.reason or exc}"
            break
    return Handover(sock, tls, b"".join(chunks), ending)


def _socket_source(stream: trio.abc.Stream) -> trio.SocketStream | None:
    """The trio socket stream under ``stream`` if the plane can take it over, else None."""
    if isinstance(stream, TLSStream):
        stream = stream.transport_stream
    elif isinstance(stream, trio.SSLStream):
        if missing_trio_names(stream):
            return None
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        return stream
    inner = getattr(stream, "transport_stream", None)
    if hasattr(stream, "take_prefix") and isinstance(inner, trio.SocketStream):
        return inner  # a PROXY-protocol ReplayStream
    return None


def can_take(*streams: trio.abc.Stream) -> bool:
    """Whether every one of ``streams`` can leave trio (TCP or Unix sockets, our TLS on them)."""
    return all(_socket_source(stream) is not None for stream in streams)


def _detach(source: trio.SocketStream) -> socket.socket:
    fd = source.socket.detach()
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


async def take_over(stream: trio.abc.Stream) -> Handover:
    """Take ``stream`` out of trio (check :func:`can_take` first); the stream is unusable after.

    A TLS stream first sends what OpenSSL still holds for the peer and gives
    up what its memory BIOs hold (:meth:`TLSStream.detach`).
    """
    source = _socket_source(stream)
    assert source is not None
    if isinstance(stream, TLSStream):
        detached = await stream.detach()
        sock = _detach(source)
        return Handover(sock, BoundTLS(detached.conn, sock.fileno()), detached.plaintext, detached.ending)
    if isinstance(stream, trio.SSLStream):
        return _take_stdlib_tls(stream, _detach(source))
    prefix = b""
    take_prefix = getattr(stream, "take_prefix", None)
    if take_prefix is not None:
        prefix = take_prefix()
    return Handover(_detach(source), None, prefix)


class _End:
    """One side of a tunnel: a socket, OpenSSL on it for a TLS client, its epoll interest."""

    __slots__ = ("fd", "mask", "mtls", "name", "shut", "sock", "tls", "tunnel")

    def __init__(self, tunnel: Tunnel | BridgeTunnel, handover: Handover, name: str) -> None:
        self.tunnel = tunnel
        self.sock = handover.sock
        self.fd = handover.sock.fileno()
        tls = handover.tls
        #: OpenSSL on the socket (a TLS client), or the standard library's TLS
        #: over memory BIOs (a wss:// backend); at most one of the two.
        self.tls = tls if isinstance(tls, BoundTLS) else None
        self.mtls = tls if isinstance(tls, MemoryTLS) else None
        self.name = name
        #: The epoll interest registered now (0: not registered).
        self.mask = 0
        #: Whether its write side was shut (EOF passed on).
        self.shut = False

    def read(self, plane: DataPlane, size: int = READ_SIZE) -> int:
        """Read into the plane's buffer: the count, 0 at the end, or WANTS_READ / WANTS_WRITE."""
        mtls = self.mtls
        if mtls is not None:
            try:
                count = mtls.read(plane.view, size)
            except TLSFailure as exc:
                self.shut = True  # no close_notify after a fatal error
                raise _Failure(f"TLSError: {exc}") from None
            if count > 0 and mtls.buffered():
                plane.mark_ready(self)
            return count
        tls = self.tls
        if tls is not None:
            try:
                count = tls.read(plane.pointer, size)
                if count < _RECORD:
                    return count
                # A full record: a bulk sender; take what else is ready.
                total = count
                while total <= size - _RECORD:
                    count = tls.read(plane.pointer + total, size - total)
                    if count <= 0:
                        # The end or an error is reported by the next read.
                        break
                    total += count
                    if count < _RECORD:
                        break
                return total
            except TLSFailure as exc:
                self.shut = True  # no close_notify after a fatal error
                raise _Failure(f"TLSError: {exc}") from None
        try:
            return self.sock.recv_into(plane.view, size)
        except BlockingIOError:
            return WANTS_READ
        except OSError as exc:
            raise _Failure(f"{type(exc).__name__}: {exc}") from None

    def write(self, data: memoryview | bytes | bytearray) -> int:
        """Write from ``data``: the count taken, or WANTS_WRITE / WANTS_READ."""
        mtls = self.mtls
        if mtls is not None:
            try:
                return mtls.write(data)
            except TLSFailure as exc:
                self.shut = True  # no close_notify after a fatal error
                raise _Failure(f"TLSError: {exc}") from None
        tls = self.tls
        if tls is not None:
            # One record per SSL_write (ENABLE_PARTIAL_WRITE): go on until all
            # is taken or the socket is full, so a short count means full.
            try:
                count = tls.write(data)
                size = len(data)
                if count <= 0 or count == size:
                    return count
                view = memoryview(data)
                total = count
                while total < size:
                    count = tls.write(view[total:])
                    if count <= 0:
                        break
                    total += count
                return total
            except TLSFailure as exc:
                self.shut = True  # no close_notify after a fatal error
                raise _Failure(f"TLSError: {exc}") from None
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return WANTS_WRITE
        except OSError as exc:
            raise _Failure(f"{type(exc).__name__}: {exc}") from None

    def shutdown(self) -> int:
        """Pass the end of stream on: close_notify (TLS), then FIN. 0 when done, or WANTS_*."""
        tls: BoundTLS | MemoryTLS | None = self.tls or self.mtls
        if tls is not None:
            try:
                result = tls.shutdown()
            except TLSFailure as exc:
                self.shut = True  # no close_notify after a fatal error
                raise _Failure(f"TLSError: {exc}") from None
            if result:
                return result
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _Failure(f"{type(exc).__name__}: {exc}") from None
        self.shut = True
        return 0

    def flush(self) -> None:
        """Send what a wss:// backend's TLS holds (ciphertext no write is waiting for)."""
        if self.mtls is not None:
            try:
                self.mtls.flush()
            except TLSFailure as exc:
                self.shut = True  # no close_notify after a fatal error
                raise _Failure(f"TLSError: {exc}") from None

    def close(self) -> None:
        tls: BoundTLS | MemoryTLS | None = self.tls or self.mtls
        if tls is not None and not self.shut:
            # Best effort, never waiting: a close_notify if the socket takes it.
            try:
                tls.shutdown()
            except TLSFailure:
                pass
        self.sock.close()


# A flow's states: what it waits for (see the module doc).
_READ: Final = 1       # data from its source
_WRITE: Final = 2      # its destination to take ``pending``
_SHUT: Final = 3       # its destination to take the end of stream
_DONE: Final = 4


class _Flow:
    """One direction of a tunnel: source -> destination."""

    __slots__ = (
        "counted", "dst", "pending", "src", "stalled_at", "state", "tunnel", "upstream", "wait_end", "wait_mask",
    )

    def __init__(self, tunnel: Tunnel, src: _End, dst: _End, upstream: bool) -> None:
        self.tunnel = tunnel
        self.src = src
        self.dst = dst
        self.upstream = upstream
        self.state = _READ
        #: Bytes read and not yet taken by the destination (None: nothing).
        self.pending: memoryview | None = None
        #: When the destination last took a byte while ``pending`` waited.
        self.stalled_at = math.inf
        # What the flow waits for: an end and EPOLLIN or EPOLLOUT.
        self.wait_end: _End | None = src
        self.wait_mask = _IN
        #: Bytes at the start of ``pending`` that the access record counted already.
        self.counted = 0

    def _count(self, count: int) -> None:
        if self.counted:
            # Bytes counted before the handover (the client's early bytes).
            skip = min(self.counted, count)
            self.counted -= skip
            count -= skip
        tunnel = self.tunnel
        if self.upstream:
            tunnel.stats.bytes_up += count
        else:
            tunnel.stats.bytes_down += count
        tunnel.last_active = tunnel.plane.now

    def run(self) -> None:
        """Make all the progress possible now (a failure ends the tunnel)."""
        if self.state == _WRITE and not self._flush():
            return
        if self.state == _SHUT:
            self._pass_eof()
            return
        if self.state != _READ:
            return
        tunnel = self.tunnel
        if tunnel.pre_ending:
            ending = tunnel.pre_ending.pop(self.upstream, None)
            if ending is not None:
                # The source had ended before the handover; its data is out now.
                if ending == "eof":
                    self._source_ended()
                else:
                    tunnel.fail(self.src.name, ending, reading=True)
                return
        src, dst, plane = self.src, self.dst, tunnel.plane
        view = plane.view
        for _ in range(BURST):
            try:
                count = src.read(plane)
            except _Failure as exc:
                tunnel.fail(src.name, str(exc), reading=True)
                return
            if count > 0:
                try:
                    written = dst.write(view[:count])
                except _Failure as exc:
                    tunnel.fail(dst.name, str(exc))
                    return
                if written == count:
                    self._count(count)
                    if count < READ_SIZE:
                        # A short read emptied the socket (for now): epoll
                        # says when there is more, without a read that fails.
                        break
                    continue
                if written > 0:
                    self._count(written)
                    self.pending = memoryview(bytes(view[written:count]))
                else:
                    self.pending = memoryview(bytes(view[:count]))
                self._wait_write(written)
                return
            if count == 0:
                self._source_ended()
                return
            self.wait_end = src
            self.wait_mask = _IN if count == WANTS_READ else _OUT
            return
        self.wait_end = src
        self.wait_mask = _IN

    def _wait_write(self, result: int) -> None:
        self.state = _WRITE
        self.wait_end = self.dst
        self.wait_mask = _IN if result == WANTS_READ else _OUT
        tunnel = self.tunnel
        self.stalled_at = tunnel.plane.now
        tunnel.plane.arm(tunnel, self.stalled_at + tunnel.stall)

    def _flush(self) -> bool:
        """Write ``pending``; True once all of it is taken."""
        pending = self.pending
        assert pending is not None
        try:
            written = self.dst.write(pending)
        except _Failure as exc:
            self.tunnel.fail(self.dst.name, str(exc))
            return False
        if written == len(pending):
            self._count(written)
            self.pending = None
            self.stalled_at = math.inf
            self.state = _READ
            self.wait_end = self.src
            self.wait_mask = _IN
            return True
        if written > 0:
            self._count(written)
            self.pending = pending[written:]
            self.stalled_at = self.tunnel.plane.now
            self.wait_mask = _OUT
        else:
            self.wait_mask = _IN if written == WANTS_READ else _OUT
        return False

    def _source_ended(self) -> None:
        self.tunnel.first_eof(self.src.name)
        self.state = _SHUT
        self._pass_eof()

    def _pass_eof(self) -> None:
        try:
            result = self.dst.shutdown()
        except _Failure as exc:
            # Only the end of stream could not be delivered (the peer had
            # already closed): nothing is lost, an ordinary end.
            self.tunnel.fail(self.dst.name, str(exc), reading=True)
            return
        if result:
            self.wait_end = self.dst
            self.wait_mask = _IN if result == WANTS_READ else _OUT
            return
        self.state = _DONE
        self.wait_end = None
        self.wait_mask = 0
        self.tunnel.flow_done()

    def start(self, data: bytes, ending: str | None) -> None:
        """Begin with what the source gave before the handover."""
        if data:
            self.pending = memoryview(data)
            self.state = _WRITE
            self.wait_end = self.dst
            self.wait_mask = _OUT
        if ending is not None:
            self.tunnel.pre_ending[self.upstream] = ending


def _ended(end: End | None) -> None:
    """The ``on_end`` of a tunnel that has ended (it is called once)."""


class Tunnel:
    """One spliced connection in the data plane (see the module doc)."""

    __slots__ = (
        "armed", "client", "backend", "closing_at", "ended", "first", "half_close", "half_until",
        "idle", "last_active", "on_end", "plane", "pre_ending", "stall", "stats", "up", "down",
    )

    def __init__(
        self,
        plane: DataPlane,
        client: Handover,
        backend: Handover,
        stats: SpliceStats,
        idle: float,
        half_close: float,
        on_end: Callable[[End | None], None],
    ) -> None:
        self.plane = plane
        self.stats = stats
        self.on_end = on_end
        self.idle = idle if idle > 0 else math.inf
        self.half_close = half_close if half_close > 0 else math.inf
        self.stall = splice.STALL_TIMEOUT
        self.half_until = math.inf
        self.closing_at = math.inf
        self.last_active = plane.now
        self.armed = math.inf
        self.ended = False
        #: Which side's end of stream came first ("" until one did).
        self.first = ""
        #: What followed the bytes handed over, by direction (True: upstream).
        self.pre_ending: dict[bool, str] = {}
        self.client = _End(self, client, "client")
        self.backend = _End(self, backend, "backend")
        self.up = _Flow(self, self.client, self.backend, True)
        self.down = _Flow(self, self.backend, self.client, False)

    # -- the deadline -----------------------------------------------------------

    def deadline(self) -> float:
        when = min(self.closing_at, self.last_active + self.idle, self.half_until)
        for flow in (self.up, self.down):
            if flow.pending is not None:
                when = min(when, flow.stalled_at + self.stall)
        return when

    def expire(self, now: float) -> None:
        """The deadline came: end the tunnel the way the earliest bound says."""
        if self.closing_at <= now:
            self.end(None)
            return
        for flow in (self.up, self.down):
            if flow.pending is not None and flow.stalled_at + self.stall <= now:
                name = flow.dst.name
                self.fail(name, f"TimeoutError: {name} read nothing for {self.stall:g}s")
                return
        if self.half_until <= now:
            self.end(End.HALF_CLOSE_TIMEOUT)
        else:
            self.end(End.IDLE_TIMEOUT)

    def close_at(self, deadline: float, end: End = End.SHUTDOWN) -> None:
        """End the tunnel at ``deadline`` (trio time) at the latest (max age, drain).

        (``end`` is for the bridge's close frame; a splice's end is named by its connection.)
        """
        if deadline < self.closing_at and not self.ended:
            self.closing_at = deadline
            self.plane.arm(self, deadline)

    # -- ends -------------------------------------------------------------------

    def first_eof(self, side: str) -> None:
        if not self.first:
            self.first = side
            if self.half_close != math.inf:
                self.half_until = self.plane.now + self.half_close
                self.plane.arm(self, self.half_until)

    def flow_done(self) -> None:
        if self.up.state == _DONE and self.down.state == _DONE:
            self.end(End.BACKEND_CLOSE if self.first == "backend" else End.CLIENT_CLOSE)

    def fail(self, side: str, text: str, *, reading: bool = False) -> None:
        """End the tunnel as ``side``'s failure (see splice._Splice.fail for ``reading``)."""
        stats = self.stats
        if stats.end is None:
            stats.end = splice.failure_end(side, self.first, reading=reading)
            stats.error = f"{side}: {text}"
        self.end(stats.end)

    def end(self, end: End | None) -> None:
        if self.ended:
            return
        self.ended = True
        if end is not None and self.stats.end is None:
            self.stats.end = end
        self.stats._first_eof = self.first
        plane = self.plane
        plane.forget(self)
        on_end = self.on_end
        # Its buffers and OpenSSL go now, not when its last timer entry does.
        self.up.pending = self.down.pending = None
        self.client.tls = self.backend.tls = None
        self.on_end = _ended
        try:
            on_end(end)
        except Exception:
            logger.exception("internal error while ending a spliced connection")

    # -- events -----------------------------------------------------------------

    def start(self) -> None:
        self.up.run()
        if not self.ended:
            self.down.run()
        if not self.ended:
            self.plane.update(self)

    def masks(self) -> tuple[int, int]:
        """The epoll interest of the client's and the backend's socket: what the flows wait for."""
        up, down = self.up, self.down
        client = backend = 0
        if up.wait_end is self.client:
            client = up.wait_mask
        elif up.wait_end is self.backend:
            backend = up.wait_mask
        if down.wait_end is self.client:
            client |= down.wait_mask
        elif down.wait_end is self.backend:
            backend |= down.wait_mask
        mtls = self.backend.mtls
        if mtls is not None and mtls.output:
            backend |= _OUT
        return client, backend

    def on_event(self, end: _End, events: int) -> None:
        # A flow runs when what it waits for came (or the socket failed): a
        # write is not retried on a mere readable event, which would push
        # bytes into a stalled peer's window below its wake-up threshold.
        up, down = self.up, self.down
        if end.mtls is not None and end.mtls.output and events & _OUT:
            try:
                end.flush()
            except _Failure as exc:
                self.fail(end.name, str(exc))
                return
        if up.wait_end is end and events & (up.wait_mask | _HUP_ERR):
            up.run()
        if down.wait_end is end and events & (down.wait_mask | _HUP_ERR) and not self.ended:
            down.run()
        if not self.ended:
            self.plane.update(self)


class BridgeTunnel:
    """One ``tcp://`` bridged connection in the data plane: the sockets and timers of a
    :class:`gatewayd.wsbridge.BridgeEngine`, which makes every WebSocket decision.

    After every event it carries out what the engine asks, as long as
    something moves: write ``to_client`` / ``to_backend``, shut or close the
    backend, shut the client, feed what the sockets give while the engine
    wants it (the engine's ``wants_*`` are the backpressure), and end the
    tunnel once the engine is done and its output is written. An end is
    read only while it may have data (``readable``: set by its epoll event,
    cleared when a read finds nothing), so a message costs no failed read.
    """

    __slots__ = (
        "armed", "backend", "backend_open", "backend_stalled_at", "client", "client_stalled_at",
        "closing_at", "closing_end", "ended", "engine", "hard_at", "idle", "last_active", "on_end",
        "plane", "readable", "stall", "stats", "timer_at", "wants", "writable",
    )

    def __init__(
        self,
        plane: DataPlane,
        client: Handover,
        backend: Handover,
        stats: SpliceStats,
        engine: BridgeEngine,
        idle: float,
        on_end: Callable[[End | None], None],
    ) -> None:
        self.plane = plane
        self.stats = stats
        self.engine = engine
        self.on_end = on_end
        self.idle = idle if idle > 0 else math.inf
        self.stall = splice.STALL_TIMEOUT
        self.last_active = plane.now
        self.closing_at = math.inf
        self.closing_end = End.SHUTDOWN
        #: The hard end after going away: the client had CLOSE_SECONDS to answer.
        self.hard_at = math.inf
        #: The engine's timer (``closing_deadline_wanted``).
        self.timer_at = math.inf
        self.client_stalled_at = math.inf
        self.backend_stalled_at = math.inf
        self.armed = math.inf
        self.ended = False
        self.backend_open = True
        self.client = _End(self, client, "client")
        self.backend = _End(self, backend, "backend")
        #: Per end (client, backend): may it have data to read?
        self.readable = [True, True]
        #: Per end: may it take bytes? (cleared when a write is short or refused)
        self.writable = [True, True]
        #: Per end: the epoll bit each operation waits for (TLS may cross them):
        #: [client read, client write, backend read, backend write].
        self.wants = [_IN, _OUT, _IN, _OUT]

    # -- timers -----------------------------------------------------------------------

    def deadline(self) -> float:
        return min(
            self.closing_at, self.hard_at, self.timer_at, self.last_active + self.idle,
            self.client_stalled_at + self.stall, self.backend_stalled_at + self.stall,
        )

    def close_at(self, deadline: float, end: End = End.SHUTDOWN) -> None:
        """Go away (close 1001) at ``deadline``; cut CLOSE_SECONDS later at the latest."""
        if deadline < self.closing_at and not self.ended:
            self.closing_at = deadline
            self.closing_end = end
            self.plane.arm(self, deadline)

    def expire(self, now: float) -> None:
        engine = self.engine
        if self.hard_at <= now:
            self.end(None)
            return
        if self.closing_at <= now:
            self.closing_at = math.inf
            self.hard_at = now + _CLOSE_SECONDS
            engine.go_away(self.closing_end)
        if self.timer_at <= now:
            self.timer_at = math.inf
            engine.close_timed_out()
        if self.client_stalled_at + self.stall <= now:
            self.client_stalled_at = math.inf
            engine.client_error(f"TimeoutError: client read nothing for {self.stall:g}s")
        if self.backend_stalled_at + self.stall <= now:
            self.backend_stalled_at = math.inf
            engine.backend_error(f"TimeoutError: backend read nothing for {self.stall:g}s")
        if self.last_active + self.idle <= now:
            # Close 1001, and the hard stop IDLE_GRACE later (as bridge.Bridge).
            self.idle = math.inf
            self.hard_at = min(self.hard_at, now + IDLE_GRACE)
            engine.go_away(End.IDLE_TIMEOUT)
        self.pump()

    # -- events -----------------------------------------------------------------------

    def start(self, client: Handover) -> None:
        if client.data:
            self.engine.client_data(client.data)
        if client.ending == "eof":
            self.engine.client_eof()
        elif client.ending is not None:
            self.engine.client_error(client.ending)
        self.pump()

    def on_event(self, end: _End, events: int) -> None:
        index = 1 if end is self.backend else 0
        wants = self.wants
        read_bit, write_bit = wants[2 * index], wants[2 * index + 1]
        if events & (read_bit | _HUP_ERR):
            self.readable[index] = True
        if events & (write_bit | _HUP_ERR):
            self.writable[index] = True
        self.pump()

    def pump(self) -> None:  # noqa: C901  (one pass over the engine's outputs and inputs)
        """Carry out what the engine asks and feed it, while anything moves; then the interest."""
        engine, client, backend, plane = self.engine, self.client, self.backend, self.plane
        readable, writable, wants = self.readable, self.writable, self.wants
        for _ in range(16):
            moved = False
            out = engine.to_client
            if out and writable[0]:
                size = len(out)
                try:
                    written = client.write(out)
                except _Failure as exc:
                    engine.client_error(str(exc))
                    written = 0
                if written > 0:
                    del out[:written]
                    moved = True
                    if written < size:
                        writable[0] = False  # a short write: the socket is full
                    self.client_stalled_at = math.inf if not out else plane.now
                elif written < 0:
                    writable[0] = False
                    wants[1] = _IN if written == WANTS_READ else _OUT
                    if self.client_stalled_at == math.inf:
                        self.client_stalled_at = plane.now
                        plane.arm(self, plane.now + self.stall)
            if not engine.to_client and engine.shut_client and not client.shut:
                try:
                    result = client.shutdown()
                except _Failure:
                    client.shut = True  # the client is gone: nothing more to send it
                    result = 0
                if result:
                    wants[1] = _IN if result == WANTS_READ else _OUT
            if self.backend_open:
                tcp = engine.to_backend
                if tcp and writable[1]:
                    try:
                        written = backend.write(tcp)
                    except _Failure as exc:
                        engine.backend_error(str(exc))
                        written = 0
                    if written > 0:
                        del tcp[:written]
                        moved = True
                        if tcp:
                            writable[1] = False  # a short write: the socket is full
                        self.backend_stalled_at = math.inf if not tcp else plane.now
                    elif written < 0:
                        writable[1] = False
                        if self.backend_stalled_at == math.inf:
                            self.backend_stalled_at = plane.now
                            plane.arm(self, plane.now + self.stall)
                if engine.close_backend and not engine.to_backend:
                    self.backend_open = False
                    plane.close_end(backend)
                elif engine.shut_backend and not engine.to_backend and not backend.shut:
                    try:
                        backend.shutdown()
                    except _Failure:
                        backend.shut = True  # it had gone: the client's data has nowhere to go
            if engine.done and (not engine.to_client or client.shut) and (
                not engine.to_backend or not self.backend_open
            ):
                self.end(engine.end)
                return
            if readable[0] and engine.wants_client_data and self._feed(
                0, client, READ_SIZE, _RECORD, engine.client_data, engine.client_eof, engine.client_error
            ):
                moved = True
            if self.backend_open and readable[1] and engine.wants_backend_data and self._feed(
                1, backend, CHUNK, CHUNK, engine.backend_data, engine.backend_eof, engine.backend_error
            ):
                moved = True
            if not moved:
                break
        wanted = engine.closing_deadline_wanted
        if wanted is not None:
            engine.closing_deadline_wanted = None
            when = plane.now + wanted
            if when < self.timer_at:
                self.timer_at = when
                plane.arm(self, when)
        plane.update(self)

    def _feed(
        self,
        index: int,
        end: _End,
        size: int,
        short: int,
        data: Callable[[bytes], None],
        eof: Callable[[], None],
        error: Callable[[str], None],
    ) -> bool:
        """Read one end (0: client, 1: backend) into the engine; True if anything moved.

        A read shorter than ``short`` emptied the socket for now: epoll
        reports more, without a read that fails first.
        """
        plane = self.plane
        try:
            count = end.read(plane, size)
        except _Failure as exc:
            self.readable[index] = False
            error(str(exc))
            return True
        if count > 0:
            data(bytes(plane.view[:count]))
            self.last_active = plane.now
            if count < short:
                self.readable[index] = False
            return True
        self.readable[index] = False
        if count == 0:
            eof()
            return True
        self.wants[2 * index] = _IN if count == WANTS_READ else _OUT
        return False

    def masks(self) -> tuple[int, int]:
        engine, wants = self.engine, self.wants
        client = backend = 0
        if engine.to_client or (engine.shut_client and not self.client.shut):
            client = wants[1]
        if engine.wants_client_data and not self.readable[0]:
            client |= wants[0]
        if self.backend_open:
            if engine.to_backend:
                backend = _OUT
            if engine.wants_backend_data and not self.readable[1]:
                backend |= _IN
        return client, backend

    def end(self, end: End | None) -> None:
        if self.ended:
            return
        self.ended = True
        engine, stats = self.engine, self.stats
        stats.bytes_up = engine.bytes_up
        stats.bytes_down = engine.bytes_down
        if engine.end is not None:
            stats.end = engine.end
        elif end is not None:
            stats.end = end
        stats.error = engine.error
        plane = self.plane
        plane.forget(self)
        self.client.tls = self.backend.tls = None
        on_end = self.on_end
        self.on_end = _ended
        try:
            on_end(end if engine.end is None else engine.end)
        except Exception:
            logger.exception("internal error while ending a bridged connection")


class DataPlane:
    """The spliced connections of this process and the one task that drives them."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._ends: dict[int, _End] = {}
        self._tunnels: set[Tunnel | BridgeTunnel] = set()
        self._heap: list[tuple[float, int, Tunnel | BridgeTunnel]] = []
        #: Entries of ended tunnels still in the heap.
        self._stale = 0
        self._seq = itertools.count()
        self._wait: trio.CancelScope | None = None
        self._buffer = bytearray(READ_SIZE)
        #: The shared read buffer, as a memoryview and as a cffi ``char *``.
        self.view = memoryview(self._buffer)
        self.pointer = buffer_pointer(self._buffer)
        #: Ends with bytes their TLS holds beyond what a read returned (a
        #: wss:// backend's memory BIO): served again before the next wait.
        self._ready: list[_End] = []
        #: trio time, read once per batch.
        self.now = 0.0
        self.running = False

    def __len__(self) -> int:
        return len(self._tunnels)

    # -- taking connections over ---------------------------------------------------

    def splice(
        self,
        client: Handover,
        backend: Handover,
        stats: SpliceStats,
        *,
        idle_timeout: float,
        half_close_timeout: float,
        on_end: Callable[[End | None], None],
        counted_up: int = 0,
    ) -> Tunnel:
        """Splice ``client`` and ``backend`` from now on; ``on_end`` is called once when it ends.

        ``client.data`` goes to the backend first and ``backend.data`` to the
        client; ``counted_up`` of the former's first bytes are not counted
        again in ``stats.bytes_up`` (the request head's reader counted them).
        """
        assert self.running and self._epoll is not None
        self.now = trio.current_time()
        tunnel = Tunnel(self, client, backend, stats, idle_timeout, half_close_timeout, on_end)
        self._tunnels.add(tunnel)
        self._ends[tunnel.client.fd] = tunnel.client
        self._ends[tunnel.backend.fd] = tunnel.backend
        tunnel.up.start(client.data, client.ending)
        tunnel.up.counted = counted_up
        tunnel.down.start(backend.data, backend.ending)
        self.arm(tunnel, tunnel.deadline())
        try:
            tunnel.start()
        except Exception:
            logger.exception("internal error on a spliced connection")
            tunnel.end(End.ERROR)
        return tunnel

    def bridge(
        self,
        client: Handover,
        backend: Handover,
        stats: SpliceStats,
        *,
        max_message_size: int,
        early: bytes,
        idle_timeout: float,
        half_close_timeout: float,
        on_end: Callable[[End | None], None],
    ) -> BridgeTunnel:
        """Bridge ``client`` (WebSocket) and ``backend`` (bytes) from now on (gatewayd.wsbridge)."""
        assert self.running and self._epoll is not None
        self.now = trio.current_time()
        engine = BridgeEngine(max_message_size, early, half_close_timeout=half_close_timeout)
        tunnel = BridgeTunnel(self, client, backend, stats, engine, idle_timeout, on_end)
        self._tunnels.add(tunnel)
        self._ends[tunnel.client.fd] = tunnel.client
        self._ends[tunnel.backend.fd] = tunnel.backend
        self.arm(tunnel, tunnel.deadline())
        try:
            tunnel.start(client)
        except Exception:
            logger.exception("internal error on a bridged connection")
            tunnel.end(End.ERROR)
        return tunnel

    # -- epoll interest ---------------------------------------------------------------

    def update(self, tunnel: Tunnel | BridgeTunnel) -> None:
        """Register each end for what its flows wait for (unregister an end nobody waits for)."""
        epoll = self._epoll
        assert epoll is not None
        client_mask, backend_mask = tunnel.masks()
        for end, mask in ((tunnel.client, client_mask), (tunnel.backend, backend_mask)):
            if mask != end.mask:
                if not mask:
                    epoll.unregister(end.fd)
                elif not end.mask:
                    epoll.register(end.fd, mask)
                else:
                    epoll.modify(end.fd, mask)
                end.mask = mask

    def forget(self, tunnel: Tunnel | BridgeTunnel) -> None:
        """Unregister and close both ends of an ended tunnel."""
        self._tunnels.discard(tunnel)
        if tunnel.armed != math.inf:
            # Its heap entry is stale now; rebuild the heap once most are.
            self._stale += 1
            if self._stale > 64 and self._stale * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].ended]
                heapq.heapify(self._heap)
                self._stale = 0
        for end in (tunnel.client, tunnel.backend):
            self.close_end(end)

    def close_end(self, end: _End) -> None:
        """Unregister and close one end (its fd may be reused at once)."""
        if end.mask and self._epoll is not None:
            try:
                self._epoll.unregister(end.fd)
            except OSError:
                pass
            end.mask = 0
        if end.sock.fileno() < 0:
            return
        if self._ends.get(end.fd) is end:
            del self._ends[end.fd]
        try:
            end.close()
        except OSError:
            pass

    def mark_ready(self, end: _End) -> None:
        """Serve ``end`` again in the next batch, without waiting for epoll."""
        self._ready.append(end)

    # -- timers ---------------------------------------------------------------------

    def arm(self, tunnel: Tunnel | BridgeTunnel, when: float) -> None:
        """Make sure the tunnel is looked at by ``when`` (see "Timers")."""
        if when < tunnel.armed:
            tunnel.armed = when
            heapq.heappush(self._heap, (when, next(self._seq), tunnel))
            wait = self._wait
            if wait is not None and when < wait.deadline:
                wait.deadline = when

    def _expire(self) -> None:
        now = self.now
        while self._heap and self._heap[0][0] <= now:
            # (self._heap, not a local: ending a tunnel may rebuild it)
            when, _, tunnel = heapq.heappop(self._heap)
            if tunnel.ended:
                self._stale = max(0, self._stale - 1)
                continue
            if when != tunnel.armed:
                continue
            tunnel.armed = math.inf
            deadline = tunnel.deadline()
            if deadline <= now:
                try:
                    tunnel.expire(now)
                except Exception:
                    logger.exception("internal error on a spliced connection")
                    tunnel.end(End.ERROR)
            elif deadline != math.inf:
                self.arm(tunnel, deadline)

    # -- the task -------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every spliced connection until cancelled; then end them all as ``shutdown``."""
        epoll = select.epoll()
        self._epoll = epoll
        self.running = True
        task_status.started()
        ends = self._ends
        try:
            while True:
                if self._ready:
                    # Bytes held in a memory BIO: let the others run, then
                    # serve them with whatever epoll has.
                    await trio.lowlevel.checkpoint()
                else:
                    deadline = self._heap[0][0] if self._heap else math.inf
                    with trio.move_on_at(deadline) as wait:
                        self._wait = wait
                        await trio.lowlevel.wait_readable(epoll.fileno())
                    self._wait = None
                self.now = trio.current_time()
                for fd, events in epoll.poll(0, 512):
                    end = ends.get(fd)
                    if end is None or end.tunnel.ended:
                        continue
                    tunnel = end.tunnel
                    try:
                        tunnel.on_event(end, events)
                    except Exception:
                        logger.exception("internal error on a spliced connection")
                        tunnel.end(End.ERROR)
                if self._ready:
                    ready, self._ready = self._ready, []
                    for end in ready:
                        tunnel = end.tunnel
                        if tunnel.ended:
                            continue
                        try:
                            tunnel.on_event(end, _IN)
                        except Exception:
                            logger.exception("internal error on a spliced connection")
                            tunnel.end(End.ERROR)
                if self._heap and self._heap[0][0] <= self.now:
                    self._expire()
        finally:
            self.running = False
            self._wait = None
            for tunnel in list(self._tunnels):
                tunnel.end(End.SHUTDOWN)
            self._heap.clear()
            self._ready.clear()
            self._epoll = None
            epoll.close()
