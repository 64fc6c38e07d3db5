"""half_close_timeout end to end: the real gateway, a real TLS client, a real backend.

The backend answers the upgrade, sends a little data, then half-closes (TCP
FIN). The gateway passes the FIN on to the client as TLS close_notify. A
client that ignores it (keeps its side open) is closed once
``half_close_timeout`` has passed, and the access line says
``end=half_close_timeout``; with ``half_close_timeout = 0`` it may stay for
ever, and what it still sends reaches the backend.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from gatewayd.config import load
from harness import (
    Certs,
    Running,
    make_certs,
    raw_backend,
    read_head,
    running_gateway,
    switching_protocols,
    tls_client,
    upgrade_request,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost", "127.0.0.1")
    return certs


@dataclass
class HalfClosingBackend:
    """Answers the upgrade, sends ``hello``, half-closes, then records what it still gets."""

    received: bytearray = field(default_factory=bytearray)
    eof: trio.Event = field(default_factory=trio.Event)

    async def handler(self, stream: trio.SocketStream) -> None:
        head, rest = await read_head(stream)
        self.received += rest
        await stream.send_all(switching_protocols(head) + b"hello")
        await stream.send_eof()
        try:
            while data := await stream.receive_some(65536):
                self.received += data
        except trio.BrokenResourceError:
            pass
        self.eof.set()


def write_config(directory: Path, certs: Certs, backend: int, gateway: str) -> Path:
    d = certs.directory
    path = directory / "gatewayd.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            handshake_timeout = 5.0
            {gateway}

            [[listener]]
            address = "127.0.0.1:0"

            [[host]]
            names = ["localhost", "127.0.0.1"]
            certificate = "{d}/localhost.pem"
            private_key = "{d}/localhost.key"

            [[host.route]]
            path = "/echo"
            backend = "ws://127.0.0.1:{backend}"
            """
        )
    )
    return path


@asynccontextmanager
async def gateway_with(
    certs: Certs, tmp_path: Path, backend: HalfClosingBackend, gateway: str
) -> AsyncIterator[Running]:
    async with raw_backend(backend.handler) as port:
        async with running_gateway(write_config(tmp_path, certs, port, gateway)) as gw:
            yield gw


async def upgraded(gw: Running, certs: Certs) -> trio.SSLStream[trio.SocketStream]:
    """A TLS client past the 101 that has read the backend's hello and its close_notify."""
    stream = await tls_client(gw.port, certs.client_context(), "localhost")
    await stream.send_all(upgrade_request("/echo", "localhost"))
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 "), head
    data = bytearray(rest)
    while len(data) < len(b"hello"):
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    assert bytes(data) == b"hello"
    # The backend's FIN, passed on as close_notify.
    assert await stream.receive_some(65536) == b""
    return stream


async def wait_closed_under(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """The gateway closed the connection under a client that kept its side open.

    The TCP FIN that came with close_notify only half-closed it; a full close
    shows as a reset on the client's next writes.
    """
    while True:
        try:
            await stream.transport_stream.send_all(b"\x17\x03\x03\x00\x00")
        except trio.BrokenResourceError:
            return
        await trio.sleep(0.05)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        record.access  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "gatewayd.access"
    ]


async def test_a_client_that_ignores_the_backends_fin_is_closed_after_half_close_timeout(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gatewayd.access")
    backend = HalfClosingBackend()
    with trio.fail_after(20):
        async with gateway_with(certs, tmp_path, backend, "half_close_timeout = 0.5") as gw:
            stream = await upgraded(gw, certs)
            half_closed = trio.current_time()
            # Still within the timeout, the client's direction is open.
            await stream.send_all(b"still here")
            await backend.eof.wait()   # the gateway closed the backend side...
            waited = trio.current_time() - half_closed
            await wait_closed_under(stream)   # ...and the client's
            while not access_lines(caplog):
                await trio.sleep(0.01)
    assert waited >= 0.45
    assert bytes(backend.received) == b"still here"
    (access,) = access_lines(caplog)
    assert access["status"] == 101
    assert access["end"] == "half_close_timeout"
    assert access["bytes_out"] >= len(b"hello")


async def test_half_close_timeout_zero_keeps_the_other_direction_open(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gatewayd.access")
    backend = HalfClosingBackend()
    with trio.fail_after(20):
        async with gateway_with(certs, tmp_path, backend, "half_close_timeout = 0") as gw:
            stream = await upgraded(gw, certs)
            # Well past any timeout a test would set: the connection is still there.
            await trio.sleep(1.5)
            await stream.send_all(b"late but welcome")
            while bytes(backend.received) != b"late but welcome":
                await trio.sleep(0.01)
            assert not access_lines(caplog)
            await stream.aclose()   # close_notify: the client's direction ends too
            await backend.eof.wait()
            while not access_lines(caplog):
                await trio.sleep(0.01)
    (access,) = access_lines(caplog)
    assert access["end"] == "backend_close"


async def test_the_default_is_ten_seconds(certs: Certs, tmp_path: Path) -> None:
    config = load(write_config(tmp_path, certs, 9, ""))
    assert config.gateway.half_close_timeout == 10.0
