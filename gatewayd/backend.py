"""Backend connections: connect, forward the upgrade, read and judge the answer.

SPEC section 3 rows 16-19. Everything here runs under one deadline of
``backend_connect_timeout`` (TCP or unix connect plus the backend's answer
head); the caller applies it. The answer head is parsed by h11 in the client
role; after a 101, h11 hands back the bytes the backend sent after its head
(``trailing_data``), which the caller delivers to the client after our own
101 so that nothing the backend says early is lost.

A non-101 answer is read (body up to 64 KiB, h11 decodes chunked framing) and
raised as :class:`~gatewayd.errors.BackendRefusedUpgrade` to be relayed: the
connection is never tunnelled after it (row 18, no request smuggling).
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

import h11
import trio

from gatewayd.config import BackendTarget
from gatewayd.errors import BackendBadUpgrade, BackendRefusedUpgrade, BackendUnavailable
from gatewayd.handshake import (
    Accepted,
    BackendAnswer,
    ClientInfo,
    Upgraded,
    build_backend_request,
    check_backend_response,
)

logger = logging.getLogger("gatewayd.backend")

#: Largest backend answer head we read (status line + headers).
MAX_ANSWER_HEAD = 65536
#: Largest non-101 body relayed to the client (SPEC row 18).
MAX_RELAYED_BODY = 65536
_RECEIVE_SIZE = 65536


@dataclass
class BackendConnection:
    """An upgraded backend connection, ready to splice.

    Attributes:
        stream: the byte stream to the backend (after its 101 head).
        upgraded: what the backend chose (subprotocol, extensions, extra headers).
        early: bytes the backend sent after its 101 head, to relay first.
    """

    stream: trio.abc.Stream
    upgraded: Upgraded
    early: bytes


async def open_stream(target: BackendTarget) -> trio.SocketStream:
    """Open a TCP (``ws://``) or unix-socket (``unix:``) stream to ``target``.

    Raises:
        BackendUnavailable: connection refused, host unreachable, no such socket.
    """
    try:
        if target.scheme == "unix":
            assert target.unix_path is not None
            return await trio.open_unix_socket(str(target.unix_path))
        assert target.host is not None and target.port is not None
        stream = await trio.open_tcp_stream(target.host, target.port)
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, "") or type(exc).__name__
        raise BackendUnavailable(target.url, f"connect failed: {reason} {exc.strerror or exc}") from None
    # Frames are small and latency matters; Nagle only adds delay here.
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


def _answer_from(event: h11.InformationalResponse | h11.Response) -> BackendAnswer:
    return BackendAnswer(
        status=event.status_code,
        reason=event.reason.decode("latin-1"),
        headers=tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in event.headers.raw_items()
        ),
    )


async def _receive(stream: trio.abc.Stream, target: BackendTarget) -> bytes:
    try:
        return bytes(await stream.receive_some(_RECEIVE_SIZE))
    except trio.BrokenResourceError as exc:
        raise BackendUnavailable(target.url, f"connection reset before the answer ({exc.__cause__ or exc})") from None


async def upgrade(
    target: BackendTarget, accepted: Accepted, client: ClientInfo
) -> BackendConnection:
    """Connect to ``target``, forward the upgrade request and validate the answer.

    The caller bounds this with ``backend_connect_timeout``.

    Raises:
        BackendUnavailable: refused, unreachable, reset or closed before a full answer (502).
        BackendBadUpgrade: a 101 that breaks RFC 6455 section 4.1 (502).
        BackendRefusedUpgrade: any other status, to be relayed (row 18).
    """
    stream = await open_stream(target)
    try:
        return await _upgrade_on(stream, target, accepted, client)
    except BaseException:
        stream.socket.close()
        raise


async def _upgrade_on(
    stream: trio.SocketStream, target: BackendTarget, accepted: Accepted, client: ClientInfo
) -> BackendConnection:
    try:
        await stream.send_all(build_backend_request(accepted, client))
    except trio.BrokenResourceError as exc:
        raise BackendUnavailable(target.url, f"connection reset while sending the request ({exc.__cause__ or exc})") from None

    # h11 must believe it sent the request to parse the answer; what it renders is discarded.
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_HEAD)
    conn.send(
        h11.Request(
            method="GET",
            target=accepted.target,
            headers=[("Host", "backend"), ("Connection", "Upgrade"), ("Upgrade", "websocket")],
        )
    )
    conn.send(h11.EndOfMessage())

    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BackendBadUpgrade(target.url, f"malformed answer: {exc}") from None
        if event is h11.NEED_DATA:
            data = await _receive(stream, target)
            if not data:
                raise BackendUnavailable(target.url, "closed the connection before answering")
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                answer = _answer_from(event)
                upgraded = check_backend_response(accepted, answer, target.url)
                early, _closed = conn.trailing_data
                return BackendConnection(stream=stream, upgraded=upgraded, early=bytes(early))
            continue  # 100 Continue and friends: keep reading
        if isinstance(event, h11.Response):
            answer = _answer_from(event)
            body = await _read_body(conn, stream, target)
            raise BackendRefusedUpgrade(
                target.url, answer.status, answer.reason, answer.headers, body
            )
        raise BackendBadUpgrade(target.url, f"unexpected answer event {type(event).__name__}")


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, target: BackendTarget) -> bytes:
    """Up to MAX_RELAYED_BODY bytes of a non-101 answer's body."""
    body = bytearray()
    while len(body) < MAX_RELAYED_BODY:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            break
        if event is h11.NEED_DATA:
            try:
                data = bytes(await stream.receive_some(_RECEIVE_SIZE))
            except trio.BrokenResourceError:
                break
            # b"" tells h11 the connection closed: a close-delimited body ends there.
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Data):
            body += event.data
            continue
        break  # EndOfMessage, ConnectionClosed, PAUSED
    return bytes(body[:MAX_RELAYED_BODY])
