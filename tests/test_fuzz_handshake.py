"""Parsing under attack: property tests and the bounded fuzz run over the handshake decision.

* Any bytes, and structured requests with one thing broken, always get exactly
  one SPEC section 3 answer: :func:`parse_request_head` + :func:`decide` raise
  nothing but HandshakeRejected, with a status of the table.
* The bytes -> answer path (head delimiting, size limit, parse, decide) is
  fuzzed for a bounded number of examples (a few seconds): the CI fuzz run.
* What the backend receives (:func:`build_backend_request`) never carries a CR,
  LF or NUL inside a header line, whatever the client sent, whatever its address
  (PROXY header) and certificate subject (mTLS): checked by re-parsing it.

Hypothesis rather than a coverage-guided fuzzer (atheris) so that CI needs no
compiler; the budget is ``max_examples``, with no per-example deadline.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import h11
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gatewayd import config as config_module
from gatewayd.errors import HandshakeRejected
from gatewayd.handshake import (
    MAX_HEADER_LINE,
    MAX_HEADER_LINES,
    Accepted,
    ClientInfo,
    build_backend_request,
    decide,
    find_head_end,
    parse_request_head,
)
from gatewayd.routing import HostTable
from gatewayd.tls import rfc4514_subject

#: Every status SPEC section 3's table lets the gateway answer a request head
#: with (rows 3-14a), and 101 for an accepted one.
SPEC_STATUSES = {101, 301, 302, 307, 308, 400, 401, 403, 404, 405, 408, 421, 426, 431}

MAX_HEAD = 4096

CONFIG = """\
[gateway]
max_request_head = 4096

[[listener]]
address = "127.0.0.1:0"
tls = false

[[host]]
names = ["chat.example.com", "*.example.org"]
default = true

[[host.route]]
path = "/chat"
backend = "ws://127.0.0.1:9000/chat"
origins = ["https://app.example.com"]
subprotocols = ["v2", "v1"]

[[host.route]]
path_prefix = "/api/"
backend = "ws://127.0.0.1:9000/"
extensions = false

[[host]]
names = ["other.example.net"]

[[host.route]]
path = "/"
backend = "ws://127.0.0.1:9001"
"""

CONFIG_PATH = Path(__file__).parent / "fuzz.toml"
HOSTS = HostTable(config_module.loads(CONFIG, str(CONFIG_PATH)).hosts)
FIRST_HOST = HOSTS.lookup("chat.example.com")
assert FIRST_HOST is not None
PLAIN = ClientInfo(address="192.0.2.1", port=40000, tls=False)
TLS = ClientInfo(address="192.0.2.1", port=40000, tls=True, tls_host=FIRST_HOST,
                 server_name="chat.example.com")


def answer_for(raw: bytes, client: ClientInfo = PLAIN, limit: int = MAX_HEAD) -> int:
    """The status a client sending ``raw`` (and then waiting) gets, as server.py decides it."""
    end = find_head_end(raw)
    if end is None:
        return 431 if len(raw) > limit else 408
    if end > limit:
        return 431
    try:
        decide(parse_request_head(raw[:end]), client, HOSTS)
    except HandshakeRejected as rejected:
        assert rejected.status in SPEC_STATUSES, rejected
        assert rejected.status != 101
        return rejected.status
    return 101


# -- arbitrary bytes -------------------------------------------------------------


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000))
@example(b"GET /chat HTTP/1.1\r\n\r\n")
@example(b"\r\n\r\n")
@example(b"GET /chat HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
@example(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
def test_fuzz_bytes_to_answer(raw: bytes) -> None:
    """The CI fuzz run: raw bytes -> exactly one answer of the table."""
    for client in (PLAIN, TLS):
        assert answer_for(raw, client) in SPEC_STATUSES


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")), max_size=20))
def test_fuzz_line_structured_bytes(lines: list[bytes]) -> None:
    """Arbitrary lines, CRLF-joined and terminated: always a complete head."""
    raw = b"GET /chat HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    assert answer_for(raw) in SPEC_STATUSES


# -- structured requests, one thing broken ---------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def valid_headers() -> list[tuple[str, str]]:
    return [
        ("Host", "chat.example.com"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Version", "13"),
        ("Origin", "https://app.example.com"),
        ("Sec-WebSocket-Protocol", "v1, v2"),
    ]


def render(method: str, target: str, version: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} {version}"] + [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


VALUE_CHARS = st.characters(min_codepoint=0, max_codepoint=255)
NAMES = st.sampled_from(
    ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Origin",
     "Content-Length", "Transfer-Encoding", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions",
     "X-Forwarded-For", "Forwarded", "X-Any"]
)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    method, target, version = "GET", "/chat", "HTTP/1.1"
    headers = valid_headers()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        mutation = draw(st.integers(min_value=0, max_value=9))
        if mutation == 0 and headers:
            del headers[draw(st.integers(min_value=0, max_value=len(headers) - 1))]
        elif mutation == 1 and headers:
            headers.append(headers[draw(st.integers(min_value=0, max_value=len(headers) - 1))])
        elif mutation == 2:
            headers.append((draw(NAMES), draw(st.text(VALUE_CHARS, max_size=40))))
        elif mutation == 3 and headers:
            index = draw(st.integers(min_value=0, max_value=len(headers) - 1))
            headers[index] = (headers[index][0], draw(st.text(VALUE_CHARS, max_size=40)))
        elif mutation == 4:
            method = draw(st.sampled_from(["POST", "get", "HEAD", "CONNECT", "G ET", "", "GET\x00"]))
        elif mutation == 5:
            target = draw(st.sampled_from(
                ["/api/x?q=1", "*", "chat", "http://chat.example.com/chat", "/chat#f", "/%00",
                 "//", "/chat x", "/api/../../etc"]
            ))
        elif mutation == 6:
            version = draw(st.sampled_from(["HTTP/1.0", "HTTP/2", "HTTP/1.1x", "http/1.1", ""]))
        elif mutation == 7:
            headers.append(("Content-Length", draw(st.sampled_from(["0", "5", "-1", "1, 1"]))))
            headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "identity"]))))
        elif mutation == 8 and headers:
            index = draw(st.integers(min_value=0, max_value=len(headers) - 1))
            name, value = headers[index]
            headers[index] = (draw(st.sampled_from([name.upper(), name.lower(), name + " ", " " + name])), value)
        elif mutation == 9:
            headers.append(("X-Many", "a")) if draw(st.booleans()) else None
            headers.extend([("X-Fill", "b")] * draw(st.integers(min_value=0, max_value=MAX_HEADER_LINES + 5)))
    return render(method, target, version, headers)


@settings(max_examples=800, deadline=None)
@given(mutated_requests(), st.booleans())
def test_mutated_requests_get_one_spec_answer(raw: bytes, tls: bool) -> None:
    assert answer_for(raw, TLS if tls else PLAIN) in SPEC_STATUSES


@pytest.mark.parametrize("client", [PLAIN, TLS], ids=["plain", "tls"])
def test_unmutated_request_is_accepted(client: ClientInfo) -> None:
    assert answer_for(render("GET", "/chat", "HTTP/1.1", valid_headers()), client) == 101


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("Content-Length", "5")], 400),
        ([("Transfer-Encoding", "chunked")], 400),
        ([("Content-Length", "0"), ("Transfer-Encoding", "chunked")], 400),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], 400),
        ([("X-Fill", "b")] * (MAX_HEADER_LINES - 6), 101),
        ([("X-Fill", "b")] * (MAX_HEADER_LINES - 6 + 1), 431),
    ],
    ids=["content-length", "transfer-encoding", "cl0-and-te", "te-and-cl", "100-lines", "101-lines"],
)
def test_bodies_and_header_count(headers: list[tuple[str, str]], status: int) -> None:
    base = [h for h in valid_headers() if h[0] != "Sec-WebSocket-Protocol"]
    assert len(base) == 6
    assert answer_for(render("GET", "/chat", "HTTP/1.1", base + headers), limit=65536) == status


def test_header_line_length_limit() -> None:
    base = valid_headers()
    fits = base + [("X-Long", "a" * (MAX_HEADER_LINE - len("X-Long: ")))]
    assert answer_for(render("GET", "/chat", "HTTP/1.1", fits), limit=65536) == 101
    over = base + [("X-Long", "a" * (MAX_HEADER_LINE - len("X-Long: ") + 1))]
    assert answer_for(render("GET", "/chat", "HTTP/1.1", over), limit=65536) == 431


# -- what reaches the backend ------------------------------------------------------

# Header values h11 accepts: no CR, LF or NUL, no leading/trailing whitespace.
SAFE_VALUE = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    min_size=1, max_size=30,
).map(str.strip).filter(bool)
ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)
)
SUBJECT_TEXT = st.text(min_size=1, max_size=20)


def accepted_for(extra: list[tuple[str, str]], host_header: str = "chat.example.com") -> Accepted:
    headers = [(n, v) for n, v in valid_headers() if n != "Host"] + [("Host", host_header)] + extra
    request = parse_request_head(render("GET", "/chat?x=1", "HTTP/1.1", headers))
    accepted = decide(request, PLAIN, HOSTS)
    host = dataclasses.replace(accepted.host, client_subject_header="X-Client-Subject")
    return dataclasses.replace(accepted, host=host)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(NAMES | st.just("X-Client-Subject"), SAFE_VALUE), max_size=8),
    ADDRESSES,
    st.booleans(),
    st.one_of(st.none(), SUBJECT_TEXT),
)
def test_backend_request_is_well_formed_by_construction(
    extra: list[tuple[str, str]], address: str, trusted: bool, common_name: str | None
) -> None:
    extra = [(n, v) for n, v in extra if n.lower() not in ("content-length", "transfer-encoding")]
    try:
        accepted = accepted_for(extra)
    except HandshakeRejected:
        return  # a rejected request reaches no backend
    subject = None
    if common_name is not None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        subject = rfc4514_subject(name)
    client = ClientInfo(address=address, port=1, tls=True, trusted_proxy=trusted, client_subject=subject)
    out = build_backend_request(accepted, client)
    assert out.endswith(b"\r\n\r\n")
    for line in out[:-4].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line
    # h11 parses it as exactly one request with nothing left over.
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(out)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)  # no body
    sent = [(n.decode().lower(), v.decode("latin-1")) for n, v in event.headers.raw_items()]
    values = dict(sent)
    # The subject header is ours or absent: a client's copy never gets through.
    assert [v for n, v in sent if n == "x-client-subject"] == ([subject] if subject else [])
    assert ipaddress.ip_address(values["x-forwarded-for"].split(",")[-1].strip()) == ipaddress.ip_address(address)
    if not trusted:
        assert values["x-forwarded-for"] == address
    # No body can follow: nothing that frames one is forwarded.
    assert "content-length" not in values and "transfer-encoding" not in values


def test_rfc4514_subject_escapes_control_and_non_ascii() -> None:
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "evil\r\nX-Admin: yes"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Zürich, Inc"),
    ])
    assert rfc4514_subject(name) == "O=Z\\C3\\BCrich\\, Inc,CN=evil\\0D\\0AX-Admin: yes"


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
def test_forwarded_headers_trusted_or_not(trusted: bool) -> None:
    accepted = accepted_for([("X-Forwarded-For", "198.51.100.1, 10.0.0.5"),
                             ("Forwarded", "for=198.51.100.1;proto=https")])
    client = ClientInfo(address="10.0.0.9", port=1, tls=True, trusted_proxy=trusted)
    out = build_backend_request(accepted, client).decode("latin-1")
    if trusted:
        assert "X-Forwarded-For: 198.51.100.1, 10.0.0.5, 10.0.0.9\r\n" in out
        assert "Forwarded: for=198.51.100.1;proto=https, for=10.0.0.9;host=chat.example.com;proto=https\r\n" in out
    else:
        assert "X-Forwarded-For: 10.0.0.9\r\n" in out
        assert "Forwarded: for=10.0.0.9;host=chat.example.com;proto=https\r\n" in out
    assert out.count("\r\nX-Forwarded-For:") == 1 and out.count("\r\nForwarded:") == 1


def test_rfc4514_subject_keeps_a_trailing_space_as_a_hex_pair() -> None:
    # Found by the property test above: "CN=\ " lost its space as header whitespace.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a b ")])
    assert rfc4514_subject(name) == "CN=a b\\20"
