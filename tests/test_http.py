"""The pure parts of SPEC section 7 (gatewayd/http.py): one case per rule, exact values."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.config import BackendTarget, BasicAuth, GatewaySettings, HostConfig, RouteConfig
from gatewayd.errors import HandshakeRejected
from gatewayd.handshake import ClientInfo, parse_request_head
from gatewayd.http import (
    BodyFraming,
    ChunkSizes,
    Kind,
    body_limit,
    check_declared_length,
    decide_request,
    is_upgrade,
    may_retry,
    proxy_request_headers,
    relayed_response_headers,
    request_framing,
    wants_keep_alive,
)
from gatewayd.routing import HostTable

BACKEND = BackendTarget(url="ws://127.0.0.1:9000/", scheme="ws", host="127.0.0.1", port=9000, path="/")
APP = RouteConfig(path=None, path_prefix="/app/", backend=BACKEND, key_path="host[0].route[0]", http=True)
WS = RouteConfig(path="/ws", path_prefix=None, backend=BACKEND, key_path="host[0].route[1]")
STATIC = RouteConfig(
    path=None, path_prefix="/files/", backend=None, key_path="host[0].route[2]", static=Path("/srv")
)
PRIVATE = RouteConfig(
    path=None,
    path_prefix="/private/",
    backend=BACKEND,
    key_path="host[0].route[3]",
    http=True,
    auth=BasicAuth(users_file=Path("/u"), realm="r"),
)
HOST = HostConfig(names=("app.example",), routes=(APP, WS, STATIC, PRIVATE), default=True)
HOSTS = HostTable([HOST])
CLIENT = ClientInfo(address="192.0.2.7", port=1234, tls=True, tls_host=HOST, server_name="app.example")
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def head(
    method: str = "GET",
    target: str = "/app/x?y=1",
    *headers: str,
    version: str = "1.1",
    host: str | None = "app.example",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


UPGRADE = ("Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13")


def decide(raw: bytes):
    return decide_request(parse_request_head(raw), CLIENT, HOSTS)


# ------------------------------------------------------------------ dispatch


@pytest.mark.parametrize(
    "raw, kind",
    [
        pytest.param(head("GET", "/app/x"), Kind.PROXY, id="get-on-http-route"),
        pytest.param(head("POST", "/app/x", "Content-Length: 1"), Kind.PROXY, id="post-on-http-route"),
        pytest.param(head("DELETE", "/app/x"), Kind.PROXY, id="any-method-on-http-route"),
        pytest.param(head("GET", "/app/x", version="1.0"), Kind.PROXY, id="http10-on-http-route"),
        pytest.param(head("GET", "/app/x", "Upgrade: h2c", "Connection: Upgrade"), Kind.PROXY, id="h2c-is-plain"),
        pytest.param(head("GET", "/app/x", *UPGRADE), Kind.UPGRADE, id="upgrade-on-http-route"),
        pytest.param(head("GET", "/ws", *UPGRADE), Kind.UPGRADE, id="upgrade-on-ws-route"),
        pytest.param(head("GET", "/files/a.html"), Kind.STATIC, id="get-on-static"),
        pytest.param(head("HEAD", "/files/a.html"), Kind.STATIC, id="head-on-static"),
    ],
)
def test_dispatch(raw: bytes, kind: Kind) -> None:
    assert decide(raw)[0] is kind


@pytest.mark.parametrize(
    "raw, status, allow",
    [
        pytest.param(head("GET", "/ws"), 426, None, id="plain-get-on-ws-route-426"),
        pytest.param(head("POST", "/ws"), 405, "GET", id="post-on-ws-route-405"),
        pytest.param(head("GET", "/ws", *UPGRADE, version="1.0"), 400, None, id="http10-upgrade-400"),
        pytest.param(head("GET", "/ws", version="1.0"), 400, None, id="http10-on-ws-route-400"),
        pytest.param(head("GET", "/files/x", *UPGRADE), 404, None, id="upgrade-on-static-404"),
        pytest.param(head("POST", "/files/x"), 405, "GET, HEAD", id="post-on-static-405"),
        pytest.param(head("GET", "/nothing"), 404, None, id="no-route-404"),
        pytest.param(head("POST", "/nothing"), 404, None, id="route-before-method"),
        pytest.param(head("CONNECT", "app.example:443"), 405, "GET", id="connect-405"),
        pytest.param(head("OPTIONS", "*"), 405, "GET", id="options-asterisk-405"),
        pytest.param(
            head("GET", "https://app.example/app/x", host="other.example"), 400, None,
            id="absolute-form-for-another-host-400",
        ),
        pytest.param(head("GET", "/private/x"), 401, None, id="auth-applies-to-plain"),
    ],
)
def test_dispatch_rejections(raw: bytes, status: int, allow: str | None) -> None:
    with pytest.raises(HandshakeRejected) as info:
        decide(raw)
    assert info.value.status == status
    assert dict(info.value.headers).get("Allow") == allow


def test_plain_request_target_is_rewritten_and_origins_do_not_apply() -> None:
    kind, accepted = decide(head("GET", "/app/x?y=1", "Origin: https://evil.example"))
    assert kind is Kind.PROXY
    assert accepted.target == "/x?y=1"
    assert accepted.host_header == "app.example"
    assert accepted.key == "" and accepted.accept == ""


def test_is_upgrade_reads_token_lists() -> None:
    assert is_upgrade(parse_request_head(head("GET", "/", "Upgrade: foo, WebSocket")))
    assert not is_upgrade(parse_request_head(head("GET", "/", "Upgrade: h2c")))


# ------------------------------------------------------------------ framing (smuggling)


@pytest.mark.parametrize(
    "headers, framing",
    [
        pytest.param((), BodyFraming(), id="no-body"),
        pytest.param(("Content-Length: 0",), BodyFraming(length=0), id="cl-0"),
        pytest.param(("Content-Length: 12",), BodyFraming(length=12), id="cl-12"),
        pytest.param(("Transfer-Encoding: chunked",), BodyFraming(chunked=True), id="chunked"),
        pytest.param(("Transfer-Encoding: Chunked",), BodyFraming(chunked=True), id="chunked-any-case"),
    ],
)
def test_framing(headers: tuple[str, ...], framing: BodyFraming) -> None:
    assert request_framing(parse_request_head(head("POST", "/app/x", *headers))) == framing


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(head("POST", "/app/x", "Content-Length: 5", "Transfer-Encoding: chunked"), id="cl-and-te"),
        pytest.param(head("POST", "/app/x", "Transfer-Encoding: chunked", "Content-Length: 5"), id="te-and-cl"),
        pytest.param(head("POST", "/app/x", "Content-Length: 5", "Content-Length: 5"), id="two-equal-cl"),
        pytest.param(head("POST", "/app/x", "Content-Length: 5, 5"), id="cl-list"),
        pytest.param(head("POST", "/app/x", "Transfer-Encoding: gzip, chunked"), id="te-gzip-chunked"),
        pytest.param(head("POST", "/app/x", "Transfer-Encoding: chunked, chunked"), id="te-chunked-twice"),
        pytest.param(head("POST", "/app/x", "Transfer-Encoding: chunked", version="1.0"), id="te-in-http10"),
    ],
)
def test_ambiguous_framing_is_400(raw: bytes) -> None:
    # h11 itself refuses some of these while parsing (differing lengths, an
    # unknown coding); the rest are ours. Either way: 400 before any body.
    with pytest.raises(HandshakeRejected) as info:
        request_framing(parse_request_head(raw))
    assert info.value.status == 400


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(head("POST", "/app/x", "Content-Length: 5", "Content-Length: 6"), id="two-different-cl"),
        pytest.param(head("POST", "/app/x", "Content-Length: -1"), id="negative-cl"),
        pytest.param(head("POST", "/app/x", "Content-Length: 0x10"), id="hex-cl"),
        pytest.param(head("POST", "/app/x", "X-A: 1", " folded"), id="obs-fold"),
        pytest.param(head("POST", "/app/x", "Transfer-Encoding : chunked"), id="space-before-colon"),
    ],
)
def test_malformed_heads_are_400_at_parse(raw: bytes) -> None:
    with pytest.raises(HandshakeRejected) as info:
        request_framing(parse_request_head(raw))
    assert info.value.status == 400


@pytest.mark.parametrize(
    "route_limit, gateway_limit, length, status",
    [
        pytest.param(None, 10, 10, None, id="at-the-limit"),
        pytest.param(None, 10, 11, 413, id="over-the-gateway-limit"),
        pytest.param(100, 10, 11, None, id="route-overrides-up"),
        pytest.param(5, 10, 6, 413, id="route-overrides-down"),
        pytest.param(0, 10, 10**12, None, id="route-0-no-limit"),
    ],
)
def test_declared_length_limit(route_limit: int | None, gateway_limit: int, length: int, status: int | None) -> None:
    route = RouteConfig(path="/", path_prefix=None, backend=BACKEND, http=True, max_body_size=route_limit)
    limit = body_limit(route, GatewaySettings(max_body_size=gateway_limit))
    if status is None:
        check_declared_length(BodyFraming(length=length), limit)
        return
    with pytest.raises(HandshakeRejected) as info:
        check_declared_length(BodyFraming(length=length), limit)
    assert info.value.status == status


# ------------------------------------------------------------------ headers


def test_proxy_request_headers_exact() -> None:
    raw = head(
        "POST",
        "/app/x",
        "User-Agent: t",
        "Connection: keep-alive, X-Drop",
        "X-Drop: 1",
        "Keep-Alive: 5",
        "TE: trailers",
        "Expect: 100-continue",
        "Transfer-Encoding: chunked",
        "X-Forwarded-For: 6.6.6.6",
        "Cookie: a=b",
    )
    _, accepted = decide(raw)
    framing = request_framing(accepted.request)
    assert proxy_request_headers(accepted, CLIENT, framing) == [
        ("Host", "app.example"),
        ("User-Agent", "t"),
        ("Cookie", "a=b"),
        ("Transfer-Encoding", "chunked"),
        ("X-Forwarded-For", "192.0.2.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "app.example"),
        ("Forwarded", "for=192.0.2.7;host=app.example;proto=https"),
    ]


@pytest.mark.parametrize(
    "method, length, expected",
    [
        pytest.param("POST", 0, [("Content-Length", "0")], id="post-keeps-cl-0"),
        pytest.param("GET", 0, [], id="get-drops-cl-0"),
        pytest.param("PUT", 7, [("Content-Length", "7")], id="put-cl"),
    ],
)
def test_proxy_request_content_length(method: str, length: int, expected: list[tuple[str, str]]) -> None:
    _, accepted = decide(head(method, "/app/x", f"Content-Length: {length}"))
    headers = proxy_request_headers(accepted, CLIENT, request_framing(accepted.request))
    assert [h for h in headers if h[0] == "Content-Length"] == expected


@pytest.mark.parametrize(
    "headers, status, expected",
    [
        pytest.param(
            [("Content-Type", "text/html"), ("Content-Length", "5"), ("Connection", "close, X-A"), ("X-A", "1"),
             ("Keep-Alive", "timeout=5"), ("Set-Cookie", "s=1")],
            200,
            [("Content-Type", "text/html"), ("Set-Cookie", "s=1"), ("Content-Length", "5")],
            id="hop-by-hop-removed-length-kept",
        ),
        pytest.param(
            [("Transfer-Encoding", "chunked"), ("X-B", "2")], 200, [("X-B", "2")], id="chunked-refrained",
        ),
        pytest.param([("Content-Length", "0")], 204, [], id="204-never-has-a-length"),
        pytest.param([("Content-Length", "10"), ("ETag", '"a"')], 304, [("ETag", '"a"'), ("Content-Length", "10")],
                     id="304-keeps-the-representation-length"),
        pytest.param([("Link", "</a>"), ("Content-Length", "0")], 103, [("Link", "</a>")], id="1xx"),
        pytest.param([("Upgrade", "websocket"), ("Proxy-Authenticate", "x")], 200, [], id="upgrade-dropped"),
    ],
)
def test_relayed_response_headers(headers: list[tuple[str, str]], status: int, expected: list[tuple[str, str]]) -> None:
    assert relayed_response_headers(headers, status) == expected


@pytest.mark.parametrize(
    "version, connection, keep",
    [
        pytest.param("1.1", None, True, id="http11-default"),
        pytest.param("1.1", "close", False, id="http11-close"),
        pytest.param("1.1", "keep-alive, Close", False, id="http11-close-in-list"),
        pytest.param("1.0", None, False, id="http10-default"),
        pytest.param("1.0", "Keep-Alive", True, id="http10-keep-alive"),
    ],
)
def test_wants_keep_alive(version: str, connection: str | None, keep: bool) -> None:
    extra = (f"Connection: {connection}",) if connection else ()
    assert wants_keep_alive(parse_request_head(head("GET", "/app/x", *extra, version=version))) is keep


@pytest.mark.parametrize(
    "method, framing, retry",
    [
        pytest.param("GET", BodyFraming(), True, id="get"),
        pytest.param("PUT", BodyFraming(), True, id="put-without-body"),
        pytest.param("PUT", BodyFraming(length=3), False, id="put-with-body"),
        pytest.param("POST", BodyFraming(), False, id="post"),
    ],
)
def test_may_retry(method: str, framing: BodyFraming, retry: bool) -> None:
    assert may_retry(parse_request_head(head(method, "/app/x")), framing) is retry


@pytest.mark.parametrize(
    ("limit", "pieces", "status", "declared"),
    [
        # (max_body_size, the body as it arrives, the refusal due, sizes summed)
        (10, [b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"], None, 10),
        (10, [b"5\r\nhello\r\n6\r\n"], 413, 11),
        (10, [b"7d0\r\nhel"], 413, 2000),
        (10, [b"b", b"\r", b"\n"], 413, 11),
        (10, [b"b"], None, 0),  # the size line is not complete yet
        (0, [b"7d0\r\n"], None, 2000),  # no limit
        (0, [b"ffffffffffffffffffff\r\nhello"], 400, 0),
        (0, [b"8000000000000000\r\n"], 400, 0),
        (0, [b"7fffffffffffffff\r\n"], None, 2**63 - 1),
        (10, [b"5;name=value  \r\nhello\r\n", b"5 \t\r\nworld\r\n"], None, 10),
        # Data bytes that look like a size line are data.
        (10, [b"5\r\nfff\r\n\r\n5\r\nworld\r\n"], None, 10),
        # After the last chunk come trailers, not sizes.
        (10, [b"0\r\nffff: 1\r\n\r\n"], None, 0),
        # What h11 rejects (its 400) is left to it: nothing followed after.
        (10, [b"zz\r\n7d0\r\n"], None, 0),
        (10, [b"5\r\nhelloXX7d0\r\n"], None, 5),
        (10, [b"000000000000000000005\r\n"], None, 0),  # 21 digits: h11's 400
        (10, [b"5 ;x\r\n"], None, 0),  # a blank before ';': h11's 400
    ],
)
def test_chunk_sizes(limit: int, pieces: list[bytes], status: int | None, declared: int) -> None:
    chunks = ChunkSizes(limit)
    for piece in pieces:
        chunks.feed(piece)
    assert (chunks.error.status if chunks.error else None) == status
    assert chunks.declared == declared


def test_chunk_sizes_limit_applies_to_what_was_declared_before_it() -> None:
    chunks = ChunkSizes()
    chunks.feed(b"b\r\n")
    assert chunks.error is None
    chunks.set_limit(10)
    assert chunks.error is not None and chunks.error.status == 413
