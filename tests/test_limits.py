"""gatewayd.limits: the connection total, per-address counts, the handshake bucket, the shared table."""

from __future__ import annotations

import os
import random

import pytest

from gatewayd.limits import BURST_SECONDS, Limits, capacity_for, client_key


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("unix", "unix"),
    ],
)
def test_client_key(address: str, key: str) -> None:
    assert client_key(address) == key


def test_connection_limit_per_address() -> None:
    limiter = Limits.local(100)

    def admit(key: str) -> str | None:
        return limiter.admit(key, 0.0, max_connections=2, handshakes_per_second=0)

    assert admit("a") is None
    assert admit("a") is None
    assert admit("a") == "per_ip_connections"
    assert admit("b") is None  # another address has its own count
    limiter.release("a")
    assert admit("a") is None
    assert limiter.open_count("a") == 2


def test_zero_means_no_limit() -> None:
    limiter = Limits.local(100)
    for _ in range(1000):
        assert limiter.admit("a", 0.0, max_connections=0, handshakes_per_second=0) is None


def test_token_bucket_burst_then_rate() -> None:
    limiter = Limits.local(100)
    rate = 5.0
    burst = int(rate * BURST_SECONDS)

    def admit(now: float) -> str | None:
        result = limiter.admit("a", now, max_connections=0, handshakes_per_second=rate)
        if result is None:
            limiter.release("a")
        return result

    assert [admit(0.0) for _ in range(burst)] == [None] * burst
    assert admit(0.0) == "per_ip_handshake_rate"
    assert admit(0.1) == "per_ip_handshake_rate"  # half a token back
    assert admit(0.2) is None  # one token back after 1/rate seconds
    assert admit(0.2) == "per_ip_handshake_rate"
    # Refused attempts cost nothing: the bucket refills at the rate regardless.
    assert [admit(10.0) for _ in range(burst)] == [None] * burst


def test_slow_rate_keeps_a_burst_of_one() -> None:
    limiter = Limits.local(100)
    assert limiter.admit("a", 0.0, max_connections=0, handshakes_per_second=0.1) is None
    assert limiter.admit("a", 1.0, max_connections=0, handshakes_per_second=0.1) == "per_ip_handshake_rate"
    assert limiter.admit("a", 10.0, max_connections=0, handshakes_per_second=0.1) is None


def test_memory_is_bounded() -> None:
    """Entries go with the last connection, buckets once they are full again."""
    limiter = Limits.local(5000)   # 16384 entries
    assert limiter.capacity == 16384 == capacity_for(5000)
    for i in range(10000):
        key = f"10.0.{i // 256}.{i % 256}"
        assert limiter.admit(key, 0.0, max_connections=5, handshakes_per_second=10) is None
        limiter.release(key)
    assert limiter.tracked == 10000  # buckets not full yet (one token taken each)
    # One token back after 0.1 s: full again; a new address past 3/4 sweeps them.
    for i in range(2300):
        limiter.admit(f"10.1.{i // 256}.{i % 256}", 5.0, max_connections=5, handshakes_per_second=10)
    assert limiter.tracked == 2300  # the 10000 went at the sweep: only the new ones are left


def test_turning_the_rate_off_drops_buckets() -> None:
    limiter = Limits.local(100)
    limiter.admit("a", 0.0, max_connections=0, handshakes_per_second=1)
    limiter.release("a")
    assert limiter.tracked == 1   # its bucket is not full yet
    limiter.admit("a", 5.0, max_connections=0, handshakes_per_second=0)
    limiter.release("a")
    assert limiter.tracked == 0


def test_a_full_table_refuses_new_addresses_only_while_a_limit_is_on() -> None:
    limiter = Limits.local(1)   # 1024 entries, 7/8 usable
    for i in range(896):
        assert limiter.admit(f"10.0.{i // 256}.{i % 256}", 0.0, max_connections=5, handshakes_per_second=0) is None
    assert limiter.admit("192.0.2.1", 0.0, max_connections=5, handshakes_per_second=0) == "per_ip_table_full"
    assert limiter.admit("10.0.0.0", 0.0, max_connections=5, handshakes_per_second=0) is None  # known
    assert limiter.admit("192.0.2.1", 0.0, max_connections=0, handshakes_per_second=0) is None


def test_the_connection_total() -> None:
    limits = Limits.local(100)
    assert [limits.admit_connection(3) for _ in range(4)] == [True, True, True, False]
    limits.release_connection()
    assert limits.open_connections == 2
    assert limits.admit_connection(3) and not limits.admit_connection(3)
    assert limits.admit_connection(10)  # a reload raised it


def test_grown_keeps_every_count() -> None:
    limits = Limits.local(10)
    for i in range(500):
        limits.admit(f"k{i % 50}", 0.0, max_connections=0, handshakes_per_second=0)
        limits.admit_connection(1000)
    bigger = limits.grown(5000)
    assert bigger.capacity > limits.capacity and bigger.fits(5000) and not limits.fits(5000)
    assert [bigger.open_count(f"k{i}") for i in range(50)] == [10] * 50
    assert bigger.open_connections == 500


def test_deletion_keeps_every_probe_chain_whole() -> None:
    """Random admits and releases on a small, crowded table against a dict."""
    rng = random.Random(13)
    limits = Limits.local(1)   # 1024 slots: long probe runs
    model: dict[str, int] = {}
    for _ in range(20000):
        key = f"a{rng.randrange(900)}"
        if model.get(key) and rng.random() < 0.5:
            limits.release(key)
            model[key] -= 1
            if not model[key]:
                del model[key]
        elif limits.admit(key, 0.0, max_connections=0, handshakes_per_second=0) is None:
            model[key] = model.get(key, 0) + 1
    assert limits.tracked == len(model)
    assert all(limits.open_count(key) == count for key, count in model.items())
    assert all(limits.open_count(f"a{i}") == 0 for i in range(900) if f"a{i}" not in model)


def test_shared_table_counts_every_worker_and_forgets_a_dead_one() -> None:
    supervisor, fd = Limits.create_shared(2, 100)
    try:
        one, two = Limits.attach(fd, 0), Limits.attach(fd, 1)
        admit = {"max_connections": 3, "handshakes_per_second": 0}
        assert one.admit("a", 0.0, **admit) is None
        assert two.admit("a", 0.0, **admit) is None
        assert one.admit("a", 0.0, **admit) is None
        assert two.admit("a", 0.0, **admit) == "per_ip_connections"   # 3 in all
        assert one.admit_connection(3) and two.admit_connection(3) and two.admit_connection(3)
        assert not one.admit_connection(3)
        assert supervisor.open_count("a") == 3 and supervisor.open_connections == 3
        supervisor.reset_worker(1)   # worker 2 died: what it held is free
        assert one.open_count("a") == 2 and one.open_connections == 1
        assert two.admit("a", 0.0, **admit) is None
        two.release("a")
        one.release("a")
        one.release("a")
        assert supervisor.tracked == 0
    finally:
        os.close(fd)


def test_a_shared_bucket_is_one_bucket() -> None:
    _, fd = Limits.create_shared(2, 100)
    try:
        one, two = Limits.attach(fd, 0), Limits.attach(fd, 1)
        rate = {"max_connections": 0, "handshakes_per_second": 2.0}   # burst of 4
        results = [(one if i % 2 else two).admit("a", 0.0, **rate) for i in range(6)]
        assert results == [None] * 4 + ["per_ip_handshake_rate"] * 2
    finally:
        os.close(fd)
