"""The daemon as systemd runs it (SPEC section 5): SIGHUP reload, SIGTERM drain, sd_notify,
socket activation.

Every test starts the real program (``python -m gatewayd run -c FILE``) as a child
process, talks to it over real TLS from trio clients in this process (with a
trio-websocket echo backend, also in this process), and sends it real signals.
Certificates come from trustme, written into tmp_path. The child's output goes to
files (no pipe can fill up), every wait is bounded, and the child is killed in a
``finally`` whatever happens.

A SIGHUP is only ever sent after the "listening on" line: until the signal
receiver is installed, SIGHUP's default action would end the process.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trustme

from harness import accept_for, echo_backend, read_head, upgrade_request
from test_cli import PYTHON_M, START, STOP, Child, environment, free_port

#: Bound on one client operation (connect, TLS, upgrade, one echo).
CLIENT = 5.0
#: Bound on a reload being logged after its SIGHUP.
RELOAD = 5.0
#: Variables of a service manager that must not leak from our environment into the child.
SYSTEMD_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)
CLIENT_KEY = "x3JJHMbDL1EzLkh9GBhXDw=="
LISTENING = r"listening on 127\.0\.0\.1:(\d+) \(tls\)"
OUTCOME = r"reload (succeeded|failed)"


# ---------------------------------------------------------------------------
# Certificates and configuration files
# ---------------------------------------------------------------------------


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` in one step: a reload never reads a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


@dataclass
class Pki:
    """A trustme CA, the certificate of "localhost" in tmp_path, a client trusting the CA."""

    ca: trustme.CA
    directory: Path
    context: ssl.SSLContext

    def install(self, ca: trustme.CA | None = None) -> str:
        """(Re)write localhost.pem and localhost.key; returns the leaf's SHA-256 fingerprint."""
        cert = (ca or self.ca).issue_cert("localhost")
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        write_atomically(self.directory / "localhost.key", cert.private_key_pem.bytes())
        write_atomically(self.directory / "localhost.pem", chain)
        leaf = cert.cert_chain_pems[0].bytes().decode()
        return fingerprint(ssl.PEM_cert_to_DER_cert(leaf))

    def trust(self, ca: trustme.CA) -> None:
        ca.configure_trust(self.context)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    pki = Pki(ca, tmp_path, context)
    pki.install()
    return pki


def config(
    echo_port: int,
    *,
    routes: Sequence[str] = ("/echo",),
    listeners: Sequence[str] = ("127.0.0.1:0",),
    shutdown_timeout: float = 20.0,
    backend: str | None = None,
    certificate: str = "localhost.pem",
) -> str:
    """A configuration: TLS listeners, host "localhost", each route to the echo backend."""
    parts = [f"[gateway]\nshutdown_timeout = {shutdown_timeout}\n"]
    parts += [f'[[listener]]\naddress = "{address}"\n' for address in listeners]
    parts.append(
        f'[[host]]\nnames = ["localhost"]\ncertificate = "{certificate}"\n'
        'private_key = "localhost.key"\ndefault = true\n'
    )
    for path in routes:
        target = backend or f"ws://127.0.0.1:{echo_port}/"
        parts.append(f'[[host.route]]\npath = "{path}"\nbackend = "{target}"\n')
    return "\n".join(parts)


# ---------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------


def child_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in environment().items() if k not in SYSTEMD_VARIABLES}
    env.update(extra)
    return env


_children = iter(range(1, 10**6))


@contextmanager
def spawn(
    argv: Sequence[str], cwd: Path, env: dict[str, str], pass_fds: Sequence[int] = ()
) -> Iterator[Child]:
    """Start a child, output to files; on the way out it is killed if still running, and reaped."""
    number = next(_children)
    out, err = cwd / f"gatewayd-{number}.stdout", cwd / f"gatewayd-{number}.stderr"
    with out.open("wb") as out_file, err.open("wb") as err_file:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=err_file,
            pass_fds=tuple(pass_fds),
        )
    try:
        yield Child(process, out, err)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=STOP)


@dataclass
class Service:
    """A running ``gatewayd run`` child and its configuration file."""

    child: Child
    path: Path
    ports: list[int]

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def log(self) -> str:
        return self.child.stderr

    @property
    def alive(self) -> bool:
        return self.child.process.poll() is None

    def write(self, text: str) -> None:
        write_atomically(self.path, text.encode())

    def signal(self, signum: signal.Signals) -> None:
        self.child.process.send_signal(signum)

    async def wait_log(
        self, pattern: str, *, since: int = 0, count: int = 1, timeout: float = START
    ) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in the log after offset ``since``."""
        with trio.move_on_after(timeout):
            while True:
                found = list(re.finditer(pattern, self.log[since:]))
                if len(found) >= count:
                    return found[:count]
                if not self.alive:
                    pytest.fail(f"child exited before logging {pattern!r}\n{self.child.describe()}")
                await trio.sleep(0.02)
        pytest.fail(f"no {count} x {pattern!r} within {timeout}s\n{self.child.describe()}")

    async def reload(self, text: str | None = None) -> str:
        """Optionally rewrite the file, SIGHUP, wait for the outcome; returns the new log."""
        if text is not None:
            self.write(text)
        mark = len(self.log)
        self.signal(signal.SIGHUP)
        await self.wait_log(OUTCOME, since=mark, timeout=RELOAD)
        return self.log[mark:]

    async def wait_exit(self, timeout: float) -> int:
        return await self.child.wait_exit_async(timeout)


@asynccontextmanager
async def running(
    tmp_path: Path,
    text: str,
    *,
    listeners: int = 1,
    env: dict[str, str] | None = None,
    argv: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
) -> AsyncIterator[Service]:
    """``gatewayd run -c tmp_path/gatewayd.toml`` once its ``listeners`` are listening."""
    path = tmp_path / "gatewayd.toml"
    write_atomically(path, text.encode())
    command = [*(argv or PYTHON_M), "run", "-c", str(path)]
    with spawn(command, tmp_path, env or child_environment(), pass_fds) as child:
        service = Service(child, path, [])
        found = await service.wait_log(LISTENING, count=listeners)
        service.ports = [int(match.group(1)) for match in found]
        yield service


# ---------------------------------------------------------------------------
# A minimal WebSocket client over trio's TLS (RFC 6455 frames, client side masked)
# ---------------------------------------------------------------------------


class Unexpected(Exception):
    """The gateway answered something a correct WebSocket upgrade does not."""


def masked_frame(opcode: int, payload: bytes, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {data!r}")
        data += chunk
    return data


@dataclass
class WebSocket:
    stream: trio.SSLStream[trio.SocketStream]

    @property
    def fingerprint(self) -> str:
        der = self.stream.getpeercert(binary_form=True)
        assert der is not None
        return fingerprint(der)

    async def echo(self, message: bytes) -> bytes:
        """Send one text message; return the payload of the frame that comes back."""
        with trio.fail_after(CLIENT):
            await self.stream.send_all(masked_frame(0x1, message))
            head = await receive_exactly(self.stream, 2)
            if head[0] != 0x81 or head[1] >= 126:
                raise Unexpected(f"not a short text frame: {head!r}")
            return await receive_exactly(self.stream, head[1])

    async def aclose(self) -> None:
        """Close handshake (RFC 6455 5.5.1), then TLS close_notify."""
        with trio.fail_after(CLIENT):
            try:
                await self.stream.send_all(masked_frame(0x8, (1000).to_bytes(2, "big")))
                answer = await receive_exactly(self.stream, 4)
                if answer != b"\x88\x02\x03\xe8":
                    raise Unexpected(f"close answered with {answer!r}")
            finally:
                await self.stream.aclose()


async def handshake(
    port: int, context: ssl.SSLContext, path: str = "/echo"
) -> tuple[int, trio.SSLStream[trio.SocketStream]]:
    """TLS + upgrade request; returns the status and the stream (closed unless 101)."""
    with trio.fail_after(CLIENT):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, context, server_hostname="localhost")
        try:
            await stream.do_handshake()
            await stream.send_all(upgrade_request(path, "localhost", key=CLIENT_KEY))
            head, rest = await read_head(stream)
            status = int(head.split(b" ", 2)[1])
            if status == 101:
                if accept_for(CLIENT_KEY).encode() not in head or rest:
                    raise Unexpected(f"bad 101: {head!r} + {rest!r}")
                return status, stream
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        await trio.aclose_forcefully(stream)
        return status, stream


async def status_of(port: int, context: ssl.SSLContext, path: str = "/echo") -> int:
    status, stream = await handshake(port, context, path)
    if status == 101:
        await WebSocket(stream).aclose()
    return status


async def open_websocket(port: int, context: ssl.SSLContext, path: str = "/echo") -> WebSocket:
    status, stream = await handshake(port, context, path)
    if status != 101:
        raise Unexpected(f"{path}: status {status}, not 101")
    return WebSocket(stream)


async def refused(port: int, context: ssl.SSLContext) -> bool:
    """True if a new connection fails to connect, or is closed without any answer."""
    try:
        status, stream = await handshake(port, context)
    except (OSError, trio.BrokenResourceError, EOFError):
        return True
    if status == 101:
        await WebSocket(stream).aclose()
    return False


async def wait_closed(ws: WebSocket, timeout: float) -> None:
    """Until the gateway closes ``ws`` (EOF, reset, or a close frame)."""
    with trio.fail_after(timeout):
        while True:
            try:
                data = await ws.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data or data.startswith(b"\x88"):
                return


# ---------------------------------------------------------------------------
# 1. Reload under load
# ---------------------------------------------------------------------------


@dataclass
class Load:
    successes: int = 0
    failures: list[str] = field(default_factory=list)


async def handshake_loop(port: int, context: ssl.SSLContext, load: Load, stop: trio.Event) -> None:
    """New TLS connection + upgrade + one echo + close, again and again, until ``stop``."""
    number = 0
    while not stop.is_set():
        number += 1
        message = f"load {number}".encode()
        try:
            ws = await open_websocket(port, context)
            try:
                echoed = await ws.echo(message)
            finally:
                await ws.aclose()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, EOFError, Unexpected) as exc:
            load.failures.append(f"handshake {number}: {exc!r}")
            continue
        if echoed == message:
            load.successes += 1
        else:
            load.failures.append(f"handshake {number}: echoed {echoed!r}")


async def test_reload_under_load_refuses_no_handshake(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(40):
        async with echo_backend() as echo_port, running(tmp_path, config(echo_port)) as service:
            first = await open_websocket(service.port, pki.context)
            assert await first.echo(b"opened before SIGHUP") == b"opened before SIGHUP"

            load = Load()
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(handshake_loop, service.port, pki.context, load, stop)
                await trio.sleep(0.2)
                for number in range(1, 21):
                    if number % 4 == 0:  # a real change: /v<number> replaces the previous /vN
                        service.write(config(echo_port, routes=["/echo", f"/v{number}"]))
                    service.signal(signal.SIGHUP)
                    await trio.sleep(0.075)
                # SIGHUPs that arrive during a reload are merged into one more reload:
                # wait until every "reloading" has its outcome, and nothing moves for a while.
                settled = (-1, -1)
                while True:
                    log = service.log
                    counts = (log.count("SIGHUP received"), len(re.findall(OUTCOME, log)))
                    if counts == settled and counts[0] == counts[1]:
                        break
                    settled = counts
                    await trio.sleep(0.3)
                await trio.sleep(0.2)
                stop.set()

            assert load.failures == [], load.failures
            assert load.successes >= 40, load.successes
            assert await first.echo(b"still spliced") == b"still spliced"
            assert await status_of(service.port, pki.context, "/v20") == 101
            assert await status_of(service.port, pki.context, "/v16") == 404
            await first.aclose()
            assert service.alive, service.child.describe()
            log = service.log

    assert "reload failed" not in log
    succeeded = re.findall(r"reload succeeded: generation (\d+) -> (\d+)", log)
    generations = [(int(a), int(b)) for a, b in succeeded]
    assert len(generations) == log.count("SIGHUP received: reloading")
    assert generations == [(n, n + 1) for n in range(1, len(generations) + 1)], generations
    assert len(generations) >= 5, generations  # at most 20; merged when they overlap
    assert re.search(r"reload succeeded: generation \d+ -> \d+: routes added: localhost/v4\b", log)


# ---------------------------------------------------------------------------
# 2. A broken file and SIGHUP: old configuration kept, every error logged
# ---------------------------------------------------------------------------


def broken_syntax(echo_port: int) -> str:
    return config(echo_port, routes=["/echo", "/new"]).replace(
        "shutdown_timeout = 20.0", "shutdown_timeout = = 20.0"
    )


def broken_schema(echo_port: int) -> str:
    return config(echo_port, routes=["/echo", "/new"], backend="http://127.0.0.1:9/")


def missing_certificate(echo_port: int) -> str:
    return config(echo_port, routes=["/echo", "/new"], certificate="gone.pem")


@pytest.mark.parametrize(
    ("broken", "errors"),
    [
        pytest.param(broken_syntax, [r"gatewayd\.toml:2:20: TOML syntax error"], id="invalid-toml"),
        pytest.param(
            broken_schema,
            [
                r"gatewayd\.toml:\d+: host\[0\]\.route\[0\]\.backend: unsupported backend scheme",
                r"gatewayd\.toml:\d+: host\[0\]\.route\[1\]\.backend: unsupported backend scheme",
            ],
            id="schema-error",
        ),
        pytest.param(
            missing_certificate,
            [r"gatewayd\.toml:\d+: host\[0\]\.certificate: file not found: .*gone\.pem"],
            id="missing-certificate",
        ),
    ],
)
async def test_broken_file_keeps_the_old_configuration(
    broken: Callable[[int], str], errors: list[str], tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(30):
        async with echo_backend() as echo_port, running(tmp_path, config(echo_port)) as service:
            assert await status_of(service.port, pki.context, "/new") == 404

            logged = await service.reload(broken(echo_port))
            for pattern in errors:
                assert re.search(r"ERROR gatewayd\.cli: reload: .*" + pattern, logged), logged
            assert (
                f"reload failed ({len(errors)} error(s)): still serving generation 1, unchanged"
                in logged
            ), logged
            assert service.alive
            assert await status_of(service.port, pki.context, "/echo") == 101
            assert await status_of(service.port, pki.context, "/new") == 404

            logged = await service.reload(config(echo_port, routes=["/echo", "/new"]))
            assert "generation 1 -> 2: routes added: localhost/new" in logged, logged
            assert await status_of(service.port, pki.context, "/new") == 101
            assert service.alive


# ---------------------------------------------------------------------------
# 3. Certificate rotation
# ---------------------------------------------------------------------------


async def test_certificate_rotation_reaches_new_connections_only(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with echo_backend() as echo_port, running(tmp_path, config(echo_port)) as service:
            before = await open_websocket(service.port, pki.context)
            original = before.fingerprint

            # Same CA, new certificate (new serial, new key).
            same_ca = pki.install()
            assert same_ca != original
            logged = await service.reload()
            assert "reload succeeded: generation 1 -> 2" in logged, logged
            ws = await open_websocket(service.port, pki.context)
            assert ws.fingerprint == same_ca
            assert await ws.echo(b"new certificate") == b"new certificate"
            await ws.aclose()

            # A new CA altogether, that the client has been told to trust.
            other = trustme.CA()
            pki.trust(other)
            new_ca = pki.install(other)
            logged = await service.reload()
            assert "reload succeeded: generation 2 -> 3" in logged, logged
            ws = await open_websocket(service.port, pki.context)
            assert ws.fingerprint == new_ca
            await ws.aclose()

            # The connection opened before both rotations is untouched.
            assert before.fingerprint == original
            assert await before.echo(b"old certificate") == b"old certificate"
            await before.aclose()


# ---------------------------------------------------------------------------
# 4. Routes and listeners added and removed
# ---------------------------------------------------------------------------


async def test_route_added_then_removed(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with echo_backend() as echo_port, running(tmp_path, config(echo_port)) as service:
            assert await status_of(service.port, pki.context, "/added") == 404

            logged = await service.reload(config(echo_port, routes=["/echo", "/added"]))
            assert "routes added: localhost/added" in logged, logged
            assert await status_of(service.port, pki.context, "/added") == 101

            logged = await service.reload(config(echo_port, routes=["/added"]))
            assert "routes removed: localhost/echo" in logged, logged
            assert await status_of(service.port, pki.context, "/echo") == 404
            assert await status_of(service.port, pki.context, "/added") == 101


async def test_listener_added_then_removed(tmp_path: Path, pki: Pki) -> None:
    extra = free_port()
    with trio.fail_after(30):
        async with echo_backend() as echo_port, running(tmp_path, config(echo_port)) as service:
            assert await refused(extra, pki.context)
            both = ["127.0.0.1:0", f"127.0.0.1:{extra}"]

            logged = await service.reload(config(echo_port, listeners=both))
            assert f"listeners added: 127.0.0.1:{extra}" in logged, logged
            assert f"listening on 127.0.0.1:{extra} (tls)" in logged, logged
            for port in (service.port, extra):
                assert await status_of(port, pki.context) == 101

            logged = await service.reload(config(echo_port))
            assert f"listeners removed: 127.0.0.1:{extra}" in logged, logged
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", extra)
            assert await status_of(service.port, pki.context) == 101


async def test_listener_address_in_use_fails_the_reload(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        async with echo_backend() as echo_port, running(tmp_path, config(echo_port)) as service:
            logged = await service.reload(
                config(echo_port, listeners=["127.0.0.1:0", f"127.0.0.1:{busy}"], routes=["/new"])
            )
            assert (
                f"reload failed: cannot listen on 127.0.0.1:{busy}: Address already in use: "
                "still serving generation 1, unchanged" in logged
            ), logged
            assert "listening on" not in logged
            assert service.alive
            # Nothing of the new file is in effect: old listener, old routes.
            assert await status_of(service.port, pki.context, "/echo") == 101
            assert await status_of(service.port, pki.context, "/new") == 404

            logged = await service.reload(config(echo_port, routes=["/new"]))
            assert "reload succeeded: generation 1 -> 2" in logged, logged


# ---------------------------------------------------------------------------
# 5. SIGTERM: drain
# ---------------------------------------------------------------------------


async def test_sigterm_drains_the_open_connection_then_exits_0(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with echo_backend() as echo_port, running(tmp_path, config(echo_port)) as service:
            ws = await open_websocket(service.port, pki.context)
            mark = len(service.log)
            service.signal(signal.SIGTERM)
            await service.wait_log(r"1 connection\(s\) may drain for up to 20\.0s", since=mark)

            assert await refused(service.port, pki.context)
            assert await ws.echo(b"draining") == b"draining"
            await trio.sleep(0.3)
            assert await ws.echo(b"still draining") == b"still draining"
            assert service.alive

            closed = time.monotonic()
            await ws.aclose()
            code = await service.wait_exit(5.0)
            took = time.monotonic() - closed
    assert code == 0, service.child.describe()
    assert took < 3.0, took  # far from shutdown_timeout = 20
    assert "closing" not in service.log[mark:], service.log


async def test_shutdown_timeout_closes_what_is_left(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with echo_backend() as echo_port, running(
            tmp_path, config(echo_port, shutdown_timeout=1)
        ) as service:
            ws = await open_websocket(service.port, pki.context)
            started = time.monotonic()
            service.signal(signal.SIGTERM)
            await wait_closed(ws, 5.0)
            code = await service.wait_exit(5.0)
            took = time.monotonic() - started
            await trio.aclose_forcefully(ws.stream)
    assert code == 0, service.child.describe()
    assert 0.9 <= took <= 3.0, took
    assert "closing 1 connection(s) left after the drain" in service.log


async def test_second_sigterm_during_the_drain_exits_at_once(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30):
        async with echo_backend() as echo_port, running(tmp_path, config(echo_port)) as service:
            ws = await open_websocket(service.port, pki.context)
            mark = len(service.log)
            service.signal(signal.SIGTERM)
            await service.wait_log(r"may drain for up to 20\.0s", since=mark)
            assert await ws.echo(b"draining") == b"draining"
            started = time.monotonic()
            service.signal(signal.SIGTERM)
            code = await service.wait_exit(5.0)
            took = time.monotonic() - started
            await wait_closed(ws, 1.0)
            await trio.aclose_forcefully(ws.stream)
    assert code == 0, service.child.describe()
    assert took < 1.5, took
    assert "SIGTERM received again: closing every connection now" in service.log


def hold_reload(path: Path) -> None:
    """Make ``path`` a FIFO: a reload blocks reading it until :func:`feed` writes it."""
    path.unlink()
    os.mkfifo(path)


def feed(path: Path, text: str) -> None:
    """Write the FIFO that a reload is blocked reading (fails if none is reading)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


async def test_sigterm_during_a_reload_abandons_the_reload(tmp_path: Path, pki: Pki) -> None:
    """A reload that ends after SIGTERM binds nothing, swaps nothing, sends no READY=1."""
    address = str(tmp_path / "notify.sock")
    extra = free_port()
    with trio.fail_after(30):
        async with echo_backend() as echo_port, notify_socket(address) as notifications:
            env = child_environment(NOTIFY_SOCKET=address)
            async with running(tmp_path, config(echo_port), env=env) as service:
                ws = await open_websocket(service.port, pki.context)
                hold_reload(service.path)
                mark = len(service.log)
                service.signal(signal.SIGHUP)
                await service.wait_log("SIGHUP received: reloading", since=mark)
                service.signal(signal.SIGTERM)
                await service.wait_log("may drain for up to 20.0s", since=mark)

                listeners = ["127.0.0.1:0", f"127.0.0.1:{extra}"]
                new = config(echo_port, routes=["/echo", "/new"], listeners=listeners)
                await trio.to_thread.run_sync(feed, service.path, new)
                await service.wait_log("reload abandoned: shutting down", since=mark)
                assert service.alive, service.child.describe()
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", extra)
                assert await ws.echo(b"draining") == b"draining"
                await ws.aclose()
                code = await service.wait_exit(5.0)
    assert code == 0, service.child.describe()
    assert notifications.states() == ["READY", "RELOADING", "STOPPING"], notifications.received
    assert "reload succeeded" not in service.log
    assert "listening on" not in service.log[mark:]


async def test_sigterm_does_not_wait_for_a_blocked_configuration_read(
    tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(30):
        async with echo_backend() as echo_port, running(tmp_path, config(echo_port)) as service:
            hold_reload(service.path)  # never fed: the read blocks for ever
            mark = len(service.log)
            service.signal(signal.SIGHUP)
            await service.wait_log("SIGHUP received: reloading", since=mark)
            service.signal(signal.SIGTERM)
            code = await service.wait_exit(3.0)
    assert code == 0, service.child.describe()


# ---------------------------------------------------------------------------
# 6. sd_notify
# ---------------------------------------------------------------------------


@dataclass
class Notifications:
    """Datagrams received on our NOTIFY_SOCKET, each as {KEY: VALUE}, with arrival time."""

    received: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def states(self) -> list[str]:
        """The state messages in order (READY, RELOADING, STOPPING; not the watchdog)."""
        return [
            key
            for _, message in self.received
            for key in ("READY", "RELOADING", "STOPPING")
            if message.get(key) == "1"
        ]

    async def wait_for(self, states: list[str], timeout: float = START) -> None:
        with trio.move_on_after(timeout):
            while self.states() != states:
                await trio.sleep(0.02)
            return
        pytest.fail(f"notifications {self.states()}, wanted {states}: {self.received}")


@asynccontextmanager
async def notify_socket(address: str | bytes) -> AsyncIterator[Notifications]:
    notifications = Notifications()
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(address)

        async def collect() -> None:
            while True:
                data = await sock.recv(65536)
                lines = data.decode().split("\n")
                message = dict(line.partition("=")[::2] for line in lines)
                notifications.received.append((time.monotonic(), message))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            yield notifications
            nursery.cancel_scope.cancel()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.mark.parametrize("namespace", ["path", "abstract"])
async def test_sd_notify_ready_reloading_stopping(namespace: str, tmp_path: Path, pki: Pki) -> None:
    if namespace == "path":
        address: str | bytes = str(tmp_path / "notify.sock")
        variable = str(address)
    else:
        name = f"gatewayd-test-{uuid.uuid4().hex}"
        address, variable = b"\0" + name.encode(), "@" + name
    with trio.fail_after(30):
        async with echo_backend() as echo_port, notify_socket(address) as notifications:
            env = child_environment(NOTIFY_SOCKET=variable)
            async with running(tmp_path, config(echo_port), env=env) as service:
                await notifications.wait_for(["READY"])
                ready = notifications.received[-1][1]
                # Sent once listening: the status names the port actually bound.
                assert ready["STATUS"] == (
                    f"generation 1: 1 host(s) on 127.0.0.1:{service.port}; 0 connection(s)"
                ), ready

                before = monotonic_usec()
                await service.reload()
                await notifications.wait_for(["READY", "RELOADING", "READY"])
                reloading = next(m for _, m in notifications.received if m.get("RELOADING") == "1")
                assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec(), reloading
                status = notifications.received[-1][1]["STATUS"]
                assert status.startswith("generation 2: "), notifications

                service.signal(signal.SIGTERM)
                code = await service.wait_exit(STOP)
                await notifications.wait_for(["READY", "RELOADING", "READY", "STOPPING"])
    assert code == 0, service.child.describe()
    assert "WATCHDOG" not in str(notifications.received)


async def test_sd_notify_watchdog_pings(tmp_path: Path, pki: Pki) -> None:
    address = str(tmp_path / "notify.sock")
    with trio.fail_after(30):
        async with echo_backend() as echo_port, notify_socket(address) as notifications:
            env = child_environment(NOTIFY_SOCKET=address, WATCHDOG_USEC="200000")
            async with running(tmp_path, config(echo_port), env=env):
                await notifications.wait_for(["READY"])
                start = time.monotonic()
                await trio.sleep(1.0)
                pings = [
                    t for t, m in notifications.received if m.get("WATCHDOG") == "1" and t >= start
                ]
    # Every WATCHDOG_USEC / 2 = 0.1 s: about ten in the second.
    assert len(pings) >= 5, notifications.received


# ---------------------------------------------------------------------------
# 7. Socket activation
# ---------------------------------------------------------------------------

#: Runs as the child: moves the passed sockets to fd 3, 4, ... (sd_listen_fds(3)),
#: sets LISTEN_PID to its own pid, which exec keeps, then becomes gatewayd.
ACTIVATE = """\
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_socket_activation_uses_the_inherited_socket(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(30), listening_socket() as web:
        port = web.getsockname()[1]
        env = child_environment(LISTEN_FDS="1", LISTEN_FDNAMES="web")
        argv = [sys.executable, "-c", ACTIVATE, str(web.fileno()), "-m", "gatewayd"]
        async with echo_backend() as echo_port, running(
            tmp_path,
            config(echo_port, listeners=[f"127.0.0.1:{port}"]),
            env=env,
            argv=argv,
            pass_fds=[web.fileno()],
        ) as service:
            assert service.ports == [port]
            used = f"using the inherited socket for 127.0.0.1:{port} (socket activation)"
            assert used in service.log
            # Our copy stays open but never accepts: every connection goes to the child.
            ws = await open_websocket(port, pki.context)
            assert await ws.echo(b"activated") == b"activated"
            await ws.aclose()
            # The socket survives a reload that keeps its address.
            logged = await service.reload()
            assert "reload succeeded" in logged, logged
            assert await status_of(port, pki.context) == 101


async def test_socket_activation_extra_socket_and_unmatched_listener(
    tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(30), listening_socket() as web, listening_socket() as extra:
        port, extra_port, bound_port = web.getsockname()[1], extra.getsockname()[1], free_port()
        env = child_environment(LISTEN_FDS="2", LISTEN_FDNAMES="web:extra")
        fds = f"{web.fileno()},{extra.fileno()}"
        argv = [sys.executable, "-c", ACTIVATE, fds, "-m", "gatewayd"]
        listeners = [f"127.0.0.1:{port}", f"127.0.0.1:{bound_port}"]
        async with echo_backend() as echo_port, running(
            tmp_path,
            config(echo_port, listeners=listeners),
            listeners=2,
            env=env,
            argv=argv,
            pass_fds=[web.fileno(), extra.fileno()],
        ) as service:
            log = service.log
            assert sorted(service.ports) == sorted([port, bound_port])
            assert f"using the inherited socket for 127.0.0.1:{port} (socket activation)" in log
            assert f"using the inherited socket for 127.0.0.1:{bound_port}" not in log
            assert (
                f"inherited socket extra (('127.0.0.1', {extra_port})) matches no [[listener]] "
                "address; left alone" in log
            ), log
            for served in (port, bound_port):
                assert await status_of(served, pki.context) == 101


async def test_status_is_refreshed_while_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """STATUS= lines keep `systemctl status` current between reloads."""
    import os
    import signal as signal_module
    import socket as socket_module

    import gatewayd.cli as cli
    from gatewayd.config import loads
    from gatewayd.notify import Notifier
    from gatewayd.server import Gateway

    monkeypatch.setattr(cli, "STATUS_INTERVAL", 0.05)
    path = tmp_path / "notify.sock"
    receiver = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    config = loads(
        '[[listener]]\naddress = "127.0.0.1:0"\ntls = false\n'
        '[[host]]\nnames = ["a.test"]\n[[host.route]]\npath = "/"\nbackend = "ws://127.0.0.1:9"\n',
        tmp_path / "g.toml",
    )
    gateway = Gateway(config)
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cli.serve_until_signal, gateway, None, notifier)
            messages: list[str] = []
            while sum(m.startswith("STATUS=generation 1") for m in messages) < 3:
                await trio.sleep(0.02)
                try:
                    while True:
                        messages.append(receiver.recv(4096).decode())
                except BlockingIOError:
                    pass
            os.kill(os.getpid(), signal_module.SIGTERM)
    receiver.close()
    assert messages[0].startswith("READY=1\nSTATUS=generation 1")
