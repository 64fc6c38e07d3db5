"""Socket I/O for the hot path: a trio SocketStream's receive and send, without the per-call toll.

Theory of operation
-------------------
trio's socket methods try the system call first; when it succeeds they still
yield to the scheduler once (so that every call is a checkpoint), and when it
would block they raise and catch ``BlockingIOError`` before waiting. A small
WebSocket message crossing the gateway costs four such calls (receive from
the client, send to the backend, receive the echo, send it back): profiled
under load, trio's machinery around them was about half of the gateway's CPU
(docs/performance.md). :class:`SocketIO` does the same work with fewer steps:

* ``receive`` waits for readability *first* when the last read drained the
  socket (the common case between small messages: no failed ``recv``, no
  exception), and reads at once after a full read (bulk data is probably
  there already). Either way it is a checkpoint: it waits, or it yields once
  after data that was already there (shielded, as trio does after a
  successful call, so the data is never lost to a cancellation), so a loop
  of ``receive`` then ``send_all`` can never starve other tasks.
* ``send_all`` writes at once and waits only while the kernel's buffer is
  full. It does **not** yield when nothing blocked: callers (the splice's
  pumps, :class:`~gatewayd.tls.TLSStream`) call ``receive`` or checkpoint
  themselves in the same loop. It returns whether it waited.

Together they are the :class:`~gatewayd.transport.LoopIO` of a plain TCP
stream (:func:`gatewayd.transport.loop_io`).

Errors are the SocketStream ones: :class:`trio.ClosedResourceError` for a
closed socket or after ``send_eof``, :class:`trio.BrokenResourceError`
(the ``OSError`` as ``__cause__``) for everything else. One task at a time
per direction, as with any trio stream (the callers guarantee it).
"""

from __future__ import annotations

import math
import os

import trio

#: Bytes asked for per read when the caller does not say (trio's default too).
DEFAULT_RECEIVE_SIZE = 65536


class SocketIO:
    """Lean receive/send on the socket of one :class:`trio.SocketStream`."""

    __slots__ = ("_socket", "_drained")

    def __init__(self, stream: trio.SocketStream) -> None:
        self._socket = stream.socket
        # Whether the last read left the socket (probably) empty.
        self._drained = True

    def _fileno(self) -> int:
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("socket was already closed")
        return fd

    async def receive(self, max_bytes: int = DEFAULT_RECEIVE_SIZE) -> bytes:
        """Between 1 and ``max_bytes`` bytes, or ``b""`` at EOF; always a checkpoint."""
        sock = self._socket
        waited = False
        if self._drained:
            await trio.lowlevel.wait_readable(sock)
            waited = True
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = os.read(self._fileno(), max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            break
        self._drained = len(data) < max_bytes
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview, *, stall: float = math.inf) -> bool:
        """Send all of ``data``; returns True if it had to wait (and so yielded).

        Raises :class:`trio.TooSlowError` when the socket takes nothing for
        ``stall`` seconds (the peer stopped reading; the timer exists only
        while waiting).
        """
        sock = self._socket
        if sock.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        waited = False
        view = memoryview(data)
        total, size = 0, len(view)
        while total < size:
            try:
                total += os.write(self._fileno(), view[total:] if total else view)
            except BlockingIOError:
                if stall == math.inf:
                    await trio.lowlevel.wait_writable(sock)
                else:
                    with trio.fail_after(stall):
                        await trio.lowlevel.wait_writable(sock)
                waited = True
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        return waited


def socket_io(stream: trio.abc.Stream) -> SocketIO | None:
    """A :class:`SocketIO` for ``stream`` if it is plain TCP (a :class:`trio.SocketStream`), else None.

    The one place that recognizes trio's socket stream, which cannot offer
    this itself; callers use it once per connection, never per chunk.
    """
    return SocketIO(stream) if isinstance(stream, trio.SocketStream) else None
