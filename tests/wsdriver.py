"""A tiny trio driver for gatewayd.wsbridge.BridgeEngine, shaped like gatewayd.bridge.Bridge.

Tests only: it lets today's end-to-end bridge tests run the engine in place
of the async Bridge (``tests/test_wsbridge_adapter.py``), which shows the two
behave alike on real sockets before the data plane drives the engine. It
follows the engine's contract with its caller (gatewayd/wsbridge.py) the way
an epoll loop would, but with one task per direction and side: readers read
only while the engine wants that side's data, writers write a buffer and
delete what went out, and every change wakes everyone (one parking lot).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio
from trio.lowlevel import ParkingLot

from gatewayd import splice
from gatewayd.record import End
from gatewayd.splice import CHUNK, SpliceStats
from gatewayd.wsbridge import IDLE_GRACE, BridgeEngine

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


def _text(exc: BaseException) -> str:
    return str(exc.__cause__ or exc)


class EngineBridge:
    """gatewayd.bridge.Bridge's interface (constructor, go_away_at, run) over the engine."""

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
        self.max_message_size = max_message_size
        self.idle = idle_timeout if idle_timeout > 0 else math.inf
        self.half_close = half_close_timeout
        self.engine: BridgeEngine | None = None
        self._lot = ParkingLot()
        self._go_away = math.inf
        self._go_away_reason = End.SHUTDOWN
        self._closing_deadline = math.inf
        self._last_activity = trio.current_time()
        self._backend_closed_here = False
        self._backend_shut = False
        self._timer: trio.CancelScope | None = None
        self._idle_fired = False
        self._client_shut = False

    def go_away_at(self, deadline: float, reason: End) -> None:
        """Send close 1001 at ``deadline`` (trio time) at the latest, as ``reason``."""
        if deadline < self._go_away:
            self._go_away = deadline
            self._go_away_reason = reason
            self._kick()

    # ------------------------------------------------------------------ plumbing

    def _kick(self) -> None:
        engine = self.engine
        if engine is not None and engine.closing_deadline_wanted is not None:
            self._closing_deadline = min(
                self._closing_deadline, trio.current_time() + engine.closing_deadline_wanted
            )
            engine.closing_deadline_wanted = None
        if self._timer is not None:
            self._timer.deadline = self._next_deadline()
        self._lot.unpark_all()

    def _next_deadline(self) -> float:
        idle = self._last_activity + self.idle
        return min(
            self._closing_deadline,
            self._go_away,
            idle + IDLE_GRACE if self._idle_fired else idle,
        )

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._lot.park()

    def _activity(self) -> None:
        self._last_activity = trio.current_time()

    # ------------------------------------------------------------------ run

    async def run(self, early: bytes = b"") -> None:
        """Bridge until the engine is done and its last bytes are written."""
        engine = self.engine = BridgeEngine(
            self.max_message_size, early, half_close_timeout=self.half_close
        )
        try:
            self._kick()
            async with trio.open_nursery() as nursery:
                for task in (
                    self._read_client,
                    self._read_backend,
                    self._write_client,
                    self._write_backend,
                    self._timers,
                ):
                    nursery.start_soon(self._watch, task)
                await self._until(self._finished)
                nursery.cancel_scope.cancel()
        finally:
            self.stats.bytes_up += engine.bytes_up
            self.stats.bytes_down += engine.bytes_down
            if self.stats.end is None:
                self.stats.end = engine.end or End.ERROR
                self.stats.error = engine.error

    async def _watch(self, task: Callable[[BridgeEngine], Awaitable[None]]) -> None:
        assert self.engine is not None
        await task(self.engine)
        self._kick()

    def _finished(self) -> bool:
        engine = self.engine
        assert engine is not None
        if not engine.done or engine.to_client:
            return False
        if engine.close_backend:
            return self._backend_closed_here or not engine.to_backend
        return not engine.to_backend and (not engine.shut_backend or self._backend_shut)

    async def _read_client(self, engine: BridgeEngine) -> None:
        while True:
            await self._until(lambda: engine.wants_client_data or engine.done)
            if engine.done:
                return
            try:
                data = bytes(await self.client.receive_some(CHUNK))
            except _STREAM_ERRORS as exc:
                engine.client_error(_text(exc))
                return
            if not data:
                engine.client_eof()
                return
            self._activity()
            engine.client_data(data)
            self._kick()

    async def _read_backend(self, engine: BridgeEngine) -> None:
        while True:
            await self._until(lambda: engine.wants_backend_data or engine.done)
            if engine.done:
                return
            try:
                data = bytes(await self.backend.receive_some(CHUNK))
            except _STREAM_ERRORS as exc:
                if not self._backend_closed_here:
                    engine.backend_error(_text(exc))
                return
            if not data:
                engine.backend_eof()
                return
            engine.backend_data(data)
            self._kick()

    async def _write_client(self, engine: BridgeEngine) -> None:
        while True:
            await self._until(
                lambda: bool(engine.to_client) or (engine.shut_client and not self._client_shut)
            )
            if engine.to_client:
                data = bytes(engine.to_client)
                try:
                    await self.client.send_all(data)
                except _STREAM_ERRORS as exc:
                    engine.client_error(_text(exc))
                    return
                del engine.to_client[: len(data)]
                self._activity()
            else:
                self._client_shut = True
                if isinstance(self.client, trio.abc.HalfCloseableStream):
                    try:
                        await self.client.send_eof()
                    except _STREAM_ERRORS:
                        return
            self._kick()

    async def _write_backend(self, engine: BridgeEngine) -> None:
        while True:
            await self._until(
                lambda: bool(engine.to_backend) or engine.close_backend or engine.shut_backend
            )
            if engine.to_backend:
                data = bytes(engine.to_backend)
                try:
                    with trio.move_on_after(splice.STALL_TIMEOUT) as stall:
                        await self.backend.send_all(data)
                except _STREAM_ERRORS as exc:
                    engine.backend_error(_text(exc))
                    continue
                if stall.cancelled_caught:
                    engine.backend_error(f"read nothing for {splice.STALL_TIMEOUT:g}s")
                    continue
                del engine.to_backend[: len(data)]
                self._kick()
                continue
            if engine.close_backend:
                self._backend_closed_here = True
                try:
                    await self.backend.aclose()
                except _STREAM_ERRORS:
                    pass  # gone already: closing it was the point
                return
            try:
                if isinstance(self.backend, trio.abc.HalfCloseableStream):
                    await self.backend.send_eof()
                else:
                    self._backend_closed_here = True
                    await self.backend.aclose()
            except _STREAM_ERRORS:
                pass  # the service closed already; nothing to pass on
            self._backend_shut = True
            return

    async def _timers(self, engine: BridgeEngine) -> None:
        while not engine.done:
            with trio.CancelScope(deadline=self._next_deadline()) as timer:
                self._timer = timer
                await trio.sleep_forever()
            self._timer = None
            now = trio.current_time()
            hard_idle = self._idle_fired and now >= self._last_activity + self.idle + IDLE_GRACE
            if now >= self._closing_deadline or hard_idle:
                engine.close_timed_out()
            elif now >= self._go_away:
                engine.go_away(self._go_away_reason)
                self._go_away = math.inf
            elif now >= self._last_activity + self.idle:
                engine.go_away(End.IDLE_TIMEOUT)
                self._idle_fired = True
            self._kick()
