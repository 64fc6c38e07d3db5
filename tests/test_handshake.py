"""The pure handshake decision, one case per SPEC section 3 row (5-14, 18-20).

Pattern: build a good request with make_request(), then break one thing.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from gatewayd.access import BasicCredentials
from gatewayd.config import (
    AccessList,
    BackendTarget,
    BasicAuth,
    ForwardAuth,
    HostConfig,
    Redirect,
    RouteConfig,
)
from gatewayd.errors import BackendBadUpgrade, HandshakeRejected
from gatewayd.handshake import (
    BackendAnswer,
    ClientInfo,
    accept_value,
    bridge_upgraded,
    build_backend_request,
    check_backend_response,
    decide,
    find_head_end,
    parse_request_head,
    render_refusal,
    render_relayed,
    render_response,
    render_switching_protocols,
)
from gatewayd.routing import HostTable

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def backend(url: str = "ws://127.0.0.1:9000/chat", path: str | None = "/chat") -> BackendTarget:
    return BackendTarget(url=url, scheme="ws", host="127.0.0.1", port=9000, path=path)


CHAT = RouteConfig(path="/chat", path_prefix=None, backend=backend(), key_path="host[0].route[0]")
PREFIX = RouteConfig(
    path=None,
    path_prefix="/api/",
    backend=backend("ws://127.0.0.1:9000/v2/", "/v2/"),
    key_path="host[0].route[1]",
)
ORIGINS = RouteConfig(
    path="/strict",
    path_prefix=None,
    backend=backend("ws://127.0.0.1:9000", None),
    origins=("https://chat.example.com",),
    subprotocols=("v2.chat", "v1.chat"),
    extensions=False,
    key_path="host[0].route[2]",
)
HOST = HostConfig(names=("chat.example.com",), routes=(CHAT, PREFIX, ORIGINS), index=0)
OTHER = HostConfig(
    names=("*.example.org",),
    routes=(RouteConfig(path="/", path_prefix=None, backend=backend(), key_path="host[1].route[0]"),),
    index=1,
    default=True,
)
HOSTS = HostTable([HOST, OTHER])
TLS_CLIENT = ClientInfo(address="192.0.2.7", port=50000, tls=True, tls_host=HOST, server_name="chat.example.com")
PLAIN_CLIENT = ClientInfo(address="2001:db8::1", port=50000, tls=False)


def make_request(
    target: str = "/chat",
    *,
    method: str = "GET",
    host: str = "chat.example.com",
    drop: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    replace: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    headers = {
        "Host": host,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    headers.update(replace or {})
    lines = [f"{method} {target} {version}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def run(raw: bytes, client: ClientInfo = TLS_CLIENT):
    return decide(parse_request_head(raw), client, HOSTS)


def test_rfc6455_example_accept_value() -> None:
    assert accept_value(KEY) == ACCEPT


def test_firefox_12_request_from_the_origin_log() -> None:
    raw = (
        b"GET / HTTP/1.1\r\n"
        b"Host: chat.example.com\r\n"
        b"User-Agent: Mozilla/5.0 (Windows NT 5.2; WOW64; rv:12.0) Gecko/20100101 Firefox/12.0\r\n"
        b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        b"Accept-Language: en-us,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate\r\n"
        b"Connection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Origin: https://chat.example.com\r\n"
        b"Sec-WebSocket-Key: iTAsnxQZ045LBMzPRnlYGg==\r\n"
        b"Pragma: no-cache\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Upgrade: websocket\r\n\r\n"
    )
    host = HostConfig(
        names=("chat.example.com",),
        routes=(RouteConfig(path="/", path_prefix=None, backend=backend(), key_path="r"),),
    )
    client = ClientInfo(address="192.0.2.7", port=1, tls=True, tls_host=host)
    accepted = decide(parse_request_head(raw), client, HostTable([host]))
    assert accepted.key == "iTAsnxQZ045LBMzPRnlYGg=="
    assert accepted.accept == "DlzGzimVwZhqPo2kSi1RfDjBXLE="


@pytest.mark.parametrize(
    "raw, status",
    [
        pytest.param(b"GET /chat HTTP/1.0\r\nHost: chat.example.com\r\n\r\n", 400, id="row5-http-1.0"),
        pytest.param(b"GET  /chat HTTP/1.1\r\nHost: chat.example.com\r\n\r\n", 400, id="row5-bad-request-line"),
        pytest.param(b"GET /chat HTTP/1.1\r\nHost chat.example.com\r\n\r\n", 400, id="row5-bad-header-syntax"),
        pytest.param(make_request(extra=("X-A: 1", " folded")), 400, id="row5-obs-fold"),
        pytest.param(make_request(extra=("X-A: a\x00b",)), 400, id="row5-nul-in-value"),
        pytest.param(make_request(extra=("Host: chat.example.com",)), 400, id="row5-duplicate-host"),
        pytest.param(make_request(drop=("Host",)), 400, id="row5-missing-host"),
        pytest.param(make_request(host=""), 400, id="row5-empty-host"),
        pytest.param(make_request(target="*"), 400, id="row5-asterisk-form"),
        pytest.param(make_request(host="other.example.org"), 421, id="row6-host-not-sni-host"),
        pytest.param(make_request(host="unknown.test"), 421, id="row6-unknown-host-on-non-default"),
        pytest.param(make_request(method="POST"), 405, id="row8-post"),
        pytest.param(make_request(method="HEAD"), 405, id="row8-head"),
        pytest.param(make_request(target="/nope"), 404, id="row9-no-route"),
        pytest.param(make_request(extra=("Content-Length: 5",)), 400, id="row10-content-length"),
        pytest.param(make_request(extra=("Transfer-Encoding: chunked",)), 400, id="row10-chunked"),
        pytest.param(make_request(drop=("Upgrade",)), 426, id="row11-no-upgrade"),
        pytest.param(make_request(replace={"Upgrade": "h2c"}), 426, id="row11-upgrade-h2c"),
        pytest.param(make_request(replace={"Connection": "keep-alive"}), 426, id="row11-no-connection-upgrade"),
        pytest.param(make_request(drop=("Sec-WebSocket-Version",)), 426, id="row12-version-missing"),
        pytest.param(make_request(replace={"Sec-WebSocket-Version": "8"}), 426, id="row12-version-8"),
        pytest.param(make_request(extra=("Sec-WebSocket-Version: 13",)), 426, id="row12-version-repeated"),
        pytest.param(make_request(drop=("Sec-WebSocket-Key",)), 400, id="row13-key-missing"),
        pytest.param(make_request(replace={"Sec-WebSocket-Key": "c2hvcnQ="}), 400, id="row13-key-short"),
        pytest.param(make_request(replace={"Sec-WebSocket-Key": "!!!!!!!!!!!!!!!!!!!!!!=="}), 400, id="row13-key-not-base64"),
        pytest.param(make_request(extra=(f"Sec-WebSocket-Key: {KEY}",)), 400, id="row13-key-repeated"),
        pytest.param(make_request("/strict", drop=()), 403, id="row14-origin-missing"),
        pytest.param(make_request("/strict", extra=("Origin: https://evil.example",)), 403, id="row14-origin-wrong"),
    ],
)
def test_rejections(raw: bytes, status: int) -> None:
    with pytest.raises(HandshakeRejected) as info:
        run(raw)
    assert info.value.status == status


def test_row7_plain_listener_unknown_host_without_default() -> None:
    hosts = HostTable([HOST])
    with pytest.raises(HandshakeRejected) as info:
        decide(parse_request_head(make_request(host="nope.test")), PLAIN_CLIENT, hosts)
    assert info.value.status == 404


def test_plain_listener_routes_by_host_and_default() -> None:
    accepted = run(make_request("/", host="x.example.org"), PLAIN_CLIENT)
    assert accepted.host is OTHER
    accepted = run(make_request("/", host="unknown.test"), PLAIN_CLIENT)
    assert accepted.host is OTHER  # the default host


@pytest.mark.parametrize(
    "host_header",
    ["chat.example.com", "CHAT.Example.COM", "chat.example.com.", "chat.example.com:8443", "chat.example.com.:443"],
)
def test_host_port_case_and_trailing_dot_ignored(host_header: str) -> None:
    assert run(make_request(host=host_header)).host is HOST


def test_tls_default_host_accepts_unknown_host_header() -> None:
    client = ClientInfo(address="192.0.2.7", port=1, tls=True, tls_host=OTHER, server_name=None)
    assert run(make_request("/", host="127.0.0.1:8443"), client).host is OTHER


def test_firefox_connection_token_list_and_case() -> None:
    accepted = run(make_request(replace={"Connection": "keep-alive, Upgrade", "Upgrade": "WebSocket"}))
    assert accepted.accept == ACCEPT


def test_origin_compared_lowercase() -> None:
    accepted = run(make_request("/strict", extra=("Origin: HTTPS://Chat.Example.COM",)))
    assert accepted.route is ORIGINS


def test_absolute_form_target_is_accepted() -> None:
    accepted = run(make_request("https://chat.example.com/chat?x=1"))
    assert accepted.route is CHAT
    assert accepted.target == "/chat?x=1"


def test_rejection_renders_426_headers() -> None:
    with pytest.raises(HandshakeRejected) as info:
        run(make_request(drop=("Upgrade",)))
    data = render_refusal(info.value, server_header="gatewayd", date="Wed, 25 Nov 2026 18:00:00 GMT")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 426 Upgrade Required"
    assert b"Upgrade: websocket" in lines
    assert b"Connection: Upgrade, close" in lines
    assert b"Server: gatewayd" in lines
    assert b"Content-Type: text/plain; charset=utf-8" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert body.endswith(b"\n") and body.count(b"\n") == 1


def test_version_426_carries_supported_version() -> None:
    with pytest.raises(HandshakeRejected) as info:
        run(make_request(replace={"Sec-WebSocket-Version": "8"}))
    data = render_refusal(info.value)
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in data
    assert b"\r\nConnection: close\r\n" in data


def test_405_has_allow_get() -> None:
    with pytest.raises(HandshakeRejected) as info:
        run(make_request(method="POST"))
    assert b"\r\nAllow: GET\r\n" in render_refusal(info.value)


def test_render_response_exact_bytes() -> None:
    assert render_response(404, (), b"Not Found\n") == (
        b"HTTP/1.1 404 Not Found\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 10\r\n"
        b"Connection: close\r\n\r\n"
        b"Not Found\n"
    )


@pytest.mark.parametrize(
    "buffer, end",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest", 27),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", None),
        (b"GET / HTTP/1.1\nHost: a\n\nrest", 24),
        (b"\r\nGET / HTTP/1.1\r\n\r\n", 20),
    ],
)
def test_find_head_end(buffer: bytes, end: int | None) -> None:
    assert find_head_end(buffer) == end


# ---------------------------------------------------------------- backend request


def forwarded_lines(raw: bytes, client: ClientInfo = TLS_CLIENT) -> list[str]:
    accepted = run(raw, client)
    return build_backend_request(accepted, client).decode("latin-1").split("\r\n")


@pytest.mark.parametrize(
    "target, route_backend, expected",
    [
        ("/chat", "/chat", "/chat"),
        ("/chat?room=1&t=x", "/chat", "/chat?room=1&t=x"),
        ("/api/users/7?x=1", "/v2/", "/v2/users/7?x=1"),
    ],
)
def test_backend_request_line_rewrite(target: str, route_backend: str, expected: str) -> None:
    lines = forwarded_lines(make_request(target))
    assert lines[0] == f"GET {expected} HTTP/1.1"


def test_backend_request_headers() -> None:
    raw = make_request(
        replace={"Connection": "keep-alive, Upgrade, X-Hop"},
        extra=(
            "X-Hop: secret",
            "Keep-Alive: timeout=5",
            "Proxy-Authorization: Basic eA==",
            "Cookie: session=abc",
            "Authorization: Bearer t",
            "Origin: https://chat.example.com",
            "X-Forwarded-For: 6.6.6.6",
            "Forwarded: for=6.6.6.6",
            "Sec-WebSocket-Protocol: v1.chat, v2.chat",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        ),
    )
    lines = forwarded_lines(raw)
    assert lines[1] == "Host: chat.example.com"
    assert "Cookie: session=abc" in lines
    assert "Authorization: Bearer t" in lines
    assert "Origin: https://chat.example.com" in lines
    assert "Upgrade: websocket" in lines and "Connection: Upgrade" in lines
    assert "X-Forwarded-For: 192.0.2.7" in lines
    assert "X-Forwarded-Proto: https" in lines
    assert "X-Forwarded-Host: chat.example.com" in lines
    assert "Forwarded: for=192.0.2.7;host=chat.example.com;proto=https" in lines
    assert "Sec-WebSocket-Protocol: v1.chat, v2.chat" in lines
    assert "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits" in lines
    assert "Sec-WebSocket-Key: " + KEY in lines
    for gone in ("X-Hop", "Keep-Alive", "Proxy-Authorization", "6.6.6.6"):
        assert not any(gone in line for line in lines), gone
    assert lines[-2:] == ["", ""]


def test_subprotocol_filter_and_extensions_stripped() -> None:
    raw = make_request(
        "/strict",
        extra=(
            "Origin: https://chat.example.com",
            "Sec-WebSocket-Protocol: v1.chat, other, v2.chat",
            "Sec-WebSocket-Extensions: permessage-deflate",
        ),
    )
    lines = forwarded_lines(raw)
    assert "Sec-WebSocket-Protocol: v1.chat, v2.chat" in lines
    assert not any(line.startswith("Sec-WebSocket-Extensions") for line in lines)


def test_subprotocol_filter_leaves_nothing_no_header() -> None:
    raw = make_request(
        "/strict", extra=("Origin: https://chat.example.com", "Sec-WebSocket-Protocol: other")
    )
    assert not any(line.startswith("Sec-WebSocket-Protocol") for line in forwarded_lines(raw))


def test_ipv6_client_in_forwarded_plain() -> None:
    lines = forwarded_lines(make_request(host="chat.example.com"), PLAIN_CLIENT)
    assert 'Forwarded: for="[2001:db8::1]";host=chat.example.com;proto=http' in lines
    assert "X-Forwarded-Proto: http" in lines


# ---------------------------------------------------------------- backend answer


def answer(*headers: tuple[str, str], status: int = 101) -> BackendAnswer:
    return BackendAnswer(status=status, reason="Switching Protocols", headers=tuple(headers))


GOOD = (("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", ACCEPT))


def accepted_with(*extra: str):
    return run(make_request(extra=extra))


def test_backend_101_valid_and_our_101() -> None:
    accepted = accepted_with("Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Extensions: permessage-deflate")
    upgraded = check_backend_response(
        accepted,
        answer(*GOOD, ("Sec-WebSocket-Protocol", "chat"), ("Sec-WebSocket-Extensions", "permessage-deflate"), ("Set-Cookie", "a=b"), ("Keep-Alive", "x")),
        "ws://b",
    )
    assert render_switching_protocols(accepted, upgraded) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
        b"Set-Cookie: a=b\r\n\r\n"
    )


@pytest.mark.parametrize(
    "headers, offered",
    [
        pytest.param((("Connection", "Upgrade"), ("Sec-WebSocket-Accept", ACCEPT)), (), id="no-upgrade"),
        pytest.param((("Upgrade", "websocket"), ("Sec-WebSocket-Accept", ACCEPT)), (), id="no-connection"),
        pytest.param((("Upgrade", "websocket"), ("Connection", "Upgrade")), (), id="no-accept"),
        pytest.param((("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", "x")), (), id="wrong-accept"),
        pytest.param(GOOD + (("Sec-WebSocket-Protocol", "chat"),), (), id="protocol-not-offered"),
        pytest.param(GOOD + (("Sec-WebSocket-Protocol", "b"),), ("Sec-WebSocket-Protocol: a",), id="other-protocol"),
        pytest.param(GOOD + (("Sec-WebSocket-Extensions", "permessage-deflate"),), (), id="extension-not-offered"),
    ],
)
def test_row19_bad_backend_101(headers, offered) -> None:
    with pytest.raises(BackendBadUpgrade):
        check_backend_response(accepted_with(*offered), answer(*headers), "ws://b")


def test_row18_relayed_answer_drops_hop_by_hop() -> None:
    data = render_relayed(
        BackendAnswer(
            status=403,
            reason="Forbidden",
            headers=(("Content-Type", "application/json"), ("Connection", "keep-alive"), ("Transfer-Encoding", "chunked"), ("X-Why", "nope")),
        ),
        b'{"error":"no"}',
        date="d",
    )
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 403 Forbidden"
    assert b"Content-Type: application/json" in lines
    assert b"X-Why: nope" in lines
    assert b"Content-Length: 14" in lines
    assert b"Connection: close" in lines
    assert not any(line.startswith(b"Transfer-Encoding") for line in lines)
    assert body == b'{"error":"no"}'


# ---------------------------------------------------------------- access rows 9a, 9b, 14a


ACCESS_ROUTES = (
    RouteConfig(
        path=None,
        path_prefix="/old/",
        backend=None,
        redirect=Redirect(url="wss://new.example/v2/", origin="wss://new.example", path="/v2/"),
        key_path="host[2].route[0]",
    ),
    RouteConfig(
        path="/internal",
        path_prefix=None,
        backend=backend(),
        access=AccessList(allow=(ipaddress.ip_network("10.0.0.0/8"),)),
        key_path="host[2].route[1]",
    ),
    RouteConfig(
        path="/staff",
        path_prefix=None,
        backend=backend(),
        origins=("https://access.example",),
        auth=BasicAuth(users_file=Path("/users"), realm="Staff"),
        key_path="host[2].route[2]",
    ),
    RouteConfig(
        path="/staff-fwd",
        path_prefix=None,
        backend=backend(),
        auth=BasicAuth(users_file=Path("/users")),
        auth_forward=True,
        key_path="host[2].route[3]",
    ),
    RouteConfig(
        path="/sso",
        path_prefix=None,
        backend=backend(),
        auth=ForwardAuth(url="http://127.0.0.1:9100/", scheme="http", host="127.0.0.1", port=9100,
                         response_headers=("X-User", "X-Groups")),
        key_path="host[2].route[4]",
    ),
)
ACCESS_HOST = HostConfig(
    names=("access.example",),
    routes=ACCESS_ROUTES,
    index=2,
    access=AccessList(deny=(ipaddress.ip_network("192.0.2.99/32"),)),
)
ACCESS_HOSTS = HostTable([ACCESS_HOST])
ALICE = "Authorization: Basic " + base64.b64encode(b"alice:secret").decode()


def run_access(raw: bytes, address: str = "10.1.2.3"):
    client = ClientInfo(address=address, port=1, tls=True, tls_host=ACCESS_HOST)
    return decide(parse_request_head(raw), client, ACCESS_HOSTS)


def access_request(target: str, *extra: str, **kwargs) -> bytes:
    return make_request(target, host="access.example", extra=extra, **kwargs)


@pytest.mark.parametrize(
    "raw, address, status",
    [
        pytest.param(access_request("/old/x?a=1"), "10.1.2.3", 308, id="row9a-redirect"),
        pytest.param(access_request("/old/x", drop=("Upgrade",)), "10.1.2.3", 308, id="row9a-before-row11"),
        pytest.param(access_request("/old/x"), "192.0.2.99", 308, id="row9a-before-host-deny"),
        # SPEC section 7: the route (and its redirect) is chosen before the method is judged.
        pytest.param(access_request("/old/x", method="POST"), "10.1.2.3", 308, id="row9a-before-row8"),
        pytest.param(access_request("/internal"), "192.0.2.1", 403, id="row9b-not-in-allow"),
        pytest.param(access_request("/internal", "Content-Length: 3"), "192.0.2.1", 403, id="row9b-before-row10"),
        pytest.param(access_request("/sso"), "192.0.2.99", 403, id="row9b-host-deny"),
        pytest.param(access_request("/staff", "Origin: https://access.example"), "10.1.2.3", 401, id="row14a-missing"),
        pytest.param(access_request("/staff", "Origin: https://access.example", "Authorization: Bearer x"), "10.1.2.3", 401, id="row14a-bearer"),
        pytest.param(access_request("/staff", "Origin: https://access.example", "Authorization: Basic !"), "10.1.2.3", 401, id="row14a-not-base64"),
        pytest.param(access_request("/staff"), "10.1.2.3", 403, id="row14-before-row14a"),
        pytest.param(access_request("/staff", "Origin: https://access.example", drop=("Sec-WebSocket-Key",)), "10.1.2.3", 400, id="row13-before-row14a"),
    ],
)
def test_access_rows(raw: bytes, address: str, status: int) -> None:
    with pytest.raises(HandshakeRejected) as info:
        run_access(raw, address)
    assert info.value.status == status


def test_row9a_renders_location() -> None:
    with pytest.raises(HandshakeRejected) as info:
        run_access(access_request("/old/room/7?token=abc"))
    data = render_refusal(info.value, date="d")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 308 Permanent Redirect"
    assert b"Location: wss://new.example/v2/room/7?token=abc" in lines
    assert b"Connection: close" in lines
    assert body == b"Moved: this endpoint is now wss://new.example/v2/room/7?token=abc\n"
    assert "abc" not in info.value.detail


def test_row14a_renders_challenge() -> None:
    with pytest.raises(HandshakeRejected) as info:
        run_access(access_request("/staff", "Origin: https://access.example"))
    head = render_refusal(info.value).partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 401 Unauthorized"
    assert b'WWW-Authenticate: Basic realm="Staff", charset="UTF-8"' in head


def test_row14a_well_formed_credentials_go_on_to_be_verified() -> None:
    accepted = run_access(access_request("/staff", "Origin: https://access.example", ALICE))
    assert accepted.credentials == BasicCredentials(b"alice", b"secret")
    assert run_access(access_request("/internal")).credentials is None


def test_backend_request_without_authorization_on_auth_routes() -> None:
    lines = build_backend_request(
        run_access(access_request("/staff", "Origin: https://access.example", ALICE)), TLS_CLIENT
    ).decode().split("\r\n")
    assert not any(line.lower().startswith("authorization") for line in lines)
    lines = build_backend_request(run_access(access_request("/staff-fwd", ALICE)), TLS_CLIENT).decode().split("\r\n")
    assert ALICE in lines


def test_backend_request_auth_headers_replace_client_copies() -> None:
    accepted = run_access(
        access_request("/sso", "X-User: mallory", "x-groups: admin", "X-Other: kept", "Authorization: Bearer t")
    )
    lines = build_backend_request(
        replace(accepted, auth_headers=(("X-User", "alice"),)), TLS_CLIENT
    ).decode().split("\r\n")
    assert "X-User: alice" in lines
    assert "X-Other: kept" in lines
    assert not any("mallory" in line or "admin" in line for line in lines)
    # Stripped even when the service's answer did not carry the header.
    assert not any(line.lower().startswith("x-groups") for line in lines)
    assert not any(line.lower().startswith("authorization") for line in lines)


# --------------------------------------------------------------------------- the tcp:// bridge's own 101

TCP = BackendTarget(url="tcp://127.0.0.1:5900", scheme="tcp", host="127.0.0.1", port=5900)


def bridge_accepted(route_subprotocols: tuple[str, ...], offer: str | None):
    route = RouteConfig(
        path="/vnc", path_prefix=None, backend=TCP, subprotocols=route_subprotocols,
        key_path="host[0].route[0]",
    )
    host = HostConfig(names=("chat.example.com",), routes=(route,), index=0)
    extra = (f"Sec-WebSocket-Protocol: {offer}",) if offer else ()
    extra += ("Sec-WebSocket-Extensions: permessage-deflate",)
    client = ClientInfo(address="192.0.2.7", port=1, tls=True, tls_host=host)
    return decide(parse_request_head(make_request("/vnc", extra=extra)), client, HostTable([host]))


@pytest.mark.parametrize(
    ("route_list", "offer", "chosen"),
    [
        pytest.param((), "binary", "binary", id="default-binary-like-websockify"),
        pytest.param((), "base64, binary", "binary", id="default-binary-among-others"),
        pytest.param((), "chat", None, id="default-nothing-else"),
        pytest.param((), None, None, id="no-offer"),
        pytest.param(("v2", "binary"), "binary, v2", "v2", id="route-preference-wins"),
        pytest.param(("v2", "binary"), "binary", "binary", id="route-second-choice"),
        pytest.param(("v2",), "binary", None, id="route-list-excludes-binary"),
    ],
)
def test_bridge_upgraded_subprotocol(
    route_list: tuple[str, ...], offer: str | None, chosen: str | None
) -> None:
    accepted = bridge_accepted(route_list, offer)
    upgraded = bridge_upgraded(accepted)
    assert upgraded.subprotocol == chosen
    assert upgraded.extensions == () and upgraded.extra_headers == ()


def test_bridge_upgraded_renders_exact_101() -> None:
    accepted = bridge_accepted((), "binary")
    assert render_switching_protocols(accepted, bridge_upgraded(accepted)) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT.encode() + b"\r\n"
        b"Sec-WebSocket-Protocol: binary\r\n"
        b"\r\n"
    )


# ---------------------------------------------------------------- review fixes


@pytest.mark.parametrize(
    "raw, status",
    [
        pytest.param(make_request("/chat", extra=("X-A: a\x01b",)), 400, id="ctl-in-header-value"),
        pytest.param(make_request("/chat", extra=("X-A: a\x7fb",)), 400, id="del-in-header-value"),
        pytest.param(make_request("/chat%zz"), 400, id="bad-percent-encoding"),
        pytest.param(make_request("*", method="OPTIONS"), 405, id="options-asterisk-is-405"),
        pytest.param(make_request("chat.example.com:443", method="CONNECT"), 405, id="connect-is-405"),
        pytest.param(make_request("https://other.example.org/"), 421, id="absolute-form-authority-replaces-host"),
        pytest.param(make_request(host='chat.example.com,evil'), 400, id="host-with-comma"),
    ],
)
def test_review_rejections(raw: bytes, status: int) -> None:
    with pytest.raises(HandshakeRejected) as info:
        run(raw)
    assert info.value.status == status


def test_tab_in_header_value_is_fine() -> None:
    assert run(make_request(extra=("X-A: a\tb",))).route is CHAT


def test_dot_segments_are_resolved_before_routing_and_forwarded_normalized() -> None:
    accepted = run(make_request("/x/../chat"))
    assert accepted.route is CHAT
    assert forwarded_lines(make_request("/api/a/../b//c?q=1"))[0] == "GET /v2/b/c?q=1 HTTP/1.1"


def test_unknown_host_is_421_when_sni_named_the_default_host() -> None:
    # SNI matched the default host exactly: an unknown Host contradicts it.
    client = ClientInfo(address="192.0.2.7", port=1, tls=True, tls_host=OTHER, server_name="a.example.org")
    with pytest.raises(HandshakeRejected) as info:
        run(make_request("/", host="unknown.test"), client)
    assert info.value.status == 421
    # No SNI (an IP-address client): the default host serves any unknown Host.
    client = ClientInfo(address="192.0.2.7", port=1, tls=True, tls_host=OTHER, server_name=None)
    assert run(make_request("/", host="192.0.2.1:8443"), client).host is OTHER


def test_find_head_end_lf_then_crlf() -> None:
    assert find_head_end(b"GET / HTTP/1.1\nHost: a\n\r\nrest") == 25


@pytest.mark.parametrize("status", [204, 304])
def test_relayed_204_304_have_no_body_or_length(status: int) -> None:
    data = render_relayed(BackendAnswer(status=status, reason="X", headers=(("ETag", "1"),)), b"junk")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length" not in head and body == b""
    assert b"ETag: 1" in head


def test_relayed_426_keeps_upgrade_and_replaces_control_characters() -> None:
    data = render_relayed(
        BackendAnswer(
            status=426, reason="Upgrade Required",
            headers=(("Upgrade", "websocket"), ("Connection", "Upgrade"), ("X-W", "a\x01b")),
        ),
        b"",
    )
    lines = data.split(b"\r\n")
    assert b"Upgrade: websocket" in lines
    assert b"Connection: Upgrade, close" in lines
    assert b"X-W: a b" in lines


def test_every_hosts_client_subject_header_is_stripped_on_every_host() -> None:
    from dataclasses import replace as dc_replace

    mtls = HostConfig(
        names=("m.example.com",), routes=(CHAT,), index=2, client_subject_header="X-Client-Subject"
    )
    hosts = HostTable([HOST, OTHER, mtls])
    raw = make_request(extra=("X-Client-Subject: CN=forged", "x-client-subject: CN=again"))
    accepted = decide(parse_request_head(raw), TLS_CLIENT, hosts)
    assert accepted.subject_headers == frozenset({"x-client-subject"})
    lines = build_backend_request(accepted, TLS_CLIENT).decode("latin-1").split("\r\n")
    assert not any("forged" in line or "again" in line for line in lines)
    assert dc_replace(accepted, subject_headers=frozenset()) != accepted
