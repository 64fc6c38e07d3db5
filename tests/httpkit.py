"""HTTP/1.1 peers for the HTTP proxy tests: an h11 backend application and an h11 client.

Both are built on h11, like the gateway, but they are independent programs:
the backend answers over its own sockets, and the client reads answers the
way a browser does (framing from the head, keep-alive).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import trio


@dataclass
class Seen:
    """What the backend received: one entry per request, per backend connection."""

    requests: list[dict[str, object]] = field(default_factory=list)
    connections: int = 0


def _headers(event: h11.Request | h11.Response | h11.InformationalResponse) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()]


async def _send(stream: trio.abc.Stream, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def app_connection(stream: trio.abc.Stream, seen: Seen) -> None:
    """One backend connection: serves requests until the gateway closes it.

    Paths:
        /info       200, JSON of what arrived (method, target, headers, body length and sha256)
        /echo       200, the body streamed back as it arrives (chunked)
        /bytes/N    200, N bytes of a pattern (Content-Length), streamed in 64 KiB pieces
        /chunked/N  200, N bytes, chunked
        /slow/S     sleeps S seconds, then 200
        /early      413 at once, before reading the body, then close
        /status/N   status N (204 and 304 without body; others with "status N")
        /hints      103 Early Hints, then 200
        /close      200 with Connection: close
    """
    seen.connections += 1
    peer = stream.socket.getpeername() if isinstance(stream, trio.SocketStream) else ("unix", 0)
    conn = h11.Connection(h11.SERVER)
    while True:
        event = await _next(stream, conn)
        if not isinstance(event, h11.Request):
            return
        target = event.target.decode()
        record: dict[str, object] = {
            "method": event.method.decode(),
            "target": target,
            "version": event.http_version.decode(),
            "headers": _headers(event),
            "peer": list(peer) if isinstance(peer, tuple) else peer,
        }
        seen.requests.append(record)
        path = target.split("?")[0]
        if path == "/early":
            await _send(stream, conn, h11.Response(status_code=413, headers=[("Content-Length", "4"), ("Connection", "close")]))
            await _send(stream, conn, h11.Data(data=b"nope"))
            await _send(stream, conn, h11.EndOfMessage())
            return
        if path == "/echo":
            await _send(stream, conn, h11.Response(status_code=200, headers=[("Content-Type", "application/octet-stream")]))
            while True:
                part = await _next(stream, conn)
                if isinstance(part, h11.Data):
                    await _send(stream, conn, h11.Data(data=bytes(part.data)))
                    continue
                break
            await _send(stream, conn, h11.EndOfMessage())
        else:
            digest = hashlib.sha256()
            size = 0
            while True:
                part = await _next(stream, conn)
                if isinstance(part, h11.Data):
                    digest.update(part.data)
                    size += len(part.data)
                    continue
                break
            record["body_length"] = size
            record["body_sha256"] = digest.hexdigest()
            await _answer(stream, conn, path, record, head=event.method == b"HEAD")
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _answer(
    stream: trio.abc.Stream, conn: h11.Connection, path: str, record: dict[str, object], *, head: bool = False
) -> None:
    if path.startswith("/bytes/") or path.startswith("/chunked/"):
        size = int(path.rsplit("/", 1)[1])
        headers = [("Content-Type", "application/octet-stream")]
        if path.startswith("/bytes/"):
            headers.append(("Content-Length", str(size)))
        await _send(stream, conn, h11.Response(status_code=200, headers=headers))
        block = bytes(range(256)) * 256
        left = 0 if head else size
        while left > 0:
            piece = block[: min(left, len(block))]
            await _send(stream, conn, h11.Data(data=piece))
            left -= len(piece)
        await _send(stream, conn, h11.EndOfMessage())
        return
    if path.startswith("/slow/"):
        await trio.sleep(float(path.rsplit("/", 1)[1]))
    if path.startswith("/status/"):
        status = int(path.rsplit("/", 1)[1])
        if status in (204, 304):
            headers = [("ETag", '"x"')] if status == 304 else []
            await _send(stream, conn, h11.Response(status_code=status, headers=headers))
            await _send(stream, conn, h11.EndOfMessage())
            return
        body = f"status {status}".encode()
        await _send(stream, conn, h11.Response(status_code=status, headers=[("Content-Length", str(len(body)))]))
        await _send(stream, conn, h11.Data(data=body))
        await _send(stream, conn, h11.EndOfMessage())
        return
    if path == "/hints":
        await _send(stream, conn, h11.InformationalResponse(status_code=103, headers=[("Link", "</app.css>; rel=preload")]))
    body = json.dumps(record).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("X-Backend", "app"),
        ("Keep-Alive", "timeout=5"),
        ("Connection", "X-Hop"),
        ("X-Hop", "must not reach the client"),
    ]
    if path == "/close":
        headers[4] = ("Connection", "close")
    await _send(stream, conn, h11.Response(status_code=200, headers=headers))
    await _send(stream, conn, h11.Data(data=body))
    await _send(stream, conn, h11.EndOfMessage())


async def _next(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return h11.ConnectionClosed()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return h11.ConnectionClosed()
            conn.receive_data(data)
            continue
        return event


@asynccontextmanager
async def app_backend(seen: Seen) -> AsyncIterator[int]:
    """The h11 application backend on 127.0.0.1; yields its port."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await app_connection(stream, seen)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ client


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    informational: list[int] = field(default_factory=list)
    version: str = "1.1"

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> dict[str, object]:
        return json.loads(self.body)


class Client:
    """An HTTP/1.1 client on one connection (keep-alive), h11-framed."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        host: str = "localhost",
    ) -> Reply:
        all_headers = [("Host", host), *(headers or [])]
        if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in all_headers):
            all_headers.append(("Content-Length", str(len(body))))
        await _send(self.stream, self.conn, h11.Request(method=method, target=target, headers=all_headers))
        if body:
            await _send(self.stream, self.conn, h11.Data(data=body))
        await _send(self.stream, self.conn, h11.EndOfMessage())
        return await self.response()

    async def response(self) -> Reply:
        informational: list[int] = []
        while True:
            event = await _next(self.stream, self.conn)
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
                continue
            assert isinstance(event, h11.Response), event
            break
        body = bytearray()
        while True:
            part = await _next(self.stream, self.conn)
            if isinstance(part, h11.Data):
                body += part.data
                continue
            assert isinstance(part, h11.EndOfMessage), part
            break
        reply = Reply(event.status_code, _headers(event), bytes(body), informational, event.http_version.decode())
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return reply

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.IDLE
