"""Splicing: relay bytes both ways between the client and the backend.

Theory of operation
-------------------
Two pump tasks, one per direction, each ``receive_some`` then ``send_all``:
a pump never reads more until the other side took what it read, so a slow
reader slows the writer down (TCP and TLS flow control do the rest) and each
direction holds at most one buffer of ``CHUNK`` bytes — memory per connection
is bounded whatever the peers do.

End of stream is passed on as a half-close (SPEC section 4): when one side
sends EOF, the pump calls ``send_eof`` on the other (a TLS close_notify plus
TCP FIN towards a client, a TCP FIN towards a backend) and the other
direction keeps flowing until it too ends. The splice is over when both
directions ended, or at once when either side fails (reset, TLS error): the
failure cancels the other pump, and the caller closes both streams.

``idle_timeout`` is one cancel-scope deadline, pushed forward by every chunk
in either direction: O(1) per chunk and no timer task.

``half_close_timeout`` bounds the half-closed state: once one direction has
ended (its EOF passed on), the other has that long to end too, counted from
the first EOF; then the splice ends as ``half_close_timeout``. Without it a
client that ignores the backend's FIN (or the other way round) would keep its
connection, slots and descriptors for ever (HAProxy bounds the same with
``timeout client-fin`` / ``server-fin``). The same cancel scope carries it:
its deadline is the earlier of the idle deadline and the half-close one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import trio

from gatewayd.record import End
from gatewayd.transport import loop_io

logger = logging.getLogger("gatewayd.splice")

#: A write that has not completed after this many seconds means the other side
#: stopped reading (it would take a reader slower than ~140 B/s for one chunk).
#: The connection then ends as that side's error: otherwise a peer that never
#: reads would pin the connection, its per-address slot and its backend slot
#: for ever, since the blocked pump never sees the other peer leave (nginx
#: bounds the same with proxy_send_timeout).
STALL_TIMEOUT = 120.0

#: Bytes read per receive: one TLS record's worth of plaintext. A direction
#: whose destination stopped reading holds this one chunk (and, towards a TLS
#: peer, one record of ciphertext): 64 KiB chunks, with their four records of
#: ciphertext in flight, pinned ~290 KiB per stalled connection (measured
#: with bench/stalled.py; docs/performance.md). nginx's tunnel moves 4-8 KiB.
CHUNK = 16384


def failure_end(side: str, first_eof: str, *, reading: bool) -> End:
    """The end of a tunnel that ``side``'s failure ended (the splice here and the data plane's).

    ``first_eof``: who ended their direction first ("" if nobody). When the
    other direction had already ended cleanly and the failure is a read, no
    byte is lost: a peer that then drops the connection (a browser closing
    TCP without TLS close_notify after the WebSocket close handshake) is an
    ordinary end, named after who closed first. A failed write still is an error.
    """
    if reading and first_eof:
        return End.BACKEND_CLOSE if first_eof == "backend" else End.CLIENT_CLOSE
    return End.CLIENT_ERROR if side == "client" else End.BACKEND_ERROR


@dataclass
class SpliceStats:
    """Counters filled in while splicing.

    Attributes:
        bytes_up: bytes relayed client -> backend.
        bytes_down: bytes relayed backend -> client.
        end: why the splice ended, once it is over.
        error: text of the failure that ended it, if any (for the log).
    """

    bytes_up: int = 0
    bytes_down: int = 0
    end: End | None = None
    error: str = ""
    _first_eof: str = field(default="", repr=False)


async def splice(
    client: trio.abc.Stream,
    backend: trio.abc.Stream,
    stats: SpliceStats,
    *,
    idle_timeout: float = 0.0,
    half_close_timeout: float = 0.0,
) -> None:
    """Relay both ways until both directions end, one side fails, or idleness.

    Args:
        client: the client's stream (TLS or plain).
        backend: the backend's stream.
        stats: filled in while splicing.
        idle_timeout: end after this long without a byte either way (0 = never).
        half_close_timeout: once one direction ended, end this long after
            (0 = for ever).

    Does not close the streams; the caller does (it owns them). Sets
    ``stats.end`` to why it ended. Cancellation from outside (shutdown) is
    left to propagate; the caller records it.
    """
    with trio.CancelScope() as scope:
        run = _Splice(
            stats,
            scope,
            idle_timeout if idle_timeout > 0 else None,
            half_close_timeout if half_close_timeout > 0 else None,
        )
        if run.idle is not None:
            scope.deadline = trio.current_time() + run.idle
        async with trio.open_nursery() as nursery:
            # One new task, not two: the caller's task pumps upstream itself
            # (a task is ~1 KiB that every idle connection would keep).
            nursery.start_soon(run.pump, backend, client, False)
            await run.pump(client, backend, True)

    if stats.end is None:
        if scope.cancelled_caught:
            stats.end = (
                End.HALF_CLOSE_TIMEOUT
                if trio.current_time() >= run.half_closed_until
                else End.IDLE_TIMEOUT
            )
        elif stats._first_eof == "backend":
            stats.end = End.BACKEND_CLOSE
        else:
            stats.end = End.CLIENT_CLOSE


class _Splice:
    """One splice's shared state: its counters, its cancel scope, the idle and half-close bounds."""

    __slots__ = ("closed_here", "half_close", "half_closed_until", "idle", "scope", "stats")

    def __init__(
        self,
        stats: SpliceStats,
        scope: trio.CancelScope,
        idle: float | None,
        half_close: float | None,
    ) -> None:
        self.stats = stats
        self.scope = scope
        self.idle = idle
        self.half_close = half_close
        # The half-close deadline (trio time), once one direction has ended.
        self.half_closed_until = math.inf
        # Streams we closed to pass an EOF on (they cannot half-close): the pump
        # reading from one of them stops quietly, that is not the peer's failure.
        self.closed_here: list[trio.abc.Stream] = []

    async def pump(self, src: trio.abc.Stream, dst: trio.abc.Stream, upstream: bool) -> None:
        """Relay ``src`` to ``dst`` until ``src`` ends (then pass the EOF on) or a side fails."""
        src_name, dst_name = ("client", "backend") if upstream else ("backend", "client")
        # Each end's LoopIO (gatewayd.transport), looked up once: plain TCP
        # goes through SocketIO (its receive is the loop's checkpoint, its
        # send yields only when the socket is full), TLS through the stream's
        # send_all_in_loop. The stall bound (TooSlowError) is armed only while
        # a send waits for room: no timer per chunk when the peer keeps up.
        # Everything the loop touches is a local.
        stall = STALL_TIMEOUT
        receive = loop_io(src).receive
        send_all = loop_io(dst).send_all
        stats, scope, idle = self.stats, self.scope, self.idle
        while True:
            try:
                data = await receive(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not any(src is stream for stream in self.closed_here):
                    self.fail(src_name, exc, reading=True)
                return
            if not data:
                break
            try:
                await send_all(data, stall=stall)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.fail(dst_name, exc)
                return
            except trio.TooSlowError:
                self.fail(dst_name, TimeoutError(f"{dst_name} read nothing for {stall:g}s"))
                return
            if upstream:
                stats.bytes_up += len(data)
            else:
                stats.bytes_down += len(data)
            if idle is not None:
                scope.deadline = min(trio.current_time() + idle, self.half_closed_until)
        if not stats._first_eof:
            stats._first_eof = src_name
            if self.half_close is not None:
                self.half_closed_until = trio.current_time() + self.half_close
                scope.deadline = min(scope.deadline, self.half_closed_until)
        await self._pass_eof(dst, dst_name)

    async def _pass_eof(self, dst: trio.abc.Stream, dst_name: str) -> None:
        try:
            if isinstance(dst, trio.abc.HalfCloseableStream):
                await dst.send_eof()
            else:
                # Closing is the only way to pass the EOF on; it ends the
                # other direction too.
                self.closed_here.append(dst)
                await dst.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # Only the EOF itself could not be delivered (the peer had
            # already closed): no data is lost, so this is an ordinary end.
            self.fail(dst_name, exc, reading=True)

    def fail(self, side: str, exc: BaseException, *, reading: bool = False) -> None:
        """End the splice as ``side``'s failure (or as an ordinary end, see below)."""
        stats = self.stats
        if stats.end is None:
            stats.end = failure_end(side, stats._first_eof, reading=reading)
            cause = exc.__cause__ or exc
            stats.error = f"{side}: {type(cause).__name__}: {cause}"
        self.scope.cancel()
