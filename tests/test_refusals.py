"""The one failure -> answer table (gatewayd.errors.ANSWERS) and the refusal reasons in the access log.

First the table itself: one case per Reason, the exact bytes the gateway
sends (or that it sends none) and the access log's ``end``. Then the record's
fields, the documented reason list, and over real sockets the access line of
refused connections in both log formats, with their ``bytes_out``.
"""

from __future__ import annotations

import io
import json
import logging
import re
import ssl
import textwrap
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gatewayd import log as gatewayd_log
from gatewayd.access import unauthorized
from gatewayd.config import BasicAuth
from gatewayd.errors import (
    ANSWERS,
    AuthDenied,
    AuthServiceFailed,
    BackendBadUpgrade,
    BackendRefusedUpgrade,
    BackendTimeout,
    BackendUnavailable,
    BodyTooLarge,
    ClientCertificateRequired,
    HandshakeRejected,
    HandshakeTimeout,
    NoBackendAvailable,
    NotTLS,
    PeerError,
    ProxyProtocolError,
    Redirected,
    TLSHandshakeFailed,
    UnknownServerName,
)
from gatewayd.handshake import parse_request_head, render_refusal
from gatewayd.record import AccessRecord, End, Reason
from harness import (
    Certs,
    echo_backend,
    make_certs,
    receive_all,
    running_gateway,
    tls_client,
    upgrade_request,
)

DATE = "Wed, 25 Nov 2026 18:00:00 GMT"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "logging.md"


def text_answer(status_line: str, body: str, *headers: str, connection: str = "close") -> bytes:
    """A gateway-made answer: the frame every text row shares, around the row's own parts."""
    data = body.encode() + b"\n"
    lines = [
        status_line,
        "Server: gatewayd",
        f"Date: {DATE}",
        *headers,
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(data)}",
        f"Connection: {connection}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


@dataclass(frozen=True)
class Case:
    error: PeerError
    answer: bytes | None
    end: End


MALFORMED = "Bad Request: malformed HTTP request"

CASES: dict[Reason, Case] = {
    Reason.PROXY_HEADER: Case(ProxyProtocolError("bad signature", b"GET /"), None, End.PROXY_PROTOCOL_ERROR),
    Reason.UNKNOWN_SNI: Case(UnknownServerName("nobody.test"), None, End.UNKNOWN_SNI),
    Reason.TLS_HANDSHAKE: Case(TLSHandshakeFailed("TLS handshake failed: no shared cipher"), None, End.TLS_ERROR),
    Reason.CLIENT_CERTIFICATE: Case(ClientCertificateRequired("no certificate"), None, End.TLS_ERROR),
    Reason.PLAIN_HTTP: Case(
        NotTLS(b"GET / HTTP/1.1\r\n"),
        text_answer("HTTP/1.1 400 Bad Request", "Bad Request: plain HTTP sent to a TLS port"),
        End.PLAIN_HTTP_ON_TLS,
    ),
    Reason.TIMEOUT: Case(HandshakeTimeout("TLS handshake", 10.0), None, End.HANDSHAKE_TIMEOUT),
    Reason.HEAD_TIMEOUT: Case(
        HandshakeTimeout("request head", 10.0, head_started=True),
        text_answer("HTTP/1.1 408 Request Timeout", "Request Timeout"),
        End.HANDSHAKE_TIMEOUT,
    ),
    Reason.HEAD_TOO_LARGE: Case(
        HandshakeRejected(Reason.HEAD_TOO_LARGE, "over 16384 bytes"),
        text_answer("HTTP/1.1 431 Request Header Fields Too Large", "Request Header Fields Too Large"),
        End.REJECTED,
    ),
    Reason.TOO_MANY_HEADERS: Case(
        HandshakeRejected(Reason.TOO_MANY_HEADERS, "101 header lines"),
        text_answer(
            "HTTP/1.1 431 Request Header Fields Too Large",
            "Request Header Fields Too Large: too many header lines",
        ),
        End.REJECTED,
    ),
    Reason.HEADER_LINE_TOO_LONG: Case(
        HandshakeRejected(Reason.HEADER_LINE_TOO_LONG, "a line of 9000 bytes"),
        text_answer(
            "HTTP/1.1 431 Request Header Fields Too Large",
            "Request Header Fields Too Large: a header line is too long",
        ),
        End.REJECTED,
    ),
    Reason.MALFORMED: Case(
        HandshakeRejected(Reason.MALFORMED, "obs-fold"),
        text_answer("HTTP/1.1 400 Bad Request", MALFORMED),
        End.REJECTED,
    ),
    Reason.TARGET_FORM: Case(
        HandshakeRejected(Reason.TARGET_FORM, "OPTIONS *"),
        text_answer("HTTP/1.1 405 Method Not Allowed", "Method Not Allowed", "Allow: GET"),
        End.REJECTED,
    ),
    Reason.SNI_HOST_MISMATCH: Case(
        HandshakeRejected(Reason.SNI_HOST_MISMATCH, "Host 'a' is not served"),
        text_answer(
            "HTTP/1.1 421 Misdirected Request",
            "Misdirected Request: this connection cannot serve that host",
        ),
        End.REJECTED,
    ),
    Reason.UNKNOWN_HOST: Case(
        HandshakeRejected(Reason.UNKNOWN_HOST, "Host 'a' names no host"),
        text_answer("HTTP/1.1 404 Not Found", "Not Found: no such host"),
        End.REJECTED,
    ),
    Reason.METHOD: Case(
        HandshakeRejected(Reason.METHOD, "method POST"),
        text_answer(
            "HTTP/1.1 405 Method Not Allowed",
            "Method Not Allowed: a WebSocket handshake is a GET",
            "Allow: GET",
        ),
        End.REJECTED,
    ),
    Reason.NO_ROUTE: Case(
        HandshakeRejected(Reason.NO_ROUTE, "no route for '/x'"),
        text_answer("HTTP/1.1 404 Not Found", "Not Found: no route for this path"),
        End.REJECTED,
    ),
    Reason.REDIRECT: Case(
        Redirected("wss://new.example/chat?room=1", 301, "host[0].route[0].redirect"),
        text_answer(
            "HTTP/1.1 301 Moved Permanently",
            "Moved: this endpoint is now wss://new.example/chat?room=1",
            "Location: wss://new.example/chat?room=1",
        ),
        End.REJECTED,
    ),
    Reason.ADDRESS_DENIED: Case(
        HandshakeRejected(Reason.ADDRESS_DENIED, "client 192.0.2.7 refused by host[0]: not in allow"),
        text_answer("HTTP/1.1 403 Forbidden", "Forbidden: your address may not use this endpoint"),
        End.REJECTED,
    ),
    Reason.REQUEST_BODY: Case(
        HandshakeRejected(Reason.REQUEST_BODY, "Content-Length > 0"),
        text_answer("HTTP/1.1 400 Bad Request", MALFORMED),
        End.REJECTED,
    ),
    Reason.NOT_UPGRADE: Case(
        HandshakeRejected(Reason.NOT_UPGRADE, "no tokens"),
        text_answer(
            "HTTP/1.1 426 Upgrade Required",
            "Upgrade Required: this endpoint speaks WebSocket only",
            "Upgrade: websocket",
            connection="Upgrade, close",
        ),
        End.REJECTED,
    ),
    Reason.VERSION: Case(
        HandshakeRejected(Reason.VERSION, "Sec-WebSocket-Version ['8']"),
        text_answer(
            "HTTP/1.1 426 Upgrade Required",
            "Upgrade Required: unsupported WebSocket version, use 13",
            "Sec-WebSocket-Version: 13",
        ),
        End.REJECTED,
    ),
    Reason.BAD_KEY: Case(
        HandshakeRejected(Reason.BAD_KEY, "Sec-WebSocket-Key ['c2hvcnQ=']"),
        text_answer("HTTP/1.1 400 Bad Request", MALFORMED),
        End.REJECTED,
    ),
    Reason.ORIGIN_NOT_ALLOWED: Case(
        HandshakeRejected(Reason.ORIGIN_NOT_ALLOWED, "Origin ['https://evil.example']"),
        text_answer("HTTP/1.1 403 Forbidden", "Forbidden: origin not allowed"),
        End.REJECTED,
    ),
    Reason.UNAUTHORIZED: Case(
        unauthorized(BasicAuth(users_file=Path("users"), realm="Chat staff"), "no Authorization header"),
        text_answer(
            "HTTP/1.1 401 Unauthorized",
            "Unauthorized: valid credentials are required",
            'WWW-Authenticate: Basic realm="Chat staff", charset="UTF-8"',
        ),
        End.REJECTED,
    ),
    Reason.AUTH_DENIED: Case(
        AuthDenied(
            403,
            headers=[("WWW-Authenticate", "Bearer")],
            payload=b'{"error":"no"}',
            content_type="application/json",
        ),
        b"HTTP/1.1 403 Forbidden\r\nServer: gatewayd\r\nDate: " + DATE.encode() + b"\r\n"
        b"WWW-Authenticate: Bearer\r\nContent-Type: application/json\r\nContent-Length: 14\r\n"
        b'Connection: close\r\n\r\n{"error":"no"}',
        End.REJECTED,
    ),
    Reason.AUTH_BUSY: Case(
        HandshakeRejected(Reason.AUTH_BUSY, "password check not done within 10s"),
        text_answer(
            "HTTP/1.1 503 Service Unavailable",
            "Service Unavailable: too many logins at once, try again shortly",
            "Retry-After: 5",
        ),
        End.REJECTED,
    ),
    Reason.AUTH_UNAVAILABLE: Case(
        AuthServiceFailed("http://127.0.0.1:9100/check", "connection refused"),
        text_answer(
            "HTTP/1.1 503 Service Unavailable",
            "Service Unavailable: authentication is unavailable, try again later",
            "Retry-After: 5",
        ),
        End.REJECTED,
    ),
    Reason.NO_BACKEND: Case(
        NoBackendAvailable("host[0].route[0]", "every backend is down", retry_after=7),
        text_answer(
            "HTTP/1.1 503 Service Unavailable",
            "Service Unavailable: no backend can take the connection, retry later",
            "Retry-After: 7",
        ),
        End.REJECTED,
    ),
    Reason.BACKEND_UNAVAILABLE: Case(
        BackendUnavailable("ws://127.0.0.1:9", "connection refused"),
        text_answer("HTTP/1.1 502 Bad Gateway", "Bad Gateway: the service is unavailable"),
        End.REJECTED,
    ),
    Reason.BACKEND_TIMEOUT: Case(
        BackendTimeout("ws://127.0.0.1:9", "no answer in 5s"),
        text_answer("HTTP/1.1 504 Gateway Timeout", "Gateway Timeout: the service did not answer in time"),
        End.REJECTED,
    ),
    Reason.BACKEND_REFUSED: Case(
        BackendRefusedUpgrade("ws://127.0.0.1:9", 403, "Nope", [("X-Reason", "no")], b"no"),
        b"HTTP/1.1 403 Nope\r\nDate: " + DATE.encode() + b"\r\nX-Reason: no\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\nno",
        End.BACKEND_REFUSED,
    ),
    Reason.BACKEND_BAD_UPGRADE: Case(
        BackendBadUpgrade("ws://127.0.0.1:9", "101 with a wrong Sec-WebSocket-Accept"),
        text_answer("HTTP/1.1 502 Bad Gateway", "Bad Gateway: the service is unavailable"),
        End.REJECTED,
    ),
    Reason.STATIC_UPGRADE: Case(
        HandshakeRejected(Reason.STATIC_UPGRADE, "WebSocket upgrade on the static route host[0].route[2]"),
        text_answer("HTTP/1.1 404 Not Found", "Not Found: not a WebSocket resource"),
        End.REJECTED,
    ),
    Reason.STATIC_METHOD: Case(
        HandshakeRejected(Reason.STATIC_METHOD, "method POST on a static route"),
        text_answer("HTTP/1.1 405 Method Not Allowed", "Method Not Allowed", "Allow: GET, HEAD"),
        End.REJECTED,
    ),
    Reason.BAD_BODY: Case(
        HandshakeRejected(Reason.BAD_BODY, "bad chunk size"),
        text_answer("HTTP/1.1 400 Bad Request", "Bad Request: malformed request body"),
        End.REJECTED,
    ),
    Reason.BODY_TOO_LARGE: Case(
        BodyTooLarge(1024),
        text_answer(
            "HTTP/1.1 413 Content Too Large", "Content Too Large: the request body may have at most 1024 bytes"
        ),
        End.REJECTED,
    ),
}


def test_every_reason_has_one_row_and_one_case() -> None:
    assert set(ANSWERS) == set(Reason)
    assert set(CASES) == set(Reason)


@pytest.mark.parametrize("reason", list(CASES), ids=[reason.value for reason in CASES])
def test_answer_table(reason: Reason) -> None:
    case = CASES[reason]
    assert case.error.reason is reason
    assert render_refusal(case.error, server_header="gatewayd", date=DATE) == case.answer
    assert case.error.answer.end is case.end
    if case.answer is not None:
        status = int(case.answer.split(b" ", 2)[1])
        assert case.error.status == status


@pytest.mark.parametrize(
    "error, detail",
    [
        pytest.param(HandshakeTimeout("PROXY header", 2.5), "PROXY header not complete within 2.5s", id="proxy"),
        pytest.param(HandshakeTimeout("TLS handshake", 10.0), "TLS handshake not complete within 10s", id="tls"),
        pytest.param(
            HandshakeTimeout("request head", 10.0, head_started=True),
            "request head not complete within 10s",
            id="head",
        ),
        pytest.param(HandshakeRejected(Reason.NO_ROUTE), "Not Found: no route for this path", id="default"),
    ],
)
def test_refusal_details(error: PeerError, detail: str) -> None:
    assert error.detail == detail


@pytest.mark.parametrize(
    "raw, detail",
    [
        pytest.param(
            b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header: sess=SECRET\r\n\r\n",
            "h11: illegal header line",
            id="h11-quotes-the-line",
        ),
        pytest.param(
            b"GET /x HTTP/1.1\r\nHost: a\r\nCookie: sess=SECRET\x7f\r\n\r\n",
            "control character in the Cookie header",
            id="control-character",
        ),
        pytest.param(
            b"GET x?token=SECRET HTTP/1.1\r\nHost: a\r\n\r\n",
            "request-target 'x' is not origin-form",
            id="target-query",
        ),
    ],
)
def test_details_never_carry_the_request_bytes(raw: bytes, detail: str) -> None:
    """The detail is logged at info: what a client sent in a header or a query stays out."""
    with pytest.raises(HandshakeRejected) as info:
        parse_request_head(raw)
    assert (info.value.reason, info.value.detail) == (Reason.MALFORMED, detail)


# ------------------------------------------------------------------ the record and its docs


def test_record_fields_carry_reason_only_on_refusals() -> None:
    record = AccessRecord(client="192.0.2.7:5", status=101, end=End.CLIENT_CLOSE)
    assert list(record.fields()) == [
        "client", "sni", "host", "path", "route", "backend", "status",
        "bytes_in", "bytes_out", "duration", "end",
    ]
    record = AccessRecord(
        client="192.0.2.7:5", status=403, end=End.REJECTED,
        reason=Reason.ORIGIN_NOT_ALLOWED, detail="Origin ['https://evil'] is not in host[0].route[1].origins",
    )
    fields = record.fields()
    assert (fields["end"], fields["reason"], fields["detail"]) == (
        "rejected", "origin_not_allowed", "Origin ['https://evil'] is not in host[0].route[1].origins"
    )
    assert type(fields["end"]) is str and type(fields["reason"]) is str


def _documented(section: str) -> list[str]:
    """The backquoted values in the first column of the table under ``section`` in docs/logging.md."""
    text = DOCS.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", body, flags=re.MULTILINE)


def test_docs_list_every_reason_and_end() -> None:
    assert _documented("Refusal reasons") == [reason.value for reason in Reason]
    # Every value but "limited", which is never written (no access line then).
    assert _documented("End reasons") == [end.value for end in End if end is not End.LIMITED]


# ------------------------------------------------------------------ over real sockets


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost", "127.0.0.1")
    certs.issue("chat.example.com")
    return certs


def config(directory: Path, certs: Certs, echo: int) -> Path:
    d = certs.directory
    path = directory / "gatewayd.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            handshake_timeout = 2.0

            [[listener]]
            address = "127.0.0.1:0"

            [[host]]
            names = ["localhost"]
            certificate = "{d}/localhost.pem"
            private_key = "{d}/localhost.key"

            [[host.route]]
            path = "/echo"
            backend = "ws://127.0.0.1:{echo}"

            [[host.route]]
            path = "/strict"
            backend = "ws://127.0.0.1:{echo}"
            origins = ["https://app.example.com"]

            [[host]]
            names = ["chat.example.com"]
            certificate = "{d}/chat.example.com.pem"
            private_key = "{d}/chat.example.com.key"

            [[host.route]]
            path = "/"
            backend = "ws://127.0.0.1:{echo}"
            """
        )
    )
    return path


@contextmanager
def captured(fmt: str) -> Iterator[io.StringIO]:
    out = io.StringIO()
    gatewayd_log.setup("info", fmt, out)
    try:
        yield out
    finally:
        logging.getLogger("gatewayd").handlers.clear()
        logging.getLogger("gatewayd").propagate = True


def access_lines(out: io.StringIO, fmt: str) -> list[dict[str, str]]:
    """Each access line as a dict of strings, from either format."""
    lines = [line for line in out.getvalue().splitlines() if "gatewayd.access" in line]
    if fmt == "json":
        return [{k: "" if v is None else str(v) for k, v in json.loads(line).items()} for line in lines]
    parsed = []
    for line in lines:
        fields = {}
        for match in re.finditer(r' (\w+)=("(?:[^"\\]|\\.)*"|\S+)', " " + line.split(": ", 1)[1]):
            value = match.group(2)
            text = json.loads(value) if value.startswith('"') else value
            fields[match.group(1)] = "" if text == "-" else text
        parsed.append(fields)
    return parsed


async def tls_ask(port: int, context: ssl.SSLContext, sni: str, request: bytes) -> bytes:
    stream = await tls_client(port, context, sni)
    await stream.send_all(request)
    return await receive_all(stream)


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_refused_requests_are_explained_in_the_access_line(
    certs: Certs, tmp_path: Path, fmt: str
) -> None:
    """#14: every refusal's access line says why (reason + detail) and counts the answer it sent."""
    context = certs.client_context()
    received: list[bytes] = []
    with captured(fmt) as out:
        async with AsyncExitStack() as stack:
            echo = await stack.enter_async_context(echo_backend())
            gw = await stack.enter_async_context(running_gateway(config(tmp_path, certs, echo)))
            with trio.fail_after(30):
                port = gw.port
                received.append(await tls_ask(port, context, "localhost", upgrade_request(
                    "/strict", "localhost", "Origin: https://evil.example")))
                received.append(await tls_ask(port, context, "localhost", upgrade_request("/nope")))
                received.append(await tls_ask(port, context, "localhost", upgrade_request("/echo").replace(
                    b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8")))
                received.append(await tls_ask(port, context, "chat.example.com", upgrade_request("/", "localhost")))
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                await tcp.send_all(upgrade_request())
                received.append(await receive_all(tcp))
                with pytest.raises(trio.BrokenResourceError):
                    await tls_client(port, context, "nobody.test")
                ok = await tls_client(port, context, "localhost")
                await ok.send_all(upgrade_request())
                assert (await ok.receive_some(65536)).startswith(b"HTTP/1.1 101 ")
                await ok.aclose()
                while gw.gateway.active_connections:
                    await trio.sleep(0.01)
    lines = access_lines(out, fmt)
    assert len(lines) == 7, out.getvalue()
    by_reason = {line.get("reason", "-"): line for line in lines}
    expected = [
        ("403", "origin_not_allowed", "Origin ['https://evil.example'] is not in host[0].route[1].origins"),
        ("404", "no_route", "no route for '/nope'"),
        ("426", "version", "Sec-WebSocket-Version ['8']"),
        ("421", "sni_host_mismatch",
         "Host 'localhost' is not served by the host chosen by SNI 'chat.example.com' (host[1])"),
        ("400", "plain_http", "plain HTTP (not a TLS ClientHello) sent to a TLS port"),
    ]
    for answer, (status, reason, detail) in zip(received, expected, strict=True):
        line = by_reason[reason]
        assert (line["status"], line["detail"]) == (status, detail)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode())
        # Every byte of the gateway's own answer is counted (the 400 on the raw port too).
        assert line["bytes_out"] == str(len(answer)), (reason, line)
        assert line["end"] == ("plain_http_on_tls" if reason == "plain_http" else "rejected")
    unknown = by_reason["unknown_sni"]
    assert (unknown["end"], unknown["status"], unknown["bytes_out"]) == ("unknown_sni", "", "0")
    assert unknown["detail"] == "SNI 'nobody.test' names no host and no host is default"
    accepted = by_reason["-"]
    assert "detail" not in accepted
    assert (accepted["status"], accepted["end"]) == ("101", "client_close")


async def test_timeout_reason_says_which_phase(certs: Certs, tmp_path: Path) -> None:
    """Row 3: a client that sends nothing gets no answer, the log says what was not done in time."""
    with captured("json") as out:
        async with AsyncExitStack() as stack:
            echo = await stack.enter_async_context(echo_backend())
            gw = await stack.enter_async_context(running_gateway(config(tmp_path, certs, echo)))
            with trio.fail_after(30):
                idle = await trio.open_tcp_stream("127.0.0.1", gw.port)
                assert await receive_all(idle, 10) == b""
                slow = await tls_client(gw.port, certs.client_context(), "localhost")
                await slow.send_all(b"GET /echo HTTP/1.1\r\n")
                answer = await receive_all(slow, 10)
                while gw.gateway.active_connections:
                    await trio.sleep(0.01)
    lines = {line["reason"]: line for line in access_lines(out, "json")}
    first, second = lines["timeout"], lines["head_timeout"]
    assert (first["end"], first["reason"], first["detail"], first["bytes_out"]) == (
        "handshake_timeout", "timeout", "TLS handshake not complete within 2s", "0"
    )
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert (second["end"], second["reason"], second["detail"], second["bytes_out"]) == (
        "handshake_timeout", "head_timeout", "request head not complete within 2s", str(len(answer))
    )
