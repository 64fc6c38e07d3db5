"""Prometheus metrics of one gateway, served by the admin endpoint's ``/metrics``.

Each :class:`~gatewayd.server.Gateway` owns one :class:`Metrics`, whose
``CollectorRegistry`` is its own (not prometheus-client's global one), so
several gateways can run in one process (tests) without sharing counters.

Rules the call sites follow:

* **O(1) per event, nothing per chunk.** A connection is counted when it is
  accepted, when it is routed and when it ends; its byte counts are added once,
  at the end, from the totals the access log keeps anyway.
* **Low-cardinality labels only**: ``host`` is the host's first configured
  name, ``route`` the route's label (``/chat``, ``/api/*``), ``backend`` a
  configured backend URL, ``code`` an HTTP status, ``kind`` / ``reason`` /
  ``result`` fixed words. Never a client address, SNI or request path as sent.
* A connection that is not routed yet (TLS and request head, or rejected
  before a route was chosen: an unknown path, host or method) is labelled
  ``host=""``, ``route=""``, one label set for all of them.
* Every registry also has prometheus-client's process and platform collectors
  (``process_*`` of this process, ``python_info``) and ``gatewayd_build_info``.
  With workers, each worker's come labelled ``worker="N"`` and the
  supervisor's own ``worker="supervisor"`` (gatewayd.workers.merge_metrics).

The README ("Admin endpoint and metrics") lists every metric with its labels
and the place in the code that counts it.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gatewayd import __version__
from gatewayd.errors import BackendBadUpgrade, BackendError, BackendRefusedUpgrade, BackendTimeout

#: The Prometheus text exposition format (version 0.0.4), what generate_latest writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Labels of a connection that has no route (yet).
UNROUTED: tuple[str, str] = ("", "")

#: ``kind`` of gatewayd_backend_connect_errors_total.
BACKEND_ERROR_KINDS = ("refused", "timeout", "bad_upgrade", "refused_upgrade")
#: ``reason`` of gatewayd_tls_handshake_failures_total.
TLS_FAILURE_REASONS = ("unknown_sni", "plain_http", "handshake_error", "timeout")
#: ``reason`` of gatewayd_connections_limited_total (gatewayd.limits.Refusal).
LIMIT_REASONS = ("per_ip_connections", "per_ip_handshake_rate", "per_ip_table_full")
#: ``result`` of gatewayd_config_reloads_total.
RELOAD_RESULTS = ("success", "failure")
#: Kinds of gatewayd_acme_issuance_failures (gatewayd.acme.client.IssueFailed.kind).
ACME_FAILURE_KINDS = ("network", "ca_error", "validation", "timeout", "no_challenge", "internal")

#: Backend connect + upgrade latency buckets, seconds (backend_connect_timeout is 5 s by default).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Plain HTTP requests: long-polling waits up to http_timeout (60 s by default).
HTTP_BUCKETS = (*LATENCY_BUCKETS, 30.0, 60.0, 120.0)


#: What the backend gauges are read from at each scrape: (URL, available, open connections).
BackendView = Callable[[], Iterable[tuple[str, bool, int]]]


class _BackendCollector(Collector):
    """Backend gauges read from the balancer state at scrape time (nothing per event)."""

    def __init__(self) -> None:
        self.view: BackendView = lambda: ()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "gatewayd_backend_up",
            "1 when the backend may get new connections, 0 while a failed health check "
            "or max_fails/fail_timeout rules it out.",
            labels=("backend",),
        )
        open_ = GaugeMetricFamily(
            "gatewayd_backend_connections",
            "Connections open (or being opened) to the backend, from every route naming it.",
            labels=("backend",),
        )
        for url, available, active in self.view():
            up.add_metric((url,), 1.0 if available else 0.0)
            open_.add_metric((url,), float(active))
        yield up
        yield open_


def openssl_version() -> str:
    """The OpenSSL that pyOpenSSL runs on (cryptography's bindings): ``OpenSSL 3.5.1``."""
    text: str = openssl_backend.openssl_version_text()
    return " ".join(text.split()[:2])


def register_process_metrics(registry: CollectorRegistry) -> None:
    """``process_*``, ``python_info`` and ``gatewayd_build_info`` of this process."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    build = Gauge(
        "gatewayd_build_info",
        "Always 1; the labels say which gatewayd, Python and OpenSSL this process runs.",
        ("version", "python", "openssl"),
        registry=registry,
    )
    build.labels(__version__, platform.python_version(), openssl_version()).set(1)


def process_metrics_text() -> str:
    """The process metrics of this process alone (the supervisor's own, with workers)."""
    registry = CollectorRegistry(auto_describe=True)
    register_process_metrics(registry)
    return generate_latest(registry).decode()


def backend_error_kind(error: BackendError) -> str:
    """The ``kind`` label for a failed backend attempt (SPEC rows 16-19)."""
    if isinstance(error, BackendTimeout):
        return "timeout"
    if isinstance(error, BackendRefusedUpgrade):
        return "refused_upgrade"
    if isinstance(error, BackendBadUpgrade):
        return "bad_upgrade"
    return "refused"  # BackendUnavailable: refused, unreachable, reset before answering


class _Children:
    """The children of one labelled metric, each looked up once (lazily: a
    label set is exported from its first event on, as with ``labels()``)."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class Metrics:
    """The registry and every metric of one gateway, with one method per event."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        register_process_metrics(registry)
        host_route = ("host", "route")
        self.connections_accepted = Counter(
            "gatewayd_connections_accepted",
            "TCP connections accepted (under max_connections), routed or not.",
            registry=registry,
        )
        self.connections_over_limit = Counter(
            "gatewayd_connections_over_limit",
            "TCP connections closed at once because max_connections was reached.",
            registry=registry,
        )
        self.connections_limited = Counter(
            "gatewayd_connections_limited",
            "TCP connections closed before TLS by a per-client-address limit, by reason "
            "(per_ip_connections, per_ip_handshake_rate, per_ip_table_full).",
            ("reason",),
            registry=registry,
        )
        self.proxy_protocol_errors = Counter(
            "gatewayd_proxy_protocol_errors",
            "Connections on proxy_protocol listeners closed for a missing, malformed "
            "or late PROXY header.",
            registry=registry,
        )
        self.connections_open = Gauge(
            "gatewayd_connections_open",
            'Connections open now; host="" route="" until a route is chosen.',
            host_route,
            registry=registry,
        )
        self.connections = Counter(
            "gatewayd_connections",
            "Connections routed to a host and route (counted when the route is chosen).",
            host_route,
            registry=registry,
        )
        self.handshake_responses = Counter(
            "gatewayd_handshake_responses",
            "Handshake answers sent to clients by host, route and HTTP status: the gateway's "
            'own rejections, relayed backend statuses and 101; host="" route="" when no '
            "route was chosen (unknown host or path, bad request).",
            ("host", "route", "code"),
            registry=registry,
        )
        self.bytes_received = Counter(
            "gatewayd_bytes_received",
            "Bytes received from clients (request head included), added when a connection ends.",
            host_route,
            registry=registry,
        )
        self.bytes_sent = Counter(
            "gatewayd_bytes_sent",
            "Bytes sent to clients (answers included), added when a connection ends.",
            host_route,
            registry=registry,
        )
        self.backend_connect_errors = Counter(
            "gatewayd_backend_connect_errors",
            "Failed backend connects/upgrades by backend URL and kind "
            "(refused, timeout, bad_upgrade, refused_upgrade).",
            ("backend", "kind"),
            registry=registry,
        )
        self.backend_connect_seconds = Histogram(
            "gatewayd_backend_connect_seconds",
            "Time from starting the backend connect to its valid 101, successful upgrades.",
            ("backend",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tls_handshake_failures = Counter(
            "gatewayd_tls_handshake_failures",
            "Client TLS handshakes that failed, by reason "
            "(unknown_sni, plain_http, handshake_error, timeout).",
            ("reason",),
            registry=registry,
        )
        self.config_reloads = Counter(
            "gatewayd_config_reloads",
            "Configuration reload attempts by result (success, failure).",
            ("result",),
            registry=registry,
        )
        self.config_generation = Gauge(
            "gatewayd_config_generation",
            "Number of the configuration generation in force (1 at start, +1 per reload).",
            registry=registry,
        )
        self.last_reload_success = Gauge(
            "gatewayd_last_reload_success",
            "1 if the last reload (or the start) succeeded, 0 if it failed.",
            registry=registry,
        )
        self.last_reload_success_timestamp = Gauge(
            "gatewayd_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load (start or reload).",
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "gatewayd_certificate_expiry_timestamp_seconds",
            "Unix time at which each host's certificate expires (refreshed on reload).",
            ("host",),
            registry=registry,
        )
        self.backend_unavailable = Counter(
            "gatewayd_backend_unavailable",
            "Connections answered 503 because no backend of the route could take them "
            "(all down, or all at backend_max_connections).",
            host_route,
            registry=registry,
        )
        self.acme_attempts = Counter(
            "gatewayd_acme_issuance_attempts",
            "ACME orders started (first issuance and renewals), by host (its first name). "
            "Counted by the one process that talks to the CA.",
            ("host",),
            registry=registry,
        )
        self.acme_failures = Counter(
            "gatewayd_acme_issuance_failures",
            "ACME orders that produced no certificate, by host and kind "
            "(network, ca_error, validation, timeout, no_challenge, internal).",
            ("host", "kind"),
            registry=registry,
        )
        self.acme_renewal = Gauge(
            "gatewayd_acme_next_attempt_timestamp_seconds",
            "Unix time of the next ACME order for each host (renewal, or retry after a failure).",
            ("host",),
            registry=registry,
        )
        self.acme_challenges = Counter(
            "gatewayd_acme_challenges_answered",
            "ACME validation requests answered by this gateway, by challenge type "
            "(tls-alpn-01 handshakes, http-01 requests).",
            ("type",),
            registry=registry,
        )
        self.http_requests = Counter(
            "gatewayd_http_requests",
            "Plain HTTP requests answered (http and static routes), by route "
            '("host[0]:/path") and HTTP status.',
            ("route", "code"),
            registry=registry,
        )
        self.http_request_seconds = Histogram(
            "gatewayd_http_request_duration_seconds",
            "Time from a plain HTTP request's head to the end of its answer, by route.",
            ("route",),
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self._backends = _BackendCollector()
        registry.register(self._backends)
        # The labelled children of the per-connection metrics, looked up once
        # per label set (prometheus-client's labels() takes a lock and checks
        # every value on each call). None of these metrics is ever cleared.
        self._open = _Children(self.connections_open)
        self._routed = _Children(self.connections)
        self._received = _Children(self.bytes_received)
        self._sent = _Children(self.bytes_sent)
        self._answers = _Children(self.handshake_responses)
        self._connect_seconds = _Children(self.backend_connect_seconds)
        # Fixed label sets are exported as 0 from the start, so that rate() and
        # alerts see the series before the first event.
        for reason in TLS_FAILURE_REASONS:
            self.tls_handshake_failures.labels(reason)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        for reason in LIMIT_REASONS:
            self.connections_limited.labels(reason)

    # -- configuration ---------------------------------------------------------

    def configuration_loaded(self, generation: int, expiry: Mapping[str, float]) -> None:
        """A configuration is in force: at start, and after each successful reload."""
        self.config_generation.set(generation)
        self.last_reload_success.set(1)
        self.last_reload_success_timestamp.set(time.time())
        # Hosts removed by a reload must not keep exporting their old certificate.
        self.certificate_expiry.clear()
        for host, timestamp in expiry.items():
            self.certificate_expiry.labels(host).set(timestamp)

    def reload_succeeded(self, generation: int, expiry: Mapping[str, float]) -> None:
        self.config_reloads.labels("success").inc()
        self.configuration_loaded(generation, expiry)

    def reload_failed(self) -> None:
        """A reload was refused (bad file, certificate, bind): the old generation stays."""
        self.config_reloads.labels("failure").inc()
        self.last_reload_success.set(0)

    # -- connections -----------------------------------------------------------

    def over_limit(self) -> None:
        self.connections_over_limit.inc()

    def limited(self, reason: str) -> None:
        self.connections_limited.labels(reason).inc()

    def proxy_protocol_failed(self) -> None:
        self.proxy_protocol_errors.inc()

    def connection_opened(self) -> None:
        self.connections_accepted.inc()
        self._open(*UNROUTED).inc()

    def connection_routed(self, labels: tuple[str, str]) -> None:
        """The connection moves from ``UNROUTED`` to its host and route."""
        self._open(*UNROUTED).dec()
        self._open(*labels).inc()
        self._routed(*labels).inc()

    def connection_closed(self, labels: tuple[str, str], received: int, sent: int) -> None:
        self._open(*labels).dec()
        if received:
            self._received(*labels).inc(received)
        if sent:
            self._sent(*labels).inc(sent)

    def answered(self, status: int, labels: tuple[str, str] = UNROUTED) -> None:
        """One answer to a client's request head, under its route's labels (or UNROUTED)."""
        self._answers(*labels, str(status)).inc()

    def http_request(self, route: str, status: int, seconds: float) -> None:
        """One plain HTTP request answered (SPEC section 7, "Logs and metrics")."""
        self.http_requests.labels(route, str(status)).inc()
        self.http_request_seconds.labels(route).observe(seconds)

    def tls_failed(self, reason: str) -> None:
        self.tls_handshake_failures.labels(reason).inc()

    # -- backends --------------------------------------------------------------

    def backend_connected(self, backend: str, seconds: float) -> None:
        self._connect_seconds(backend).observe(seconds)

    def backend_failed(self, backend: str, error: BackendError) -> None:
        """One failed attempt (a retried one included) on ``backend``."""
        self.backend_connect_errors.labels(backend, backend_error_kind(error)).inc()

    def no_backend(self, labels: tuple[str, str]) -> None:
        self.backend_unavailable.labels(*labels).inc()

    def watch_backends(self, view: BackendView) -> None:
        """Where the backend gauges come from (the gateway's current backend states)."""
        self._backends.view = view

    # -- ACME --------------------------------------------------------------------

    def acme_attempted(self, host: str) -> None:
        self.acme_attempts.labels(host).inc()
        # The failure series of the host exist from its first order on.
        for kind in ACME_FAILURE_KINDS:
            self.acme_failures.labels(host, kind)

    def acme_challenge_answered(self, kind: str) -> None:
        self.acme_challenges.labels(kind).inc()

    def acme_failed(self, host: str, kind: str) -> None:
        self.acme_failures.labels(host, kind).inc()

    def acme_scheduled(self, host: str, timestamp: float) -> None:
        self.acme_renewal.labels(host).set(timestamp)

    def certificates_rotated(self, expiry: Mapping[str, float]) -> None:
        """New certificates are in force (ACME): refresh the expiry gauge."""
        self.certificate_expiry.clear()
        for host, timestamp in expiry.items():
            self.certificate_expiry.labels(host).set(timestamp)

    # -- exposition ------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
