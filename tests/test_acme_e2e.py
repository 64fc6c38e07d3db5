"""ACME end to end: the gateway gets its certificate from a real Pebble CA and serves it.

Pebble validates for real (tests/pebble.py): its VA connects to the
gateway's own TLS listener for TLS-ALPN-01, or to its plain listener for
HTTP-01. Clients are real TLS clients (Python's ssl) verifying the served
chain against Pebble's root; the backend is a real WebSocket echo server.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio_websocket
from cryptography import x509

from gatewayd.config import load
from gatewayd.server import Gateway
from harness import echo_backend
from pebble import Pebble, free_port, pebble_ca

NAME = "chat.example.com"
#: Generous bound for issuance on a loaded machine (Pebble itself takes ~1 s).
ISSUE_SECONDS = 30.0


def write_config(
    path: Path,
    *,
    pebble: Pebble | None,
    directory: str | None = None,
    tls_port: int,
    backend_port: int,
    names: tuple[str, ...] = (NAME,),
    plain_port: int | None = None,
    challenges: tuple[str, ...] = ("tls-alpn-01", "http-01"),
    extra_hosts: str = "",
    renew_before: float = 30,
) -> Path:
    directory = directory or (pebble.directory if pebble else "https://127.0.0.1:1/dir")
    ca_bundle = f'ca_bundle = "{pebble.ca_bundle}"' if pebble else ""
    plain = (
        f'[[listener]]\naddress = "127.0.0.1:{plain_port}"\ntls = false\n' if plain_port else ""
    )
    names_toml = ", ".join(f'"{n}"' for n in names)
    challenge_toml = ", ".join(f'"{c}"' for c in challenges)
    path.write_text(
        f"""
[acme]
directory = "{directory}"
email = "ops@example.com"
state_dir = "state"
{ca_bundle}
renew_before = {renew_before}
challenges = [{challenge_toml}]

[[listener]]
address = "127.0.0.1:{tls_port}"
{plain}
[[host]]
names = [{names_toml}]
acme = true
[[host.route]]
path = "/echo"
backend = "ws://127.0.0.1:{backend_port}/"
{extra_hosts}
"""
    )
    return path


def client_context(pebble: Pebble) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pebble.root_pem().decode())
    return context


async def served_certificate(port: int, name: str, context: ssl.SSLContext) -> x509.Certificate:
    """Handshake as a verifying client; the leaf the gateway served."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname=name)
    try:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)
    finally:
        await stream.aclose()


async def wait_for_certificate(port: int, name: str, pebble: Pebble, *, not_serial: int | None = None) -> x509.Certificate:
    """Poll with verifying handshakes until a Pebble certificate (another one than ``not_serial``) is served."""
    context = client_context(pebble)
    with trio.fail_after(ISSUE_SECONDS):
        while True:
            try:
                certificate = await served_certificate(port, name, context)
            except (ssl.SSLError, trio.BrokenResourceError, OSError):
                certificate = None
            if certificate is not None and certificate.serial_number != not_serial:
                return certificate
            await trio.sleep(0.2)


@asynccontextmanager
async def websocket(port: int, name: str, context: ssl.SSLContext) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A WebSocket to the gateway's /echo route over TLS with SNI ``name``."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname=name)
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, name, "/echo")
        try:
            yield ws
        finally:
            with trio.move_on_after(5):
                await ws.aclose()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def gateway_from(path: Path) -> AsyncIterator[Gateway]:
    gateway = Gateway(load(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        try:
            yield gateway
        finally:
            # A clean stop (listeners closed), so the next gateway can bind the port.
            gateway.shutdown()
            nursery.cancel_scope.deadline = trio.current_time() + 10


async def test_first_issuance_over_tls_alpn_01_serves_a_pebble_chain(tmp_path: Path) -> None:
    tls_port = free_port()
    with pebble_ca(tmp_path / "pebble", tls_port=tls_port) as pebble:
        async with echo_backend() as backend_port:
            config = write_config(tmp_path / "gatewayd.toml", pebble=pebble, tls_port=tls_port, backend_port=backend_port)
            async with gateway_from(config) as gateway:
                certificate = await wait_for_certificate(tls_port, NAME, pebble)
                san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                assert san.get_values_for_type(x509.DNSName) == [NAME]
                # The WebSocket route works over the issued certificate.
                async with websocket(tls_port, NAME, client_context(pebble)) as ws:
                    await ws.send_message("hello")
                    assert await ws.get_message() == "hello"
                metrics = gateway.metrics.render().decode()
                assert f'gatewayd_acme_issuance_attempts_total{{host="{NAME}"}} 1.0' in metrics
                assert 'gatewayd_acme_challenges_answered_total{type="tls-alpn-01"}' in metrics
                assert f'gatewayd_certificate_expiry_timestamp_seconds{{host="{NAME}"}}' in metrics
    assert "set VALID by completed challenge" in pebble.logs()


def metric(gateway: Gateway, line_start: str) -> float | None:
    for line in gateway.metrics.render().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_restart_reissues_nothing(tmp_path: Path) -> None:
    tls_port = free_port()
    with pebble_ca(tmp_path / "pebble", tls_port=tls_port) as pebble:
        async with echo_backend() as backend_port:
            config = write_config(tmp_path / "gatewayd.toml", pebble=pebble, tls_port=tls_port, backend_port=backend_port)
            async with gateway_from(config):
                first = await wait_for_certificate(tls_port, NAME, pebble)
            # A new process on the same state_dir: the stored certificate is served at once.
            async with gateway_from(config) as gateway:
                again = await served_certificate(tls_port, NAME, client_context(pebble))
                await trio.sleep(1.0)  # a round of the manager has run meanwhile
                assert metric(gateway, f'gatewayd_acme_issuance_attempts_total{{host="{NAME}"}}') is None
        logs = pebble.logs()
    assert again.serial_number == first.serial_number
    assert "There are now 1 orders in the db" in logs
    assert "There are now 2 orders" not in logs
    assert "There are now 2 accounts" not in logs


async def test_renewal_swaps_the_certificate_under_a_live_websocket(tmp_path: Path) -> None:
    tls_port = free_port()
    # 15-second certificates: renewed with a third of the lifetime left (about 10 s in).
    with pebble_ca(tmp_path / "pebble", tls_port=tls_port, validity_seconds=15) as pebble:
        async with echo_backend() as backend_port:
            config = write_config(tmp_path / "gatewayd.toml", pebble=pebble, tls_port=tls_port, backend_port=backend_port)
            async with gateway_from(config) as gateway:
                gateway.acme.poll_seconds = 0.5  # type: ignore[union-attr]
                first = await wait_for_certificate(tls_port, NAME, pebble)
                async with websocket(tls_port, NAME, client_context(pebble)) as ws:
                    with trio.fail_after(ISSUE_SECONDS):
                        renewed = None
                        count = 0
                        while renewed is None:
                            count += 1
                            await ws.send_message(f"before {count}")
                            assert await ws.get_message() == f"before {count}"
                            certificate = await served_certificate(tls_port, NAME, client_context(pebble))
                            if certificate.serial_number != first.serial_number:
                                renewed = certificate
                            else:
                                await trio.sleep(0.3)
                    # The connection opened under the old certificate still echoes.
                    for n in range(3):
                        await ws.send_message(f"after {n}")
                        assert await ws.get_message() == f"after {n}"
                assert renewed.not_valid_after_utc > first.not_valid_after_utc
                assert metric(gateway, f'gatewayd_acme_issuance_attempts_total{{host="{NAME}"}}') == 2.0


async def test_ca_down_keeps_the_old_certificate_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls_port = free_port()
    with pebble_ca(tmp_path / "pebble", tls_port=tls_port) as pebble:
        context = client_context(pebble)
        async with echo_backend() as backend_port:
            config = write_config(tmp_path / "gatewayd.toml", pebble=pebble, tls_port=tls_port, backend_port=backend_port)
            async with gateway_from(config):
                first = await wait_for_certificate(tls_port, NAME, pebble)
            pebble.stop()
            # A name added: the stored certificate no longer covers the host, so
            # the manager orders at once, and the CA is down.
            write_config(
                config, pebble=pebble, tls_port=tls_port, backend_port=backend_port,
                names=(NAME, "www.example.com"),
            )
            caplog.set_level(logging.INFO, logger="gatewayd.acme")
            async with gateway_from(config) as gateway:
                assert gateway.acme is not None
                gateway.acme.first_retry = 0.5
                with trio.fail_after(ISSUE_SECONDS):
                    while (metric(gateway, f'gatewayd_acme_issuance_failures_total{{host="{NAME}",kind="network"}}') or 0) < 2:
                        await trio.sleep(0.1)
                # The old certificate is still what clients get.
                served = await served_certificate(tls_port, NAME, context)
                assert served.serial_number == first.serial_number
    failures = [r.getMessage() for r in caplog.records if "order failed" in r.getMessage()]
    assert "(1 in a row)" in failures[0] and "cannot reach the CA" in failures[0]
    assert "next attempt in 0.5s" in failures[0]
    assert "(2 in a row)" in failures[1] and "next attempt in 1s" in failures[1]
    assert "the current certificate (valid until" in failures[0]
    status = (tmp_path / "state" / "certificates" / f"{NAME}.json").read_text()
    assert '"failures": 2' in status


async def test_a_refused_name_is_logged_with_the_ca_problem_document(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls_port = free_port()
    caplog.set_level(logging.INFO, logger="gatewayd.acme")
    with pebble_ca(tmp_path / "pebble", tls_port=tls_port, blocklist=["blocked.example.com"]) as pebble:
        async with echo_backend() as backend_port:
            extra = f"""
[[host]]
names = ["blocked.example.com"]
acme = true
[[host.route]]
path = "/echo"
backend = "ws://127.0.0.1:{backend_port}/"
"""
            config = write_config(
                tmp_path / "gatewayd.toml", pebble=pebble, tls_port=tls_port,
                backend_port=backend_port, extra_hosts=extra,
            )
            async with gateway_from(config) as gateway:
                # The other host is issued all the same.
                await wait_for_certificate(tls_port, NAME, pebble)
                with trio.fail_after(ISSUE_SECONDS):
                    while not metric(gateway, 'gatewayd_acme_issuance_failures_total{host="blocked.example.com",kind="ca_error"}'):
                        await trio.sleep(0.1)
    failure = next(r.getMessage() for r in caplog.records if "blocked.example.com: order failed" in r.getMessage())
    assert "urn:ietf:params:acme:error:rejectedIdentifier" in failure
    assert "no certificate to serve meanwhile" in failure


async def test_http01_on_a_plain_listener(tmp_path: Path) -> None:
    tls_port, plain_port = free_port(), free_port()
    with pebble_ca(tmp_path / "pebble", tls_port=tls_port, http_port=plain_port) as pebble:
        async with echo_backend() as backend_port:
            config = write_config(
                tmp_path / "gatewayd.toml", pebble=pebble, tls_port=tls_port,
                backend_port=backend_port, plain_port=plain_port, challenges=("http-01",),
            )
            async with gateway_from(config) as gateway:
                certificate = await wait_for_certificate(tls_port, NAME, pebble)
                metrics = gateway.metrics.render().decode()
    assert certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [NAME]
    assert 'gatewayd_acme_challenges_answered_total{type="http-01"}' in metrics
    assert 'gatewayd_acme_challenges_answered_total{type="tls-alpn-01"}' not in metrics
    assert "set VALID by completed challenge" in pebble.logs()


async def test_with_two_workers_one_process_talks_to_the_ca(tmp_path: Path) -> None:
    # The real daemon: a supervisor and two worker processes on one listener.
    from test_service import running
    from test_workers import SERVING, only, worker_pids

    tls_port = free_port()
    with pebble_ca(tmp_path / "pebble", tls_port=tls_port) as pebble:
        async with echo_backend() as backend_port:
            write_config(tmp_path / "gatewayd.toml", pebble=pebble, tls_port=tls_port, backend_port=backend_port)
            text = "[gateway]\nworkers = 2\n" + (tmp_path / "gatewayd.toml").read_text()
            async with running(tmp_path, text) as service:
                try:
                    await service.wait_log(SERVING)
                    first = await wait_for_certificate(tls_port, NAME, pebble)
                    # Each worker serves it: the follower picked it up from state_dir.
                    for index in worker_pids(service):
                        with only(service, index):
                            served = await wait_for_certificate(tls_port, NAME, pebble)
                            assert served.serial_number == first.serial_number
                    log = service.log
                finally:
                    for pid in worker_pids(service).values():
                        try:
                            os.kill(pid, signal.SIGCONT)
                        except ProcessLookupError:
                            pass
        pebble_log = pebble.logs()
    assert log.count("this process talks to the CA") == 1
    assert log.count("ordering a certificate") == 1
    assert "There are now 1 orders in the db" in pebble_log
    assert "There are now 2 orders" not in pebble_log
    assert "There are now 2 accounts" not in pebble_log


async def test_when_the_process_talking_to_the_ca_dies_another_takes_over(tmp_path: Path) -> None:
    import re

    from test_service import running
    from test_workers import SERVING, worker_pids

    leader_line = r"gatewayd\.acme\[worker (\d+)\]: acme: this process talks to the CA"
    tls_port = free_port()
    with pebble_ca(tmp_path / "pebble", tls_port=tls_port) as pebble:
        async with echo_backend() as backend_port:
            write_config(tmp_path / "gatewayd.toml", pebble=pebble, tls_port=tls_port, backend_port=backend_port)
            text = "[gateway]\nworkers = 2\n" + (tmp_path / "gatewayd.toml").read_text()
            async with running(tmp_path, text) as service:
                await service.wait_log(SERVING)
                first = await wait_for_certificate(tls_port, NAME, pebble)
                (match,) = await service.wait_log(leader_line)
                leader = int(match.group(1))
                os.kill(worker_pids(service)[leader], signal.SIGKILL)
                # The kernel freed the lock: a worker takes it within a round.
                await service.wait_log(leader_line, count=2, timeout=30)
                # Nothing is ordered again, and the certificate is still served.
                again = await wait_for_certificate(tls_port, NAME, pebble)
                log = service.log
        pebble_log = pebble.logs()
    assert again.serial_number == first.serial_number
    assert len(re.findall(leader_line, log)) == 2
    assert log.count("ordering a certificate") == 1
    assert "There are now 2 orders" not in pebble_log
