"""The pure parts of ACME support, table by table: schedule, ClientHello ALPN, challenges, config, store."""

from __future__ import annotations

import datetime
import hashlib
import struct
from pathlib import Path

import pytest
from cryptography import x509

from gatewayd.acme import schedule
from gatewayd.acme.challenges import (
    ACME_IDENTIFIER_OID,
    http01_request,
    http01_token,
    tls_alpn01_certificate,
)
from gatewayd.acme.manager import HostStatus, acme_warnings, host_reports
from gatewayd.acme.store import Store, parse_certificate_file
from gatewayd.clienthello import ClientHelloReader, offered_alpn
from gatewayd.config import load, loads
from gatewayd.errors import ConfigErrors

UTC = datetime.timezone.utc
T0 = datetime.datetime(2027, 1, 1, tzinfo=UTC)
DAY = datetime.timedelta(days=1)

# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("lifetime", "renew_before", "covers", "suggested", "expected"),
    [
        pytest.param(90 * DAY, 30 * DAY, True, None, T0 + 60 * DAY, id="90-day-cert-30-days-before"),
        pytest.param(90 * DAY, 10 * DAY, True, None, T0 + 80 * DAY, id="renew-before-shorter"),
        pytest.param(6 * DAY, 30 * DAY, True, None, T0 + 4 * DAY, id="short-lived-third-left"),
        pytest.param(
            datetime.timedelta(seconds=15), 30 * DAY, True, None, T0 + datetime.timedelta(seconds=10), id="pebble-15s"
        ),
        pytest.param(90 * DAY, 30 * DAY, False, None, T0, id="names-changed-renew-now"),
        pytest.param(90 * DAY, 30 * DAY, True, T0 + 70 * DAY, T0 + 70 * DAY, id="ari-suggestion-wins"),
        pytest.param(90 * DAY, 30 * DAY, True, T0 + 100 * DAY, T0 + 90 * DAY, id="ari-never-after-expiry"),
    ],
)
def test_renewal_time(
    lifetime: datetime.timedelta,
    renew_before: datetime.timedelta,
    covers: bool,
    suggested: datetime.datetime | None,
    expected: datetime.datetime,
) -> None:
    validity = schedule.Validity(T0, T0 + lifetime, covers)
    assert schedule.renewal_time(validity, renew_before, suggested) == expected


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(0, 0.0), (1, 60.0), (2, 120.0), (3, 240.0), (9, 15360.0), (10, 6 * 3600.0), (500, 6 * 3600.0)],
)
def test_retry_delay_doubles_up_to_six_hours(failures: int, seconds: float) -> None:
    assert schedule.retry_delay(failures) == seconds


@pytest.mark.parametrize(
    ("has_certificate", "failures", "last_failure", "expected"),
    [
        pytest.param(False, 0, None, T0, id="no-certificate-now"),
        pytest.param(False, 1, T0, T0 + datetime.timedelta(seconds=60), id="no-certificate-after-backoff"),
        pytest.param(True, 0, None, T0 + 60 * DAY, id="renewal-time"),
        pytest.param(True, 3, T0 + 60 * DAY, T0 + 60 * DAY + datetime.timedelta(seconds=240), id="renewal-after-backoff"),
    ],
)
def test_next_attempt(
    has_certificate: bool, failures: int, last_failure: datetime.datetime | None, expected: datetime.datetime
) -> None:
    validity = schedule.Validity(T0, T0 + 90 * DAY) if has_certificate else None
    assert schedule.next_attempt(T0, validity, 30 * DAY, failures=failures, last_failure=last_failure) == expected


def test_host_status_round_trips_and_tolerates_junk() -> None:
    status = HostStatus(failures=2, last_failure=T0, last_error="boom", next_attempt=T0 + DAY)
    again = HostStatus.from_json(status.to_json())
    assert (again.failures, again.last_failure, again.last_error, again.next_attempt) == (2, T0, "boom", T0 + DAY)
    assert HostStatus.from_json({"failures": -3, "last_failure": "yesterday"}) == HostStatus()
    assert HostStatus.from_json(None) == HostStatus()


# ---------------------------------------------------------------- the ClientHello's ALPN offer


def extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">HH", kind, len(data)) + data


def alpn_extension(*names: bytes) -> bytes:
    body = b"".join(bytes([len(n)]) + n for n in names)
    return extension(16, struct.pack(">H", len(body)) + body)


def hello_body(*extensions: bytes, session_id: bytes = b"", with_extensions: bool = True) -> bytes:
    body = b"\x03\x03" + bytes(32) + bytes([len(session_id)]) + session_id
    body += b"\x00\x02\x13\x01" + b"\x01\x00"
    if with_extensions:
        joined = b"".join(extensions)
        body += struct.pack(">H", len(joined)) + joined
    return body


def records(body: bytes, *, split: int | None = None) -> list[bytes]:
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    pieces = [message] if split is None else [message[:split], message[split:]]
    return [b"\x16\x03\x01" + struct.pack(">H", len(p)) + p for p in pieces]


SNI = extension(0, b"\x00\x0e\x00\x00\x0ba.example.com")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(hello_body(SNI, alpn_extension(b"acme-tls/1")), (b"acme-tls/1",), id="acme-only"),
        pytest.param(hello_body(alpn_extension(b"h2", b"http/1.1"), SNI), (b"h2", b"http/1.1"), id="browser"),
        pytest.param(hello_body(SNI), (), id="no-alpn"),
        pytest.param(hello_body(with_extensions=False), (), id="no-extensions"),
        pytest.param(hello_body(SNI, session_id=bytes(32)), (), id="session-id"),
        pytest.param(hello_body(extension(16, b"\x00\x05\x03abc")), None, id="alpn-list-length-wrong"),
        pytest.param(hello_body(extension(16, b"\x00\x01\x00")), None, id="empty-protocol-name"),
        pytest.param(hello_body(SNI)[:-3], None, id="truncated"),
        pytest.param(b"\x03\x03", None, id="nothing"),
    ],
)
def test_offered_alpn(body: bytes, expected: tuple[bytes, ...] | None) -> None:
    assert offered_alpn(body) == expected


@pytest.mark.parametrize("split", [None, 5, 40, 60])
def test_reader_joins_a_hello_split_over_records(split: int | None) -> None:
    reader = ClientHelloReader()
    body = hello_body(SNI, alpn_extension(b"acme-tls/1"))
    chunks = records(body, split=split)
    for number, record in enumerate(chunks):
        assert not reader.done
        reader.feed(record)
        assert reader.done == (number == len(chunks) - 1)
    assert reader.alpn == (b"acme-tls/1",)


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(b"\x17\x03\x03\x00\x05hello", id="not-handshake"),
        pytest.param(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", id="not-client-hello"),
        pytest.param(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", id="too-large"),
    ],
)
def test_reader_gives_up_on_what_is_not_a_hello(record: bytes) -> None:
    reader = ClientHelloReader()
    reader.feed(record)
    assert reader.done and reader.alpn is None


# ---------------------------------------------------------------- challenge answers

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
NAMES = frozenset({"a.example.com", "www.a.example.com"})


@pytest.mark.parametrize(
    ("method", "path", "host", "expected"),
    [
        pytest.param("GET", f"/.well-known/acme-challenge/{TOKEN}", "a.example.com", TOKEN, id="plain"),
        pytest.param("GET", f"/.well-known/acme-challenge/{TOKEN}", "A.Example.COM:80", TOKEN, id="case-and-port"),
        pytest.param("GET", f"/.well-known/acme-challenge/{TOKEN}", "a.example.com.", TOKEN, id="trailing-dot"),
        pytest.param("GET", f"/.well-known/acme-challenge/{TOKEN}?x=1", "a.example.com", TOKEN, id="query-ignored"),
        pytest.param("POST", f"/.well-known/acme-challenge/{TOKEN}", "a.example.com", None, id="post"),
        pytest.param("GET", f"/.well-known/acme-challenge/{TOKEN}", "b.example.com", None, id="other-name"),
        pytest.param("GET", f"/.well-known/acme-challenge/{TOKEN}", None, None, id="no-host"),
        pytest.param("GET", f"/.well-known/acme-challenge/{TOKEN}", "[::1]:80", None, id="ip-literal"),
        pytest.param("GET", "/.well-known/acme-challenge/../../etc/passwd", "a.example.com", None, id="traversal"),
        pytest.param("GET", "/.well-known/acme-challenge/short", "a.example.com", None, id="too-short"),
        pytest.param("GET", f"/.well-known/acme-challenge/{TOKEN}/x", "a.example.com", None, id="sub-path"),
        pytest.param("GET", f"/other/{TOKEN}", "a.example.com", None, id="other-path"),
    ],
)
def test_http01_request(method: str, path: str, host: str | None, expected: str | None) -> None:
    assert http01_request(method, path, host, NAMES) == expected


def test_http01_token_is_a_safe_file_name() -> None:
    assert http01_token("/.well-known/acme-challenge/" + "A" * 300) is None
    assert http01_token("/.well-known/acme-challenge/" + "a.b" * 10) is None


def test_tls_alpn01_certificate_follows_rfc_8737() -> None:
    pem = tls_alpn01_certificate("a.example.com", "tok.thumb", now=T0)
    certificate = x509.load_pem_x509_certificate(pem)
    extension = certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert extension.critical
    assert extension.value.public_bytes() == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["a.example.com"]
    assert b"-----BEGIN PRIVATE KEY-----" in pem


# ---------------------------------------------------------------- configuration

BASE = """
[acme]
{acme}
[[listener]]
address = "127.0.0.1:8443"
{listeners}
[[host]]
names = [{names}]
{host}
[[host.route]]
path = "/"
backend = "ws://127.0.0.1:9000/"
"""


def acme_config(
    tmp_path: Path,
    *,
    acme: str = 'state_dir = "state"',
    listeners: str = "",
    names: str = '"a.example.com"',
    host: str = "acme = true",
    with_acme_table: bool = True,
) -> str:
    text = BASE.format(acme=acme, listeners=listeners, names=names, host=host)
    if not with_acme_table:
        text = text.replace("[acme]\n", "", 1).replace(acme, "", 1)
    return text


@pytest.mark.parametrize(
    ("kwargs", "where", "message"),
    [
        pytest.param({"names": '"*.example.com"'}, "host[0].names[0]", "wildcard needs the DNS-01", id="wildcard"),
        pytest.param({"names": '"192.0.2.1"'}, "host[0].names[0]", "not IP addresses", id="ip-name"),
        pytest.param(
            {"host": 'acme = true\ncertificate = "c.pem"\nprivate_key = "k.pem"'},
            "host[0].certificate", "remove certificate", id="acme-beside-certificate",
        ),
        pytest.param({"with_acme_table": False}, "host[0].acme", "needs an [acme] table", id="no-acme-table"),
        pytest.param({"acme": 'directory = "http://ca.example/dir"'}, "acme.directory", "https://", id="http-directory"),
        pytest.param({"acme": 'email = "not an address"'}, "acme.email", "e-mail address", id="bad-email"),
        pytest.param({"acme": "renew_before = 0"}, "acme.renew_before", "greater than 0", id="renew-before-zero"),
        pytest.param({"acme": 'challenges = ["dns-01"]'}, "acme.challenges[0]", "unknown challenge type 'dns-01'", id="dns-01"),
        pytest.param({"acme": "challenges = []"}, "acme.challenges", "at least one challenge type", id="no-challenges"),
        pytest.param(
            {"acme": 'challenges = ["http-01", "http-01"]', "listeners": '[[listener]]\naddress = "127.0.0.1:8080"\ntls = false'},
            "acme.challenges[1]", "listed twice", id="repeated",
        ),
        pytest.param({"acme": 'challenges = ["http-01"]'}, "acme.challenges", "no listener can answer", id="http-01-without-plain"),
        pytest.param({"acme": 'stat_dir = "x"'}, "acme.stat_dir", "state_dir", id="unknown-key-suggests"),
        pytest.param({"acme": 'state_dir = "/proc/1/acme"'}, "acme.state_dir", "not writable", id="state-dir-not-writable"),
    ],
)
def test_config_errors(tmp_path: Path, kwargs: dict[str, object], where: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as caught:
        loads(acme_config(tmp_path, **kwargs), tmp_path / "gatewayd.toml")  # type: ignore[arg-type]
    text = str(caught.value)
    assert where in text and message in text, text


def test_config_defaults_and_paths(tmp_path: Path) -> None:
    config = loads(acme_config(tmp_path), tmp_path / "gatewayd.toml")
    assert config.acme is not None
    assert config.acme.state_dir == tmp_path / "state"
    assert config.acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert config.acme.challenges == ("tls-alpn-01", "http-01")
    assert config.acme.renew_before == 30.0
    assert [host.names for host in config.acme_hosts] == [("a.example.com",)]
    # No [acme]: no ACME hosts, whatever the hosts say (they need certificates then).
    path = tmp_path / "plain.toml"
    path.write_text('[[listener]]\naddress = "127.0.0.1:0"\ntls = false\n[[host]]\nnames = ["x"]\n[[host.route]]\npath = "/"\nbackend = "ws://127.0.0.1:1/"\n')
    assert load(path).acme_hosts == ()


def test_check_reports_and_warnings(tmp_path: Path) -> None:
    config = loads(acme_config(tmp_path), tmp_path / "gatewayd.toml")
    (report,) = host_reports(config, T0)
    assert report.describe(T0) == "no certificate yet; next ACME order now"
    # Listening on 8443 only: the CA's port 443 is nowhere.
    (warning,) = acme_warnings(config)
    assert "port 443" in warning
    on_443 = loads(acme_config(tmp_path).replace("127.0.0.1:8443", "0.0.0.0:443"), tmp_path / "gatewayd.toml")
    assert acme_warnings(on_443) == []


# ---------------------------------------------------------------- the store


def test_store_writes_atomically_and_privately(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.prepare()
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    pem = tls_alpn01_certificate("a.example.com", "x.y")
    key = pem[pem.find(b"-----BEGIN PRIVATE KEY-----") :]
    chain = pem[: pem.find(b"-----BEGIN PRIVATE KEY-----")]
    store.save_certificate("a.example.com", key, chain)
    path = store.certificate_path("a.example.com")
    assert path.stat().st_mode & 0o777 == 0o600
    stored = store.load_certificate("a.example.com")
    assert stored is not None and stored.leaf.subject == x509.load_pem_x509_certificate(chain).subject
    # No temporary files left behind; junk is not a certificate.
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.example.com.pem"]
    assert parse_certificate_file(path, b"junk") is None
    assert parse_certificate_file(path, chain) is None  # no key before the chain
    with pytest.raises(ValueError):
        store.http01_path("../../etc/passwd")
    assert store.tls_alpn01_answer("../lock") is None


def test_the_ca_lock_is_held_by_one_holder_at_a_time(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    first, second = store.lock(), store.lock()
    assert first.acquire_nowait()
    assert not second.acquire_nowait()  # flock: a second open file description is refused
    first.release()
    assert second.acquire_nowait()
    second.release()


def test_gatewayd_check_shows_each_acme_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import trustme

    from gatewayd.cli import cmd_check

    path = tmp_path / "gatewayd.toml"
    text = acme_config(tmp_path, names='"a.example.com", "www.a.example.com"')
    text += '\n[[host]]\nnames = ["b.example.com"]\nacme = true\n[[host.route]]\npath = "/"\nbackend = "ws://127.0.0.1:9000/"\n'
    path.write_text(text)
    store = Store(tmp_path / "state")
    store.prepare()
    issued = trustme.CA().issue_cert("a.example.com", "www.a.example.com")
    store.save_certificate(
        "a.example.com", issued.private_key_pem.bytes(), b"".join(blob.bytes() for blob in issued.cert_chain_pems)
    )
    store.write_json(
        store.status_path("b.example.com"),
        HostStatus(failures=1, last_failure=datetime.datetime.now(UTC), last_error="cannot reach the CA").to_json(),
    )
    assert cmd_check(str(path)) == 0
    out, err = capsys.readouterr()
    assert "acme      https://acme-v02.api.letsencrypt.org/directory, state_dir" in out
    assert "certificate  ACME (" in out
    a_line = next(line for line in out.splitlines() if line.startswith("acme      host[0]"))
    assert "a.example.com: certificate valid until" in a_line and "next ACME order" in a_line
    b_line = next(line for line in out.splitlines() if line.startswith("acme      host[1]"))
    assert "no certificate yet" in b_line and "1 failure(s) in a row, last: cannot reach the CA" in b_line
    assert "port 443" in err
