"""HAProxy's and Caddy's configurations for the benchmark (bench/run.py, bench/http_rows.py).

Both are Debian's packages (bench/run.sh installs them), configured like the
benchmark's nginx: one thread on the proxy's core (HAProxy ``nbthread 1``,
Caddy with ``GOMAXPROCS=1``, and taskset pins every thread of either to it),
the same ECDSA P-256 certificate, TLS 1.2 and 1.3 with the same ECDHE AES-GCM
and ChaCha20 suites (TLS 1.3's are fixed), session tickets at their defaults
and no server-side session cache (nginx's default ``ssl_session_cache none``;
the load generator never resumes anyway), an access line per request or
tunnel written by the proxy itself like nginx's ``access_log`` (HAProxy to its
standard output, which run.py sends to a file; Caddy to a file), long tunnel
timeouts (the idle connections are held for up to two minutes), HTTP/1.1 only.

Caddy never tries ACME and binds nothing but the benchmark's port:
``auto_https off`` (no certificate management, no port 80 redirect), ``admin
off`` (no :2019), its storage and autosave under the run's temporary folder.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import resource
from pathlib import Path

#: The cipher suites below TLS 1.3, as nginx's ``ssl_ciphers`` in bench/run.py.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def haproxy_maxconn() -> int:
    """What the open-files limit allows (HAProxy refuses to start above it): 2 fds a connection."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(100, min(20000, (soft - 200) // 2))


def haproxy_pem(work: Path, cert: Path, key: Path) -> Path:
    """HAProxy's ``crt``: the chain and the key in one file."""
    pem = work / "bench-combined.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    pem.chmod(0o600)
    return pem


def haproxy_global(work: Path) -> str:
    maxconn = haproxy_maxconn()
    return f"""
global
    nbthread 1
    maxconn {maxconn}
    pidfile {work}/haproxy.pid
    # no server-side session cache (nginx: ssl_session_cache none, its default)
    tune.ssl.cachesize 0
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphers {TLS12_CIPHERS}
    # the access lines go to stdout, which bench/run.py writes to haproxy.log
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    maxconn {maxconn}
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
    timeout tunnel 3600s
    timeout http-keep-alive 3600s
"""


def haproxy_ws_conf(work: Path, port: int, cert: Path, key: Path, backend_port: int) -> Path:
    """TLS terminated, every request (the WebSocket upgrades) to the echo backend; HAProxy
    tunnels a connection after the backend's 101 by itself."""
    work.mkdir(exist_ok=True)
    conf = work / "haproxy.cfg"
    conf.write_text(haproxy_global(work) + f"""
frontend ws
    bind 127.0.0.1:{port} ssl crt {haproxy_pem(work, cert, key)}
    default_backend echo

backend echo
    server echo 127.0.0.1:{backend_port}
""")
    return conf


def haproxy_http_conf(work: Path, port: int, cert: Path, key: Path, origin: int) -> Path:
    """The proxied GET row: HAProxy keeps backend connections for reuse (``http-reuse safe``,
    its default) as nginx's upstream ``keepalive`` pool does. HAProxy serves no files: no
    static rows."""
    work.mkdir(exist_ok=True)
    conf = work / "haproxy.cfg"
    conf.write_text(haproxy_global(work) + f"""
frontend web
    bind 127.0.0.1:{port} ssl crt {haproxy_pem(work, cert, key)}
    default_backend origin

backend origin
    http-reuse safe
    server origin 127.0.0.1:{origin}
""")
    return conf


def haproxy_argv(conf: Path) -> list[str]:
    # -db: stay in the foreground, no master process.
    return ["haproxy", "-db", "-f", str(conf)]


def caddy_global(work: Path) -> str:
    return f"""{{
	admin off
	auto_https off
	grace_period 1s
	default_sni bench.test
	storage file_system {work}/data
	servers {{
		protocols h1
	}}
}}
"""


def caddy_site(work: Path, port: int, cert: Path, key: Path, body: str) -> str:
    return f"""
:{port} {{
	bind 127.0.0.1
	tls {cert} {key} {{
		protocols tls1.2 tls1.3
	}}
	log {{
		output file {work}/access.log
	}}
{body}
}}
"""


def caddy_ws_conf(work: Path, port: int, cert: Path, key: Path, backend_port: int) -> Path:
    """``reverse_proxy`` upgrades WebSocket requests and tunnels them by itself."""
    work.mkdir(exist_ok=True)
    conf = work / "Caddyfile"
    conf.write_text(caddy_global(work) + caddy_site(work, port, cert, key, f"""
	reverse_proxy /echo 127.0.0.1:{backend_port}
"""))
    return conf


def caddy_http_conf(work: Path, port: int, cert: Path, key: Path, origin: int, root: Path) -> Path:
    """``reverse_proxy`` with a pool of 64 kept backend connections (nginx's ``keepalive 64``),
    ``file_server`` for the files (nginx's ``alias``)."""
    work.mkdir(exist_ok=True)
    conf = work / "Caddyfile"
    conf.write_text(caddy_global(work) + caddy_site(work, port, cert, key, f"""
	handle_path /files/* {{
		root * {root}
		file_server
	}}
	handle /app/* {{
		reverse_proxy 127.0.0.1:{origin} {{
			transport http {{
				keepalive_idle_conns_per_host 64
			}}
		}}
	}}
"""))
    return conf


def caddy_argv(conf: Path) -> list[str]:
    return ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]


def caddy_env(work: Path) -> dict[str, str]:
    """One Go scheduler thread; Caddy's home, config and data folders in the run's folder."""
    return {"GOMAXPROCS": "1", "HOME": str(work), "XDG_CONFIG_HOME": str(work / "config"),
            "XDG_DATA_HOME": str(work / "data")}
