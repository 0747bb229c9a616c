"""Prometheus exposition of the edge's state, rendered at scrape time.

A `prometheus_client` custom collector reads the edge's plain counters and its
status when scraped: the library owns the text format, and the data plane pays
only plain integer increments (no metric objects, no locks).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..edge import Edge
from ..stats import FAMILIES
from ..status import edge_status

_SERVICE_GAUGES = (("active", "Relayed connections open per service."),
                   ("udp_sessions", "Live UDP sessions per service."))
_SERVICE_COUNTERS = (("total", "connections", "Relayed connections per service."),
                     ("bytes_in", "bytes_in", "Bytes from clients per service."),
                     ("bytes_out", "bytes_out", "Bytes to clients per service."),
                     ("udp_sessions_total", "udp_sessions", "UDP sessions opened per service."),
                     ("datagrams_in", "datagrams_in", "UDP datagrams from clients per service."),
                     ("datagrams_out", "datagrams_out", "UDP datagrams to clients per service."))


class EdgeCollector(Collector):
    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def collect(self) -> Iterator[Metric]:
        st: dict[str, Any] = edge_status(self.edge)
        yield GaugeMetricFamily("edgeward_connections", "Open TCP connections.", value=st["connections"])
        yield GaugeMetricFamily("edgeward_udp_sessions", "Live UDP sessions (client address and port → upstream socket).",
                                value=st["udp_sessions"])
        yield GaugeMetricFamily("edgeward_clients",
                                "Distinct client addresses with an open connection or a live UDP session.",
                                value=st["clients"])
        services: dict[str, dict[str, int]] = st["services"]
        for field, help_ in _SERVICE_GAUGES:
            g = GaugeMetricFamily(f"edgeward_service_{field}", help_, labels=["service"])
            for name, v in services.items():
                g.add_metric([name], v[field])
            yield g
        for field, metric, help_ in _SERVICE_COUNTERS:
            c = CounterMetricFamily(f"edgeward_service_{metric}", help_, labels=["service"])
            for name, v in services.items():
                c.add_metric([name], v[field])
            yield c
        server_rows = [(pname, s) for pname, p in st["pools"].items() for s in p["servers"]]
        up = GaugeMetricFamily("edgeward_server_up", "1 if the server takes new connections.", labels=["pool", "server"])
        active = GaugeMetricFamily("edgeward_server_active", "Open connections per server.", labels=["pool", "server"])
        udp = GaugeMetricFamily("edgeward_server_udp_sessions", "Live UDP sessions per server.", labels=["pool", "server"])
        bin_ = CounterMetricFamily("edgeward_server_bytes_in", "Bytes from clients per server.", labels=["pool", "server"])
        bout = CounterMetricFamily("edgeward_server_bytes_out", "Bytes to clients per server.", labels=["pool", "server"])
        for pname, s in server_rows:
            lab = [pname, s["server"]]
            up.add_metric(lab, 1.0 if s["available"] else 0.0)
            active.add_metric(lab, s["active"])
            udp.add_metric(lab, s["udp_sessions"])
            bin_.add_metric(lab, s["bytes_in"])
            bout.add_metric(lab, s["bytes_out"])
        yield from (up, active, udp, bin_, bout)
        for family, (labels, help_) in FAMILIES.items():
            c = CounterMetricFamily(f"edgeward_{family}", help_, labels=list(labels))
            for key, n in sorted(self.edge.counters.families[family].items()):
                c.add_metric(list(key), n)
            yield c


def render_metrics(edge: Edge) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(edge))
    return generate_latest(registry)
