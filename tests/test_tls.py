"""gatewayd.tls: the TLS stream (trio conformance), SNI host choice (SPEC row 1),
plain HTTP on a TLS port (row 2), context settings, and certificate checks.

Certificates come from trustme; nothing is read from the repository. Real
clients are the standard library's ``ssl`` module (in a thread, blocking, with
socket timeouts) and ``trio.SSLStream``; the conformance checks also pair two
:class:`TLSStream` ends.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
import trustme
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from gatewayd import errors
from gatewayd.config import Address, Config, HostConfig, ListenerConfig, TLSSettings
from gatewayd.tls import ServerTLS, TLSStream

T = TypeVar("T")

# One CA for the module; ECDSA P-256 keys (trustme's default) are quick to make.
CA = trustme.CA()
OTHER_CA = trustme.CA()
BOUND = 10.0  # seconds: every test runs under trio.fail_after(BOUND)
CLIENT_TIMEOUT = 5.0  # seconds: blocking client sockets


# -- configuration helpers --------------------------------------------------------


class CertFiles:
    """Writes trustme certificates and keys into a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._count = 0

    def write(self, cert: trustme.LeafCert) -> tuple[Path, Path]:
        self._count += 1
        cert_path = self.folder / f"cert{self._count}.pem"
        key_path = self.folder / f"key{self._count}.pem"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key_path.write_bytes(cert.private_key_pem.bytes())
        return cert_path, key_path

    def path(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return CertFiles(tmp_path_factory.mktemp("tls"))


def make_host(
    files: CertFiles,
    index: int,
    names: Sequence[str],
    *,
    cert: trustme.LeafCert | None = None,
    default: bool = False,
    tls: TLSSettings | None = None,
) -> HostConfig:
    leaf = cert if cert is not None else CA.issue_cert(*names)
    cert_path, key_path = files.write(leaf)
    return HostConfig(
        names=tuple(names),
        routes=(),
        certificate=cert_path,
        private_key=key_path,
        default=default,
        tls=tls if tls is not None else TLSSettings(),
        index=index,
    )


def make_config(
    files: CertFiles, hosts: Sequence[HostConfig], *, tls: TLSSettings | None = None
) -> Config:
    return Config(
        path=files.folder / "gatewayd.toml",
        listeners=(ListenerConfig(Address("127.0.0.1", 0)),),
        hosts=tuple(hosts),
        tls=tls if tls is not None else TLSSettings(),
    )


@pytest.fixture(scope="module")
def vhosts(files: CertFiles) -> ServerTLS:
    """example.com (host[0]), *.example.org (host[1]) and a default host (host[2])."""
    return ServerTLS.from_config(
        make_config(
            files,
            [
                make_host(files, 0, ["example.com"]),
                make_host(files, 1, ["*.example.org"]),
                make_host(files, 2, ["default.test"], default=True),
            ],
        )
    )


@pytest.fixture(scope="module")
def no_default(files: CertFiles) -> ServerTLS:
    """example.com only, no default host."""
    return ServerTLS.from_config(make_config(files, [make_host(files, 0, ["example.com"])]))


# -- client helpers ---------------------------------------------------------------


def stdlib_context(
    ca: trustme.CA = CA,
    *,
    maximum: ssl.TLSVersion | None = None,
    check_hostname: bool = True,
    alpn: Sequence[str] = (),
    ciphers: str | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    # Report an EOF without close_notify as an error, as gatewayd does.
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    context.check_hostname = check_hostname
    if maximum is not None:
        context.maximum_version = maximum
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def pyopenssl_client_context(maximum: int | None = None) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_PEER)
    CA.configure_trust(context)
    if maximum is not None:
        context.set_max_proto_version(maximum)
    return context


def connect(
    port: int, context: ssl.SSLContext, server_hostname: str | None, **kwargs: Any
) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    try:
        return context.wrap_socket(raw, server_hostname=server_hostname, **kwargs)
    except BaseException:
        raw.close()
        raise


def peer_names(sock: ssl.SSLSocket) -> list[str]:
    cert = sock.getpeercert()
    assert cert
    alt_names: tuple[tuple[str, str], ...] = cert["subjectAltName"]  # type: ignore[assignment]
    return [value for kind, value in alt_names if kind == "DNS"]


def recv_exactly(sock: ssl.SSLSocket | socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "unexpected EOF"
        data += chunk
    return data


@asynccontextmanager
async def listening() -> AsyncIterator[trio.SocketListener]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        yield listener


def port_of(listener: trio.SocketListener) -> int:
    port = listener.socket.getsockname()[1]
    assert isinstance(port, int)
    return port


async def run_pair(
    server_tls: ServerTLS,
    server: Callable[[TLSStream], Awaitable[T]],
    client: Callable[[int], Any],
) -> tuple[T, Any]:
    """Run ``server(stream)`` on one accepted connection and ``client(port)``
    (blocking, in a thread) against it; return both results."""
    results: dict[str, Any] = {}
    with trio.fail_after(BOUND):
        async with listening() as listener:

            async def serve() -> None:
                stream = server_tls.wrap(await listener.accept())
                try:
                    results["server"] = await server(stream)
                finally:
                    await trio.aclose_forcefully(stream)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                results["client"] = await trio.to_thread.run_sync(client, port_of(listener))
    return results["server"], results["client"]


async def handshake_then_echo(stream: TLSStream) -> TLSStream:
    """Handshake, echo one message, close cleanly; return the stream for inspection."""
    await stream.do_handshake()
    data = await stream.receive_some()
    await stream.send_all(data)
    await stream.aclose()
    return stream


def hello_client(
    context: ssl.SSLContext, server_hostname: str | None, **kwargs: Any
) -> Callable[[int], dict[str, Any]]:
    def client(port: int) -> dict[str, Any]:
        with connect(port, context, server_hostname, **kwargs) as sock:
            sock.sendall(b"hello")
            assert recv_exactly(sock, 5) == b"hello"
            return {
                "names": peer_names(sock),
                "version": sock.version(),
                "cipher": cipher[0] if (cipher := sock.cipher()) else None,
                "alpn": sock.selected_alpn_protocol(),
                "reused": sock.session_reused,
                "session": sock.session,
            }

    return client


def refused_client(
    context: ssl.SSLContext, server_hostname: str | None
) -> Callable[[int], ssl.SSLError]:
    def client(port: int) -> ssl.SSLError:
        with pytest.raises(ssl.SSLError) as info:
            connect(port, context, server_hostname).close()
        return info.value

    return client


async def expect_handshake_error(stream: TLSStream) -> errors.TLSHandshakeFailed:
    with pytest.raises(errors.TLSHandshakeFailed) as info:
        await stream.do_handshake()
    return info.value


# -- trio's stream conformance checks --------------------------------------------

VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": None}


@pytest.mark.parametrize("transport", ["memory", "socketpair"])
@pytest.mark.parametrize("version", sorted(VERSIONS))
async def test_half_closeable_stream_conformance(
    vhosts: ServerTLS, version: str, transport: str
) -> None:
    client_context = pyopenssl_client_context(VERSIONS[version])

    def pair(
        client_transport: trio.abc.Stream, server_transport: trio.abc.Stream
    ) -> tuple[TLSStream, TLSStream]:
        client = TLSStream(
            client_transport, client_context, server_side=False, server_hostname="example.com"
        )
        return client, vhosts.wrap(server_transport)

    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        if transport == "memory":
            return pair(*trio.testing.memory_stream_pair())
        a, b = trio.socket.socketpair()
        return pair(trio.SocketStream(a), trio.SocketStream(b))

    async def clogged_stream_maker() -> tuple[TLSStream, TLSStream]:
        client, server = pair(*trio.testing.lockstep_stream_pair())
        # Handshake first, as trio's own SSLStream test does: with nothing
        # buffered, a handshake inside the checks would itself be clogged.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        assert client.tls_version == server.tls_version == version
        return client, server

    with trio.fail_after(BOUND * 2):
        await trio.testing.check_half_closeable_stream(
            stream_maker, clogged_stream_maker if transport == "memory" else None
        )


async def test_handshake_details_and_idempotence(vhosts: ServerTLS) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = TLSStream(
        client_transport,
        pyopenssl_client_context(),
        server_side=False,
        server_hostname="Example.COM.",
        alpn_protocols=["h2", "http/1.1"],
    )
    server = vhosts.wrap(server_transport)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(server.do_handshake)  # waits for the first call
        await server.do_handshake()  # done already: returns at once
        assert server.server_name == client.server_name == "example.com"
        assert server.host is vhosts.config.hosts[0]
        assert server.tls_version == client.tls_version == "TLSv1.3"
        assert server.cipher is not None
        assert server.cipher == client.cipher
        assert server.alpn_protocol == client.alpn_protocol == "http/1.1"
        assert server.transport_stream is server_transport

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            nursery.start_soon(server.aclose)
        for call in (
            server.do_handshake,
            partial(server.send_all, b"x"),
            server.receive_some,
            server.send_eof,
        ):
            with pytest.raises(trio.ClosedResourceError):
                await call()
        await server.aclose()  # closing twice is fine


async def test_send_all_large_and_odd_buffers(vhosts: ServerTLS) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = TLSStream(
        client_transport,
        pyopenssl_client_context(),
        server_side=False,
        server_hostname="example.com",
    )
    server = vhosts.wrap(server_transport)
    payload = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: many records, odd end
    words = memoryview(bytearray(b"\x01\x00\x02\x00")).cast("H")  # non-byte format

    async def receive(count: int) -> bytes:
        got = bytearray()
        while len(got) < count:
            chunk = await server.receive_some(65536)
            assert chunk
            got += chunk
        return bytes(got)

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            assert await receive(len(payload)) == payload
        await client.send_all(words)
        assert await receive(4) == b"\x01\x00\x02\x00"


class Trickle(trio.abc.HalfCloseableStream):
    """A transport that hands out received bytes in small pieces of varying
    size (1 to 7 bytes), so TLS record headers and bodies arrive split at
    every possible offset."""

    def __init__(self, inner: trio.StapledStream[Any, Any]) -> None:
        self.inner = inner
        self._sizes = iter(range(10**9))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(next(self._sizes) % 7 + 1)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_records_split_across_transport_chunks(vhosts: ServerTLS) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = TLSStream(
        client_transport,
        pyopenssl_client_context(),
        server_side=False,
        server_hostname="example.com",
    )
    server = vhosts.wrap(Trickle(server_transport))
    payload = bytes(range(256)) * 160  # 40 KiB: full records and a short one
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        for message in (b"x", payload):
            await client.send_all(message)
            got = bytearray()
            while len(got) < len(message):
                got += await server.receive_some()
            assert got == message
        await client.send_eof()
        assert await server.receive_some() == b""


async def test_many_records_in_one_transport_chunk(vhosts: ServerTLS) -> None:
    # Memory streams buffer without limit and hand everything out at once.
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = TLSStream(
        client_transport,
        pyopenssl_client_context(),
        server_side=False,
        server_hostname="example.com",
    )
    server = vhosts.wrap(server_transport)
    payload = bytes(range(251)) * 4177  # ~1 MiB, ends inside a record
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        await client.send_all(payload)
        await client.send_eof()
        got = bytearray()
        while chunk := await server.receive_some(100000):
            assert len(chunk) <= 100000
            got += chunk
        assert got == payload


async def raw_client_handshake(transport: trio.abc.Stream) -> SSL.Connection:
    """A pyOpenSSL client driven by hand over a raw transport."""
    conn = SSL.Connection(pyopenssl_client_context(), None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"example.com")
    while True:
        try:
            conn.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        with contextlib.suppress(SSL.WantReadError):  # nothing to send
            await transport.send_all(conn.bio_read(65536))
        if done:
            return conn
        conn.bio_write(await transport.receive_some())


async def test_eof_inside_a_record_is_broken(vhosts: ServerTLS) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = vhosts.wrap(server_transport)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            conn = await raw_client_handshake(client_transport)
        conn.send(b"complete")
        conn.send(b"cut short")
        records = conn.bio_read(65536)
        await client_transport.send_all(records[:-4])  # the end of a record is lost
        await client_transport.send_eof()
        assert await server.receive_some() == b"complete"
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()


async def test_oversized_record_is_refused(vhosts: ServerTLS) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = vhosts.wrap(server_transport)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            conn = await raw_client_handshake(client_transport)
        # Application data record claiming 65535 bytes (the limit is 2^14 + 256).
        await client_transport.send_all(b"\x17\x03\x03\xff\xff" + b"\0" * 1000)
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
        # The server said why, with an alert.
        conn.bio_write(await client_transport.receive_some())
        with pytest.raises(SSL.Error, match="record overflow"):
            conn.recv(100)


# -- SNI (SPEC row 1) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        pytest.param("example.com", "example.com", id="exact"),
        pytest.param("EXAMPLE.com", "example.com", id="exact-case-insensitive"),
        pytest.param("a.example.org", "*.example.org", id="wildcard-one-label"),
        pytest.param("a.b.example.org", "default.test", id="wildcard-not-two-labels"),
        pytest.param("example.org", "default.test", id="wildcard-not-bare-domain"),
        pytest.param("unknown.test", "default.test", id="unknown-sni-default"),
        pytest.param(None, "default.test", id="no-sni-default"),
    ],
)
async def test_sni_chooses_host(vhosts: ServerTLS, sni: str | None, expected: str) -> None:
    context = stdlib_context(check_hostname=False)
    stream, seen = await run_pair(vhosts, handshake_then_echo, hello_client(context, sni))
    assert seen["names"] == [expected]
    assert stream.host is not None
    assert stream.host.names == (expected,)
    assert stream.server_name == (sni.lower() if sni else None)


async def test_sni_with_hostname_check(vhosts: ServerTLS) -> None:
    # The client verifies the certificate against the name it asked for.
    context = stdlib_context(check_hostname=True)
    _, seen = await run_pair(vhosts, handshake_then_echo, hello_client(context, "www.example.org"))
    assert seen["names"] == ["*.example.org"]


@pytest.mark.parametrize(
    "sni", ["unknown.test", "a.b.example.com", None], ids=["unknown", "subdomain", "no-sni"]
)
async def test_unknown_name_gets_unrecognized_name_alert(
    no_default: ServerTLS, sni: str | None, capfd: pytest.CaptureFixture[str]
) -> None:
    context = stdlib_context(check_hostname=False)
    error, client_error = await run_pair(
        no_default, expect_handshake_error, refused_client(context, sni)
    )
    assert isinstance(error, errors.UnknownServerName)
    assert error.server_name == sni
    assert client_error.reason == "TLSV1_UNRECOGNIZED_NAME"
    # The refusal is an answer, not a crash: nothing printed (no traceback).
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


async def test_stream_is_broken_after_failed_handshake(no_default: ServerTLS) -> None:
    async def server(stream: TLSStream) -> None:
        with pytest.raises(errors.UnknownServerName):
            await stream.do_handshake()
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()
        await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"x")

    await run_pair(
        no_default, server, refused_client(stdlib_context(check_hostname=False), "nope.test")
    )


# -- plain HTTP on a TLS port (SPEC row 2) ---------------------------------------


async def test_plain_http_raises_not_tls_before_sending_anything(vhosts: ServerTLS) -> None:
    request = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    async def server(stream: TLSStream) -> bytes:
        with pytest.raises(errors.NotTLS) as info:
            await stream.do_handshake()
        # The caller answers in plain text over the transport, like nginx.
        await stream.transport_stream.send_all(answer)
        await stream.aclose()
        return info.value.data

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
            return received

    data, received = await run_pair(vhosts, server, client)
    assert data == request
    assert received == answer  # the 400 is the very first byte we sent


async def test_eof_before_client_hello(vhosts: ServerTLS) -> None:
    def client(port: int) -> None:
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT).close()

    error, _ = await run_pair(vhosts, expect_handshake_error, client)
    assert type(error) is errors.TLSHandshakeFailed
    assert "closed" in str(error)


# -- context settings ---------------------------------------------------------------


async def test_min_version_tls13_refuses_tls12_client(files: CertFiles) -> None:
    server_tls = ServerTLS.from_config(
        make_config(
            files, [make_host(files, 0, ["modern.test"], tls=TLSSettings(min_version="TLSv1.3"))]
        )
    )
    old = stdlib_context(maximum=ssl.TLSVersion.TLSv1_2)
    error, client_error = await run_pair(
        server_tls, expect_handshake_error, refused_client(old, "modern.test")
    )
    assert type(error) is errors.TLSHandshakeFailed
    assert client_error.reason == "TLSV1_ALERT_PROTOCOL_VERSION"

    stream, seen = await run_pair(
        server_tls, handshake_then_echo, hello_client(stdlib_context(), "modern.test")
    )
    assert seen["version"] == stream.tls_version == "TLSv1.3"


async def test_min_version_per_host(files: CertFiles) -> None:
    # Hosts with different minimums behind one listener: the version is chosen
    # before SNI is looked at, so the TLS 1.3-only host refuses afterwards.
    server_tls = ServerTLS.from_config(
        make_config(
            files,
            [
                make_host(files, 0, ["legacy.test"]),
                make_host(files, 1, ["modern.test"], tls=TLSSettings(min_version="TLSv1.3")),
            ],
        )
    )
    old = stdlib_context(maximum=ssl.TLSVersion.TLSv1_2)
    _, seen = await run_pair(server_tls, handshake_then_echo, hello_client(old, "legacy.test"))
    assert seen["version"] == "TLSv1.2"

    async def server(stream: TLSStream) -> tuple[errors.TLSHandshakeFailed, str | None]:
        error = await expect_handshake_error(stream)
        return error, stream.server_name  # known after a failed handshake too

    (error, name), client_error = await run_pair(
        server_tls, server, refused_client(old, "modern.test")
    )
    assert name == "modern.test"
    assert "host[1] requires TLSv1.3" in str(error)
    assert client_error.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


async def test_tls12_cipher_list_per_host(files: CertFiles) -> None:
    server_tls = ServerTLS.from_config(
        make_config(
            files,
            [
                make_host(files, 0, ["gcm.test"], tls=TLSSettings(ciphers="ECDHE+AESGCM")),
                make_host(files, 1, ["chacha.test"], tls=TLSSettings(ciphers="ECDHE+CHACHA20")),
            ],
        )
    )
    old = stdlib_context(maximum=ssl.TLSVersion.TLSv1_2)
    stream, seen = await run_pair(server_tls, handshake_then_echo, hello_client(old, "chacha.test"))
    assert seen["cipher"] == stream.cipher == "ECDHE-ECDSA-CHACHA20-POLY1305"
    _, seen = await run_pair(server_tls, handshake_then_echo, hello_client(old, "gcm.test"))
    assert "GCM" in seen["cipher"]
    # A client with no cipher in common is refused.
    cbc_only = stdlib_context(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA")
    error, client_error = await run_pair(
        server_tls, expect_handshake_error, refused_client(cbc_only, "gcm.test")
    )
    assert "no shared cipher" in str(error)
    assert client_error.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"


async def test_server_cipher_preference(files: CertFiles) -> None:
    server_tls = ServerTLS.from_config(
        make_config(
            files,
            [
                make_host(
                    files, 0, ["pref.test"], tls=TLSSettings(ciphers="ECDHE+CHACHA20:ECDHE+AESGCM")
                )
            ],
        )
    )
    client = stdlib_context(
        maximum=ssl.TLSVersion.TLSv1_2,
        ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305",
    )
    _, seen = await run_pair(server_tls, handshake_then_echo, hello_client(client, "pref.test"))
    assert seen["cipher"] == "ECDHE-ECDSA-CHACHA20-POLY1305"


@pytest.mark.parametrize(
    ("offered", "selected"),
    [
        pytest.param(["h2", "http/1.1"], "http/1.1", id="h2-and-http1"),
        pytest.param(["h2"], None, id="h2-only-no-failure"),
        pytest.param([], None, id="no-alpn"),
    ],
)
async def test_alpn(vhosts: ServerTLS, offered: list[str], selected: str | None) -> None:
    context = stdlib_context(alpn=offered)
    stream, seen = await run_pair(vhosts, handshake_then_echo, hello_client(context, "example.com"))
    assert seen["alpn"] == stream.alpn_protocol == selected


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, None], ids=["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("sni", ["a.example.org", None], ids=["sni", "default-host"])
async def test_session_resumption(
    vhosts: ServerTLS, maximum: ssl.TLSVersion | None, sni: str | None
) -> None:
    context = stdlib_context(maximum=maximum, check_hostname=False)
    _, first = await run_pair(vhosts, handshake_then_echo, hello_client(context, sni))
    assert not first["reused"]
    assert first["session"] is not None
    _, second = await run_pair(
        vhosts, handshake_then_echo, hello_client(context, sni, session=first["session"])
    )
    assert second["reused"]
    assert second["names"] == first["names"]


async def test_certificate_chain_is_sent(files: CertFiles) -> None:
    intermediate = CA.create_child_ca()
    leaf = intermediate.issue_cert("chain.test")
    assert len(leaf.cert_chain_pems) == 2
    server_tls = ServerTLS.from_config(
        make_config(files, [make_host(files, 0, ["chain.test"], cert=leaf)])
    )
    # The client trusts only the root: the intermediate must come from us.
    _, seen = await run_pair(
        server_tls, handshake_then_echo, hello_client(stdlib_context(CA), "chain.test")
    )
    assert seen["names"] == ["chain.test"]


async def test_client_rejecting_certificate(vhosts: ServerTLS) -> None:
    stranger = stdlib_context(OTHER_CA)
    error, client_error = await run_pair(
        vhosts, expect_handshake_error, refused_client(stranger, "example.com")
    )
    assert isinstance(client_error, ssl.SSLCertVerificationError)
    assert "unknown ca" in str(error)


async def test_client_renegotiation_refused(vhosts: ServerTLS) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client_context = pyopenssl_client_context(SSL.TLS1_2_VERSION)
    client = TLSStream(
        client_transport, client_context, server_side=False, server_hostname="example.com"
    )
    server = vhosts.wrap(server_transport)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        assert server.tls_version == "TLSv1.2"
        # TLSStream has no renegotiation API (on purpose), so reach the
        # client's Connection: its next write starts with a new ClientHello.
        assert client._conn.renegotiate()
        outcome: dict[str, BaseException | bytes] = {}

        async def client_side() -> None:
            try:
                await client.send_all(b"after")
            except trio.BrokenResourceError as exc:
                outcome["client"] = exc

        async def server_side() -> None:
            try:
                outcome["server"] = await server.receive_some()
            except trio.BrokenResourceError as exc:
                outcome["server"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            nursery.start_soon(server_side)
        # The server answers the ClientHello with a no_renegotiation alert;
        # OpenSSL clients then give up (with a fatal handshake_failure).
        assert "no renegotiation" in str(outcome["client"])
        assert isinstance(outcome["server"], trio.BrokenResourceError)
        assert server._conn.total_renegotiations() == 0


# -- closing ---------------------------------------------------------------------------


async def test_clean_close_notify(vhosts: ServerTLS) -> None:
    async def server(stream: TLSStream) -> None:
        await stream.send_all(b"bye")
        await stream.aclose()

    def client(port: int) -> bool:
        with connect(port, stdlib_context(), "example.com", suppress_ragged_eofs=False) as sock:
            assert recv_exactly(sock, 3) == b"bye"
            assert sock.recv(10) == b""  # a close_notify, not a ragged EOF
            sock.unwrap().close()
            return True

    assert (await run_pair(vhosts, server, client))[1]


async def test_send_eof_half_close(vhosts: ServerTLS) -> None:
    async def server(stream: TLSStream) -> bytes:
        await stream.do_handshake()
        await stream.send_all(b"server done")
        await stream.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"more")
        received = b""
        while chunk := await stream.receive_some():
            received += chunk
        await stream.aclose()
        return received

    def client(port: int) -> bool:
        with connect(port, stdlib_context(), "example.com", suppress_ragged_eofs=False) as sock:
            assert recv_exactly(sock, 11) == b"server done"
            assert sock.recv(10) == b""
            # TLS 1.3 half-close: the client may still send after our close_notify.
            sock.sendall(b"client still talking")
            sock.unwrap().close()
            return True

    received, _ = await run_pair(vhosts, server, client)
    assert received == b"client still talking"


async def test_eof_without_close_notify_is_broken(vhosts: ServerTLS) -> None:
    async def server(stream: TLSStream) -> None:
        assert await stream.receive_some() == b"partial"
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.receive_some()
        assert isinstance(info.value.__cause__, SSL.SysCallError)
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()

    def client(port: int) -> None:
        sock = connect(port, stdlib_context(), "example.com")
        sock.sendall(b"partial")
        sock.shutdown(socket.SHUT_RDWR)  # TCP FIN, no close_notify
        sock.close()

    await run_pair(vhosts, server, client)


async def test_peer_reset_is_broken(vhosts: ServerTLS) -> None:
    async def server(stream: TLSStream) -> None:
        assert await stream.receive_some() == b"ping"
        await stream.send_all(b"pong")
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):
                await stream.send_all(b"x" * 65536)

    def client(port: int) -> None:
        sock = connect(port, stdlib_context(), "example.com")
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"pong"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST

    await run_pair(vhosts, server, client)


async def test_aclose_is_bounded_when_peer_does_not_read(
    vhosts: ServerTLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gatewayd.tls.stream.CLOSE_NOTIFY_TIMEOUT", 0.2)
    client_transport, server_transport = trio.testing.lockstep_stream_pair()
    client = TLSStream(
        client_transport,
        pyopenssl_client_context(),
        server_side=False,
        server_hostname="example.com",
    )
    server = vhosts.wrap(server_transport)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        # Nobody reads the client side: the close_notify cannot be delivered.
        start = trio.current_time()
        await server.aclose()
        assert trio.current_time() - start < 2
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()


# -- cancellation --------------------------------------------------------------------


async def test_handshake_cancelled_when_client_sends_nothing(vhosts: ServerTLS) -> None:
    async def server(stream: TLSStream) -> float:
        start = time.monotonic()
        with trio.move_on_after(0.2) as scope:
            await stream.do_handshake()
        assert scope.cancelled_caught
        elapsed = time.monotonic() - start
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
        await stream.aclose()
        return elapsed

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
            return sock.recv(10)  # b"" when the server gives up

    elapsed, received = await run_pair(vhosts, server, client)
    assert elapsed < 1.0
    assert received == b""


async def test_handshake_cancelled_midway(vhosts: ServerTLS) -> None:
    # A client that sends its ClientHello and then nothing: the server is
    # cancelled after answering, in the middle of the handshake.
    hello_maker = SSL.Connection(pyopenssl_client_context(), None)
    hello_maker.set_connect_state()
    hello_maker.set_tlsext_host_name(b"example.com")
    with pytest.raises(SSL.WantReadError):
        hello_maker.do_handshake()
    client_hello = hello_maker.bio_read(65536)

    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = vhosts.wrap(server_transport)
    with trio.fail_after(BOUND):
        await client_transport.send_all(client_hello)
        with trio.move_on_after(0.2) as scope:
            await server.do_handshake()
        assert scope.cancelled_caught
        assert await client_transport.receive_some()  # the server's flight went out
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"x")
        await server.aclose()
        assert await client_transport.receive_some() == b""  # closed, nothing more
        await client_transport.aclose()


# -- full duplex -------------------------------------------------------------------------


async def test_concurrent_send_and_receive_both_ways(vhosts: ServerTLS) -> None:
    size = 4 * 1024 * 1024
    up = bytes(range(256)) * (size // 256)
    down = bytes(reversed(range(256))) * (size // 256)

    async def pump(stream: trio.abc.Stream, data: bytes, received: list[bytes]) -> None:
        async def send() -> None:
            view = memoryview(data)
            while view:
                await stream.send_all(view[:50000])
                view = view[50000:]

        async def receive() -> None:
            got = bytearray()
            while len(got) < size:
                chunk = await stream.receive_some()
                assert chunk
                got += chunk
            received.append(bytes(got))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)

    with trio.fail_after(BOUND):
        async with listening() as listener:
            server_received: list[bytes] = []
            client_received: list[bytes] = []

            async def serve() -> None:
                stream = vhosts.wrap(await listener.accept())
                await stream.do_handshake()
                await pump(stream, down, server_received)
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                context = stdlib_context()
                client = trio.SSLStream(
                    await trio.open_tcp_stream("127.0.0.1", port_of(listener)),
                    context,
                    server_hostname="example.com",
                )
                await pump(client, up, client_received)
                assert await client.receive_some() == b""
                await client.aclose()
    assert server_received == [up]
    assert client_received == [down]


# -- from_config errors --------------------------------------------------------------------


def key_paths(info: pytest.ExceptionInfo[errors.ConfigErrors]) -> dict[str, str]:
    return {error.key_path: error.message for error in info.value.errors}


def test_config_errors_are_all_reported(files: CertFiles) -> None:
    good = make_host(files, 0, ["good.test"])
    other = CA.issue_cert("other.test")
    missing = HostConfig(
        names=("missing.test",),
        routes=(),
        certificate=files.folder / "no-such.crt",
        private_key=files.folder / "no-such.key",
        index=1,
    )
    mismatch = HostConfig(
        names=("mismatch.test",),
        routes=(),
        certificate=good.certificate,
        private_key=files.write(other)[1],
        index=2,
    )
    garbage = HostConfig(
        names=("garbage.test",),
        routes=(),
        certificate=files.path("garbage.crt", b"this is not a certificate\n"),
        private_key=files.path(
            "garbage.key", b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"
        ),
        index=3,
    )
    bad_ciphers = make_host(files, 4, ["ciphers.test"], tls=TLSSettings(ciphers="xyz"))
    config = make_config(files, [good, missing, mismatch, garbage, bad_ciphers])
    with pytest.raises(errors.ConfigErrors) as info:
        ServerTLS.from_config(config)
    found = key_paths(info)
    assert set(found) == {
        "host[1].certificate",
        "host[1].private_key",
        "host[2].private_key",
        "host[3].certificate",
        "host[3].private_key",
        "host[4].ciphers",
    }
    assert found["host[1].certificate"].startswith("certificate file not found: ")
    assert found["host[1].private_key"].startswith("private key file not found: ")
    assert "does not match certificate" in found["host[2].private_key"]
    assert "is not a PEM certificate" in found["host[3].certificate"]
    assert "is not a PEM private key" in found["host[3].private_key"]
    assert found["host[4].ciphers"].startswith("no cipher matches 'xyz'")
    assert all(error.file == str(config.path) for error in info.value.errors)
    assert "host[2].private_key: private key" in str(info.value)


def test_config_error_for_bad_default_ciphers_reported_once(files: CertFiles) -> None:
    bad = TLSSettings(ciphers="NOPE")
    config = make_config(
        files,
        [make_host(files, 0, ["a.test"], tls=bad), make_host(files, 1, ["b.test"], tls=bad)],
        tls=bad,
    )
    with pytest.raises(errors.ConfigErrors) as info:
        ServerTLS.from_config(config)
    assert list(key_paths(info)) == ["tls.ciphers"]


def test_config_error_encrypted_key_and_missing_certificate(files: CertFiles) -> None:
    leaf = CA.issue_cert("locked.test")
    cert_path, _ = files.write(leaf)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    locked = files.path(
        "locked.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    )
    hosts = [
        HostConfig(
            names=("locked.test",), routes=(), certificate=cert_path, private_key=locked, index=0
        ),
        HostConfig(names=("nocert.test",), routes=(), index=1),
    ]
    with pytest.raises(errors.ConfigErrors) as info:
        ServerTLS.from_config(make_config(files, hosts))
    found = key_paths(info)
    assert "is encrypted" in found["host[0].private_key"]
    assert found["host[1].certificate"] == "required when a listener has tls = true"


def test_host_without_certificate_skipped_without_tls_listener(files: CertFiles) -> None:
    config = Config(
        path=files.folder / "plain.toml",
        listeners=(ListenerConfig(Address("127.0.0.1", 0), tls=False),),
        hosts=(HostConfig(names=("plain.test",), routes=(), index=0),),
    )
    assert isinstance(ServerTLS.from_config(config), ServerTLS)


def test_expired_certificate_is_a_warning(
    files: CertFiles, caplog: pytest.LogCaptureFixture
) -> None:
    leaf = CA.issue_cert(
        "old.test", not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    )
    with caplog.at_level("WARNING", logger="gatewayd.tls"):
        ServerTLS.from_config(make_config(files, [make_host(files, 0, ["old.test"], cert=leaf)]))
    assert any("expired" in record.getMessage() for record in caplog.records)


@pytest.fixture(autouse=True)
def _no_stray_output() -> Iterator[None]:
    # pyOpenSSL's own callbacks report errors through sys.excepthook; make any
    # such call fail the test instead of scrolling by.
    def hook(*args: object) -> None:
        raise AssertionError(f"sys.excepthook called: {args!r}")

    previous = sys.excepthook
    sys.excepthook = hook
    try:
        yield
    finally:
        sys.excepthook = previous
