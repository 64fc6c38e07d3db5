"""gatewayd.acme.client against the real Pebble CA, with an HTTP-01 responder that reads the store.

The gateway's own answering (TLS-ALPN-01 on its TLS listeners, HTTP-01 on its
plain listeners) is tested end to end in test_acme_e2e.py; here the issuer
alone: account registration and reuse, order, validation, finalization,
storage, and the failures it reports with the CA's problem document.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509

from gatewayd.acme.challenges import http01_token
from gatewayd.acme.client import HTTP_01, TLS_ALPN_01, Account, IssueFailed, Issuer, Request
from gatewayd.acme.store import Store
from pebble import free_port, pebble_ca


@contextmanager
def http01_responder(store: Store, port: int) -> Iterator[list[str]]:
    """A plain HTTP server answering pending tokens from ``store``; yields the paths asked."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            asked.append(self.path)
            token = http01_token(self.path)
            answer = store.http01_answer(token) if token else None
            self.send_response(200 if answer is not None else 404)
            body = answer or b"not found"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield asked
    finally:
        server.shutdown()
        server.server_close()


def test_http01_issuance_stores_a_pebble_certificate(tmp_path: Path) -> None:
    http_port = free_port()
    with pebble_ca(tmp_path / "pebble", tls_port=free_port(), http_port=http_port) as pebble:
        store = Store(tmp_path / "state")
        store.prepare()
        issuer = Issuer(store, Account(pebble.directory, "ops@example.com", pebble.ca_bundle))
        with http01_responder(store, http_port) as asked:
            stored = issuer.issue(Request("chat.example.com", ("chat.example.com", "www.example.com"), (HTTP_01,)))
        assert any(path.startswith("/.well-known/acme-challenge/") for path in asked)
        san = stored.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(san.get_values_for_type(x509.DNSName)) == ["chat.example.com", "www.example.com"]
        assert store.load_certificate("chat.example.com") == stored
        # Challenge answers are withdrawn once the order is done.
        assert list((store.root / "challenges" / "http-01").iterdir()) == []
        # The account is kept: a second issuer (a restart) registers nothing new.
        account_files = sorted(p.name for p in store.account_dir(pebble.directory).iterdir())
        assert account_files == ["account.json", "key.pem"]
        uri = store.read_json(store.account_dir(pebble.directory) / "account.json")
        again = Issuer(store, Account(pebble.directory, "ops@example.com", pebble.ca_bundle))
        with http01_responder(store, http_port):
            again.issue(Request("chat.example.com", ("chat.example.com",), (HTTP_01,)))
        assert store.read_json(store.account_dir(pebble.directory) / "account.json") == uri


def test_failed_validation_carries_the_problem_document(tmp_path: Path) -> None:
    # Nothing answers on the HTTP-01 port: Pebble's VA fails to connect.
    with pebble_ca(tmp_path / "pebble", tls_port=free_port(), http_port=free_port()) as pebble:
        store = Store(tmp_path / "state")
        issuer = Issuer(store, Account(pebble.directory, "", pebble.ca_bundle))
        with pytest.raises(IssueFailed) as caught:
            issuer.issue(Request("down.example.com", ("down.example.com",), (HTTP_01,)))
    assert caught.value.kind == "validation"
    assert caught.value.problem is not None
    assert caught.value.problem["type"].startswith("urn:ietf:params:acme:error:")
    assert "the CA said" in str(caught.value)
    assert store.load_certificate("down.example.com") is None


def test_refused_identifier_carries_the_problem_document(tmp_path: Path) -> None:
    with pebble_ca(tmp_path / "pebble", tls_port=free_port(), blocklist=["blocked.example.com"]) as pebble:
        issuer = Issuer(Store(tmp_path / "state"), Account(pebble.directory, "", pebble.ca_bundle))
        with pytest.raises(IssueFailed) as caught:
            issuer.issue(Request("blocked.example.com", ("blocked.example.com",), (TLS_ALPN_01,)))
    assert caught.value.kind == "ca_error"
    assert caught.value.problem is not None
    assert caught.value.problem["type"] == "urn:ietf:params:acme:error:rejectedIdentifier"


def test_unreachable_ca_is_a_network_failure(tmp_path: Path) -> None:
    port = free_port()
    issuer = Issuer(Store(tmp_path / "state"), Account(f"https://127.0.0.1:{port}/dir", "", None))
    with pytest.raises(IssueFailed) as caught:
        issuer.issue(Request("a.example.com", ("a.example.com",), (TLS_ALPN_01,)))
    assert caught.value.kind == "network"
    assert caught.value.problem is None
    assert "cannot reach the CA" in str(caught.value)
