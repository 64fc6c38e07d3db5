"""noVNC, served by a static route, in a real browser, through the tcp:// bridge to a real VNC server.

Nothing here is ours but the gateway: Debian's ``novnc`` files, ``chromium``
(headless, driven over the DevTools protocol), ``Xvfb`` and ``x11vnc``.
One gatewayd TLS listener serves noVNC's ``vnc.html`` and scripts (a
``static`` route) and bridges its WebSocket (an exact ``/websockify`` route
to ``tcp://`` the VNC server), as config/examples/novnc-websockify.toml does.
The browser trusts the test certificate by its public key hash
(``--ignore-certificate-errors-spki-list``) and reaches the gateway's name
through ``--host-resolver-rules``; the test waits for noVNC's own
"Connected (encrypted) to" status and a canvas of the X screen's size.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from trio_websocket import open_websocket_url

from harness import make_certs, running_gateway

NOVNC = Path("/usr/share/novnc")
NAME = "novnc.test"
SCREEN = (640, 480)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-port=0",
]

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def vnc_server(tmp_path: Path) -> Iterator[int]:
    """Xvfb on a display it picks itself, and x11vnc showing it on 127.0.0.1: the port."""
    read_fd, write_fd = os.pipe()
    with open(tmp_path / "xvfb.log", "wb") as log:  # the child keeps its own descriptor
        xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24",
             "-nolisten", "tcp"],
            pass_fds=(write_fd,),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    os.close(write_fd)
    vnc: subprocess.Popen[bytes] | None = None
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            display = pipe.readline().strip().decode()
        assert display.isdigit(), f"Xvfb gave no display: {(tmp_path / 'xvfb.log').read_text()}"
        port = free_port()
        with open(tmp_path / "x11vnc.log", "wb") as log:
            vnc = subprocess.Popen(
                ["x11vnc", "-display", f":{display}", "-rfbport", str(port), "-localhost", "-nopw",
                 "-forever", "-shared", "-noxdamage", "-quiet"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                    probe.settimeout(5)
                    if probe.recv(12).startswith(b"RFB "):
                        break
            except OSError:
                pass
            assert vnc.poll() is None, (tmp_path / "x11vnc.log").read_text()
            time.sleep(0.05)
        else:
            raise AssertionError(f"x11vnc did not listen: {(tmp_path / 'x11vnc.log').read_text()}")
        yield port
    finally:
        if vnc is not None:
            stop(vnc)
        stop(xvfb)


def spki_hash(cert_path: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a PEM file's first certificate."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class DevTools:
    """The DevTools protocol over one page target's WebSocket (only what the test needs)."""

    def __init__(self, ws: object) -> None:
        self.ws = ws
        self.next_id = 0

    async def evaluate(self, expression: str) -> object:
        self.next_id += 1
        ask = {"id": self.next_id, "method": "Runtime.evaluate",
               "params": {"expression": expression, "returnByValue": True}}
        await self.ws.send_message(json.dumps(ask))  # type: ignore[attr-defined]
        while True:
            message = json.loads(await self.ws.get_message())  # type: ignore[attr-defined]
            if message.get("id") == self.next_id:
                result = message["result"]["result"]
                return result.get("value")


async def page_target(profile: Path, browser: subprocess.Popen[bytes], log: Path) -> str:
    """The page's DevTools WebSocket URL (the port is in DevToolsActivePort)."""
    active = profile / "DevToolsActivePort"
    with trio.fail_after(30):
        while not active.exists() or not active.read_text().strip():
            assert browser.poll() is None, f"chromium exited: {log.read_text()[-3000:]}"
            await trio.sleep(0.1)
        port = int(active.read_text().split()[0])
        while True:
            def targets() -> list[dict[str, str]]:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as answer:
                    return json.loads(answer.read())  # type: ignore[no-any-return]

            pages = [t for t in await trio.to_thread.run_sync(targets) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            await trio.sleep(0.1)


async def test_novnc_in_chromium_through_one_gateway(tmp_path: Path, vnc_server: int) -> None:
    assert (NOVNC / "vnc.html").is_file(), "Debian's novnc package (tests/system-packages.txt)"
    certs = make_certs(tmp_path)
    cert, key = certs.issue(NAME)
    config = tmp_path / "novnc.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [[listener]]
            address = "127.0.0.1:0"

            [[host]]
            names = ["{NAME}"]
            certificate = "{cert}"
            private_key = "{key}"

            [[host.route]]
            path_prefix = "/"
            static = "{NOVNC}"
            index = "vnc.html"

            [[host.route]]
            path = "/websockify"
            backend = "tcp://127.0.0.1:{vnc_server}"
            """
        )
    )
    async with running_gateway(config) as gw:
        url = (
            f"https://{NAME}:{gw.port}/vnc.html?host={NAME}&port={gw.port}"
            "&path=websockify&encrypt=1&autoconnect=true&resize=off"
        )
        profile = tmp_path / "profile"
        log = tmp_path / "chromium.log"
        with open(log, "wb") as err:
            browser = subprocess.Popen(
                ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 f"--host-resolver-rules=MAP {NAME} 127.0.0.1",
                 f"--ignore-certificate-errors-spki-list={spki_hash(cert)}",
                 f"--window-size={SCREEN[0] + 200},{SCREEN[1] + 200}", url],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            target = await page_target(profile, browser, log)
            async with open_websocket_url(target, max_message_size=2**24) as ws:
                tools = DevTools(ws)
                probe = (
                    "JSON.stringify({status: (document.getElementById('noVNC_status') || {}).textContent,"
                    " canvas: Array.from(document.querySelectorAll('#noVNC_container canvas'))"
                    ".map(c => [c.width, c.height])})"
                )
                state: dict[str, object] = {}
                with trio.move_on_after(60):
                    while True:
                        value = await tools.evaluate(probe)
                        state = json.loads(value) if isinstance(value, str) else {}
                        if "Connected (encrypted) to" in str(state.get("status")) and [
                            list(SCREEN)
                        ] == state.get("canvas"):
                            break
                        if "Failed" in str(state.get("status")) or "Disconnect" in str(state.get("status")):
                            break  # noVNC gave up: no point waiting
                        await trio.sleep(0.25)
                assert "Connected (encrypted) to" in str(state.get("status")), (state, log.read_text()[-2000:])
                assert state.get("canvas") == [list(SCREEN)], state
        finally:
            stop(browser)
