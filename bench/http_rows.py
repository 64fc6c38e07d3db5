"""The benchmark's HTTP rows (SPEC section 7): gatewayd against nginx, HAProxy and Caddy in the same run.

Imported by bench/run.py. What runs, all on 127.0.0.1:

* an origin nginx (plain HTTP, one worker, on CPU 1 with the load generator) that
  answers ``GET /app/...`` with a 13-byte body;
* the proxies, each alone on CPU 0: nginx (TLS, ``proxy_pass`` to the origin with an
  upstream ``keepalive`` pool, ``alias`` for the files), HAProxy (the proxied GET
  only: it serves no files) and Caddy (``reverse_proxy``, ``file_server``), their
  configurations in bench/peers.py, and gatewayd (``http = true`` on ``/app/``,
  ``static`` on ``/files/``), ``max_requests_per_connection`` /
  ``keepalive_requests`` both raised so every connection stays kept-alive for the
  whole measurement;
* ``wrk`` (Debian's package) on CPU 1, TLS 1.3, kept-alive connections.

Workloads:

* proxied GET req/s: 32 connections, ``GET /app/hello`` (13-byte answer);
* small static req/s: 32 connections, a 1 KiB file;
* large static MB/s: 4 connections, a 16 MiB file, again and again.

Each with the proxy's CPU time per request (µs of proxy CPU / requests answered):
what a request costs, whether or not the proxy's core was full.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs

SMALL_FILE = 1024
LARGE_FILE = 16 << 20
WORKLOADS = (
    # (key, label, path, connections, unit)
    ("http-get", "proxied GET req/s (13 B, 32 conns)", "/app/hello", 32, "/s"),
    ("static-small", "static 1 KiB file req/s (32 conns)", "/files/small.html", 32, "/s"),
    ("static-large", "static 16 MiB file MB/s (4 conns)", "/files/large.bin", 4, "MB/s"),
)

_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


@dataclass
class Files:
    """The document root both proxies serve."""

    root: Path

    @classmethod
    def make(cls, workdir: Path) -> Files:
        root = workdir / "www"
        root.mkdir(exist_ok=True)
        # nginx started as root serves files as "nobody": the temporary
        # folder (0700) must let it in.
        workdir.chmod(0o755)
        root.chmod(0o755)
        (root / "small.html").write_bytes(b"<!doctype html>" + b"x" * (SMALL_FILE - 16) + b"\n")
        block = os.urandom(1 << 20)
        with (root / "large.bin").open("wb") as out:
            for _ in range(LARGE_FILE // len(block)):
                out.write(block)
        return cls(root)


def origin_conf(work: Path, port: int) -> Path:
    """An nginx that answers every request with a 13-byte body (the backend)."""
    work.mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "hello, world\\n"; }}
    }}
}}
""")
    return conf


def nginx_conf(work: Path, port: int, cert: Path, key: Path, origin: int, files: Files) -> Path:
    work.mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log {work}/access.log;
    keepalive_requests 1000000;
    sendfile on;
    upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;
        location /app/ {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
        location /files/ {{ alias {files.root}/; }}
    }}
}}
""")
    return conf


def gatewayd_conf(path: Path, port: int, cert: Path, key: Path, origin: int, files: Files, static: bool) -> Path:
    static_route = f"""
[[host.route]]
path_prefix = "/files/"
static = "{files.root}"
""" if static else ""
    path.write_text(f"""
[gateway]
max_connections = 20000
max_requests_per_connection = 1000000

[[listener]]
address = "127.0.0.1:{port}"

[[host]]
names = ["bench.test"]
certificate = "{cert}"
private_key = "{key}"
default = true

[[host.route]]
path_prefix = "/app/"
backend = "ws://127.0.0.1:{origin}"
http = true
{static_route}
""")
    return path


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests and bytes from wrk's report ("N requests in Ts, X read")."""
    found = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m), ([\d.]+)([KMGT]?B) read", text)
    if found is None:
        raise RuntimeError(f"unexpected wrk output: {text!r}")
    seconds = float(found.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[found.group(3)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    return {
        "requests": int(found.group(1)),
        "seconds": seconds,
        "bytes": float(found.group(4)) * _UNITS[found.group(5)],
        "bad_responses": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1).strip() if socket_errors else "",
    }


def wrk(
    cpu: str, url: str, connections: int, duration: float
) -> tuple[dict[str, Any], float]:
    """One wrk run pinned to ``cpu``; returns its figures and its own CPU seconds."""
    proc = procs.spawn(
        ["taskset", "-c", cpu, "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s",
         "-H", "Host: bench.test", url],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out!r}")
    return parse_wrk(out), usage.ru_utime + usage.ru_stime


def measure(
    cpu_seconds: Any, proxy_pid: int, origin_pid: int, load_cpu: str, url: str, connections: int,
    duration: float, warmup: float, around: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Warm up, then measure: requests/s, bytes/s, CPU of proxy, wrk and origin.

    ``around`` is entered for the measurement only (bench/run.py's --profile).
    """
    wrk(load_cpu, url, connections, warmup)
    with around():
        p0, o0, t0 = cpu_seconds(proxy_pid), cpu_seconds(origin_pid), time.monotonic()
        figures, gen_cpu = wrk(load_cpu, url, connections, duration)
        p1, o1, t1 = cpu_seconds(proxy_pid), cpu_seconds(origin_pid), time.monotonic()
    if figures["bad_responses"]:
        raise RuntimeError(f"{url}: {figures['bad_responses']} non-2xx answers")
    wall = t1 - t0
    return {
        "rate": figures["requests"] / figures["seconds"],
        "bytes_per_s": figures["bytes"] / figures["seconds"],
        "requests": figures["requests"],
        "socket_errors": figures["socket_errors"],
        "proxy_cpu": (p1 - p0) / wall,
        "cpu": gen_cpu / wall,
        "backend_cpu": (o1 - o0) / wall,
        "cpu_us_per_request": (p1 - p0) / max(1, figures["requests"]) * 1e6,
    }


def value(result: dict[str, Any], unit: str) -> float:
    return float(result["bytes_per_s"] / 1e6 if unit == "MB/s" else result["rate"])
