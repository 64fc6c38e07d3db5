"""gatewayd.limits: per-address connection counts and the handshake token bucket (pure)."""

from __future__ import annotations

import pytest

from gatewayd.limits import BURST_SECONDS, Limiter, client_key


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
    limiter = Limiter()

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
    limiter = Limiter()
    for _ in range(1000):
        assert limiter.admit("a", 0.0, max_connections=0, handshakes_per_second=0) is None


def test_token_bucket_burst_then_rate() -> None:
    limiter = Limiter()
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
    limiter = Limiter()
    assert limiter.admit("a", 0.0, max_connections=0, handshakes_per_second=0.1) is None
    assert limiter.admit("a", 1.0, max_connections=0, handshakes_per_second=0.1) == "per_ip_handshake_rate"
    assert limiter.admit("a", 10.0, max_connections=0, handshakes_per_second=0.1) is None


def test_memory_is_bounded() -> None:
    """Entries go with the last connection, buckets once they are full again."""
    limiter = Limiter()
    for i in range(10000):
        key = f"10.0.{i // 256}.{i % 256}"
        assert limiter.admit(key, 0.0, max_connections=5, handshakes_per_second=10) is None
        limiter.release(key)
    assert limiter.tracked == 10000  # buckets not full yet (one token taken each)
    # One token back after 0.1 s: full again; the next call sweeps them.
    limiter.admit("192.0.2.1", 5.0, max_connections=5, handshakes_per_second=10)
    assert limiter.tracked == 2  # the new address: one count, one bucket


def test_turning_the_rate_off_drops_buckets() -> None:
    limiter = Limiter()
    limiter.admit("a", 0.0, max_connections=0, handshakes_per_second=1)
    limiter.release("a")
    limiter.admit("b", 5.0, max_connections=0, handshakes_per_second=0)
    limiter.release("b")
    assert limiter.tracked == 0
