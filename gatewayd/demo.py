"""``gatewayd demo``: the gateway on wss://localhost:8443/echo with nothing set up.

It makes (once, then reuses) a development CA and a certificate for
``localhost`` / 127.0.0.1 / ::1 in a state folder, starts a built-in echo
backend (trio-websocket) on a free loopback port, writes a real configuration
file for the gateway next to the certificates, loads it through the normal
loader and serves it until Ctrl-C. The dev CA's key never leaves the state
folder (mode 0600) and is only used to sign the localhost certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shlex
import sys
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from gatewayd import log as gatewayd_log
from gatewayd.cli import serve_until_signal
from gatewayd.config import load
from gatewayd.errors import ConfigErrors
from gatewayd.server import Gateway, Generation

logger = logging.getLogger("gatewayd.demo")


def state_directory(name: str) -> Path:
    """``$XDG_STATE_HOME/gatewayd/NAME`` (``~/.local/state/gatewayd/NAME``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gatewayd" / name


def default_directory() -> Path:
    return state_directory("demo")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ensure_dev_certificate(
    directory: Path,
    stem: str = "localhost",
    dns_names: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
) -> tuple[Path, Path, Path]:
    """Make (or reuse) a dev CA and a certificate signed by it in ``directory``.

    Returns:
        (CA certificate, ``{stem}.pem`` chain, ``{stem}.key``) paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert_path = directory / "ca.pem"
    ca_key_path = directory / "ca.key"
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert_path.exists() and key_path.exists() and ca_cert_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.not_valid_after_utc > now + datetime.timedelta(days=7):
            return ca_cert_path, cert_path, key_path

    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gatewayd demo"),
                x509.NameAttribute(NameOID.COMMON_NAME, "gatewayd demo CA (development only)"),
            ]
        )
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(ca_key_path, _key_pem(ca_key))
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns_names or ip_addresses)[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name) for name in dns_names]
                + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    return ca_cert_path, cert_path, key_path


#: Names the shipped configurations in config/ use, so that `gatewayd check`
#: passes on them in a checkout once `./dev` has made certs/example.pem.
EXAMPLE_NAMES = (
    "localhost",
    "chat.example.com",
    "ws.example.com",
    "api.example.com",
    "example.org",
    "*.example.org",
)


def ensure_example_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """The development certificate the shipped configurations in ``config/`` point at."""
    return ensure_dev_certificate(directory, "example", EXAMPLE_NAMES)


async def _echo_handler(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            message = await ws.get_message()
            await ws.send_message(message)
    except ConnectionClosed:
        return


def write_demo_config(directory: Path, port: int, echo_port: int) -> Path:
    """Write the demo's gatewayd.toml (a real config, loaded by the normal loader)."""
    path = directory / "gatewayd.toml"
    path.write_text(
        f"""# Written by `gatewayd demo`; rewritten at every start.
[gateway]
handshake_timeout = 10.0
shutdown_timeout = 5.0   # Ctrl-C: open connections get 5 s; a second Ctrl-C closes them at once

[log]
level = "info"

[[listener]]
address = "127.0.0.1:{port}"

[[host]]
names = ["localhost", "127.0.0.1"]
certificate = "localhost.pem"
private_key = "localhost.key"
default = true

[[host.route]]
path = "/echo"
backend = "ws://127.0.0.1:{echo_port}/"
""",
        encoding="utf-8",
    )
    return path


def _instructions(port: int, ca: Path) -> str:
    url = f"wss://localhost:{port}/echo"
    python = shlex.quote(sys.executable)
    return f"""
gatewayd demo is running: {url}

  Try it (echoes each message back):
    {python} -m gatewayd.client {url} --cafile {shlex.quote(str(ca))} "hello gatewayd"

  With curl (shows the 101 handshake, then waits: Ctrl-C to end):
    curl -i -N --cacert {shlex.quote(str(ca))} -H 'Connection: Upgrade' -H 'Upgrade: websocket' \\
      -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' {url.replace('wss://', 'https://')}

  In a browser: trust the dev CA {ca}
    Firefox: Settings > Privacy & Security > Certificates > View Certificates > Authorities > Import
    Chromium/Chrome: Settings > Privacy and security > Security > Manage certificates > Authorities > Import
    then in the console: s = new WebSocket("{url}"); s.onmessage = e => console.log(e.data); s.onopen = () => s.send("hi")
  (The dev CA is for this machine only; never trust it anywhere else.)

Ctrl-C stops everything: open connections may finish for up to 5 s
(shutdown_timeout), a second Ctrl-C closes them at once.
"""  # noqa: E501 (the lines a user copies, kept whole)


def run_demo(port: int = 8443, directory: Path | None = None) -> int:
    """Run the demo in the foreground until Ctrl-C; returns the exit code."""
    gatewayd_log.setup("info", "text")
    directory = directory or default_directory()
    ca, _cert, _key = ensure_dev_certificate(directory)

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            echo_servers = await nursery.start(
                serve_websocket, _echo_handler, "127.0.0.1", 0, None
            )
            echo_port = echo_servers.port
            config_path = write_demo_config(directory, port, echo_port)
            try:
                generation = Generation.build(load(config_path))
            except ConfigErrors as errors:
                print(f"gatewayd demo: {errors}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            gateway = Gateway(generation.config, generation=generation)
            try:
                await gateway.bind()
            except OSError as exc:
                print(f"gatewayd demo: {exc.strerror or exc} (try --port)", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            logger.info("echo backend on ws://127.0.0.1:%d/, config %s", echo_port, config_path)
            # The same signal handling as `gatewayd run`: Ctrl-C (SIGINT) or
            # SIGTERM drains for shutdown_timeout, a second one closes every
            # connection at once; SIGHUP re-reads the demo's file.
            await serve_until_signal(
                gateway, str(config_path), on_ready=lambda: print(_instructions(port, ca), flush=True)
            )
            nursery.cancel_scope.cancel()
        return 0

    return trio.run(main)
