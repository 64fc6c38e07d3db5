"""Backends end to end: wss:// with real certificates, balancing, passive and
active health, limits and retries (SPEC section 2 route keys, section 3 rows 15-19).

Clients talk to a plain listener (the TLS side of the gateway is covered
elsewhere); backends are real sockets. Each backend here says who it is in an
``X-Backend`` header of its 101, which the gateway relays to the client.
"""

from __future__ import annotations

import logging
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from gatewayd import cli
from gatewayd.config import load
from harness import (
    Running,
    exchange,
    header_value,
    raw_backend,
    read_head,
    receive_all,
    running_gateway,
    switching_protocols,
    upgrade_request,
)

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ backends


@dataclass
class Named:
    """A WebSocket backend that names itself in its 101 (``X-Backend``).

    ``mode``: "ok" answers 101 and holds the connection; "reset" reads the
    request, then closes without a byte (a crash before answering); "partial"
    closes in the middle of its answer; "refuse" answers 403. ``healthy`` decides the answer to ``GET /healthz``.
    """

    name: str
    mode: str = "ok"
    healthy: bool = True
    accepted: int = 0
    upgrades: int = 0
    probes: int = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            head, _ = await read_head(stream)
        except (EOFError, trio.BrokenResourceError):
            return  # a tcp health check, or a client that gave up
        if head.split(b" ")[1] == b"/healthz":
            self.probes += 1
            if not self.healthy:
                await stream.send_all(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
                return
            await stream.send_all(switching_protocols(head))
            await receive_all(stream, 2.0)
            return
        if self.mode == "reset":
            return
        if self.mode == "partial":
            await stream.send_all(b"HTTP/1.1 10")   # then gone, mid-answer
            return
        if self.mode == "refuse":
            await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
            await receive_all(stream, 2.0)
            return
        self.upgrades += 1
        await stream.send_all(switching_protocols(head, f"X-Backend: {self.name}"))
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            return


async def silent(stream: trio.SocketStream) -> None:
    await trio.sleep(30)


async def closed_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@dataclass
class Reply:
    status: int
    backend: str | None
    stream: trio.SocketStream
    head: bytes


@dataclass
class Env:
    gw: Running
    named: dict[str, Named]
    ports: dict[str, int]
    config: Path
    held: list[trio.SocketStream] = field(default_factory=list)

    async def ask(self, path: str, client: str = "127.0.0.1", hold: bool = False) -> Reply:
        stream = await trio.open_tcp_stream("127.0.0.1", self.gw.port, local_address=client)
        await stream.send_all(upgrade_request(path, "localhost"))
        head, _ = await read_head(stream)
        status = int(head.split(b" ")[1])
        reply = Reply(status, header_value(head, "x-backend"), stream, head)
        if hold:
            self.held.append(stream)
        else:
            await stream.aclose()
        return reply

    async def backends_of(self, path: str, n: int, client: str = "127.0.0.1") -> list[str | None]:
        return [(await self.ask(path, client)).backend for _ in range(n)]

    async def wait_active(self, url_part: str, count: int) -> None:
        """Until the gateway counts ``count`` connections to the backend URL containing it."""
        with trio.fail_after(5):
            while True:
                states = [
                    s for s in self.gw.gateway.generation.backends.registry if url_part in s.url
                ]
                if states and states[0].active == count:
                    return
                await trio.sleep(0.01)


CONFIG = """\
[gateway]
backend_connect_timeout = 1.0
{gateway}

[[listener]]
address = "127.0.0.1:0"
tls = false

[[host]]
names = ["localhost"]
{routes}
"""


def route(path: str, *urls: str, **keys: object) -> str:
    lines = ["", "[[host.route]]", f'path = "{path}"']
    lines.append("backends = [" + ", ".join(f'"{u}"' for u in urls) + "]")
    for key, value in keys.items():
        lines.append(f"{key} = " + (f'"{value}"' if isinstance(value, str) else str(value).lower()))
    return "\n".join(lines)


@asynccontextmanager
async def environment(
    tmp_path: Path, names: str, routes: str, gateway: str = ""
) -> AsyncIterator[Env]:
    """Named backends ``names`` (e.g. "abc"), a dead port, a silent one, and a gateway."""
    async with AsyncExitStack() as stack:
        named = {name: Named(name) for name in names}
        ports = {
            name: await stack.enter_async_context(raw_backend(backend.handler))
            for name, backend in named.items()
        }
        ports["dead"] = await closed_port()
        ports["silent"] = await stack.enter_async_context(raw_backend(silent))
        text = CONFIG.format(gateway=gateway, routes=routes.format(**ports))
        path = tmp_path / "gatewayd.toml"
        path.write_text(text)
        gw = await stack.enter_async_context(running_gateway(path))
        env = Env(gw, named, ports, path)
        try:
            yield env
        finally:
            for stream in env.held:
                await stream.aclose()


def urls(*names: str) -> list[str]:
    return [f"ws://127.0.0.1:{{{name}}}" for name in names]


# ------------------------------------------------------------------ balancing modes


async def test_round_robin_is_exact(tmp_path: Path) -> None:
    async with environment(tmp_path, "abc", route("/x", *urls("a", "b", "c"))) as env:
        assert await env.backends_of("/x", 9) == list("abcabcabc")


async def test_least_connections_with_long_lived_connections(tmp_path: Path) -> None:
    routes = route("/x", *urls("a", "b", "c"), balance="least_connections")
    async with environment(tmp_path, "abc", routes) as env:
        first = [await env.ask("/x", hold=True) for _ in range(3)]
        assert [r.backend for r in first] == ["a", "b", "c"]
        # b and c end; a still has its connection.
        for reply in first[1:]:
            await reply.stream.aclose()
        await env.wait_active(f":{env.ports['b']}", 0)
        await env.wait_active(f":{env.ports['c']}", 0)
        second = [(await env.ask("/x", hold=True)).backend for _ in range(2)]
        assert sorted(second) == ["b", "c"]      # round robin would have given a, b
        # Now 1 each: the next three go one to each.
        assert sorted([(await env.ask("/x", hold=True)).backend for _ in range(3)]) == list("abc")


async def test_random_two_spreads_long_lived_connections_evenly(tmp_path: Path) -> None:
    routes = route("/x", *urls("a", "b", "c"), balance="random_two")
    async with environment(tmp_path, "abc", routes) as env:
        counts = Counter([(await env.ask("/x", hold=True)).backend for _ in range(30)])
        assert set(counts) == {"a", "b", "c"}
        assert all(7 <= n <= 13 for n in counts.values()), counts


async def test_source_ip_is_sticky_and_moves_only_the_clients_of_a_failed_backend(
    tmp_path: Path,
) -> None:
    routes = route("/x", *urls("a", "b", "c"), balance="source_ip")
    async with environment(tmp_path, "abc", routes) as env:
        clients = [f"127.0.0.{n}" for n in range(1, 16)]
        chosen = {}
        for client in clients:
            seen = set(await env.backends_of("/x", 3, client))
            assert len(seen) == 1, (client, seen)   # sticky
            chosen[client] = seen.pop()
        assert chosen["127.0.0.1"] is not None and chosen["127.0.0.2"] is not None
        assert len(set(chosen.values())) >= 2
        # The backend with the most clients crashes: only its clients move.
        victim = Counter(chosen.values()).most_common(1)[0][0]
        env.named[str(victim)].mode = "reset"
        for client in clients:
            reply = await env.ask("/x", client)
            assert reply.status == 101               # never an error while others are up
            if chosen[client] != victim:
                assert reply.backend == chosen[client]
            else:
                assert reply.backend != victim


# ------------------------------------------------------------------ failures and retries


async def test_a_dead_backend_is_skipped_and_no_client_sees_an_error(tmp_path: Path) -> None:
    routes = route("/x", *urls("dead", "a", "b"))
    async with environment(tmp_path, "ab", routes) as env:
        replies = [await env.ask("/x") for _ in range(12)]
        assert {r.status for r in replies} == {101}
        assert Counter(r.backend for r in replies) == {"a": 6, "b": 6}


async def test_reset_after_the_request_is_retried_and_max_fails_fail_timeout_hold(
    tmp_path: Path,
) -> None:
    routes = route("/x", *urls("r", "a"), max_fails=2, fail_timeout=0.5)
    async with environment(tmp_path, "ra", routes) as env:
        env.named["r"].mode = "reset"    # reads the request, closes without answering
        assert await env.backends_of("/x", 2) == ["a", "a"]
        assert env.named["r"].accepted == 2          # tried twice: now skipped
        assert await env.backends_of("/x", 4) == ["a"] * 4
        assert env.named["r"].accepted == 2
        await trio.sleep(0.6)                        # fail_timeout over: one more try
        assert await env.backends_of("/x", 3) == ["a"] * 3
        assert env.named["r"].accepted == 3          # failed again: skipped at once
        env.named["r"].mode = "ok"
        await trio.sleep(0.6)
        assert "r" in await env.backends_of("/x", 4)  # back in rotation after a success


async def test_a_silent_backend_times_out_within_its_share_and_another_answers(
    tmp_path: Path,
) -> None:
    async with environment(tmp_path, "a", route("/x", *urls("silent", "a"))) as env:
        start = trio.current_time()
        reply = await env.ask("/x")
        assert (reply.status, reply.backend) == (101, "a")
        assert trio.current_time() - start < 0.9   # half of the 1.0 s budget, then a


async def test_a_backend_that_answered_is_relayed_not_retried(tmp_path: Path) -> None:
    async with environment(tmp_path, "fa", route("/x", *urls("f", "a"))) as env:
        env.named["f"].mode = "refuse"
        reply = await env.ask("/x")
        assert reply.status == 403
        assert env.named["a"].upgrades == 0


async def test_a_backend_cut_off_mid_answer_is_502_not_retried(tmp_path: Path) -> None:
    async with environment(tmp_path, "pa", route("/x", *urls("p", "a"))) as env:
        env.named["p"].mode = "partial"
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        answer = await exchange(stream, upgrade_request("/x", "localhost"))
        assert answer.status == 502
        assert env.named["a"].accepted == 0


async def test_all_down_is_503_with_retry_after(tmp_path: Path) -> None:
    async with environment(tmp_path, "ab", route("/x", *urls("a", "b"), fail_timeout=5)) as env:
        env.named["a"].mode = env.named["b"].mode = "reset"
        first = await env.ask("/x")
        assert first.status == 502               # both tried, both failed
        assert env.named["a"].accepted == env.named["b"].accepted == 1
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        answer = await exchange(stream, upgrade_request("/x", "localhost"))
        assert answer.status == 503
        assert answer.header("retry-after") in {"4", "5"}
        assert answer.header("content-type") == "text/plain; charset=utf-8"
        assert env.named["a"].accepted == env.named["b"].accepted == 1   # not tried


async def test_backend_max_connections_gives_503_then_room_again(tmp_path: Path) -> None:
    routes = route("/x", *urls("a"), backend_max_connections=1)
    async with environment(tmp_path, "a", routes) as env:
        held = await env.ask("/x", hold=True)
        assert held.status == 101
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        answer = await exchange(stream, upgrade_request("/x", "localhost"))
        assert (answer.status, answer.header("retry-after")) == (503, "1")
        await held.stream.aclose()
        await env.wait_active(f":{env.ports['a']}", 0)
        assert (await env.ask("/x")).status == 101


# ------------------------------------------------------------------ active health


async def test_websocket_health_check_marks_down_and_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gatewayd.health")
    routes = route("/x", *urls("a", "b"), health_check="/healthz", health_interval=0.05)
    async with environment(tmp_path, "ab", routes) as env:
        with trio.fail_after(5):
            while env.named["a"].probes < 1 or env.named["b"].probes < 1:
                await trio.sleep(0.01)
        assert sorted(await env.backends_of("/x", 2)) == ["a", "b"]
        env.named["a"].healthy = False
        with trio.fail_after(5):
            while "a" in await env.backends_of("/x", 4):
                await trio.sleep(0.05)
        assert await env.backends_of("/x", 6) == ["b"] * 6
        env.named["a"].healthy = True
        with trio.fail_after(5):
            while "a" not in await env.backends_of("/x", 2):
                await trio.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records if r.name == "gatewayd.health"]
    url = f"ws://127.0.0.1:{env.ports['a']}"
    assert any(
        f"health check GET /healthz of backend {url} failed: answered 503 instead of 101" in m
        for m in messages
    ), messages
    assert any(f"of backend {url} passed" in m for m in messages), messages


async def test_tcp_health_check_of_a_single_backend_gives_503(tmp_path: Path) -> None:
    routes = route("/x", *urls("dead"), health_check="tcp", health_interval=0.05)
    async with environment(tmp_path, "", routes) as env:
        state = env.gw.gateway.generation.backends.registry.state(
            f"ws://127.0.0.1:{env.ports['dead']}"
        )
        with trio.fail_after(5):
            while state.healthy:
                await trio.sleep(0.01)
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        answer = await exchange(stream, upgrade_request("/x", "localhost"))
        assert answer.status == 503 and answer.header("retry-after") == "1"


async def test_reload_keeps_backend_state_and_restarts_health_checks(tmp_path: Path) -> None:
    routes = route("/x", *urls("r", "a"), fail_timeout=30) + route(
        "/h", *urls("b"), health_check="tcp", health_interval=0.05
    )
    async with environment(tmp_path, "rab", routes) as env:
        env.named["r"].mode = "reset"
        assert await env.backends_of("/x", 2) == ["a", "a"]
        assert env.named["r"].accepted == 1          # skipped for 30 s after one failure
        with trio.fail_after(5):
            while env.named["b"].accepted < 2:
                await trio.sleep(0.01)
        text = env.config.read_text().replace("health_interval = 0.05", "health_interval = 0.06")
        result = await env.gw.gateway.reload(load_text(env.config, text))
        assert result.generation == 2
        assert await env.backends_of("/x", 3) == ["a", "a", "a"]
        assert env.named["r"].accepted == 1          # still skipped: the state survived
        before = env.named["b"].accepted
        with trio.fail_after(5):
            while env.named["b"].accepted < before + 2:   # the new generation's checks run
                await trio.sleep(0.01)
        # Dropping the health check stops it.
        await env.gw.gateway.reload(
            load_text(env.config, text.replace('health_check = "tcp"', ""))
        )
        await trio.sleep(0.2)
        stopped = env.named["b"].accepted
        await trio.sleep(0.3)
        assert env.named["b"].accepted == stopped


def load_text(path: Path, text: str):  # type: ignore[no-untyped-def]
    path.write_text(text)
    return load(path)


# ------------------------------------------------------------------ wss:// backends


async def _ws_echo(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        return


@asynccontextmanager
async def wss_backend(cert: trustme.LeafCert, seen_sni: list[str | None]) -> AsyncIterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    def record(_sock: object, name: str | None, _ctx: object) -> None:
        seen_sni.append(name)

    context.sni_callback = record  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, _ws_echo, "127.0.0.1", 0, context)
        try:
            yield server.port
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class WSSEnv:
    gw: Running
    ports: dict[str, int]
    sni: list[str | None]

    async def echo(self, path: str) -> str:
        from trio_websocket import open_websocket_url

        async with open_websocket_url(f"ws://localhost:{self.gw.port}{path}") as ws:
            await ws.send_message("through TLS")
            return str(await ws.get_message())


@asynccontextmanager
async def wss_environment(tmp_path: Path) -> AsyncIterator[WSSEnv]:
    backend_ca = trustme.CA()
    stranger = trustme.CA()
    ca_file = tmp_path / "backend-ca.pem"
    backend_ca.cert_pem.write_to_path(str(ca_file))
    sni: list[str | None] = []
    async with AsyncExitStack() as stack:
        ports = {
            "good": await stack.enter_async_context(
                wss_backend(backend_ca.issue_cert("localhost", "127.0.0.1"), sni)
            ),
            "untrusted": await stack.enter_async_context(
                wss_backend(stranger.issue_cert("localhost"), sni)
            ),
        }
        routes = "\n".join(
            [
                route("/good", f"wss://localhost:{ports['good']}/", backend_ca=str(ca_file)),
                route("/by-ip", f"wss://127.0.0.1:{ports['good']}/", backend_ca=str(ca_file)),
                route(
                    "/untrusted", f"wss://localhost:{ports['untrusted']}/", backend_ca=str(ca_file)
                ),
                route("/system-cas", f"wss://localhost:{ports['good']}/"),
                route(
                    "/insecure", f"wss://localhost:{ports['untrusted']}/", backend_tls_verify=False
                ),
            ]
        )
        path = tmp_path / "gatewayd.toml"
        path.write_text(CONFIG.format(gateway="", routes=routes))
        gw = await stack.enter_async_context(running_gateway(path))
        yield WSSEnv(gw, ports, sni)


async def test_wss_backend_verified_against_backend_ca_with_sni(tmp_path: Path) -> None:
    async with wss_environment(tmp_path) as env:
        assert await env.echo("/good") == "through TLS"
        assert "localhost" in env.sni
        env.sni.clear()
        assert await env.echo("/by-ip") == "through TLS"   # IP SAN; no SNI for an IP
        assert env.sni == [None]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        pytest.param("/untrusted", "unable to get local issuer certificate (checked against "
                     "backend_ca {ca}, for host localhost)", id="other-ca"),
        pytest.param("/system-cas", "unable to get local issuer certificate (checked against "
                     "the system CAs, for host localhost)", id="not-in-system-cas"),
    ],
)
async def test_wss_backend_with_an_untrusted_certificate_is_502_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, path: str, reason: str
) -> None:
    caplog.set_level(logging.WARNING, logger="gatewayd")
    async with wss_environment(tmp_path) as env:
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        answer = await exchange(stream, upgrade_request(path, "localhost"))
        assert answer.status == 502
        assert answer.body == b"Bad Gateway: the service is unavailable\n"   # no internals
        port = env.ports["untrusted" if path == "/untrusted" else "good"]
    lines = [
        r.getMessage() for r in caplog.records if "TLS certificate verification" in r.getMessage()
    ]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    expected = (
        f"backend wss://localhost:{port}/: TLS certificate verification failed: "
        + reason.format(ca=tmp_path / "backend-ca.pem")
    )
    assert lines[0].startswith(expected), lines[0]


async def test_backend_tls_verify_false_works_and_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gatewayd.server")
    async with wss_environment(tmp_path) as env:
        assert await env.echo("/insecure") == "through TLS"
    warnings = [r for r in caplog.records if "backend_tls_verify" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "are NOT verified" in warnings[0].getMessage()


def test_check_prints_the_insecure_backend_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_text(
        CONFIG.format(
            gateway="", routes=route("/x", "wss://b.internal:9443", backend_tls_verify=False)
        )
    )
    assert cli.main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "backend TLS: certificates NOT verified (backend_tls_verify = false)" in out
    assert (
        f"gatewayd: warning: {path}:15: host[0].route[0].backend_tls_verify: set to false: "
        "the TLS certificates of wss://b.internal:9443 are NOT verified"
    ) in err


def test_an_invalid_backend_ca_file_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    path = tmp_path / "gatewayd.toml"
    path.write_text(CONFIG.format(gateway="", routes=route("/x", "wss://b:1", backend_ca="ca.pem")))
    assert cli.main(["check", "-c", str(path)]) == 1
    _, err = capsys.readouterr()
    assert f"{path}: host[0].route[0].backend_ca: cannot load CA certificates from " in err


# ------------------------------------------------------------------ metrics


async def test_metrics_count_every_attempt_503s_and_backend_state(tmp_path: Path) -> None:
    routes = route("/x", *urls("r", "a"), fail_timeout=30) + route(
        "/full", *urls("b"), backend_max_connections=1
    )
    async with environment(tmp_path, "rab", routes) as env:
        env.named["r"].mode = "reset"
        assert (await env.ask("/x")).backend == "a"          # r failed, retried on a
        held = await env.ask("/full", hold=True)
        assert held.status == 101
        stream = await trio.open_tcp_stream("127.0.0.1", env.gw.port)
        assert (await exchange(stream, upgrade_request("/full", "localhost"))).status == 503
        text = env.gw.gateway.metrics.render().decode()
    r, a, b = (f"ws://127.0.0.1:{env.ports[name]}" for name in "rab")
    assert f'gatewayd_backend_connect_errors_total{{backend="{r}",kind="refused"}} 1.0' in text
    assert f'gatewayd_backend_connect_seconds_count{{backend="{a}"}} 1.0' in text
    assert 'gatewayd_backend_unavailable_total{host="localhost",route="/full"} 1.0' in text
    assert f'gatewayd_backend_up{{backend="{r}"}} 0.0' in text      # skipped for fail_timeout
    assert f'gatewayd_backend_up{{backend="{a}"}} 1.0' in text
    assert f'gatewayd_backend_connections{{backend="{b}"}} 1.0' in text
    assert f'gatewayd_backend_connections{{backend="{a}"}} 0.0' in text
