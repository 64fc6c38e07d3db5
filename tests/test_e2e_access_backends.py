"""Access control on the backends work's routes, end to end (the merge of both).

A redirect route beside a route with several balanced backends in one host; a
``tcp://`` bridge route behind Basic auth; forward auth on a route with
``backends = [...]``, which must ask the auth service once per connection and
before any backend is chosen (SPEC rows 9a and 14a come before row 15).

Clients use a plain listener; backends, the TCP echo service and the
forward-auth service are real sockets on 127.0.0.1.
"""

from __future__ import annotations

import base64
import textwrap
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import h11
import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, Message

from gatewayd.config import load, summary
from harness import (
    Running,
    exchange,
    header_value,
    raw_backend,
    read_head,
    receive_all,
    running_gateway,
    switching_protocols,
    upgrade_request,
)

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ services


@dataclass
class Named:
    """A WebSocket backend that names itself in its 101 and records request heads."""

    name: str
    heads: list[bytes] = field(default_factory=list)

    async def handler(self, stream: trio.SocketStream) -> None:
        try:
            head, _ = await read_head(stream)
        except (EOFError, trio.BrokenResourceError):
            return
        self.heads.append(head)
        await stream.send_all(switching_protocols(head, f"X-Backend: {self.name}"))
        await receive_all(stream, 5.0)


@dataclass
class TCPEcho:
    """A plain TCP echo service (what a VNC server is to websockify)."""

    connections: int = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            return


@dataclass
class AuthService:
    """Forward auth: ``/ok`` answers 200 with X-User, ``/deny`` 401; records each target."""

    targets: list[str] = field(default_factory=list)

    async def handler(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while (event := conn.next_event()) is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return
            conn.receive_data(data)
        assert isinstance(event, h11.Request)
        target = event.target.decode()
        self.targets.append(target)
        if target == "/ok":
            status, headers, body = 200, [("X-User", "alice")], b""
        else:
            status, headers, body = 401, [("WWW-Authenticate", 'Bearer realm="sso"')], b"log in\n"
        out = conn.send(
            h11.Response(status_code=status, headers=[*headers, ("Content-Length", str(len(body)))])
        ) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)
        await stream.aclose()


async def closed_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def bcrypt_line(user: str, password: str) -> str:
    return f"{user}:$2y${bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()[4:]}\n"


def basic(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------ the gateway

CONFIG = """\
[gateway]
backend_connect_timeout = 1.0

[[listener]]
address = "127.0.0.1:0"
tls = false

[[host]]
names = ["localhost"]

[[host.route]]
path_prefix = "/old/"
redirect = "ws://localhost/live/"

[[host.route]]
path_prefix = "/live/"
backends = ["ws://127.0.0.1:{a}/v2/", "ws://127.0.0.1:{b}/v2/"]

[[host.route]]
path = "/vnc"
backend = "tcp://127.0.0.1:{echo}"
auth = "basic"
auth_users = "users.htpasswd"
realm = "VNC"

[[host.route]]
path = "/app"
backends = ["ws://127.0.0.1:{dead}", "ws://127.0.0.1:{a}", "ws://127.0.0.1:{b}"]
auth = "request"
auth_url = "http://127.0.0.1:{auth}/ok"
auth_response_headers = ["X-User"]

[[host.route]]
path = "/app-denied"
backends = ["ws://127.0.0.1:{a}", "ws://127.0.0.1:{b}"]
auth = "request"
auth_url = "http://127.0.0.1:{auth}/deny"

[[host.route]]
path = "/app-all-down"
backends = ["ws://127.0.0.1:{dead}", "ws://127.0.0.1:{dead2}"]
auth = "request"
auth_url = "http://127.0.0.1:{auth}/ok"

[[host.route]]
path = "/app-auth-down"
backends = ["ws://127.0.0.1:{a}", "ws://127.0.0.1:{b}"]
auth = "request"
auth_url = "http://127.0.0.1:{dead}/check"
"""


@dataclass
class Env:
    gw: Running
    a: Named
    b: Named
    echo: TCPEcho
    auth: AuthService
    config: Path

    async def ask(self, path: str, *extra: str) -> tuple[int, bytes, trio.SocketStream, bytes]:
        stream = await trio.open_tcp_stream("127.0.0.1", self.gw.port)
        await stream.send_all(upgrade_request(path, "localhost", *extra))
        head, rest = await read_head(stream)
        return int(head.split(b" ")[1]), head, stream, rest

    async def status_and_backend(self, path: str, *extra: str) -> tuple[int, str | None]:
        status, head, stream, _ = await self.ask(path, *extra)
        await stream.aclose()
        return status, header_value(head, "x-backend")


@asynccontextmanager
async def environment(tmp_path: Path) -> AsyncIterator[Env]:
    a, b, echo, auth = Named("a"), Named("b"), TCPEcho(), AuthService()
    (tmp_path / "users.htpasswd").write_text(bcrypt_line("alice", "secret"))
    async with AsyncExitStack() as stack:
        ports = {
            "a": await stack.enter_async_context(raw_backend(a.handler)),
            "b": await stack.enter_async_context(raw_backend(b.handler)),
            "echo": await stack.enter_async_context(raw_backend(echo.handler)),
            "auth": await stack.enter_async_context(raw_backend(auth.handler)),
            "dead": await closed_port(),
            "dead2": await closed_port(),
        }
        path = tmp_path / "gatewayd.toml"
        path.write_text(CONFIG.format(**ports))
        gw = await stack.enter_async_context(running_gateway(path))
        with trio.fail_after(30):
            yield Env(gw, a, b, echo, auth, path)


# ------------------------------------------------------------------ redirect beside backends


async def test_redirect_route_beside_a_multi_backend_route(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        answer = await exchange(stream, upgrade_request("/old/room/7?x=1", "localhost"))
        assert answer.status == 308
        assert answer.header("location") == "ws://localhost/live/room/7?x=1"
        assert env.a.heads == [] and env.b.heads == []

        chosen = [await env.status_and_backend("/live/room/7?x=1") for _ in range(4)]
        assert chosen == [(101, "a"), (101, "b"), (101, "a"), (101, "b")]
        assert env.a.heads[0].startswith(b"GET /v2/room/7?x=1 HTTP/1.1\r\n")

        # The redirect route has no balancer, health check or backend state.
        generation = env.gw.gateway.generation
        redirect = generation.config.hosts[0].routes[0]
        assert redirect.redirect is not None and redirect.backend is None
        assert redirect.backends == () and not redirect.bridge
        assert redirect.key_path not in generation.backends.balancers
        assert all("localhost/live" not in state.url for state in generation.backends.registry)

        # `check` shows both; a reload that changes only the redirect keeps the backends' state.
        text = summary(generation.config)
        assert "redirect 308 ws://localhost/live/" in text
        assert "2 backends, round_robin" in text
        env.config.write_text(
            env.config.read_text().replace('redirect = "ws://localhost/live/"',
                                           'redirect = "ws://localhost/live/"\nredirect_status = 301')
        )
        result = await env.gw.gateway.reload(load(env.config))
        assert result.generation == 2
        assert any("routes changed" in change for change in result.changes)
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        assert (await exchange(stream, upgrade_request("/old/x", "localhost"))).status == 301
        assert (await env.status_and_backend("/live/x"))[0] == 101


# ------------------------------------------------------------------ bridge behind Basic auth


async def test_bridge_route_with_basic_auth(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        status, head, stream, _ = await env.ask("/vnc", "Sec-WebSocket-Protocol: binary")
        await stream.aclose()
        assert status == 401
        assert header_value(head, "www-authenticate") == 'Basic realm="VNC", charset="UTF-8"'
        status, _, stream, _ = await env.ask("/vnc", basic("alice", "wrong"))
        await stream.aclose()
        assert status == 401
        assert env.echo.connections == 0          # never connected before authorization

        status, head, stream, rest = await env.ask(
            "/vnc", "Sec-WebSocket-Protocol: binary", basic("alice", "secret")
        )
        assert status == 101
        assert header_value(head, "sec-websocket-protocol") == "binary"
        ws = Connection(ConnectionType.CLIENT)
        if rest:
            ws.receive_data(rest)
        await stream.send_all(ws.send(Message(data=b"\x00RFB 003.008\n")))
        received = b""
        with trio.fail_after(5):
            while len(received) < 13:
                ws.receive_data(await stream.receive_some(65536))
                for event in ws.events():
                    assert isinstance(event, BytesMessage), event
                    received += event.data
        assert received == b"\x00RFB 003.008\n"
        assert env.echo.connections == 1
        await stream.aclose()


# ------------------------------------------------------------------ forward auth with backends


async def test_forward_auth_once_before_the_backend_is_chosen(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        # The first backend is dead: the connect is retried on another one, but
        # the auth service is asked once per connection, never per attempt.
        replies = [await env.status_and_backend("/app", "X-User: mallory") for _ in range(4)]
        assert [status for status, _ in replies] == [101] * 4
        assert {backend for _, backend in replies} == {"a", "b"}
        assert env.auth.targets == ["/ok"] * 4
        for head in env.a.heads + env.b.heads:
            assert header_value(head, "x-user") == "alice"   # the service's, not the client's

        # Denied: the service's 401 is relayed and no backend is chosen or touched.
        seen = len(env.a.heads) + len(env.b.heads)
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        answer = await exchange(stream, upgrade_request("/app-denied", "localhost"))
        assert answer.status == 401
        assert answer.header("www-authenticate") == 'Bearer realm="sso"'
        assert answer.body == b"log in\n"
        assert len(env.a.heads) + len(env.b.heads) == seen
        assert env.auth.targets[-1] == "/deny"

        # An auth service that is down is 503 from row 14a, before any backend.
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        answer = await exchange(stream, upgrade_request("/app-auth-down", "localhost"))
        assert answer.status == 503
        assert answer.header("retry-after") == "5"
        assert b"authentication" in answer.body
        assert len(env.a.heads) + len(env.b.heads) == seen


async def test_row14a_comes_before_row15(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        # Both backends fail once (502) and are then skipped: row 15 (503).
        assert (await env.status_and_backend("/app-all-down"))[0] == 502
        status, head, stream, _ = await env.ask("/app-all-down")
        await stream.aclose()
        assert status == 503 and header_value(head, "retry-after") is not None
        # Every one of those connections was authorized first, once.
        assert env.auth.targets == ["/ok", "/ok"]


def test_access_keys_load_on_bridge_and_multi_backend_routes(tmp_path: Path) -> None:
    """The combinations both branches allow load together (the refused ones are
    in test_config.py's error table)."""
    (tmp_path / "users.htpasswd").write_text(bcrypt_line("alice", "secret"))
    path = tmp_path / "gatewayd.toml"
    path.write_text(
        textwrap.dedent(
            """\
            [[listener]]
            address = "127.0.0.1:0"
            tls = false

            [[host]]
            names = ["localhost"]

            [[host.route]]
            path = "/vnc"
            backend = "tcp://127.0.0.1:5900"
            auth = "basic"
            auth_users = "users.htpasswd"
            allow = ["127.0.0.0/8"]

            [[host.route]]
            path = "/old"
            redirect = "wss://a.example/"

            [[host.route]]
            path = "/many"
            backends = ["ws://127.0.0.1:1", "ws://127.0.0.1:2"]
            balance = "least_connections"
            auth = "request"
            auth_url = "http://127.0.0.1:9100/"
            auth_response_headers = ["X-User"]
            """
        )
    )
    routes = load(path).hosts[0].routes
    assert routes[0].bridge and routes[0].auth is not None and routes[0].access
    assert routes[1].backends == () and routes[1].redirect is not None
    assert len(routes[2].backends) == 2 and routes[2].auth is not None
