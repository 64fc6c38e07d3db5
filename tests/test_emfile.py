"""Descriptor exhaustion (EMFILE) survived, over a real ``gatewayd run`` process.

The child runs with RLIMIT_NOFILE lowered. We open connections until its
``accept`` fails for lack of descriptors, and check that:

* the failure is logged, at most once a second, while it lasts;
* a WebSocket connection established before goes on working meanwhile;
* once the connections are closed, accepting resumes and a new client is served.
"""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import textwrap
from datetime import datetime
from pathlib import Path

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from harness import echo_backend, read_head, upgrade_request
from test_cli import PYTHON_M, STOP, Child, environment, free_port

#: Descriptors the child may have: enough to start and serve a few clients.
NOFILE = 40
ACCEPT_FAILED = r"accept on \S+ failed: Too many open files"


def limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


async def roundtrip(stream: trio.SocketStream, ws: Connection, text: str) -> str:
    await stream.send_all(ws.send(TextMessage(data=text)))
    with trio.fail_after(5):
        while True:
            for event in ws.events():
                if isinstance(event, TextMessage):
                    return event.data
            data = await stream.receive_some(65536)
            assert data, "EOF before the echo"
            ws.receive_data(data)


async def open_websocket(port: int) -> tuple[trio.SocketStream, Connection]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(upgrade_request("/echo", "localhost"))
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 "), head
    ws = Connection(ConnectionType.CLIENT)
    ws.receive_data(rest)
    return stream, ws


async def test_emfile_logged_once_a_second_served_and_recovered(tmp_path: Path) -> None:
    async with echo_backend() as backend:
        port = free_port()
        config = tmp_path / "gatewayd.toml"
        config.write_text(textwrap.dedent(f"""
            [gateway]
            handshake_timeout = 60

            [[listener]]
            address = "127.0.0.1:{port}"
            tls = false

            [[host]]
            names = ["localhost"]

            [[host.route]]
            path = "/echo"
            backend = "ws://127.0.0.1:{backend}"
        """))
        out, err = tmp_path / "child.stdout", tmp_path / "child.stderr"
        with out.open("wb") as out_file, err.open("wb") as err_file:
            process = subprocess.Popen(
                [*PYTHON_M, "run", "-c", str(config)],
                cwd=tmp_path,
                env=environment(),
                stdin=subprocess.DEVNULL,
                stdout=out_file,
                stderr=err_file,
                preexec_fn=limit_descriptors,
            )
        child = Child(process, out, err)
        idle: list[trio.SocketStream] = []
        try:
            await child.wait_for_async(r"listening on 127\.0\.0\.1:\d+")
            with trio.fail_after(30):
                established, ws = await open_websocket(port)
                assert await roundtrip(established, ws, "before") == "before"

                # Connect until the child's accept fails (the kernel completes
                # TCP handshakes into the backlog whether or not it accepts).
                for _ in range(NOFILE * 2):
                    idle.append(await trio.open_tcp_stream("127.0.0.1", port))
                await child.wait_for_async(ACCEPT_FAILED, timeout=10)

                # It lasts while they are open; the established connection works on.
                for second in range(3):
                    await trio.sleep(1)
                    assert await roundtrip(established, ws, f"during {second}") == f"during {second}"
                times = [
                    datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
                    for line in child.stderr.splitlines()
                    if re.search(ACCEPT_FAILED, line)
                ]
                assert 2 <= len(times) <= 5, child.stderr
                gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
                assert all(gap >= 0.99 for gap in gaps), gaps

                # Descriptors come back: accepting resumes, a new client is served.
                for stream in idle:
                    stream.socket.close()
                idle.clear()
                fresh, fresh_ws = await open_websocket(port)
                assert await roundtrip(fresh, fresh_ws, "after") == "after"
                assert await roundtrip(established, ws, "still") == "still"
                await fresh.aclose()
                await established.aclose()
            process.send_signal(signal.SIGTERM)
            assert await child.wait_exit_async() == 0, child.describe()
        finally:
            for stream in idle:
                stream.socket.close()
            if process.poll() is None:
                process.kill()
            process.wait(timeout=STOP)
