"""Gateway.reload and shutdown in-process: the swap is atomic, established
connections are untouched, a bad configuration or a bind failure changes nothing."""

from __future__ import annotations

import hashlib
import ssl
import textwrap
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from gatewayd.config import load
from gatewayd.errors import ConfigErrors
from gatewayd.server import Gateway, describe_changes
from harness import Certs, echo_backend, exchange, make_certs, read_head, tls_client, upgrade_request


def config_text(certs: Certs, echo: int, routes: list[str], listeners: list[str]) -> str:
    d = certs.directory
    text = "[gateway]\nhandshake_timeout = 2.0\nshutdown_timeout = 5.0\n"
    for address in listeners:
        text += f'\n[[listener]]\naddress = "{address}"\n'
    text += textwrap.dedent(
        f"""
        [[host]]
        names = ["localhost"]
        certificate = "{d}/localhost.pem"
        private_key = "{d}/localhost.key"
        """
    )
    for path in routes:
        text += f'\n[[host.route]]\npath = "{path}"\nbackend = "ws://127.0.0.1:{echo}"\n'
    return text


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    certs = make_certs(tmp_path)
    certs.issue("localhost", "127.0.0.1", "127.0.0.2")
    return certs


async def status_of(port: int, ctx: ssl.SSLContext, path: str, host: str = "127.0.0.1") -> int:
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    await stream.send_all(upgrade_request(path))
    head, _ = await read_head(stream)
    await stream.aclose()
    return int(head.split(b" ")[1])


async def test_reload_adds_and_removes_routes_established_connection_untouched(
    certs: Certs, tmp_path: Path
) -> None:
    path = tmp_path / "gatewayd.toml"
    ctx = certs.client_context()
    async with echo_backend() as echo:
        path.write_text(config_text(certs, echo, ["/a"], ["127.0.0.1:0"]))
        gateway = Gateway(load(path))
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                port = gateway.listen_addresses[0][1][1]
                assert await status_of(port, ctx, "/a") == 101
                assert await status_of(port, ctx, "/b") == 404
                async with open_websocket_url(f"wss://localhost:{port}/a", ssl_context=ctx) as ws:
                    await ws.send_message("before")
                    assert await ws.get_message() == "before"

                    path.write_text(config_text(certs, echo, ["/b"], ["127.0.0.1:0"]))
                    result = await gateway.reload(load(path))
                    assert result.generation == 2
                    assert "routes added: localhost/b" in result.changes
                    assert "routes removed: localhost/a" in result.changes
                    # Same listener address: same socket, same port.
                    assert gateway.listen_addresses[0][1][1] == port
                    assert await status_of(port, ctx, "/b") == 101
                    assert await status_of(port, ctx, "/a") == 404
                    # The connection accepted under generation 1 carries on.
                    await ws.send_message("after")
                    assert await ws.get_message() == "after"
                gateway.shutdown()


async def test_bad_config_and_bind_failure_change_nothing(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "gatewayd.toml"
    ctx = certs.client_context()
    async with echo_backend() as echo:
        path.write_text(config_text(certs, echo, ["/a"], ["127.0.0.1:0"]))
        gateway = Gateway(load(path))
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                port = gateway.listen_addresses[0][1][1]

                # A certificate that does not match its key: refused as a whole.
                (tmp_path / "other").mkdir()
                other = make_certs(tmp_path / "other")
                _, wrong_key = other.issue("localhost")
                bad = config_text(certs, echo, ["/a", "/b"], ["127.0.0.1:0"]).replace(
                    f"{certs.directory}/localhost.key", str(wrong_key)
                )
                with pytest.raises(ConfigErrors) as info:
                    await gateway.reload(load_text(tmp_path, bad))
                assert any(e.key_path.startswith("host[0]") for e in info.value.errors)
                assert gateway.generation.number == 1

                # A new listener whose address is taken: nothing changes either.
                taken = trio.socket.socket()
                await taken.bind(("127.0.0.1", 0))
                taken.listen(1)
                busy = taken.getsockname()[1]
                text = config_text(certs, echo, ["/a", "/b"], ["127.0.0.1:0", "127.0.0.2:0", f"127.0.0.1:{busy}"])
                with pytest.raises(OSError):
                    await gateway.reload(load_text(tmp_path, text))
                taken.close()
                assert gateway.generation.number == 1
                assert len(gateway.listen_addresses) == 1
                assert await status_of(port, ctx, "/a") == 101
                assert await status_of(port, ctx, "/b") == 404
                gateway.shutdown()


def load_text(tmp_path: Path, text: str):
    path = tmp_path / "next.toml"
    path.write_text(text)
    return load(path)


async def test_listeners_added_and_removed(certs: Certs, tmp_path: Path) -> None:
    ctx = certs.client_context()
    async with echo_backend() as echo:
        gateway = Gateway(load_text(tmp_path, config_text(certs, echo, ["/a"], ["127.0.0.1:0"])))
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                first = gateway.listen_addresses[0][1][1]
                result = await gateway.reload(
                    load_text(tmp_path, config_text(certs, echo, ["/a"], ["127.0.0.1:0", "127.0.0.2:0"]))
                )
                assert "listeners added: 127.0.0.2:0" in result.changes
                second = gateway.listen_addresses[1][1][1]
                assert await status_of(second, ctx, "/a", host="127.0.0.2") == 101
                await gateway.reload(load_text(tmp_path, config_text(certs, echo, ["/a"], ["127.0.0.2:0"])))
                assert [a for _, a in gateway.listen_addresses] == [("127.0.0.2", second)]
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", first)
                assert await status_of(second, ctx, "/a", host="127.0.0.2") == 101
                gateway.shutdown()


async def test_certificate_rotation(certs: Certs, tmp_path: Path) -> None:
    ctx = certs.client_context()
    async with echo_backend() as echo:
        gateway = Gateway(load_text(tmp_path, config_text(certs, echo, ["/a"], ["127.0.0.1:0"])))
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                port = gateway.listen_addresses[0][1][1]

                async def fingerprint() -> str:
                    stream = await tls_client(port, ctx, "localhost")
                    der = stream.getpeercert(binary_form=True)
                    await stream.aclose()
                    return hashlib.sha256(der).hexdigest()

                before = await fingerprint()
                certs.issue("localhost", "127.0.0.1")  # same paths, new certificate and key
                result = await gateway.reload(
                    load_text(tmp_path, config_text(certs, echo, ["/a"], ["127.0.0.1:0"]))
                )
                assert result.describe() == "no changes (certificates re-read)"
                assert await fingerprint() != before
                gateway.shutdown()


async def test_shutdown_drains_open_connection_and_refuses_new(certs: Certs, tmp_path: Path) -> None:
    ctx = certs.client_context()
    async with echo_backend() as echo:
        gateway = Gateway(load_text(tmp_path, config_text(certs, echo, ["/a"], ["127.0.0.1:0"])))
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                port = gateway.listen_addresses[0][1][1]
                async with open_websocket_url(f"wss://localhost:{port}/a", ssl_context=ctx) as ws:
                    gateway.shutdown()
                    await trio.sleep(0.05)
                    with pytest.raises(OSError):
                        await trio.open_tcp_stream("127.0.0.1", port)
                    await ws.send_message("still here")
                    assert await ws.get_message() == "still here"
                # serve() returns once the last connection is gone, well before the timeout.
            assert gateway.active_connections == 0


async def test_drain_timeout_closes_what_is_left(certs: Certs, tmp_path: Path) -> None:
    ctx = certs.client_context()
    text = config_text(certs, 1, ["/a"], ["127.0.0.1:0"]).replace("shutdown_timeout = 5.0", "shutdown_timeout = 0.5")
    async with echo_backend() as echo:
        text = text.replace("ws://127.0.0.1:1", f"ws://127.0.0.1:{echo}")
        gateway = Gateway(load_text(tmp_path, text))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                port = gateway.listen_addresses[0][1][1]
                stream = await tls_client(port, ctx, "localhost")
                await stream.send_all(upgrade_request("/a"))
                await read_head(stream)
                start = trio.current_time()
                gateway.shutdown()
            # serve() returned: the connection was closed after the drain window.
            elapsed = trio.current_time() - start
            assert 0.4 <= elapsed < 5
            with trio.fail_after(3):
                answer = await stream.receive_some(100)
            assert answer == b""


async def test_unknown_route_answer_unchanged_by_failed_reload(certs: Certs, tmp_path: Path) -> None:
    ctx = certs.client_context()
    async with echo_backend() as echo:
        gateway = Gateway(load_text(tmp_path, config_text(certs, echo, ["/a"], ["127.0.0.1:0"])))
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                port = gateway.listen_addresses[0][1][1]
                with pytest.raises(ConfigErrors):
                    load_text(tmp_path, "[[listener]]\naddress = 'nope'\n")
                stream = await tls_client(port, ctx, "localhost")
                answer = await exchange(stream, upgrade_request("/zzz"))
                assert answer.status == 404
                gateway.shutdown()


def test_describe_changes_table(certs: Certs, tmp_path: Path) -> None:
    old = load_text(tmp_path, config_text(certs, 9000, ["/a", "/b"], ["127.0.0.1:8443"]))
    new = load_text(tmp_path, config_text(certs, 9001, ["/b", "/c"], ["127.0.0.1:8443", "127.0.0.1:8444"]))
    assert describe_changes(old, new) == [
        "listeners added: 127.0.0.1:8444",
        "routes added: localhost/c",
        "routes removed: localhost/a",
        "routes changed: localhost/b",
    ]
    assert describe_changes(old, old) == []


async def test_max_connection_age_retires_old_connections(certs: Certs, tmp_path: Path) -> None:
    ctx = certs.client_context()
    async with echo_backend() as echo:
        text = config_text(certs, echo, ["/a"], ["127.0.0.1:0"]).replace(
            "[gateway]\n", "[gateway]\nmax_connection_age = 0.5\n"
        )
        gateway = Gateway(load_text(tmp_path, text))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                port = gateway.listen_addresses[0][1][1]
                stream = await tls_client(port, ctx, "localhost")
                start = trio.current_time()
                await stream.send_all(upgrade_request("/a"))
                await read_head(stream)
                data = b""
                while True:
                    try:
                        chunk = await stream.receive_some(100)
                    except trio.BrokenResourceError:
                        break
                    if not chunk:
                        break
                    data += chunk
                elapsed = trio.current_time() - start
                assert 0.45 <= elapsed <= 0.5 * 1.1 + 1.0
                assert data == b""
                gateway.shutdown()


async def test_reload_after_shutdown_began_is_abandoned(certs: Certs, tmp_path: Path) -> None:
    from gatewayd.server import ReloadAbandoned

    async with echo_backend() as echo:
        gateway = Gateway(load_text(tmp_path, config_text(certs, echo, ["/a"], ["127.0.0.1:0"])))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                gateway.shutdown()
                with pytest.raises(ReloadAbandoned):
                    await gateway.reload(
                        load_text(tmp_path, config_text(certs, echo, ["/a"], ["127.0.0.1:0", "127.0.0.2:0"]))
                    )
                assert gateway.generation.number == 1


async def test_same_address_written_differently_keeps_its_socket(certs: Certs, tmp_path: Path) -> None:
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ctx = certs.client_context()
    async with echo_backend() as echo:
        gateway = Gateway(load_text(tmp_path, config_text(certs, echo, ["/a"], [f"127.0.0.1:{port}"])))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                result = await gateway.reload(
                    load_text(tmp_path, config_text(certs, echo, ["/a"], [f"localhost:{port}"]))
                )
                assert result.generation == 2
                assert [a for _, a in gateway.listen_addresses] == [("127.0.0.1", port)]
                assert await status_of(port, ctx, "/a") == 101
                gateway.shutdown()
