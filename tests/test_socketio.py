"""A real socket.io application through one ``http = true`` route (SPEC section 7).

The socket.io server and socket.io-client are the npm packages (tests/js,
installed by ``./dev test`` with ``npm ci``), run by Node with their default
transports: the client starts with HTTP long-polling (GET and POST requests
through the gateway's HTTP proxy, on kept-alive connections), then upgrades
to a WebSocket on the same route, and its last message goes over the
WebSocket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import trio

from harness import Certs, make_certs, running_gateway

JS = Path(__file__).parent / "js"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost")
    return certs


def node() -> str:
    path = shutil.which("node")
    assert path is not None, "Node.js is needed (Debian: apt-get install nodejs)"
    assert (JS / "node_modules" / "socket.io").is_dir(), "run ./dev test (npm ci in tests/js)"
    return path


async def read_json_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> dict[str, object]:
    while b"\n" not in buffer:
        data = await stream.receive_some(65536)
        assert data, f"socket.io server ended: {bytes(buffer)!r}"
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return json.loads(line)


async def test_socketio_default_transports_polling_then_websocket(certs: Certs, tmp_path: Path) -> None:
    executable = node()
    ca = tmp_path / "ca.pem"
    certs.ca.cert_pem.write_to_path(str(ca))
    server = await trio.lowlevel.open_process(
        [executable, str(JS / "socketio_server.js")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=JS,
    )
    assert server.stdout is not None and server.stdin is not None
    buffer = bytearray()
    try:
        with trio.fail_after(20):
            port = (await read_json_line(server.stdout, buffer))["listening"]
        config = tmp_path / "socketio.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [gateway]
                handshake_timeout = 5.0

                [log]
                access_log = false

                [[listener]]
                address = "127.0.0.1:0"

                [[host]]
                names = ["localhost"]
                certificate = "{certs.directory / 'localhost.pem'}"
                private_key = "{certs.directory / 'localhost.key'}"

                [[host.route]]
                path_prefix = "/socket.io/"
                backend = "ws://127.0.0.1:{port}"
                http = true
                """
            )
        )
        async with running_gateway(config) as running:
            client = await trio.run_process(
                [executable, str(JS / "socketio_client.js"), f"https://localhost:{running.port}"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=JS,
                env={**os.environ, "NODE_EXTRA_CA_CERTS": str(ca)},
            )
            result = json.loads(client.stdout.decode().strip().splitlines()[-1])
            assert client.returncode == 0, (result, client.stderr.decode())
            # The route served the long-polling requests before the upgrade.
            routed = running.gateway.metrics.render().decode()
            assert 'gatewayd_http_requests_total{code="200",route="host[0]:/socket.io/*"}' in routed
        assert result == {
            "first": "polling",
            "upgraded": "websocket",
            "echo": {"text": "through gatewayd", "size": 100000, "transport": "websocket"},
            "last": "websocket",
        }
        with trio.fail_after(10):
            seen = [await read_json_line(server.stdout, buffer) for _ in range(2)]
        assert seen == [{"connection": "polling", "forwarded": "https"}, {"upgrade": "websocket"}]
    finally:
        await server.stdin.aclose()
        with trio.move_on_after(5):
            await server.wait()
        if server.returncode is None:
            server.kill()
