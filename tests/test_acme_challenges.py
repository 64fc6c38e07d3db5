"""The gateway's answers to ACME validations, without a CA: challenges published in state_dir by hand.

What the issuer would publish (gatewayd.acme.store) is written directly, then
real TLS clients (Python's ssl, TLS 1.2 and 1.3) and plain HTTP clients ask
the running gateway as a CA's validator would. The [acme] directory points at
a closed port, so the manager's own orders fail quietly in the background and
publish nothing.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from cryptography import x509

from gatewayd.acme.challenges import ACME_IDENTIFIER_OID, tls_alpn01_certificate
from gatewayd.acme.store import Store
from gatewayd.config import load
from gatewayd.server import Gateway
from harness import echo_backend, exchange, receive_all
from pebble import free_port

A = "a.example.com"
B = "b.example.com"
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTH = f"{TOKEN}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"

TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
]


@asynccontextmanager
async def acme_gateway(
    tmp_path: Path, prepare: Callable[[Store], None] | None = None
) -> AsyncIterator[tuple[Gateway, int, int, Store]]:
    """Two ACME hosts (a, b) behind a TLS and a plain listener; yields (gateway, tls port, plain port, store).

    Args:
        prepare: called with the store before the gateway starts.
    """
    if prepare is not None:
        store = Store(tmp_path / "state")
        store.prepare()
        prepare(store)
    async with echo_backend() as backend:
        path = tmp_path / "gatewayd.toml"
        path.write_text(
            f"""
[acme]
directory = "https://127.0.0.1:{free_port()}/dir"
state_dir = "state"

[[listener]]
address = "127.0.0.1:0"
[[listener]]
address = "127.0.0.1:0"
tls = false
redirect_https = true

[[host]]
names = ["{A}"]
acme = true
[[host.route]]
path = "/echo"
backend = "ws://127.0.0.1:{backend}/"

[[host]]
names = ["{B}"]
acme = true
[[host.route]]
path = "/echo"
backend = "ws://127.0.0.1:{backend}/"
"""
        )
        gateway = Gateway(load(path))
        assert gateway.acme is not None
        gateway.acme.first_retry = 3600.0  # one failed order at start, then quiet
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            ports = [port for _, (_, port) in gateway.listen_addresses]
            try:
                yield gateway, ports[0], ports[1], Store(tmp_path / "state")
            finally:
                gateway.shutdown()
                nursery.cancel_scope.cancel()


def validator_context(version: ssl.TLSVersion, alpn: list[str]) -> ssl.SSLContext:
    """Like a CA's validator: no chain verification (the certificate is self-signed), the given ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = version
    context.maximum_version = version
    context.set_alpn_protocols(alpn)
    return context


async def handshake(port: int, name: str, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname=name)
    with trio.fail_after(10):
        await stream.do_handshake()
    return stream


def acme_identifier(certificate: x509.Certificate) -> x509.Extension[x509.ExtensionType]:
    return certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_a_pending_challenge_is_served_for_its_name_only(tmp_path: Path, version: ssl.TLSVersion) -> None:
    async with acme_gateway(tmp_path) as (gateway, tls_port, _, store):
        store.publish_tls_alpn01(A, tls_alpn01_certificate(A, KEY_AUTH))

        stream = await handshake(tls_port, A, validator_context(version, ["acme-tls/1"]))
        assert stream.selected_alpn_protocol() == "acme-tls/1"
        der = stream.getpeercert(binary_form=True)
        assert der is not None
        certificate = x509.load_der_x509_certificate(der)
        extension = acme_identifier(certificate)
        # RFC 8737 section 3: critical, the DER OCTET STRING of SHA-256(key authorization).
        assert extension.critical
        assert extension.value.public_bytes() == b"\x04\x20" + hashlib.sha256(KEY_AUTH.encode()).digest()
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [A]
        # Nothing but the handshake: a request sent anyway gets no HTTP answer.
        try:
            await stream.send_all(b"GET /echo HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        except trio.BrokenResourceError:
            pass
        assert not (await receive_all(stream)).startswith(b"HTTP/")
        await stream.aclose()

        # Another name never gets a's challenge: refused with an alert.
        with pytest.raises((ssl.SSLError, trio.BrokenResourceError)) as refused:
            await handshake(tls_port, B, validator_context(version, ["acme-tls/1"]))
        assert "no application protocol" in str(refused.value.__cause__ or refused.value)

        # Without acme-tls/1 the host's own certificate is asked for: none yet, an alert.
        with pytest.raises((ssl.SSLError, trio.BrokenResourceError)) as pending:
            await handshake(tls_port, A, validator_context(version, ["http/1.1"]))
        assert "internal error" in str(pending.value.__cause__ or pending.value)

        # Withdrawn (the order is done): the challenge is no longer served.
        store.remove(store.tls_alpn01_path(A))
        with pytest.raises((ssl.SSLError, trio.BrokenResourceError)):
            await handshake(tls_port, A, validator_context(version, ["acme-tls/1"]))

        metrics = gateway.metrics.render().decode()
        assert 'gatewayd_acme_challenges_answered_total{type="tls-alpn-01"} 1.0' in metrics


async def test_http01_answers_pending_tokens_for_acme_names_only(tmp_path: Path) -> None:
    async with acme_gateway(tmp_path) as (gateway, _, plain_port, store):
        store.publish_http01(TOKEN, KEY_AUTH)

        async def get(path: str, host: str) -> tuple[int, bytes, bytes]:
            stream = await trio.open_tcp_stream("127.0.0.1", plain_port)
            answer = await exchange(stream, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode())
            return answer.status, answer.head, answer.body

        status, head, body = await get(f"/.well-known/acme-challenge/{TOKEN}", f"{A}:80")
        assert (status, body) == (200, KEY_AUTH.encode())
        assert b"Content-Type: application/octet-stream\r\n" in head
        # Answered before redirect_https; anything else gets the listener's usual
        # answer: an unknown or malformed token the redirect, another name 404.
        status, head, _ = await get("/.well-known/acme-challenge/" + "x" * 43, A)
        assert status == 308 and b"Location: https://a.example.com" in head
        assert (await get("/.well-known/acme-challenge/../state/lock", A))[0] == 308
        assert (await get(f"/.well-known/acme-challenge/{TOKEN}", "other.example.com"))[0] == 404
        metrics = gateway.metrics.render().decode()
        assert 'gatewayd_acme_challenges_answered_total{type="http-01"} 1.0' in metrics


async def test_a_broken_state_dir_entry_is_logged_and_the_gateway_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def folder_in_the_way(store: Store) -> None:
        # Where a's certificate file belongs, a folder: unreadable as a file.
        store.certificate_path(A).mkdir(parents=True)

    async with acme_gateway(tmp_path, folder_in_the_way) as (gateway, tls_port, _, store):
        assert gateway.acme is not None
        with trio.fail_after(10):
            # The manager ran its round (the order for a failed: the CA is down).
            while not any("order failed" in r.getMessage() and A in r.getMessage() for r in caplog.records):
                await trio.sleep(0.05)
        with pytest.raises((ssl.SSLError, trio.BrokenResourceError)) as pending:
            await handshake(tls_port, A, validator_context(ssl.TLSVersion.TLSv1_3, ["http/1.1"]))
        assert "internal error" in str(pending.value.__cause__ or pending.value)
        # The other host's validation is still answered.
        store.publish_tls_alpn01(B, tls_alpn01_certificate(B, KEY_AUTH))
        stream = await handshake(tls_port, B, validator_context(ssl.TLSVersion.TLSv1_3, ["acme-tls/1"]))
        assert stream.selected_alpn_protocol() == "acme-tls/1"
        await stream.aclose()
    assert any(f"cannot read {store.certificate_path(A)}" in r.getMessage() for r in caplog.records)


async def test_acme_switched_on_by_a_reload(tmp_path: Path) -> None:
    from harness import make_certs

    certs = make_certs(tmp_path)
    cert, key = certs.issue("plain.example.com")
    async with echo_backend() as backend:
        route = f'[[host.route]]\npath = "/echo"\nbackend = "ws://127.0.0.1:{backend}/"\n'
        before = (
            f'[[listener]]\naddress = "127.0.0.1:0"\n'
            f'[[host]]\nnames = ["plain.example.com"]\ncertificate = "{cert}"\nprivate_key = "{key}"\n{route}'
        )
        path = tmp_path / "gatewayd.toml"
        path.write_text(before)
        gateway = Gateway(load(path))
        assert gateway.acme is None
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            port = gateway.listen_addresses[0][1][1]
            try:
                path.write_text(
                    f'[acme]\ndirectory = "https://127.0.0.1:{free_port()}/dir"\nstate_dir = "state"\n'
                    + before
                    + f'[[host]]\nnames = ["{A}"]\nacme = true\n{route}'
                )
                await gateway.reload(load(path))
                assert gateway.acme is not None
                # Its manager runs: it ordered at once (and failed, the CA is down).
                failed = f'gatewayd_acme_issuance_failures_total{{host="{A}",kind="network"}} 1.0'
                with trio.fail_after(10):
                    while failed not in gateway.metrics.render().decode():
                        await trio.sleep(0.05)
                store = Store(tmp_path / "state")
                store.publish_tls_alpn01(A, tls_alpn01_certificate(A, KEY_AUTH))
                stream = await handshake(port, A, validator_context(ssl.TLSVersion.TLSv1_3, ["acme-tls/1"]))
                assert stream.selected_alpn_protocol() == "acme-tls/1"
                await stream.aclose()
                # The host that was there keeps its own certificate.
                plain = await handshake(port, "plain.example.com", certs.client_context())
                await plain.aclose()
            finally:
                gateway.shutdown()
                nursery.cancel_scope.cancel()
