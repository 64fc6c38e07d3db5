"""Routing tables: host names, wildcards, default host, route choice, nginx-style rewrite."""

from __future__ import annotations

import pytest

from gatewayd.config import BackendTarget, HostConfig, RouteConfig
from gatewayd.routing import (
    HostTable,
    host_from_header,
    name_matches,
    normalize_name,
    rewrite_target,
    select_route,
)


def route(path: str | None = None, prefix: str | None = None, backend_path: str | None = None) -> RouteConfig:
    url = "ws://127.0.0.1:9000" + (backend_path or "")
    return RouteConfig(
        path=path,
        path_prefix=prefix,
        backend=BackendTarget(url=url, scheme="ws", host="127.0.0.1", port=9000, path=backend_path),
    )


A = HostConfig(names=("chat.example.com", "chat2.example.com"), routes=(), index=0)
W = HostConfig(names=("*.example.org",), routes=(), index=1)
X = HostConfig(names=("api.example.org",), routes=(), index=2, default=True)
TABLE = HostTable([A, W, X])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("chat.example.com", A),
        ("CHAT.example.COM", A),
        ("chat.example.com.", A),
        ("chat2.example.com", A),
        ("a.example.org", W),
        ("api.example.org", X),  # exact beats wildcard
        ("example.org", None),  # wildcard needs exactly one label
        ("a.b.example.org", None),
        ("other.test", None),
        (None, None),
        ("", None),
    ],
)
def test_find(name: str | None, expected: HostConfig | None) -> None:
    assert TABLE.find(name) is expected


@pytest.mark.parametrize("name", ["unknown.test", None, "a.b.example.org"])
def test_lookup_falls_back_to_default(name: str | None) -> None:
    assert TABLE.lookup(name) is X


def test_no_default() -> None:
    assert HostTable([A]).lookup("nope.test") is None


@pytest.mark.parametrize(
    "value, expected",
    [
        ("chat.example.com", "chat.example.com"),
        ("Chat.Example.com:8443", "chat.example.com"),
        ("chat.example.com.:443", "chat.example.com"),
        ("[::1]:8443", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),  # unbracketed, as trio-websocket sends it
        ("2001:DB8::1", "2001:db8::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("", None),
        ("a b", None),
        ("host:port", None),
        ("[::1", None),
        ("user@host", None),
    ],
)
def test_host_from_header(value: str, expected: str | None) -> None:
    assert host_from_header(value) == expected


@pytest.mark.parametrize(
    "pattern, name, matches",
    [
        ("*.example.org", "a.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "a.b.example.org", False),
        ("*.example.org", ".example.org", False),
        ("example.org", "example.org", True),
    ],
)
def test_name_matches(pattern: str, name: str, matches: bool) -> None:
    assert name_matches(pattern, name) is matches


def test_normalize_name() -> None:
    assert normalize_name(" Example.COM. ") == "example.com"


EXACT = route(path="/chat")
SHORT = route(prefix="/")
LONG = route(prefix="/chat/")
HOST = HostConfig(names=("h",), routes=(SHORT, LONG, EXACT))


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/chat", EXACT),  # exact beats any prefix
        ("/chat/room", LONG),  # longest prefix
        ("/other", SHORT),
        ("/", SHORT),
    ],
)
def test_select_route(path: str, expected: RouteConfig) -> None:
    assert select_route(HOST, path) is expected


def test_select_route_none() -> None:
    assert select_route(HostConfig(names=("h",), routes=(EXACT,)), "/nope") is None


@pytest.mark.parametrize(
    "r, path, query, expected",
    [
        (route(path="/chat"), "/chat", None, "/chat"),
        (route(path="/chat"), "/chat", "a=1", "/chat?a=1"),
        (route(path="/chat"), "/chat", "", "/chat?"),
        (route(path="/chat", backend_path="/ws"), "/chat", "a=1", "/ws?a=1"),
        (route(prefix="/chat/", backend_path="/"), "/chat/room/1", None, "/room/1"),
        (route(prefix="/chat/", backend_path="/v2/"), "/chat/room", "x=y", "/v2/room?x=y"),
        (route(prefix="/chat/"), "/chat/room", None, "/chat/room"),
        (route(prefix="/api", backend_path="/internal"), "/api/x", None, "/internal/x"),
    ],
)
def test_rewrite_target(r: RouteConfig, path: str, query: str | None, expected: str) -> None:
    assert rewrite_target(r, path, query) == expected


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/a/b", "/a/b"),
        ("/public/../admin/x", "/admin/x"),
        ("/public/%2e%2e/admin/x", "/admin/x"),
        ("/public/%2E%2E/admin/x", "/admin/x"),
        ("/%61dmin/x", "/admin/x"),
        ("//admin//x", "/admin/x"),
        ("/a/./b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/../../x", "/x"),
        ("/a%2fb", "/a%2Fb"),
        ("/a%2Fb%20c", "/a%2Fb%20c"),
        ("/a/%7e", "/a/~"),
        ("/", "/"),
        ("/a%zz", None),
        ("/a%2", None),
        ("/x%00", None),
    ],
)
def test_normalize_path(path: str, expected: str | None) -> None:
    from gatewayd.routing import normalize_path

    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    "value",
    ['evil.com,a.example.com', 'a";for=6.6.6.6', "a;b", "a..b", "a:99999", "a:", "[zz]:1", "a\x1b[2J", "-a.com"],
)
def test_host_header_rejects_what_could_poison_forwarded_headers(value: str) -> None:
    assert host_from_header(value) is None
