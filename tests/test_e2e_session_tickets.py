"""TLS session resumption as Mozilla's intermediate profile says (issue #13 finding 4).

By default no stateless session ticket: a TLS 1.2 client gets none (no
NewSessionTicket; it resumes by session ID from the server's cache), a TLS 1.3
client gets a stateful ticket (a short name for a session in the server's
cache, not the session encrypted under a long-lived key), and both resume.
With ``[tls] session_tickets = true`` clients get real tickets, whose key is
replaced by a rotation and by a reload.

Two real clients: the standard library's ``ssl`` (``SSLSession.has_ticket``,
``session_reused``) and ``openssl s_client`` (the ticket's bytes, via
``openssl sess_id -text``: its length, and the key name OpenSSL puts in its
first 16 bytes).
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from harness import Certs, Running, make_certs, running_gateway

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
REQUEST = b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost", "127.0.0.1")
    return certs


def config_text(certs: Certs, tls: str = "") -> str:
    return textwrap.dedent(
        f"""
        [tls]
        {tls}

        [[listener]]
        address = "127.0.0.1:0"

        [[host]]
        names = ["localhost"]
        certificate = "{certs.directory}/localhost.pem"
        private_key = "{certs.directory}/localhost.key"

        [[host.route]]
        path = "/echo"
        backend = "ws://127.0.0.1:9/"
        """
    )


@asynccontextmanager
async def gateway(certs: Certs, tmp_path: Path, tls: str = "") -> AsyncIterator[Running]:
    path = tmp_path / "gatewayd.toml"
    path.write_text(config_text(certs, tls))
    async with running_gateway(path) as gw:
        yield gw


@dataclass
class Outcome:
    session: ssl.SSLSession
    reused: bool


def stdlib_connect(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> Outcome:
    """One request (answered 404, then closed); the session as it stands after the answer.

    The answer matters: the gateway sends TLS 1.3 tickets with its first write.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(REQUEST)
            while tls.recv(65536):
                pass
            assert tls.session is not None
            return Outcome(tls.session, tls.session_reused)


async def stdlib_twice(port: int, certs: Certs, version: str) -> tuple[Outcome, Outcome]:
    pinned = VERSIONS[version]
    context = certs.client_context(minimum=pinned, maximum=pinned)
    first = await trio.to_thread.run_sync(stdlib_connect, port, context)
    second = await trio.to_thread.run_sync(stdlib_connect, port, context, first.session)
    return first, second


def openssl_ticket(port: int, version: str, directory: Path) -> bytes:
    """The session ticket ``openssl s_client`` was given (b"" for none)."""
    assert shutil.which("openssl"), "openssl is in tests/system-packages.txt"
    flag = {"TLSv1.2": "-tls1_2", "TLSv1.3": "-tls1_3"}[version]
    session = directory / f"session-{version}.pem"
    subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         flag, "-ign_eof", "-sess_out", str(session)],
        input=REQUEST, capture_output=True, timeout=20, check=False,
    )
    text = subprocess.run(
        ["openssl", "sess_id", "-in", str(session), "-noout", "-text"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout
    assert f"Protocol  : {version}" in text, text
    dump = text.partition("TLS session ticket:\n")[2]
    ticket = bytearray()
    for line in dump.splitlines():
        match = re.match(r"\s+[0-9a-f]{4} - ((?:[0-9a-f]{2}[ -]){1,16})", line)
        if match is None:
            break
        ticket += bytes.fromhex(match.group(1).replace("-", " "))
    return bytes(ticket)


async def openssl_ticket_async(port: int, version: str, directory: Path) -> bytes:
    return await trio.to_thread.run_sync(openssl_ticket, port, version, directory)


# ------------------------------------------------------------------ the default


async def test_tls12_client_gets_no_ticket_and_resumes_by_session_id(
    certs: Certs, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with gateway(certs, tmp_path) as gw:
            first, second = await stdlib_twice(gw.port, certs, "TLSv1.2")
            assert not first.session.has_ticket   # no NewSessionTicket at all
            assert first.session.id                # a session ID in our cache
            assert second.reused and second.session.id == first.session.id
            assert await openssl_ticket_async(gw.port, "TLSv1.2", tmp_path) == b""


async def test_tls13_client_gets_a_stateful_ticket_and_resumes(
    certs: Certs, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with gateway(certs, tmp_path) as gw:
            first, second = await stdlib_twice(gw.port, certs, "TLSv1.3")
            assert first.session.has_ticket and second.reused
            # A stateless ticket carries the encrypted session (key name, IV,
            # the session, a MAC: about 200 bytes); a stateful one only names
            # the session in our cache.
            ticket = await openssl_ticket_async(gw.port, "TLSv1.3", tmp_path)
            assert 0 < len(ticket) <= 64, ticket.hex()


# ------------------------------------------------------------------ tickets turned on

ON = "session_tickets = true"


@pytest.mark.parametrize("version", list(VERSIONS))
async def test_turned_on_clients_get_stateless_tickets_and_resume(
    certs: Certs, tmp_path: Path, version: str
) -> None:
    with trio.fail_after(60):
        async with gateway(certs, tmp_path, ON) as gw:
            first, second = await stdlib_twice(gw.port, certs, version)
            assert first.session.has_ticket and second.reused
            assert first.session.ticket_lifetime_hint == 3600   # the key's lifetime
            ticket = await openssl_ticket_async(gw.port, version, tmp_path)
            assert len(ticket) > 100, ticket.hex()   # the session itself, encrypted


async def test_turned_on_the_ticket_key_is_rotated_on_schedule(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gatewayd.server

    monkeypatch.setattr(gatewayd.server, "TICKET_KEY_ROTATION", 0.5)
    with trio.fail_after(60):
        async with gateway(certs, tmp_path, ON) as gw:
            context = certs.client_context(maximum=ssl.TLSVersion.TLSv1_2)
            old = await trio.to_thread.run_sync(stdlib_connect, gw.port, context)
            # OpenSSL's stateless tickets start with the name of their key.
            name = (await openssl_ticket_async(gw.port, "TLSv1.2", tmp_path))[:16]
            with trio.fail_after(20):
                while (await openssl_ticket_async(gw.port, "TLSv1.2", tmp_path))[:16] == name:
                    await trio.sleep(0.1)
            later = await trio.to_thread.run_sync(stdlib_connect, gw.port, context, old.session)
            assert not later.reused   # the old key is gone: a full handshake


async def test_turned_on_a_reload_replaces_the_ticket_key(certs: Certs, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with gateway(certs, tmp_path, ON) as gw:
            context = certs.client_context(maximum=ssl.TLSVersion.TLSv1_2)
            old = await trio.to_thread.run_sync(stdlib_connect, gw.port, context)
            name = (await openssl_ticket_async(gw.port, "TLSv1.2", tmp_path))[:16]
            await gw.gateway.reload(gw.gateway.config)
            assert (await openssl_ticket_async(gw.port, "TLSv1.2", tmp_path))[:16] != name
            later = await trio.to_thread.run_sync(stdlib_connect, gw.port, context, old.session)
            assert not later.reused


def test_session_tickets_is_a_tls_key_not_a_host_key(certs: Certs, tmp_path: Path) -> None:
    from gatewayd.config import loads
    from gatewayd.errors import ConfigErrors

    text = config_text(certs).replace(
        'default = false', ''
    ).replace('private_key = "', 'session_tickets = true\nprivate_key = "', 1)
    with pytest.raises(ConfigErrors, match=r"host\[0\]\.session_tickets: unknown key"):
        loads(text, str(tmp_path / "gatewayd.toml"))
    assert loads(config_text(certs, ON), str(tmp_path / "gatewayd.toml")).tls.session_tickets
