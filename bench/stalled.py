"""The stalled-reader row: RSS per connection whose client stopped reading, and after they leave.

Each client opens TLS to the proxy, upgrades ``/echo`` (behind it an echo
backend), sends ``--send`` bytes in one go and then never reads. The echo
comes back towards a client that does not read: the proxy's backend -> client
direction stalls, the backend's writes stall, so it stops reading and the
client -> backend direction stalls too. Both directions of every connection
are then stalled inside the proxy. Clients use a small receive buffer
(``SO_RCVBUF``), so what is held is mostly the proxy's, not the kernel's.

Figures: the proxy's RSS (its process tree) before, while all ``--count``
connections are stalled (per connection: the growth divided by the count),
and some seconds after the clients closed (the high-water mark given back to
the system or not). Run by bench/run.py for each proxy; standalone:

    python bench/stalled.py --port 8443 --pid 1234 --count 200

With ``--bridge`` the proxy is a WebSocket-to-TCP bridge (gatewayd's
``tcp://`` backends, websockify) in front of a TCP echo server: the clients
ask for the ``binary`` subprotocol and send the bytes as masked binary frames
of 64 KiB; the bridge frames the echo back, towards the client that does not
read.

Also measured: the proxy's CPU use (cores, its process tree, from /proc)
while every connection is stalled, which is zero unless something spins.

Kernel socket buffers are not in the RSS; they are the same for every proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
from typing import Any

import trio

CLIENT_RCVBUF = 4096


def rss_kib(pid: int) -> int:
    """RSS of ``pid`` and its children (workers), KiB."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except OSError:
                continue
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its children (reaped ones included), seconds."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except OSError:
                continue
    ticks = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                ticks += sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15])
        except OSError:
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def upgrade(host: str, bridge: bool = False) -> bytes:
    protocol = "Sec-WebSocket-Protocol: binary\r\n" if bridge else ""
    return (
        f"GET /echo HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
    ).encode()


FRAME = 64 << 10
MASK = b"\x1f\x2e\x3d\x4c"


def frames(payload: bytes) -> bytes:
    """``payload`` as masked binary WebSocket frames of FRAME bytes (a client's, RFC 6455)."""
    out = bytearray()
    for start in range(0, len(payload), FRAME):
        chunk = payload[start:start + FRAME]
        n = len(chunk)
        out += b"\x82" + (bytes([0x80 | n]) if n < 126 else
                          b"\xfe" + n.to_bytes(2, "big") if n < 65536 else
                          b"\xff" + n.to_bytes(8, "big"))
        out += MASK
        key = int.from_bytes((MASK * (n // 4 + 1))[:n], "big")
        out += (int.from_bytes(chunk, "big") ^ key).to_bytes(n, "big")
    return bytes(out)


async def one_client(
    port: int, host: str, context: ssl.SSLContext, payload: bytes, opened: trio.Semaphore, bridge: bool
) -> trio.SSLStream[trio.SocketStream]:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SSLStream(trio.SocketStream(sock), context, server_hostname=host)
    async with opened:
        await stream.do_handshake()
        await stream.send_all(upgrade(host, bridge))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise RuntimeError("EOF before the 101")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"no 101: {head[:80]!r}")
    # Send without reading: move_on, since the proxy stops taking it at some point.
    with trio.move_on_after(2):
        await stream.send_all(payload)
    return stream


async def measure(
    port: int, pid: int, count: int, send: int, host: str, settle: float, linger: float, bridge: bool = False
) -> dict[str, Any]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    payload = frames(os.urandom(send)) if bridge else os.urandom(send)
    before = rss_kib(pid)
    streams: list[trio.SSLStream[trio.SocketStream]] = []
    opened = trio.Semaphore(16)

    async def run_one() -> None:
        streams.append(await one_client(port, host, context, payload, opened, bridge))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(run_one)
    # The first second lets the last sends reach the proxy; then nothing should move.
    await trio.sleep(1.0)
    cpu0, t0 = cpu_seconds(pid), trio.current_time()
    await trio.sleep(max(0.5, settle - 1.0))
    stalled_cpu = (cpu_seconds(pid) - cpu0) / (trio.current_time() - t0)
    stalled = rss_kib(pid)
    for stream in streams:
        stream.transport_stream.socket.close()
    await trio.sleep(linger)
    after = rss_kib(pid)
    return {
        "count": count,
        "sent_per_connection": send,
        "rss_before_kib": before,
        "rss_stalled_kib": stalled,
        "rss_after_kib": after,
        "per_stalled_connection_kib": round((stalled - before) / count, 1),
        "stalled_cpu": round(stalled_cpu, 3),
        "after_vs_before": round(after / before, 3) if before else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True, help="the proxy's process (its children count too)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--send", type=int, default=4 << 20, help="bytes each client sends")
    parser.add_argument("--host", default="bench.test")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before the stalled RSS is read")
    parser.add_argument("--linger", type=float, default=3.0, help="seconds after the clients left")
    parser.add_argument("--bridge", action="store_true", help="the proxy is a WebSocket-to-TCP bridge")
    args = parser.parse_args(argv)
    result = trio.run(measure, args.port, args.pid, args.count, args.send, args.host, args.settle, args.linger,
                      args.bridge)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
