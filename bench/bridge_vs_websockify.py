#!/usr/bin/env python3
"""Throughput of gatewayd's tcp:// bridge next to websockify, on this machine.

Both proxies run as their own processes on plain ws:// (no TLS: this measures
the bridging, not the TLS engine), in front of the same TCP echo service
(asyncio, its own process). The load comes from this process with the
``websockets`` asyncio client, identical for both. Three measurements each:

* echo msg/s: N connections, each sending a 64-byte binary message and waiting
  for its echo, for a fixed time (round trips per second, all connections);
* bulk MB/s: one connection sending 64 KiB messages while reading the echo
  (MiB per second echoed, so that many bytes went each way);
* handshakes/s: connections opened, upgraded and closed, C at a time.

Usage (about a minute; websockify is not a gatewayd dependency):

    pip install websockify
    python bench/bridge_vs_websockify.py [--seconds 4] [--connections 16] [--bulk-mib 48]

Everything is bounded: each phase by --seconds (bulk by size and a timeout),
the whole run by --limit seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.client import connect

ECHO_SERVER = """
import asyncio, sys
async def handle(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


@dataclass
class Proxy:
    name: str
    url: str
    process: subprocess.Popen[bytes]


def start_gatewayd(echo_port: int, folder: Path) -> Proxy:
    port = free_port()
    config = folder / "gatewayd.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            max_connections = 10000

            [log]
            level = "warning"
            access_log = false

            [[listener]]
            address = "127.0.0.1:{port}"
            tls = false

            [[host]]
            names = ["127.0.0.1"]
            default = true

            [[host.route]]
            path_prefix = "/"
            backend = "tcp://127.0.0.1:{echo_port}"
            """
        )
    )
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    process = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(port)
    return Proxy("gatewayd", f"ws://127.0.0.1:{port}/", process)


def start_websockify(echo_port: int) -> Proxy:
    port = free_port()
    command = shutil.which("websockify", path=str(Path(sys.executable).parent)) or shutil.which(
        "websockify"
    )
    if command is None:
        raise SystemExit("websockify is not installed: pip install websockify")
    process = subprocess.Popen(
        [command, f"127.0.0.1:{port}", f"127.0.0.1:{echo_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(port)
    return Proxy("websockify", f"ws://127.0.0.1:{port}/", process)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


# ------------------------------------------------------------------ measurements


async def echo_rate(url: str, connections: int, seconds: float) -> float:
    """Round trips per second of 64-byte messages over ``connections`` connections."""
    message = os.urandom(64)
    deadline = time.monotonic() + seconds
    counts = [0] * connections

    async def one(index: int) -> None:
        async with connect(url, subprotocols=["binary"], max_size=None, compression=None) as ws:  # type: ignore[list-item]
            while time.monotonic() < deadline:
                await ws.send(message)
                received = b""
                while len(received) < len(message):
                    received += bytes(await ws.recv())  # type: ignore[arg-type]
                counts[index] += 1

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(connections)))
    return sum(counts) / (time.monotonic() - start)


async def bulk_rate(url: str, mib: int, timeout: float) -> float:
    """MiB/s echoed over one connection sending 64 KiB messages (as many bytes each way)."""
    chunk = os.urandom(65536)
    total = mib * 1024 * 1024

    async with connect(
        url, subprotocols=["binary"], max_size=None, compression=None,  # type: ignore[list-item]
        write_limit=1 << 20,
    ) as ws:
        start = time.monotonic()

        async def sender() -> None:
            for _ in range(total // len(chunk)):
                await ws.send(chunk)

        async def receiver() -> int:
            got = 0
            while got < total:
                got += len(await ws.recv())  # type: ignore[arg-type]
            return got

        _, got = await asyncio.wait_for(asyncio.gather(sender(), receiver()), timeout)
        elapsed = time.monotonic() - start
    return got / (1024 * 1024) / elapsed


async def handshake_rate(url: str, concurrency: int, seconds: float) -> float:
    """Connections opened (handshake), used once and closed, per second."""
    deadline = time.monotonic() + seconds
    count = 0

    async def worker() -> None:
        nonlocal count
        while time.monotonic() < deadline:
            async with connect(url, subprotocols=["binary"], compression=None) as ws:  # type: ignore[list-item]
                await ws.send(b"hi")
                await ws.recv()
            count += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.monotonic() - start)


async def measure(proxy: Proxy, args: argparse.Namespace) -> dict[str, float]:
    await echo_rate(proxy.url, 2, 0.5)  # warm up
    return {
        "echo": await echo_rate(proxy.url, args.connections, args.seconds),
        "bulk": await bulk_rate(proxy.url, args.bulk_mib, timeout=args.seconds * 15),
        "handshakes": await handshake_rate(proxy.url, args.concurrency, args.seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each timed phase")
    parser.add_argument("--connections", type=int, default=16, help="connections for echo msg/s")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel handshakes")
    parser.add_argument("--bulk-mib", type=int, default=48, help="MiB sent for bulk MB/s")
    parser.add_argument("--limit", type=float, default=110.0, help="bound on the whole run (s)")
    args = parser.parse_args()

    signal.signal(signal.SIGALRM, lambda *_: sys.exit("benchmark took too long: stopped"))
    signal.alarm(int(args.limit))
    echo_port = free_port()
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_port)])
    results: dict[str, dict[str, float]] = {}
    try:
        wait_listening(echo_port)
        with tempfile.TemporaryDirectory() as folder:
            starters: list[Callable[[], Proxy]] = [
                lambda: start_gatewayd(echo_port, Path(folder)),
                lambda: start_websockify(echo_port),
            ]
            for start in starters:
                proxy = start()
                try:
                    results[proxy.name] = asyncio.run(measure(proxy, args))
                finally:
                    stop(proxy.process)
    finally:
        stop(echo)

    cpus = os.cpu_count()
    print(f"bridge vs websockify on {cpus} CPU(s), Python {sys.version.split()[0]}, plain ws://, "
          f"same TCP echo service and client")
    print(f"{'':12}{'echo msg/s':>16}{'bulk MiB/s':>14}{'handshakes/s':>16}")
    print(f"{'':12}{'(64 B, ' + str(args.connections) + ' conns)':>16}"
          f"{'(64 KiB msgs)':>14}{'(' + str(args.concurrency) + ' at a time)':>16}")
    for name, figures in results.items():
        print(f"{name:12}{figures['echo']:>16,.0f}{figures['bulk']:>14,.1f}"
              f"{figures['handshakes']:>16,.0f}")
    if len(results) == 2:
        g, w = results["gatewayd"], results["websockify"]
        print(f"{'ratio':12}{g['echo'] / w['echo']:>15.2f}x{g['bulk'] / w['bulk']:>13.2f}x"
              f"{g['handshakes'] / w['handshakes']:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
