"""gatewayd.balancer: choice, passive and active health, limits, Retry-After, reloads.

Pure: the clock is a number we pass in, randomness a seeded Random.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from gatewayd import config
from gatewayd.balancer import BackendState, Balancer, Registry, check_name, rendezvous_score

REPO = Path(__file__).resolve().parent.parent


def states(*names: str) -> list[BackendState]:
    return [BackendState(f"ws://{name}:9000") for name in names]


def short(state: BackendState | None) -> str | None:
    return None if state is None else state.url.split("//")[1].split(":")[0]


def picks(
    balancer: Balancer, n: int, client: str = "10.0.0.1", now: float = 0.0
) -> list[str | None]:
    """Choose ``n`` times, each connection ending before the next starts."""
    out = []
    for _ in range(n):
        state = balancer.choose(client, now)
        out.append(short(state))
    return out


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------


def test_round_robin_is_exact_in_file_order() -> None:
    balancer = Balancer(states("a", "b", "c"))
    assert picks(balancer, 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_skips_an_unavailable_backend_and_keeps_its_order() -> None:
    a, b, c = states("a", "b", "c")
    balancer = Balancer([a, b, c])
    b.health["tcp"] = False
    assert picks(balancer, 4) == ["a", "c", "a", "c"]
    b.health["tcp"] = True
    assert picks(balancer, 3) == ["a", "b", "c"]


def test_least_connections_prefers_the_emptiest_ties_in_round_robin_order() -> None:
    a, b, c = states("a", "b", "c")
    balancer = Balancer([a, b, c], balance="least_connections")
    held = []
    for _ in range(4):
        state = balancer.choose("x", 0.0)
        assert state is not None
        balancer.acquire(state)
        held.append(short(state))
    assert held == ["a", "b", "c", "a"]          # all tied, then a has 2
    balancer.release(b)
    balancer.release(c)                           # a=2, b=0, c=0
    assert short(balancer.choose("x", 0.0)) == "b"
    assert short(balancer.choose("x", 0.0)) == "c"
    balancer.acquire(b)
    assert short(balancer.choose("x", 0.0)) == "c"


def test_random_two_keeps_long_lived_load_even() -> None:
    backends = states("a", "b", "c")
    balancer = Balancer(backends, balance="random_two", rng=random.Random(7))
    for _ in range(300):
        state = balancer.choose("x", 0.0)
        assert state is not None
        balancer.acquire(state)
    loads = sorted(state.active for state in backends)
    assert sum(loads) == 300
    assert loads[-1] - loads[0] <= 2   # the power of two choices


def test_random_two_is_random_for_short_connections() -> None:
    balancer = Balancer(states("a", "b", "c"), balance="random_two", rng=random.Random(1))
    counts = Counter(picks(balancer, 3000))
    assert set(counts) == {"a", "b", "c"}
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_random_two_with_one_candidate_takes_it() -> None:
    a, b = states("a", "b")
    balancer = Balancer([a, b], balance="random_two", rng=random.Random(3))
    a.health["tcp"] = False
    assert set(picks(balancer, 20)) == {"b"}


def test_source_ip_is_sticky_per_client() -> None:
    balancer = Balancer(states("a", "b", "c"), balance="source_ip")
    for n in range(50):
        client = f"10.1.0.{n}"
        assert len(set(picks(balancer, 5, client))) == 1
    spread = Counter(picks(balancer, 1, f"10.1.0.{n}")[0] for n in range(300))
    assert set(spread) == {"a", "b", "c"}
    assert all(60 < count < 140 for count in spread.values()), spread


def test_source_ip_moves_only_the_clients_of_a_backend_that_goes_away() -> None:
    a, b, c = states("a", "b", "c")
    balancer = Balancer([a, b, c], balance="source_ip")
    clients = [f"192.0.2.{n}" for n in range(200)]
    before = {client: short(balancer.choose(client, 0.0)) for client in clients}
    b.health["tcp"] = False
    after = {client: short(balancer.choose(client, 0.0)) for client in clients}
    for client in clients:
        if before[client] != "b":
            assert after[client] == before[client]
        else:
            assert after[client] in ("a", "c")
    assert sum(before[client] == "b" for client in clients) > 30
    # And when it comes back, its clients come back to it.
    b.health["tcp"] = True
    assert {client: short(balancer.choose(client, 0.0)) for client in clients} == before


def test_source_ip_next_choice_after_a_failure_is_the_next_by_weight() -> None:
    backends = states("a", "b", "c")
    balancer = Balancer(backends, balance="source_ip")
    ranked = sorted(backends, key=lambda s: rendezvous_score("198.51.100.9", s.url), reverse=True)
    first = balancer.choose("198.51.100.9", 0.0)
    second = balancer.choose("198.51.100.9", 0.0, exclude=[ranked[0]])
    assert [first, second] == ranked[:2]


def test_rendezvous_score_is_stable_across_processes() -> None:
    # blake2b, not hash(): the same client maps to the same backend after a restart.
    score = rendezvous_score("127.0.0.1", "ws://a:9000")
    assert score == rendezvous_score("127.0.0.1", "ws://a:9000")
    assert score != rendezvous_score("127.0.0.2", "ws://a:9000")
    assert score == 0x8BB7FE3E48E59277   # pinned: a change would remap every client


def test_exclude_removes_tried_backends_and_can_leave_none() -> None:
    a, b = states("a", "b")
    balancer = Balancer([a, b])
    assert balancer.choose("x", 0.0, exclude=[a]) is b
    assert balancer.choose("x", 0.0, exclude=[a, b]) is None


# ---------------------------------------------------------------------------
# Passive health (max_fails / fail_timeout), with a fake clock
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_fails", "failures", "skipped"),
    [
        pytest.param(1, 1, True, id="one-failure-of-one"),
        pytest.param(3, 2, False, id="two-failures-of-three"),
        pytest.param(3, 3, True, id="three-failures-of-three"),
        pytest.param(0, 10, False, id="max-fails-zero-never"),
    ],
)
def test_max_fails_in_a_row(max_fails: int, failures: int, skipped: bool) -> None:
    a, b = states("a", "b")
    balancer = Balancer([a, b], max_fails=max_fails, fail_timeout=10.0)
    results = [balancer.record_failure(a, 100.0) for _ in range(failures)]
    assert balancer.is_down(a, 100.0) is skipped
    assert any(results) is skipped


def test_a_success_resets_the_count() -> None:
    a, b = states("a", "b")
    balancer = Balancer([a, b], max_fails=2)
    balancer.record_failure(a, 0.0)
    balancer.record_success(a)
    balancer.record_failure(a, 1.0)
    assert not balancer.is_down(a, 1.0)
    assert a.failures == 2 and a.fails == 1


def test_fail_timeout_then_one_attempt_then_skipped_again() -> None:
    a, b = states("a", "b")
    balancer = Balancer([a, b], max_fails=2, fail_timeout=10.0)
    balancer.record_failure(a, 0.0)
    assert balancer.record_failure(a, 1.0) is True          # skipped from t=1 to t=11
    assert picks(balancer, 3, now=5.0) == ["b", "b", "b"]
    assert balancer.available(a, 11.0)                       # fail_timeout over: one try
    assert balancer.record_failure(a, 11.5) is True          # fails again: at once skipped
    assert not balancer.available(a, 21.0)
    assert balancer.available(a, 21.5)
    balancer.record_success(a)                               # back for good
    balancer.record_failure(a, 22.0)
    assert balancer.available(a, 22.0)


def test_a_single_backend_is_never_skipped_for_failures() -> None:
    (a,) = states("a")
    balancer = Balancer([a], max_fails=1)
    assert balancer.record_failure(a, 0.0) is False
    assert balancer.choose("x", 0.0) is a


def test_active_health_applies_even_to_a_single_backend() -> None:
    (a,) = states("a")
    balancer = Balancer([a])
    a.health["GET /healthz"] = False
    assert balancer.choose("x", 0.0) is None


# ---------------------------------------------------------------------------
# Limits and Retry-After
# ---------------------------------------------------------------------------


def test_backend_max_connections() -> None:
    a, b = states("a", "b")
    balancer = Balancer([a, b], max_connections=1)
    first, second = balancer.choose("x", 0.0), None
    assert first is not None
    balancer.acquire(first)
    second = balancer.choose("x", 0.0)
    assert second is not None and second is not first
    balancer.acquire(second)
    assert balancer.choose("x", 0.0) is None
    assert balancer.retry_after(0.0) == 1
    balancer.release(first)
    assert balancer.choose("x", 0.0) is first


def test_release_without_acquire_is_a_bug() -> None:
    (a,) = states("a")
    with pytest.raises(RuntimeError):
        Balancer([a]).release(a)


@pytest.mark.parametrize(
    ("setup", "now", "expected"),
    [
        pytest.param({"a": ("down_until", 17.2), "b": ("down_until", 30.0)}, 10.0, 8,
                     id="soonest-fail-timeout"),
        pytest.param({"a": ("down_until", 10.1), "b": ("down_until", 30.0)}, 10.0, 1,
                     id="at-least-1"),
        pytest.param({"a": ("health", False), "b": ("health", False)}, 0.0, 3,
                     id="health-interval"),
        pytest.param({"a": ("health", False), "b": ("down_until", 1.5)}, 0.0, 2, id="mixed"),
    ],
)
def test_retry_after(setup: dict[str, tuple[str, object]], now: float, expected: int) -> None:
    a, b = states("a", "b")
    by_name = {"a": a, "b": b}
    balancer = Balancer([a, b], health_interval=3.0)
    for name, (attribute, value) in setup.items():
        if attribute == "health":
            by_name[name].health["tcp"] = bool(value)
        else:
            by_name[name].down_until = float(value)  # type: ignore[arg-type]
    assert balancer.choose("x", now) is None
    assert balancer.retry_after(now) == expected


def test_a_balancer_needs_a_backend() -> None:
    with pytest.raises(ValueError):
        Balancer([])


# ---------------------------------------------------------------------------
# Registry: state per URL, shared by routes, carried over by reloads
# ---------------------------------------------------------------------------

CONFIG = """\
[[listener]]
address = "127.0.0.1:0"
tls = false

[[host]]
names = ["a.example"]

[[host.route]]
path = "/one"
backends = ["ws://10.0.0.1:9000", "ws://10.0.0.2:9000"]
health_check = "/healthz"

[[host.route]]
path = "/two"
backend = "ws://10.0.0.2:9000"
{extra}
"""


def load(tmp_path: Path, extra: str = "", text: str = CONFIG) -> config.Config:
    return config.loads(text.format(extra=extra), str(tmp_path / "gatewayd.toml"))


def test_routes_naming_the_same_url_share_its_state(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    registry = Registry()
    one, two = (Balancer.for_route(route, registry) for route in cfg.hosts[0].routes)
    assert one.states[1] is two.states[0]
    one.acquire(one.states[1])
    assert two.states[0].active == 1
    assert len(registry) == 2


def test_a_reload_keeps_the_state_of_urls_it_still_names(tmp_path: Path) -> None:
    old_cfg = load(tmp_path)
    registry = Registry()
    for route in old_cfg.hosts[0].routes:
        Balancer.for_route(route, registry)
    kept = registry.state("ws://10.0.0.2:9000")
    kept.active = 3
    kept.health[check_name(old_cfg.hosts[0].routes[0])] = False
    gone = registry.state("ws://10.0.0.1:9000")

    new_cfg = load(tmp_path, text=CONFIG.replace('"ws://10.0.0.1:9000", ', ""))
    new = registry.carried_over(new_cfg)

    assert new.state("ws://10.0.0.2:9000") is kept
    assert list(new) == [kept]
    assert gone in list(registry)             # the old registry is untouched
    assert kept.health == {"GET /healthz": False}
    new.keep_checks(new_cfg)                   # same check still configured: verdict kept
    assert kept.health == {"GET /healthz": False}
    without_checks = load(tmp_path, text=CONFIG.replace('health_check = "/healthz"', ""))
    new.keep_checks(without_checks)
    assert kept.health == {} and kept.healthy


def test_module_stays_pure() -> None:
    source = (REPO / "gatewayd" / "balancer.py").read_text()
    imports = re.findall(r"^\s*(?:import|from)\s+([\w.]+)", source, flags=re.MULTILINE)
    assert {name.split(".")[0] for name in imports}.isdisjoint({"trio", "socket", "ssl", "time"})
