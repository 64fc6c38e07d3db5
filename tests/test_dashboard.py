"""contrib/grafana/gatewayd.json queries only series that a live ``/metrics`` has.

A real gateway serves a little traffic (a 101, a 503 while its backend's one
slot is taken, a 404, a 502 from a backend that is down, a plain HTTP request), then every PromQL expression of the dashboard (panels
and template variables) is taken apart: each metric name must be among the
scraped series, and each label it filters or groups by must be one of that
series' labels (``job`` and ``instance`` come from Prometheus's scrape).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    Certs,
    echo_backend,
    exchange,
    make_certs,
    read_head,
    receive_all,
    running_gateway,
    tls_client,
    upgrade_request,
)

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "gatewayd.json"

#: PromQL words that are not series names.
PROMQL = {
    "sum", "min", "max", "avg", "count", "by", "without", "rate", "increase", "irate", "time",
    "histogram_quantile", "label_values", "on", "ignoring", "group_left", "group_right", "topk",
    "bottomk", "clamp_min", "clamp_max", "abs", "and", "or", "unless", "offset", "bool",
}
#: Labels Prometheus adds when it scrapes (target labels).
TARGET_LABELS = {"job", "instance"}

pytestmark = pytest.mark.timeout(60)


def expressions(dashboard: dict[str, object]) -> list[str]:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                    found.append(value["query"])
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return found


def parse(expr: str) -> tuple[set[str], set[str]]:
    """(series names, label names) an expression uses."""
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {name.strip() for name in grouping.split(",") if name.strip()}
    bare = re.sub(r"\{[^}]*\}|\[[^]]*\]|\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    names = {word for word in re.findall(r"[a-zA-Z_:][\w:]*", bare) if word not in PROMQL}
    # label_values(metric, label): the second argument is a label.
    for label in re.findall(r"label_values\(\s*[\w:]+[^,]*,\s*(\w+)\s*\)", expr):
        names.discard(label)
        labels.add(label)
    return names, labels - TARGET_LABELS


@pytest.mark.parametrize(
    ("expr", "names", "labels"),
    [
        ('sum by (host, route) (rate(a_total{job=~"$job", code!="101"}[$__rate_interval]))', {"a_total"}, {"host", "route", "code"}),
        ("histogram_quantile(0.99, sum by (backend, le) (rate(b_bucket[5m])))", {"b_bucket"}, {"backend", "le"}),
        ("time() - c_seconds", {"c_seconds"}, set()),
        ('label_values(d_info{job=~"$job"}, instance)', {"d_info"}, set()),
    ],
)
def test_parse(expr: str, names: set[str], labels: set[str]) -> None:
    assert parse(expr) == (names, labels)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost", "127.0.0.1")
    return certs


async def test_every_queried_series_exists_in_a_live_metrics(certs: Certs, tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    down = trio.socket.socket()
    await down.bind(("127.0.0.1", 0))
    down_port = down.getsockname()[1]
    down.close()
    context = certs.client_context()
    async with echo_backend() as echo:
        path = tmp_path / "gatewayd.toml"
        path.write_text(
            textwrap.dedent(
                f"""
                [gateway]
                backend_connect_timeout = 2.0

                [admin]
                listen = "127.0.0.1:0"

                [[listener]]
                address = "127.0.0.1:0"

                [[host]]
                names = ["localhost"]
                certificate = "{certs.directory / 'localhost.pem'}"
                private_key = "{certs.directory / 'localhost.key'}"
                default = true

                [[host.route]]
                path = "/echo"
                backend = "ws://127.0.0.1:{echo}/"
                backend_max_connections = 1
                http = true

                [[host.route]]
                path = "/down"
                backend = "ws://127.0.0.1:{down_port}/"
                """
            )
        )
        async with running_gateway(path) as gateway:
            with trio.fail_after(30):
                ok = await tls_client(gateway.port, context, "localhost")
                await ok.send_all(upgrade_request("/echo"))
                head, _ = await read_head(ok)
                assert head.startswith(b"HTTP/1.1 101 ")
                # /echo's one backend slot is taken: 503; an unknown path: 404; a dead backend: 502.
                for target, status in (("/echo", 503), ("/nowhere", 404), ("/down", 502)):
                    answer = await exchange(await tls_client(gateway.port, context, "localhost"), upgrade_request(target))
                    assert answer.status == status
                await ok.aclose()
                # A plain request on the http = true route: the HTTP series.
                plain = await tls_client(gateway.port, context, "localhost")
                await plain.send_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert (await receive_all(plain)).startswith(b"HTTP/1.1 ")
                while gateway.gateway.active_connections:
                    await trio.sleep(0.05)
                address = gateway.gateway.admin_address
                assert address is not None
                stream = await trio.open_tcp_stream(*address)
                await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
                await stream.aclose()
    text = data.partition(b"\r\n\r\n")[2].decode()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)

    exprs = expressions(dashboard)
    assert len(exprs) >= 25
    used: set[str] = set()
    for expr in exprs:
        names, labels = parse(expr)
        assert names, expr
        missing = names - set(series)
        assert not missing, f"{expr}: no such series in /metrics: {sorted(missing)}"
        known = set().union(*(series[name] for name in names))
        # `worker` exists with workers > 1 only (gatewayd.workers.merge_metrics).
        assert labels - known - {"worker"} == set(), f"{expr}: labels {sorted(labels - known)} not on {sorted(names)}"
        used |= names
    # The dashboard covers the process metrics, the build, and the per-route answers.
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "gatewayd_build_info",
            "gatewayd_handshake_responses_total", "gatewayd_http_requests_total"} <= used


def test_panels_do_not_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    cells: set[tuple[int, int]] = set()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, panel["title"]
        cells |= mine
