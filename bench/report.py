"""The benchmark's report (bench/run.py): every proxy's figures per proxy core, and the targets.

Imported by bench/run.py. Each workload is one block with a line per proxy:

* the figure as measured (a throughput, a latency or a memory figure), with
  ``†`` when the load generator's core was full (the figure is then a lower
  bound of the proxy's);
* ``proxy CPU``: cores used by the proxy's processes during the measurement,
  from /proc (utime + stime of its process tree, reaped children included);
* ``per proxy core``: the throughput divided by that CPU, what the proxy does
  with one core-second, whether or not its core was full;
* ``CPU per op``: the same the other way round (proxy CPU µs per handshake,
  per message, per MB; for the idle row per connection opened, for the
  stalled row the cores used while every connection is stalled, which is
  zero unless something spins);
* the ratios to the reference proxy of the block (nginx for the WebSocket
  passthrough proxies, websockify for the bridges), measured and per proxy core;
* the issue's target for the proxy under test (gatewayd, the bridge) and
  whether this run meets it: per proxy core for throughputs, as measured for
  latency and memory.

The summary at the end puts every target beside gatewayd's figure and
HAProxy's and Caddy's (same ratio, same basis), so that one look says which
target is met.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import http_rows

#: Marks a figure measured while CPU 1 (load generator + backend) was saturated.
LOAD_BOUND = "†"
LOAD_BOUND_CORES = 0.9

#: The WebSocket passthrough proxies, the reference first; the bridges, the reference first.
PASSTHROUGH = ("nginx", "haproxy", "caddy", "gatewayd", "gatewayd-2w")
BRIDGES = ("websockify", "bridge")
HTTP = ("nginx", "haproxy", "caddy", "gatewayd")


def load_bound(measurement: dict[str, Any]) -> bool:
    return float(measurement["cpu"]) + float(measurement["backend_cpu"]) >= LOAD_BOUND_CORES


@dataclass(frozen=True)
class Target:
    text: str
    check: Callable[[float], bool]
    #: "per_core": the per-proxy-core ratio; "ratio": the measured ratio; "value": the figure itself.
    basis: str


#: issue #12's targets (benchmark figures per proxy core in one run).
TARGETS: dict[str, Target] = {
    "handshakes": Target("≥ 0.4×", lambda r: r >= 0.4, "per_core"),
    "echo": Target("≥ 0.7×", lambda r: r >= 0.7, "per_core"),
    "p99": Target("≤ 1.5×", lambda r: r <= 1.5, "ratio"),
    "bulk": Target("≥ 1.5×", lambda r: r >= 1.5, "per_core"),
    "idle": Target("≤ 30 KiB", lambda v: v <= 30, "value"),
    "stalled": Target("≤ 2×", lambda r: r <= 2, "ratio"),
    "stalled_after": Target("≤ 1.20×", lambda v: v <= 1.2, "value"),
}
#: A summary line with a figure and no target.
NO_TARGET = Target("-", lambda r: True, "ratio")
BRIDGE_TARGETS: dict[str, Target] = {
    "handshakes": Target("≥ 8×", lambda r: r >= 8, "per_core"),
    "echo": Target("≥ 3×", lambda r: r >= 3, "per_core"),
    "bulk": Target("≥ 2×", lambda r: r >= 2, "per_core"),
}


@dataclass
class Figure:
    value: float
    unit: str
    per_core: float | None = None
    cost: str = ""
    measurement: dict[str, Any] | None = None

    def text(self) -> str:
        text = fmt(self.value, self.unit)
        if self.measurement is not None and self.unit not in ("us",) and load_bound(self.measurement):
            text += LOAD_BOUND
        return text


def fmt(value: float, unit: str) -> str:
    if unit == "us":
        return f"{value:,.0f} µs"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    if unit == "KiB":
        return f"{value:,.1f} KiB"
    if unit == "×":
        return f"{value:.2f}×"
    return f"{value:,.0f}/s"


def _per_core(value: float, m: dict[str, Any]) -> float | None:
    return value / m["proxy_cpu"] if m.get("proxy_cpu", 0) > 0 else None


def _cost(m: dict[str, Any], per_second: float, what: str, scale: float = 1e6) -> str:
    if per_second <= 0:
        return ""
    return f"{m['proxy_cpu'] / per_second * scale:,.0f} µs/{what}"


#: (key, label) of the WebSocket rows, in print order.
ROWS = (
    ("handshakes", "handshakes/s (TLS + upgrade, 32 in flight)"),
    ("echo", "echo msg/s (64 B, 64 conns)"),
    ("p50", "p50 latency at 2,000 msg/s (64 conns)"),
    ("p99", "p99 latency at 2,000 msg/s (64 conns)"),
    ("bulk", "bulk MB/s (1 MiB msgs, 4 conns)"),
    ("idle", "memory per idle conn"),
    ("stalled", "memory per stalled conn (client stopped reading)"),
    ("stalled_after", "RSS after the stalled clients left / before"),
)


def figures(results: dict[str, Any]) -> dict[str, Figure]:
    """One proxy's figures by row key."""
    out: dict[str, Figure] = {}
    if "handshakes" in results:
        m = results["handshakes"]
        out["handshakes"] = Figure(m["rate"], "/s", _per_core(m["rate"], m), _cost(m, m["rate"], "handshake"), m)
    if "echo" in results:
        m = results["echo"]
        out["echo"] = Figure(m["rate"], "/s", _per_core(m["rate"], m), _cost(m, m["rate"], "msg"), m)
    if "latency" in results:
        m = results["latency"]
        for key in ("p50", "p99"):
            out[key] = Figure(m[f"{key}_us"], "us", None, _cost(m, m["rate"], "msg"), m)
    if "bulk" in results:
        m = results["bulk"]
        mb = m["bytes_per_s"] / 1e6
        out["bulk"] = Figure(mb, "MB/s", _per_core(mb, m), _cost(m, mb, "MB"), m)
    if "idle" in results:
        m = results["idle"]
        cost = f"{m['cpu_us_per_connection']:,.0f} µs/conn" if "cpu_us_per_connection" in m else ""
        out["idle"] = Figure(m["kib_per_connection"], "KiB", None, cost)
    if "stalled" in results:
        m = results["stalled"]
        cost = f"{m['stalled_cpu']:.2f} cores" if "stalled_cpu" in m else ""
        out["stalled"] = Figure(m["per_stalled_connection_kib"], "KiB", None, cost)
        if m.get("after_vs_before") is not None:
            out["stalled_after"] = Figure(m["after_vs_before"], "×")
    return out


def _label(key: str, label: str, results: dict[str, dict[str, Any]], names: tuple[str, ...]) -> str:
    counts = []
    for name in names:
        workload = {"idle": "idle", "stalled": "stalled", "stalled_after": "stalled"}.get(key)
        if workload and workload in results.get(name, {}):
            m = results[name][workload]
            counts.append(f"{name} {m['connections' if workload == 'idle' else 'count']:,}")
    return f"{label} (connections: {', '.join(counts)})" if counts else label


def ratio_for(target: Target, subject: Figure, reference: Figure | None) -> float | None:
    """The figure a target is judged on."""
    if target.basis == "value":
        return subject.value
    if reference is None or not reference.value:
        return None
    if target.basis == "per_core":
        if subject.per_core is None or not reference.per_core:
            return None
        return subject.per_core / reference.per_core
    return subject.value / reference.value


def group_table(
    title: str, results: dict[str, dict[str, Any]], names: tuple[str, ...], subject: str,
    targets: dict[str, Target],
) -> str:
    """One block per row, a line per proxy of ``names`` that ran; ratios to names[0]."""
    present = tuple(n for n in names if n in results)
    if not present:
        return ""
    reference = names[0] if names[0] in results else None
    figs = {n: figures(results[n]) for n in present}
    header = (f"  {'':12} {'figure':>14} {'proxy CPU':>9} {'per proxy core':>15} {'CPU per op':>19} "
              f"{'vs ' + (reference or '-'):>13} {'per core':>9}  {'target':>8} {'':7} gen/backend CPU")
    lines = [title, "", header, "  " + "-" * (len(header) - 2)]
    footnote = False
    for key, label in ROWS:
        have = [n for n in present if key in figs[n]]
        if not have:
            continue
        lines.append(_label(key, label, results, tuple(have)))
        ref = figs[reference].get(key) if reference else None
        for name in have:
            f = figs[name][key]
            m = f.measurement
            cpu = f"{m['proxy_cpu']:.2f}" if m else ""
            per_core = fmt(f.per_core, f.unit) if f.per_core is not None else ""
            ratio = pc_ratio = ""
            if ref is not None and name != reference and ref.value:
                ratio = f"{f.value / ref.value:.2f}×"
                if f.per_core is not None and ref.per_core:
                    pc_ratio = f"{f.per_core / ref.per_core:.2f}×"
            target_text = verdict = ""
            if name == subject and key in targets:
                target = targets[key]
                target_text = target.text
                judged = ratio_for(target, f, ref)
                verdict = "" if judged is None else ("ok" if target.check(judged) else "MISSED")
            gen = f"{m['cpu']:.2f}/{m['backend_cpu']:.2f}" if m else ""
            text = f.text()
            footnote = footnote or text.endswith(LOAD_BOUND)
            lines.append(f"  {name:12} {text:>14} {cpu:>9} {per_core:>15} {f.cost:>19} {ratio:>13} {pc_ratio:>9}  "
                         f"{target_text:>8} {verdict:7} {gen}")
    if footnote:
        lines.append(f"{LOAD_BOUND} the load generator's core was full (loadgen + backend ≥ {LOAD_BOUND_CORES} cores): "
                     "that figure is a lower bound of the proxy's; compare per proxy core")
    return "\n".join(lines)


def summary(results: dict[str, dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Every target beside gatewayd's (or the bridge's) figure, and HAProxy's and Caddy's on the same basis."""
    others: list[str] = [n for n in ("haproxy", "caddy") if n in results]
    rows_out: list[dict[str, Any]] = []
    labels = dict(ROWS)
    header = (f"{'target (issue #12)':58} {'target':>9} {'this run':>10} {'verdict':>8}   "
              + " ".join(f"{n:>9}" for n in others))
    lines = ["Targets: this run, per proxy core (throughputs), as measured (latency, memory)", "", header,
             "-" * len(header)]

    def add(subject: str, reference: str, key: str, target: Target, text: str, peers: list[str]) -> None:
        sub = figures(results.get(subject, {})).get(key)
        ref = figures(results.get(reference, {})).get(key)
        judged = ratio_for(target, sub, ref) if sub is not None else None
        unit = "KiB" if key in ("idle",) and target.basis == "value" else "×"
        shown = "" if judged is None else fmt(judged, unit)
        verdict = "" if judged is None or target is NO_TARGET else ("ok" if target.check(judged) else "MISSED")
        peer_texts = []
        for peer in peers:
            pf = figures(results.get(peer, {})).get(key)
            pj = ratio_for(target, pf, ref) if pf is not None else None
            peer_texts.append("" if pj is None else fmt(pj, unit))
        lines.append(f"{text:58} {target.text:>9} {shown:>10} {verdict:>8}   "
                     + " ".join(f"{t:>9}" for t in peer_texts))
        met = None if judged is None or target is NO_TARGET else target.check(judged)
        rows_out.append({"subject": subject, "reference": reference, "row": key, "target": target.text,
                         "basis": target.basis, "measured": judged, "met": met,
                         **{peer: t for peer, t in zip(peers, peer_texts, strict=True)}})

    basis_note = {"per_core": "per proxy core", "ratio": "measured", "value": ""}
    for key, target in TARGETS.items():
        vs = "" if target.basis == "value" else f" vs nginx ({basis_note[target.basis]})"
        add("gatewayd", "nginx", key, target, f"gatewayd {labels[key].split(' (')[0]}{vs}", others)
    for key, target in BRIDGE_TARGETS.items():
        add("bridge", "websockify", key, target,
            f"bridge {labels[key].split(' (')[0]} vs websockify ({basis_note[target.basis]})", [])
    # No target: the bridges' stalled connections beside nginx's (the passthrough's reference).
    for subject in BRIDGES:
        add(subject, "nginx", "stalled", NO_TARGET, f"{subject} memory per stalled conn vs nginx (measured)", [])
    if others:
        lines.append(f"(the {' and '.join(others)} columns: the same figure for them, against the same reference)")
    return "\n".join(lines), rows_out


def workers_section(results: dict[str, dict[str, Any]]) -> str:
    one, two = results.get("gatewayd", {}), results.get("gatewayd-2w", {})
    lines = ["workers: gatewayd workers = 2 on CPUs 0+1 vs workers = 1 on CPU 0 (loadgen and backend stay on CPU 1)", ""]
    for key, label in (("handshakes", "handshakes/s"), ("echo", "echo msg/s")):
        if key in one and key in two:
            r1, r2 = one[key], two[key]
            per_core = ((r2["rate"] / r2["proxy_cpu"]) / (r1["rate"] / r1["proxy_cpu"])
                        if r1["proxy_cpu"] and r2["proxy_cpu"] else float("nan"))
            lines.append(
                f"  {label:14} 1 worker {r1['rate']:>9,.0f}   2 workers {r2['rate']:>9,.0f}   "
                f"{r2['rate'] / r1['rate']:.2f}×  (proxy CPU {r1['proxy_cpu']:.2f} -> {r2['proxy_cpu']:.2f} cores; "
                f"per proxy core {per_core:.2f}×; loadgen {r2['cpu']:.2f}, backend {r2['backend_cpu']:.2f})"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def http_table(results: dict[str, dict[str, Any]], static: bool) -> str:
    """The HTTP rows, a line per proxy, ratios to nginx."""
    present = [n for n in HTTP if any(k in results.get(n, {}) for k, *_ in http_rows.WORKLOADS)]
    header = (f"  {'':12} {'figure':>12} {'proxy CPU':>9} {'per proxy core':>15} {'CPU per op':>17} "
              f"{'vs nginx':>9} {'per core':>9}  gen/backend CPU")
    lines = ["HTTP (TLS 1.3, kept-alive connections, wrk), each proxy 1 worker/thread on CPU 0", "", header,
             "  " + "-" * (len(header) - 2)]
    footnote = False
    nginx = results.get("nginx", {})
    for key, label, _, _, unit in http_rows.WORKLOADS:
        if not any(key in results.get(n, {}) for n in present):
            continue
        lines.append(label)
        ref = nginx.get(key)
        for name in present:
            m = results[name].get(key)
            if m is None:
                if name == "haproxy" and key.startswith("static"):
                    lines.append(f"  {name:12} {'n/a':>12}   (HAProxy serves no files)")
                continue
            v = http_rows.value(m, unit)
            text = fmt(v, unit)
            if load_bound(m):
                text += LOAD_BOUND
                footnote = True
            per_core = fmt(v / m["proxy_cpu"], unit) if m["proxy_cpu"] > 0 else ""
            what = "answer" if unit == "MB/s" else "request"
            cost = f"{m['cpu_us_per_request']:,.0f} µs/{what}"
            ratio = pc = ""
            if ref is not None and name != "nginx":
                rv = http_rows.value(ref, unit)
                ratio = f"{v / rv:.2f}×" if rv else ""
                if m["proxy_cpu"] > 0 and ref["proxy_cpu"] > 0 and rv:
                    pc = f"{(v / m['proxy_cpu']) / (rv / ref['proxy_cpu']):.2f}×"
            lines.append(f"  {name:12} {text:>12} {m['proxy_cpu']:>9.2f} {per_core:>15} {cost:>17} {ratio:>9} {pc:>9}  "
                         f"{m['cpu']:.2f}/{m['backend_cpu']:.2f}")
    if not static:
        lines.append("static rows: this checkout's gatewayd has no `static` routes ('gatewayd check' refuses them)")
    if footnote:
        lines.append(f"{LOAD_BOUND} the load generator's core was full: that figure is a lower bound of the proxy's")
    lines.append("CPU per op: proxy CPU time over the measurement / requests answered (for the large file: per 16 MiB"
                 " answer); gen/backend: wrk / the origin nginx.")
    return "\n".join(lines)


def report(
    header: list[str], results: dict[str, dict[str, Any]], bridge: bool, static: bool = False,
) -> tuple[str, list[dict[str, Any]]]:
    out = [*header, ""]
    passthrough = group_table(
        "WebSocket passthrough (TLS terminated, the same echo backend), each proxy 1 worker/thread on CPU 0 "
        "(gatewayd-2w: 2 workers on CPUs 0+1)", results, PASSTHROUGH, "gatewayd", TARGETS)
    if passthrough:
        out += [passthrough, ""]
    workers = workers_section(results)
    if workers:
        out += [workers, ""]
    if any(n in results for n in BRIDGES):
        if not bridge:
            out.append("gatewayd tcp:// bridge: not in this checkout (tcp:// backends are refused by 'gatewayd check')")
        out += [group_table("WebSocket-to-TCP bridges (TLS terminated, the same TCP echo backend), 1 core: "
                            "gatewayd's tcp:// bridge (1 worker) vs websockify (a process per connection)",
                            results, BRIDGES, "bridge", BRIDGE_TARGETS), ""]
    if any(k in m for m in results.values() for k, *_ in http_rows.WORKLOADS):
        out += [http_table(results, static), ""]
    text, rows_out = summary(results)
    out += [text, ""]
    out.append("CPU columns: cores used during the measurement by the proxy's processes (from /proc), and by the load"
               " generator / the echo backend.")
    return "\n".join(out), rows_out
