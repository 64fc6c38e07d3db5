"""Choosing a backend for a route: balancing, passive and active health, limits. Pure.

No I/O and no trio: time is an argument (``now``, any monotonic clock in
seconds) and randomness an injectable :class:`random.Random`, so every rule
below is tested with a fake clock (``tests/test_balancer.py``). The I/O side
(:mod:`gatewayd.backend`, :mod:`gatewayd.health`) calls :meth:`Balancer.choose`,
then :meth:`Balancer.acquire` / :meth:`Balancer.release` around a connection,
and reports each connect attempt with :meth:`Balancer.record_success` or
:meth:`Balancer.record_failure`.

Theory of operation
-------------------
One :class:`BackendState` exists per backend URL for the whole gateway
(:class:`Registry`): routes that name the same URL share its connection
count and its health, and a reload that keeps a URL keeps its state, so
connections accepted under the old configuration still count against the
limits of the new one. A :class:`Balancer` is one route's view: its
backends, in file order, and the route's settings.

A backend is *available* to a route when all of these hold:

* **passive health** (nginx ``max_fails`` / ``fail_timeout``): it has not
  failed ``max_fails`` connect attempts in a row, or its ``fail_timeout``
  has run out since the last of them. After that one attempt goes through;
  if it fails too the backend is skipped for another ``fail_timeout``, and
  a success resets the count. ``max_fails = 0`` turns this off, and like
  nginx a route with a single backend never skips it for passive failures
  (the client would get 503 instead of a fresh attempt);
* **active health**: no health check of it reported "down" last time;
* **capacity**: fewer than ``backend_max_connections`` connections (0 = no
  limit) are open or being opened to it.

Balancing modes, among the available backends not yet tried for this
client:

* ``round_robin``: the next one in file order after the last chosen;
* ``least_connections``: fewest open connections, ties in round-robin order;
* ``random_two``: two picked at random, the one with fewer connections
  ("the power of two choices": near-even load without global coordination);
* ``source_ip``: rendezvous (highest-random-weight) hashing of the client
  address with each backend URL: the same client gets the same backend while
  it is available, and removing a backend moves only that backend's clients.

Invariants: ``active`` is never negative (each acquire has one release);
``choose`` never returns a backend that is unavailable or excluded.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from gatewayd.config import Balance, Config, RouteConfig


@dataclass(eq=False)
class BackendState:
    """What the gateway knows about one backend URL (shared by every route naming it).

    Attributes:
        url: the backend URL, as written in the configuration.
        active: connections open or being opened to it (all routes, all generations).
        fails: failed connect attempts in a row.
        down_until: passive health: skipped until this time (-inf = not skipped).
        health: active health: each check's last verdict (True = up), by check name.
        connections: connections handed to it since start (counter).
        failures: failed attempts since start (counter).
    """

    url: str
    active: int = 0
    fails: int = 0
    down_until: float = -math.inf
    health: dict[str, bool] = field(default_factory=dict)
    connections: int = 0
    failures: int = 0

    @property
    def healthy(self) -> bool:
        """False when any active health check found it down."""
        return all(self.health.values())


class Registry:
    """Every backend's state, by URL, carried from one configuration to the next."""

    def __init__(self) -> None:
        self._states: dict[str, BackendState] = {}

    def state(self, url: str) -> BackendState:
        """The state for ``url`` (created on first use)."""
        state = self._states.get(url)
        if state is None:
            state = self._states[url] = BackendState(url)
        return state

    def carried_over(self, config: Config) -> Registry:
        """A registry for ``config`` that keeps the state of each URL it still names.

        The states of URLs that are gone are left out; connections that hold
        one keep their reference and release it harmlessly. ``self`` is not
        changed (the old configuration may stay in force if a reload fails).
        """
        new = Registry()
        for route in iter_routes(config):
            for backend in route.backends:
                state = self._states.get(backend.url)
                if state is not None:
                    new._states[backend.url] = state
        return new

    def keep_checks(self, config: Config) -> None:
        """Forget the verdicts of health checks that ``config`` does not run (any more)."""
        wanted: dict[str, set[str]] = {}
        for route in iter_routes(config):
            for backend in route.backends:
                names = wanted.setdefault(backend.url, set())
                if route.health_check:
                    names.add(check_name(route))
        for url, state in self._states.items():
            for name in list(state.health):
                if name not in wanted.get(url, ()):
                    del state.health[name]

    def __iter__(self) -> Iterator[BackendState]:
        return iter(self._states.values())

    def __len__(self) -> int:
        return len(self._states)


def iter_routes(config: Config) -> Iterable[RouteConfig]:
    """Every route of every host that has backends, in file order.

    Redirect routes (``backend`` None, ``backends`` empty) are left out: they
    are answered by row 9a and never get a balancer, a health check or a
    backend TLS context.
    """
    for host in config.hosts:
        for route in host.routes:
            if route.backends:
                yield route


def check_name(route: RouteConfig) -> str:
    """The name of a route's active health check: ``"tcp"`` or ``"GET /healthz"``."""
    return "tcp" if route.health_check == "tcp" else f"GET {route.health_check}"


def rendezvous_score(client: str, url: str) -> int:
    """The weight of backend ``url`` for ``client`` (highest wins; stable across runs)."""
    digest = hashlib.blake2b(f"{client}\x00{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Balancer:
    """One route's backends and the rules for choosing among them.

    Args:
        states: the route's backends, in file order.
        balance: the route's ``balance`` mode.
        max_fails: failed attempts in a row before a backend is skipped (0 = never).
        fail_timeout: how long it is skipped, in seconds.
        max_connections: ``backend_max_connections`` (0 = no limit).
        health_interval: seconds between active checks (for Retry-After).
        rng: randomness for ``random_two`` (tests pass a seeded one).
    """

    def __init__(
        self,
        states: Sequence[BackendState],
        *,
        balance: Balance = "round_robin",
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        max_connections: int = 0,
        health_interval: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if not states:
            raise ValueError("a balancer needs at least one backend")
        self.states = tuple(states)
        self.balance = balance
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.max_connections = max_connections
        self.health_interval = health_interval
        self._rng = rng or random.Random()
        self._next = 0  # round-robin cursor: index after the last chosen
        # nginx: a single server is never marked unavailable by failures.
        self._passive = max_fails > 0 and len(self.states) > 1

    @classmethod
    def for_route(cls, route: RouteConfig, registry: Registry) -> Balancer:
        """The balancer for ``route``, its states taken from ``registry``."""
        return cls(
            [registry.state(backend.url) for backend in route.backends],
            balance=route.balance,
            max_fails=route.max_fails,
            fail_timeout=route.fail_timeout,
            max_connections=route.backend_max_connections,
            health_interval=route.health_interval,
        )

    # ------------------------------------------------------------------ queries

    def is_down(self, state: BackendState, now: float) -> bool:
        """True while passive or active health rules ``state`` out."""
        if not state.healthy:
            return True
        return self._passive and now < state.down_until

    def is_full(self, state: BackendState) -> bool:
        """True when ``state`` is at this route's ``backend_max_connections``."""
        return 0 < self.max_connections <= state.active

    def available(self, state: BackendState, now: float) -> bool:
        """True when ``state`` may take a new connection now (see the module docstring)."""
        return not self.is_down(state, now) and not self.is_full(state)

    def choose(
        self, client: str, now: float, exclude: Collection[BackendState] = ()
    ) -> BackendState | None:
        """The backend for a new connection from ``client``, or None if none can take it.

        Args:
            client: the client's address (used by ``source_ip``).
            now: the current time.
            exclude: backends already tried for this connection.
        """
        candidates = [
            (index, state)
            for index, state in enumerate(self.states)
            if state not in exclude and self.available(state, now)
        ]
        if not candidates:
            return None
        if self.balance == "source_ip":
            return max(candidates, key=lambda item: rendezvous_score(client, item[1].url))[1]
        if self.balance == "random_two":
            if len(candidates) == 1:
                return candidates[0][1]
            first, second = self._rng.sample(candidates, 2)
            return first[1] if first[1].active <= second[1].active else second[1]
        if self.balance == "least_connections":
            fewest = min(state.active for _, state in candidates)
            candidates = [item for item in candidates if item[1].active == fewest]
        # round_robin, and ties of least_connections: the first at or after the cursor.
        count = len(self.states)
        index, state = min(candidates, key=lambda item: (item[0] - self._next) % count)
        self._next = (index + 1) % count
        return state

    def retry_after(self, now: float) -> int:
        """Seconds a client should wait before trying again (the 503's Retry-After).

        The soonest moment any backend may become available: the end of a
        passive ``fail_timeout``, the next health check, or (at the
        connection limit) one second. Whole seconds, at least 1.
        """
        waits: list[float] = []
        for state in self.states:
            if not state.healthy:
                waits.append(self.health_interval)
            elif self._passive and now < state.down_until:
                waits.append(state.down_until - now)
            else:
                waits.append(1.0)
        return max(1, math.ceil(min(waits)))

    # ------------------------------------------------------------------ updates

    def acquire(self, state: BackendState) -> None:
        """Count a connection being opened to ``state`` (before connecting)."""
        state.active += 1
        state.connections += 1

    def release(self, state: BackendState) -> None:
        """Count a connection to ``state`` as gone (its attempt failed, or it ended)."""
        if state.active <= 0:
            raise RuntimeError(f"release without acquire for {state.url}")
        state.active -= 1

    def record_success(self, state: BackendState) -> None:
        """A connect attempt reached the backend and got an answer: reset its failures."""
        state.fails = 0
        state.down_until = -math.inf

    def record_failure(self, state: BackendState, now: float) -> bool:
        """A connect attempt failed (refused, unreachable, timed out, reset before answering).

        Returns:
            True when this failure makes the backend skipped (for logging).
        """
        state.failures += 1
        state.fails += 1
        if self._passive and state.fails >= self.max_fails:
            state.down_until = now + self.fail_timeout
            return True
        return False
