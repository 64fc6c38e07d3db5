"""Static routes and redirect_https end to end: the real gateway, real TLS, real files (SPEC 7)."""

from __future__ import annotations

import base64
import logging
import os
import textwrap
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import h11
import pytest
import trio

from gatewayd import staticio
from gatewayd.config import RouteConfig, load
from gatewayd.handshake import parse_request_head
from gatewayd.static import FileInfo
from harness import Certs, echo_backend, make_certs, running_gateway, tls_client, upgrade_request

HOST = "static.test"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def __getitem__(self, name: str) -> str:
        return self.headers[name.lower()]

    def get(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Client:
    """An HTTP/1.1 client over one stream (h11, client role): several requests in turn."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        target: str,
        *,
        method: str = "GET",
        host: str = HOST,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        read_body: bool = True,
    ) -> Response:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("Host", host), *headers]
        if body:
            all_headers.append(("Content-Length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        response = await self._next(h11.Response)
        out = Response(
            response.status_code,
            {k.decode().lower(): v.decode() for k, v in response.headers},
            b"",
        )
        if not read_body:
            return out
        chunks = []
        while True:
            event = await self._next((h11.Data, h11.EndOfMessage))
            if isinstance(event, h11.EndOfMessage):
                break
            chunks.append(bytes(event.data))
        out.body = b"".join(chunks)
        return out

    async def _next(self, kinds: type | tuple[type, ...]) -> h11.Event:
        with trio.fail_after(10):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(65536)
                    self.conn.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                assert isinstance(event, kinds), event
                return event


async def upgrade_answer(stream: trio.abc.Stream, path: str, host: str) -> bytes:
    """Send a WebSocket upgrade request; the answer's head (and what came with it)."""
    await stream.send_all(upgrade_request(path, host))
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
    return data


def write_tree(root: Path) -> None:
    (root / "index.html").write_text("<h1>home</h1>\n")
    (root / "app").mkdir()
    (root / "app" / "ui.js").write_text("console.log('ui');\n")
    (root / "app" / "style.css").write_text("body{}\n")
    (root / "noindex").mkdir()
    (root / "noindex" / "a.txt").write_text("a\n")
    (root / "data.bin").write_bytes(bytes(range(256)) * 4)
    (root / "empty.txt").write_bytes(b"")
    (root / "café.txt").write_text("accent\n")
    (root / ".secret").write_text("dotfile\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "inside-link.txt").symlink_to(root / "app" / "ui.js")
    (root / "dot-link").symlink_to(root / ".git")
    os.mkfifo(root / "fifo")


def static_config(tmp_path: Path, certs: Certs, folder: Path, *, extra_route: str = "", extra: str = "") -> Path:
    cert, key = certs.issue(HOST)
    path = tmp_path / "static.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            handshake_timeout = 5.0
            {extra}

            [[listener]]
            address = "127.0.0.1:0"

            [[host]]
            names = ["{HOST}"]
            certificate = "{cert}"
            private_key = "{key}"

            [[host.route]]
            path_prefix = "/"
            static = "{folder}"
            cache_control = "max-age=60"

            [[host.route]]
            path_prefix = "/files"
            static = "{folder}/noindex"

            [[host.route]]
            path = "/start"
            static = "{folder}"
            {extra_route}
            """
        )
    )
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    write_tree(root)
    (tmp_path / "outside.txt").write_text("outside\n")
    (root / "escape.txt").symlink_to(tmp_path / "outside.txt")
    (root / "escape-dir").symlink_to(tmp_path)
    return root


async def get(port: int, certs: Certs, target: str, **kwargs: object) -> Response:
    stream = await tls_client(port, certs.client_context(), HOST)
    try:
        return await Client(stream).request(target, **kwargs)  # type: ignore[arg-type]
    finally:
        await stream.aclose()


async def test_files_and_headers(tmp_path: Path, tree: Path) -> None:
    certs = make_certs(tmp_path)
    async with running_gateway(static_config(tmp_path, certs, tree)) as gw:
        stat = os.stat(tree / "app" / "ui.js")
        info = FileInfo(stat.st_size, stat.st_mtime_ns, stat.st_ino)
        r = await get(gw.port, certs, "/app/ui.js")
        assert r.status == 200
        assert r.body == b"console.log('ui');\n"
        assert r["Content-Type"] == "text/javascript; charset=utf-8"
        assert r["Content-Length"] == str(len(r.body))
        assert r["ETag"] == info.etag
        assert r["Last-Modified"] == info.last_modified
        assert r["Accept-Ranges"] == "bytes"
        assert r["Cache-Control"] == "max-age=60"
        # HEAD: the same head, no body.
        r = await get(gw.port, certs, "/app/ui.js", method="HEAD")
        assert (r.status, r.body, r["Content-Length"], r["ETag"]) == (200, b"", "19", info.etag)
        r = await get(gw.port, certs, "/missing.txt", method="HEAD")
        assert (r.status, r.body) == (404, b"")
        r = await get(gw.port, certs, "/app", method="HEAD")
        assert (r.status, r.body, r["Location"]) == (301, b"", "/app/")
        # Index, the directory's 301, no listing.
        r = await get(gw.port, certs, "/")
        assert (r.status, r.body, r["Content-Type"]) == (200, b"<h1>home</h1>\n", "text/html; charset=utf-8")
        r = await get(gw.port, certs, "/app?x=1")
        assert (r.status, r["Location"]) == (301, "/app/?x=1")
        r = await get(gw.port, certs, "/app/")
        assert r.status == 404  # app/ has no index.html: never a listing
        r = await get(gw.port, certs, "/files")
        assert (r.status, r["Location"]) == (301, "/files/")
        r = await get(gw.port, certs, "/files/a.txt")
        assert (r.status, r.body) == (200, b"a\n")
        r = await get(gw.port, certs, "/start")  # an exact route: its folder's index
        assert (r.status, r.body) == (200, b"<h1>home</h1>\n")
        r = await get(gw.port, certs, "/caf%C3%A9.txt")
        assert (r.status, r.body) == (200, b"accent\n")
        r = await get(gw.port, certs, "/inside-link.txt")  # a symlink inside the folder
        assert (r.status, r.body) == (200, b"console.log('ui');\n")
        r = await get(gw.port, certs, "/empty.txt")
        assert (r.status, r.body, r["Content-Length"]) == (200, b"", "0")
        r = await get(gw.port, certs, "/data.bin")
        assert (r.status, r["Content-Type"], len(r.body)) == (200, "application/octet-stream", 1024)


@pytest.mark.parametrize(
    "target",
    [
        "/.secret",
        "/.git/config",
        "/%2Egit/config",
        "/%2e%2e/outside.txt",
        "/..%2Foutside.txt",
        "/app/..%2f..%2foutside.txt",
        "/escape.txt",  # a symlink out of the folder
        "/escape-dir/outside.txt",
        "/dot-link/config",  # a symlink onto a dot-directory
        "/fifo",  # not a regular file (and the open must not hang)
        "/missing.txt",
        "/app/ui.js/",  # a file asked for as a directory
        "/a%00b",
    ],
)
async def test_refused_paths(tmp_path: Path, tree: Path, target: str) -> None:
    certs = make_certs(tmp_path)
    async with running_gateway(static_config(tmp_path, certs, tree)) as gw:
        r = await get(gw.port, certs, target)
        assert r.status in (400, 404), (target, r)
        assert b"dotfile" not in r.body and b"outside" not in r.body and b"[core]" not in r.body


async def test_conditionals_and_ranges(tmp_path: Path, tree: Path) -> None:
    certs = make_certs(tmp_path)
    async with running_gateway(static_config(tmp_path, certs, tree)) as gw:
        first = await get(gw.port, certs, "/data.bin")
        etag, modified = first["ETag"], first["Last-Modified"]
        r = await get(gw.port, certs, "/data.bin", headers=[("If-None-Match", etag)])
        assert (r.status, r.body, r["ETag"]) == (304, b"", etag)
        assert r.get("Content-Length") is None
        r = await get(gw.port, certs, "/data.bin", headers=[("If-Modified-Since", modified)])
        assert (r.status, r.body) == (304, b"")
        r = await get(gw.port, certs, "/data.bin", headers=[("If-None-Match", '"other"')])
        assert (r.status, len(r.body)) == (200, 1024)
        r = await get(gw.port, certs, "/data.bin", headers=[("If-Match", '"other"')])
        assert r.status == 412
        r = await get(gw.port, certs, "/data.bin", headers=[("Range", "bytes=10-19")])
        assert (r.status, r.body, r["Content-Range"], r["Content-Length"]) == (
            206, bytes(range(10, 20)), "bytes 10-19/1024", "10",
        )
        r = await get(gw.port, certs, "/data.bin", headers=[("Range", "bytes=-4")])
        assert (r.status, r.body) == (206, bytes([252, 253, 254, 255]))
        r = await get(gw.port, certs, "/data.bin", headers=[("Range", "bytes=5000-")])
        assert (r.status, r["Content-Range"]) == (416, "bytes */1024")
        # A HEAD gets the head of its GET, as from nginx: 206 (or 416), no body.
        r = await get(gw.port, certs, "/data.bin", method="HEAD", headers=[("Range", "bytes=10-19")])
        assert (r.status, r.body, r["Content-Range"], r["Content-Length"]) == (
            206, b"", "bytes 10-19/1024", "10",
        )
        r = await get(gw.port, certs, "/data.bin", method="HEAD", headers=[("Range", "bytes=5000-")])
        assert (r.status, r.body, r["Content-Range"]) == (416, b"", "bytes */1024")
        r = await get(gw.port, certs, "/data.bin", headers=[("Range", "bytes=0-1,4-5")])
        assert (r.status, len(r.body)) == (200, 1024)
        r = await get(gw.port, certs, "/data.bin", headers=[("Range", "bytes=0-1"), ("If-Range", '"old"')])
        assert (r.status, len(r.body)) == (200, 1024)
        r = await get(gw.port, certs, "/data.bin", headers=[("Range", "bytes=0-1"), ("If-Range", etag)])
        assert (r.status, r.body) == (206, b"\x00\x01")


async def test_methods_and_websocket(tmp_path: Path, tree: Path) -> None:
    certs = make_certs(tmp_path)
    async with running_gateway(static_config(tmp_path, certs, tree)) as gw:
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
            r = await get(gw.port, certs, "/index.html", method=method, body=b"x=1" if method != "DELETE" else b"")
            assert (r.status, r["Allow"]) == (405, "GET, HEAD"), method
        stream = await tls_client(gw.port, certs.client_context(), HOST)
        data = await upgrade_answer(stream, "/index.html", HOST)
        assert data.startswith(b"HTTP/1.1 404 "), data
        await stream.aclose()


async def test_reload_picks_up_a_new_folder(tmp_path: Path, tree: Path) -> None:
    certs = make_certs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.html").write_text("<h1>other</h1>\n")
    path = static_config(tmp_path, certs, tree)
    async with running_gateway(path) as gw:
        assert (await get(gw.port, certs, "/")).body == b"<h1>home</h1>\n"
        path.write_text(path.read_text().replace(f'static = "{tree}"\n', f'static = "{other}"\n'))
        await gw.gateway.reload(load(path))
        assert (await get(gw.port, certs, "/")).body == b"<h1>other</h1>\n"


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_big_file_to_slow_reader_stalls_nothing(tmp_path: Path, tree: Path) -> None:
    """A 2 GiB file to a client that stops reading: memory stays bounded, others are served."""
    big = tree / "big.iso"
    with open(big, "wb") as f:
        f.truncate(2 * 1024**3)  # sparse: no disk used
    certs = make_certs(tmp_path)
    async with running_gateway(static_config(tmp_path, certs, tree)) as gw:
        slow = await tls_client(gw.port, certs.client_context(), HOST)
        client = Client(slow)
        head = await client.request("/big.iso", read_body=False)
        assert (head.status, head["Content-Length"]) == (200, str(2 * 1024**3))
        before = _rss()
        received = 0
        with trio.fail_after(10):
            while received < 1024 * 1024:
                received += len(await slow.receive_some(65536))
        # The reader stops. A server that buffered the file would read on now.
        await trio.sleep(2.0)
        grown = _rss() - before
        assert grown < 64 * 1024 * 1024, f"RSS grew by {grown} bytes while the reader paused"
        # Meanwhile other connections are served.
        for _ in range(3):
            r = await get(gw.port, certs, "/app/ui.js")
            assert r.status == 200
        await slow.aclose()


async def test_blocked_disk_stalls_no_other_connection(
    tmp_path: Path, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that blocks (a hung disk) holds its own request only: every file read
    runs in a worker thread, so the event loop serves other connections meanwhile."""
    release = threading.Event()
    entered = threading.Event()
    real_pread = os.pread

    def hung_pread(fd: int, size: int, offset: int) -> bytes:
        entered.set()
        release.wait(30)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(staticio.os, "pread", hung_pread)
    certs = make_certs(tmp_path)
    async with echo_backend() as echo_port:
        extra_route = f"""
            [[host.route]]
            path = "/echo"
            backend = "ws://127.0.0.1:{echo_port}"
        """
        path = static_config(tmp_path, certs, tree, extra_route=textwrap.dedent(extra_route))
        async with running_gateway(path) as gw:
            hung = await tls_client(gw.port, certs.client_context(), HOST)
            client = Client(hung)
            head = await client.request("/data.bin", read_body=False)
            assert head.status == 200
            with trio.fail_after(10):
                while not entered.is_set():
                    await trio.sleep(0.01)
            try:
                # The read is stuck; a HEAD (no read) and a WebSocket echo still work.
                r = await get(gw.port, certs, "/data.bin", method="HEAD")
                assert r.status == 200
                ws = await tls_client(gw.port, certs.client_context(), HOST)
                data = await upgrade_answer(ws, "/echo", HOST)
                assert data.startswith(b"HTTP/1.1 101 "), data
                await ws.aclose()
            finally:
                release.set()
            body = b""
            with trio.fail_after(10):
                while len(body) < 1024:
                    body += await hung.receive_some(65536)
            assert body == bytes(range(256)) * 4
            await hung.aclose()


def redirect_config(tmp_path: Path, certs: Certs, folder: Path) -> Path:
    cert, key = certs.issue(HOST)
    path = tmp_path / "redirect.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [[listener]]
            address = "127.0.0.1:0"
            tls = false
            redirect_https = true

            [[listener]]
            address = "127.0.0.1:0"

            [[host]]
            names = ["{HOST}", "*.example.org"]
            certificate = "{cert}"
            private_key = "{key}"

            [[host.route]]
            path_prefix = "/"
            static = "{folder}"
            """
        )
    )
    return path


async def test_redirect_https(tmp_path: Path, tree: Path) -> None:
    certs = make_certs(tmp_path)
    async with running_gateway(redirect_config(tmp_path, certs, tree)) as gw:
        plain_port, tls_port = gw.ports
        for method, target, host, location in [
            ("GET", "/app/ui.js?a=1&b", f"{HOST}:{plain_port}", f"https://{HOST}:{tls_port}/app/ui.js?a=1&b"),
            ("POST", "/form", "x.example.org", f"https://x.example.org:{tls_port}/form"),
            ("GET", "/", "STATIC.test.", f"https://static.test:{tls_port}/"),
        ]:
            stream = await trio.open_tcp_stream("127.0.0.1", plain_port)
            r = await Client(stream).request(target, method=method, host=host)
            assert (r.status, r["Location"]) == (308, location)
            await stream.aclose()
        # A WebSocket upgrade is redirected too (ws:// -> https://, as nginx's return 308).
        stream = await trio.open_tcp_stream("127.0.0.1", plain_port)
        data = await upgrade_answer(stream, "/chat?room=1", HOST)
        assert data.startswith(b"HTTP/1.1 308 "), data
        assert f"Location: https://{HOST}:{tls_port}/chat?room=1\r\n".encode() in data
        await stream.aclose()
        stream = await trio.open_tcp_stream("127.0.0.1", plain_port)
        r = await Client(stream).request("/", host="evil.test")
        assert r.status == 404
        assert r.get("Location") is None
        await stream.aclose()
        # The redirect's target really serves the file.
        r = await get(tls_port, certs, "/app/ui.js")
        assert (r.status, r.body) == (200, b"console.log('ui');\n")



async def test_keep_alive_access_lines_and_metrics(
    tmp_path: Path, tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Many requests on one connection, each with its own access line and metrics (SPEC 7)."""
    caplog.set_level(logging.INFO, logger="gatewayd.access")
    certs = make_certs(tmp_path)
    async with running_gateway(static_config(tmp_path, certs, tree)) as gw:
        stream = await tls_client(gw.port, certs.client_context(), HOST)
        client = Client(stream)
        first = await client.request("/app/ui.js?secret=1")
        assert first.status == 200
        assert (await client.request("/missing.txt")).status == 404  # a 404 keeps the connection
        again = await client.request("/app/ui.js", headers=[("If-None-Match", first["ETag"])])
        assert again.status == 304
        assert (await client.request("/data.bin", headers=[("Range", "bytes=0-9")])).status == 206
        assert (await client.request("/app/ui.js", method="HEAD")).status == 200
        # A body on a GET is not read: answered, then the connection closes.
        r = await client.request("/index.html", body=b"x" * 10)
        assert (r.status, r.get("Connection")) == (200, "close")
        assert await stream.receive_some(100) == b""
        await stream.aclose()
        with trio.fail_after(5):
            while len([r for r in caplog.records if hasattr(r, "access")]) < 6:
                await trio.sleep(0.01)
    lines = [r.access for r in caplog.records if hasattr(r, "access")]  # type: ignore[attr-defined]
    assert [(line["method"], line["path"], line["status"]) for line in lines[:6]] == [
        ("GET", "/app/ui.js", 200),
        ("GET", "/missing.txt", 404),
        ("GET", "/app/ui.js", 304),
        ("GET", "/data.bin", 206),
        ("HEAD", "/app/ui.js", 200),
        ("GET", "/index.html", 200),
    ]
    assert all(line["route"] == "host[0]:/*" for line in lines[:6])
    assert lines[0]["bytes_out"] > 19 and lines[0]["bytes_in"] > 0 and lines[0]["duration"] >= 0
    assert "secret" not in str(lines)
    metrics = gw.gateway.metrics.render().decode()
    assert 'gatewayd_http_requests_total{code="200",route="host[0]:/*"} 3.0' in metrics
    assert 'gatewayd_http_requests_total{code="404",route="host[0]:/*"} 1.0' in metrics
    assert 'gatewayd_http_request_duration_seconds_count{route="host[0]:/*"} 6.0' in metrics


async def test_basic_auth_on_a_static_route(tmp_path: Path, tree: Path) -> None:
    users = tmp_path / "users"
    users.write_bytes(b"alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)) + b"\n")
    extra_route = f"""
        [[host.route]]
        path_prefix = "/private/"
        static = "{tree}/app"
        auth = "basic"
        auth_users = "{users}"
        realm = "files"
    """
    certs = make_certs(tmp_path)
    path = static_config(tmp_path, certs, tree, extra_route=textwrap.dedent(extra_route))
    async with running_gateway(path) as gw:
        r = await get(gw.port, certs, "/private/ui.js")
        assert (r.status, r["WWW-Authenticate"]) == (401, 'Basic realm="files", charset="UTF-8"')
        token = base64.b64encode(b"alice:s3cret").decode()
        r = await get(gw.port, certs, "/private/ui.js", headers=[("Authorization", f"Basic {token}")])
        assert (r.status, r.body) == (200, b"console.log('ui');\n")


async def test_http10_requests_are_served(tmp_path: Path, tree: Path) -> None:
    """SPEC 7: HTTP/1.0 on a static route is answered as HTTP/1.1; closed unless it asked to stay."""
    certs = make_certs(tmp_path)
    async with running_gateway(static_config(tmp_path, certs, tree)) as gw:
        stream = await tls_client(gw.port, certs.client_context(), HOST)
        await stream.send_all(f"GET /app/ui.js HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert body == b"console.log('ui');\n"
        await stream.aclose()
        # With keep-alive asked for, a second request follows on the same connection.
        stream = await tls_client(gw.port, certs.client_context(), HOST)
        ask = f"GET /app/ui.js HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n".encode()
        for _ in range(2):
            await stream.send_all(ask)
            data = b""
            with trio.fail_after(10):
                while not data.endswith(b"console.log('ui');\n"):
                    data += await stream.receive_some(65536)
            assert data.startswith(b"HTTP/1.1 200 ") and b"keep-alive" in data.lower(), data
        await stream.aclose()


async def test_a_hung_open_can_be_abandoned_and_its_file_is_closed(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup stuck in the file system (a hung mount) does not hold a cancellation
    (shutdown, a deadline); the file it opens later is closed, not leaked."""
    release = threading.Event()
    opened: list[int] = []
    real_open = os.open

    def hung_open(path: str, flags: int, *args: object) -> int:
        release.wait(30)
        fd = real_open(path, flags, *args)  # type: ignore[arg-type]
        opened.append(fd)
        return fd

    monkeypatch.setattr(staticio.os, "open", hung_open)
    route = load_route(tree)
    request = parse_request_head(f"GET /app/ui.js HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    started = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        await staticio.open_static(request, route)
    assert scope.cancelled_caught
    # Not held until the open returns (it waits for `release`, up to 30 s).
    assert trio.current_time() - started < 10
    release.set()
    with trio.fail_after(10):
        while not opened:
            await trio.sleep(0.01)
        while True:
            try:
                os.fstat(opened[0])
            except OSError:
                break  # closed by the abandoned lookup
            await trio.sleep(0.01)


def load_route(folder: Path) -> RouteConfig:
    config = folder.parent / "route.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [[listener]]
            address = "127.0.0.1:0"
            tls = false

            [[host]]
            names = ["{HOST}"]

            [[host.route]]
            path_prefix = "/"
            static = "{folder}"
            """
        )
    )
    return load(config).hosts[0].routes[0]
