"""The admin endpoint: plain HTTP/1.1 on ``[admin] listen`` (SPEC section 2).

=========  ===========================================================================
GET path   answer
=========  ===========================================================================
/healthz   ``200 ok``: the process is alive and its event loop answers
/readyz    ``200 ready`` while the listeners accept with a loaded configuration;
           ``503`` before that and while shutting down (load balancers stop sending)
/metrics   ``200``, Prometheus text format (:mod:`gatewayd.metrics`)
=========  ===========================================================================

Any other path is ``404``; another method on one of these paths is ``405``
with ``Allow: GET``. A query string is ignored.

Theory of operation
-------------------
:class:`AdminServer` runs one accept loop over one bound socket (the socket
is bound by :class:`~gatewayd.server.Gateway`, which keeps it across reloads
like a listener and rebinds it when ``[admin] listen`` changes). Each admin
connection carries exactly one request and is closed after the answer
(``Connection: close``): a scraper or probe opens a new one each time, and no
idle keep-alive connection ever holds a slot.

The admin endpoint must never disturb the gateway, whatever its clients do:

* the request head is parsed by h11 and limited to :data:`MAX_HEAD` bytes
  (``431`` above, ``400`` when malformed); a body is never read;
* the request head must arrive within :data:`HEAD_TIMEOUT`, and the whole
  exchange, from accept to close, is bounded by :data:`TIMEOUT`;
* at most :data:`MAX_CONNECTIONS` admin connections are served at once, more
  are closed at once;
* every admin connection runs in the admin server's own nursery, and whatever
  goes wrong in one (even a bug of ours) is logged and ends that connection only.

The answers themselves come from :func:`respond`, a pure function of the
method, the target and the gateway's state.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import h11
import trio

from gatewayd.config import Address
from gatewayd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gatewayd.transport import send_and_linger

logger = logging.getLogger("gatewayd.admin")

#: Largest admin request head (request line and headers), bytes.
MAX_HEAD = 8192
#: Bound on one admin connection, from accept to close, seconds.
TIMEOUT = 10.0
#: Seconds a client has to send its request head.
HEAD_TIMEOUT = 2.0
#: Admin connections served at once; more are closed at once.
MAX_CONNECTIONS = 128
_RECEIVE_SIZE = 4096
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

PATHS = ("/healthz", "/readyz", "/metrics")
_TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class AdminResponse:
    """One admin answer, before rendering."""

    status: int
    body: bytes
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()

    def render(self, *, body: bool = True) -> bytes:
        """The response bytes: status line, headers, body (always ``Connection: close``).

        Args:
            body: False for an answer to HEAD (RFC 9110 9.3.2: headers only).
        """
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + self.body if body else head


def _text(status: int, text: str, headers: Sequence[tuple[str, str]] = ()) -> AdminResponse:
    return AdminResponse(status, (text + "\n").encode(), headers=tuple(headers))


def respond(
    method: str, target: str, *, ready: bool, metrics: Callable[[], bytes]
) -> AdminResponse:
    """The answer to one admin request (pure but for calling ``metrics``).

    Args:
        method: the request method, as sent.
        target: the request target; a query string is ignored.
        ready: whether the gateway is ready (``/readyz``).
        metrics: renders the metrics (called for ``GET /metrics`` only).
    """
    path = target.split("?", 1)[0]
    if path not in PATHS:
        return _text(404, "not found: try /healthz, /readyz or /metrics")
    if method != "GET":
        return _text(405, "method not allowed: only GET", [("Allow", "GET")])
    if path == "/healthz":
        return _text(200, "ok")
    if path == "/readyz":
        return _text(200, "ready") if ready else _text(503, "not ready")
    return AdminResponse(200, metrics(), content_type=METRICS_CONTENT_TYPE)


class AdminServer:
    """Serves :func:`respond` on one listening socket.

    Usage (by the gateway)::

        admin = AdminServer(address, sock, ready=lambda: ..., metrics=metrics.render)
        nursery.start_soon(admin.serve)
        ...
        admin.stop()      # stop accepting and close the socket; answers in flight finish
    """

    def __init__(
        self,
        address: Address,
        sock: trio.socket.SocketType,
        *,
        ready: Callable[[], bool],
        metrics: Callable[[], bytes],
        collect: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        """Args: ``address`` as configured; ``sock`` bound and listening.

        ``collect``, when given, gathers the metrics asynchronously for each
        ``GET /metrics`` instead of ``metrics`` (the supervisor of several
        workers asks each of them).
        """
        self.address = address
        self.listener = trio.SocketListener(sock)
        name = sock.getsockname()
        self.bound: tuple[str, int] = (str(name[0]), int(name[1]))
        self._ready = ready
        self._metrics = metrics
        self._collect = collect
        self._accepting = trio.CancelScope()
        self.active = 0

    @property
    def url(self) -> str:
        host, port = self.bound
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop accepting (the socket closes); connections being answered finish."""
        self._accepting.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and answer until :meth:`stop` (or cancellation); closes the socket."""
        try:
            async with trio.open_nursery() as nursery:
                with self._accepting:
                    task_status.started()
                    await self._accept_loop(nursery)
        finally:
            self.listener.socket.close()

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await self.listener.accept()
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                logger.warning("admin accept failed: %s; retrying", exc.strerror)
                await trio.sleep(0.1)
                continue
            if self.active >= MAX_CONNECTIONS:
                stream.socket.close()
                continue
            self.active += 1
            nursery.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(TIMEOUT):
                await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("admin client went away: %s", exc)
        except Exception:
            # Deliberately broad, and logged: the admin endpoint is auxiliary,
            # and no failure in it (our bug included) may reach the accept
            # loops or the connections of the gateway sharing its nursery.
            logger.exception("admin request failed")
        finally:
            self.active -= 1
            stream.socket.close()

    async def _exchange(self, stream: trio.SocketStream) -> None:
        """Read one request head with h11, answer it, linger, return."""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        head_deadline = trio.current_time() + HEAD_TIMEOUT
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in _REASONS else 400
                await self._answer(stream, _text(status, "bad request"))
                return
            if event is h11.NEED_DATA:
                # A client gets HEAD_TIMEOUT to send its request head: idle
                # connections must not keep a liveness probe out for long.
                with trio.move_on_at(head_deadline):
                    data = await stream.receive_some(_RECEIVE_SIZE)
                    connection.receive_data(bytes(data))
                    continue
                return
            if isinstance(event, h11.Request):
                method = event.method.decode("ascii", "replace")
                target = event.target.decode("ascii", "replace")
                metrics = self._metrics
                if self._collect is not None and method == "GET" and target.split("?", 1)[0] == "/metrics":
                    collected = await self._collect()
                    metrics = lambda: collected  # noqa: E731, B023 (called before the loop goes on)
                response = respond(method, target, ready=self._ready(), metrics=metrics)
                await self._answer(stream, response, body=method != "HEAD")
                return
            return  # ConnectionClosed before a request: nothing to answer

    async def _answer(
        self, stream: trio.SocketStream, response: AdminResponse, *, body: bool = True
    ) -> None:
        await send_and_linger(stream, response.render(body=body), receive_size=_RECEIVE_SIZE)
