"""Access control over real sockets: SPEC rows 9a (redirect), 9b (allow/deny), 14a (auth).

A real gateway (the real loader, the real server task) on TLS, stdlib-ssl
clients connecting from 127.0.0.1 or 127.0.0.2 (the client socket is bound
before it connects), a raw backend that records the upgrade request it
receives, and a small forward-auth service written here with h11, on TCP and
on a unix socket, that records every request it gets.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
import tempfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import h11
import pytest
import trio

from gatewayd.config import load
from gatewayd.errors import ConfigErrors
from gatewayd.server import describe_changes
from harness import (
    Answer,
    Certs,
    Running,
    make_certs,
    raw_backend,
    read_head,
    receive_all,
    running_gateway,
    switching_protocols,
    upgrade_request,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost", "127.0.0.1")
    certs.issue("lan.example.com")
    return certs


# ------------------------------------------------------------------ the backend


@dataclass
class Backend:
    """Answers every upgrade with a valid 101 and records the request heads."""

    heads: list[bytes] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        head, _ = await read_head(stream)
        self.heads.append(head)
        await stream.send_all(switching_protocols(head))
        await receive_all(stream, 5.0)

    def last(self) -> list[str]:
        assert self.heads, "the backend saw no request"
        return self.heads[-1].decode("latin-1").split("\r\n")


# ------------------------------------------------------------------ the auth service

#: path -> (status, headers, body); "/slow" never answers.
AUTH_ANSWERS: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {
    "/ok": (200, [("X-User", "alice"), ("X-Groups", "staff"), ("X-Ignored", "yes")], b"fine"),
    "/ok-bare": (204, [], b""),
    "/deny401": (
        401,
        [("WWW-Authenticate", 'Bearer realm="sso"'), ("Content-Type", "application/json"),
         ("Set-Cookie", "not=relayed")],
        b'{"login":"https://sso.example.com/"}',
    ),
    "/deny403": (403, [("Content-Type", "text/plain")], b"staff only\n"),
    "/error": (500, [], b"boom"),
    "/found": (302, [("Location", "https://sso.example.com/login")], b""),
    "/huge401": (401, [("WWW-Authenticate", "Basic")], b"x" * 100_000),
}


@dataclass
class AuthService:
    """A forward-auth service (h11 server role); records (target, headers) per request."""

    seen: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)

    def calls(self, path: str) -> int:
        return sum(1 for target, _ in self.seen if target.split("?")[0] == path)

    def last_headers(self) -> list[tuple[str, str]]:
        return self.seen[-1][1]

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            break
        assert isinstance(event, h11.Request)
        target = event.target.decode()
        headers = [(k.decode(), v.decode("latin-1")) for k, v in event.headers.raw_items()]
        self.seen.append((target, headers))
        path = target.split("?")[0]
        if path == "/slow":
            await trio.sleep(30)
            return
        status, extra, body = AUTH_ANSWERS[path]
        out = conn.send(
            h11.Response(status_code=status, headers=[*extra, ("Content-Length", str(len(body)))])
        ) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        try:
            await stream.send_all(out)
        except trio.BrokenResourceError:
            pass  # the gateway stopped reading (a body over its limit)
        await stream.aclose()


@asynccontextmanager
async def unix_server(path: str, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> AsyncIterator[None]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [trio.SocketListener(sock)])
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


async def closed_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# ------------------------------------------------------------------ the gateway


def hash_for(password: bytes) -> str:
    # htpasswd -B writes $2y$; bcrypt checks it like $2b$. Cost 4 keeps tests fast.
    return "$2y$" + bcrypt.hashpw(password, bcrypt.gensalt(4)).decode()[4:]


def write_users(path: Path, users: dict[str, str]) -> None:
    path.write_text("".join(f"{user}:{hash_for(pw.encode())}\n" for user, pw in users.items()))


def write_config(directory: Path, certs: Certs, ports: dict[str, int], auth_socket: str) -> Path:
    d = certs.directory
    backend = f"ws://127.0.0.1:{ports['backend']}"
    auth = f"http://127.0.0.1:{ports['auth']}"
    sso_routes = "".join(
        f"""
        [[host.route]]
        path = "/sso-{name}"
        backend = "{backend}"
        auth = "request"
        auth_url = "{url}"
        """
        for name, url in (
            ("401", f"{auth}/deny401"),
            ("403", f"{auth}/deny403"),
            ("500", f"{auth}/error"),
            ("302", f"{auth}/found"),
            ("huge", f"{auth}/huge401"),
            ("slow", f"{auth}/slow"),
            ("down", f"http://127.0.0.1:{ports['dead']}/check"),
        )
    )
    redirect_routes = "".join(
        f"""
        [[host.route]]
        path = "/r{status}"
        redirect = "https://new.example.com/r"
        redirect_status = {status}
        """
        for status in (301, 302, 307, 308)
    )
    text = textwrap.dedent(
        f"""
        [gateway]
        handshake_timeout = 3.0
        backend_connect_timeout = 1.0

        [log]
        level = "debug"

        [[listener]]
        address = "127.0.0.1:0"

        [[host]]
        names = ["localhost"]
        certificate = "{d}/localhost.pem"
        private_key = "{d}/localhost.key"

        [[host.route]]
        path = "/open"
        backend = "{backend}"

        [[host.route]]
        path = "/moved"
        redirect = "wss://new.example.com/chat"

        [[host.route]]
        path_prefix = "/old/"
        redirect = "wss://new.example.com/v2/"
        {redirect_routes}
        [[host.route]]
        path = "/internal"
        backend = "{backend}"
        allow = ["127.0.0.1"]

        [[host.route]]
        path = "/loopback-but-2"
        backend = "{backend}"
        allow = ["127.0.0.0/8"]
        deny = ["127.0.0.2/32"]

        [[host.route]]
        path = "/basic"
        backend = "{backend}"
        auth = "basic"
        auth_users = "users.htpasswd"
        realm = "Chat staff"

        [[host.route]]
        path = "/basic-forward"
        backend = "{backend}"
        auth = "basic"
        auth_users = "users.htpasswd"
        auth_forward = true

        [[host.route]]
        path = "/sso"
        backend = "{backend}"
        auth = "request"
        auth_url = "{auth}/ok?app=chat"
        auth_response_headers = ["X-User", "X-Groups"]

        [[host.route]]
        path = "/sso-bare"
        backend = "{backend}"
        auth = "request"
        auth_url = "{auth}/ok-bare"
        auth_response_headers = ["X-User"]

        [[host.route]]
        path = "/sso-cached"
        backend = "{backend}"
        auth = "request"
        auth_url = "{auth}/ok"
        auth_response_headers = ["X-User"]
        auth_cache_seconds = 0.5

        [[host.route]]
        path = "/sso-unix"
        backend = "{backend}"
        auth = "request"
        auth_url = "unix:{auth_socket}:/ok"
        auth_response_headers = ["X-User"]
        {sso_routes}
        [[host]]
        names = ["lan.example.com"]
        certificate = "{d}/lan.example.com.pem"
        private_key = "{d}/lan.example.com.key"
        allow = ["127.0.0.0/8"]
        deny = ["127.0.0.3"]

        [[host.route]]
        path = "/a"
        backend = "{backend}"

        [[host.route]]
        path = "/b"
        backend = "{backend}"
        allow = ["127.0.0.1"]
        """
    )
    path = directory / "gatewayd.toml"
    path.write_text(text)
    return path


@dataclass
class Env:
    gw: Running
    ctx: ssl.SSLContext
    backend: Backend
    auth: AuthService
    config_path: Path
    auth_port: int

    async def connect(self, source: str = "127.0.0.1", sni: str = "localhost") -> trio.SSLStream[trio.SocketStream]:
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", self.gw.port))
        stream = trio.SSLStream(trio.SocketStream(sock), self.ctx, server_hostname=sni)
        await stream.do_handshake()
        return stream

    async def ask(
        self, path: str, *extra: str, source: str = "127.0.0.1", host: str = "localhost"
    ) -> Answer:
        """One handshake; the whole answer (up to EOF) unless it is a 101."""
        stream = await self.connect(source, host)
        await stream.send_all(upgrade_request(path, host, *extra))
        with trio.fail_after(8):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                assert chunk, f"EOF before an answer head: {data!r}"
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 101:
                rest += await receive_all(stream)
        with trio.move_on_after(2):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return Answer(status, head + b"\r\n\r\n", rest)


@pytest.fixture
async def env(certs: Certs, tmp_path: Path) -> AsyncIterator[Env]:
    backend, auth = Backend(), AuthService()
    write_users(tmp_path / "users.htpasswd", {"alice": "secret", "zoë": "pässword"})
    socket_dir = tempfile.mkdtemp(prefix="gwauth", dir="/tmp")
    auth_socket = os.path.join(socket_dir, "auth.sock")
    try:
        async with AsyncExitStack() as stack:
            ports = {
                "backend": await stack.enter_async_context(raw_backend(backend.handle)),
                "auth": await stack.enter_async_context(raw_backend(auth.handle)),
                "dead": await closed_port(),
            }
            await stack.enter_async_context(unix_server(auth_socket, auth.handle))
            config_path = write_config(tmp_path, certs, ports, auth_socket)
            gw = await stack.enter_async_context(running_gateway(config_path))
            with trio.fail_after(30):
                yield Env(gw, certs.client_context(), backend, auth, config_path, ports["auth"])
    finally:
        if os.path.exists(auth_socket):
            os.unlink(auth_socket)
        os.rmdir(socket_dir)


def basic(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def assert_gateway_made(answer: Answer) -> None:
    assert answer.header("connection") == "close"
    assert answer.header("content-length") == str(len(answer.body))
    assert answer.header("server") == "gatewayd"


# ------------------------------------------------------------------ row 9a


async def test_row9a_exact_route_redirect_appends_the_query(env: Env) -> None:
    answer = await env.ask("/moved?room=1&t=2")
    assert answer.head.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
    assert answer.header("location") == "wss://new.example.com/chat?room=1&t=2"
    assert_gateway_made(answer)
    assert answer.header("content-type") == "text/plain; charset=utf-8"
    assert answer.body == b"Moved: this endpoint is now wss://new.example.com/chat?room=1&t=2\n"
    assert env.backend.heads == []


async def test_row9a_prefix_route_redirect_appends_the_rest_and_the_query(env: Env) -> None:
    answer = await env.ask("/old/room/7?x=1")
    assert answer.status == 308
    assert answer.header("location") == "wss://new.example.com/v2/room/7?x=1"
    answer = await env.ask("/old/")
    assert answer.header("location") == "wss://new.example.com/v2/"


@pytest.mark.parametrize(
    "status, reason",
    [(301, "Moved Permanently"), (302, "Found"), (307, "Temporary Redirect"), (308, "Permanent Redirect")],
)
async def test_row9a_each_redirect_status(env: Env, status: int, reason: str) -> None:
    answer = await env.ask(f"/r{status}?q")
    assert answer.head.startswith(f"HTTP/1.1 {status} {reason}\r\n".encode())
    assert answer.header("location") == "https://new.example.com/r?q"
    assert_gateway_made(answer)


async def test_row9a_is_checked_before_row11(env: Env) -> None:
    """A plain HTTP GET (a browser following a link) gets the redirect too."""
    stream = await env.connect()
    answer_bytes = b"GET /moved HTTP/1.1\r\nHost: localhost\r\n\r\n"
    await stream.send_all(answer_bytes)
    data = await receive_all(stream)
    assert data.startswith(b"HTTP/1.1 308 ")


# ------------------------------------------------------------------ row 9b


async def test_row9b_allow_admits_only_the_listed_address(env: Env) -> None:
    refused = await env.ask("/internal", source="127.0.0.2")
    assert refused.head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert_gateway_made(refused)
    assert env.backend.heads == []
    assert (await env.ask("/internal", source="127.0.0.1")).status == 101
    assert len(env.backend.heads) == 1


async def test_row9b_deny_wins_over_allow(env: Env) -> None:
    assert (await env.ask("/loopback-but-2", source="127.0.0.2")).status == 403
    assert (await env.ask("/loopback-but-2", source="127.0.0.1")).status == 101
    assert (await env.ask("/loopback-but-2", source="127.0.0.4")).status == 101


@pytest.mark.parametrize(
    "source, path, status",
    [
        pytest.param("127.0.0.1", "/a", 101, id="host-allows"),
        pytest.param("127.0.0.1", "/b", 101, id="host-and-route-allow"),
        pytest.param("127.0.0.2", "/a", 101, id="host-allows-2"),
        pytest.param("127.0.0.2", "/b", 403, id="route-refuses-after-host-allows"),
        pytest.param("127.0.0.3", "/a", 403, id="host-deny-applies-to-every-route"),
        pytest.param("127.0.0.3", "/b", 403, id="host-deny-before-route"),
    ],
)
async def test_row9b_host_level_lists(env: Env, source: str, path: str, status: int) -> None:
    answer = await env.ask(path, source=source, host="lan.example.com")
    assert answer.status == status


async def test_row9b_address_check_comes_before_the_other_request_checks(env: Env) -> None:
    # No Upgrade header (row 11) from a refused address: 403 from row 9b first.
    stream = await env.connect("127.0.0.2")
    await stream.send_all(b"GET /internal HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await receive_all(stream)).startswith(b"HTTP/1.1 403 ")


# ------------------------------------------------------------------ row 14a: basic


async def test_row14a_basic_good_credentials_and_authorization_removed(env: Env) -> None:
    answer = await env.ask("/basic", basic("alice", "secret"), "Cookie: a=b")
    assert answer.status == 101
    seen = env.backend.last()
    assert not any(line.lower().startswith("authorization") for line in seen)
    assert "Cookie: a=b" in seen
    assert (await env.ask("/basic", basic("zoë", "pässword"))).status == 101


async def test_row14a_basic_auth_forward_keeps_authorization(env: Env) -> None:
    answer = await env.ask("/basic-forward", basic("alice", "secret"))
    assert answer.status == 101
    assert basic("alice", "secret") in env.backend.last()


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(basic("alice", "wrong"), id="bad-password"),
        pytest.param(basic("mallory", "secret"), id="unknown-user"),
        pytest.param(None, id="missing-header"),
        pytest.param("Authorization: Basic not*base64", id="not-base64"),
        pytest.param("Authorization: Basic " + base64.b64encode(b"alice").decode(), id="no-colon"),
        pytest.param("Authorization: Bearer abc.def", id="wrong-scheme"),
        pytest.param("Authorization: Digest username=\"alice\"", id="digest-scheme"),
    ],
)
async def test_row14a_basic_refusals_get_401_with_challenge(env: Env, authorization: str | None) -> None:
    extra = (authorization,) if authorization else ()
    answer = await env.ask("/basic", *extra)
    assert answer.head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert answer.header("www-authenticate") == 'Basic realm="Chat staff", charset="UTF-8"'
    assert_gateway_made(answer)
    assert env.backend.heads == []


async def test_row14a_basic_repeated_authorization_is_401(env: Env) -> None:
    answer = await env.ask("/basic", basic("alice", "secret"), basic("alice", "secret"))
    assert answer.status == 401


# ------------------------------------------------------------------ row 14a: forward auth


async def test_row14a_forward_auth_2xx_copies_headers_to_the_backend(env: Env) -> None:
    answer = await env.ask(
        "/sso?room=9",
        "Origin: https://chat.example.com",
        "Cookie: session=abc",
        "Authorization: Bearer tok",
        "X-User: mallory",  # a spoof: replaced by the service's value
        "x-groups: admins",  # a spoof, any case
    )
    assert answer.status == 101
    seen = env.backend.last()
    assert "X-User: alice" in seen
    assert "X-Groups: staff" in seen
    assert not any("mallory" in line or "admins" in line for line in seen)
    assert not any(line.lower().startswith("x-ignored") for line in seen)  # not listed
    assert not any(line.lower().startswith("authorization") for line in seen)
    assert "Cookie: session=abc" in seen

    target, headers = env.auth.seen[-1]
    assert target == "/ok?app=chat"
    sent = dict(headers)
    assert sent["X-Forwarded-Method"] == "GET"
    assert sent["X-Forwarded-Uri"] == "/sso?room=9"
    assert sent["X-Original-URI"] == "/sso?room=9"
    assert sent["X-Forwarded-Host"] == "localhost"
    assert sent["X-Forwarded-Proto"] == "https"
    assert sent["X-Forwarded-For"] == "127.0.0.1"
    assert sent["X-Real-IP"] == "127.0.0.1"
    assert sent["Origin"] == "https://chat.example.com"
    assert sent["Cookie"] == "session=abc"
    assert sent["Authorization"] == "Bearer tok"
    assert sent["Host"] == f"127.0.0.1:{env.auth_port}"


async def test_row14a_forward_auth_spoof_removed_when_the_answer_lacks_it(env: Env) -> None:
    answer = await env.ask("/sso-bare", "X-User: root", "Cookie: s=1")
    assert answer.status == 101
    assert not any(line.lower().startswith("x-user") for line in env.backend.last())


async def test_row14a_forward_auth_over_a_unix_socket(env: Env) -> None:
    answer = await env.ask("/sso-unix", "Cookie: s=1")
    assert answer.status == 101
    assert "X-User: alice" in env.backend.last()
    assert dict(env.auth.last_headers())["Host"] == "localhost"


async def test_row14a_forward_auth_401_relayed_with_its_challenge(env: Env) -> None:
    answer = await env.ask("/sso-401", "Cookie: s=expired")
    assert answer.head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert answer.header("www-authenticate") == 'Bearer realm="sso"'
    assert answer.header("content-type") == "application/json"
    assert answer.body == b'{"login":"https://sso.example.com/"}'
    assert answer.header("set-cookie") is None  # only the challenge and the body are relayed
    assert_gateway_made(answer)
    assert env.backend.heads == []


async def test_row14a_forward_auth_403_relayed(env: Env) -> None:
    answer = await env.ask("/sso-403")
    assert answer.head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert answer.body == b"staff only\n"
    assert answer.header("content-type") == "text/plain"
    assert env.backend.heads == []


async def test_row14a_forward_auth_relayed_body_is_bounded(env: Env) -> None:
    answer = await env.ask("/sso-huge")
    assert answer.status == 401
    assert answer.body == b"x" * 4096
    assert answer.header("www-authenticate") == "Basic"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/sso-500", id="service-500"),
        pytest.param("/sso-302", id="service-302"),
        pytest.param("/sso-down", id="service-down"),
    ],
)
async def test_row14a_forward_auth_failure_is_503(env: Env, path: str) -> None:
    answer = await env.ask(path)
    assert answer.head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert answer.header("retry-after") == "5"
    assert_gateway_made(answer)
    assert env.backend.heads == []


async def test_row14a_forward_auth_timeout_is_503(env: Env) -> None:
    start = trio.current_time()
    answer = await env.ask("/sso-slow")
    elapsed = trio.current_time() - start
    assert answer.status == 503
    assert answer.header("retry-after") == "5"
    # min(backend_connect_timeout = 1 s, 5 s), not the service's 30 s.
    assert 0.9 <= elapsed < 3.0
    assert env.auth.calls("/slow") == 1


async def test_row14a_forward_auth_cache_hit_miss_and_expiry(env: Env) -> None:
    for _ in range(2):
        answer = await env.ask("/sso-cached", "Cookie: session=one")
        assert answer.status == 101
        assert "X-User: alice" in env.backend.last()  # from the cache the second time
    assert env.auth.calls("/ok") == 1  # the second request was a cache hit

    assert (await env.ask("/sso-cached", "Cookie: session=two")).status == 101
    assert env.auth.calls("/ok") == 2  # another credential: a miss

    assert (await env.ask("/sso-cached", "Cookie: session=one", basic("a", "b"))).status == 101
    assert env.auth.calls("/ok") == 3  # Authorization is part of the key

    await trio.sleep(0.6)  # auth_cache_seconds = 0.5
    assert (await env.ask("/sso-cached", "Cookie: session=one")).status == 101
    assert env.auth.calls("/ok") == 4  # expired: asked again


async def test_row14a_forward_auth_without_credentials_is_never_cached(env: Env) -> None:
    for _ in range(2):
        assert (await env.ask("/sso-cached")).status == 101
    assert env.auth.calls("/ok") == 2


async def test_negative_answers_are_not_cached(env: Env) -> None:
    for _ in range(2):
        assert (await env.ask("/sso-401", "Cookie: s=1")).status == 401
    assert env.auth.calls("/deny401") == 2


# ------------------------------------------------------------------ reload and logs


async def test_users_file_is_re_read_on_reload_and_a_broken_one_fails_it(env: Env, tmp_path: Path) -> None:
    assert (await env.ask("/basic", basic("bob", "builder"))).status == 401
    write_users(tmp_path / "users.htpasswd", {"alice": "secret", "bob": "builder"})
    await env.gw.gateway.reload(load(env.config_path))
    assert (await env.ask("/basic", basic("bob", "builder"))).status == 101

    (tmp_path / "users.htpasswd").write_text("alice:plaintext\n")
    with pytest.raises(ConfigErrors) as info:
        load(env.config_path)
    assert "users.htpasswd:1: user 'alice' has a plain-text password" in str(info.value)
    # The running configuration is unchanged: bob still gets in.
    assert (await env.ask("/basic", basic("bob", "builder"))).status == 101


async def test_reload_empties_the_forward_auth_cache(env: Env) -> None:
    assert (await env.ask("/sso-cached", "Cookie: session=one")).status == 101
    await env.gw.gateway.reload(load(env.config_path))
    assert (await env.ask("/sso-cached", "Cookie: session=one")).status == 101
    assert env.auth.calls("/ok") == 2


async def test_no_credential_cookie_or_query_is_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gatewayd")
    secrets = ("pw-secret-1", "cookie-secret-2", "query-secret-3", "bearer-secret-4")
    await env.ask("/basic?token=query-secret-3", basic("alice", "pw-secret-1"), "Cookie: s=cookie-secret-2")
    await env.ask("/sso-401?token=query-secret-3", "Authorization: Bearer bearer-secret-4")
    await env.ask("/sso-down?token=query-secret-3", "Cookie: s=cookie-secret-2")
    await env.ask("/moved?token=query-secret-3")
    await env.ask("/sso?token=query-secret-3", "Cookie: s=cookie-secret-2", "Authorization: Bearer bearer-secret-4")
    assert caplog.records
    logged = "\n".join(
        f"{record.getMessage()} {getattr(record, 'access', '')}" for record in caplog.records
    )
    assert "/basic" in logged  # the access lines are there, with paths
    for secret in secrets:
        assert secret not in logged, secret



async def test_reload_log_names_access_changes(env: Env, tmp_path: Path) -> None:
    before = load(env.config_path)
    text = env.config_path.read_text()
    env.config_path.write_text(text.replace('deny = ["127.0.0.3"]', 'deny = ["127.0.0.4"]'))
    write_users(tmp_path / "users.htpasswd", {"alice": "secret", "carol": "x"})
    changes = describe_changes(before, load(env.config_path))
    assert "hosts changed: lan.example.com" in changes
    assert "routes changed: localhost/basic, localhost/basic-forward" in changes
