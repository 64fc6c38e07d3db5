"""End-to-end test harness: real certificates, a real gateway, real backends, real TLS clients.

Everything listens on 127.0.0.1 with ephemeral ports. Certificates come from
trustme, written to pytest's tmp_path (never into the repository).
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trustme
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from gatewayd.config import load
from gatewayd.server import Gateway

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


@dataclass
class Certs:
    ca: trustme.CA
    directory: Path

    def issue(self, name: str, *names: str) -> tuple[Path, Path]:
        cert = self.ca.issue_cert(name, *names)
        cert_path = self.directory / f"{name.replace('*', 'star')}.pem"
        key_path = self.directory / f"{name.replace('*', 'star')}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        for blob in cert.cert_chain_pems[1:]:
            blob.write_to_path(str(cert_path), append=True)
        cert.private_key_pem.write_to_path(str(key_path))
        return cert_path, key_path

    def client_context(self, *, minimum: ssl.TLSVersion | None = None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
        return context


def make_certs(directory: Path) -> Certs:
    return Certs(ca=trustme.CA(), directory=directory)


@dataclass
class Running:
    gateway: Gateway
    ports: list[int] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.ports[0]


@asynccontextmanager
async def running_gateway(config_path: Path) -> AsyncIterator[Running]:
    """Load ``config_path`` through the real loader and serve it until the block ends."""
    config = load(config_path)
    gateway = Gateway(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        running = Running(gateway, [port for _, (_, port) in gateway.listen_addresses])
        try:
            yield running
        finally:
            gateway.shutdown()
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ backends


async def _echo(request: WebSocketRequest) -> None:
    ws = await request.accept(subprotocol=(request.proposed_subprotocols or [None])[0])
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        return


@asynccontextmanager
async def echo_backend() -> AsyncIterator[int]:
    """A real WebSocket echo server (trio-websocket); yields its port."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, _echo, "127.0.0.1", 0, None)
        try:
            yield server.port
        finally:
            nursery.cancel_scope.cancel()


Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def raw_backend(handler: Handler) -> AsyncIterator[int]:
    """A TCP server running ``handler`` per connection; yields its port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


async def read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """Read up to the blank line; returns (head, bytes after it)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(f"EOF before a complete head: {buffer!r}")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def header_value(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name.lower().encode():
            return value.strip().decode("latin-1")
    return None


def switching_protocols(request_head: bytes, *extra: str) -> bytes:
    """A correct backend 101 for ``request_head``."""
    key = header_value(request_head, "sec-websocket-key")
    assert key is not None
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_for(key)}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ------------------------------------------------------------------ clients


async def tls_client(
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None,
) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname=server_hostname)
    await stream.do_handshake()
    return stream


def upgrade_request(
    path: str = "/echo",
    host: str = "localhost",
    *extra: str,
    key: str = KEY,
    method: str = "GET",
) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Answer:
    status: int
    head: bytes
    body: bytes

    def header(self, name: str) -> str | None:
        return header_value(self.head, name)


async def receive_all(stream: trio.abc.Stream, limit: float = 5.0) -> bytes:
    """Everything until EOF (or a reset after the data, which counts as the end)."""
    data = b""
    with trio.fail_after(limit):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


async def exchange(stream: trio.abc.Stream, request: bytes) -> Answer:
    """Send ``request`` and read a complete non-101 answer up to EOF."""
    await stream.send_all(request)
    data = await receive_all(stream)
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head: {data!r}"
    status = int(head.split(b" ", 2)[1])
    return Answer(status, head + b"\r\n\r\n", body)


def random_bytes(size: int, seed: int = 0) -> bytes:
    return os.urandom(size) if seed == 0 else hashlib.shake_256(str(seed).encode()).digest(size)
