"""gatewayd.tls._openssl: the private pyOpenSSL API gatewayd relies on is there.

The first test is the one that fails when a pyOpenSSL upgrade removes a
private name: its message lists every missing name. The others check that
the check itself can fail, and what each helper returns on real objects.
"""

from __future__ import annotations

from pathlib import Path

import OpenSSL
import pytest
import trustme
from OpenSSL import SSL

from gatewayd.tls import _openssl


def test_every_private_name_gatewayd_uses_exists() -> None:
    gone = _openssl.missing()
    assert gone == [], (
        f"pyOpenSSL {OpenSSL.__version__} lacks private names gatewayd uses: {', '.join(gone)} "
        "(see gatewayd/tls/_openssl.py for what each is for)"
    )


@pytest.mark.parametrize(
    ("table", "entry", "reported"),
    [
        ("_LIB_NAMES", "SSL_no_such_function", "OpenSSL._util.lib.SSL_no_such_function"),
        ("_CONNECTION_ATTRIBUTES", "_no_such_bio", "SSL.Connection._no_such_bio"),
        ("_CONTEXT_ATTRIBUTES", "_no_such_ctx", "SSL.Context._no_such_ctx"),
        ("_CLASS_ATTRIBUTES", (SSL.Connection, "_no_such_mapping"), "Connection._no_such_mapping"),
    ],
    ids=["lib-function", "connection-attribute", "context-attribute", "class-attribute"],
)
def test_a_missing_name_is_reported_by_name(
    monkeypatch: pytest.MonkeyPatch, table: str, entry: object, reported: str
) -> None:
    monkeypatch.setattr(_openssl, table, (*getattr(_openssl, table), entry))
    assert _openssl.missing() == [reported]


def _client() -> SSL.Connection:
    connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    connection.set_connect_state()
    return connection


def test_bio_pending_counts_what_each_memory_bio_holds() -> None:
    client = _client()
    assert _openssl.outgoing_pending(client) == 0
    assert _openssl.incoming_pending(client) == 0
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()  # writes the ClientHello, then wants the answer
    hello_size = _openssl.outgoing_pending(client)
    assert hello_size > 0
    assert len(client.bio_read(65536)) == hello_size
    assert _openssl.outgoing_pending(client) == 0

    client.bio_write(b"\x16\x03\x03\x00")  # part of a record: OpenSSL has not taken it
    assert _openssl.incoming_pending(client) == 4


@pytest.mark.parametrize(
    ("setter", "good", "bad"),
    [
        (_openssl.set_groups_list, b"X25519:prime256v1", b"no-such-group"),
        (_openssl.set_sigalgs_list, b"RSA-PSS+SHA256", b"no-such-sigalg"),
    ],
    ids=["groups", "sigalgs"],
)
def test_list_setters_report_refusal(setter: object, good: bytes, bad: bytes) -> None:
    assert callable(setter)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    assert setter(context, good) is True
    assert setter(context, bad) is False
    _openssl.clear_errors()


def _handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Run a handshake between two memory-BIO connections, in memory."""
    for _ in range(20):
        done = 0
        for one, other in ((client, server), (server, client)):
            try:
                one.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            while _openssl.outgoing_pending(one):
                other.bio_write(one.bio_read(65536))
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize(("trusted", "verified"), [(True, True), (False, False)], ids=["trusted", "untrusted"])
def test_client_verified_reports_the_verification_result(
    tmp_path: Path, trusted: bool, verified: bool
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("example.com")
    server_context = SSL.Context(SSL.TLS_SERVER_METHOD)
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    server_context.use_certificate_chain_file(str(tmp_path / "server.pem"))
    server_context.use_privatekey_file(str(tmp_path / "server.pem"))
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    # VERIFY_NONE: the handshake goes on either way; the result is recorded.
    client_context.set_verify(SSL.VERIFY_NONE)
    if trusted:
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        client_context.load_verify_locations(str(tmp_path / "ca.pem"))
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    _handshake(client, server)
    assert _openssl.client_verified(client) is verified


_PRIVATE_ATTRIBUTES = {"_from_ssl", "_into_ssl", "_ssl", "_reverse_mapping", "_NoOverlappingProtocols"}


def _python_files() -> list[Path]:
    root = Path(__file__).resolve().parent.parent
    return sorted([*(root / "gatewayd").rglob("*.py"), *(root / "tests").rglob("*.py"), *(root / "bench").rglob("*.py")])


def test_only_the_tls_package_imports_openssl_and_only_openssl_py_its_internals() -> None:
    import ast

    root = Path(__file__).resolve().parent.parent
    outside_tls: list[str] = []
    private_uses: list[str] = []
    for path in _python_files():
        relative = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            for module in modules:
                if module.split(".")[0] == "OpenSSL" and relative.startswith("gatewayd/") and not relative.startswith("gatewayd/tls/"):
                    outside_tls.append(f"{relative}:{node.lineno} imports {module}")
                if module.startswith("OpenSSL._") and relative != "gatewayd/tls/_openssl.py":
                    private_uses.append(f"{relative}:{node.lineno} imports {module}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in _PRIVATE_ATTRIBUTES
                and relative not in {"gatewayd/tls/_openssl.py", "tests/test_tls_openssl.py"}
            ):
                private_uses.append(f"{relative}:{node.lineno} uses .{node.attr}")
    assert outside_tls == [], "OpenSSL is imported outside gatewayd/tls/"
    assert private_uses == [], "pyOpenSSL internals are used outside gatewayd/tls/_openssl.py"
