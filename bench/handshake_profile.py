"""CPU per new connection of gatewayd's handshake path, and where it goes.

    .venv/bin/python bench/handshake_profile.py [--seconds 8] [--profile none|py-spy|perf|cprofile]

What runs is bench/run.py's handshake row, for gatewayd alone: ``loadgen
handshake`` (32 connections in flight: TCP, a full TLS 1.3 handshake, the
WebSocket upgrade, the 101, close_notify, again) on CPU 1 with the ``ws``
echo backend, gatewayd (``workers = 1``, access log on) on CPU 0. It prints
the handshakes per second, gatewayd's CPU per connection in µs (CPU time of
the process over the measurement / connections), and with a profiler the
breakdown of that CPU by area:

* ``--profile py-spy``: ``py-spy record --native -f raw`` of gatewayd; each
  sample goes to the first area its stack names, innermost frame first
  (OpenSSL, the kernel's socket calls, h11, logging, ...: :data:`AREAS`).
* ``--profile perf``: ``perf record`` of gatewayd; samples by shared object
  (the kernel, libcrypto/libssl, the interpreter).
* ``--profile cprofile``: gatewayd under cProfile (slower, so the figures
  are only for the shares and the call counts); the 40 largest by own time.

Docs: docs/performance.md, "Handshake path".
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 (bench/ is not a package)

#: Library calls that are system calls: a sample ending in one is the kernel's.
SYSCALLS = frozenset(
    ["write", "read", "send", "recv", "sendto", "recvfrom", "sendmsg", "recvmsg", "accept", "accept4", "connect", "shutdown", "close", "epoll_wait", "epoll_ctl", "epoll_pwait", "socket", "setsockopt", "getsockopt", "getpeername", "getsockname", "getpid", "fcntl", "ioctl", "clock_gettime"]
)
#: Python files that are only the plumbing of their caller (their samples go to it).
TRANSPARENT = re.compile(
    r"^(<frozen [^>]+>|<string>|<attrs generated [^>]+>|contextlib|ipaddress|enum|dataclasses|typing|"
    r"functools|weakref|abc|re/|base64|socket|email/|random|collections/|copy|operator|selectors|"
    r"_weakrefset|heapq|bisect|types|inspect)"
)
#: (area, pattern on the file of the first Python frame that is not plumbing).
PYTHON_AREAS: list[tuple[str, re.Pattern[str]]] = [
    ("pyOpenSSL's Python wrappers", re.compile(r"^OpenSSL/")),
    ("logging, access line", re.compile(r"^logging/|^gatewayd/log\.py|^gatewayd/record\.py")),
    ("prometheus metrics", re.compile(r"^prometheus_client/|^gatewayd/metrics\.py")),
    ("trio (tasks, cancel scopes, sockets, run loop)", re.compile(r"^(trio|outcome|sniffio)/")),
    ("gatewayd tls/ (engine, SNI)", re.compile(r"^gatewayd/(tls/|clienthello)")),
    ("gatewayd routing.py (host, route, path)", re.compile(r"^gatewayd/routing\.py")),
    ("gatewayd handshake.py, http.py, access.py (head checks, decision, headers)", re.compile(
        r"^gatewayd/(handshake|access|headers|http|auth)\.py")),
    ("gatewayd backend.py, balancer", re.compile(r"^gatewayd/(backend|balancer)\.py")),
    ("gatewayd connection.py", re.compile(r"^gatewayd/connection\.py")),
    ("gatewayd server.py, limits", re.compile(r"^gatewayd/(server|limits|control|cli)\.py")),
    ("gatewayd splice, sockio, transport", re.compile(r"^gatewayd/(splice|bridge|sockio|transport)\.py")),
    ("gatewayd data plane (after the handover)", re.compile(r"^gatewayd/(dataplane|wsbridge)\.py")),
]


def _frame(text: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame ``name (file:line)``."""
    name, _, where = text.rpartition(" (")
    return name, where.rstrip(")").split(":", 1)[0]


def classify(stack: str) -> str:
    """The area of one sample, from its stack (outermost frame first)."""
    frames = [_frame(f) for f in stack.split(";")][::-1]   # innermost first
    name, where = frames[0]
    if where.startswith("libc") and name in SYSCALLS:
        return "kernel (system calls)"
    if name.startswith("gc_collect"):
        return "Python's cyclic GC"
    for _name, where in frames:
        if not where.endswith(".py") and not where.startswith("<"):
            if re.search(r"_rust\.abi3|libcrypto|libssl|_openssl\.abi3", where):
                return "OpenSSL (C)"
            continue   # the interpreter, libc, cffi: the Python frame above pays
        if TRANSPARENT.match(where):
            continue
        if where.startswith("h11/"):
            caller = next((w for _, w in frames if w.startswith("gatewayd/")), "")
            return "h11: the backend's 101" if "backend" in caller else "h11: the client's request head"
        for area, pattern in PYTHON_AREAS:
            if pattern.search(where):
                return area
        return "other Python"
    return "other native"


def _dso_group(dso: str) -> str:
    """The area of a shared object in ``perf report --sort dso``."""
    if dso.startswith("[kernel"):
        return "kernel"
    if re.search(r"_rust\.abi3|libcrypto|libssl|_openssl\.abi3", dso):
        return "OpenSSL (cryptography's and the system's)"
    return "the interpreter and Python code (libpython, libc, extensions)"


def py_spy_table(raw: Path) -> list[tuple[str, int]]:
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            totals[classify(stack)] += int(count)
    return totals.most_common()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--profile", choices=("none", "py-spy", "perf", "cprofile"), default="none")
    parser.add_argument("--keep", type=Path, help="copy the raw profile here")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    settings = run.Settings(duration=args.seconds, warmup=args.warmup, python=args.python)
    with tempfile.TemporaryDirectory(prefix="gatewayd-hsprof-") as tmp:
        settings.workdir = Path(tmp)
        run.build(settings)
        cert, key = run.certificate(settings)
        backend = run.Backend(settings.workdir / "echo_backend", "ws")
        try:
            proxy = run.gatewayd_proxy(settings, "gatewayd", cert, key, f"ws://127.0.0.1:{backend.port}/echo")
            prof_out = settings.workdir / "profile.out"
            if args.profile == "cprofile":
                proxy.argv = [args.python, "-m", "cProfile", "-o", str(prof_out), *proxy.argv[1:]]
            with run.running(proxy, settings) as proc:
                pid = proc.pid
                # taskset execs the proxy: the pid is the interpreter's.
                profiler = None
                if args.profile == "py-spy":
                    spy = Path(args.python).with_name("py-spy")
                    profiler = subprocess.Popen(
                        [str(spy), "record", "--native", "-r", "250", "-f", "raw", "-o", str(prof_out),
                         "-p", str(pid), "-d", str(int(args.seconds))],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                elif args.profile == "perf":
                    profiler = subprocess.Popen(
                        ["perf", "record", "-F", "997", "-g", "-o", str(prof_out), "-p", str(pid), "--",
                         "sleep", str(args.seconds)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                result = run.measure(settings, pid, backend, "handshake", proxy.port, "-c", "32")
                if profiler is not None:
                    profiler.wait(timeout=60)
                if args.profile == "cprofile":
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=30)
            rate = result["rate"]
            cpu = result["proxy_cpu"]
            print(json.dumps({"handshakes_per_s": round(rate, 1), "proxy_cpu": round(cpu, 3),
                              "cpu_us_per_connection": round(cpu / rate * 1e6, 1) if rate else None,
                              "per_proxy_core": round(rate / cpu, 1) if cpu else None,
                              "loadgen_cpu": result["cpu"], "backend_cpu": round(result["backend_cpu"], 3),
                              "errors": result["errors"], "load": os.getloadavg()[0]}))
            us = cpu / rate * 1e6 if rate else 0.0
            if args.profile == "py-spy":
                table = py_spy_table(prof_out)
                total = sum(n for _, n in table) or 1
                for area, n in table:
                    print(f"  {area:42} {100 * n / total:5.1f}%  {us * n / total:6.0f} µs")
            elif args.profile == "perf":
                report = subprocess.run(
                    ["perf", "report", "-i", str(prof_out), "--no-children", "--sort", "dso", "--stdio"],
                    capture_output=True, text=True, check=False,
                )
                groups: collections.Counter[str] = collections.Counter()
                for line in report.stdout.splitlines():
                    found = re.match(r"\s+(\d+\.\d+)%\s+(\S+)", line)
                    if found:
                        share, dso = float(found[1]), found[2]
                        groups[_dso_group(dso)] += share
                        print(f"  {share:5.1f}%  {dso}")
                for group, share in groups.most_common():
                    print(f"  {group:42} {share:5.1f}%  {us * share / 100:6.0f} µs")
            elif args.profile == "cprofile":
                pstats.Stats(str(prof_out)).sort_stats("tottime").print_stats(40)
            if args.keep is not None and prof_out.exists():
                args.keep.write_bytes(prof_out.read_bytes())
        finally:
            backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
