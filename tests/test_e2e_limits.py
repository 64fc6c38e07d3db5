"""Connection limits hold for the whole gateway with ``workers = 2`` (issue #13 finding 1).

The real daemon (a supervisor and two worker processes on one listening socket)
and many TLS clients from one address, 127.0.0.1. A connection a limit refuses
is closed before TLS, so "admitted" is "its TLS handshake completed"; admitted
connections are held open (``handshake_timeout`` is long) until the test ends.

Which worker accepts is up to the kernel. To make both workers take part for
certain, some tests pause one worker (SIGSTOP: a stopped process cannot
accept, so the other gets every new connection; see test_workers.py), open
connections through the other, then swap. Before the fix every worker counted
alone, so the second worker admitted the whole limit again.
"""

from __future__ import annotations

import os
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from harness import echo_backend
from test_service import Pki, Service, pki  # noqa: F401  (pki: fixture)
from test_workers import only, supervised, worker_pids, workers_config


def limits_config(echo_port: int, *, proxy_protocol: bool = False, **gateway: float) -> str:
    keys = "".join(f"{key} = {value}\n" for key, value in gateway.items())
    text = workers_config(echo_port).replace(
        "[gateway]\n", f"[gateway]\nhandshake_timeout = 60.0\n{keys}", 1
    )
    if proxy_protocol:
        text = text.replace(
            'address = "127.0.0.1:0"\n', 'address = "127.0.0.1:0"\nproxy_protocol = true\n', 1
        )
    return text


class Clients:
    """TLS connections from 127.0.0.1, the admitted ones held open."""

    def __init__(
        self, port: int, context: ssl.SSLContext, stack: AsyncExitStack, preamble: bytes = b""
    ) -> None:
        self.port = port
        #: Sent before TLS: a PROXY header naming the client (a load balancer's).
        self.preamble = preamble
        self.context = context
        self.stack = stack
        self.held: list[trio.SSLStream[trio.SocketStream]] = []

    async def _one(self, admitted: list[bool]) -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", self.port)
        stream = trio.SSLStream(tcp, self.context, server_hostname="localhost")
        try:
            with trio.fail_after(20):
                if self.preamble:
                    await tcp.send_all(self.preamble)
                await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError):
            await tcp.aclose()   # closed before TLS: refused
            return
        self.held.append(stream)
        self.stack.push_async_callback(stream.aclose)
        admitted.append(True)

    async def open(self, count: int) -> int:
        """Open ``count`` connections at once; how many were admitted."""
        admitted: list[bool] = []
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(self._one, admitted)
        return len(admitted)


@asynccontextmanager
async def gateway(
    tmp_path: Path, pki: Pki, *, preamble: bytes = b"", **keys: float
) -> AsyncIterator[tuple[Service, Clients]]:
    async with AsyncExitStack() as stack:
        echo_port = await stack.enter_async_context(echo_backend())
        service = await stack.enter_async_context(
            supervised(tmp_path, limits_config(echo_port, proxy_protocol=bool(preamble), **keys))
        )
        clients = Clients(service.port, pki.context, AsyncExitStack(), preamble)
        await stack.enter_async_context(clients.stack)
        yield service, clients


async def test_per_ip_limit_many_clients_at_once(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with gateway(tmp_path, pki, max_connections_per_ip=10) as (_, clients):
            assert await clients.open(40) == 10
            assert await clients.open(10) == 0


async def test_per_ip_limit_counts_the_other_workers_connections(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with gateway(tmp_path, pki, max_connections_per_ip=10) as (service, clients):
            with only(service, 1):
                assert await clients.open(6) == 6
            with only(service, 2):
                assert await clients.open(10) == 4   # before the fix: 10
            # Closing some frees that many, whichever worker held them.
            for stream in clients.held[:3]:
                await stream.aclose()
            freed = 0
            with trio.fail_after(10):
                while freed < 3:   # a worker may not have seen its close yet
                    freed += await clients.open(1) or await trio.sleep(0.05) or 0
            assert await clients.open(10) == 0


async def test_max_connections_is_the_whole_gateways(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with gateway(tmp_path, pki, max_connections=10) as (service, clients):
            with only(service, 1):
                assert await clients.open(7) == 7
            with only(service, 2):
                assert await clients.open(10) == 3   # before the fix: 10
            assert await clients.open(20) == 0


async def test_max_connections_many_clients_at_once(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(60):
        async with gateway(tmp_path, pki, max_connections=12) as (_, clients):
            assert await clients.open(40) == 12


async def test_handshake_rate_is_one_bucket_for_the_gateway(tmp_path: Path, pki: Pki) -> None:
    # 0.02/s: a burst of one, the next token 50 s later (well past the test).
    with trio.fail_after(60):
        async with gateway(tmp_path, pki, handshakes_per_ip_per_second=0.02) as (service, clients):
            with only(service, 1):
                assert await clients.open(3) == 1
            with only(service, 2):
                assert await clients.open(3) == 0    # before the fix: 1
            assert await clients.open(10) == 0


async def test_a_killed_worker_releases_what_it_held(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(90):
        async with gateway(
            tmp_path, pki, max_connections_per_ip=10, max_connections=15
        ) as (service, clients):
            with only(service, 1):
                assert await clients.open(8) == 8
            with only(service, 2):
                assert await clients.open(5) == 2
            mark = len(service.log)
            os.kill(worker_pids(service)[1], signal.SIGKILL)
            await service.wait_log(r"worker 1 .* died", since=mark)
            # Worker 1's 8 are gone with it; worker 2 holds 2: 8 more per IP,
            # whichever worker (2, or 1's replacement) takes them.
            assert await clients.open(12) == 8


async def test_per_ip_limit_behind_the_proxy_protocol(tmp_path: Path, pki: Pki) -> None:
    # The case kernel steering by peer address cannot serve: every connection
    # comes from the load balancer; the client is named in the PROXY header.
    header = b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 443\r\n"
    with trio.fail_after(60):
        async with gateway(
            tmp_path, pki, preamble=header, max_connections_per_ip=5
        ) as (service, clients):
            with only(service, 1):
                assert await clients.open(3) == 3
            with only(service, 2):
                assert await clients.open(5) == 2   # 192.0.2.9 has 5 in all
            assert await clients.open(20) == 0
