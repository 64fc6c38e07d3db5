"""SPEC section 3 over real sockets: stdlib-ssl clients, the real server task, real backends.

One test per row (1-14, 16-20), plus the origin log's Firefox 12 request.
"""

from __future__ import annotations

import ssl
import textwrap
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from harness import (
    Certs,
    Running,
    echo_backend,
    exchange,
    make_certs,
    raw_backend,
    read_head,
    receive_all,
    running_gateway,
    switching_protocols,
    tls_client,
    upgrade_request,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost", "127.0.0.1")
    certs.issue("chat.example.com")
    certs.issue("*.example.org")
    return certs


async def refusing_backend(stream: trio.SocketStream) -> None:
    head, _ = await read_head(stream)
    await stream.send_all(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nX-Reason: nope\r\n\r\n"
        b"e\r\n{\"error\":\"no\"}\r\n0\r\n\r\n"
    )
    # Anything arriving now would be a tunnel after a refusal: record it.
    REFUSED_AFTER.append(await receive_all(stream, 3.0))


REFUSED_AFTER: list[bytes] = []


async def bad_accept_backend(stream: trio.SocketStream) -> None:
    await read_head(stream)
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
    )
    await receive_all(stream, 3.0)


async def silent_backend(stream: trio.SocketStream) -> None:
    await trio.sleep(10)


RAW_SEEN: list[bytes] = []
RAW_BEFORE_101: list[bytes] = []


async def raw_echo_backend(stream: trio.SocketStream) -> None:
    """Valid 101, then echoes raw bytes; records the request head."""
    head, rest = await read_head(stream)
    RAW_SEEN.append(head)
    RAW_BEFORE_101.append(rest)
    await stream.send_all(switching_protocols(head))
    if rest:
        await stream.send_all(rest)
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return
        if not data:
            await stream.send_eof()
            return
        await stream.send_all(data)


async def closed_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@dataclass
class Env:
    gw: Running
    certs: Certs
    ctx: ssl.SSLContext

    async def connect(self, sni: str | None = "localhost") -> trio.SSLStream:
        return await tls_client(self.gw.port, self.ctx, sni)

    async def ask(self, request: bytes, sni: str | None = "localhost"):
        stream = await self.connect(sni)
        return await exchange(stream, request)


def write_config(directory: Path, certs: Certs, ports: dict[str, int], *, default: bool = False, extra_gateway: str = "") -> Path:
    d = certs.directory
    text = textwrap.dedent(
        f"""
        [gateway]
        handshake_timeout = 2.0
        backend_connect_timeout = 1.0
        max_request_head = 4096
        {extra_gateway}

        [[listener]]
        address = "127.0.0.1:0"

        [[host]]
        names = ["localhost", "127.0.0.1"]
        certificate = "{d}/localhost.pem"
        private_key = "{d}/localhost.key"
        default = {"true" if default else "false"}

        [[host.route]]
        path = "/echo"
        backend = "ws://127.0.0.1:{ports['echo']}"

        [[host.route]]
        path = "/strict"
        backend = "ws://127.0.0.1:{ports['echo']}/echo"
        origins = ["https://app.example.com"]
        subprotocols = ["v2", "v1"]

        [[host.route]]
        path = "/dead"
        backend = "ws://127.0.0.1:{ports['dead']}"

        [[host.route]]
        path = "/slow"
        backend = "ws://127.0.0.1:{ports['slow']}"

        [[host.route]]
        path = "/refuse"
        backend = "ws://127.0.0.1:{ports['refuse']}"

        [[host.route]]
        path = "/bad101"
        backend = "ws://127.0.0.1:{ports['bad']}"

        [[host.route]]
        path_prefix = "/raw/"
        backend = "ws://127.0.0.1:{ports['raw']}/inner/"

        [[host]]
        names = ["chat.example.com"]
        certificate = "{d}/chat.example.com.pem"
        private_key = "{d}/chat.example.com.key"

        [[host.route]]
        path = "/"
        backend = "ws://127.0.0.1:{ports['echo']}"

        [[host]]
        names = ["*.example.org"]
        certificate = "{d}/star.example.org.pem"
        private_key = "{d}/star.example.org.key"

        [[host.route]]
        path = "/"
        backend = "ws://127.0.0.1:{ports['echo']}"
        """
    )
    path = directory / "gatewayd.toml"
    path.write_text(text)
    return path


@pytest.fixture
async def env(certs: Certs, tmp_path: Path) -> AsyncIterator[Env]:
    async with AsyncExitStack() as stack:
        ports = {
            "echo": await stack.enter_async_context(echo_backend()),
            "slow": await stack.enter_async_context(raw_backend(silent_backend)),
            "refuse": await stack.enter_async_context(raw_backend(refusing_backend)),
            "bad": await stack.enter_async_context(raw_backend(bad_accept_backend)),
            "raw": await stack.enter_async_context(raw_backend(raw_echo_backend)),
            "dead": await closed_port(),
        }
        gw = await stack.enter_async_context(running_gateway(write_config(tmp_path, certs, ports)))
        with trio.fail_after(20):
            yield Env(gw, certs, certs.client_context())


def ws_client() -> Connection:
    return Connection(ConnectionType.CLIENT)


async def ws_roundtrip(stream: trio.abc.Stream, rest: bytes, text: str) -> str:
    """Send one text message over an upgraded stream and return the echoed text."""
    ws = ws_client()
    if rest:
        ws.receive_data(rest)
    await stream.send_all(ws.send(TextMessage(data=text)))
    while True:
        for event in ws.events():
            if isinstance(event, TextMessage):
                return event.data
        data = await stream.receive_some(65536)
        assert data, "EOF before the echo"
        ws.receive_data(data)


# ------------------------------------------------------------------ row 20 and Firefox


async def test_firefox_12_request_gets_101_and_echoes(env: Env) -> None:
    request = (
        b"GET /echo HTTP/1.1\r\n"
        b"Host: localhost\r\n"
        b"User-Agent: Mozilla/5.0 (Windows NT 5.2; WOW64; rv:12.0) Gecko/20100101 Firefox/12.0\r\n"
        b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        b"Accept-Language: en-us,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate\r\n"
        b"Connection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Origin: https://localhost\r\n"
        b"Sec-WebSocket-Key: iTAsnxQZ045LBMzPRnlYGg==\r\n"
        b"Pragma: no-cache\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Upgrade: websocket\r\n\r\n"
    )
    stream = await env.connect()
    await stream.send_all(request)
    head, rest = await read_head(stream)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert b"Sec-WebSocket-Accept: DlzGzimVwZhqPo2kSi1RfDjBXLE=" in lines
    assert b"Upgrade: websocket" in lines and b"Connection: Upgrade" in lines
    assert await ws_roundtrip(stream, rest, "hello from 2012") == "hello from 2012"
    await stream.aclose()


async def test_row20_subprotocol_filtered_and_chosen(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(
        upgrade_request(
            "/strict", "localhost", "Origin: https://App.Example.com", "Sec-WebSocket-Protocol: x, v1, v2"
        )
    )
    head, _ = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 ")
    # The backend picks the first it is offered; the gateway filtered "x" out.
    assert b"\r\nSec-WebSocket-Protocol: v1\r\n" in head
    await stream.aclose()


# ------------------------------------------------------------------ rows 1-4


async def test_row1_unknown_sni_gets_unrecognized_name_alert(env: Env) -> None:
    with pytest.raises(trio.BrokenResourceError) as info:
        await env.connect("nobody.test")
    assert isinstance(info.value.__cause__, ssl.SSLError)
    assert "UNRECOGNIZED_NAME" in str(info.value.__cause__).upper()


async def test_row1_no_sni_and_no_default_gets_alert(env: Env) -> None:
    ctx = env.certs.client_context()
    ctx.check_hostname = False
    with pytest.raises(trio.BrokenResourceError) as info:
        await tls_client(env.gw.port, ctx, None)
    assert "UNRECOGNIZED_NAME" in str(info.value.__cause__).upper()


async def test_row2_plain_http_on_tls_port(env: Env) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
    answer = await exchange(tcp, upgrade_request())
    assert answer.status == 400
    assert b"plain HTTP sent to a TLS port" in answer.body


async def test_row3_incomplete_head_gets_408_then_close(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n")
    with trio.fail_after(5):
        data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


async def test_row3_silent_tls_client_closed_without_answer(env: Env) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
    with trio.fail_after(5):
        assert await receive_all(tcp) == b""


async def test_row4_head_too_large_gets_431(env: Env) -> None:
    big = upgrade_request("/echo", "localhost", "X-Big: " + "a" * 5000)
    answer = await env.ask(big)
    assert answer.status == 431
    assert answer.head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


# ------------------------------------------------------------------ rows 5-14


@pytest.mark.parametrize(
    "request_bytes, sni, status",
    [
        pytest.param(b"GET /echo HTTP/1.0\r\nHost: localhost\r\n\r\n", "localhost", 400, id="row5-http10"),
        pytest.param(upgrade_request("/echo", "localhost", "X-A: 1", " folded"), "localhost", 400, id="row5-obs-fold"),
        pytest.param(upgrade_request("/echo", "localhost", "Host: localhost"), "localhost", 400, id="row5-dup-host"),
        pytest.param(upgrade_request("/echo", "chat.example.com"), "localhost", 421, id="row6-misdirected"),
        pytest.param(upgrade_request("/", "localhost"), "chat.example.com", 421, id="row6-misdirected-2"),
        pytest.param(upgrade_request("/echo", "localhost", method="POST"), "localhost", 405, id="row8-post"),
        pytest.param(upgrade_request("/missing"), "localhost", 404, id="row9-no-route"),
        pytest.param(upgrade_request("/echo", "localhost", "Content-Length: 3") + b"abc", "localhost", 400, id="row10-body"),
        pytest.param(upgrade_request("/echo").replace(b"Upgrade: websocket\r\n", b""), "localhost", 426, id="row11-no-upgrade"),
        pytest.param(upgrade_request("/echo").replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), "localhost", 426, id="row12-version"),
        pytest.param(upgrade_request("/echo", key="tooshort"), "localhost", 400, id="row13-key"),
        pytest.param(upgrade_request("/strict", "localhost", "Origin: https://evil.example"), "localhost", 403, id="row14-origin"),
    ],
)
async def test_rows_5_to_14(env: Env, request_bytes: bytes, sni: str, status: int) -> None:
    answer = await env.ask(request_bytes, sni)
    assert answer.status == status
    assert answer.header("connection") is not None
    assert answer.header("content-length") == str(len(answer.body))
    assert answer.header("content-type") == "text/plain; charset=utf-8"
    assert answer.header("server") == "gatewayd"


async def test_row8_405_allow(env: Env) -> None:
    answer = await env.ask(upgrade_request("/echo", "localhost", method="POST"))
    assert answer.header("allow") == "GET"


async def test_row11_426_headers(env: Env) -> None:
    answer = await env.ask(upgrade_request("/echo").replace(b"Upgrade: websocket\r\n", b""))
    assert answer.header("upgrade") == "websocket"
    assert answer.header("connection") == "Upgrade, close"


async def test_row12_426_version(env: Env) -> None:
    answer = await env.ask(upgrade_request("/echo").replace(b"Version: 13", b"Version: 7"))
    assert answer.header("sec-websocket-version") == "13"


async def test_wildcard_host_by_sni(env: Env) -> None:
    stream = await env.connect("a.example.org")
    await stream.send_all(upgrade_request("/", "a.example.org"))
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert await ws_roundtrip(stream, rest, "wild") == "wild"
    with pytest.raises(trio.BrokenResourceError) as info:
        await env.connect("a.b.example.org")
    assert "UNRECOGNIZED_NAME" in str(info.value.__cause__).upper()


# ------------------------------------------------------------------ rows 16-19


async def test_row16_backend_refuses_502(env: Env) -> None:
    answer = await env.ask(upgrade_request("/dead"))
    assert answer.status == 502


async def test_row17_backend_silent_504(env: Env) -> None:
    with trio.fail_after(4):
        answer = await env.ask(upgrade_request("/slow"))
    assert answer.status == 504


async def test_row18_non_101_relayed_never_tunnelled(env: Env) -> None:
    REFUSED_AFTER.clear()
    stream = await env.connect()
    await stream.send_all(upgrade_request("/refuse") + b"SMUGGLED")
    data = await receive_all(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"\r\nX-Reason: nope" in head
    assert b"Transfer-Encoding" not in head
    assert b"Content-Length: 14" in head
    assert body == b'{"error":"no"}'
    with trio.fail_after(5):
        while not REFUSED_AFTER:
            await trio.sleep(0.01)
    assert REFUSED_AFTER == [b""]


async def test_row19_bad_accept_502(env: Env) -> None:
    answer = await env.ask(upgrade_request("/bad101"))
    assert answer.status == 502


# ------------------------------------------------------------------ passthrough details


async def test_backend_sees_rewritten_path_and_forwarding_headers(env: Env) -> None:
    RAW_SEEN.clear()
    stream = await env.connect()
    await stream.send_all(
        upgrade_request(
            "/raw/room/7?token=x", "localhost", "X-Forwarded-For: 6.6.6.6", "Cookie: a=b", "Keep-Alive: 5"
        )
    )
    head, _ = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 ")
    seen = RAW_SEEN[0].split(b"\r\n")
    assert seen[0] == b"GET /inner/room/7?token=x HTTP/1.1"
    assert b"Host: localhost" in seen
    assert b"X-Forwarded-For: 127.0.0.1" in seen
    assert b"X-Forwarded-Proto: https" in seen
    assert b"Cookie: a=b" in seen
    assert not any(line.startswith(b"Keep-Alive") for line in seen)
    await stream.aclose()


async def test_early_data_both_ways_in_order(env: Env) -> None:
    RAW_BEFORE_101.clear()
    stream = await env.connect()
    # The client's first frame rides in the same write as the head.
    await stream.send_all(upgrade_request("/raw/x") + b"EARLY-CLIENT")
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 ")
    # raw_echo_backend echoes the early bytes right after its 101.
    while len(rest) < len(b"EARLY-CLIENT"):
        rest += await stream.receive_some(65536)
    assert rest == b"EARLY-CLIENT"
    # The gateway held the early bytes back until the backend had said 101.
    assert RAW_BEFORE_101 == [b""]
    await stream.aclose()


async def test_20_mib_each_way_intact(env: Env) -> None:
    import hashlib
    import os

    payload = os.urandom(20 * 1024 * 1024)
    stream = await env.connect()
    await stream.send_all(upgrade_request("/raw/bulk"))
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 ")
    received = hashlib.sha256(rest)
    count = len(rest)

    async def sender() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 256 * 1024):
            await stream.send_all(view[i : i + 256 * 1024])

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while count < len(payload):
                data = await stream.receive_some(1 << 20)
                assert data
                received.update(data)
                count += len(data)
    assert count == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
    await stream.aclose()


async def test_trio_websocket_client_through_gateway(env: Env) -> None:
    from trio_websocket import open_websocket_url

    async with open_websocket_url(f"wss://localhost:{env.gw.port}/echo", ssl_context=env.ctx) as ws:
        for text in ("one", "two", "three"):
            await ws.send_message(text)
            assert await ws.get_message() == text
        await ws.send_message(b"\x00\x01binary")
        assert await ws.get_message() == b"\x00\x01binary"


async def test_websockets_client_through_gateway(env: Env) -> None:
    from websockets.sync.client import connect

    def session() -> list[str]:
        with connect(f"wss://localhost:{env.gw.port}/echo", ssl=env.ctx, open_timeout=5) as ws:
            out = []
            for text in ("alpha", "beta"):
                ws.send(text)
                out.append(str(ws.recv(timeout=5)))
            return out

    assert await trio.to_thread.run_sync(session) == ["alpha", "beta"]
