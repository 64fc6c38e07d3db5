"""A 1 GiB upload and a 1 GiB download through an ``http = true`` route do not grow
the gateway process (SPEC section 7: streamed with backpressure, bounded memory).

The gateway runs as its own process (``python -m gatewayd run``), so its
resident set size is its alone; the client and the backend run here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h11
import pytest
import trio

from httpkit import Seen, app_backend

pytestmark = pytest.mark.timeout(300)

GIB = 1 << 30
#: Growth allowed over the warmed-up process: buffers, h11, allocator slack.
#: A gateway holding the body would grow by 1 GiB.
BOUND = 64 << 20
BLOCK = bytes(range(256)) * 1024   # 256 KiB


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def start_gateway(tmp_path: Path, backend: int) -> tuple[trio.Process, int]:
    config = tmp_path / "memory.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            max_body_size = 0
            http_timeout = 60

            [log]
            access_log = false

            [[listener]]
            address = "127.0.0.1:0"
            tls = false

            [[host]]
            names = ["localhost"]
            default = true

            [[host.route]]
            path_prefix = "/app/"
            backend = "ws://127.0.0.1:{backend}/"
            http = true
            """
        )
    )
    log = tmp_path / "gatewayd.log"
    with log.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    with trio.fail_after(30):
        while True:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(plain\)", log.read_text())
            if found:
                return process, int(found.group(1))
            assert process.poll() is None, log.read_text()
            await trio.sleep(0.05)


async def _send(stream: trio.abc.Stream, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _next(stream: trio.abc.Stream, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 20))
            continue
        return event


async def watch(pid: int, peak: list[int], task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    while True:
        peak[0] = max(peak[0], rss(pid))
        await trio.sleep(0.05)


async def test_one_gib_each_way_keeps_the_gateway_small(tmp_path: Path) -> None:
    seen = Seen()
    async with app_backend(seen) as backend:
        process, port = await start_gateway(tmp_path, backend)
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            conn = h11.Connection(h11.CLIENT)
            # Warm up: one small request each way.
            await _send(stream, conn, h11.Request(method="GET", target="/app/bytes/1000000", headers=[("Host", "localhost")]))
            await _send(stream, conn, h11.EndOfMessage())
            while not isinstance(await _next(stream, conn), h11.EndOfMessage):
                pass
            conn.start_next_cycle()
            baseline = rss(process.pid)
            peak = [baseline]
            async with trio.open_nursery() as nursery:
                await nursery.start(watch, process.pid, peak)

                # 1 GiB up (Content-Length), hashed by the backend.
                await _send(stream, conn, h11.Request(
                    method="POST", target="/app/info",
                    headers=[("Host", "localhost"), ("Content-Length", str(GIB))],
                ))
                for _ in range(GIB // len(BLOCK)):
                    await _send(stream, conn, h11.Data(data=BLOCK))
                await _send(stream, conn, h11.EndOfMessage())
                response = await _next(stream, conn)
                assert isinstance(response, h11.Response) and response.status_code == 200
                while not isinstance(await _next(stream, conn), h11.EndOfMessage):
                    pass
                conn.start_next_cycle()
                assert seen.requests[-1]["body_length"] == GIB

                # 1 GiB down, read as it comes.
                await _send(stream, conn, h11.Request(method="GET", target=f"/app/bytes/{GIB}", headers=[("Host", "localhost")]))
                await _send(stream, conn, h11.EndOfMessage())
                received = 0
                while True:
                    event = await _next(stream, conn)
                    if isinstance(event, h11.Data):
                        received += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert received == GIB
                nursery.cancel_scope.cancel()
            print(f"gateway RSS: {baseline >> 20} MiB warmed up, {peak[0] >> 20} MiB at most")
            assert peak[0] - baseline < BOUND, (baseline, peak[0])
        finally:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
