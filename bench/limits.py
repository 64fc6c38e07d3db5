"""Benchmark: what the gateway-wide connection limits cost per accepted connection.

Every accepted connection makes four calls on :class:`gatewayd.limits.Limits`
(the connection total, the per-address check at accept; both releases when it
ends). This measures those four, as one "accept", for:

  local    one process (``workers = 1``): the table in a bytearray, no lock.
  shared   a worker's view of the supervisor's table (``workers`` > 1): a
           memfd mapped MAP_SHARED, each call under a POSIX record lock
           (two fcntl system calls).
  shared2  the same with a second process doing the same work at the same
           time on the same table (lock contention; each process reports its
           own cost; needs 2 CPUs to mean anything).

each with the per-address limits off (defaults) and on (a per-IP limit and a
handshake rate, so the bucket is updated too), over 1,000 client addresses.

The figure is CPU time of the calling thread (getrusage RUSAGE_THREAD) per
accept, in microseconds, so other processes on the machine do not count; the
wall-clock rate is printed too. Run: ``.venv/bin/python bench/limits.py``
(about 10 seconds, bounded at 120). A full TLS handshake costs the gateway
around 1,000 to 2,000 microseconds of CPU (docs/performance.md) for scale.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd.limits import Limits  # noqa: E402  (after the path fix above)

ADDRESSES = [f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}" for i in range(1000)]
LIMITS_OFF = {"max_connections": 0, "handshakes_per_second": 0.0}
LIMITS_ON = {"max_connections": 1000, "handshakes_per_second": 1e9}


def thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def accepts(limits: Limits, count: int, per_ip: dict[str, float]) -> tuple[float, float]:
    """``count`` accept+close cycles; (CPU microseconds per accept, accepts per second)."""
    now = time.monotonic()
    wall, cpu = time.perf_counter(), thread_cpu()
    for i in range(count):
        key = ADDRESSES[i % len(ADDRESSES)]
        if not limits.admit_connection(100000):
            raise AssertionError("refused")
        if limits.admit(key, now, max_connections=int(per_ip["max_connections"]),
                        handshakes_per_second=per_ip["handshakes_per_second"]) is not None:
            raise AssertionError("refused")
        limits.release(key)
        limits.release_connection()
    cpu, wall = thread_cpu() - cpu, time.perf_counter() - wall
    return cpu / count * 1e6, count / wall


def _other(fd: int, count: int, per_ip: dict[str, float], out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    out.put(accepts(Limits.attach(fd, 1), count, per_ip))


def run(count: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for label, per_ip in (("limits off", LIMITS_OFF), ("limits on", LIMITS_ON)):
        local = Limits.local(10000)
        accepts(local, count // 10, per_ip)   # warm up
        cpu, rate = accepts(local, count, per_ip)
        results[f"local, {label}"] = {"cpu_us": cpu, "per_second": rate}

        supervisor, fd = Limits.create_shared(2, 10000)
        worker = Limits.attach(fd, 0)
        accepts(worker, count // 10, per_ip)
        cpu, rate = accepts(worker, count, per_ip)
        results[f"shared, {label}"] = {"cpu_us": cpu, "per_second": rate}

        queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
        other = multiprocessing.get_context("fork").Process(
            target=_other, args=(fd, count, per_ip, queue)
        )
        other.start()
        cpu, rate = accepts(worker, count, per_ip)
        other_cpu, other_rate = queue.get(timeout=60)
        other.join(timeout=60)
        results[f"shared2, {label}"] = {
            "cpu_us": (cpu + other_cpu) / 2, "per_second": rate + other_rate,
        }
        assert supervisor.open_connections == 0
        assert not any(supervisor.open_count(address) for address in ADDRESSES)
        os.close(fd)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="accepts per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    signal.alarm(120)
    results = run(args.count)
    print(f"{'table':<24} {'CPU us/accept':>14} {'accepts/s':>12}")
    for name, figures in results.items():
        print(f"{name:<24} {figures['cpu_us']:>14.1f} {figures['per_second']:>12,.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
