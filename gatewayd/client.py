"""A small WebSocket client for trying a gateway: ``python -m gatewayd.client URL [MESSAGE ...]``.

Sends each MESSAGE (or each line of standard input when none are given) and
prints what comes back. It is a diagnostic: every failure ends with one line
on stderr that says what went wrong (an unresolvable name, a refused port, a
certificate that does not verify and who issued it, the TLS alert the server
sent, the HTTP status and one-line body of a refusal), and ``-v`` shows the
request and response heads as they went over the wire, like ``curl -v``.

The handshake is wsproto's (RFC 6455 section 4.1) over trio's TCP and the
standard library's TLS, so this module shares no code with the gateway it
tests.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio
from cryptography import x509
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

PROG = "python -m gatewayd.client"
#: A refusal's body is shown up to this many characters (the gateway's is one line).
BODY_SHOWN = 200


class Failure(Exception):
    """A failure explained in one line (printed as ``PROG: message``)."""


@dataclass(frozen=True)
class Target:
    """Where the URL points, and where the TCP connection really goes."""

    secure: bool
    host: str  # as in the URL, without brackets: SNI and certificate check
    port: int
    resource: str  # path and query
    connect_host: str  # --resolve may point the name elsewhere

    @property
    def authority(self) -> str:
        """The Host header: brackets around an IPv6 literal, the port unless the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.secure else 80) else f"{host}:{self.port}"


def _split_address(text: str) -> tuple[str, str]:
    """``HOST:REST`` where HOST may be a bracketed IPv6 literal: (HOST, REST)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(text)
        return host, rest[1:]
    host, colon, rest = text.partition(":")
    if not colon:
        raise ValueError(text)
    return host, rest


def parse_resolve(text: str) -> tuple[str, int, str]:
    """curl's ``--resolve HOST:PORT:ADDR`` (``[::1]`` or ``::1`` for an IPv6 ADDR)."""
    try:
        host, rest = _split_address(text)
        port_text, colon, address = rest.partition(":")
        port = int(port_text)
        if not (colon and host and address and 0 < port < 65536):
            raise ValueError(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT:ADDR, not {text!r}") from None
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    return host.lower(), port, address


def parse_header(text: str) -> tuple[str, str]:
    """``--header 'Name: value'``."""
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or name != name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', not {text!r}")
    return name, value.strip()


def make_target(url: str, resolve: Sequence[tuple[str, int, str]]) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise Failure(f"{url}: not a ws:// or wss:// URL")
    try:
        port = parts.port
    except ValueError:
        raise Failure(f"{url}: the port is not a number from 1 to 65535") from None
    host = parts.hostname
    if not host:
        raise Failure(f"{url}: no host name")
    secure = parts.scheme == "wss"
    port = port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connect_host = next((a for h, p, a in resolve if h == host and p == port), host)
    return Target(secure, host, port, resource, connect_host)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(sockaddr: tuple[object, ...]) -> str:
    host, port = str(sockaddr[0]), sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def connect(target: Target) -> trio.SocketStream:
    """TCP to every address the name resolves to, in order, until one answers."""
    try:
        infos = await trio.socket.getaddrinfo(target.connect_host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Failure(f"cannot resolve {target.connect_host!r}: {exc.strerror}") from None
    errors: list[str] = []
    for family, kind, proto, _, sockaddr in infos:
        sock = trio.socket.socket(family, kind, proto)
        try:
            await sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            if isinstance(exc, ConnectionRefusedError):
                errors.append(f"connection refused by {_address(sockaddr)} (nothing listens on that port?)")
            else:
                errors.append(f"cannot connect to {_address(sockaddr)}: {exc.strerror or exc}")
            continue
        return trio.SocketStream(sock)
    raise Failure("; ".join(errors) or f"{target.connect_host!r} has no address")


def tls_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _alert_name(reason: str) -> str | None:
    """OpenSSL's reason for a received alert (``TLSV1_UNRECOGNIZED_NAME``) as RFC 8446's name."""
    for prefix in ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_", "TLSV1_"):
        if reason.startswith(prefix):
            return reason[len(prefix) :].lower()
    return None


ALERT_HINTS = {
    "unrecognized_name": "the server has no host for the name sent in SNI",
    "protocol_version": "no TLS version in common",
    "handshake_failure": "no cipher or TLS parameter in common",
    "certificate_required": "the server wants a client certificate",
    "unknown_ca": "the server does not trust the client certificate's CA",
}


def describe_tls_error(error: ssl.SSLError, target: Target) -> str:
    reason = error.reason or ""
    alert = _alert_name(reason)
    if alert is not None:
        hint = ALERT_HINTS.get(alert)
        sni = ""
        if alert == "unrecognized_name":
            sni = " (none: an address is never sent)" if _is_address(target.host) else f" {target.host!r}"
        return f"TLS alert from the server: {alert}" + (f" ({hint}{sni})" if hint else "")
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return f"TLS handshake failed: the server did not answer in TLS ({reason}): a ws:// port? try ws://"
    return f"TLS handshake failed: {reason or error}"


async def peer_certificate(target: Target) -> x509.Certificate | None:
    """The server's certificate, fetched again without verification (for the message only)."""
    try:
        with trio.fail_after(5):
            stream = trio.SSLStream(await connect(target), tls_context(None, True), server_hostname=target.host)
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True)
            await trio.aclose_forcefully(stream)
    except (Failure, OSError, trio.BrokenResourceError, trio.TooSlowError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


#: OpenSSL X509_V_ERR_* codes (x509_vfy.h): the chain ends at a CA this client does not trust ...
UNTRUSTED_ISSUER = frozenset({2, 18, 19, 20, 21})
#: ... or the certificate is not for the name (or address) in the URL.
NAME_MISMATCH = frozenset({62, 64})


async def describe_verify_error(error: ssl.SSLCertVerificationError, target: Target) -> str:
    text = f"certificate verification failed for {target.host}: {error.verify_message or error.reason}"
    certificate = await peer_certificate(target)
    if certificate is not None:
        text += f" (subject {certificate.subject.rfc4514_string()}, issuer {certificate.issuer.rfc4514_string()}"
        try:
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            text += ", names " + ", ".join(str(getattr(name, "value", name)) for name in names)
        except x509.ExtensionNotFound:
            pass
        text += ")"
    if error.verify_code in NAME_MISMATCH:
        return text + f"; connect by one of its names (--resolve NAME:{target.port}:ADDR reaches an address by name)"
    if error.verify_code in UNTRUSTED_ISSUER:
        return text + "; pass --cafile FILE with the issuing CA (or --insecure to skip the check)"
    return text


async def open_tls(
    tcp: trio.SocketStream, target: Target, context: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    stream = trio.SSLStream(tcp, context, server_hostname=target.host)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise Failure(await describe_verify_error(cause, target)) from None
        if isinstance(cause, ssl.SSLEOFError) or cause is None:
            raise Failure("the server closed the connection during the TLS handshake") from None
        if isinstance(cause, ssl.SSLError):
            raise Failure(describe_tls_error(cause, target)) from None
        raise Failure(f"TLS handshake failed: {cause}") from None
    return stream


def show_head(head: bytes, mark: str) -> None:
    for line in head.decode("latin-1").split("\r\n"):
        if line:
            print(f"{mark} {line}", file=sys.stderr)
    print(mark, file=sys.stderr)


@dataclass
class Session:
    """One WebSocket connection: wsproto's state machine over a trio stream."""

    stream: trio.abc.Stream
    verbose: bool
    ws: WSConnection = field(default_factory=lambda: WSConnection(ConnectionType.CLIENT))
    head: bytes = b""  # the response head as received (for -v and the status line)
    head_done: bool = False

    async def send(self, event: Event) -> None:
        data = self.ws.send(event)
        if self.verbose and isinstance(event, Request):
            show_head(data, ">")
        await self.stream.send_all(data)

    async def events(self) -> list[Event]:
        """Read once, feed wsproto; an empty list never means EOF (EOF raises Failure)."""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError as exc:
                raise Failure(f"connection broken: {exc.__cause__ or exc}") from None
            if not self.head_done:
                self.head += data
                if b"\r\n\r\n" in self.head:
                    self.head = self.head.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
                    self.head_done = True
                    if self.verbose:
                        show_head(self.head, "<")
            self.ws.receive_data(bytes(data) or None)
            events = list(self.ws.events())
            if events:
                return events
            if not data:
                if not self.head_done:
                    raise Failure("the server closed the connection without answering the handshake")
                raise Failure("the server closed the connection without a WebSocket close")

    async def handshake(self, target: Target, headers: Sequence[tuple[str, str]], subprotocols: Sequence[str]) -> None:
        await self.send(
            Request(
                host=target.authority,
                target=target.resource,
                subprotocols=list(subprotocols),
                extra_headers=[(n.encode(), v.encode()) for n, v in headers],
            )
        )
        rejection: RejectConnection | None = None
        body = b""
        while True:
            for event in await self.events():
                if isinstance(event, AcceptConnection):
                    if self.verbose and event.subprotocol:
                        print(f"* subprotocol {event.subprotocol}", file=sys.stderr)
                    return
                if isinstance(event, RejectConnection):
                    rejection = event
                    if not event.has_body:
                        raise Failure(self._refusal(b""))
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Failure(self._refusal(body))
            if rejection is None and self.head_done:
                raise Failure(f"not a WebSocket answer: {self._status_line()}")

    def _status_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1") or "(empty)"

    def _refusal(self, body: bytes) -> str:
        text = " ".join(body.decode("utf-8", "replace").split())
        if len(text) > BODY_SHOWN:
            text = text[:BODY_SHOWN] + "..."
        return f"handshake refused: {self._status_line()}" + (f": {text}" if text else "")

    async def next_message(self) -> str | bytes:
        message: list[str] = []
        data = b""
        while True:
            for event in await self.events():
                if isinstance(event, Ping):
                    await self.send(event.response())
                elif isinstance(event, CloseConnection):
                    raise Failure(f"the server closed the WebSocket: code {event.code} {event.reason or ''}".rstrip())
                elif isinstance(event, TextMessage):
                    message.append(event.data)
                    if event.message_finished:
                        return "".join(message)
                elif isinstance(event, BytesMessage):
                    data += event.data
                    if event.message_finished:
                        return data

    async def close(self) -> None:
        """The closing handshake (RFC 6455 section 7.1.2), bounded by the caller's deadline."""
        await self.send(CloseConnection(code=1000))
        try:
            while not any(isinstance(event, CloseConnection) for event in await self.events()):
                pass
        except Failure:
            pass  # closed without answering our close: nothing left to say


async def talk(args: argparse.Namespace, messages: Sequence[str]) -> None:
    target = make_target(args.url, args.resolve)
    phase = "connecting"
    try:
        with trio.fail_after(args.timeout):
            tcp = await connect(target)
            stream: trio.abc.Stream = tcp
            if target.secure:
                phase = "TLS handshake; a plain ws:// port does not answer a TLS ClientHello"
                stream = await open_tls(tcp, target, tls_context(args.cafile, args.insecure))
            phase = "waiting for the handshake answer"
            session = Session(stream, args.verbose)
            await session.handshake(target, args.header, args.subprotocol)
            phase = "waiting for a reply"
            for message in messages:
                await session.send(TextMessage(message))
                reply = await session.next_message()
                print(reply if isinstance(reply, str) else reply.hex(), flush=True)
            phase = "closing"
            await session.close()
            await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        raise Failure(f"no answer within {args.timeout}s ({phase})") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A small WebSocket client for trying a gateway: sends each MESSAGE (or each line of stdin) "
        "and prints each reply; every failure ends with one line saying why.",
    )
    parser.add_argument("url", help="ws:// or wss:// URL (wss://[::1]:8443/echo for IPv6)")
    parser.add_argument("messages", nargs="*", help="text messages to send (default: stdin lines)")
    parser.add_argument("--cafile", help="PEM file of CA certificates to trust (the demo prints its own)")
    parser.add_argument("--insecure", "-k", action="store_true", help="do not verify the server certificate")
    parser.add_argument(
        "--resolve",
        metavar="HOST:PORT:ADDR",
        type=parse_resolve,
        action="append",
        default=[],
        help="connect to ADDR for HOST:PORT (SNI and Host stay HOST), like curl",
    )
    parser.add_argument(
        "--header", "-H", metavar="'NAME: VALUE'", type=parse_header, action="append", default=[],
        help="an extra request header (Origin, Authorization, Cookie, ...); repeatable",
    )
    parser.add_argument(
        "--subprotocol", metavar="NAME", action="append", default=[],
        help="offer this subprotocol (Sec-WebSocket-Protocol); repeatable, in preference order",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="print the request and response heads on stderr")
    parser.add_argument("--timeout", type=float, default=10.0, help="overall time limit in seconds (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Intermixed: `URL --cafile CA MESSAGE` (as the demo prints it) must work;
    # plain parse_args binds the empty MESSAGE list right after URL.
    args = _parser().parse_intermixed_args(argv)
    if args.insecure:
        print(
            f"{PROG}: WARNING: --insecure: the server certificate is NOT verified; "
            "anyone on the path can read and change this connection",
            file=sys.stderr,
        )
    messages = args.messages or [line.rstrip("\n") for line in sys.stdin]
    try:
        trio.run(talk, args, messages)
    except Failure as failure:
        print(f"{PROG}: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
