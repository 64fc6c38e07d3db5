"""``http = true`` routes end to end (SPEC section 7): a real TLS client, the real
gateway, a real HTTP/1.1 backend, over real sockets."""

from __future__ import annotations

import base64
import json
import re
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import h11
import pytest
import trio
from trio_websocket import open_websocket_url

from gatewayd.config import load
from harness import (
    Certs,
    Running,
    echo_backend,
    make_certs,
    raw_backend,
    read_head,
    receive_all,
    running_gateway,
    tls_client,
    upgrade_request,
)
from httpkit import Client, Seen, app_backend

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost", "127.0.0.1")
    return certs


def write_users(path: Path) -> None:
    hashed = "$2y$" + bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()[4:]
    path.write_text(f"alice:{hashed}\n")


def write_config(
    directory: Path, certs: Certs, app: int, echo: int, *, gateway: str = "", extra_routes: str = ""
) -> Path:
    cert, key = directory / "..", None
    cert_path = certs.directory / "localhost.pem"
    key_path = certs.directory / "localhost.key"
    del cert, key
    write_users(directory / "users.htpasswd")
    path = directory / "http.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            handshake_timeout = 5.0
            backend_connect_timeout = 2.0
            shutdown_timeout = 5.0
            {gateway}

            [[listener]]
            address = "127.0.0.1:0"

            [[host]]
            names = ["localhost"]
            certificate = "{cert_path}"
            private_key = "{key_path}"

            [[host.route]]
            path_prefix = "/app/"
            backend = "ws://127.0.0.1:{app}/"
            http = true

            [[host.route]]
            path_prefix = "/small/"
            backend = "ws://127.0.0.1:{app}/"
            http = true
            max_body_size = 10

            [[host.route]]
            path_prefix = "/private/"
            backend = "ws://127.0.0.1:{app}/"
            http = true
            auth = "basic"
            auth_users = "users.htpasswd"

            [[host.route]]
            path_prefix = "/lan/"
            backend = "ws://127.0.0.1:{app}/"
            http = true
            allow = ["10.0.0.0/8"]

            [[host.route]]
            path = "/ws"
            backend = "ws://127.0.0.1:{echo}/"

            {extra_routes}
            """
        )
    )
    return path


@dataclass
class Env:
    certs: Certs
    running: Running
    seen: Seen
    config: Path

    async def connect(self) -> trio.SSLStream[trio.SocketStream]:
        return await tls_client(self.running.port, self.certs.client_context(), "localhost")

    async def client(self) -> Client:
        return Client(await self.connect())


@pytest.fixture
async def env(certs: Certs, tmp_path: Path) -> AsyncIterator[Env]:
    seen = Seen()
    async with app_backend(seen) as app, echo_backend() as echo:
        config = write_config(tmp_path, certs, app, echo)
        async with running_gateway(config) as running:
            yield Env(certs, running, seen, config)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------ the request


async def test_get_is_proxied_with_rewritten_path_and_forwarding_headers(env: Env) -> None:
    client = await env.client()
    reply = await client.request(
        "GET",
        "/app/info?q=1",
        headers=[
            ("User-Agent", "test"),
            ("Cookie", "a=b"),
            ("Connection", "X-Secret"),
            ("X-Secret", "hop"),
            ("Keep-Alive", "timeout=1"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Upgrade", "h2c"),
        ],
    )
    assert reply.status == 200
    seen = reply.json()
    assert seen["method"] == "GET"
    assert seen["target"] == "/info?q=1"
    assert seen["version"] == "1.1"
    headers = {k.lower(): v for k, v in seen["headers"]}  # type: ignore[union-attr]
    assert headers["host"] == "localhost"
    assert headers["user-agent"] == "test"
    assert headers["cookie"] == "a=b"
    assert headers["x-forwarded-for"] == "127.0.0.1"   # replaced: the client is no trusted proxy
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == "localhost"
    assert headers["forwarded"] == "for=127.0.0.1;host=localhost;proto=https"
    for hop in ("x-secret", "keep-alive", "upgrade", "te", "transfer-encoding"):
        assert hop not in headers
    # The backend's hop-by-hop headers do not reach the client either.
    assert reply.header("X-Backend") == "app"
    assert reply.header("X-Hop") is None
    assert reply.header("Keep-Alive") is None
    assert reply.header("Content-Length") == str(len(reply.body))


@pytest.mark.parametrize("size", [0, 1, 70000])
async def test_post_body_with_content_length_reaches_the_backend(env: Env, size: int) -> None:
    client = await env.client()
    body = bytes(i % 251 for i in range(size))
    reply = await client.request("POST", "/app/info", body=body)
    seen = reply.json()
    assert seen["body_length"] == size
    import hashlib

    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = {k.lower(): v for k, v in seen["headers"]}  # type: ignore[union-attr]
    assert headers["content-length"] == str(size)


async def test_chunked_upload_is_streamed_back(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(
        b"POST /app/echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n"
    )
    client = Client(stream)
    # The echo answers the first piece before the body ended: streamed, not buffered.
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    data = rest
    with trio.fail_after(5):
        while b"hello" not in data:
            data += await stream.receive_some(65536)
    await stream.send_all(b"6\r\n world\r\n0\r\n\r\n")
    with trio.fail_after(5):
        while not data.endswith(b"0\r\n\r\n"):
            data += await stream.receive_some(65536)
    assert b"hello" in data and b" world" in data
    del client


async def test_keep_alive_reuses_the_backend_connection_of_this_client_only(env: Env) -> None:
    first = await env.client()
    for _ in range(3):
        assert (await first.request("GET", "/app/info")).status == 200
    second = await env.client()
    assert (await second.request("GET", "/app/info")).status == 200
    peers = [tuple(r["peer"]) for r in env.seen.requests]  # type: ignore[arg-type]
    # Three requests of one client connection on one backend connection, the
    # other client's request on another.
    assert peers[0] == peers[1] == peers[2]
    assert peers[3] != peers[0]
    assert env.seen.connections == 2


async def test_head_204_304_have_no_body_and_connection_stays_usable(env: Env) -> None:
    client = await env.client()
    head = await client.request("HEAD", "/app/bytes/1000")
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == "1000"
    no_content = await client.request("GET", "/app/status/204")
    assert no_content.status == 204 and no_content.body == b""
    assert no_content.header("Content-Length") is None
    not_modified = await client.request("GET", "/app/status/304")
    assert not_modified.status == 304 and not_modified.body == b""
    after = await client.request("GET", "/app/info")
    assert after.status == 200


async def test_backend_error_statuses_are_relayed_with_keep_alive(env: Env) -> None:
    client = await env.client()
    reply = await client.request("GET", "/app/status/404")
    assert (reply.status, reply.body) == (404, b"status 404")
    assert (await client.request("GET", "/app/info")).status == 200


async def test_chunked_backend_answer_is_rechunked(env: Env) -> None:
    client = await env.client()
    reply = await client.request("GET", "/app/chunked/200000")
    assert reply.status == 200 and len(reply.body) == 200000
    assert reply.header("Transfer-Encoding") == "chunked"


async def test_informational_103_is_relayed(env: Env) -> None:
    client = await env.client()
    reply = await client.request("GET", "/app/hints")
    assert reply.informational == [103]
    assert reply.status == 200


async def test_expect_100_continue(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(
        b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    with trio.fail_after(5):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n")  # with its reason phrase, as from nginx
    await stream.send_all(b"abcde")
    client = Client(stream)
    client.conn.send(
        h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "5")])
    )
    client.conn.send(h11.Data(data=b"abcde"))
    client.conn.send(h11.EndOfMessage())
    client.conn.receive_data(data)
    reply = await client.response()
    assert reply.status == 200
    seen = reply.json()
    assert seen["body_length"] == 5
    headers = {k.lower() for k, _ in seen["headers"]}  # type: ignore[union-attr]
    assert "expect" not in headers


async def test_max_body_size_413_before_the_backend(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(
        b"POST /small/info HTTP/1.1\r\nHost: localhost\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    )
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in data
    assert env.seen.requests == []


async def test_max_body_size_413_for_a_chunked_body_over_it(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(
        b"POST /small/info HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"b\r\nhello world\r\n0\r\n\r\n"
    )
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert env.seen.requests == []


@pytest.mark.parametrize(
    ("prefix", "body", "status"),
    [
        # One chunk declared over max_body_size (10): its data never comes.
        ("/small/", b"7d0\r\nhello", 413),
        # Only the chunk header: refused before any data is waited for.
        ("/small/", b"b\r\n", 413),
        # Sizes adding up over the limit, each under it.
        ("/small/", b"5\r\nhello\r\n6\r\nwor", 413),
        # Over 64 bits but within h11's 20 hex digits: absurd at any limit.
        ("/app/", b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n", 400),
        ("/app/", b"8000000000000000;ext=1\r\nhello", 400),
    ],
)
async def test_declared_chunk_size_is_refused_before_its_data(
    env: Env, prefix: str, body: bytes, status: int
) -> None:
    # The client stays open and sends nothing more: the answer must come at
    # once (receive_all's bound is far below http_timeout), not on a timeout.
    stream = await env.connect()
    await stream.send_all(
        f"POST {prefix}info HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + body
    )
    data = await receive_all(stream)
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data
    assert b"Connection: close" in data
    assert env.seen.requests == []


async def test_chunk_sizes_under_the_limit_split_across_reads_reach_the_backend(env: Env) -> None:
    # The size lines are followed across TCP reads without false refusals.
    stream = await env.connect()
    await stream.send_all(b"POST /small/info HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in (b"0", b"5", b"\r", b"\nhel", b"lo\r", b"\n", b"5;x=y \r\nworld\r\n0\r\n\r\n"):
        await stream.send_all(piece)
        await trio.sleep(0.05)
    head, _ = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert [r["body_length"] for r in env.seen.requests] == [10]


async def test_backend_answer_before_the_body_ends_the_connection(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(
        b"POST /app/early HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
    )
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"nope" in data


async def test_basic_auth_applies_to_plain_requests(env: Env) -> None:
    client = await env.client()
    denied = await client.request("GET", "/private/info")
    assert denied.status == 401
    assert denied.header("WWW-Authenticate") is not None
    client = await env.client()
    ok = await client.request("GET", "/private/info", headers=[("Authorization", basic("alice", "secret"))])
    assert ok.status == 200
    headers = {k.lower() for k, _ in ok.json()["headers"]}  # type: ignore[union-attr]
    assert "authorization" not in headers   # auth_forward = false


async def test_allow_applies_to_plain_requests(env: Env) -> None:
    client = await env.client()
    assert (await client.request("GET", "/lan/info")).status == 403
    assert env.seen.requests == []


async def test_plain_get_on_a_websocket_route_is_426_and_post_405(env: Env) -> None:
    client = await env.client()
    assert (await client.request("GET", "/ws")).status == 426
    client = await env.client()
    assert (await client.request("POST", "/ws", body=b"x")).status == 405


async def test_websocket_upgrade_on_a_kept_alive_connection(env: Env) -> None:
    stream = await env.connect()
    client = Client(stream)
    assert (await client.request("GET", "/app/info")).status == 200
    assert (await client.request("GET", "/app/info")).status == 200
    await stream.send_all(upgrade_request("/ws", "localhost"))
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 ")
    # A masked text frame "hi" and its echo.
    await stream.send_all(bytes([0x81, 0x82, 1, 2, 3, 4]) + bytes(a ^ b for a, b in zip(b"hi", b"\x01\x02\x03\x04", strict=False)))
    data = rest
    with trio.fail_after(5):
        while len(data) < 4:
            data += await stream.receive_some(65536)
    assert data[:4] == b"\x81\x02hi"


async def test_backend_101_to_a_plain_request_is_502(env: Env, tmp_path: Path) -> None:
    async def upgrader(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nTUNNEL")
        await trio.sleep(5)

    async with raw_backend(upgrader) as port:
        config = write_config(
            tmp_path, env.certs, port, port,
        )
        async with running_gateway(config) as running:
            stream = await tls_client(running.port, env.certs.client_context(), "localhost")
            await stream.send_all(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 502 ")
    assert b"TUNNEL" not in data


async def test_backend_down_502_and_silent_504(env: Env, tmp_path: Path) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep(30)

    # A port with nothing listening.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    closed = sock.getsockname()[1]
    sock.close()
    async with raw_backend(silent) as silent_port:
        config = write_config(
            tmp_path, env.certs, closed, silent_port, gateway="http_timeout = 0.5",
            extra_routes=f'[[host.route]]\npath = "/silent"\nbackend = "ws://127.0.0.1:{silent_port}"\nhttp = true\n',
        )
        async with running_gateway(config) as running:
            stream = await tls_client(running.port, env.certs.client_context(), "localhost")
            down = await Client(stream).request("GET", "/app/x")
            assert down.status == 502
            stream = await tls_client(running.port, env.certs.client_context(), "localhost")
            slow = await Client(stream).request("GET", "/silent")
            assert slow.status == 504


async def test_http_timeout_allows_a_long_poll_shorter_than_it(env: Env, tmp_path: Path) -> None:
    client = await env.client()
    reply = await client.request("GET", "/app/slow/1.0")
    assert reply.status == 200


async def test_connection_close_from_the_client_ends_after_the_answer(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(b"GET /app/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in data.lower()


async def test_http10_is_answered_as_http11_and_closed(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(b"GET /app/info HTTP/1.0\r\nHost: localhost\r\n\r\n")
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 200 ")
    seen = env.seen.requests[0]
    assert seen["version"] == "1.1"


async def test_http10_keep_alive_keeps_the_connection(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(b"GET /app/info HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: keep-alive" in head.lower()
    length = int(
        [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0]
        .split(b":")[1]
    )
    with trio.fail_after(5):
        while len(rest) < length:
            rest += await stream.receive_some(65536)
    await stream.send_all(b"GET /app/info HTTP/1.0\r\nHost: localhost\r\n\r\n")
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 200 ")


async def test_http10_without_host_is_for_the_host_tls_chose(env: Env) -> None:
    # Host is optional in HTTP/1.0: as from nginx, the request is for the
    # connection's host, and the backend gets that host's name as Host.
    stream = await env.connect()
    await stream.send_all(b"GET /app/info HTTP/1.0\r\n\r\n")
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    seen = env.seen.requests[0]
    assert seen["version"] == "1.1"
    assert {k.lower(): v for k, v in seen["headers"]}["host"] == "localhost"  # type: ignore[union-attr]
    # HTTP/1.1 still needs its Host (RFC 9112 section 3.2).
    stream = await env.connect()
    await stream.send_all(b"GET /app/info HTTP/1.1\r\n\r\n")
    assert (await receive_all(stream)).startswith(b"HTTP/1.1 400 ")


async def test_http10_on_a_websocket_route_is_400(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(b"GET /ws HTTP/1.0\r\nHost: localhost\r\n\r\n")
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    "target, status",
    [
        pytest.param(b"CONNECT localhost:443 HTTP/1.1", 405, id="connect"),
        pytest.param(b"OPTIONS * HTTP/1.1", 405, id="options-asterisk"),
        # Row 6: on a TLS listener the target's authority names the host, here not SNI's.
        pytest.param(b"GET https://elsewhere.example/app/info HTTP/1.1", 421, id="absolute-form-other-host"),
        pytest.param(b"GET https://localhost/app/info HTTP/1.1\r\nHost: other.example", 400, id="absolute-form-not-host"),
    ],
)
async def test_connect_asterisk_and_foreign_absolute_form(env: Env, target: bytes, status: int) -> None:
    stream = await env.connect()
    await stream.send_all(target + b"\r\nHost: localhost\r\n\r\n")
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 %d " % status)
    assert env.seen.requests == []


# ------------------------------------------------------------------ keep-alive limits


async def test_max_requests_per_connection(certs: Certs, tmp_path: Path) -> None:
    seen = Seen()
    async with app_backend(seen) as app:
        config = write_config(tmp_path, certs, app, app, gateway="max_requests_per_connection = 2")
        async with running_gateway(config) as running:
            stream = await tls_client(running.port, certs.client_context(), "localhost")
            client = Client(stream)
            first = await client.request("GET", "/app/info")
            assert first.header("Connection") is None
            second = await client.request("GET", "/app/info")
            assert second.header("Connection") == "close"
            assert await receive_all(stream) == b""


async def test_keepalive_timeout_closes_an_idle_connection(certs: Certs, tmp_path: Path) -> None:
    seen = Seen()
    async with app_backend(seen) as app:
        config = write_config(tmp_path, certs, app, app, gateway="http_keepalive_timeout = 0.5")
        async with running_gateway(config) as running:
            stream = await tls_client(running.port, certs.client_context(), "localhost")
            assert (await Client(stream).request("GET", "/app/info")).status == 200
            with trio.fail_after(5):
                assert await receive_all(stream) == b""


async def test_sigterm_closes_idle_kept_alive_connections_at_once(certs: Certs, tmp_path: Path) -> None:
    seen = Seen()
    async with app_backend(seen) as app:
        config = write_config(tmp_path, certs, app, app)
        async with running_gateway(config) as running:
            stream = await tls_client(running.port, certs.client_context(), "localhost")
            assert (await Client(stream).request("GET", "/app/info")).status == 200
            running.gateway.shutdown()
            # Well before shutdown_timeout (5 s): the idle connection is closed at once.
            with trio.fail_after(2):
                assert await receive_all(stream) == b""


async def test_sighup_next_request_uses_the_new_configuration(certs: Certs, tmp_path: Path) -> None:
    seen = Seen()
    async with app_backend(seen) as app:
        config = write_config(tmp_path, certs, app, app)
        async with running_gateway(config) as running:
            stream = await tls_client(running.port, certs.client_context(), "localhost")
            client = Client(stream)
            assert (await client.request("GET", "/app/info")).status == 200
            text = config.read_text().replace('path_prefix = "/app/"', 'path_prefix = "/moved/"')
            config.write_text(text)
            await running.gateway.reload(load(config))
            assert (await client.request("GET", "/moved/info")).status == 200
            assert (await client.request("GET", "/app/info")).status == 404


async def test_access_line_and_metrics_per_request(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="gatewayd.access")
    client = await env.client()
    await client.request("GET", "/app/info?token=secret")
    await client.request("POST", "/app/info", body=b"12345")
    with trio.fail_after(5):
        while len([r for r in caplog.records if hasattr(r, "access")]) < 2:
            await trio.sleep(0.01)
    lines = [r.access for r in caplog.records if hasattr(r, "access")]  # type: ignore[attr-defined]
    assert [(line["method"], line["path"], line["status"]) for line in lines[:2]] == [
        ("GET", "/app/info", 200),
        ("POST", "/app/info", 200),
    ]
    assert "secret" not in json.dumps(lines)
    assert lines[1]["route"] == "host[0]:/app/*"
    assert lines[1]["backend"].startswith("ws://127.0.0.1:")
    assert lines[1]["bytes_in"] > 5 and lines[1]["bytes_out"] > 0
    metrics = env.running.gateway.metrics.render().decode()
    assert 'gatewayd_http_requests_total{code="200",route="host[0]:/app/*"} 2.0' in metrics
    assert 'gatewayd_http_request_duration_seconds_count{route="host[0]:/app/*"} 2.0' in metrics


async def test_wss_backend_speaks_https(certs: Certs, tmp_path: Path) -> None:
    seen = Seen()
    server_context = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    cert, key = certs.issue("127.0.0.1")
    server_context.load_cert_chain(str(cert), str(key))
    from httpkit import app_connection

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        try:
            await tls.do_handshake()
            await app_connection(tls, seen)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    ca = tmp_path / "ca.pem"
    certs.ca.cert_pem.write_to_path(str(ca))
    async with raw_backend(handler) as port:
        config = write_config(
            tmp_path, certs, port, port,
            extra_routes=f'[[host.route]]\npath_prefix = "/secure/"\nbackend = "wss://127.0.0.1:{port}/"\nhttp = true\nbackend_ca = "{ca}"\n',
        )
        async with running_gateway(config) as running:
            stream = await tls_client(running.port, certs.client_context(), "localhost")
            client = Client(stream)
            assert (await client.request("GET", "/secure/info")).status == 200
            assert (await client.request("GET", "/secure/info")).status == 200
    assert seen.connections == 1 and len(seen.requests) == 2


async def test_websocket_client_library_through_an_http_route(env: Env) -> None:
    # The same route family carries plain requests and, on /ws, a real client library's socket.
    url = f"wss://localhost:{env.running.port}/ws"
    async with open_websocket_url(url, ssl_context=env.certs.client_context()) as ws:
        await ws.send_message("ping")
        assert await ws.get_message() == "ping"


# ------------------------------------------------------------------ request smuggling


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /app/admin HTTP/1.1\r\nHost: localhost\r\n\r\n",
            id="cl-te",
        ),
        pytest.param(
            b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 30\r\n\r\n0\r\n\r\nGET /app/admin HTTP/1.1\r\n\r\n",
            id="te-cl",
        ),
        pytest.param(
            b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            id="two-content-lengths",
        ),
        pytest.param(
            b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
            id="two-different-content-lengths",
        ),
        pytest.param(
            b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nhello\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"-5\r\nhello\r\n0\r\n\r\n",
            id="negative-chunk-size",
        ),
        pytest.param(
            b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            id="unknown-coding",
        ),
        pytest.param(
            b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding:\r\n chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            id="obs-fold-te",
        ),
        pytest.param(
            b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /app/admin HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
            id="pipelined-smuggle-after-a-body",
        ),
    ],
)
async def test_smuggling_attempts_get_400_and_reach_no_backend(env: Env, raw: bytes) -> None:
    stream = await env.connect()
    await stream.send_all(raw)
    data = await receive_all(stream)
    answers = re.findall(rb"HTTP/1\.1 \d\d\d ", data)
    assert answers, data
    assert answers[-1].startswith(b"HTTP/1.1 400 "), (answers, data[-300:])
    # Nothing smuggled reached the backend: no request at all, or (for the
    # pipelined case) only the well-framed first one, with exactly its body.
    assert [r["target"] for r in env.seen.requests] in ([], ["/info"])
    for seen in env.seen.requests:
        assert seen["body_length"] == 5


async def test_pipelined_requests_are_answered_in_order(env: Env) -> None:
    stream = await env.connect()
    await stream.send_all(
        b"POST /app/info HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /app/status/404 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /app/info?last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    client = Client(stream)
    replies = []
    for _ in range(3):
        # (the client's h11 must believe it sent each request to read its answer)
        client.conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.conn.send(h11.EndOfMessage())
        replies.append(await client.response())
    first, second, third = replies
    assert (first.status, second.status, third.status) == (200, 404, 200)
    assert first.json()["body_length"] == 5
    assert third.json()["target"] == "/info?last"
    assert [r["target"] for r in env.seen.requests] == ["/info", "/status/404", "/info?last"]


# ------------------------------------------------------------------ backends


async def test_unix_backend_and_balancing_across_client_connections(certs: Certs, tmp_path: Path) -> None:
    """unix: backends speak HTTP over the socket; two backends are balanced (round
    robin) per backend connection, and a refused one is skipped (passive health)."""
    from httpkit import app_connection

    seen_unix, seen_tcp = Seen(), Seen()
    sock = tmp_path / "app.sock"

    async def serve_unix(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(sock))
        listener.listen(16)
        task_status.started()
        await trio.serve_listeners(
            lambda stream: app_connection(stream, seen_unix), [trio.SocketListener(listener)]
        )

    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()[1]
    closed.close()
    async with trio.open_nursery() as nursery, app_backend(seen_tcp) as tcp:
        await nursery.start(serve_unix)
        routes = (
            '[[host.route]]\npath_prefix = "/u/"\nbackend = "unix:' + str(sock) + ':/"\nhttp = true\n\n'
            '[[host.route]]\npath_prefix = "/rr/"\n'
            f'backends = ["ws://127.0.0.1:{tcp}/", "ws://127.0.0.1:{refused}/"]\n'
            "http = true\nmax_fails = 1\nfail_timeout = 30\n"
        )
        config = write_config(tmp_path, certs, tcp, tcp, extra_routes=routes)
        async with running_gateway(config) as running:
            client = Client(await tls_client(running.port, certs.client_context(), "localhost"))
            reply = await client.request("GET", "/u/info?via=unix")
            assert reply.status == 200 and reply.json()["target"] == "/info?via=unix"
            # Each new client connection asks the balancer; the refused backend is
            # retried past (502 never reaches the client) and then skipped.
            for _ in range(4):
                stream = await tls_client(running.port, certs.client_context(), "localhost")
                assert (await Client(stream).request("GET", "/rr/info")).status == 200
            metrics = running.gateway.metrics.render().decode()
        nursery.cancel_scope.cancel()
    assert [r["target"] for r in seen_unix.requests] == ["/info?via=unix"]
    assert len(seen_tcp.requests) == 4
    assert f'gatewayd_backend_up{{backend="ws://127.0.0.1:{refused}/"}} 0.0' in metrics


async def test_backend_failure_after_the_head_closes_the_client_connection(
    certs: Certs, tmp_path: Path
) -> None:
    async def truncating(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await stream.aclose()

    async with raw_backend(truncating) as port:
        config = write_config(tmp_path, certs, port, port)
        async with running_gateway(config) as running:
            stream = await tls_client(running.port, certs.client_context(), "localhost")
            await stream.send_all(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = await receive_all(stream)
    # The head and the 10 bytes went out; then the connection closed: no 502
    # in the middle of a body, and the client sees the body cut short.
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b"\r\n\r\n" + b"x" * 10)
    assert b"502" not in data


async def test_kept_backend_connection_closed_by_the_backend_is_replaced(
    certs: Certs, tmp_path: Path
) -> None:
    connections = []

    async def one_answer_then_close(stream: trio.SocketStream) -> None:
        # Keep-alive as far as the headers say, then gone: a backend whose idle
        # timeout ran out just before the next request.
        connections.append(1)
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await trio.sleep(0.2)
        await stream.aclose()

    async with raw_backend(one_answer_then_close) as port:
        config = write_config(tmp_path, certs, port, port)
        async with running_gateway(config) as running:
            client = Client(await tls_client(running.port, certs.client_context(), "localhost"))
            assert (await client.request("GET", "/app/a")).body == b"ok"
            await trio.sleep(0.5)
            assert (await client.request("GET", "/app/b")).body == b"ok"
            await trio.sleep(0.5)
            assert (await client.request("POST", "/app/c", body=b"data")).body == b"ok"
    # The closed kept connection was noticed before each reuse: a fresh one each time.
    assert len(connections) == 3
