"""The real program as a subprocess (SPEC section 1): exit codes, check, run, demo.

Every child runs with its output sent to files (no pipe can fill up and
deadlock), every wait is bounded, and every child is killed in a ``finally``.
Certificates come from trustme, written into tmp_path.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
import websockets.sync.client
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

REPO = Path(__file__).resolve().parents[1]
PYTHON_M = [sys.executable, "-m", "gatewayd"]
CONSOLE_SCRIPT = [str(Path(sys.executable).parent / "gatewayd")]
ENTRY_POINTS = [
    pytest.param(PYTHON_M, id="python-m-gatewayd"),
    pytest.param(CONSOLE_SCRIPT, id="console-script"),
]
#: Bound on a command that should answer at once (check, --version, usage).
QUICK = 20.0
#: Bound on a server start or stop.
START = 15.0
STOP = 5.0

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def environment(**extra: str) -> dict[str, str]:
    """The child's environment: ours without $GATEWAYD_CONFIG, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAYD_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def gatewayd(
    *args: str, cwd: Path, env: dict[str, str] | None = None, entry: list[str] = PYTHON_M
) -> subprocess.CompletedProcess[str]:
    """Run a command that ends by itself; killed if it takes over QUICK seconds."""
    return subprocess.run(
        [*entry, *args],
        cwd=cwd,
        env=env or environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=QUICK,
    )


@dataclass
class Child:
    """A long-running child whose stdout and stderr go to files."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def describe(self) -> str:
        return f"exit code {self.process.poll()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"

    def search(self, pattern: str, stream: str) -> re.Match[str] | None:
        """``pattern`` in stdout or stderr; fails at once if the child died."""
        found = re.search(pattern, self.stdout if stream == "stdout" else self.stderr)
        if found is None and self.process.poll() is not None:
            pytest.fail(f"child exited before printing {pattern!r}\n{self.describe()}")
        return found

    def wait_for(self, pattern: str, stream: str = "stderr", timeout: float = START) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (found := self.search(pattern, stream)) is None:
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} within {timeout}s\n{self.describe()}")
            time.sleep(0.05)
        return found

    async def wait_for_async(
        self, pattern: str, stream: str = "stderr", timeout: float = START
    ) -> re.Match[str]:
        with trio.fail_after(timeout):
            while (found := self.search(pattern, stream)) is None:
                await trio.sleep(0.05)
        return found

    def wait_exit(self, timeout: float = STOP) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout}s later\n{self.describe()}")

    async def wait_exit_async(self, timeout: float = STOP) -> int:
        with trio.move_on_after(timeout):
            while (code := self.process.poll()) is None:
                await trio.sleep(0.05)
            return code
        pytest.fail(f"still running {timeout}s later\n{self.describe()}")


_children = iter(range(1, 10**6))


@contextmanager
def spawn(
    *args: str, cwd: Path, env: dict[str, str] | None = None, entry: list[str] = PYTHON_M
) -> Iterator[Child]:
    """Start a child; on the way out it is killed if still running, and reaped."""
    number = next(_children)
    out, err = cwd / f"child-{number}.stdout", cwd / f"child-{number}.stderr"
    with out.open("wb") as out_file, err.open("wb") as err_file:
        process = subprocess.Popen(
            [*entry, *args],
            cwd=cwd,
            env=env or environment(),
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=err_file,
        )
    try:
        yield Child(process, out, err)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=STOP)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------
# Certificates and configurations
# ---------------------------------------------------------------------------


@dataclass
class Certs:
    ca: trustme.CA
    directory: Path

    def issue(self, stem: str, *names: str) -> None:
        """Write ``stem.pem`` (leaf then chain) and ``stem.key``."""
        cert = self.ca.issue_cert(*names)
        cert.private_key_pem.write_to_path(str(self.directory / f"{stem}.key"))
        cert.cert_chain_pems[0].write_to_path(str(self.directory / f"{stem}.pem"))
        for blob in cert.cert_chain_pems[1:]:
            blob.write_to_path(str(self.directory / f"{stem}.pem"), append=True)

    @property
    def ca_file(self) -> Path:
        path = self.directory / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return path


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    certs = Certs(trustme.CA(), tmp_path)
    certs.issue("chat", "chat.example.com")
    certs.issue("org", "*.example.org")
    certs.issue("localhost", "localhost")
    return certs


GOOD = """\
[[listener]]
address = "127.0.0.1:8443"

[[listener]]
address = "127.0.0.1:8080"
tls = false

[[host]]
names = ["chat.example.com"]
certificate = "chat.pem"
private_key = "chat.key"
default = true

[[host.route]]
path = "/chat"
backend = "ws://127.0.0.1:9000/chat"

[[host.route]]
path_prefix = "/api/"
backend = "ws://127.0.0.1:9001"

[[host]]
names = ["*.example.org"]
certificate = "org.pem"
private_key = "org.key"

[[host.route]]
path = "/"
backend = "ws://127.0.0.1:9002/"
origins = ["https://www.example.org"]
"""

THREE_MISTAKES = """\
[gateway]
workers = 1
idle_timout = 5

[[listener]]
address = "127.0.0.1:99999"

[[host]]
names = ["chat.example.com"]
certificate = "chat.pem"
private_key = "chat.key"

[[host.route]]
path = "/chat"
backend = "http://127.0.0.1:9000/chat"
"""

MISMATCHED_KEY = GOOD.replace('private_key = "chat.key"', 'private_key = "org.key"')

SYNTAX_ERROR = """\
[gateway]
workers = 1
idle_timeout = = 5
"""


def serving(echo_port: int, listen_port: int = 0, *, tls: bool = True) -> str:
    """A config serving wss://localhost:PORT/echo in front of an echo backend."""
    return f"""\
[gateway]
shutdown_timeout = 3.0

[[listener]]
address = "127.0.0.1:{listen_port}"
tls = {"true" if tls else "false"}

[[host]]
names = ["localhost"]
certificate = "localhost.pem"
private_key = "localhost.key"
default = true

[[host.route]]
path = "/echo"
backend = "ws://127.0.0.1:{echo_port}/"
"""


def write(directory: Path, text: str, name: str = "gatewayd.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# --version and usage errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_version(entry: list[str], tmp_path: Path) -> None:
    result = gatewayd("--version", cwd=tmp_path, entry=entry)
    assert (result.returncode, result.stdout, result.stderr) == (0, "gatewayd 0.1.0\n", "")


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        pytest.param([], "the following arguments are required: COMMAND", id="no-command"),
        pytest.param(["--bogus", "check"], "unrecognized arguments: --bogus", id="bad-option"),
        pytest.param(["frobnicate"], "invalid choice: 'frobnicate'", id="unknown-command"),
        pytest.param(["check", "--bogus"], "unrecognized arguments: --bogus", id="bad-check-option"),
        pytest.param(["run", "-c"], "argument -c/--config: expected one argument", id="c-without-file"),
        pytest.param(["demo", "--port", "x"], "argument --port: invalid int value: 'x'", id="bad-port"),
    ],
)
def test_usage_error_exits_2(args: list[str], complaint: str, tmp_path: Path) -> None:
    result = gatewayd(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("usage: gatewayd")
    assert complaint in result.stderr


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_check_good_config_prints_summary(entry: list[str], tmp_path: Path, certs: Certs) -> None:
    path = write(tmp_path, GOOD)
    result = gatewayd("check", "-c", str(path), cwd=tmp_path, entry=entry)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for expected in [
        f"configuration {path}",
        "listeners (2):",
        "  127.0.0.1:8443  tls",
        "  127.0.0.1:8080  plain",
        "hosts (2):",
        "  host[0]  chat.example.com  (default)",
        f"    certificate  {tmp_path / 'chat.pem'}",
        "  host[1]  *.example.org",
        f"    private_key  {tmp_path / 'org.key'}",
    ]:
        assert expected in lines
    routes = [" ".join(line.split()) for line in lines if " -> " in line]
    assert routes == [
        "/chat websocket -> ws://127.0.0.1:9000/chat origins: any subprotocols: any extensions: on",
        "/api/* websocket -> ws://127.0.0.1:9001 origins: any subprotocols: any extensions: on",
        "/ websocket -> ws://127.0.0.1:9002/ origins: https://www.example.org subprotocols: any "
        "extensions: on",
    ]
    assert lines[-1] == f"gatewayd: configuration file {path} test is successful"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            THREE_MISTAKES,
            [
                "gatewayd: 3 configuration errors:",
                "  {path}:3: gateway.idle_timout: unknown key (did you mean 'idle_timeout'?)",
                "  {path}:6: listener[0].address: ",
                "  {path}:15: host[0].route[0].backend: ",
            ],
            id="three-mistakes",
        ),
        pytest.param(
            SYNTAX_ERROR,
            ["gatewayd: 1 configuration error:", "  {path}:3:16: TOML syntax error"],
            id="syntax-error-line-and-column",
        ),
        pytest.param(
            MISMATCHED_KEY,
            ["gatewayd: 1 configuration error:", "  {path}: host[0]"],
            id="key-does-not-match-certificate",
        ),
        pytest.param(
            None,
            ["gatewayd: 1 configuration error:", "  {path}: configuration file not found"],
            id="missing-file",
        ),
    ],
)
def test_check_bad_config_exits_1_listing_every_error(
    text: str | None, expected: list[str], tmp_path: Path, certs: Certs
) -> None:
    path = write(tmp_path, text) if text is not None else tmp_path / "nowhere.toml"
    result = gatewayd("check", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == len(expected) + 1, result.stderr
    for line, start in zip(lines, expected, strict=False):
        assert line.startswith(start.format(path=path)), (line, start)
    assert lines[-1] == f"gatewayd: configuration file {path} test failed"


@pytest.mark.parametrize(
    ("env_file", "c_file", "code", "named"),
    [
        pytest.param("good.toml", None, 0, "good.toml", id="env-var-used-without-c"),
        pytest.param("missing.toml", None, 1, "missing.toml", id="env-var-names-missing-file"),
        pytest.param("missing.toml", "good.toml", 0, "good.toml", id="c-beats-env-var"),
    ],
)
def test_check_honours_gatewayd_config(
    env_file: str, c_file: str | None, code: int, named: str, tmp_path: Path, certs: Certs
) -> None:
    write(tmp_path, GOOD, "good.toml")
    args = ["check"] + (["-c", str(tmp_path / c_file)] if c_file else [])
    result = gatewayd(*args, cwd=tmp_path, env=environment(GATEWAYD_CONFIG=str(tmp_path / env_file)))
    assert result.returncode == code, result.stderr
    verdict = "test is successful" if code == 0 else "test failed"
    output = result.stdout if code == 0 else result.stderr
    assert output.splitlines()[-1] == f"gatewayd: configuration file {tmp_path / named} {verdict}"


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------


async def _echo(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        return


def _receive_until(sock: ssl.SSLSocket, predicate: Callable[[bytes], bool]) -> bytes:
    data = b""
    while not predicate(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"EOF after {data!r}")
        data += chunk
    return data


def _masked_frame(opcode: int, payload: bytes, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def websocket_round_trip(port: int, cafile: Path, message: bytes) -> tuple[bytes, bytes, bytes]:
    """A stdlib ssl client: upgrade, one text message and its echo, close.

    Returns (the 101 head, the echoed frame, the close frame answered)."""
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(
                (
                    "GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = _receive_until(tls, lambda data: b"\r\n\r\n" in data)
            assert head.endswith(b"\r\n\r\n"), "nothing may follow the 101 before we speak"
            tls.sendall(_masked_frame(0x1, message))
            echoed = _receive_until(tls, lambda data: len(data) >= 2 + len(message))
            tls.sendall(_masked_frame(0x8, (1000).to_bytes(2, "big")))
            closed = _receive_until(tls, lambda data: len(data) >= 4)
    return head, echoed, closed


SWITCHING_PROTOCOLS = (
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
).encode()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_run_serves_websocket_then_stops_cleanly_on_signal(
    entry: list[str], signum: signal.Signals, tmp_path: Path, certs: Certs
) -> None:
    with trio.fail_after(START + STOP + 10):
        async with trio.open_nursery() as nursery:
            echo = await nursery.start(serve_websocket, _echo, "127.0.0.1", 0, None)
            path = write(tmp_path, serving(echo.port))
            with spawn("run", "-c", str(path), cwd=tmp_path, entry=entry) as child:
                found = await child.wait_for_async(r"listening on 127\.0\.0\.1:(\d+) \(tls\)")
                port = int(found.group(1))
                assert port != 0
                head, echoed, closed = await trio.to_thread.run_sync(
                    websocket_round_trip, port, certs.ca_file, b"hello gatewayd"
                )
                assert head == SWITCHING_PROTOCOLS
                assert echoed == b"\x81\x0ehello gatewayd"
                assert closed == b"\x88\x02\x03\xe8"

                child.process.send_signal(signum)
                code = await child.wait_exit_async(STOP)
            nursery.cancel_scope.cancel()
    assert code == 0, child.describe()
    assert f"{signal.Signals(signum).name} received: shutting down" in child.stderr
    assert child.stdout == ""


def test_run_broken_config_exits_1_with_the_error_on_stderr(tmp_path: Path, certs: Certs) -> None:
    path = write(tmp_path, THREE_MISTAKES)
    with spawn("run", "-c", str(path), cwd=tmp_path) as child:
        code = child.wait_exit(QUICK)
    assert code == 1
    assert child.stdout == ""
    assert (
        f"  {path}:3: gateway.idle_timout: unknown key (did you mean 'idle_timeout'?)"
        in child.stderr.splitlines()
    )


def test_run_address_in_use_exits_1_naming_the_address(tmp_path: Path, certs: Certs) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(tmp_path, serving(9, listen_port=port, tls=False))
        with spawn("run", "-c", str(path), cwd=tmp_path) as child:
            code = child.wait_exit(QUICK)
    assert code == 1, child.describe()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in child.stderr


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------


def run_demo_once(tmp_path: Path, state: Path) -> tuple[Child, str]:
    """Start the demo, talk to it with two clients, stop it with Ctrl-C."""
    port = free_port()
    url = f"wss://localhost:{port}/echo"
    with spawn("demo", "--port", str(port), "--dir", str(state), cwd=tmp_path) as child:
        child.wait_for(re.escape(url), "stdout")
        assert "curl" in child.stdout

        client = subprocess.run(
            [sys.executable, "-m", "gatewayd.client", url, "--cafile", str(state / "ca.pem"), "hello"],
            cwd=tmp_path,
            env=environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=QUICK,
        )
        assert (client.returncode, client.stdout) == (0, "hello\n"), client.stderr

        context = ssl.create_default_context(cafile=str(state / "ca.pem"))
        with websockets.sync.client.connect(url, ssl=context, open_timeout=5, close_timeout=2) as ws:
            ws.send("hi from websockets")
            assert ws.recv(timeout=5) == "hi from websockets"

        # Both clients are gone on their side, but the gateway may still be
        # closing the last connection on its own (the close_notify, the
        # record): a Ctrl-C now would find it draining. Its access line is
        # written as the gateway lets go of it, so wait for both lines.
        child.wait_for(r"(?s)gatewayd\.access: .*gatewayd\.access: ")
        child.process.send_signal(signal.SIGINT)
        code = child.wait_exit(STOP)
    assert code == 0, child.describe()
    # Ctrl-C is logged as `gatewayd run` logs it.
    assert "gatewayd.cli: SIGINT received: shutting down" in child.stderr
    assert "0 connection(s) may drain for up to 5.0s" in child.stderr
    assert child.stderr.rstrip().endswith("gatewayd.server: stopped"), child.stderr
    return child, url


def test_demo_serves_echo_and_reuses_its_ca(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    first, url = run_demo_once(tmp_path, state)
    assert "gatewayd demo is running" in first.stdout
    ca = (state / "ca.pem").read_bytes()
    leaf = (state / "localhost.pem").read_bytes()
    assert ca.startswith(b"-----BEGIN CERTIFICATE-----")
    assert (state / "ca.key").stat().st_mode & 0o077 == 0

    run_demo_once(tmp_path, state)
    assert (state / "ca.pem").read_bytes() == ca
    assert (state / "localhost.pem").read_bytes() == leaf


def test_demo_second_signal_ends_the_drain_at_once(tmp_path: Path) -> None:
    """Ctrl-C drains (an open connection may finish); a second signal closes it now."""
    port = free_port()
    url = f"wss://localhost:{port}/echo"
    state = tmp_path / "demo"
    with spawn("demo", "--port", str(port), "--dir", str(state), cwd=tmp_path) as child:
        child.wait_for(re.escape(url), "stdout")
        context = ssl.create_default_context(cafile=str(state / "ca.pem"))
        with websockets.sync.client.connect(url, ssl=context, open_timeout=5, close_timeout=2) as ws:
            ws.send("before")
            assert ws.recv(timeout=5) == "before"
            child.process.send_signal(signal.SIGINT)
            child.wait_for(r"1 connection\(s\) may drain for up to 5\.0s")
            ws.send("while draining")  # the drain lets it finish its work
            assert ws.recv(timeout=5) == "while draining"
            started = time.monotonic()
            child.process.send_signal(signal.SIGTERM)  # any second SIGINT/SIGTERM: nginx's fast stop
            code = child.wait_exit(STOP)
            took = time.monotonic() - started
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                ws.recv(timeout=5)
    assert code == 0, child.describe()
    assert took < 3.0, took  # not the 5 s drain
    assert "gatewayd.cli: SIGTERM received again: closing every connection now" in child.stderr
    assert "end=shutdown" in child.stderr


def test_check_quiet_prints_nothing_on_success(tmp_path: Path) -> None:
    import contextlib
    import io

    from gatewayd.cli import main as cli_main

    config = REPO / "config" / "examples" / "behind-load-balancer.toml"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli_main(["check", "-q", "-c", str(config)]) == 0
    assert out.getvalue() == "" and err.getvalue() == ""
