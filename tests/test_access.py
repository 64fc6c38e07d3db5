"""The pure access-control parts (gatewayd.access): tables, exact values.

Address lists (row 9b), Basic credentials (row 14a's pure half), redirect
Locations (row 9a), the forward-auth answer cache and its key.
"""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.access import (
    AnswerCache,
    BasicCredentials,
    basic_credentials,
    check_addresses,
    client_ip,
    credential_key,
    parse_basic_authorization,
    redirect_location,
    redirect_rejection,
    refusal,
    www_authenticate,
)
from gatewayd.config import (
    AccessList,
    BackendTarget,
    BasicAuth,
    HostConfig,
    Redirect,
    RouteConfig,
)
from gatewayd.errors import HandshakeRejected


def nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


# --------------------------------------------------------------------------- row 9b


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # dual-stack sockets report IPv4 clients this way
        ("fe80::1%eth0", "fe80::1"),
        ("-", None),
        ("unix", None),
        ("", None),
    ],
)
def test_client_ip(address: str, expected: str | None) -> None:
    ip = client_ip(address)
    assert (str(ip) if ip is not None else None) == expected


TEN = AccessList(allow=nets("10.0.0.0/8"))
TEN_BUT_FIVE = AccessList(allow=nets("10.0.0.0/8"), deny=nets("10.0.0.5/32"))
DENY_ONLY = AccessList(deny=nets("10.0.0.0/8", "2001:db8::/32"))
V6_ONLY = AccessList(allow=nets("2001:db8::/32"))
BOTH_FAMILIES = AccessList(allow=nets("192.0.2.0/24", "2001:db8::/32"))


@pytest.mark.parametrize(
    "access, address, reason",
    [
        pytest.param(AccessList(), "203.0.113.9", None, id="no-lists"),
        pytest.param(AccessList(), "not-an-ip", None, id="no-lists-unknown-address"),
        pytest.param(TEN, "10.1.2.3", None, id="allow-in"),
        pytest.param(TEN, "11.0.0.1", "not in allow", id="allow-out"),
        pytest.param(TEN, "::ffff:10.1.2.3", None, id="allow-ipv4-mapped"),
        pytest.param(TEN, "2001:db8::1", "not in allow", id="allow-v4-client-v6"),
        pytest.param(TEN_BUT_FIVE, "10.0.0.5", "in deny 10.0.0.5/32", id="deny-wins-over-allow"),
        pytest.param(TEN_BUT_FIVE, "10.0.0.6", None, id="allowed-neighbour"),
        pytest.param(DENY_ONLY, "192.0.2.1", None, id="deny-only-others-allowed"),
        pytest.param(DENY_ONLY, "10.9.9.9", "in deny 10.0.0.0/8", id="deny-only-v4"),
        pytest.param(DENY_ONLY, "2001:db8::7", "in deny 2001:db8::/32", id="deny-only-v6"),
        pytest.param(V6_ONLY, "127.0.0.1", "not in allow", id="v6-allow-v4-client"),
        pytest.param(BOTH_FAMILIES, "2001:db8:1::1", None, id="both-families-v6"),
        pytest.param(BOTH_FAMILIES, "192.0.2.200", None, id="both-families-v4"),
        pytest.param(TEN, "-", "the client address is not an IP address", id="unknown-fails-closed"),
    ],
)
def test_refusal(access: AccessList, address: str, reason: str | None) -> None:
    assert refusal(access, client_ip(address)) == reason


def backend() -> BackendTarget:
    return BackendTarget(url="ws://127.0.0.1:9000", scheme="ws", host="127.0.0.1", port=9000)


def route(**kwargs: object) -> RouteConfig:
    values: dict[str, object] = {
        "path": "/chat",
        "path_prefix": None,
        "backend": backend(),
        "key_path": "host[0].route[0]",
    }
    values.update(kwargs)
    return RouteConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "host_access, route_access, address, refused_by",
    [
        pytest.param(AccessList(), AccessList(), "127.0.0.2", None, id="no-lists"),
        pytest.param(TEN, AccessList(), "10.0.0.1", None, id="host-allows"),
        pytest.param(TEN, AccessList(), "127.0.0.1", "host[0]", id="host-refuses"),
        pytest.param(TEN, TEN_BUT_FIVE, "10.0.0.5", "host[0].route[0]", id="host-allows-route-denies"),
        pytest.param(DENY_ONLY, TEN, "10.0.0.1", "host[0]", id="host-deny-checked-first"),
        pytest.param(AccessList(), TEN, "192.0.2.1", "host[0].route[0]", id="route-refuses"),
    ],
)
def test_check_addresses_host_first_then_route(
    host_access: AccessList, route_access: AccessList, address: str, refused_by: str | None
) -> None:
    host = HostConfig(names=("a.example",), routes=(), access=host_access)
    the_route = route(access=route_access)
    if refused_by is None:
        check_addresses(host, the_route, address)
        return
    with pytest.raises(HandshakeRejected) as info:
        check_addresses(host, the_route, address)
    assert info.value.status == 403
    assert info.value.detail.startswith(f"client {address} refused by {refused_by}: ")
    assert info.value.headers == ()


# --------------------------------------------------------------------------- row 14a


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode("utf-8")).decode()


@pytest.mark.parametrize(
    "values, user, password",
    [
        pytest.param([basic("alice:secret")], b"alice", b"secret", id="plain"),
        pytest.param(["basic " + basic("alice:secret")[6:]], b"alice", b"secret", id="scheme-lowercase"),
        pytest.param(["BASIC   " + basic("alice:secret")[6:]], b"alice", b"secret", id="scheme-upper-spaces"),
        pytest.param([basic("alice:a:b:c")], b"alice", b"a:b:c", id="colon-in-password"),
        pytest.param([basic("alice:")], b"alice", b"", id="empty-password"),
        pytest.param([basic(":secret")], b"", b"secret", id="empty-user"),
        pytest.param([basic("zoë:pässword")], "zoë".encode(), "pässword".encode(), id="utf-8"),
    ],
)
def test_parse_basic_authorization(values: list[str], user: bytes, password: bytes) -> None:
    assert parse_basic_authorization(values) == BasicCredentials(user, password)


@pytest.mark.parametrize(
    "values, reason",
    [
        pytest.param([], "no Authorization header", id="missing"),
        pytest.param([basic("a:b"), basic("a:b")], "repeated Authorization header", id="repeated"),
        pytest.param(["Bearer eyJhbGciOi"], "Authorization scheme is not Basic", id="bearer"),
        pytest.param(["Digest username=\"a\""], "Authorization scheme is not Basic", id="digest"),
        pytest.param(["Basic"], "Basic credentials are not a base64 token", id="no-token"),
        pytest.param(["Basic !!!!"], "Basic credentials are not a base64 token", id="not-base64-chars"),
        pytest.param(["Basic YWxp Y2U6Yg=="], "Basic credentials are not a base64 token", id="space-inside"),
        pytest.param(["Basic YWxpY2U6Yg"], "Basic credentials are not valid base64", id="bad-padding"),
        pytest.param(["Basic a-b_c"], "Basic credentials are not valid base64", id="token68-not-base64"),
        pytest.param([basic("alice")], "Basic credentials have no ':' between user and password", id="no-colon"),
        pytest.param(["YWxpY2U6c2VjcmV0"], "Authorization scheme is not Basic", id="no-scheme"),
    ],
)
def test_parse_basic_authorization_refuses(values: list[str], reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_basic_authorization(values)
    assert str(info.value) == reason


def test_credentials_repr_hides_the_password() -> None:
    assert "hunter2" not in repr(BasicCredentials(b"alice", b"hunter2"))


def test_basic_credentials_401_with_challenge() -> None:
    auth = BasicAuth(users_file=Path("/u"), realm="Chat staff")
    with pytest.raises(HandshakeRejected) as info:
        basic_credentials(["Basic nope!"], auth)
    assert info.value.status == 401
    assert info.value.headers == (("WWW-Authenticate", 'Basic realm="Chat staff", charset="UTF-8"'),)
    assert "nope" not in info.value.detail


def test_www_authenticate_exact() -> None:
    assert www_authenticate("gatewayd") == 'Basic realm="gatewayd", charset="UTF-8"'


# --------------------------------------------------------------------------- row 9a


def redirect_route(
    url: str, origin: str, path: str | None, query: str | None, *, prefix: str | None = None, status: int = 308
) -> RouteConfig:
    return route(
        path=None if prefix else "/old",
        path_prefix=prefix,
        backend=None,
        redirect=Redirect(url=url, origin=origin, path=path, query=query, status=status),
    )


EXACT = redirect_route("wss://new.example/chat", "wss://new.example", "/chat", None)
EXACT_NO_PATH = redirect_route("wss://new.example", "wss://new.example", None, None)
PREFIX = redirect_route("wss://new.example/v2/", "wss://new.example", "/v2/", None, prefix="/old/")
PREFIX_NO_PATH = redirect_route("https://new.example:8443", "https://new.example:8443", None, None, prefix="/old/")
PREFIX_ROOT = redirect_route("wss://new.example/", "wss://new.example", "/", None, prefix="/old/")
WITH_QUERY = redirect_route("wss://new.example/chat?from=old", "wss://new.example", "/chat", "from=old")


@pytest.mark.parametrize(
    "the_route, path, query, location",
    [
        pytest.param(EXACT, "/old", None, "wss://new.example/chat", id="exact"),
        pytest.param(EXACT, "/old", "room=1&t=2", "wss://new.example/chat?room=1&t=2", id="exact-query"),
        pytest.param(EXACT, "/old", "", "wss://new.example/chat", id="exact-empty-query"),
        pytest.param(EXACT_NO_PATH, "/old", "a=1", "wss://new.example/old?a=1", id="exact-no-path-keeps-path"),
        pytest.param(PREFIX, "/old/room/7", None, "wss://new.example/v2/room/7", id="prefix-suffix"),
        pytest.param(PREFIX, "/old/room/7", "a=1", "wss://new.example/v2/room/7?a=1", id="prefix-suffix-query"),
        pytest.param(PREFIX, "/old/", None, "wss://new.example/v2/", id="prefix-itself"),
        pytest.param(PREFIX_NO_PATH, "/old/x", "q", "https://new.example:8443/old/x?q", id="prefix-no-path"),
        pytest.param(PREFIX_ROOT, "/old/x/y", None, "wss://new.example/x/y", id="prefix-to-root"),
        pytest.param(WITH_QUERY, "/old", None, "wss://new.example/chat?from=old", id="url-query"),
        pytest.param(WITH_QUERY, "/old", "a=1", "wss://new.example/chat?from=old&a=1", id="url-query-and-request-query"),
    ],
)
def test_redirect_location(the_route: RouteConfig, path: str, query: str | None, location: str) -> None:
    assert redirect_location(the_route, path, query) == location


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_rejection(status: int) -> None:
    the_route = redirect_route("wss://n.example/x", "wss://n.example", "/x", None, status=status)
    error = redirect_rejection(the_route, "/old", "token=secret")
    assert error.status == status
    assert error.headers == (("Location", "wss://n.example/x?token=secret"),)
    # The log never gets the client's query.
    assert "secret" not in error.detail


# --------------------------------------------------------------------------- forward-auth cache


def test_credential_key() -> None:
    assert credential_key([], []) is None
    one = credential_key(["session=abc"], [])
    assert one is not None and len(one) == 32
    assert b"abc" not in one
    assert credential_key(["session=abc"], []) == one
    assert credential_key(["session=abd"], []) != one
    assert credential_key([], ["session=abc"]) != one  # header name is part of the key
    assert credential_key(["a=1", "b=2"], ["Bearer x"]) != credential_key(["a=1"], ["Bearer x"])


def test_answer_cache_expires() -> None:
    cache = AnswerCache(ttl=10.0)
    cache.put(b"k", (("X-User", "alice"),), now=100.0)
    assert cache.get(b"k", now=109.9) == (("X-User", "alice"),)
    assert cache.get(b"k", now=110.0) is None
    assert len(cache) == 0  # an expired entry is dropped when met
    assert cache.get(b"other", now=100.0) is None


def test_answer_cache_is_lru_bounded() -> None:
    cache = AnswerCache(ttl=60.0, max_entries=3)
    for key in (b"a", b"b", b"c"):
        cache.put(key, (), now=0.0)
    assert cache.get(b"a", now=1.0) == ()  # a is now the most recently used
    cache.put(b"d", (), now=2.0)
    assert len(cache) == 3
    assert cache.get(b"b", now=3.0) is None  # the least recently used went first
    assert cache.get(b"a", now=3.0) == () and cache.get(b"c", now=3.0) == ()


def test_answer_cache_with_zero_ttl_keeps_nothing() -> None:
    cache = AnswerCache(ttl=0.0)
    cache.put(b"k", (), now=0.0)
    assert len(cache) == 0


# --------------------------------------------------------------------------- properties


@given(
    user=st.binary(max_size=40).filter(lambda b: b":" not in b),
    password=st.binary(max_size=80),
)
def test_basic_credentials_round_trip(user: bytes, password: bytes) -> None:
    token = base64.b64encode(user + b":" + password).decode()
    assert parse_basic_authorization([f"Basic {token}"]) == BasicCredentials(user, password)


@given(
    address=st.ip_addresses(v=4),
    prefix=st.integers(min_value=0, max_value=32),
)
def test_ipv4_mapped_clients_match_like_ipv4(address: ipaddress.IPv4Address, prefix: int) -> None:
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    access = AccessList(allow=(network,))
    assert refusal(access, client_ip(str(address))) is None
    assert refusal(access, client_ip(f"::ffff:{address}")) is None
    assert refusal(AccessList(deny=(network,)), client_ip(f"::ffff:{address}")) == f"in deny {network}"


def test_forward_auth_cache_key_covers_what_the_service_decides_on() -> None:
    from gatewayd.access import credential_key

    base = (("method", "GET"), ("host", "a.test"), ("uri", "/fa/public"), ("origin", "https://a.test"), ("client", "192.0.2.1"))
    key = credential_key(["sid=victim"], [], base)
    assert key == credential_key(["sid=victim"], [], base)
    for index, (label, _) in enumerate(base):
        changed = list(base)
        changed[index] = (label, "other")
        assert credential_key(["sid=victim"], [], changed) != key, label
    assert credential_key([], [], base) is None
