"""gatewayd.transport: which receive/send a splice pump gets for each kind of stream."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from gatewayd.sockio import SocketIO
from gatewayd.tls import ServerTLS, TLSStream
from gatewayd.transport import LoopIO, LoopStream, loop_io

BOUND = 10.0


async def test_tls_stream_gives_its_own_loop_io(tmp_path: Path) -> None:
    from test_tls import CertFiles, make_config, make_host

    files = CertFiles(tmp_path)
    server_tls = ServerTLS.from_config(make_config(files, [make_host(files, 0, ["example.com"])]))
    left, _right = trio.testing.memory_stream_pair()
    stream = server_tls.wrap(left)
    io = loop_io(stream)
    assert getattr(io.receive, "__func__", None) is TLSStream.receive_some
    assert getattr(io.send_all, "__func__", None) is TLSStream.send_all_in_loop
    assert getattr(io.receive, "__self__", None) is stream


async def test_tcp_stream_goes_through_socketio() -> None:
    a, b = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    try:
        io = loop_io(stream)
        assert getattr(io.receive, "__func__", None) is SocketIO.receive
        assert getattr(io.send_all, "__func__", None) is SocketIO.send_all
        with trio.fail_after(BOUND):
            await io.send_all(b"ping", stall=5.0)
            assert b.recv(4) == b"ping"
            b.sendall(b"pong")
            assert await io.receive(100) == b"pong"
    finally:
        await stream.aclose()
        b.close()


async def test_any_other_stream_gets_receive_some_and_a_bounded_send(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.lockstep_stream_pair()
    io = loop_io(left)
    assert getattr(io.receive, "__func__", None) is type(left).receive_some
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await io.send_all(b"nobody reads this", stall=30.0)  # lockstep: blocks until read
    assert trio.current_time() - start == pytest.approx(30.0)
    await right.aclose()


async def test_a_loop_stream_subclass_is_asked() -> None:
    async def receive(max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return b"r"

    async def send_all(data: bytes | bytearray, *, stall: float) -> None:
        await trio.lowlevel.checkpoint()

    own = LoopIO(receive, send_all)

    class Custom(trio.abc.Stream, LoopStream):
        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            raise AssertionError("the pump must use loop_io()")

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            raise AssertionError("the pump must use loop_io()")

        async def wait_send_all_might_not_block(self) -> None:
            await trio.lowlevel.checkpoint()

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

        def loop_io(self) -> LoopIO:
            return own

    assert loop_io(Custom()) is own
