"""The tcp:// bridge inside a connection's task: the bridge engine driven by trio.

SPEC section 4, "Bridge": WebSocket messages on the client side, a byte
stream on the other. Every WebSocket decision (RFC 6455 framing and
validation, pings, the close decision, its code and reason, what is passed
on and when the backend is shut or closed, backpressure) is made by
:class:`gatewayd.wsbridge.BridgeEngine`, the one implementation of those
semantics; read gatewayd/wsbridge.py for them. This module only moves bytes
between two trio streams and the engine, and keeps the clocks the engine
does not have.

When it is used
---------------
:meth:`gatewayd.connection.Connection._tunnel` hands every tunnel whose two
ends are sockets to the data plane (gatewayd/dataplane.py, whose
``BridgeTunnel`` drives the same engine from one epoll loop). This driver
serves the others: streams that are not sockets and so cannot leave trio
(in practice in-memory test streams), and any tunnel opened while the data
plane is not running. ``tests/test_bridge_intask.py`` runs it over socket
pairs and memory streams.

Theory of operation
-------------------
:meth:`Bridge.run` makes the engine (with the client's early bytes) and
runs five tasks in one nursery, each waiting for its own condition on the
engine:

* **client reader**: reads at most ``CHUNK`` bytes while
  ``wants_client_data`` (false while the backend is behind: a slow TCP peer
  slows the client down), and feeds ``client_data`` / ``client_eof`` /
  ``client_error``;
* **backend reader**: the same with ``wants_backend_data`` and the
  ``backend_*`` inputs (each read becomes one binary message);
* **client writer**: writes ``to_client`` and deletes, in place, what went
  out; once it is empty and the engine asks for ``shut_client``, half-closes
  the client's stream (TLS close_notify, FIN);
* **backend writer**: writes ``to_backend`` likewise, then carries out
  ``close_backend`` (at once) or ``shut_backend`` (``send_eof``, or a close
  for a stream that cannot half-close);
* **timers**: one cancel scope whose deadline is the earliest of the timer
  the engine asked for (``closing_deadline_wanted``: the closing handshake's
  ``CLOSE_TIMEOUT``, ``half_close_timeout``, ``FAIL_LINGER``), the going-away
  deadline (:meth:`Bridge.go_away_at`), ``idle_timeout`` counted from the
  last byte read from or written to the client, and its hard stop
  ``IDLE_GRACE`` later. Each one feeds the engine ``close_timed_out`` or
  ``go_away``.

Every change to the engine wakes every task (one parking lot); each checks
its own condition again. That costs a few wake-ups per message, which does
not matter for a fallback (the data plane serves production traffic).

A write is bounded by ``splice.STALL_TIMEOUT`` (a peer that stopped
reading is that peer's error, as in the data plane). Writes are never
cancelled otherwise while the bridge runs, so a frame is never cut in half:
the nursery is cancelled only once the engine is ``done`` and its buffers
are written and its flags carried out, or when the last bytes could not be
written within ``CLOSE_TIMEOUT`` of the end (a client that does not read
our close frame); the connection is over then. The caller closes both
streams, and keeps a hard deadline of its own a little after the going-away
deadline (``connection.CLOSE_SECONDS``).

Memory per connection: one read in each direction and the engine's
buffers (bounded as gatewayd/wsbridge.py says).

Byte counts go to ``stats`` when :meth:`Bridge.run` returns: the engine's
``bytes_up`` (not the early bytes, which whoever read the request head
counted) and ``bytes_down`` (what was written to the client).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio
from trio.lowlevel import ParkingLot

from gatewayd import splice
from gatewayd.record import End
from gatewayd.splice import SpliceStats
from gatewayd.wsbridge import (
    CHUNK,
    CLOSE_TIMEOUT,
    FAIL_LINGER,
    GOING_AWAY,
    IDLE_GRACE,
    IDLE_REASON,
    INTERNAL_ERROR,
    INVALID_DATA,
    NORMAL,
    PROTOCOL_ERROR,
    REASONS,
    TOO_BIG,
    BridgeEngine,
)

# The constants are defined once, in gatewayd.wsbridge; they are re-exported
# here for whoever thinks of them as the bridge's (the close codes and reasons
# a bridged client sees, the closing handshake's bounds).
__all__ = [
    "CLOSE_TIMEOUT",
    "FAIL_LINGER",
    "GOING_AWAY",
    "IDLE_GRACE",
    "IDLE_REASON",
    "INTERNAL_ERROR",
    "INVALID_DATA",
    "NORMAL",
    "PROTOCOL_ERROR",
    "REASONS",
    "TOO_BIG",
    "Bridge",
]

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


def _detail(exc: BaseException) -> str:
    """A stream error for the log: the OS's or the TLS library's error under trio's wrapper."""
    return str(exc.__cause__ or exc)


class Bridge:
    """One bridged connection, after our 101, driven inside the caller's task.

    Args:
        client: the client's stream, after our 101.
        backend: the TCP (or unix socket) stream to the service.
        stats: filled in when :meth:`run` returns: bytes read from / written
            to the client (not counting ``early``), and why it ended.
        max_message_size: largest WebSocket message accepted from the client.
        idle_timeout: close 1001 after this long without a byte to or from
            the client (0 = never); cut ``IDLE_GRACE`` later if it does not answer.
        half_close_timeout: after the TCP side's EOF (close 1000 sent), how long
            the client has to answer with its close frame (0 = no bound but
            the closing handshake's ``CLOSE_TIMEOUT``, which also caps it).
    """

    def __init__(
        self,
        client: trio.abc.Stream,
        backend: trio.abc.Stream,
        stats: SpliceStats,
        *,
        max_message_size: int,
        idle_timeout: float = 0.0,
        half_close_timeout: float = 0.0,
    ) -> None:
        self.client = client
        self.backend = backend
        self.stats = stats
        self._max_message_size = max_message_size
        self._idle = idle_timeout if idle_timeout > 0 else math.inf
        self._half_close = half_close_timeout
        self._engine: BridgeEngine | None = None   # made by run()
        self._lot = ParkingLot()                  # every task waits here for a change
        self._timer: trio.CancelScope | None = None   # the timers task's pending sleep
        self._go_away = math.inf
        self._go_away_reason = End.SHUTDOWN
        #: The engine's timer (closing_deadline_wanted), and after it is done the
        #: bound on writing its last bytes.
        self._closing_deadline = math.inf
        self._last_activity = trio.current_time()
        self._idle_fired = False    # go_away(IDLE_TIMEOUT) was fed: the hard stop is next
        self._flush_bounded = False  # the engine is done and _closing_deadline bounds the rest
        self._cut = False           # the last bytes ran out of time: stop writing them
        self._client_shut = False   # shut_client carried out
        self._backend_shut = False  # shut_backend carried out
        self._backend_closed = False  # we closed the backend stream (its reader's error is ours)

    def go_away_at(self, deadline: float, reason: End) -> None:
        """Send close 1001 at ``deadline`` (trio time) at the latest, as ``reason``."""
        if deadline < self._go_away:
            self._go_away = deadline
            self._go_away_reason = reason
            self._changed()

    # ------------------------------------------------------------------ running

    async def run(self, early: bytes = b"") -> None:
        """Bridge until the engine is done and its last bytes are written.

        Args:
            early: bytes the client sent right after its request head (its
                first frames); the engine parses them before anything is read.

        Does not close the streams; the caller does. Sets ``stats``.
        """
        engine = self._engine = BridgeEngine(
            self._max_message_size, early, half_close_timeout=self._half_close
        )
        stats = self.stats
        try:
            self._changed()
            async with trio.open_nursery() as nursery:
                for task in (
                    self._read_client,
                    self._read_backend,
                    self._write_client,
                    self._write_backend,
                    self._timers,
                ):
                    nursery.start_soon(self._watched, task, engine)
                await self._wait(lambda: self._finished(engine))
                nursery.cancel_scope.cancel()
        finally:
            # Also when the caller's deadline cut us short: what moved is counted,
            # and a close decision that was made is the end.
            stats.bytes_up += engine.bytes_up
            stats.bytes_down += engine.bytes_down
            if stats.end is None and (engine.end is not None or engine.done):
                stats.end = engine.end or End.ERROR
                stats.error = engine.error

    async def _watched(
        self, task: Callable[[BridgeEngine], Awaitable[None]], engine: BridgeEngine
    ) -> None:
        await task(engine)
        self._changed()   # a task that ended fed the engine its last input

    def _finished(self, engine: BridgeEngine) -> bool:
        """The engine is done and its buffers are written and flags carried out (or out of time)."""
        if self._cut:
            return True
        if not engine.done or engine.to_client:
            return False
        if engine.close_backend:
            return self._backend_closed or not engine.to_backend
        return not engine.to_backend and (not engine.shut_backend or self._backend_shut)

    # ------------------------------------------------------------------ wake-ups and clocks

    def _changed(self) -> None:
        """The engine or a deadline changed: take the engine's timer, wake every task."""
        engine = self._engine
        if engine is not None:
            now = trio.current_time()
            wanted = engine.closing_deadline_wanted
            if wanted is not None:
                engine.closing_deadline_wanted = None
                self._closing_deadline = min(self._closing_deadline, now + wanted)
            if engine.done and not self._flush_bounded:
                # Its last bytes (our close frame, a pong, the backend's last
                # message) get the closing handshake's time, no more.
                self._flush_bounded = True
                self._closing_deadline = min(self._closing_deadline, now + CLOSE_TIMEOUT)
        if self._timer is not None:
            self._timer.deadline = self._next_deadline()
        self._lot.unpark_all()

    def _next_deadline(self) -> float:
        engine = self._engine
        if engine is not None and engine.done:
            return self._closing_deadline   # only the bound on writing the last bytes is left
        idle = self._last_activity + self._idle
        return min(
            self._closing_deadline,
            self._go_away,
            idle + IDLE_GRACE if self._idle_fired else idle,
        )

    async def _wait(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._lot.park()

    def _activity(self) -> None:
        """A byte moved to or from the client: idle_timeout counts from now."""
        self._last_activity = trio.current_time()

    async def _timers(self, engine: BridgeEngine) -> None:
        while True:
            with trio.CancelScope(deadline=self._next_deadline()) as timer:
                self._timer = timer
                await trio.sleep_forever()
            self._timer = None
            now = trio.current_time()
            if engine.done:
                if now >= self._closing_deadline:
                    self._cut = True
                    return
                continue   # woken early: only the flush bound is left
            hard_idle = self._idle_fired and now >= self._last_activity + self._idle + IDLE_GRACE
            if now >= self._closing_deadline or hard_idle:
                engine.close_timed_out()
            elif now >= self._go_away:
                self._go_away = math.inf
                engine.go_away(self._go_away_reason)
            elif now >= self._last_activity + self._idle:
                self._idle_fired = True
                engine.go_away(End.IDLE_TIMEOUT)
            self._changed()

    # ------------------------------------------------------------------ readers

    async def _read_client(self, engine: BridgeEngine) -> None:
        while True:
            await self._wait(lambda: engine.wants_client_data or engine.done)
            if engine.done:
                return
            try:
                data = bytes(await self.client.receive_some(CHUNK))
            except _STREAM_ERRORS as exc:
                engine.client_error(_detail(exc))
                return
            if not data:
                engine.client_eof()
                return
            self._activity()
            engine.client_data(data)
            self._changed()

    async def _read_backend(self, engine: BridgeEngine) -> None:
        while True:
            await self._wait(lambda: engine.wants_backend_data or engine.done)
            if engine.done:
                return
            try:
                data = bytes(await self.backend.receive_some(CHUNK))
            except _STREAM_ERRORS as exc:
                if not self._backend_closed:
                    engine.backend_error(_detail(exc))
                # else: our own close, seen by a read already under way.
                return
            if not data:
                engine.backend_eof()
                return
            engine.backend_data(data)
            self._changed()

    # ------------------------------------------------------------------ writers

    async def _write_client(self, engine: BridgeEngine) -> None:
        while True:
            await self._wait(
                lambda: bool(engine.to_client) or (engine.shut_client and not self._client_shut)
            )
            if engine.to_client:
                data = bytes(engine.to_client)
                try:
                    with trio.move_on_after(splice.STALL_TIMEOUT) as stall:
                        await self.client.send_all(data)
                except _STREAM_ERRORS as exc:
                    engine.client_error(_detail(exc))
                    return
                if stall.cancelled_caught:
                    engine.client_error(f"read nothing for {splice.STALL_TIMEOUT:g}s")
                    return
                del engine.to_client[: len(data)]
                self._activity()
            else:
                self._client_shut = True
                if isinstance(self.client, trio.abc.HalfCloseableStream):
                    try:
                        await self.client.send_eof()
                    except _STREAM_ERRORS:
                        return   # gone: nothing more would reach it
            self._changed()

    async def _write_backend(self, engine: BridgeEngine) -> None:
        while True:
            await self._wait(
                lambda: bool(engine.to_backend) or engine.close_backend or engine.shut_backend
            )
            if engine.to_backend:
                data = bytes(engine.to_backend)
                try:
                    with trio.move_on_after(splice.STALL_TIMEOUT) as stall:
                        await self.backend.send_all(data)
                except _STREAM_ERRORS as exc:
                    engine.backend_error(_detail(exc))
                    continue   # the engine now asks for the close
                if stall.cancelled_caught:
                    # The service stopped reading: see splice.STALL_TIMEOUT.
                    engine.backend_error(f"read nothing for {splice.STALL_TIMEOUT:g}s")
                    continue
                del engine.to_backend[: len(data)]
                self._changed()
                continue
            if engine.close_backend or not isinstance(self.backend, trio.abc.HalfCloseableStream):
                self._backend_closed = True
                try:
                    await self.backend.aclose()
                except _STREAM_ERRORS:
                    pass  # gone already: closing it was the point
            else:
                try:
                    await self.backend.send_eof()
                except _STREAM_ERRORS:
                    pass  # the service closed already; nothing to pass on
            self._backend_shut = True
            return
