"""gatewayd.auth without the network: bcrypt checks, the forward-auth request's headers,
and Authenticator.authorize for Basic routes (bcrypt in a worker thread)."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt
import pytest
import trio

from gatewayd import auth as auth_module
from gatewayd.access import BasicCredentials
from gatewayd.auth import Authenticator, UserTable, service_request_headers
from gatewayd.config import (
    Address,
    BackendTarget,
    BasicAuth,
    Config,
    ForwardAuth,
    HostConfig,
    ListenerConfig,
    RouteConfig,
)
from gatewayd.errors import HandshakeRejected
from gatewayd.handshake import ClientInfo, decide, parse_request_head
from gatewayd.routing import HostTable

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def hashed(password: bytes, cost: int = 4, prefix: bytes = b"$2b$") -> bytes:
    return prefix + bcrypt.hashpw(password, bcrypt.gensalt(cost))[4:]


USERS = BasicAuth(
    users_file=Path("/users"),
    users=(
        (b"alice", hashed(b"secret")),
        (b"bob", hashed(b"hunter2", prefix=b"$2y$")),
        ("zoë".encode(), hashed("pässword".encode(), prefix=b"$2a$")),
        (b"long", hashed(b"x" * 72)),
    ),
)


@pytest.mark.parametrize(
    "user, password, ok",
    [
        pytest.param(b"alice", b"secret", True, id="good"),
        pytest.param(b"alice", b"Secret", False, id="bad-password"),
        pytest.param(b"alice", b"", False, id="empty-password"),
        pytest.param(b"bob", b"hunter2", True, id="2y-prefix"),
        pytest.param("zoë".encode(), "pässword".encode(), True, id="utf-8-2a-prefix"),
        pytest.param(b"Alice", b"secret", False, id="user-names-are-case-sensitive"),
        pytest.param(b"mallory", b"secret", False, id="unknown-user"),
        pytest.param(b"", b"secret", False, id="empty-user"),
        # bcrypt reads 72 bytes; longer passwords are cut there, as htpasswd does.
        pytest.param(b"long", b"x" * 72 + b"ignored", True, id="over-72-bytes"),
    ],
)
def test_user_table_verify(user: bytes, password: bytes, ok: bool) -> None:
    assert UserTable(USERS).verify(BasicCredentials(user, password)) is ok


def test_unknown_user_still_costs_a_bcrypt_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """So the answer's timing does not tell which users exist."""
    table = UserTable(USERS)
    seen: list[bytes] = []
    real = bcrypt.checkpw

    def recording(password: bytes, hashed_password: bytes) -> bool:
        seen.append(hashed_password)
        return real(password, hashed_password)

    monkeypatch.setattr(auth_module.bcrypt, "checkpw", recording)
    assert table.verify(BasicCredentials(b"mallory", b"secret")) is False
    assert seen == [table.dummy]
    assert table.dummy.startswith(b"$2b$04$")  # the file's usual cost
    assert table.verify(BasicCredentials(b"alice", b"secret")) is True
    assert seen[1] == USERS.users[0][1]


def test_dummy_hash_uses_the_most_common_cost() -> None:
    users = BasicAuth(
        users_file=Path("/u"),
        users=((b"a", hashed(b"x", 5)), (b"b", hashed(b"x", 5)), (b"c", hashed(b"x", 4))),
    )
    assert UserTable(users).dummy == b"$2b$05$" + b"." * 53


def backend() -> BackendTarget:
    return BackendTarget(url="ws://127.0.0.1:9000", scheme="ws", host="127.0.0.1", port=9000)


SERVICE = ForwardAuth(
    url="http://auth.internal:9100/check?app=chat",
    scheme="http",
    target="/check?app=chat",
    host="auth.internal",
    port=9100,
)
STAFF = RouteConfig(path="/staff", path_prefix=None, backend=backend(), auth=USERS, key_path="host[0].route[0]")
SSO = RouteConfig(path="/sso", path_prefix=None, backend=backend(), auth=SERVICE, key_path="host[0].route[1]")
HOST = HostConfig(names=("chat.example.com",), routes=(STAFF, SSO))
CONFIG = Config(
    path=Path("/etc/gatewayd/gatewayd.toml"),
    listeners=(ListenerConfig(address=Address("127.0.0.1", 0), tls=False),),
    hosts=(HOST,),
)
CLIENT = ClientInfo(address="192.0.2.7", port=50000, tls=True, tls_host=HOST)


def request(target: str, *extra: str) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: chat.example.com:8443",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_service_request_headers() -> None:
    accepted = decide(
        parse_request_head(
            request(
                "/sso?room=1",
                "Origin: https://chat.example.com",
                "Cookie: a=1",
                "Cookie: b=2",
                "Authorization: Bearer t",
                "X-Other: not sent",
                "User-Agent: test",
            )
        ),
        CLIENT,
        HostTable([HOST]),
    )
    assert service_request_headers(SERVICE, accepted, CLIENT) == [
        (b"Host", b"auth.internal:9100"),
        (b"X-Forwarded-Method", b"GET"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"chat.example.com:8443"),
        (b"X-Forwarded-Uri", b"/sso?room=1"),
        (b"X-Original-URI", b"/sso?room=1"),
        (b"X-Forwarded-For", b"192.0.2.7"),
        (b"X-Real-IP", b"192.0.2.7"),
        (b"Origin", b"https://chat.example.com"),
        (b"Cookie", b"a=1"),
        (b"Cookie", b"b=2"),
        (b"Authorization", b"Bearer t"),
        (b"Connection", b"close"),
    ]


def basic_header(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_authorize_basic_in_a_worker_thread() -> None:
    authenticator = Authenticator(CONFIG)
    hosts = HostTable([HOST])
    good = decide(parse_request_head(request("/staff", basic_header("alice", "secret"))), CLIENT, hosts)
    with trio.fail_after(10):
        assert await authenticator.authorize(good, CLIENT) is good
        for user, password in (("alice", "wrong"), ("mallory", "secret")):
            bad = decide(parse_request_head(request("/staff", basic_header(user, password))), CLIENT, hosts)
            with pytest.raises(HandshakeRejected) as info:
                await authenticator.authorize(bad, CLIENT)
            assert info.value.status == 401
            assert info.value.headers == (("WWW-Authenticate", 'Basic realm="gatewayd", charset="UTF-8"'),)
            assert info.value.detail == "wrong user name or password"  # no names, no passwords


async def test_authorize_basic_keeps_the_loop_running() -> None:
    """While bcrypt runs (cost 12, tens of milliseconds) other tasks keep running."""
    slow = BasicAuth(users_file=Path("/u"), users=((b"alice", hashed(b"secret", 12)),))
    route = RouteConfig(path="/staff", path_prefix=None, backend=backend(), auth=slow, key_path="r")
    host = HostConfig(names=("chat.example.com",), routes=(route,))
    config = Config(path=CONFIG.path, listeners=CONFIG.listeners, hosts=(host,))
    client = ClientInfo(address="192.0.2.7", port=1, tls=True, tls_host=host)
    accepted = decide(
        parse_request_head(request("/staff", basic_header("alice", "secret"))), client, HostTable([host])
    )
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.001)
            ticks += 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await Authenticator(config).authorize(accepted, client)
            nursery.cancel_scope.cancel()
    assert ticks >= 3


def test_authenticator_timeouts_follow_the_gateway_settings() -> None:
    authenticator = Authenticator(CONFIG)
    assert authenticator.service_timeout == 5.0  # min(backend_connect_timeout 5 s, 5 s)
    assert authenticator.password_timeout == 10.0  # handshake_timeout
    assert authenticator.cache_of(SSO) is None  # auth_cache_seconds = 0
