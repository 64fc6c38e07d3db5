"""Plain (tls = false) listeners, unix: backends, half-close, idle timeout,
max_connections and the access log, over real sockets."""

from __future__ import annotations

import io
import json
import logging
import textwrap
from pathlib import Path

import pytest
import trio

from gatewayd import log as gatewayd_log
from harness import (
    exchange,
    read_head,
    receive_all,
    running_gateway,
    switching_protocols,
    upgrade_request,
)

HALF: list[bytes] = []


async def half_close_backend(stream: trio.abc.Stream) -> None:
    """101, then collects everything until EOF, then answers and closes."""
    head, rest = await read_head(stream)
    await stream.send_all(switching_protocols(head) + b"hello-early")
    received = rest
    while True:
        data = await stream.receive_some(65536)
        if not data:
            break
        received += data
    HALF.append(received)
    # The client's direction is closed; ours still works (unless the client
    # closed both ways, as the routing tests do).
    try:
        await stream.send_all(b"reply-after-eof:" + received)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass


async def serve_unix(path: Path, handler, task_status=trio.TASK_STATUS_IGNORED) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    await trio.serve_listeners(handler, [listener])


def plain_config(tmp_path: Path, sock: Path, extra: str = "") -> Path:
    path = tmp_path / "plain.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            handshake_timeout = 2.0
            backend_connect_timeout = 1.0
            {extra}

            [[listener]]
            address = "127.0.0.1:0"
            tls = false

            [[host]]
            names = ["app.internal"]

            [[host.route]]
            path_prefix = "/ws/"
            backend = "unix:{sock}"

            [[host]]
            names = ["fallback.internal"]
            default = true

            [[host.route]]
            path = "/only"
            backend = "unix:{sock}"
            """
        )
    )
    return path


@pytest.fixture
async def unix_backend(tmp_path: Path):
    sock = tmp_path / "backend.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, sock, half_close_backend)
        yield sock
        nursery.cancel_scope.cancel()


async def test_plain_listener_unix_backend_half_close(tmp_path: Path, unix_backend: Path) -> None:
    HALF.clear()
    async with running_gateway(plain_config(tmp_path, unix_backend)) as gw:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(upgrade_request("/ws/x", "app.internal") + b"first")
            head, rest = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 101 ")
            await stream.send_all(b"+second")
            await stream.send_eof()  # TCP half-close towards the gateway
            rest += await receive_all(stream)
            assert rest == b"hello-early" + b"reply-after-eof:first+second"
            assert HALF == [b"first+second"]


async def test_plain_listener_routes_by_host_default_and_404(tmp_path: Path, unix_backend: Path) -> None:
    async with running_gateway(plain_config(tmp_path, unix_backend)) as gw:
        with trio.fail_after(10):
            # Unknown Host goes to the default host, which has only /only.
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            answer = await exchange(stream, upgrade_request("/ws/x", "unknown.test"))
            assert answer.status == 404
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(upgrade_request("/only", "unknown.test"))
            head, _ = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 101 ")
            await stream.aclose()


async def test_row7_plain_unknown_host_without_default(tmp_path: Path, unix_backend: Path) -> None:
    path = plain_config(tmp_path, unix_backend)
    path.write_text(path.read_text().replace("default = true", "default = false"))
    async with running_gateway(path) as gw:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            answer = await exchange(stream, upgrade_request("/only", "unknown.test"))
            assert answer.status == 404
            assert answer.body == b"Not Found: no such host\n"


async def idle_backend(stream: trio.abc.Stream) -> None:
    head, _ = await read_head(stream)
    await stream.send_all(switching_protocols(head))
    await receive_all(stream, 10)


async def test_idle_timeout_closes_quiet_connection(tmp_path: Path) -> None:
    sock = tmp_path / "idle.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, sock, idle_backend)
        async with running_gateway(plain_config(tmp_path, sock, "idle_timeout = 0.3")) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(upgrade_request("/ws/x", "app.internal"))
            head, _ = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 101 ")
            start = trio.current_time()
            with trio.fail_after(5):
                assert await receive_all(stream) == b""
            assert trio.current_time() - start >= 0.25
        nursery.cancel_scope.cancel()


async def test_max_connections_closes_new_ones(tmp_path: Path) -> None:
    sock = tmp_path / "idle.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, sock, idle_backend)
        async with running_gateway(plain_config(tmp_path, sock, "max_connections = 1")) as gw:
            with trio.fail_after(10):
                first = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await first.send_all(upgrade_request("/ws/x", "app.internal"))
                head, _ = await read_head(first)
                assert head.startswith(b"HTTP/1.1 101 ")
                second = await trio.open_tcp_stream("127.0.0.1", gw.port)
                assert await receive_all(second) == b""  # closed at once
                await first.aclose()
                # Once the first is gone, new connections are served again.
                while gw.gateway.active_connections:
                    await trio.sleep(0.01)
                third = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await third.send_all(upgrade_request("/ws/y", "app.internal"))
                head, _ = await read_head(third)
                assert head.startswith(b"HTTP/1.1 101 ")
                await third.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_access_log_line(tmp_path: Path, unix_backend: Path, fmt: str) -> None:
    HALF.clear()
    out = io.StringIO()
    gatewayd_log.setup("info", fmt, out)
    try:
        async with running_gateway(plain_config(tmp_path, unix_backend)) as gw:
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(
                    upgrade_request("/ws/room?secret=hunter2", "app.internal", "Authorization: Bearer sekrit", "Cookie: c=sekrit2")
                    + b"12345"
                )
                await read_head(stream)
                await stream.send_eof()
                await receive_all(stream)
                while gw.gateway.active_connections:
                    await trio.sleep(0.01)
                # a rejected one too
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await exchange(stream, upgrade_request("/nope", "app.internal"))
                while gw.gateway.active_connections:
                    await trio.sleep(0.01)
    finally:
        logging.getLogger("gatewayd").handlers.clear()
        logging.getLogger("gatewayd").propagate = True
    text = out.getvalue()
    assert "hunter2" not in text and "sekrit" not in text
    access = [line for line in text.splitlines() if "gatewayd.access" in line]
    assert len(access) == 2, text
    if fmt == "json":
        first, second = (json.loads(line) for line in access)
        assert first["path"] == "/ws/room"
        assert first["status"] == 101
        assert first["host"] == "app.internal"
        assert first["backend"].startswith("unix:")
        assert first["route"] == "host[0]:/ws/*"
        assert first["bytes_in"] >= 5
        assert first["bytes_out"] > 0
        assert first["end"] == "client_close"
        assert first["sni"] is None
        assert isinstance(first["duration"], float)
        assert second["status"] == 404 and second["end"] == "rejected"
    else:
        assert " path=/ws/room " in access[0]
        assert " status=101 " in access[0]
        assert " end=client_close" in access[0]
        assert " status=404 " in access[1]


# ---------------------------------------------------------------- review fixes


def review_config(tmp_path: Path, port: int, extra_route: str = "") -> Path:
    path = tmp_path / "review.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            handshake_timeout = 2.0
            backend_connect_timeout = 1.0

            [[listener]]
            address = "127.0.0.1:0"
            tls = false

            [[host]]
            names = ["app.internal"]

            [[host.route]]
            path_prefix = "/admin/"
            backend = "ws://127.0.0.1:{port}"
            allow = ["10.0.0.0/8"]

            [[host.route]]
            path_prefix = "/"
            backend = "ws://127.0.0.1:{port}"
            """
        )
    )
    return path


async def test_dot_segments_cannot_bypass_a_route_allow_list(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def backend(stream: trio.SocketStream) -> None:
        head, _ = await read_head(stream)
        seen.append(head.split(b"\r\n")[0])
        await stream.send_all(switching_protocols(head))
        await receive_all(stream, 3)

    from harness import raw_backend

    async with raw_backend(backend) as port:
        async with running_gateway(review_config(tmp_path, port)) as gw:
            with trio.fail_after(10):
                for target in ("/admin/x", "/public/../admin/x", "/public/%2e%2e/admin/x", "/%61dmin/x", "//admin/x"):
                    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                    answer = await exchange(stream, upgrade_request(target, "app.internal"))
                    assert answer.status == 403, target
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(upgrade_request("/public/./a/../b", "app.internal"))
                head, _ = await read_head(stream)
                assert head.startswith(b"HTTP/1.1 101 ")
                await stream.aclose()
    assert seen == [b"GET /public/b HTTP/1.1"]


async def test_client_that_never_reads_its_answer_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import gatewayd.connection as server_module

    monkeypatch.setattr(server_module, "FINAL_ANSWER_SECONDS", 0.5)

    async def big_refusal(stream: trio.SocketStream) -> None:
        await read_head(stream)
        body = b"x" * 60000
        await stream.send_all(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        await receive_all(stream, 5)

    from harness import raw_backend

    async with raw_backend(big_refusal) as port:
        async with running_gateway(review_config(tmp_path, port)) as gw:
            with trio.fail_after(10):
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                await sock.connect(("127.0.0.1", gw.port))
                stream = trio.SocketStream(sock)
                await stream.send_all(upgrade_request("/x", "app.internal"))
                await trio.sleep(0.2)
                assert gw.gateway.active_connections == 1
                # Never reading: the gateway gives up on us on its own.
                while gw.gateway.active_connections:
                    await trio.sleep(0.05)
                await stream.aclose()


async def test_slow_non_101_body_is_relayed_not_504(tmp_path: Path) -> None:
    async def slow_body(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\n\r\nhello")
        await trio.sleep(5)

    from harness import raw_backend

    async with raw_backend(slow_body) as port:
        async with running_gateway(review_config(tmp_path, port)) as gw:
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                answer = await exchange(stream, upgrade_request("/x", "app.internal"))
    assert answer.status == 403
    assert answer.body == b"hello"


async def test_bytes_in_counts_early_bytes_once_and_log_escapes_controls(
    tmp_path: Path, unix_backend: Path
) -> None:
    out = io.StringIO()
    gatewayd_log.setup("info", "text", out)
    request = upgrade_request("/ws/x", "app.internal") + b"EARLY"
    try:
        async with running_gateway(plain_config(tmp_path, unix_backend)) as gw:
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(request)
                await read_head(stream)
                await stream.send_eof()
                await receive_all(stream)
                while gw.gateway.active_connections:
                    await trio.sleep(0.01)
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await exchange(stream, upgrade_request("/nope", "app.internal", "X-A: 1").replace(
                    b"Host: app.internal", b"Host: app.internal\x1b]0;pwned\x07"))
                while gw.gateway.active_connections:
                    await trio.sleep(0.01)
    finally:
        logging.getLogger("gatewayd").handlers.clear()
        logging.getLogger("gatewayd").propagate = True
    text = out.getvalue()
    access = [line for line in text.splitlines() if "gatewayd.access" in line]
    assert f" bytes_in={len(request)} " in access[0]
    assert "\x1b" not in text and "\x07" not in text


async def test_access_log_names_the_route_of_a_rejected_request(tmp_path: Path, unix_backend: Path) -> None:
    out = io.StringIO()
    gatewayd_log.setup("info", "json", out)
    try:
        async with running_gateway(plain_config(tmp_path, unix_backend)) as gw:
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                # Row 12 (version 8) on a matched route.
                await exchange(stream, upgrade_request("/ws/x", "app.internal").replace(
                    b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"))
                while gw.gateway.active_connections:
                    await trio.sleep(0.01)
    finally:
        logging.getLogger("gatewayd").handlers.clear()
        logging.getLogger("gatewayd").propagate = True
    (line,) = [json.loads(entry) for entry in out.getvalue().splitlines() if '"gatewayd.access"' in entry]
    assert line["status"] == 426 and line["route"] == "host[0]:/ws/*" and line["end"] == "rejected"


@pytest.mark.parametrize(
    "target, status",
    [("/only", 405), ("/nothing-here", 404)],  # rows 8 and 9
)
async def test_gateway_answer_to_head_has_no_body(
    tmp_path: Path, unix_backend: Path, target: str, status: int
) -> None:
    # RFC 9110 9.3.2: the head (Content-Length of the text included), no content.
    async with running_gateway(plain_config(tmp_path, unix_backend)) as gw:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            request = f"HEAD {target} HTTP/1.1\r\nHost: fallback.internal\r\n\r\n"
            answer = await exchange(stream, request.encode())
    assert (answer.status, answer.body) == (status, b"")
    assert int(answer.header("Content-Length") or 0) > 0
    assert answer.header("Content-Type") == "text/plain; charset=utf-8"


@pytest.mark.parametrize("value, expected", [('""', None), ('"edge/1"', "edge/1")])
async def test_server_header_setting(tmp_path: Path, unix_backend: Path, value: str, expected: str | None) -> None:
    """SPEC section 2: server_header names gateway-made responses; "" omits the header."""
    async with running_gateway(plain_config(tmp_path, unix_backend, f"server_header = {value}")) as gw:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            answer = await exchange(stream, upgrade_request("/nope", "app.internal"))
    assert answer.status == 404
    assert answer.header("server") == expected
