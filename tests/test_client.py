"""``python -m gatewayd.client``: one clear line for every failure, against a real gateway.

Each case runs the client as a user does (a subprocess) against the real
gateway task with trustme certificates and a real echo backend.
"""

from __future__ import annotations

import argparse
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from cryptography import x509

from gatewayd.client import Target, make_target, parse_header, parse_resolve
from harness import (
    Certs,
    Running,
    echo_backend,
    make_certs,
    raw_backend,
    running_gateway,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost", "127.0.0.1", "::1")
    certs.ca.cert_pem.write_to_path(str(certs.directory / "ca.pem"))
    return certs


@pytest.fixture
async def gateway(certs: Certs, tmp_path: Path) -> AsyncIterator[Running]:
    async with serve(certs, tmp_path, default=True) as running:
        yield running


@asynccontextmanager
async def serve(certs: Certs, tmp_path: Path, default: bool) -> AsyncIterator[Running]:
    async with echo_backend() as echo:
        path = tmp_path / "gatewayd.toml"
        path.write_text(
            textwrap.dedent(
                f"""
                [log]
                access_log = false

                [[listener]]
                address = "127.0.0.1:0"

                [[listener]]
                address = "[::1]:0"

                [[listener]]
                address = "127.0.0.1:0"
                tls = false

                [[host]]
                names = ["localhost", "127.0.0.1", "::1"]
                certificate = "{certs.directory / 'localhost.pem'}"
                private_key = "{certs.directory / 'localhost.key'}"
                default = {'true' if default else 'false'}

                [[host.route]]
                path = "/echo"
                backend = "ws://127.0.0.1:{echo}/"

                [[host.route]]
                path = "/origin"
                backend = "ws://127.0.0.1:{echo}/"
                origins = ["https://ok.example"]

                [[host.route]]
                path = "/sub"
                backend = "ws://127.0.0.1:{echo}/"
                subprotocols = ["chat.v2"]
                """
            )
        )
        async with running_gateway(path) as running:
            yield running


async def client(*args: str) -> tuple[int, str, str]:
    """Run the client; (exit status, stdout, stderr)."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "gatewayd.client", "--timeout", "5", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=b"",
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("python -m gatewayd.client: "), stderr
    return lines[0].removeprefix("python -m gatewayd.client: ")


async def test_echo_with_cafile(gateway: Running, certs: Certs) -> None:
    url = f"wss://localhost:{gateway.ports[0]}/echo"
    assert await client(url, "--cafile", str(certs.directory / "ca.pem"), "hello", "again") == (
        0,
        "hello\nagain\n",
        "",
    )


async def test_untrusted_certificate_names_subject_issuer_and_cafile(gateway: Running, certs: Certs) -> None:
    status, out, err = await client(f"wss://localhost:{gateway.ports[0]}/echo", "hello")
    line = one_line(err)
    leaf = x509.load_pem_x509_certificate((certs.directory / "localhost.pem").read_bytes())
    assert status == 1 and out == ""
    assert line.startswith("certificate verification failed for localhost: unable to get local issuer certificate")
    assert f"(subject {leaf.subject.rfc4514_string()}, issuer {leaf.issuer.rfc4514_string()}, " in line
    assert "names localhost, 127.0.0.1, ::1" in line
    assert line.endswith("pass --cafile FILE with the issuing CA (or --insecure to skip the check)")


async def test_name_mismatch_suggests_resolve(gateway: Running, certs: Certs) -> None:
    port = gateway.ports[0]
    status, _, err = await client(
        f"wss://chat.example:{port}/echo",
        "--resolve", f"chat.example:{port}:127.0.0.1",
        "--cafile", str(certs.directory / "ca.pem"),
        "hello",
    )
    line = one_line(err)
    assert status == 1
    assert "certificate verification failed for chat.example: Hostname mismatch" in line
    assert line.endswith(f"connect by one of its names (--resolve NAME:{port}:ADDR reaches an address by name)")


async def test_insecure_warns_loudly_and_connects(gateway: Running) -> None:
    status, out, err = await client("--insecure", f"wss://localhost:{gateway.ports[0]}/echo", "hello")
    assert (status, out) == (0, "hello\n")
    assert "WARNING: --insecure: the server certificate is NOT verified" in one_line(err)


async def test_ipv6_literal(gateway: Running, certs: Certs) -> None:
    url = f"wss://[::1]:{gateway.ports[1]}/echo"
    assert await client(url, "--cafile", str(certs.directory / "ca.pem"), "six") == (0, "six\n", "")


async def test_resolve_points_a_name_at_an_address(gateway: Running, certs: Certs) -> None:
    port = gateway.ports[1]  # the [::1] listener: the name must go there, not to 127.0.0.1
    url = f"wss://localhost:{port}/echo"
    assert await client(url, "--resolve", f"localhost:{port}:[::1]", "--cafile", str(certs.directory / "ca.pem"), "x") == (
        0,
        "x\n",
        "",
    )


async def test_unresolvable_name() -> None:
    status, _, err = await client("wss://no-such-host.invalid/echo", "hello")
    assert status == 1
    assert one_line(err).startswith("cannot resolve 'no-such-host.invalid': ")


async def test_refused_port() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    status, _, err = await client(f"wss://127.0.0.1:{port}/echo", "hello")
    assert status == 1
    assert one_line(err) == f"connection refused by 127.0.0.1:{port} (nothing listens on that port?)"


async def test_tls_alert_name(certs: Certs, tmp_path: Path) -> None:
    async with serve(certs, tmp_path, default=False) as gateway:
        port = gateway.ports[0]
        status, _, err = await client(f"wss://unknown.example:{port}/echo", "--resolve", f"unknown.example:{port}:127.0.0.1", "x")
    assert status == 1
    assert one_line(err) == (
        "TLS alert from the server: unrecognized_name "
        "(the server has no host for the name sent in SNI 'unknown.example')"
    )


async def test_http_refusal_status_line_and_body(gateway: Running, certs: Certs) -> None:
    ca = str(certs.directory / "ca.pem")
    status, _, err = await client(f"wss://localhost:{gateway.ports[0]}/nowhere", "--cafile", ca, "x")
    assert status == 1
    assert one_line(err) == "handshake refused: HTTP/1.1 404 Not Found: Not Found: no route for this path"


async def test_header_carries_origin(gateway: Running, certs: Certs) -> None:
    ca = str(certs.directory / "ca.pem")
    url = f"wss://localhost:{gateway.ports[0]}/origin"
    status, _, err = await client(url, "--cafile", ca, "-H", "Origin: https://evil.example", "x")
    assert status == 1
    assert one_line(err).startswith("handshake refused: HTTP/1.1 403 Forbidden: ")
    assert await client(url, "--cafile", ca, "--header", "Origin: https://ok.example", "x") == (0, "x\n", "")


async def test_verbose_prints_both_heads_and_the_subprotocol(gateway: Running, certs: Certs) -> None:
    ca = str(certs.directory / "ca.pem")
    port = gateway.ports[0]
    status, out, err = await client(
        "-v", f"wss://localhost:{port}/sub?room=1", "--cafile", ca,
        "--subprotocol", "chat.v1", "--subprotocol", "chat.v2", "x",
    )
    assert (status, out) == (0, "x\n"), err
    lines = err.splitlines()
    assert lines[0] == "> GET /sub?room=1 HTTP/1.1"
    assert f"> Host: localhost:{port}" in lines
    assert "> Sec-WebSocket-Protocol: chat.v1, chat.v2" in lines
    assert "< HTTP/1.1 101 Switching Protocols" in lines
    assert "< Sec-WebSocket-Protocol: chat.v2" in lines
    assert "* subprotocol chat.v2" in lines


async def test_plain_ws_to_a_tls_port(gateway: Running) -> None:
    status, _, err = await client(f"ws://localhost:{gateway.ports[0]}/echo", "x")
    assert status == 1
    assert one_line(err) == "handshake refused: HTTP/1.1 400 Bad Request: Bad Request: plain HTTP sent to a TLS port"


async def test_wss_to_a_plain_http_server() -> None:
    async def http_server(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    async with raw_backend(http_server) as port:
        status, _, err = await client(f"wss://127.0.0.1:{port}/echo", "x")
    assert status == 1
    assert one_line(err).startswith("TLS handshake failed: the server did not answer in TLS (")
    assert one_line(err).endswith("a ws:// port? try ws://")


async def test_plain_ws_listener(gateway: Running) -> None:
    assert await client(f"ws://localhost:{gateway.ports[2]}/echo", "plain") == (0, "plain\n", "")


async def test_silent_server_times_out_naming_the_phase() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep(30)

    async with raw_backend(silent) as port:
        with trio.fail_after(30):
            result = await trio.run_process(
                [sys.executable, "-m", "gatewayd.client", "--timeout", "1", f"wss://127.0.0.1:{port}/", "x"],
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 1
    assert one_line(result.stderr.decode()) == (
        "no answer within 1.0s (TLS handshake; a plain ws:// port does not answer a TLS ClientHello)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com:443:127.0.0.1", ("example.com", 443, "127.0.0.1")),
        ("Example.COM:8443:[::1]", ("example.com", 8443, "::1")),
        ("example.com:8443:::1", ("example.com", 8443, "::1")),
        ("[::1]:8443:127.0.0.1", ("::1", 8443, "127.0.0.1")),
    ],
    ids=["v4", "bracketed-v6-addr", "bare-v6-addr", "v6-host"],
)
def test_parse_resolve(text: str, expected: tuple[str, int, str]) -> None:
    assert parse_resolve(text) == expected


@pytest.mark.parametrize("text", ["example.com", "example.com:443", "example.com:x:1.2.3.4", ":443:1.2.3.4", "h:0:1.2.3.4"])
def test_parse_resolve_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected HOST:PORT:ADDR"):
        parse_resolve(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Origin: https://a", ("Origin", "https://a")), ("X-Empty:", ("X-Empty", "")), ("Cookie:  a=b ", ("Cookie", "a=b"))],
)
def test_parse_header(text: str, expected: tuple[str, str]) -> None:
    assert parse_header(text) == expected


@pytest.mark.parametrize("text", ["no colon", ": value", " Name: v"])
def test_parse_header_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_header(text)


@pytest.mark.parametrize(
    ("url", "authority", "resource", "connect"),
    [
        ("wss://example.com/chat", "example.com", "/chat", "example.com"),
        ("wss://example.com:443", "example.com", "/", "example.com"),
        ("ws://example.com:80/a?b=c", "example.com", "/a?b=c", "example.com"),
        ("wss://[::1]:8443/echo", "[::1]:8443", "/echo", "::1"),
        ("wss://pinned.example:8443/x", "pinned.example:8443", "/x", "10.0.0.7"),
    ],
)
def test_make_target(url: str, authority: str, resource: str, connect: str) -> None:
    target: Target = make_target(url, [("pinned.example", 8443, "10.0.0.7"), ("pinned.example", 9, "10.0.0.9")])
    assert (target.authority, target.resource, target.connect_host) == (authority, resource, connect)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/", "not a ws:// or wss:// URL"),
        ("wss://example.com:99999/", "the port is not a number from 1 to 65535"),
        ("wss:///path", "no host name"),
    ],
)
def test_make_target_rejects(url: str, message: str) -> None:
    from gatewayd.client import Failure

    with pytest.raises(Failure, match=message):
        make_target(url, [])
