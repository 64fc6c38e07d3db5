"""Active health checks: the route key ``health_check``, one task per backend and check.

Theory of operation
-------------------
:func:`checks_for` lists the checks a configuration asks for: one per
backend URL and kind of probe, even when several routes name the same URL
(they share its state, :class:`gatewayd.balancer.BackendState`). The
:class:`~gatewayd.server.Gateway` runs them (:func:`run_checks`) in a cancel
scope of the current configuration generation: a reload cancels them and
starts the new configuration's checks, whose first probe runs at once; the
verdicts live in the backend states and so survive the reload.

Each probe is bounded by ``backend_connect_timeout``:

* ``health_check = "tcp"``: the backend accepts a connection (TLS handshake
  included for ``wss://``); it is closed at once.
* ``health_check = "/path"``: a WebSocket opening handshake for ``/path``
  (wsproto in the client role validates the 101 and its accept value), then
  a close frame (1000) and the connection is closed.

One failed probe marks the backend down (logged once, as a warning), one
successful probe marks it up again (logged at info). A down backend gets no
new connections from any route; connections already open are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request
from wsproto.utilities import ProtocolError

from gatewayd.backend import BackendPool, BackendTLS, open_stream
from gatewayd.balancer import BackendState, check_name, iter_routes
from gatewayd.config import BackendTarget, Config
from gatewayd.errors import BackendUnavailable

logger = logging.getLogger("gatewayd.health")

_RECEIVE_SIZE = 65536
#: Bound on closing a probe connection.
_CLOSE_SECONDS = 1.0


@dataclass(frozen=True)
class Check:
    """One active health check of one backend.

    Attributes:
        target: the backend.
        probe: the route's ``health_check`` value: ``"tcp"`` or a path.
        name: how the check is named in the backend's verdicts and in logs.
        interval: seconds from the end of one probe to the start of the next.
        tls: TLS settings for a ``wss://`` backend.
        state: where the verdict goes.
    """

    target: BackendTarget
    probe: str
    name: str
    interval: float
    tls: BackendTLS | None
    state: BackendState


def checks_for(config: Config, pool: BackendPool) -> list[Check]:
    """The checks ``config`` asks for, one per (backend URL, probe), in file order."""
    checks: dict[tuple[str, str], Check] = {}
    for route in iter_routes(config):
        if not route.health_check:
            continue
        balancer = pool.balancer(route)
        for target, state in zip(route.backends, balancer.states, strict=True):
            key = (target.url, check_name(route))
            if key not in checks:
                checks[key] = Check(
                    target=target,
                    probe=route.health_check,
                    name=check_name(route),
                    interval=route.health_interval,
                    tls=pool.tls_for(route),
                    state=state,
                )
    return list(checks.values())


def _host_header(target: BackendTarget) -> str:
    if target.host is None:
        return "localhost"
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.tls else 80
    return host if target.port == default else f"{host}:{target.port}"


async def _websocket_probe(stream: trio.abc.Stream, target: BackendTarget, path: str) -> str | None:
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=_host_header(target), target=path)))
    while True:
        data = bytes(await stream.receive_some(_RECEIVE_SIZE))
        if not data:
            return "closed the connection before answering"
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                await stream.send_all(ws.send(CloseConnection(code=1000)))
                return None
            if isinstance(event, RejectConnection):
                return f"answered {event.status_code} instead of 101"


async def probe(
    target: BackendTarget, check: str, tls: BackendTLS | None, timeout: float
) -> str | None:
    """Probe ``target`` once; returns None when healthy, else why not."""
    with trio.move_on_after(timeout):
        try:
            stream = await open_stream(target, tls)
        except BackendUnavailable as exc:
            return exc.detail
        try:
            if check == "tcp":
                return None
            return await _websocket_probe(stream, target, check)
        except ProtocolError as exc:
            return f"bad handshake answer: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"connection lost: {exc.__cause__ or exc}"
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_SECONDS):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the backend is gone already; nothing left to close
    return f"no answer within {timeout:g}s"


def _record(check: Check, problem: str | None) -> None:
    previous = check.state.health.get(check.name)
    up = problem is None
    check.state.health[check.name] = up
    if not up and previous is not False:
        logger.warning(
            "health check %s of backend %s failed: %s; no new connections until it passes",
            check.name, check.target.url, problem,
        )
    elif up and previous is False:
        logger.info(
            "health check %s of backend %s passed: back in service", check.name, check.target.url
        )


async def _run_one(check: Check, timeout: float) -> None:
    while True:
        _record(check, await probe(check.target, check.probe, check.tls, timeout))
        await trio.sleep(check.interval)


async def run_checks(
    checks: list[Check],
    timeout: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run every check until cancelled (a reload or the shutdown cancels it)."""
    async with trio.open_nursery() as nursery:
        for check in checks:
            nursery.start_soon(_run_one, check, timeout)
        task_status.started()
