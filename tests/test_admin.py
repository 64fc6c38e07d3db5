"""The admin endpoint, the metrics and ``gatewayd check``'s certificate warnings.

Everything runs over real sockets: a real gateway (tests/harness.py), real
backends, TLS clients, and plain HTTP requests to the admin socket. Metric
values are read back from ``/metrics`` with prometheus-client's own parser and
compared with the traffic each test sent.
"""

from __future__ import annotations

import platform
import signal
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import OpenSSL.SSL
import pytest
import trio
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

import gatewayd
from gatewayd import admin, certinfo, cli, config
from gatewayd.config import Address, AdminSettings, load
from gatewayd.errors import ConfigErrors
from gatewayd.server import Gateway
from harness import (
    Certs,
    Running,
    echo_backend,
    exchange,
    make_certs,
    raw_backend,
    read_head,
    receive_all,
    running_gateway,
    tls_client,
    upgrade_request,
)

REPO = Path(__file__).resolve().parents[1]
#: Bound on each test.
BOUND = 20.0


# ---------------------------------------------------------------------------
# Helpers: configurations, admin requests, metric samples
# ---------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    certs = make_certs(tmp_path / "certs")
    certs.directory.mkdir()
    certs.issue("localhost", "127.0.0.1")
    return certs


def gateway_toml(
    certs: Certs,
    routes: dict[str, str],
    *,
    admin: str | None = "127.0.0.1:0",
    gateway: str = "",
    certificate: str = "localhost",
    names: str = '["localhost", "127.0.0.1"]',
) -> str:
    """One TLS listener on a free port, one host (no default), ``routes`` path -> backend."""
    d = certs.directory
    text = textwrap.dedent(
        f"""\
        [gateway]
        handshake_timeout = 2.0
        backend_connect_timeout = 2.0
        shutdown_timeout = 5.0
        {gateway}

        [[listener]]
        address = "127.0.0.1:0"

        [[host]]
        names = {names}
        certificate = "{d}/{certificate}.pem"
        private_key = "{d}/{certificate}.key"
        """
    )
    for path, backend in routes.items():
        text += f'\n[[host.route]]\npath = "{path}"\nbackend = "{backend}"\n'
    if admin is not None:
        text += f'\n[admin]\nlisten = "{admin}"\n'
    return text


def write(directory: Path, text: str, name: str = "gatewayd.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


@dataclass
class HTTPAnswer:
    status: int
    head: str
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


async def admin_request(
    address: tuple[str, int] | None, path: str = "/healthz", method: str = "GET", raw: bytes | None = None
) -> HTTPAnswer:
    """One request to the admin socket, read to EOF (the endpoint always closes)."""
    assert address is not None, "the admin endpoint is not running"
    stream = await trio.open_tcp_stream(*address)
    try:
        request = raw if raw is not None else f"{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode()
        await stream.send_all(request)
        data = await receive_all(stream)
    finally:
        await stream.aclose()
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete answer: {data!r}"
    text = head.decode("latin-1")
    return HTTPAnswer(int(text.split(" ", 2)[1]), text, body)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample that must exist (a typo in a name or label fails loudly)."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


async def scrape(gateway: Gateway) -> tuple[Samples, str]:
    answer = await admin_request(gateway.admin_address, "/metrics")
    assert answer.status == 200
    assert answer.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    text = answer.body.decode()
    return parse_metrics(text), text


async def wait_for_metrics(
    gateway: Gateway, condition: Callable[[Samples], bool], timeout: float = 5.0
) -> Samples:
    """Scrape until ``condition`` holds (connection tasks finish after the client sees EOF)."""
    with trio.fail_after(timeout):
        while True:
            samples, _ = await scrape(gateway)
            if condition(samples):
                return samples
            await trio.sleep(0.02)


def open_connections(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "gatewayd_connections_open")


def masked_frame(opcode: int, payload: bytes, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def websocket_session(port: int, ctx: ssl.SSLContext, message: bytes) -> tuple[int, int]:
    """Upgrade /echo, send one text message and a close, read to EOF.

    Returns (application bytes sent, application bytes received)."""
    stream = await tls_client(port, ctx, "localhost")
    request = upgrade_request("/echo")
    await stream.send_all(request)
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 "), head
    text = masked_frame(0x1, message)
    await stream.send_all(text)
    echo = bytes([0x81, len(message)]) + message
    data = rest
    while len(data) < len(echo):
        chunk = await stream.receive_some(65536)
        assert chunk, f"EOF before the echo: {data!r}"
        data += chunk
    assert data.startswith(echo), data
    close = masked_frame(0x8, (1000).to_bytes(2, "big"))
    await stream.send_all(close)
    data += await receive_all(stream)
    await stream.aclose()
    return len(request) + len(text) + len(close), len(head) + len(data)


async def closed_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


async def refusing_backend(stream: trio.SocketStream) -> None:
    await read_head(stream)
    await stream.send_all(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nno\n"
    )
    await receive_all(stream, 3.0)


@asynccontextmanager
async def gateway_for(path: Path) -> AsyncIterator[Running]:
    async with running_gateway(path) as running:
        with trio.fail_after(BOUND):
            yield running


# ---------------------------------------------------------------------------
# [admin] in the configuration
# ---------------------------------------------------------------------------

PLAIN = """\
[[listener]]
address = "127.0.0.1:8080"
tls = false

[[host]]
names = ["localhost"]

[[host.route]]
path = "/"
backend = "ws://127.0.0.1:9000"
"""


def load_errors(text: str) -> list[tuple[int | None, str, str, str | None]]:
    with pytest.raises(ConfigErrors) as info:
        config.loads(text, "gatewayd.toml")
    return [(e.line, e.key_path, e.message, e.suggestion) for e in info.value.errors]


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param("", None, id="no-table-is-off"),
        pytest.param("[admin]\n", Address("127.0.0.1", 9901), id="empty-table-default"),
        pytest.param('[admin]\nlisten = "0.0.0.0:9100"\n', Address("0.0.0.0", 9100), id="ipv4"),
        pytest.param('[admin]\nlisten = "[::1]:9901"\n', Address("::1", 9901), id="ipv6"),
        pytest.param('[admin]\nlisten = "localhost:0"\n', Address("localhost", 0), id="name-port-0"),
        pytest.param('admin = { listen = "127.0.0.1:1" }\n', Address("127.0.0.1", 1), id="inline"),
    ],
)
def test_admin_config_valid(table: str, expected: Address | None) -> None:
    # A top-level inline table must come before the first [table] header.
    text = table + PLAIN if table.startswith("admin =") else PLAIN + "\n" + table
    cfg = config.loads(text, "gatewayd.toml")
    if expected is None:
        assert cfg.admin is None
    else:
        assert cfg.admin == AdminSettings(listen=expected)


@pytest.mark.parametrize(
    ("table", "errors"),
    [
        pytest.param(
            '[admin]\nlisten = "127.0.0.1"\n',
            [(13, "admin.listen", "expected 'host:port' or '[ipv6]:port' (e.g. '0.0.0.0:8443'), "
              "got '127.0.0.1': the port is missing", None)],
            id="no-port",
        ),
        pytest.param(
            '[admin]\nlisten = "::1:9901"\n',
            [(13, "admin.listen", "expected 'host:port' or '[ipv6]:port': IPv6 addresses must be "
              "in brackets, as in '[::1]:9000'", None)],
            id="ipv6-without-brackets",
        ),
        pytest.param(
            '[admin]\nlisten = "127.0.0.1:99999"\n',
            [(13, "admin.listen", "port must be between 0 and 65535, got 99999", None)],
            id="port-too-big",
        ),
        pytest.param(
            "[admin]\nlisten = 9901\n",
            [(13, "admin.listen", "expected a string 'host:port', got integer 9901", None)],
            id="not-a-string",
        ),
        pytest.param(
            '[admin]\nlistn = "127.0.0.1:9901"\n',
            [(13, "admin.listn", "unknown key", "listen")],
            id="unknown-key-suggests-listen",
        ),
        pytest.param(
            '[admin]\nlisten = "127.0.0.1:8080"\n',
            [(13, "admin.listen", "duplicate address 127.0.0.1:8080: already used by "
              "listener[0].address (line 2)", None)],
            id="same-as-a-listener",
        ),
        pytest.param(
            '[admim]\nlisten = "127.0.0.1:9901"\n',
            [(12, "admim", "unknown key", "admin")],
            id="misspelt-table-suggests-admin",
        ),
    ],
)
def test_admin_config_errors(table: str, errors: list[tuple[int, str, str, str | None]]) -> None:
    assert load_errors(PLAIN + "\n" + table) == errors


def test_summary_shows_the_admin_endpoint() -> None:
    on = config.summary(config.loads(PLAIN + '\n[admin]\nlisten = "127.0.0.1:9901"\n', "g.toml"))
    off = config.summary(config.loads(PLAIN, "g.toml"))
    assert "admin     http://127.0.0.1:9901  /healthz /readyz /metrics" in on.split("\n")
    assert "admin     off (no [admin] table)" in off.split("\n")


# ---------------------------------------------------------------------------
# The endpoint over a real socket
# ---------------------------------------------------------------------------


async def test_healthz_readyz_metrics_404_405(certs: Certs, tmp_path: Path) -> None:
    async with echo_backend() as echo:
        path = write(tmp_path, gateway_toml(certs, {"/echo": f"ws://127.0.0.1:{echo}"}))
        async with gateway_for(path) as gw:
            address = gw.gateway.admin_address
            assert address is not None and address[0] == "127.0.0.1" and address[1] != 0

            health = await admin_request(address, "/healthz")
            assert (health.status, health.body) == (200, b"ok\n")
            assert health.header("Connection") == "close"
            assert health.header("Content-Length") == "3"
            assert health.header("Content-Type") == "text/plain; charset=utf-8"
            assert (await admin_request(address, "/healthz?verbose=1")).status == 200

            ready = await admin_request(address, "/readyz")
            assert (ready.status, ready.body) == (200, b"ready\n")

            metrics = await admin_request(address, "/metrics")
            assert metrics.status == 200
            assert b"# TYPE gatewayd_config_generation gauge" in metrics.body

            for missing in ("/", "/metric", "/healthz/", "/admin", "/echo"):
                answer = await admin_request(address, missing)
                assert answer.status == 404, missing

            for method in ("POST", "PUT", "DELETE", "HEAD", "OPTIONS"):
                answer = await admin_request(address, "/metrics", method)
                assert answer.status == 405, method
                assert answer.header("Allow") == "GET"
                # An answer to HEAD has no body (RFC 9110 9.3.2).
                assert (answer.body == b"") is (method == "HEAD"), method
            posted = await admin_request(
                address,
                raw=b"POST /readyz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            )
            assert posted.status == 405


async def test_bad_admin_clients_never_disturb_the_gateway(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "TIMEOUT", 0.5)
    monkeypatch.setattr(admin, "MAX_CONNECTIONS", 2)
    ctx = certs.client_context()
    async with echo_backend() as echo:
        path = write(tmp_path, gateway_toml(certs, {"/echo": f"ws://127.0.0.1:{echo}"}))
        async with gateway_for(path) as gw:
            address = gw.gateway.admin_address
            assert address is not None

            garbage = await admin_request(address, raw=b"\x00\x01 not http at all\r\n\r\n")
            assert garbage.status == 400
            huge = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
            assert (await admin_request(address, raw=huge)).status == 431

            # Two silent clients take every admin slot ...
            silent = [await trio.open_tcp_stream(*address) for _ in range(2)]
            await trio.sleep(0.1)
            # ... so a third admin connection is closed at once, unanswered,
            third = await trio.open_tcp_stream(*address)
            assert await receive_all(third, 2.0) == b""
            await third.aclose()
            # while the gateway itself serves WebSocket traffic as usual.
            sent, received = await websocket_session(gw.port, ctx, b"still here")
            assert sent and received
            # The silent ones are closed after TIMEOUT, freeing their slots.
            with trio.fail_after(3):
                for stream in silent:
                    assert await receive_all(stream, 3.0) == b""
                    await stream.aclose()
            assert (await admin_request(address, "/healthz")).status == 200


async def test_readyz_is_503_during_the_shutdown_drain(certs: Certs, tmp_path: Path) -> None:
    ctx = certs.client_context()
    async with echo_backend() as echo:
        path = write(tmp_path, gateway_toml(certs, {"/echo": f"ws://127.0.0.1:{echo}"}))
        gateway = Gateway(load(path))
        assert not gateway.ready
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                address = gateway.admin_address
                assert (await admin_request(address, "/readyz")).status == 200

                # A WebSocket connection keeps the drain going.
                stream = await tls_client(gateway.listen_addresses[0][1][1], ctx, "localhost")
                await stream.send_all(upgrade_request("/echo"))
                head, _ = await read_head(stream)
                assert head.startswith(b"HTTP/1.1 101 ")

                gateway.shutdown()
                await trio.sleep(0.1)
                ready = await admin_request(address, "/readyz")
                assert (ready.status, ready.body) == (503, b"not ready\n")
                assert (await admin_request(address, "/healthz")).status == 200
                samples, _ = await scrape(gateway)
                assert value(samples, "gatewayd_connections_open", host="localhost", route="/echo") == 1

                # The last connection ends: the drain is over, the admin socket closes.
                await stream.send_all(masked_frame(0x8, (1000).to_bytes(2, "big")))
                await receive_all(stream)
                await stream.aclose()
            with pytest.raises(OSError):
                await trio.open_tcp_stream(*address)


# ---------------------------------------------------------------------------
# Metrics against real traffic
# ---------------------------------------------------------------------------


async def test_metrics_count_real_traffic(certs: Certs, tmp_path: Path) -> None:
    not_after = (datetime.now(timezone.utc) + timedelta(days=40)).replace(microsecond=0)
    leaf = certs.ca.issue_cert("localhost", "127.0.0.1", not_after=not_after)
    leaf.cert_chain_pems[0].write_to_path(str(certs.directory / "dated.pem"))
    leaf.private_key_pem.write_to_path(str(certs.directory / "dated.key"))
    ctx = certs.client_context()
    async with AsyncExitStack() as stack:
        echo = await stack.enter_async_context(echo_backend())
        refuse = await stack.enter_async_context(raw_backend(refusing_backend))
        down = await closed_port()
        echo_url, refuse_url, down_url = (
            f"ws://127.0.0.1:{echo}",
            f"ws://127.0.0.1:{refuse}/refuse",
            f"ws://127.0.0.1:{down}",
        )
        path = write(
            tmp_path,
            gateway_toml(
                certs,
                {"/echo": echo_url, "/down": down_url, "/refuse": refuse_url},
                certificate="dated",
            ),
        )
        gw = await stack.enter_async_context(gateway_for(path))
        gateway = gw.gateway

        before, _ = await scrape(gateway)
        assert value(before, "gatewayd_connections_accepted_total") == 0
        assert value(before, "gatewayd_config_generation") == 1
        assert value(before, "gatewayd_last_reload_success") == 1
        for reason in ("unknown_sni", "plain_http", "handshake_error", "timeout"):
            assert value(before, "gatewayd_tls_handshake_failures_total", reason=reason) == 0

        # 3 successful upgrades, each one message each way.
        sent = received = 0
        for number in range(3):
            s, r = await websocket_session(gw.port, ctx, f"message {number}".encode())
            sent, received = sent + s, received + r
        # 2 unknown paths (404), 1 refused backend (502), 1 backend answering 403 (relayed).
        for unknown in ("/nope-1", "/nope-2?token=secret"):
            answer = await exchange(await tls_client(gw.port, ctx, "localhost"), upgrade_request(unknown))
            assert answer.status == 404
        answer = await exchange(await tls_client(gw.port, ctx, "localhost"), upgrade_request("/down"))
        assert answer.status == 502
        answer = await exchange(await tls_client(gw.port, ctx, "localhost"), upgrade_request("/refuse"))
        assert answer.status == 403
        # TLS failures: an SNI naming no host (and no default), plain HTTP on the TLS port.
        with pytest.raises(trio.BrokenResourceError):
            await tls_client(gw.port, ctx, "nobody.test")
        plain = await exchange(await trio.open_tcp_stream("127.0.0.1", gw.port), upgrade_request())
        assert plain.status == 400

        samples = await wait_for_metrics(
            gateway,
            lambda m: open_connections(m) == 0
            and value(m, "gatewayd_connections_accepted_total") == 9,
        )
        _, text = await scrape(gateway)

    by_route: dict[tuple[str, str, str], float] = {
        (dict(labels)["host"], dict(labels)["route"], dict(labels)["code"]): v
        for (name, labels), v in samples.items()
        if name == "gatewayd_handshake_responses_total"
    }
    # Routed answers carry their route (a refusal after routing too: /refuse's relayed 403);
    # the unknown path and the plain-HTTP 400 share the one unrouted label set.
    assert by_route == {
        ("localhost", "/echo", "101"): 3,
        ("", "", "404"): 2,
        ("localhost", "/down", "502"): 1,
        ("localhost", "/refuse", "403"): 1,
        ("", "", "400"): 1,
    }
    assert value(samples, "gatewayd_connections_total", host="localhost", route="/echo") == 3
    assert value(samples, "gatewayd_connections_total", host="localhost", route="/down") == 1
    assert value(samples, "gatewayd_connections_total", host="localhost", route="/refuse") == 1
    assert value(samples, "gatewayd_connections_open", host="localhost", route="/echo") == 0
    assert value(samples, "gatewayd_connections_open", host="", route="") == 0
    assert value(samples, "gatewayd_connections_over_limit_total") == 0

    echo_in = value(samples, "gatewayd_bytes_received_total", host="localhost", route="/echo")
    echo_out = value(samples, "gatewayd_bytes_sent_total", host="localhost", route="/echo")
    assert echo_in >= sent
    assert echo_out >= received
    # Unrouted connections (404s, the plain-HTTP one) are counted too, under host="".
    assert value(samples, "gatewayd_bytes_sent_total", host="", route="") > 0

    assert value(samples, "gatewayd_backend_connect_errors_total", backend=down_url, kind="refused") == 1
    assert (
        value(samples, "gatewayd_backend_connect_errors_total", backend=refuse_url, kind="refused_upgrade")
        == 1
    )
    assert value(samples, "gatewayd_backend_connect_seconds_count", backend=echo_url) == 3
    assert 0 < value(samples, "gatewayd_backend_connect_seconds_sum", backend=echo_url) < 6
    assert value(samples, "gatewayd_backend_connect_seconds_bucket", backend=echo_url, le="+Inf") == 3

    assert value(samples, "gatewayd_tls_handshake_failures_total", reason="unknown_sni") == 1
    assert value(samples, "gatewayd_tls_handshake_failures_total", reason="plain_http") == 1
    assert value(samples, "gatewayd_tls_handshake_failures_total", reason="handshake_error") == 0
    assert value(samples, "gatewayd_tls_handshake_failures_total", reason="timeout") == 0

    expiry = value(samples, "gatewayd_certificate_expiry_timestamp_seconds", host="localhost")
    assert expiry == not_after.timestamp()

    # Labels stay low-cardinality: no client address, no unconfigured path, no query.
    label_names = {
        name
        for (metric, labels) in samples
        if metric.startswith("gatewayd_") and metric != "gatewayd_build_info"
        for name, _ in labels
    }
    assert label_names <= {"host", "route", "code", "backend", "kind", "reason", "result", "le"}
    routes = {dict(labels).get("route") for (_, labels) in samples} - {None}
    assert routes == {"", "/echo", "/down", "/refuse"}
    assert "nope" not in text and "secret" not in text and "nobody.test" not in text


async def test_process_platform_and_build_info(certs: Certs, tmp_path: Path) -> None:
    """What every Prometheus dashboard starts with: this process's memory, fds, CPU; which build."""
    async with echo_backend() as echo:
        path = write(tmp_path, gateway_toml(certs, {"/echo": f"ws://127.0.0.1:{echo}"}))
        async with gateway_for(path) as gw:
            samples, _ = await scrape(gw.gateway)
    resident = value(samples, "process_resident_memory_bytes")
    assert 10 * 2**20 < resident < 2 * 2**30
    assert value(samples, "process_open_fds") >= 3  # stdio, the listener, the admin socket...
    assert value(samples, "process_max_fds") >= value(samples, "process_open_fds")
    assert value(samples, "process_cpu_seconds_total") > 0
    assert time.time() - 86400 < value(samples, "process_start_time_seconds") <= time.time()
    info = sys.version_info
    assert value(
        samples, "python_info", implementation=platform.python_implementation(),
        major=str(info.major), minor=str(info.minor), patchlevel=str(info.micro), version=platform.python_version(),
    ) == 1
    openssl = " ".join(OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode().split()[:2])
    assert openssl.startswith("OpenSSL ")
    assert value(
        samples, "gatewayd_build_info", version=gatewayd.__version__, python=platform.python_version(), openssl=openssl
    ) == 1


async def test_tls_timeout_handshake_error_and_over_limit(certs: Certs, tmp_path: Path) -> None:
    ctx = certs.client_context()
    async with echo_backend() as echo:
        text = gateway_toml(certs, {"/echo": f"ws://127.0.0.1:{echo}"}, gateway="max_connections = 2")
        path = write(tmp_path, text.replace("handshake_timeout = 2.0", "handshake_timeout = 0.5"))
        async with gateway_for(path) as gw:
            # Silent TCP client: the TLS handshake times out.
            silent = await trio.open_tcp_stream("127.0.0.1", gw.port)
            assert await receive_all(silent, 3.0) == b""
            await silent.aclose()
            # A TLS record header followed by garbage: OpenSSL fails the handshake.
            broken = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await broken.send_all(b"\x16\x03\x01\x00\x08garbage!")
            await receive_all(broken, 3.0)
            await broken.aclose()
            samples = await wait_for_metrics(gw.gateway, lambda m: open_connections(m) == 0)
            assert value(samples, "gatewayd_tls_handshake_failures_total", reason="timeout") == 1
            assert value(samples, "gatewayd_tls_handshake_failures_total", reason="handshake_error") == 1

            # max_connections = 2: two open WebSockets, the third TCP connection is closed at once.
            held = []
            for _ in range(2):
                stream = await tls_client(gw.port, ctx, "localhost")
                await stream.send_all(upgrade_request("/echo"))
                await read_head(stream)
                held.append(stream)
            samples, _ = await scrape(gw.gateway)
            assert value(samples, "gatewayd_connections_open", host="localhost", route="/echo") == 2
            extra = await trio.open_tcp_stream("127.0.0.1", gw.port)
            assert await receive_all(extra, 3.0) == b""
            samples, _ = await scrape(gw.gateway)
            assert value(samples, "gatewayd_connections_over_limit_total") == 1
            for stream in held:
                await stream.aclose()
            await wait_for_metrics(gw.gateway, lambda m: open_connections(m) == 0)


# ---------------------------------------------------------------------------
# Reloads: metrics, certificate expiry, the admin socket
# ---------------------------------------------------------------------------


def issue_dated(certs: Certs, stem: str, days: float, *names: str) -> datetime:
    not_after = (datetime.now(timezone.utc) + timedelta(days=days)).replace(microsecond=0)
    leaf = certs.ca.issue_cert(*names, not_after=not_after)
    leaf.cert_chain_pems[0].write_to_path(str(certs.directory / f"{stem}.pem"))
    leaf.private_key_pem.write_to_path(str(certs.directory / f"{stem}.key"))
    return not_after


async def test_reload_metrics_generation_success_and_certificate_expiry(
    certs: Certs, tmp_path: Path
) -> None:
    first = issue_dated(certs, "first", 30, "localhost", "127.0.0.1")
    second = issue_dated(certs, "second", 60, "localhost", "127.0.0.1")
    async with echo_backend() as echo:
        routes = {"/echo": f"ws://127.0.0.1:{echo}"}
        path = write(tmp_path, gateway_toml(certs, routes, certificate="first"))
        async with gateway_for(path) as gw:
            gateway = gw.gateway
            samples, _ = await scrape(gateway)
            started = value(samples, "gatewayd_last_reload_success_timestamp_seconds")
            assert abs(started - time.time()) < 30
            assert value(samples, "gatewayd_config_reloads_total", result="success") == 0
            assert value(samples, "gatewayd_config_reloads_total", result="failure") == 0
            assert value(
                samples, "gatewayd_certificate_expiry_timestamp_seconds", host="localhost"
            ) == first.timestamp()

            # A good file through the SIGHUP path: new generation, new certificate.
            path.write_text(gateway_toml(certs, routes, certificate="second"))
            await trio.sleep(0.01)
            assert await cli.reload_from_file(gateway, str(path)) is True
            samples, _ = await scrape(gateway)
            assert value(samples, "gatewayd_config_generation") == 2
            assert value(samples, "gatewayd_config_reloads_total", result="success") == 1
            assert value(samples, "gatewayd_last_reload_success") == 1
            assert value(samples, "gatewayd_last_reload_success_timestamp_seconds") >= started
            assert value(
                samples, "gatewayd_certificate_expiry_timestamp_seconds", host="localhost"
            ) == second.timestamp()

            # A broken file: counted as a failure, nothing else changes.
            path.write_text("[gateway\n")
            assert await cli.reload_from_file(gateway, str(path)) is False
            samples, _ = await scrape(gateway)
            assert value(samples, "gatewayd_config_reloads_total", result="failure") == 1
            assert value(samples, "gatewayd_last_reload_success") == 0
            assert value(samples, "gatewayd_config_generation") == 2

            # Gateway.reload itself counts a refused configuration (key not matching).
            bad = gateway_toml(certs, routes, certificate="second").replace(
                f"{certs.directory}/second.key", f"{certs.directory}/first.key"
            )
            with pytest.raises(ConfigErrors):
                await gateway.reload(load(write(tmp_path, bad, "bad.toml")))
            samples, _ = await scrape(gateway)
            assert value(samples, "gatewayd_config_reloads_total", result="failure") == 2

            # A host renamed: its old expiry series disappears, the new one appears.
            renamed = gateway_toml(
                certs, routes, certificate="first", names='["127.0.0.1", "localhost"]'
            )
            await gateway.reload(load(write(tmp_path, renamed, "renamed.toml")))
            samples, _ = await scrape(gateway)
            assert value(samples, "gatewayd_last_reload_success") == 1
            assert value(samples, "gatewayd_config_generation") == 3
            expiry = {
                dict(labels)["host"]: v
                for (name, labels), v in samples.items()
                if name == "gatewayd_certificate_expiry_timestamp_seconds"
            }
            assert expiry == {"127.0.0.1": first.timestamp()}


async def test_admin_socket_kept_moved_closed_and_reopened_by_reloads(
    certs: Certs, tmp_path: Path
) -> None:
    async with echo_backend() as echo:
        routes = {"/echo": f"ws://127.0.0.1:{echo}"}
        path = write(tmp_path, gateway_toml(certs, routes, admin="127.0.0.1:0"))
        async with gateway_for(path) as gw:
            gateway = gw.gateway
            first = gateway.admin_address
            assert first is not None

            # Same [admin] listen: the same socket (port 0 is not re-chosen).
            result = await gateway.reload(load(path))
            assert gateway.admin_address == first
            assert not any("[admin]" in change for change in result.changes)

            # A taken address: the reload fails and the old endpoint keeps serving.
            taken = trio.socket.socket()
            await taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            busy = f"127.0.0.1:{taken.getsockname()[1]}"
            with pytest.raises(OSError, match="cannot listen on " + busy):
                await gateway.reload(load(write(tmp_path, gateway_toml(certs, routes, admin=busy), "b.toml")))
            taken.close()
            assert gateway.admin_address == first
            assert gateway.generation.number == 2
            assert (await admin_request(first, "/healthz")).status == 200

            # A new address: bound anew, the old one closed.
            moved = write(tmp_path, gateway_toml(certs, routes, admin="127.0.0.2:0"), "m.toml")
            result = await gateway.reload(load(moved))
            assert "[admin] listen: 127.0.0.1:0 -> 127.0.0.2:0" in result.changes
            second = gateway.admin_address
            assert second is not None and second[0] == "127.0.0.2"
            assert (await admin_request(second, "/readyz")).status == 200
            await wait_until_refused(first)

            # No [admin] table: closed.
            result = await gateway.reload(load(write(tmp_path, gateway_toml(certs, routes, admin=None), "n.toml")))
            assert "[admin] listen: 127.0.0.2:0 -> off" in result.changes
            assert gateway.admin_address is None
            await wait_until_refused(second)

            # Back again.
            await gateway.reload(load(path))
            third = gateway.admin_address
            samples, _ = await scrape(gateway)
            assert value(samples, "gatewayd_config_generation") == 5
            assert value(samples, "gatewayd_config_reloads_total", result="success") == 4
            assert value(samples, "gatewayd_config_reloads_total", result="failure") == 1
            assert third is not None


async def wait_until_refused(address: tuple[str, int]) -> None:
    with trio.fail_after(3):
        while True:
            try:
                stream = await trio.open_tcp_stream(*address)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.02)


def test_two_gateways_in_one_process_have_their_own_registries(certs: Certs, tmp_path: Path) -> None:
    path = write(tmp_path, gateway_toml(certs, {"/echo": "ws://127.0.0.1:9"}))
    one, two = Gateway(load(path)), Gateway(load(path))
    one.metrics.answered(101)
    assert b'gatewayd_handshake_responses_total{code="101",host="",route=""} 1.0' in one.metrics.render()
    assert b"gatewayd_handshake_responses_total{" not in two.metrics.render()


def test_admin_responses_table() -> None:
    def metrics() -> bytes:
        return b"m 1\n"

    cases = [
        ("GET", "/healthz", True, 200, b"ok\n"),
        ("GET", "/healthz", False, 200, b"ok\n"),
        ("GET", "/readyz", True, 200, b"ready\n"),
        ("GET", "/readyz", False, 503, b"not ready\n"),
        ("GET", "/metrics?x=1", True, 200, b"m 1\n"),
        ("GET", "/nope", True, 404, None),
        ("POST", "/nope", True, 404, None),
        ("POST", "/healthz", True, 405, None),
        ("HEAD", "/metrics", True, 405, None),
    ]
    for method, target, ready, status, body in cases:
        response = admin.respond(method, target, ready=ready, metrics=metrics)
        assert response.status == status, (method, target)
        if body is not None:
            assert response.body == body
    rendered = admin.respond("POST", "/readyz", ready=True, metrics=metrics).render()
    assert rendered.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: GET\r\n" in rendered and b"\r\nConnection: close\r\n" in rendered


# ---------------------------------------------------------------------------
# `gatewayd run` starts the endpoint; `gatewayd check` warns about certificates
# ---------------------------------------------------------------------------


async def test_run_serves_the_admin_endpoint_until_sigterm(certs: Certs, tmp_path: Path) -> None:
    path = write(tmp_path, gateway_toml(certs, {"/echo": "ws://127.0.0.1:9"}))
    err = tmp_path / "stderr"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    with err.open("wb") as err_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gatewayd", "run", "-c", str(path)],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file,
        )
    try:
        with trio.fail_after(15):
            while "admin endpoint on http://" not in err.read_text():
                assert process.poll() is None, err.read_text()
                await trio.sleep(0.05)
        line = next(entry for entry in err.read_text().splitlines() if "admin endpoint on http://" in entry)
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert (await admin_request(("127.0.0.1", port), "/healthz")).status == 200
        with trio.fail_after(5):
            while (await admin_request(("127.0.0.1", port), "/readyz")).status != 200:
                await trio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            while process.poll() is None:
                await trio.sleep(0.05)
        assert process.returncode == 0, err.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=5)


def run_check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    code = cli.main(["check", "-c", str(path)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_check_warns_about_soon_expiring_and_uncovered_certificates(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = issue_dated(certs, "soon", 3, "chat.example.com")
    issue_dated(certs, "narrow", 365, "a.example.org", "*.example.net")
    d = certs.directory
    path = write(
        tmp_path,
        textwrap.dedent(
            f"""\
            [[listener]]
            address = "127.0.0.1:0"

            [[host]]
            names = ["chat.example.com"]
            certificate = "{d}/soon.pem"
            private_key = "{d}/soon.key"

            [[host.route]]
            path = "/"
            backend = "ws://127.0.0.1:9"

            [[host]]
            names = ["a.example.org", "b.example.org", "x.example.net", "*.example.net", "*.example.org"]
            certificate = "{d}/narrow.pem"
            private_key = "{d}/narrow.key"

            [[host.route]]
            path = "/"
            backend = "ws://127.0.0.1:9"
            """
        ),
    )
    code, out, err = run_check(path, capsys)
    assert code == 0
    assert out[-1] == f"gatewayd: configuration file {path} test is successful"
    assert err == [
        f"gatewayd: warning: host[0] (chat.example.com): certificate {d}/soon.pem expires in "
        f"3 days, on {soon.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        "gatewayd: warning: host[1] (a.example.org, b.example.org, x.example.net, *.example.net, "
        f"*.example.org): certificate {d}/narrow.pem does not cover b.example.org, *.example.org "
        "(it is for a.example.org, *.example.net)",
    ]


def test_check_prints_no_warning_for_good_certificates(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, gateway_toml(certs, {"/echo": "ws://127.0.0.1:9"}))
    code, out, err = run_check(path, capsys)
    assert (code, err) == (0, [])
    assert "admin     http://127.0.0.1:0  /healthz /readyz /metrics" in out


def test_check_warns_about_an_expired_certificate(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expired = issue_dated(certs, "old", -2, "localhost", "127.0.0.1")
    path = write(tmp_path, gateway_toml(certs, {"/echo": "ws://127.0.0.1:9"}, certificate="old"))
    code, _, err = run_check(path, capsys)
    assert code == 0
    assert err == [
        f"gatewayd: warning: host[0] (localhost, 127.0.0.1): certificate {certs.directory}/old.pem "
        f"expired on {expired.strftime('%Y-%m-%d %H:%M:%S')} UTC"
    ]


# RFC 6125 section 6.4: one case per rule.
COVERAGE = [
    ("exact", ["chat.example.com"], "chat.example.com", True),
    ("case-and-trailing-dot", ["Chat.Example.COM."], "chat.example.com", True),
    ("wildcard-one-label", ["*.example.com"], "chat.example.com", True),
    ("wildcard-not-two-labels", ["*.example.com"], "a.b.example.com", False),
    ("wildcard-not-the-apex", ["*.example.com"], "example.com", False),
    ("partial-wildcard-refused", ["c*.example.com"], "chat.example.com", False),
    ("wildcard-not-left-most", ["chat.*.com"], "chat.example.com", False),
    ("other-name", ["a.example.com"], "b.example.com", False),
    ("wildcard-host-needs-same-wildcard", ["*.example.com"], "*.example.com", True),
    ("wildcard-host-not-covered-by-one-name", ["a.example.com"], "*.example.com", False),
    ("ip-san", ["127.0.0.1"], "127.0.0.1", True),
    ("ip-not-dns", ["localhost"], "127.0.0.1", False),
    ("ipv6-san", ["::1"], "::1", True),
]


@pytest.mark.parametrize(("identities", "name", "covered"), [c[1:] for c in COVERAGE], ids=[c[0] for c in COVERAGE])
def test_certificate_name_coverage(certs: Certs, identities: list[str], name: str, covered: bool) -> None:
    if any("*" in identity and not identity.startswith("*.") for identity in identities):
        # trustme (rightly) refuses to issue these: describe the SAN directly.
        now = datetime.now(timezone.utc)
        info = certinfo.CertificateInfo(
            Path("x.pem"), now, now, dns_names=tuple(identities), has_san=True
        )
    else:
        leaf = certs.ca.issue_cert(*identities)
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        info = certinfo.describe(cert, Path("x.pem"))
    assert certinfo.covers(info, name) is covered


def test_common_name_is_used_only_without_subject_alt_name() -> None:
    now = datetime.now(timezone.utc)
    with_san = certinfo.CertificateInfo(
        Path("a.pem"), now, now, dns_names=("a.example",), common_names=("b.example",), has_san=True
    )
    without_san = certinfo.CertificateInfo(Path("b.pem"), now, now, common_names=("b.example",))
    assert not certinfo.covers(with_san, "b.example")
    assert certinfo.covers(without_san, "b.example")
    assert without_san.identities == ["CN=b.example"]


async def test_silent_admin_clients_are_dropped_after_the_head_timeout(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "HEAD_TIMEOUT", 0.3)
    async with echo_backend() as echo:
        path = write(tmp_path, gateway_toml(certs, {"/echo": f"ws://127.0.0.1:{echo}"}))
        async with gateway_for(path) as gw:
            address = gw.gateway.admin_address
            assert address is not None
            silent = await trio.open_tcp_stream(*address)
            start = trio.current_time()
            assert await receive_all(silent, 3.0) == b""
            assert trio.current_time() - start < 2.0  # HEAD_TIMEOUT, not the 10 s TIMEOUT
            await silent.aclose()
            assert (await admin_request(address, "/healthz")).status == 200
