"""Prometheus text exposition of the edge's counters.

Rendered from the edge's own plain counters at scrape time rather than kept in
prometheus_client objects: the data plane then pays one dict increment per
event and no locks (measured cheaper; the format is simple and stable).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..server import Edge


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def render_metrics(edge: Edge) -> str:
    st = edge.status()
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, rows: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in rows:
            out.append(f"{name}{labels} {value:g}")

    metric("edgeward_connections", "gauge", "Open TCP connections.", [("", float(len(edge.conns)))])
    metric("edgeward_udp_sessions", "gauge", "Live UDP sessions (client address and port → upstream socket).",
           [("", float(edge.udp_count))])
    metric("edgeward_clients", "gauge", "Distinct client addresses with an open connection or a live UDP session.",
           [("", float(edge.distinct_clients()))])
    services: dict[str, dict[str, object]] = st["services"]  # type: ignore[assignment]
    for field, kind, help_ in (("active", "gauge", "Relayed connections open per service."),
                               ("total", "counter", "Relayed connections per service."),
                               ("bytes_in", "counter", "Bytes from clients per service."),
                               ("bytes_out", "counter", "Bytes to clients per service."),
                               ("udp_sessions", "gauge", "Live UDP sessions per service."),
                               ("datagrams_in", "counter", "UDP datagrams from clients per service."),
                               ("datagrams_out", "counter", "UDP datagrams to clients per service.")):
        suffix = "_total" if kind == "counter" else ""
        metric(f"edgeward_service_{field}{suffix}", kind, help_,
               [(_labels(service=n), float(v[field])) for n, v in services.items()])  # type: ignore[arg-type]
    metric("edgeward_service_udp_sessions_total", "counter", "UDP sessions opened per service.",
           [(_labels(service=n), float(v["udp_sessions_total"])) for n, v in services.items()])  # type: ignore[arg-type]
    pools: dict[str, dict[str, object]] = st["pools"]  # type: ignore[assignment]
    rows_up, rows_active, rows_udp, rows_in, rows_out = [], [], [], [], []
    for pname, p in pools.items():
        for s in p["servers"]:  # type: ignore[attr-defined]
            lab = _labels(pool=pname, server=s["server"])
            rows_up.append((lab, 1.0 if s["available"] else 0.0))
            rows_active.append((lab, float(s["active"])))
            rows_udp.append((lab, float(s["udp_sessions"])))
            rows_in.append((lab, float(s["bytes_in"])))
            rows_out.append((lab, float(s["bytes_out"])))
    metric("edgeward_server_up", "gauge", "1 if the server takes new connections.", rows_up)
    metric("edgeward_server_active", "gauge", "Open connections per server.", rows_active)
    metric("edgeward_server_udp_sessions", "gauge", "Live UDP sessions per server.", rows_udp)
    metric("edgeward_server_bytes_in_total", "counter", "Bytes from clients per server.", rows_in)
    metric("edgeward_server_bytes_out_total", "counter", "Bytes to clients per server.", rows_out)
    by_name: dict[str, list[tuple[str, float]]] = {}
    for key, value in edge.counters.items():
        name = key[0]
        rest = key[1:]
        labels = _labels(**{f"l{i}" if i else "where": v for i, v in enumerate(rest)}) if rest else ""
        if name == "refused" and len(rest) == 2:
            labels = _labels(listener=rest[0], reason=rest[1])
        elif name == "protocol_errors" and len(rest) == 2:
            labels = _labels(listener=rest[0], kind=rest[1])
        elif name in ("closed", "udp_dropped") and len(rest) == 2:
            labels = _labels(listener=rest[0], reason=rest[1])
        by_name.setdefault(name, []).append((labels, float(value)))
    for name, rows in sorted(by_name.items()):
        metric(f"edgeward_{name}_total", "counter", f"Count of {name.replace('_', ' ')} events.", rows)
    return "\n".join(out) + "\n"
