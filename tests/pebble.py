"""A real ACME CA for the tests: Debian's ``pebble`` and ``pebble-challtestsrv``.

Pebble (Let's Encrypt's test CA) validates challenges for real: its VA
resolves the names through pebble-challtestsrv's mock DNS (every A query
answers 127.0.0.1, no AAAA) and connects to ``tlsPort`` (TLS-ALPN-01) and
``httpPort`` (HTTP-01) on 127.0.0.1: the test passes the gateway's listener
ports there. Nothing is bound outside 127.0.0.1; every port is a free one.
Pebble's own HTTPS certificate comes from a trustme CA (``ca_bundle``).

Environment: ``PEBBLE_VA_NOSLEEP=1`` (no random validation delay),
``PEBBLE_WFE_NONCEREJECT=0`` (no injected badNonce), ``PEBBLE_AUTHZREUSE=0``
(every order validates again, renewals included). Validation itself is never
skipped (no ``PEBBLE_VA_ALWAYS_VALID``).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme

START_SECONDS = 20.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for configs that must name it up front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Pebble:
    directory: str
    ca_bundle: Path
    management: str
    process: subprocess.Popen[bytes]
    log: Path
    context: ssl.SSLContext

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.management + path, context=self.context, timeout=10) as answer:
            data: bytes = answer.read()
            return data

    def root_pem(self) -> bytes:
        """Pebble's root (made anew at each start): what issued certificates chain to."""
        return self.get("/roots/0")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_ready(url: str, context: ssl.SSLContext, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited: {log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not up in time: {log.read_text(errors='replace')}") from None
            time.sleep(0.05)


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {port} not up in time: {log.read_text(errors='replace')}") from None
            time.sleep(0.05)


@contextmanager
def pebble_ca(
    directory: Path,
    *,
    tls_port: int,
    http_port: int | None = None,
    validity_seconds: int | None = None,
    blocklist: Sequence[str] = (),
) -> Iterator[Pebble]:
    """Run pebble-challtestsrv and pebble until the block ends.

    Args:
        directory: where config, certificates and logs go (tmp_path).
        tls_port: where Pebble's VA connects for TLS-ALPN-01 (the gateway's TLS listener).
        http_port: where it connects for HTTP-01 (a plain listener), if any.
        validity_seconds: lifetime of issued certificates (Pebble's default is years).
        blocklist: names Pebble refuses to issue for (rejectedIdentifier).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert_file = directory / "pebble-cert.pem"
    key_file = directory / "pebble-key.pem"
    server.cert_chain_pems[0].write_to_path(str(cert_file))
    server.private_key_pem.write_to_path(str(key_file))
    ca_bundle = directory / "pebble-ca.pem"
    ca.cert_pem.write_to_path(str(ca_bundle))
    context = ssl.create_default_context(cafile=str(ca_bundle))

    dns_port, acme_port, management_port, challtest_management = (free_port() for _ in range(4))
    config: dict[str, object] = {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{management_port}",
        "certificate": str(cert_file),
        "privateKey": str(key_file),
        "httpPort": http_port if http_port is not None else free_port(),
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
        "domainBlocklist": list(blocklist),
    }
    if validity_seconds is not None:
        config["certificateValidityPeriod"] = validity_seconds
    config_file = directory / "pebble-config.json"
    config_file.write_text(json.dumps({"pebble": config}))

    dns_log = directory / "challtestsrv.log"
    pebble_log = directory / "pebble.log"
    env = {
        **os.environ,
        "PEBBLE_VA_NOSLEEP": "1",
        "PEBBLE_WFE_NONCEREJECT": "0",
        "PEBBLE_AUTHZREUSE": "0",
    }
    env.pop("PEBBLE_VA_ALWAYS_VALID", None)
    with dns_log.open("wb") as dns_out:
        dns = subprocess.Popen(
            [
                "pebble-challtestsrv",
                "-dns01", f"127.0.0.1:{dns_port}",
                "-http01", "",
                "-https01", "",
                "-tlsalpn01", "",
                "-management", f"127.0.0.1:{challtest_management}",
                "-defaultIPv4", "127.0.0.1",
                "-defaultIPv6", "",
            ],
            stdout=dns_out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_port(challtest_management, dns, dns_log)
        with pebble_log.open("wb") as pebble_out:
            process = subprocess.Popen(
                ["pebble", "-config", str(config_file), "-dnsserver", f"127.0.0.1:{dns_port}"],
                stdout=pebble_out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        pebble = Pebble(
            directory=f"https://127.0.0.1:{acme_port}/dir",
            ca_bundle=ca_bundle,
            management=f"https://127.0.0.1:{management_port}",
            process=process,
            log=pebble_log,
            context=context,
        )
        try:
            _wait_ready(pebble.directory, context, process, pebble_log)
            yield pebble
        finally:
            pebble.stop()
    finally:
        if dns.poll() is None:
            dns.terminate()
            try:
                dns.wait(10)
            except subprocess.TimeoutExpired:
                dns.kill()
                dns.wait()
