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

from ..stats import FAMILIES

# Prometheus naming: units in names (bytes, datagrams), counters end in _total (added by
# CounterMetricFamily); labels are service, pool, server, listener: never a client address, so the
# number of series is bounded by the config, not by the traffic.
_SERVICE_GAUGES = (("active", "open_connections", "Relayed TCP connections open per service."),
                   ("udp_sessions", "udp_sessions", "Live UDP sessions per service."),
                   ("clients", "clients", "Distinct client addresses with a live connection or UDP session, per service."))
_SERVICE_COUNTERS = (("total", "connections", "Relayed connections per service."),
                     ("bytes_in", "received_bytes", "Bytes from clients per service (ended and live connections)."),
                     ("bytes_out", "sent_bytes", "Bytes to clients per service (ended and live connections)."),
                     ("udp_sessions_total", "udp_sessions", "UDP sessions opened per service."),
                     ("datagrams_in", "received_datagrams", "UDP datagrams from clients per service."),
                     ("datagrams_out", "sent_datagrams", "UDP datagrams to clients per service."),
                     ("requests", "http_requests", "HTTP requests per service."))
_SERVER_GAUGES = (("active", "open_connections", "Relayed TCP connections open per server."),
                  ("udp_sessions", "udp_sessions", "Live UDP sessions per server."),
                  ("clients", "clients", "Distinct client addresses with a live connection or UDP session, per server."))
_SERVER_COUNTERS = (("total", "connections", "Relayed connections per server."),
                    ("bytes_in", "received_bytes", "Bytes from clients per server (ended and live connections)."),
                    ("bytes_out", "sent_bytes", "Bytes to clients per server (ended and live connections)."))


class EdgeCollector(Collector):
    """Metrics from one read of the status (status.read_status: with workers, their sum)."""

    def __init__(self, st: dict[str, Any]) -> None:
        self.st = st

    def collect(self) -> Iterator[Metric]:
        st = self.st
        yield GaugeMetricFamily("edgeward_connections", "Open TCP connections.", value=st["connections"])
        yield GaugeMetricFamily("edgeward_udp_sessions", "Live UDP sessions (client address and port → upstream socket).",
                                value=st["udp_sessions"])
        yield GaugeMetricFamily("edgeward_clients",
                                "Distinct client addresses with an open connection or a live UDP session.",
                                value=st["clients"])
        lst = GaugeMetricFamily("edgeward_listener_open_connections",
                                "Open TCP connections (UDP listeners: live sessions) per listening address.",
                                labels=["listener", "transport", "address"])
        for row in st.get("listeners", ()):
            lst.add_metric([row["name"], row["transport"], row["address"]], row["active"])
        yield lst
        services: dict[str, dict[str, int]] = st["services"]
        for field, metric, help_ in _SERVICE_GAUGES:
            g = GaugeMetricFamily(f"edgeward_service_{metric}", help_, labels=["service"])
            for name, v in services.items():
                g.add_metric([name], v[field])
            yield g
        for field, metric, help_ in _SERVICE_COUNTERS:
            c = CounterMetricFamily(f"edgeward_service_{metric}", help_, labels=["service"])
            for name, v in services.items():
                c.add_metric([name], v[field])
            yield c
        pools: dict[str, dict[str, Any]] = st["pools"]
        g = GaugeMetricFamily("edgeward_pool_clients", "Distinct client addresses with a live connection or UDP "
                              "session, per pool.", labels=["pool"])
        for pname, p in pools.items():
            g.add_metric([pname], p["clients"])
        yield g
        server_rows = [(pname, s) for pname, p in pools.items() for s in p["servers"]]
        up = GaugeMetricFamily("edgeward_server_up", "1 if the server takes new connections.", labels=["pool", "server"])
        healthy = GaugeMetricFamily("edgeward_server_healthy", "1 if the server passes its active health check.",
                                    labels=["pool", "server"])
        for pname, s in server_rows:
            up.add_metric([pname, s["server"]], 1.0 if s["available"] else 0.0)
            healthy.add_metric([pname, s["server"]], 1.0 if s["healthy"] else 0.0)
        yield from (up, healthy)
        for field, metric, help_ in _SERVER_GAUGES:
            g = GaugeMetricFamily(f"edgeward_server_{metric}", help_, labels=["pool", "server"])
            for pname, s in server_rows:
                g.add_metric([pname, s["server"]], s[field])
            yield g
        for field, metric, help_ in _SERVER_COUNTERS:
            c = CounterMetricFamily(f"edgeward_server_{metric}", help_, labels=["pool", "server"])
            for pname, s in server_rows:
                c.add_metric([pname, s["server"]], s[field])
            yield c
        by_family: dict[str, list[tuple[list[str], int]]] = {f: [] for f in FAMILIES}
        for row in st.get("counters", ()):
            family, *labels = row["key"]
            if family in by_family:
                by_family[family].append((labels, row["value"]))
        for family, (labels, help_) in FAMILIES.items():
            c = CounterMetricFamily(f"edgeward_{family}", help_, labels=list(labels))
            for key, n in by_family[family]:
                c.add_metric(key, n)
            yield c
        guard = st.get("guard")
        if isinstance(guard, dict):
            yield from _guard_links(guard)
        workers = st.get("workers")
        if isinstance(workers, dict):  # [edge] workers > 1
            yield GaugeMetricFamily("edgeward_workers", "Worker processes running (workers = N).",
                                    value=workers.get("alive", 0))
            r = CounterMetricFamily("edgeward_worker_restarts", "Worker processes that died and were restarted.",
                                    labels=["worker"])
            c = CounterMetricFamily("edgeward_worker_connections", "Connections and UDP sessions each worker relayed.",
                                    labels=["worker"])
            for w in workers.get("processes", ()):
                r.add_metric([str(w["index"])], w["restarts"])
                c.add_metric([str(w["index"])], w["total"])
            yield from (r, c)


def _guard_links(guard: dict[str, Any]) -> Iterator[Metric]:
    """The guard's links to other nodes ([guard.share], Redis) and to CrowdSec ([guard.crowdsec]), when
    configured: what an alert on "bans are no longer shared" or "the LAPI is unreachable" needs."""
    share = guard.get("share")
    if isinstance(share, dict):
        yield GaugeMetricFamily("edgeward_share_connected", "1 while the link to Redis ([guard.share]) is up.",
                                value=1.0 if share["connected"] else 0.0)
        yield CounterMetricFamily("edgeward_share_failures", "Failed or lost connections to Redis.",
                                  value=share["failures"])
        for direction in ("sent", "received"):
            c = CounterMetricFamily(f"edgeward_share_{direction}", f"Bans and unbans {direction} through Redis.",
                                    labels=["kind"])
            for kind in ("bans", "unbans"):
                c.add_metric([kind[:-1]], share[direction][kind])
            yield c
    cs = guard.get("crowdsec")
    if isinstance(cs, dict):
        yield GaugeMetricFamily("edgeward_crowdsec_connected", "1 while the CrowdSec LAPI answers the decision stream.",
                                value=1.0 if cs["connected"] else 0.0)
        yield GaugeMetricFamily("edgeward_crowdsec_decisions", "CrowdSec ban decisions in force (addresses and ranges).",
                                value=cs["decisions"])
        c = CounterMetricFamily("edgeward_crowdsec_errors", "Failed LAPI requests, by kind.", labels=["kind"])
        for kind, n in sorted(cs.get("errors_by_kind", {}).items()):
            c.add_metric([kind], n)
        yield c


def render_metrics(st: dict[str, Any]) -> bytes:
    """The Prometheus text of a status read with `full=True` (its listeners and counters)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(st))
    return generate_latest(registry)
