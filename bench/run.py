"""The gatewayd benchmark: gatewayd against nginx, HAProxy and Caddy (and its tcp:// bridge against websockify).

Run it with ``bench/run.sh`` (it installs what is missing, then runs this file);
``bench/run.sh --quick`` is a shorter, noisier run. See docs/performance.md.

What runs, all on 127.0.0.1 (ports chosen free at start):

* ``echo_backend`` (bench/echo_backend.c, compiled here with gcc): one C process,
  epoll, answers the WebSocket upgrade then echoes bytes as is (``ws`` mode, behind
  the passthrough proxies), or echoes from the first byte (``tcp`` mode, behind the
  bridges).
* the proxies, one at a time, each pinned to CPU 0 with taskset: nginx (the Debian
  package, one worker, TLS 1.3 with the same ECDSA P-256 certificate, ``proxy_pass``
  with ``proxy_http_version 1.1`` and the Upgrade/Connection headers), HAProxy
  (``nbthread 1``) and Caddy (``GOMAXPROCS=1``), both Debian's packages configured
  like nginx (bench/peers.py), gatewayd (``workers = 1``), gatewayd with
  ``workers = 2`` (CPUs 0 and 1), websockify, and gatewayd's ``tcp://`` bridge when
  this checkout has it.
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
  proxy's processes / 5,000;
* memory per stalled connection (bench/stalled.py): a fresh proxy, 200 clients that
  each send 2 MB and never read (both directions of each connection stall inside the
  proxy): RSS growth / 200, the proxy's CPU while they are stalled, and the RSS some
  seconds after they left, against the RSS before (how much of the high-water mark
  was given back). websockify gets 50 (a process each).

HTTP rows (bench/http_rows.py, SPEC section 7): requests/s of a small proxied GET
and of a small static file, MB/s of a large static file, on kept-alive TLS connections
from ``wrk``, gatewayd beside nginx, HAProxy and Caddy, with the proxy's CPU time per request.

Every figure is printed with the proxy's CPU (its process tree's, from /proc), the
figure per proxy core, and its ratio to nginx (to websockify for the bridges)
measured in the same run, with CPU use of the load generator and the backend: the
proxy's core must be the one that is full. bench/report.py writes the report and
the summary of issue #12's targets.

``--profile`` records each gatewayd row (gatewayd, gatewayd-2w, the bridge, the HTTP
rows) with py-spy (``record --format raw``, 250 samples/s, non-blocking, on the load
generator's core) and writes the collapsed stacks (flamegraph.pl and speedscope read
them) and a summary of the top frames per row into bench/profiles/ (or the folder
given). Profiling costs the load generator's core some CPU: figures of a profiled
run are for the profiles, not for the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench/ is not a package: run.py is run as a script.
import http_rows  # noqa: E402
import peers  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PROXY_CPU = "0"
LOAD_CPU = "1"
IDLE_CONNECTIONS = 5000
WEBSOCKIFY_IDLE_CONNECTIONS = 50  # one forked process per connection
#: Bound on opening the idle connections, and on the whole run.
HOLD_SECONDS = 120
RUN_SECONDS = 900
#: The proxies' names, for --only.
NAMES = ("nginx", "haproxy", "caddy", "gatewayd", "gatewayd-2w", "websockify", "bridge")


@dataclass
class Settings:
    duration: float = 8.0
    warmup: float = 2.0
    idle: int = IDLE_CONNECTIONS
    workdir: Path = Path()
    python: str = sys.executable
    #: --profile: where py-spy's recordings go (None: no profiles).
    profile_dir: Path | None = None
    profiles: list[Path] = field(default_factory=list)


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
    #: gatewayd (Python): its rows are profiled with --profile.
    python: bool = False


@contextlib.contextmanager
def running(proxy: Proxy, settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    log = open(settings.workdir / f"{proxy.name}.log", "ab")  # noqa: SIM115 (closed in the finally below)
    env = {**os.environ, **proxy.env}
    proc = procs.spawn(
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
        self.proc = procs.spawn(
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
    return procs.spawn(argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------- profiles


def py_spy(settings: Settings) -> str:
    beside = Path(settings.python).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--profile needs py-spy (bench/run.sh --profile installs it into .venv)")
    return found


@contextlib.contextmanager
def profiled(settings: Settings, pid: int, name: str | None) -> Iterator[None]:
    """py-spy records ``pid`` (and its workers) for the block when --profile asked for it."""
    if settings.profile_dir is None or name is None:
        yield
        return
    raw = settings.profile_dir / f"{name}.txt"
    log = open(settings.profile_dir / f"{name}.py-spy.log", "wb")  # noqa: SIM115 (closed in the finally below)
    spy = procs.spawn(
        ["taskset", "-c", LOAD_CPU, py_spy(settings), "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
         "--rate", "250", "--format", "raw", "--output", str(raw)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    try:
        yield
    finally:
        # py-spy writes its file when interrupted, as after Ctrl-C.
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=10)
        log.close()
        if raw.exists():
            summary = raw.with_suffix(".top.txt")
            summary.write_text(profile_summary(raw, name))
            settings.profiles += [raw, summary]


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def profile_summary(raw: Path, name: str, top: int = 25) -> str:
    """The top frames of a py-spy raw (collapsed stacks) file: own time by line, by function,
    by file, and time spent inside each function (its callees included)."""
    own_line: Counter[str] = Counter()
    own_function: Counter[str] = Counter()
    own_file: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    process: Counter[str] = Counter()
    total = 0
    for text in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = text.rpartition(" ")
        if not count_text.isdigit() or not stack:
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        # With --subprocesses the innermost "process PID:argv" frame names the process.
        owners = [f for f in stack.split(";") if f.startswith("process ")]
        process[owners[-1].split(":", 1)[0] if owners else "?"] += count
        found = _FRAME.match(frames[-1])
        function, file, line = (found["function"], found["file"], found["line"]) if found else (frames[-1], "?", None)
        own_line[f"{function} ({file}:{line})" if line else frames[-1]] += count
        own_function[f"{function} ({file})"] += count
        own_file[file] += count
        seen = set()
        for frame in frames:
            found = _FRAME.match(frame)
            key = f"{found['function']} ({found['file']})" if found else frame
            if key not in seen:
                seen.add(key)
                inside[key] += count
    out = [f"py-spy profile of {name}: {total} samples (250/s, non-blocking; idle samples not recorded)",
           f"collapsed stacks: {raw.name} (flamegraph.pl, or open it in speedscope)", ""]
    if len(process) > 1:
        out.append("samples by process: " + ", ".join(f"{p} {100 * c / max(1, total):.0f}%"
                                                       for p, c in process.most_common()))
        out.append("")
    for title, counter in (("own time by line", own_line), ("own time by function", own_function),
                           ("own time by file", own_file), ("inside the function (callees included)", inside)):
        out.append(f"{title}:")
        for key, count in counter.most_common(top):
            out.append(f"  {100 * count / max(1, total):5.1f}%  {key}")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------- measurements


def measure(
    settings: Settings, proxy_pid: int, backend: Backend, mode: str, port: int, *args: str, bridge: bool = False,
    profile: str | None = None,
) -> dict[str, Any]:
    """Run loadgen ``mode``; returns its JSON plus the proxy's and backend's CPU share.

    ``profile``: the recording's name when --profile records this one.
    """
    gen = loadgen(
        settings, mode, port, "-d", str(settings.duration), "-w", str(settings.warmup), *args, bridge=bridge
    )
    time.sleep(settings.warmup)
    with profiled(settings, proxy_pid, profile):
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
        cpu0 = cpu_seconds(proc.pid)
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
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(2.0)  # let the proxy settle (deferred frees, GC)
        after = rss_kib(proc.pid)
        cpu2, t2 = cpu_seconds(proc.pid), time.monotonic()
        gen.stdin.close()
        gen.wait(timeout=60)
    return {
        "connections": count,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": (after - before) / count,
        "open_seconds": opened,
        # proxy CPU per connection opened (TLS handshake, upgrade, one echo), and while they sit idle
        "cpu_us_per_connection": (cpu1 - cpu0) / count * 1e6,
        "idle_cpu": (cpu2 - cpu1) / (t2 - t1),
    }


#: Clients of the stalled-reader row (bench/stalled.py), each sending this much.
STALLED_CONNECTIONS = 200
WEBSOCKIFY_STALLED_CONNECTIONS = 50  # one forked process per connection
STALLED_SEND = 2_000_000


def stalled(settings: Settings, proxy: Proxy, count: int = STALLED_CONNECTIONS) -> dict[str, Any]:
    """Fresh proxy: RSS per connection whose client stopped reading, and after they left."""
    with running(proxy, settings) as proc:
        done = subprocess.run(
            [settings.python, str(BENCH / "stalled.py"), "--port", str(proxy.port), "--pid", str(proc.pid),
             "--count", str(count), "--send", str(STALLED_SEND), "--linger", "8",
             *(["--bridge"] if proxy.bridge else [])],
            capture_output=True, text=True, timeout=300, check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{proxy.name}: stalled row failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


#: loadgen's mode and arguments for each measured workload.
LOADGEN = {
    "handshakes": ("handshake", "-c", "32"),
    "echo": ("echo", "-c", "64"),
    "latency": ("latency", "-c", "64", "-r", "2000"),
    "bulk": ("bulk", "-c", "4", "-s", str(1 << 20)),
}


def suite(
    settings: Settings, proxy: Proxy, backend: Backend, workloads: Sequence[str], idle: int,
    stalled_count: int = STALLED_CONNECTIONS,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    measured = [w for w in workloads if w in LOADGEN]
    if measured:
        with running(proxy, settings) as proc:
            for workload in measured:
                print(f"  {proxy.name}: {workload} ...", file=sys.stderr, flush=True)
                mode, *args = LOADGEN[workload]
                results[workload] = measure(settings, proc.pid, backend, mode, proxy.port, *args, bridge=proxy.bridge,
                                            profile=f"{proxy.name}-{workload}" if proxy.python else None)
    if "idle" in workloads:
        print(f"  {proxy.name}: idle x{idle} ...", file=sys.stderr, flush=True)
        results["idle"] = hold(settings, proxy, backend, idle)
    if "stalled" in workloads:
        print(f"  {proxy.name}: stalled readers x{stalled_count} ...", file=sys.stderr, flush=True)
        results["stalled"] = stalled(settings, proxy, stalled_count)
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


def haproxy_proxy(settings: Settings, cert: Path, key: Path, backend_port: int) -> Proxy:
    port = free_port()
    conf = peers.haproxy_ws_conf(settings.workdir / "haproxy", port, cert, key, backend_port)
    return Proxy("haproxy", peers.haproxy_argv(conf), port)


def caddy_proxy(settings: Settings, cert: Path, key: Path, backend_port: int) -> Proxy:
    port = free_port()
    work = settings.workdir / "caddy"
    conf = peers.caddy_ws_conf(work, port, cert, key, backend_port)
    return Proxy("caddy", peers.caddy_argv(conf), port, env=peers.caddy_env(work))


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
        python=True,
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
    """The HTTP rows (bench/http_rows.py): nginx, HAProxy, Caddy and gatewayd against one origin nginx.

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
    nginx_port, haproxy_port, caddy_port, gatewayd_port = free_port(), free_port(), free_port(), free_port()
    nginx_work = settings.workdir / "nginx-http"
    nginx_conf = http_rows.nginx_conf(nginx_work, nginx_port, cert, key, origin_port, files)
    gatewayd_conf = http_rows.gatewayd_conf(
        settings.workdir / "gatewayd-http.toml", gatewayd_port, cert, key, origin_port, files, static
    )
    haproxy_conf = peers.haproxy_http_conf(settings.workdir / "haproxy-http", haproxy_port, cert, key, origin_port)
    caddy_work = settings.workdir / "caddy-http"
    caddy_conf = peers.caddy_http_conf(caddy_work, caddy_port, cert, key, origin_port, files.root)
    proxies = [
        Proxy("nginx", ["nginx", "-p", str(nginx_work), "-e", str(nginx_work / "error.log"),
                        "-c", str(nginx_conf)], nginx_port),
        Proxy("haproxy", peers.haproxy_argv(haproxy_conf), haproxy_port),
        Proxy("caddy", peers.caddy_argv(caddy_conf), caddy_port, env=peers.caddy_env(caddy_work)),
        Proxy("gatewayd", [settings.python, "-m", "gatewayd", "run", "-c", str(gatewayd_conf)],
              gatewayd_port, env={"PYTHONPATH": str(ROOT)}, python=True),
    ]
    with running(origin, settings) as origin_proc:
        for proxy in proxies:
            if only and proxy.name not in only:
                continue
            print(f"{proxy.name} (http) ...", file=sys.stderr, flush=True)
            with running(proxy, settings) as proc:
                for workload, _, path, connections, _ in http_rows.WORKLOADS:
                    # HAProxy serves no files.
                    if workload.startswith("static") and (not static or proxy.name == "haproxy"):
                        continue
                    print(f"  {proxy.name}: {workload} ...", file=sys.stderr, flush=True)
                    name = f"{proxy.name}-{workload}" if proxy.python else None
                    results.setdefault(proxy.name, {})[workload] = http_rows.measure(
                        cpu_seconds, proc.pid, origin_proc.pid, LOAD_CPU,
                        f"https://127.0.0.1:{proxy.port}{path}", connections,
                        settings.duration, settings.warmup,
                        around=functools.partial(profiled, settings, proc.pid, name),
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
    with contextlib.suppress(OSError, IndexError):
        haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=False)
        info["haproxy"] = haproxy.stdout.splitlines()[0].replace("HAProxy version ", "").split(" - ")[0]
    with contextlib.suppress(OSError, IndexError):
        caddy = subprocess.run(["caddy", "version"], capture_output=True, text=True, check=False)
        info["caddy"] = caddy.stdout.split()[0]
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


def header(settings: Settings, info: dict[str, str]) -> list[str]:
    out = ["gatewayd benchmark", ""]
    for key, text in info.items():
        out.append(f"  {key}: {text}")
    out.append(f"  measured: {settings.duration:g} s per workload after {settings.warmup:g} s of warm-up; "
               f"proxies on CPU {PROXY_CPU}, loadgen and echo_backend on CPU {LOAD_CPU}")
    if settings.profile_dir is not None:
        out.append("  --profile: py-spy sampled the gatewayd rows on CPU 1 (the load generator's): "
                   "their figures are for the profiles, not for comparisons")
    return out


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:  # noqa: C901 (the run's phases, in order)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per workload, 1,000 idle connections")
    parser.add_argument("--only", default="", help=f"comma-separated: {','.join(NAMES)}")
    parser.add_argument("--workloads", default="handshakes,echo,latency,bulk,idle,stalled,http")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--profile", metavar="DIR", nargs="?", const="", default=None,
                        help="py-spy profiles of the gatewayd rows into DIR (default: bench/profiles/<time>)")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.quick:
        settings.duration, settings.warmup, settings.idle = 3.0, 1.0, 1000
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("the benchmark needs 2 CPUs", file=sys.stderr)
        return 1
    only = {x for x in args.only.split(",") if x}
    if only - set(NAMES):
        print(f"--only: unknown {', '.join(sorted(only - set(NAMES)))} (known: {', '.join(NAMES)})", file=sys.stderr)
        return 2
    if args.profile is not None:
        settings.profile_dir = (Path(args.profile) if args.profile else
                                BENCH / "profiles" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())).resolve()
        settings.profile_dir.mkdir(parents=True, exist_ok=True)
        py_spy(settings)  # fails now, not after minutes, when it is missing
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

    def stopped(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # Bounded as a whole; on SIGTERM/SIGHUP too, the `finally` blocks stop every process started.
    signal.signal(signal.SIGALRM, too_long)
    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGHUP, stopped)
    signal.alarm(RUN_SECONDS)
    workloads = [w for w in args.workloads.split(",") if w]
    http = "http" in workloads
    workloads = [w for w in workloads if w != "http"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        try:
            settings.workdir = Path(tmp)
            build(settings)
            cert, key = certificate(settings)
            info = machine()
            has_bridge = bridge_supported(settings, cert, key)
            results: dict[str, dict[str, Any]] = {}
            ws_backend = Backend(settings.workdir / "echo_backend", "ws")
            tcp_backend = Backend(settings.workdir / "echo_backend", "tcp")
            ws = f"ws://127.0.0.1:{ws_backend.port}/echo"
            bridged = [w for w in workloads if w != "latency"]
            # (proxy, backend, workloads, idle connections, stalled connections)
            plan: list[tuple[Proxy, Backend, list[str], int, int]] = [
                (nginx_proxy(settings, cert, key, ws_backend.port), ws_backend, workloads, settings.idle,
                 STALLED_CONNECTIONS),
                (haproxy_proxy(settings, cert, key, ws_backend.port), ws_backend, workloads, settings.idle,
                 STALLED_CONNECTIONS),
                (caddy_proxy(settings, cert, key, ws_backend.port), ws_backend, workloads, settings.idle,
                 STALLED_CONNECTIONS),
                (gatewayd_proxy(settings, "gatewayd", cert, key, ws), ws_backend, workloads, settings.idle,
                 STALLED_CONNECTIONS),
                (gatewayd_proxy(settings, "gatewayd-2w", cert, key, ws, workers=2),
                 ws_backend, [w for w in workloads if w in ("handshakes", "echo")], 0, 0),
                (websockify_proxy(settings, cert, key, tcp_backend.port), tcp_backend, bridged,
                 WEBSOCKIFY_IDLE_CONNECTIONS, WEBSOCKIFY_STALLED_CONNECTIONS),
            ]
            if has_bridge:
                plan.append((gatewayd_proxy(settings, "bridge", cert, key, f"tcp://127.0.0.1:{tcp_backend.port}",
                                            bridge=True), tcp_backend, bridged, settings.idle, STALLED_CONNECTIONS))
            for proxy, backend, wanted_workloads, idle, stalled_count in plan:
                if (only and proxy.name not in only) or not wanted_workloads:
                    continue
                print(f"{proxy.name} ...", file=sys.stderr, flush=True)
                results[proxy.name] = suite(settings, proxy, backend, wanted_workloads, idle, stalled_count)
            static = False
            if http:
                static = http_suite(settings, cert, key, only, results)
            ws_backend.close()
            tcp_backend.close()
        finally:
            signal.alarm(0)
            procs.stop_all()
    text, summary = report.report(header(settings, info), results, has_bridge, static)
    print(text)
    print(f"\n(whole run: {time.monotonic() - started:.0f} s)")
    if settings.profiles:
        print(f"\nprofiles (py-spy, collapsed stacks and top frames) in {settings.profile_dir}:")
        for path in settings.profiles:
            print(f"  {path.name}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results, "targets": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
