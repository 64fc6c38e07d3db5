"""The gatewayd benchmark: gatewayd against nginx (and its tcp:// bridge against websockify).

Run it with ``bench/run.sh`` (it installs what is missing, then runs this file);
``bench/run.sh --quick`` is a shorter, noisier run. See docs/performance.md.

What runs, all on 127.0.0.1 (ports chosen free at start):

* ``echo_backend`` (bench/echo_backend.c, compiled here with gcc): one C process,
  epoll, answers the WebSocket upgrade then echoes bytes as is (``ws`` mode, behind
  the passthrough proxies), or echoes from the first byte (``tcp`` mode, behind the
  bridges).
* the proxies, one at a time, each pinned to CPU 0 with taskset: nginx (the Debian
  package, one worker, TLS 1.3 with the same ECDSA P-256 certificate, ``proxy_pass``
  with ``proxy_http_version 1.1`` and the Upgrade/Connection headers), gatewayd
  (``workers = 1``), gatewayd with ``workers = 2`` (CPUs 0 and 1), websockify, and
  gatewayd's ``tcp://`` bridge when this checkout has it.
* ``loadgen`` (bench/loadgen.c, C, OpenSSL, epoll), pinned to CPU 1 with the backend.

Workloads (every connection: full TLS 1.3 handshake, WebSocket upgrade, 101):

* handshakes/s: 32 connections in flight, each closed once upgraded, again and again;
* echo msg/s: 64 connections in ping-pong with 64-byte messages;
* latency: 2,000 messages/s in total, open loop, over 64 connections: p50 and p99
  from the scheduled send time to the end of the echo;
* bulk MB/s: 4 connections each echoing 1 MiB messages (payload MB/s, each byte
  travels both ways);
* memory per idle connection: a fresh proxy process, one connection to warm it up,
  then 5,000 connections opened (one 64-byte echo each) and held: RSS growth of the
  proxy's processes / 5,000.

HTTP rows (bench/http_rows.py, SPEC section 7): requests/s of a small proxied GET
and of a small static file, MB/s of a large static file, on kept-alive TLS connections
from ``wrk``, gatewayd beside nginx, with the proxy's CPU time per request.

Each figure of gatewayd is printed with its ratio to nginx measured in the same run,
with CPU use (fraction of one core) of the proxy, the load generator and the backend
during each measurement: the proxy's core must be the one that is full.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_rows  # noqa: E402 (bench/ is not a package: run.py is run as a script)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PROXY_CPU = "0"
LOAD_CPU = "1"
IDLE_CONNECTIONS = 5000
WEBSOCKIFY_IDLE_CONNECTIONS = 50  # one forked process per connection
#: Bound on opening the idle connections, and on the whole run.
HOLD_SECONDS = 120
RUN_SECONDS = 600
TARGETS = {
    "handshakes": ("≥ 0.8×", lambda r: r >= 0.8),
    "echo": ("≥ 0.5×", lambda r: r >= 0.5),
    "p99": ("≤ 1.5×", lambda r: r <= 1.5),
    "bulk": ("≥ 1.5×", lambda r: r >= 1.5),
}


@dataclass
class Settings:
    duration: float = 8.0
    warmup: float = 2.0
    idle: int = IDLE_CONNECTIONS
    workdir: Path = Path()
    python: str = sys.executable


# ---------------------------------------------------------------------------- processes


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    result, todo = [], [pid]
    while todo:
        p = todo.pop()
        result.append(p)
        todo.extend(children.get(p, []))
    return result


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s process tree (reaped children included)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / clock_ticks()


def rss_kib(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s: {proc.args!r}")


@dataclass
class Proxy:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cpus: str = PROXY_CPU
    bridge: bool = False
    ready_delay: float = 0.0


@contextlib.contextmanager
def running(proxy: Proxy, settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    log = open(settings.workdir / f"{proxy.name}.log", "ab")  # noqa: SIM115 (closed in the finally below)
    env = {**os.environ, **proxy.env}
    proc = subprocess.Popen(
        ["taskset", "-c", proxy.cpus, *proxy.argv],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
        cwd=settings.workdir,
        start_new_session=True,
    )
    try:
        wait_port(proxy.port, proc)
        time.sleep(proxy.ready_delay)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # forked children (websockify) left behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


class Backend:
    """echo_backend on CPU 1; cpu() asks it for its own CPU time."""

    def __init__(self, binary: Path, mode: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["taskset", "-c", LOAD_CPU, str(binary), mode, str(self.port)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"echo_backend did not start: {line!r}")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)


# ---------------------------------------------------------------------------- load


def loadgen(settings: Settings, mode: str, port: int, *args: str, bridge: bool = False) -> subprocess.Popen[str]:
    argv = ["taskset", "-c", LOAD_CPU, str(settings.workdir / "loadgen"), mode, str(port), *args]
    if bridge:
        argv.append("-b")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)


def measure(
    settings: Settings, proxy_pid: int, backend: Backend, mode: str, port: int, *args: str, bridge: bool = False
) -> dict[str, Any]:
    """Run loadgen ``mode``; returns its JSON plus the proxy's and backend's CPU share."""
    gen = loadgen(
        settings, mode, port, "-d", str(settings.duration), "-w", str(settings.warmup), *args, bridge=bridge
    )
    time.sleep(settings.warmup)
    p0, b0, t0 = cpu_seconds(proxy_pid), backend.cpu(), time.monotonic()
    time.sleep(settings.duration)
    p1, b1, t1 = cpu_seconds(proxy_pid), backend.cpu(), time.monotonic()
    out, _ = gen.communicate(timeout=settings.duration + 60)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["proxy_cpu"] = (p1 - p0) / (t1 - t0)
    result["backend_cpu"] = (b1 - b0) / (t1 - t0)
    return result


def hold(settings: Settings, proxy: Proxy, backend: Backend, count: int) -> dict[str, Any]:
    """Fresh proxy: RSS growth per connection for ``count`` idle connections."""
    with running(proxy, settings) as proc:
        # Warm up: imports, first TLS context use, logging.
        warm = loadgen(settings, "hold", proxy.port, "-n", "1", "-c", "1", "-d", "30", bridge=proxy.bridge)
        assert warm.stdout is not None and warm.stdin is not None
        warm.stdout.readline()
        warm.stdin.close()
        warm.wait(timeout=30)
        time.sleep(1.0)
        before = rss_kib(proc.pid)
        gen = loadgen(
            settings, "hold", proxy.port, "-n", str(count), "-c", "64", "-d", str(HOLD_SECONDS), bridge=proxy.bridge
        )
        assert gen.stdout is not None and gen.stdin is not None
        started = time.monotonic()
        line = gen.stdout.readline()
        opened = time.monotonic() - started
        if not line.startswith("held"):
            raise RuntimeError(f"{proxy.name}: hold failed: {line!r}")
        held = int(line.split()[1])
        if held < count:
            print(f"  {proxy.name}: only {held} of {count} connections held after {HOLD_SECONDS}s",
                  file=sys.stderr, flush=True)
        count = max(1, held)
        time.sleep(2.0)  # let the proxy settle (deferred frees, GC)
        after = rss_kib(proc.pid)
        gen.stdin.close()
        gen.wait(timeout=60)
    return {
        "connections": count,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": (after - before) / count,
        "open_seconds": opened,
    }


def suite(
    settings: Settings, proxy: Proxy, backend: Backend, workloads: Sequence[str], idle: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    b = proxy.bridge
    measured = [w for w in workloads if w != "idle"]
    if measured:
        with running(proxy, settings) as proc:
            for workload in measured:
                print(f"  {proxy.name}: {workload} ...", file=sys.stderr, flush=True)
                if workload == "handshakes":
                    results[workload] = measure(settings, proc.pid, backend, "handshake", proxy.port, "-c", "32", bridge=b)
                elif workload == "echo":
                    results[workload] = measure(settings, proc.pid, backend, "echo", proxy.port, "-c", "64", bridge=b)
                elif workload == "latency":
                    results[workload] = measure(
                        settings, proc.pid, backend, "latency", proxy.port, "-c", "64", "-r", "2000", bridge=b
                    )
                elif workload == "bulk":
                    results[workload] = measure(
                        settings, proc.pid, backend, "bulk", proxy.port, "-c", "4", "-s", str(1 << 20), bridge=b
                    )
    if "idle" in workloads:
        print(f"  {proxy.name}: idle x{idle} ...", file=sys.stderr, flush=True)
        results["idle"] = hold(settings, proxy, backend, idle)
    return results


# ---------------------------------------------------------------------------- setup


def build(settings: Settings) -> None:
    for name in ("loadgen", "echo_backend"):
        subprocess.run(
            ["gcc", "-O2", "-o", str(settings.workdir / name), str(BENCH / f"{name}.c"), "-lssl", "-lcrypto",
             "-Wno-deprecated-declarations"],
            check=True,
        )


def certificate(settings: Settings) -> tuple[Path, Path]:
    import trustme

    ca = trustme.CA()  # ECDSA P-256 keys (trustme's default)
    leaf = ca.issue_cert("bench.test")
    cert, key = settings.workdir / "bench.pem", settings.workdir / "bench.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for blob in leaf.cert_chain_pems[1:]:
        blob.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def nginx_proxy(settings: Settings, cert: Path, key: Path, backend_port: int) -> Proxy:
    port = free_port()
    work = settings.workdir / "nginx"
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
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;
        location /echo {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
""")
    return Proxy("nginx", ["nginx", "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)], port)


def gatewayd_proxy(
    settings: Settings, name: str, cert: Path, key: Path, backend: str, *, workers: int = 1, bridge: bool = False
) -> Proxy:
    port = free_port()
    conf = settings.workdir / f"{name}.toml"
    workers_line = f"workers = {workers}\n" if workers != 1 else ""
    conf.write_text(f"""
[gateway]
{workers_line}max_connections = 20000

[[listener]]
address = "127.0.0.1:{port}"

[[host]]
names = ["bench.test"]
certificate = "{cert}"
private_key = "{key}"
default = true

[[host.route]]
path = "/echo"
backend = "{backend}"
""")
    env = {"PYTHONPATH": str(ROOT)}
    return Proxy(
        name,
        [settings.python, "-m", "gatewayd", "run", "-c", str(conf)],
        port,
        env=env,
        cpus="0,1" if workers > 1 else PROXY_CPU,
        bridge=bridge,
        ready_delay=0.5 if workers > 1 else 0.0,
    )


def bridge_supported(settings: Settings, cert: Path, key: Path) -> bool:
    probe = gatewayd_proxy(settings, "bridge-probe", cert, key, "tcp://127.0.0.1:9")
    conf = probe.argv[-1]
    result = subprocess.run(
        [settings.python, "-m", "gatewayd", "check", "-c", conf],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


def websockify_proxy(settings: Settings, cert: Path, key: Path, backend_port: int) -> Proxy:
    port = free_port()
    exe = Path(settings.python).with_name("websockify")
    argv = [str(exe)] if exe.exists() else [settings.python, "-m", "websockify"]
    return Proxy(
        "websockify",
        [*argv, "--cert", str(cert), "--key", str(key), f"127.0.0.1:{port}", f"127.0.0.1:{backend_port}"],
        port,
        bridge=True,
    )


def static_supported(settings: Settings, cert: Path, key: Path, files: http_rows.Files) -> bool:
    """Whether this checkout's gatewayd has ``static`` routes (the static file rows need them)."""
    conf = http_rows.gatewayd_conf(settings.workdir / "static-probe.toml", 1, cert, key, 9, files, True)
    result = subprocess.run(
        [settings.python, "-m", "gatewayd", "check", "-c", str(conf)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


def http_suite(
    settings: Settings, cert: Path, key: Path, only: set[str], results: dict[str, dict[str, Any]]
) -> bool:
    """The HTTP rows (bench/http_rows.py): nginx and gatewayd against one origin nginx.

    Returns whether the static file rows ran (this checkout has ``static`` routes).
    """
    files = http_rows.Files.make(settings.workdir)
    static = static_supported(settings, cert, key, files)
    origin_port = free_port()
    origin_work = settings.workdir / "origin"
    origin = Proxy(
        "origin",
        ["nginx", "-p", str(origin_work), "-e", str(origin_work / "error.log"),
         "-c", str(http_rows.origin_conf(origin_work, origin_port))],
        origin_port,
        cpus=LOAD_CPU,
    )
    nginx_port, gatewayd_port = free_port(), free_port()
    nginx_work = settings.workdir / "nginx-http"
    nginx_conf = http_rows.nginx_conf(nginx_work, nginx_port, cert, key, origin_port, files)
    gatewayd_conf = http_rows.gatewayd_conf(
        settings.workdir / "gatewayd-http.toml", gatewayd_port, cert, key, origin_port, files, static
    )
    proxies = [
        Proxy("nginx", ["nginx", "-p", str(nginx_work), "-e", str(nginx_work / "error.log"),
                        "-c", str(nginx_conf)], nginx_port),
        Proxy("gatewayd", [settings.python, "-m", "gatewayd", "run", "-c", str(gatewayd_conf)],
              gatewayd_port, env={"PYTHONPATH": str(ROOT)}),
    ]
    with running(origin, settings) as origin_proc:
        for proxy in proxies:
            if only and proxy.name not in only:
                continue
            print(f"{proxy.name} (http) ...", file=sys.stderr, flush=True)
            with running(proxy, settings) as proc:
                for workload, _, path, connections, _ in http_rows.WORKLOADS:
                    if workload.startswith("static") and not static:
                        continue
                    print(f"  {proxy.name}: {workload} ...", file=sys.stderr, flush=True)
                    results.setdefault(proxy.name, {})[workload] = http_rows.measure(
                        cpu_seconds, proc.pid, origin_proc.pid, LOAD_CPU,
                        f"https://127.0.0.1:{proxy.port}{path}", connections,
                        settings.duration, settings.warmup,
                    )
    return static


def machine() -> dict[str, str]:
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["cpus"] = str(os.cpu_count())
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    info["nginx"] = (nginx.stderr or nginx.stdout).strip().replace("nginx version: ", "")
    try:
        import OpenSSL
        from cryptography.hazmat.backends.openssl.backend import backend

        info["pyopenssl"] = f"{OpenSSL.__version__} ({backend.openssl_version_text()})"
    except Exception as exc:  # informational only
        info["pyopenssl"] = f"? ({exc})"
    ssl_version = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=False).stdout.strip()
    info["system openssl (nginx, loadgen, backend)"] = ssl_version
    with contextlib.suppress(OSError):
        info["load average at start"] = Path("/proc/loadavg").read_text().split()[0]
    return info


# ---------------------------------------------------------------------------- report


def fmt(value: float, unit: str) -> str:
    if unit == "us":
        return f"{value:,.0f} µs"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    if unit == "KiB":
        return f"{value:,.1f} KiB"
    return f"{value:,.0f}/s"


def cpu_note(result: dict[str, Any]) -> str:
    return f"{result['proxy_cpu']:.2f}/{result['cpu']:.2f}/{result['backend_cpu']:.2f}"


def rows(results: dict[str, Any]) -> list[tuple[str, str, float, str, dict[str, Any] | None]]:
    """(label, key, value, unit, measurement) for one proxy's results."""
    out: list[tuple[str, str, float, str, dict[str, Any] | None]] = []
    if "handshakes" in results:
        out.append(("handshakes/s (TLS + upgrade)", "handshakes", results["handshakes"]["rate"], "/s", results["handshakes"]))
    if "echo" in results:
        out.append(("echo msg/s (64 B, 64 conns)", "echo", results["echo"]["rate"], "/s", results["echo"]))
    if "latency" in results:
        out.append(("p50 latency at 2,000 msg/s", "p50", results["latency"]["p50_us"], "us", results["latency"]))
        out.append(("p99 latency at 2,000 msg/s", "p99", results["latency"]["p99_us"], "us", results["latency"]))
    if "bulk" in results:
        out.append(("bulk MB/s (1 MiB msgs, 4 conns)", "bulk", results["bulk"]["bytes_per_s"] / 1e6, "MB/s", results["bulk"]))
    if "idle" in results:
        n = results["idle"]["connections"]
        out.append((f"memory per idle conn (at {n:,})", "idle", results["idle"]["kib_per_connection"], "KiB", None))
    return out


def table(
    title: str, reference_name: str, reference: dict[str, Any], name: str, measured: dict[str, Any],
    targets: dict[str, tuple[str, Any]],
) -> str:
    ref_rows = {key: (value, m) for _, key, value, _, m in rows(reference)}
    footnote = False
    lines = [title, ""]
    header = (
        f"{'':34} {reference_name:>14} {name:>14} {'ratio':>7}  {'target':>8} {'':6} {'per CPU':>7}  "
        f"CPU proxy/gen/backend ({reference_name}; {name})"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for label, key, value, unit, m in rows(measured):
        if key not in ref_rows:
            continue
        ref_value, ref_m = ref_rows[key]
        ratio = value / ref_value if ref_value else float("nan")
        target, check = targets.get(key, ("", None))
        verdict = ""
        if check is not None:
            verdict = "ok" if check(ratio) else "MISSED"
        cpu = f"{cpu_note(ref_m)}; {cpu_note(m)}" if m is not None and ref_m is not None else ""
        # The ratio per core-second of proxy CPU, for throughputs: what each costs,
        # whether or not the proxy's core was full (nginx's often is not here).
        per_cpu = ""
        if m is not None and ref_m is not None and unit != "us" and m["proxy_cpu"] > 0 and ref_m["proxy_cpu"] > 0:
            per_cpu = f"{(value / m['proxy_cpu']) / (ref_value / ref_m['proxy_cpu']):.2f}×"
        ref_text, text = fmt(ref_value, unit), fmt(value, unit)
        if ref_m is not None and unit != "us" and load_bound(ref_m):
            ref_text += LOAD_BOUND
            footnote = True
        if m is not None and unit != "us" and load_bound(m):
            text += LOAD_BOUND
            footnote = True
        lines.append(
            f"{label:34} {ref_text:>14} {text:>14} {ratio:>6.2f}×  {target:>8} {verdict:6} "
            f"{per_cpu:>7}  {cpu}"
        )
    if footnote:
        lines.append(
            f"{LOAD_BOUND} the load generator's core was full (loadgen + backend ≥ {LOAD_BOUND_CORES} cores): "
            "that figure is a lower bound of the proxy's; compare per CPU"
        )
    return "\n".join(lines)


#: Marks a figure measured while CPU 1 (load generator + backend) was saturated.
LOAD_BOUND = "†"
LOAD_BOUND_CORES = 0.9


def load_bound(measurement: dict[str, Any]) -> bool:
    return float(measurement["cpu"]) + float(measurement["backend_cpu"]) >= LOAD_BOUND_CORES


def report(  # noqa: C901 (one report, its sections in print order; split it when a section grows)
    settings: Settings, info: dict[str, str], results: dict[str, dict[str, Any]], bridge: bool,
    static: bool = False,
) -> str:
    out = ["gatewayd benchmark", ""]
    for key, text in info.items():
        out.append(f"  {key}: {text}")
    out.append(f"  measured: {settings.duration:g} s per workload after {settings.warmup:g} s of warm-up; "
               f"proxies on CPU {PROXY_CPU}, loadgen and echo_backend on CPU {LOAD_CPU}")
    out.append("")
    idle_target = ""
    if "gatewayd" in results and "nginx" in results and rows(results["gatewayd"]):
        out.append(table("gatewayd (1 worker, 1 core) vs nginx 1.22 (1 worker, 1 core)", "nginx", results["nginx"],
                         "gatewayd", results["gatewayd"], TARGETS))
        idle = results["gatewayd"].get("idle")
        if idle:
            kib = idle["kib_per_connection"]
            idle_target = f"idle memory target ≤ 30 KiB per connection: {kib:.1f} KiB ({'ok' if kib <= 30 else 'MISSED'})"
            out.append(idle_target)
        out.append("")
    if "gatewayd" in results and "gatewayd-2w" in results:
        one, two = results["gatewayd"], results["gatewayd-2w"]
        out.append("workers: gatewayd workers = 2 on CPUs 0+1 vs workers = 1 on CPU 0 (loadgen and backend stay on CPU 1)")
        out.append("")
        for key, label in (("handshakes", "handshakes/s"), ("echo", "echo msg/s")):
            if key in one and key in two:
                r1, r2 = one[key], two[key]
                per_core = (r2["rate"] / r2["proxy_cpu"]) / (r1["rate"] / r1["proxy_cpu"]) if r1["proxy_cpu"] and r2["proxy_cpu"] else float("nan")
                out.append(
                    f"  {label:14} 1 worker {r1['rate']:>9,.0f}   2 workers {r2['rate']:>9,.0f}   "
                    f"{r2['rate'] / r1['rate']:.2f}×  (proxy CPU {r1['proxy_cpu']:.2f} -> {r2['proxy_cpu']:.2f} cores; "
                    f"per proxy core {per_core:.2f}×; loadgen {r2['cpu']:.2f}, backend {r2['backend_cpu']:.2f})"
                )
        out.append("")
    if "websockify" in results:
        if bridge and "bridge" in results:
            bridge_targets = {"handshakes": ("≥ 10×", lambda r: r >= 10), "echo": ("≥ 5×", lambda r: r >= 5)}
            out.append(table("gatewayd tcp:// bridge (1 worker) vs websockify (1 core)", "websockify", results["websockify"],
                             "bridge", results["bridge"], bridge_targets))
        else:
            out.append("gatewayd tcp:// bridge: not in this checkout (tcp:// backends are refused by "
                       "'gatewayd check'); websockify alone:")
            for label, _, value, unit, m in rows(results["websockify"]):
                out.append(f"  {label:34} {fmt(value, unit):>14}   CPU {cpu_note(m) if m else ''}")
        out.append("")
    # Runs with --only: what has no reference in this run, figures alone.
    shown = set()
    if "gatewayd" in results and "nginx" in results:
        shown |= {"gatewayd", "nginx"}
    if "gatewayd" in results and "gatewayd-2w" in results:
        shown |= {"gatewayd", "gatewayd-2w"}
    if "websockify" in results:
        shown |= {"websockify", "bridge"}
    for name, measured in results.items():
        if name not in shown:
            out.append(f"{name} (no reference in this run):")
            for label, _, value, unit, m in rows(measured):
                out.append(f"  {label:34} {fmt(value, unit):>14}   CPU {cpu_note(m) if m else ''}")
            out.append("")
    if any(w in measured for measured in results.values() for w in ("http-get", "static-small")):
        out.append(http_rows.table(results, static, load_bound, LOAD_BOUND))
        out.append("")
    out.append("CPU columns: cores used during the measurement by the proxy / the load generator / the echo backend"
               " (the origin nginx for the HTTP rows).")
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per workload, 1,000 idle connections")
    parser.add_argument("--only", default="", help="comma-separated: nginx,gatewayd,gatewayd-2w,websockify,bridge")
    parser.add_argument("--workloads", default="handshakes,echo,latency,bulk,idle,http")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.quick:
        settings.duration, settings.warmup, settings.idle = 3.0, 1.0, 1000
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("the benchmark needs 2 CPUs", file=sys.stderr)
        return 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, soft), max(wanted, hard)))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < settings.idle * 2 + 1000:
        settings.idle = max(100, (soft - 1000) // 2)
        print(f"open files limit {soft}: idle test with {settings.idle} connections", file=sys.stderr)
    def too_long(signum: int, frame: object) -> None:
        raise TimeoutError(f"the benchmark ran over {RUN_SECONDS} s; stopped")

    # Bounded as a whole: the `finally` blocks stop every process started.
    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(RUN_SECONDS)
    only = {x for x in args.only.split(",") if x}
    workloads = [w for w in args.workloads.split(",") if w]
    http = "http" in workloads
    workloads = [w for w in workloads if w != "http"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        settings.workdir = Path(tmp)
        build(settings)
        cert, key = certificate(settings)
        info = machine()
        has_bridge = bridge_supported(settings, cert, key)
        results: dict[str, dict[str, Any]] = {}
        ws_backend = Backend(settings.workdir / "echo_backend", "ws")
        tcp_backend = Backend(settings.workdir / "echo_backend", "tcp")
        try:
            plan: list[tuple[Proxy, Backend, list[str], int]] = [
                (nginx_proxy(settings, cert, key, ws_backend.port), ws_backend, workloads, settings.idle),
                (gatewayd_proxy(settings, "gatewayd", cert, key, f"ws://127.0.0.1:{ws_backend.port}/echo"),
                 ws_backend, workloads, settings.idle),
                (gatewayd_proxy(settings, "gatewayd-2w", cert, key, f"ws://127.0.0.1:{ws_backend.port}/echo", workers=2),
                 ws_backend, [w for w in workloads if w in ("handshakes", "echo")], 0),
                (websockify_proxy(settings, cert, key, tcp_backend.port), tcp_backend,
                 [w for w in workloads if w != "latency"], WEBSOCKIFY_IDLE_CONNECTIONS),
            ]
            if has_bridge:
                plan.append((gatewayd_proxy(settings, "bridge", cert, key, f"tcp://127.0.0.1:{tcp_backend.port}",
                                            bridge=True), tcp_backend, [w for w in workloads if w != "latency"],
                             settings.idle))
            for proxy, backend, wanted_workloads, idle in plan:
                if (only and proxy.name not in only) or not wanted_workloads:
                    continue
                print(f"{proxy.name} ...", file=sys.stderr, flush=True)
                results[proxy.name] = suite(settings, proxy, backend, wanted_workloads, idle)
            static = False
            if http:
                static = http_suite(settings, cert, key, only, results)
        finally:
            ws_backend.close()
            tcp_backend.close()
        text = report(settings, info, results, has_bridge, static)
        print(text)
        print(f"\n(whole run: {time.monotonic() - started:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
