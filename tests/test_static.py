"""Static files and HTTPS redirects, the pure half (SPEC 7): one case per rule."""

from __future__ import annotations

import pytest

from gatewayd.config import HostConfig, RouteConfig
from gatewayd.errors import HandshakeRejected
from gatewayd.handshake import parse_request_head
from gatewayd.routing import HostTable
from gatewayd.static import (
    ByteRange,
    FileInfo,
    Unsatisfiable,
    check_request,
    content_type,
    directory_location,
    evaluate,
    first_tls_port,
    https_redirect,
    https_redirect_url,
    map_segments,
    parse_etags,
    parse_http_date,
    parse_range,
    static_rest,
)

# --------------------------------------------------------------------------- request kind


@pytest.mark.parametrize(
    "method, headers, status, allow",
    [
        ("GET", [], None, None),
        ("HEAD", [], None, None),
        ("POST", [], 405, "GET, HEAD"),
        ("PUT", [], 405, "GET, HEAD"),
        ("DELETE", [], 405, "GET, HEAD"),
        ("OPTIONS", [], 405, "GET, HEAD"),
        ("get", [], 405, "GET, HEAD"),  # methods are case-sensitive (RFC 9110 9.1)
        ("GET", [("Upgrade", "websocket"), ("Connection", "Upgrade")], 404, None),
        ("GET", [("upgrade", "h2c, WebSocket")], 404, None),
        ("POST", [("Upgrade", "websocket")], 404, None),  # an upgrade is 404 whatever the method
        ("GET", [("Upgrade", "h2c")], None, None),  # not a WebSocket upgrade: a plain GET
    ],
    ids=lambda v: str(v),
)
def test_check_request(method: str, headers: list[tuple[str, str]], status: int | None, allow: str | None) -> None:
    if status is None:
        check_request(method, headers)
        return
    with pytest.raises(HandshakeRejected) as caught:
        check_request(method, headers)
    assert caught.value.status == status
    assert dict(caught.value.headers).get("Allow") == allow


# --------------------------------------------------------------------------- path mapping


def static_route(path: str | None = None, prefix: str | None = None) -> RouteConfig:
    return RouteConfig(path=path, path_prefix=prefix, backend=None, static=None)


@pytest.mark.parametrize(
    "path, prefix, request_path, rest",
    [
        (None, "/", "/", ""),
        (None, "/", "/app/ui.js", "app/ui.js"),
        (None, "/novnc/", "/novnc/vnc.html", "vnc.html"),
        (None, "/novnc/", "/novnc/", ""),
        (None, "/files", "/files", ""),
        (None, "/files", "/files/a.txt", "/a.txt"),
        ("/vnc.html", None, "/vnc.html", ""),
    ],
)
def test_static_rest(path: str | None, prefix: str | None, request_path: str, rest: str) -> None:
    assert static_rest(static_route(path, prefix), request_path) == rest


@pytest.mark.parametrize(
    "rest, names",
    [
        ("", ()),
        ("index.html", ("index.html",)),
        ("app/ui.js", ("app", "ui.js")),
        ("app/", ("app", "")),
        ("/a.txt", ("a.txt",)),
        ("file%20name.txt", ("file name.txt",)),
        ("caf%C3%A9.txt", ("café.txt",)),
        ("café.txt", ("café.txt",)),
        ("%252e%252e", ("%2e%2e",)),  # decoded once only: a literal name, not '..'
        ("a..b", ("a..b",)),
        ("a.", ("a.",)),
        # dotfiles and dot-directories, however spelled
        (".git/config", None),
        (".htpasswd", None),
        ("app/.env", None),
        ("..", None),
        ("%2E%2E", None),
        ("%2e%2e/secret", None),
        (".%2e/secret", None),
        ("%2Egit/HEAD", None),
        # a name may not gain a separator or a NUL by decoding
        ("..%2Fsecret", None),
        ("a%2Fb", None),
        ("a%2fb", None),
        ("a%00b", None),
        ("%C3", None),  # not UTF-8
        ("%FF.txt", None),
        ("a//b", None),  # empty segment inside (normalize_path merges these first)
    ],
)
def test_map_segments(rest: str, names: tuple[str, ...] | None) -> None:
    assert map_segments(rest) == names


@pytest.mark.parametrize(
    "target, status",
    [
        # Whatever the spelling, the normalized path the route sees has no '..'
        # left, and what is left is refused by map_segments.
        ("/static/../secret", None),
        ("/static/%2e%2e/secret", None),
        ("/static/.%2E/secret", None),
        ("/static/..%2f..%2fetc/passwd", 404),
        ("/static/%2e%2e%2f%2e%2e%2fetc/passwd", 404),
        ("/static/%2F..%2Fetc", 404),
        ("/static/.hidden", 404),
    ],
)
def test_traversal_spellings(target: str, status: int | None) -> None:
    """Request paths as sent: after normalization either out of the route or 404."""
    request = parse_request_head(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    route = static_route(prefix="/static/")
    if not request.path.startswith("/static/"):
        assert status is None  # the route does not even match
        return
    assert map_segments(static_rest(route, request.path)) is None
    assert status == 404


# --------------------------------------------------------------------------- content type


@pytest.mark.parametrize(
    "name, expected",
    [
        ("index.html", "text/html; charset=utf-8"),
        ("VNC.HTML", "text/html; charset=utf-8"),
        ("ui.js", "text/javascript; charset=utf-8"),
        ("mod.mjs", "text/javascript; charset=utf-8"),
        ("base.css", "text/css; charset=utf-8"),
        ("notes.txt", "text/plain; charset=utf-8"),
        ("data.json", "application/json; charset=utf-8"),
        ("app.webmanifest", "application/manifest+json; charset=utf-8"),
        ("logo.svg", "image/svg+xml; charset=utf-8"),
        ("logo.png", "image/png"),
        ("favicon.ico", "image/x-icon"),
        ("font.woff2", "font/woff2"),
        ("bell.oga", "audio/ogg"),
        ("bell.mp3", "audio/mpeg"),
        ("app.wasm", "application/wasm"),
        ("archive.tar.gz", "application/gzip"),  # what it is, not Content-Encoding
        ("README", "application/octet-stream"),
        ("x.unknownext", "application/octet-stream"),
        ("", "application/octet-stream"),
    ],
)
def test_content_type(name: str, expected: str) -> None:
    assert content_type(name) == expected


# --------------------------------------------------------------------------- validators

# 2024-01-02 03:04:05 GMT, and 500 ns after it.
MTIME = 1704164645
INFO = FileInfo(size=1000, mtime_ns=MTIME * 1_000_000_000 + 500, inode=0x2A)
ETAG = INFO.etag
LAST_MODIFIED = "Tue, 02 Jan 2024 03:04:05 GMT"
EARLIER = "Tue, 02 Jan 2024 03:04:04 GMT"
LATER = "Tue, 02 Jan 2024 03:04:06 GMT"


def test_validators() -> None:
    expected = f'"{INFO.mtime_ns:x}-3e8-2a"'  # time in ns, size, inode
    assert expected == ETAG
    assert INFO.last_modified == LAST_MODIFIED
    assert INFO.mtime == MTIME
    # Changing any of size, time or inode changes the strong tag.
    assert FileInfo(1001, INFO.mtime_ns, 0x2A).etag != ETAG
    assert FileInfo(1000, INFO.mtime_ns + 1, 0x2A).etag != ETAG
    assert FileInfo(1000, INFO.mtime_ns, 0x2B).etag != ETAG


@pytest.mark.parametrize(
    "value, expected",
    [
        (LAST_MODIFIED, MTIME),
        ("Tuesday, 02-Jan-24 03:04:05 GMT", MTIME),  # RFC 850
        ("Tue Jan  2 03:04:05 2024", MTIME),  # asctime
        ("yesterday", None),
        ("", None),
    ],
)
def test_parse_http_date(value: str, expected: int | None) -> None:
    assert parse_http_date(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ('"a"', [(False, '"a"')]),
        ('W/"a", "b"', [(True, '"a"'), (False, '"b"')]),
        ("*", None),
        (" * ", None),
        ('"a", junk, "b"', [(False, '"a"'), (False, '"b"')]),
        ("junk", []),
    ],
)
def test_parse_etags(value: str, expected: list[tuple[bool, str]] | None) -> None:
    assert parse_etags(value) == expected


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "value, size, expected",
    [
        ("bytes=0-99", 1000, ByteRange(0, 99)),
        ("bytes=100-", 1000, ByteRange(100, 999)),
        ("bytes=-100", 1000, ByteRange(900, 999)),
        ("bytes=-5000", 1000, ByteRange(0, 999)),  # longer suffix: the whole file
        ("bytes=990-5000", 1000, ByteRange(990, 999)),  # last clipped to the end
        ("bytes=999-999", 1000, ByteRange(999, 999)),
        ("BYTES = 5 - 9", 1000, ByteRange(5, 9)),
        ("bytes=0-0,", 1000, ByteRange(0, 0)),  # empty list members are ignored
        # ignored (the whole file is sent)
        ("bytes=0-1,5-6", 1000, None),  # several ranges
        ("bytes=9-5", 1000, None),  # last < first: invalid
        ("bytes=-", 1000, None),
        ("bytes=a-b", 1000, None),
        ("items=0-5", 1000, None),
        ("0-5", 1000, None),
        ("bytes=0-5", 0, None),  # an empty file has no range to select
        # unsatisfiable
        ("bytes=1000-", 1000, Unsatisfiable),
        ("bytes=5000-6000", 1000, Unsatisfiable),
        ("bytes=-0", 1000, Unsatisfiable),
    ],
)
def test_parse_range(value: str, size: int, expected: ByteRange | None | type[Unsatisfiable]) -> None:
    if expected is Unsatisfiable:
        with pytest.raises(Unsatisfiable):
            parse_range(value, size)
    else:
        assert parse_range(value, size) == expected


# --------------------------------------------------------------------------- the answer


@pytest.mark.parametrize(
    "method, headers, status, content_range",
    [
        ("GET", [], 200, None),
        ("HEAD", [], 200, None),
        # If-None-Match (weak comparison) beats If-Modified-Since
        ("GET", [("If-None-Match", ETAG)], 304, None),
        ("HEAD", [("If-None-Match", ETAG)], 304, None),
        ("GET", [("If-None-Match", f'"x", W/{ETAG}')], 304, None),
        ("GET", [("If-None-Match", "*")], 304, None),
        ("GET", [("If-None-Match", '"other"')], 200, None),
        ("GET", [("If-None-Match", '"other"'), ("If-Modified-Since", LATER)], 200, None),
        # If-Modified-Since
        ("GET", [("If-Modified-Since", LAST_MODIFIED)], 304, None),
        ("GET", [("If-Modified-Since", LATER)], 304, None),
        ("GET", [("If-Modified-Since", EARLIER)], 200, None),
        ("GET", [("If-Modified-Since", "garbage")], 200, None),
        # If-Match (strong comparison) and If-Unmodified-Since -> 412
        ("GET", [("If-Match", ETAG)], 200, None),
        ("GET", [("If-Match", "*")], 200, None),
        ("GET", [("If-Match", f"W/{ETAG}")], 412, None),
        ("GET", [("If-Match", '"other"')], 412, None),
        ("GET", [("If-Unmodified-Since", LAST_MODIFIED)], 200, None),
        ("GET", [("If-Unmodified-Since", EARLIER)], 412, None),
        ("GET", [("If-Match", ETAG), ("If-Unmodified-Since", EARLIER)], 200, None),  # If-Match wins
        # Range
        ("GET", [("Range", "bytes=0-99")], 206, "bytes 0-99/1000"),
        ("GET", [("Range", "bytes=-10")], 206, "bytes 990-999/1000"),
        ("GET", [("Range", "bytes=1000-")], 416, "bytes */1000"),
        ("GET", [("Range", "bytes=0-1,3-4")], 200, None),
        # A HEAD gets its GET's head (RFC 9110 9.3.2), as from nginx
        ("HEAD", [("Range", "bytes=0-99")], 206, "bytes 0-99/1000"),
        ("HEAD", [("Range", "bytes=1000-")], 416, "bytes */1000"),
        ("HEAD", [("Range", "bytes=0-99"), ("If-Range", '"old"')], 200, None),
        ("GET", [("Range", "bytes=0-99"), ("If-Range", ETAG)], 206, "bytes 0-99/1000"),
        ("GET", [("Range", "bytes=0-99"), ("If-Range", '"old"')], 200, None),
        ("GET", [("Range", "bytes=0-99"), ("If-Range", f"W/{ETAG}")], 200, None),
        ("GET", [("Range", "bytes=0-99"), ("If-Range", LAST_MODIFIED)], 206, "bytes 0-99/1000"),
        ("GET", [("Range", "bytes=0-99"), ("If-Range", EARLIER)], 200, None),
        ("GET", [("Range", "bytes=0-99"), ("If-None-Match", ETAG)], 304, None),
    ],
    ids=lambda v: str(v),
)
def test_evaluate(method: str, headers: list[tuple[str, str]], status: int, content_range: str | None) -> None:
    decision = evaluate(method, headers, INFO, "page.html", cache_control="max-age=60")
    assert decision.status == status
    got = dict(decision.headers)
    assert got.get("Content-Range") == content_range
    assert got["ETag"] == ETAG
    assert got["Last-Modified"] == LAST_MODIFIED
    assert got["Cache-Control"] == "max-age=60"
    if status in (200, 206):
        assert got["Content-Type"] == "text/html; charset=utf-8"
        assert got["Accept-Ranges"] == "bytes"
    if status == 304:
        assert "Content-Length" not in got and "Content-Type" not in got
        assert decision.range is None
    if status == 200:
        assert got["Content-Length"] == "1000"
        assert decision.range == (ByteRange(0, 999) if method == "GET" else None)
    if status == 206 and method == "GET":
        assert decision.range is not None
        assert got["Content-Length"] == str(decision.range.length)
    if status == 206 and method == "HEAD":
        assert got["Content-Length"] == "100" and decision.range is None  # the head, no bytes


def test_evaluate_exact_headers() -> None:
    decision = evaluate("GET", [("Range", "bytes=10-19")], INFO, "a.bin")
    assert decision.headers == (
        ("Content-Type", "application/octet-stream"),
        ("ETag", ETAG),
        ("Last-Modified", LAST_MODIFIED),
        ("Accept-Ranges", "bytes"),
        ("Content-Range", "bytes 10-19/1000"),
        ("Content-Length", "10"),
    )
    assert decision.range == ByteRange(10, 19)


def test_evaluate_empty_file() -> None:
    empty = FileInfo(0, INFO.mtime_ns)
    decision = evaluate("GET", [("Range", "bytes=0-5")], empty, "a.txt")
    assert decision.status == 200
    assert dict(decision.headers)["Content-Length"] == "0"
    assert decision.range is None


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    "path, query, location",
    [
        ("/app", None, "/app/"),
        ("/app", "", "/app/?"),
        ("/app", "a=1&b", "/app/?a=1&b"),
    ],
)
def test_directory_location(path: str, query: str | None, location: str) -> None:
    assert directory_location(path, query) == location


@pytest.mark.parametrize(
    "host, target, port, url",
    [
        ("example.com", "/", 443, "https://example.com/"),
        ("example.com", "/", None, "https://example.com/"),
        ("example.com", "/a/b?x=1&y", 8443, "https://example.com:8443/a/b?x=1&y"),
        ("example.com:80", "/p", 443, "https://example.com/p"),  # the plain port is dropped
        ("Example.COM.:8080", "/p", 443, "https://example.com/p"),
        ("[::1]:8080", "/p", 8443, "https://[::1]:8443/p"),
        ("127.0.0.1", "/p?q", 443, "https://127.0.0.1/p?q"),
        ("example.com", "/%2e%2e/x?a=%20", 443, "https://example.com/%2e%2e/x?a=%20"),  # unchanged
        ("example.com", "http://example.com/p?q=1", 443, "https://example.com/p?q=1"),  # absolute-form
        ("example.com", "http://example.com?q=1", 443, "https://example.com/?q=1"),
        ("bad host", "/", 443, None),
        ("", "/", 443, None),
    ],
)
def test_https_redirect_url(host: str, target: str, port: int | None, url: str | None) -> None:
    assert https_redirect_url(host, target, port) == url


def test_first_tls_port() -> None:
    assert first_tls_port([(False, 80), (True, 8443), (True, 443)]) == 8443
    assert first_tls_port([(False, 80)]) is None


HOSTS = HostTable([HostConfig(names=("app.example.com", "*.example.org"), routes=(), index=0)])
WITH_DEFAULT = HostTable([HostConfig(names=("app.example.com",), routes=(), index=0, default=True)])


@pytest.mark.parametrize(
    "head, hosts, status, location",
    [
        (b"GET /a?b=1 HTTP/1.1\r\nHost: app.example.com\r\n\r\n", HOSTS, 308, "https://app.example.com:8443/a?b=1"),
        (b"POST /form HTTP/1.1\r\nHost: x.example.org:80\r\n\r\n", HOSTS, 308, "https://x.example.org:8443/form"),
        (b"GET /ws HTTP/1.1\r\nHost: app.example.com\r\nUpgrade: websocket\r\n\r\n", HOSTS, 308, "https://app.example.com:8443/ws"),
        (b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n", HOSTS, 404, None),  # no open redirect
        (b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", WITH_DEFAULT, 308, "https://other.test:8443/"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HOSTS, 400, None),
        (b"GET / HTTP/1.1\r\nHost: bad,host\r\n\r\n", HOSTS, 400, None),
    ],
)
def test_https_redirect(head: bytes, hosts: HostTable, status: int, location: str | None) -> None:
    try:
        request = parse_request_head(head)
    except HandshakeRejected as error:  # the parser already refuses some of these
        assert error.status == status
        return
    answer = https_redirect(request, hosts, 8443)
    assert answer.status == status
    assert dict(answer.headers).get("Location") == location
