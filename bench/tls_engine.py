"""Benchmark: how gatewayd's TLS stream should drive OpenSSL.

Measures, on loopback, three server-side TLS engines against one and the same
client:

  bio     gatewayd.tls.TLSStream as shipped: pyOpenSSL over memory BIOs
          (ServerTLS.wrap, SNI callback included).
  socket  a prototype of the alternative: pyOpenSSL on the socket fd in
          non-blocking mode, retrying on WantRead/WantWrite with
          trio.lowlevel.wait_readable/wait_writable. Single task per
          connection, no full-duplex locking (so it is, if anything, favoured).
  stdlib  trio.SSLStream over the standard library's ssl module: the
          reference (memory BIOs too, but the BIO plumbing is in C).

Workloads (TLS 1.3, ECDSA P-256 certificate from trustme, same settings):

  bulk up     client -> server, 200 MB in 64 KiB writes; the server reads
              with receive_some(65536).
  bulk down   server -> client, 200 MB in 64 KiB send_all calls.
  ping-pong   64-byte message, echoed; round trips per second.
  handshakes  full TLS 1.3 handshakes per second (4 client threads; each
              connection: handshake, 1 byte from the server, close).
  memory      server memory (RSS growth) per idle connection, for 300
              connections held open after the handshake only, or after
              256 KiB each way: what thousands of quiet WebSockets cost.
              Each engine runs in a fresh server process for this.

The client runs in a separate process (blocking stdlib ssl, the same code for
every engine), so the figures are the cost of the server engine running in
one trio thread; with 2 cores, client and server each get one. Two figures
per workload:

  rate    what the client measured (wall clock): MB/s, round trips/s,
          handshakes/s. Sensitive to anything else running on the machine.
  cost    CPU time of the server's trio thread per unit of work
          (getrusage(RUSAGE_THREAD), so other processes do not count): ms
          per 100 MB, microseconds per round trip or handshake, as total
          (user + system) and user alone. This is what limits a gateway
          under load. The user part (Python and OpenSSL in our thread) is
          stable on a busy machine; the system part also holds the kernel's
          loopback TCP work, which varies with what the other core is doing.

Each measurement runs REPEAT times, engines interleaved; the table shows the
median and, for rates, the spread. The whole run takes well under 2 minutes.

Usage::

    .venv/bin/python bench/tls_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import os
import platform
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import cryptography
import OpenSSL
import trio
import trustme
from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gatewayd import tls
from gatewayd.config import Address, Config, HostConfig, ListenerConfig
from gatewayd.tls.stream import HandshakeInfo

NAME = "bench.test"
CHUNK = 65536
BULK_BYTES = 200 * 1024 * 1024
PING_SIZE = 64
PING_COUNT = 10000
HANDSHAKES = 600
HANDSHAKE_THREADS = 4
REPEAT = 5
MEMORY_CONNECTIONS = 300
MEMORY_PAYLOAD = 256 * 1024


# -- the client process (blocking stdlib ssl; identical for every engine) ----------


def _client_context(ca_path: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_path)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _connect(context: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(raw, server_hostname=NAME)


def _recv_exactly(sock: ssl.SSLSocket, size: int) -> None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError("server closed early")
        got += n


def client_bulk_up(context: ssl.SSLContext, port: int, total: int) -> float:
    chunk = os.urandom(CHUNK)
    with _connect(context, port) as sock:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            sock.sendall(chunk)
            sent += CHUNK
        _recv_exactly(sock, 1)  # the server has read everything
        elapsed = time.perf_counter() - start
        sock.unwrap()
    return total / elapsed / 1e6


def client_bulk_down(context: ssl.SSLContext, port: int, total: int) -> float:
    buffer = bytearray(CHUNK)
    with _connect(context, port) as sock:
        start = time.perf_counter()
        sock.sendall(b"g")
        got = 0
        while got < total:
            n = sock.recv_into(buffer)
            if not n:
                raise EOFError("server closed early")
            got += n
        elapsed = time.perf_counter() - start
        sock.unwrap()
    return total / elapsed / 1e6


def client_ping_pong(context: ssl.SSLContext, port: int, count: int) -> float:
    message = b"p" * PING_SIZE
    with _connect(context, port) as sock:
        for _ in range(100):  # warm up
            sock.sendall(message)
            _recv_exactly(sock, PING_SIZE)
        start = time.perf_counter()
        for _ in range(count):
            sock.sendall(message)
            _recv_exactly(sock, PING_SIZE)
        elapsed = time.perf_counter() - start
        sock.unwrap()
    return count / elapsed


def client_handshakes(context: ssl.SSLContext, port: int, total: int) -> float:
    per_thread = total // HANDSHAKE_THREADS
    failures: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(per_thread):
                with _connect(context, port) as sock:
                    _recv_exactly(sock, 1)
        except BaseException as exc:  # reported to the parent below
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(HANDSHAKE_THREADS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise failures[0]
    return per_thread * HANDSHAKE_THREADS / elapsed


_held: list[ssl.SSLSocket] = []


def client_hold(context: ssl.SSLContext, port: int, payload: int) -> float:
    """Open MEMORY_CONNECTIONS connections, exchange `payload` bytes each way on
    each, and keep them open (idle) until the "release" command."""
    chunk = os.urandom(CHUNK)
    for _ in range(MEMORY_CONNECTIONS):
        sock = _connect(context, port)
        _held.append(sock)
        sent = 0
        while sent < payload:
            sock.sendall(chunk)
            sent += CHUNK
        _recv_exactly(sock, payload + 1)  # the echo, then one byte: done
    return float(len(_held))


def client_release(context: ssl.SSLContext, port: int, amount: int) -> float:
    while _held:
        _held.pop().close()
    return 0.0


CLIENTS: dict[str, Callable[[ssl.SSLContext, int, int], float]] = {
    "hold": client_hold,
    "release": client_release,
    "bulk up": client_bulk_up,
    "bulk down": client_bulk_down,
    "ping-pong": client_ping_pong,
    "handshakes": client_handshakes,
}


def client_process(pipe: multiprocessing.connection.Connection, ca_path: str) -> None:
    context = _client_context(ca_path)
    while True:
        command = pipe.recv()
        if command is None:
            return
        workload, port, amount = command
        try:
            pipe.send(("ok", CLIENTS[workload](context, port, amount)))
        except Exception as exc:  # sent to the parent, which fails loudly
            pipe.send(("error", repr(exc)))


# -- server engines ------------------------------------------------------------------


class SocketModeStream:
    """Prototype: pyOpenSSL on the socket fd, non-blocking (one task at a time)."""

    def __init__(self, stream: trio.SocketStream, context: SSL.Context) -> None:
        self._stream = stream
        self._socket = stream.socket
        self._conn = SSL.Connection(context, self._socket)  # type: ignore[arg-type]
        # The SNI callback of ServerTLS keeps its decision here.
        self._conn.set_app_data(HandshakeInfo())
        self._conn.set_accept_state()

    async def _call(self, fn: Callable[[], Any]) -> Any:
        # Same checkpoint discipline as trio's own socket methods.
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        while True:
            try:
                result = fn()
            except SSL.WantReadError:
                await trio.lowlevel.wait_readable(self._socket)
                yielded = True
            except SSL.WantWriteError:
                await trio.lowlevel.wait_writable(self._socket)
                yielded = True
            else:
                if not yielded:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return result

    async def do_handshake(self) -> None:
        await self._call(self._conn.do_handshake)

    async def receive_some(self, max_bytes: int = CHUNK) -> bytes:
        try:
            data: bytes = await self._call(partial(self._conn.recv, max_bytes))
        except SSL.ZeroReturnError:
            return b""
        return data

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            # WantWrite must be retried with the same buffer: view[0:] is.
            sent: int = await self._call(partial(self._conn.send, view))
            view = view[sent:]

    async def aclose(self) -> None:
        with contextlib.suppress(SSL.Error):  # the bench client may be gone already
            self._conn.shutdown()
        await self._stream.aclose()


class Engines:
    """Builds the three server engines from one certificate and one config."""

    def __init__(self, folder: Path) -> None:
        self.cert_path = folder / "cert.pem"
        self.key_path = folder / "key.pem"
        config = Config(
            path=folder / "bench.toml",
            listeners=(ListenerConfig(Address("127.0.0.1", 0)),),
            hosts=(
                HostConfig(
                    names=(NAME,), routes=(), certificate=self.cert_path, private_key=self.key_path
                ),
            ),
        )
        self.server_tls = tls.ServerTLS.from_config(config)
        self.stdlib_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.stdlib_context.load_cert_chain(self.cert_path, self.key_path)
        self.stdlib_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.stdlib_context.set_ciphers(config.tls.ciphers)
        self.stdlib_context.set_alpn_protocols(["http/1.1"])

    def wrap(self, engine: str, stream: trio.SocketStream) -> Any:
        if engine == "bio":
            return self.server_tls.wrap(stream)
        if engine == "socket":
            return SocketModeStream(stream, self.server_tls._context)
        return trio.SSLStream(stream, self.stdlib_context, server_side=True)


async def serve_bulk_up(stream: Any, total: int) -> None:
    got = 0
    while got < total:
        data = await stream.receive_some(CHUNK)
        if not data:
            raise EOFError("client closed early")
        got += len(data)
    await stream.send_all(b"k")


async def serve_bulk_down(stream: Any, total: int) -> None:
    chunk = memoryview(os.urandom(CHUNK))
    await stream.receive_some(1)
    sent = 0
    while sent < total:
        await stream.send_all(chunk)
        sent += CHUNK


async def serve_ping_pong(stream: Any, count: int) -> None:
    while True:
        data = await stream.receive_some(CHUNK)
        if not data:
            return
        await stream.send_all(data)


async def serve_hold(stream: Any, payload: int) -> None:
    got = 0
    while got < payload:
        data = await stream.receive_some(CHUNK)
        if not data:
            raise EOFError("client closed early")
        got += len(data)
        await stream.send_all(data)
    await stream.send_all(b"d")


async def serve_handshake(stream: Any, count: int) -> None:
    await stream.do_handshake()
    await stream.send_all(b"x")


SERVERS: dict[str, Callable[[Any, int], Awaitable[None]]] = {
    "bulk up": serve_bulk_up,
    "bulk down": serve_bulk_down,
    "ping-pong": serve_ping_pong,
    "handshakes": serve_handshake,
}


def _thread_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime, usage.ru_stime


async def measure(
    engines: Engines,
    engine: str,
    workload: str,
    amount: int,
    pipe: multiprocessing.connection.Connection,
) -> tuple[float, float, float]:
    """One run: serve `workload` with `engine` while the client measures it.

    Returns the client's rate and the server thread's user and system CPU
    seconds.
    """
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]

    async def handle(transport: trio.SocketStream) -> None:
        stream = engines.wrap(engine, transport)
        try:
            await SERVERS[workload](stream, amount)
        except (trio.BrokenResourceError, SSL.Error, ssl.SSLError, OSError):
            # Only the handshake workload's clients hang up without close_notify.
            if workload != "handshakes":
                raise
        finally:
            # The client may have hung up already: nothing left to close cleanly.
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, SSL.Error, OSError
                ),
            ):
                await stream.aclose()

    async def accept_loop() -> None:
        async with trio.open_nursery() as handlers:
            while True:
                transport = await listener.accept()
                handlers.start_soon(handle, transport)

    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop)
        # The trio loop (every handler) runs in this thread; waiting for the
        # client's answer happens in a worker thread.
        user_start, system_start = _thread_cpu()
        pipe.send((workload, port, amount))
        status, value = await trio.to_thread.run_sync(pipe.recv)
        user_end, system_end = _thread_cpu()
        nursery.cancel_scope.cancel()
    if status != "ok":
        raise RuntimeError(f"{engine} {workload}: client failed: {value}")
    return float(value), user_end - user_start, system_end - system_start


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_server_process(
    pipe: multiprocessing.connection.Connection, folder: str, engine: str, payload: int
) -> None:
    """Serve MEMORY_CONNECTIONS held connections with `engine`; report KiB each."""

    async def serve() -> None:
        engines = Engines(Path(folder))
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        held: list[Any] = []
        done = trio.Event()

        async def handle(transport: trio.SocketStream) -> None:
            stream = engines.wrap(engine, transport)
            await serve_hold(stream, payload)
            held.append(stream)
            if len(held) == MEMORY_CONNECTIONS:
                done.set()
            await trio.sleep_forever()

        async with listener, trio.open_nursery() as nursery:

            async def accept_loop() -> None:
                while True:
                    nursery.start_soon(handle, await listener.accept())

            nursery.start_soon(accept_loop)
            gc.collect()
            before = _rss_kib()
            pipe.send(listener.socket.getsockname()[1])
            await done.wait()
            gc.collect()
            pipe.send((_rss_kib() - before) / MEMORY_CONNECTIONS)
            await trio.to_thread.run_sync(pipe.recv)  # until the parent is done
            nursery.cancel_scope.cancel()

    trio.run(serve)


async def measure_memory(
    folder: str, engine: str, payload: int, client_pipe: multiprocessing.connection.Connection
) -> float:
    """KiB of server memory per held connection, in a fresh server process."""
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    server = spawn.Process(
        target=memory_server_process, args=(child, folder, engine, payload), daemon=True
    )
    server.start()
    try:
        port = await trio.to_thread.run_sync(parent.recv)
        client_pipe.send(("hold", port, payload))
        status, value = await trio.to_thread.run_sync(client_pipe.recv)
        if status != "ok":
            raise RuntimeError(f"{engine} memory: client failed: {value}")
        per_connection = float(await trio.to_thread.run_sync(parent.recv))
        parent.send(None)
    finally:
        client_pipe.send(("release", 0, 0))
        await trio.to_thread.run_sync(client_pipe.recv)
        await trio.to_thread.run_sync(server.join, 5)
        if server.is_alive():
            server.kill()
    return per_connection


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, trio {trio.__version__}, "
        f"pyOpenSSL {OpenSSL.__version__}, cryptography {cryptography.__version__} "
        f"({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}), "
        f"stdlib ssl ({ssl.OPENSSL_VERSION})"
    )


async def run(quick: bool) -> None:
    amounts = {
        "bulk up": BULK_BYTES // (10 if quick else 1),
        "bulk down": BULK_BYTES // (10 if quick else 1),
        "ping-pong": PING_COUNT // (10 if quick else 1),
        "handshakes": HANDSHAKES // (6 if quick else 1),
    }
    units = {
        "bulk up": "MB/s",
        "bulk down": "MB/s",
        "ping-pong": "round trips/s",
        "handshakes": "handshakes/s",
    }
    # Server CPU per unit of work: (unit label, how many units one run is).
    cost_units: dict[str, tuple[str, Callable[[int], float]]] = {
        "bulk up": ("ms/100MB", lambda n: n / 100e6 / 1e3),
        "bulk down": ("ms/100MB", lambda n: n / 100e6 / 1e3),
        "ping-pong": ("us/round trip", lambda n: (n + 100) / 1e6),
        "handshakes": (
            "us/handshake",
            lambda n: (n // HANDSHAKE_THREADS * HANDSHAKE_THREADS) / 1e6,
        ),
    }
    engines_list = ["bio", "socket", "stdlib"]
    repeat = 1 if quick else REPEAT
    print(describe_machine())
    print(f"load average before: {_loadavg()}")
    with tempfile.TemporaryDirectory() as folder:
        ca = trustme.CA()
        ca_path = Path(folder) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        leaf = ca.issue_cert(NAME)  # ECDSA P-256, trustme's default
        (Path(folder) / "cert.pem").write_bytes(
            b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        )
        (Path(folder) / "key.pem").write_bytes(leaf.private_key_pem.bytes())
        engines = Engines(Path(folder))
        spawn = multiprocessing.get_context("spawn")
        parent, child = spawn.Pipe()
        client = spawn.Process(target=client_process, args=(child, str(ca_path)), daemon=True)
        client.start()
        started = time.perf_counter()
        results: dict[tuple[str, str], list[float]] = {}
        costs: dict[tuple[str, str], list[tuple[float, float]]] = {}
        memory: dict[tuple[int, str], float] = {}
        try:
            for payload in (0, MEMORY_PAYLOAD):
                for engine in engines_list:
                    memory[(payload, engine)] = await measure_memory(
                        folder, engine, payload, parent
                    )
            for workload, amount in amounts.items():
                units_done = cost_units[workload][1](amount)
                for _ in range(repeat):
                    for engine in engines_list:
                        value, user, system = await measure(
                            engines, engine, workload, amount, parent
                        )
                        results.setdefault((workload, engine), []).append(value)
                        costs.setdefault((workload, engine), []).append(
                            ((user + system) / units_done, user / units_done)
                        )
        finally:
            parent.send(None)
            client.join(5)
        total = time.perf_counter() - started

    width = 22
    header = f"{'workload':<11} {'rate (client)':<15}" + "".join(
        f"{name:>{width}}" for name in engines_list
    )
    print()
    print(header)
    print("-" * len(header))
    for workload in amounts:
        row = f"{workload:<11} {units[workload]:<15}"
        for engine in engines_list:
            values = results[(workload, engine)]
            cell = f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
            row += f"{cell:>{width}}"
        print(row)
    print()
    header = f"{'workload':<11} {'server CPU':<15}" + "".join(
        f"{name:>{width}}" for name in engines_list
    )
    print(header)
    print("-" * len(header))
    for workload in amounts:
        row = f"{workload:<11} {cost_units[workload][0]:<15}"
        for engine in engines_list:
            runs = costs[(workload, engine)]
            total_cpu = statistics.median(run[0] for run in runs)
            user_cpu = statistics.median(run[1] for run in runs)
            cell = f"{total_cpu:.1f} ({user_cpu:.1f} user)"
            row += f"{cell:>{width}}"
        print(row)
    print()
    header = f"{'memory':<11} {'KiB/connection':<15}" + "".join(
        f"{name:>{width}}" for name in engines_list
    )
    print(header)
    print("-" * len(header))
    for payload, label in ((0, "handshake only"), (MEMORY_PAYLOAD, "256 KiB each way")):
        row = f"{'idle after':<11} {label:<15}"
        for engine in engines_list:
            row += f"{memory[(payload, engine)]:>{width}.1f}"
        print(row)
    print()
    print("bio = gatewayd TLSStream (memory BIOs); socket = pyOpenSSL on the fd (prototype);")
    print("stdlib = trio.SSLStream + ssl. Rates: median (min-max).")
    print("Server CPU: median of user+system (median of user alone).")
    print(f"{repeat} runs each, engines interleaved; total {total:.0f} s;", end=" ")
    print(f"load average after: {_loadavg()}")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the work, one repetition")
    args = parser.parse_args()
    trio.run(run, args.quick)


if __name__ == "__main__":
    main()
