"""What `edgeward status`, `top`, the dashboard and `/metrics` show: the edge's state as one JSON-able dict.

Counts (connections, UDP sessions, distinct clients per service, pool and
server) are read from counters kept on the open/close events. Byte totals are
exact at the read (monitor.traffic: ended connections' totals plus the live
ones'), throughput is the monitor's, from its last two samples.
"""

from __future__ import annotations

import time
from typing import Any

from . import __version__
from .edge import Edge
from .monitor import Monitor, traffic

MAX_CLIENTS_LISTED = 10_000


def edge_status(edge: Edge, monitor: Monitor | None = None, full: bool = True) -> dict[str, object]:
    """The state; `full=False` leaves out the counters and the parts plugged in (guard, web), which
    the dashboard's once-a-second view and `/metrics` do not show from here."""
    mon = monitor
    if mon is not None:
        mon.watch()
    tr = traffic(edge)  # exact totals now; throughput is the monitor's, over its last interval
    plane = edge.plane
    presence = edge.presence
    services = {}
    for r in edge.runtime.routes:
        st = edge.stats.services[r.service]
        bi, bo, di, do = tr.services.get(r.service, (0, 0, 0, 0))
        rin, rout = mon.service_rates(r.service) if mon is not None else (0.0, 0.0)
        pool = r.action.pool
        services[r.service] = {"active": st.active, "total": st.total, "bytes_in": bi, "bytes_out": bo,
                               "clients": presence.service_clients(r.service),
                               "in_rate": rin, "out_rate": rout,
                               "pool": pool.name if pool is not None else "", "action": r.action.kind,
                               "udp_sessions": st.udp_active, "udp_sessions_total": st.udp_total,
                               "requests": st.requests, "datagrams_in": di, "datagrams_out": do}
    pools = {}
    now = time.monotonic()
    for name, p in edge.runtime.pools.items():
        servers = []
        for s in p.servers:
            sbi, sbo = tr.servers.get(id(s), (s.bytes_in, s.bytes_out))
            rin, rout = mon.server_rates(s) if mon is not None else (0.0, 0.0)
            servers.append({"server": s.name, "healthy": s.healthy, "available": s.available(now), "drain": s.drain,
                            "weight": s.weight, "active": s.active, "total": s.total, "udp_sessions": s.udp_sessions,
                            "clients": presence.server_clients(name, s.name), "bytes_in": sbi, "bytes_out": sbo,
                            "in_rate": rin, "out_rate": rout})
        pools[name] = {"balance": p.balance, "clients": presence.pool_clients(name),
                       "active": sum(s["active"] for s in servers),  # type: ignore[misc]
                       "udp_sessions": sum(s["udp_sessions"] for s in servers),  # type: ignore[misc]
                       "servers": servers}
    adm = plane.admission
    rin, rout = mon.total_rates() if mon is not None else (0.0, 0.0)
    out: dict[str, object] = {
        "version": __version__, "uptime": round(time.time() - edge.started_at, 1),
        "connections": adm.tcp_count, "udp_sessions": adm.udp_count, "clients": adm.distinct_clients(),
        "in_rate": rin, "out_rate": rout, "services": services, "pools": pools,
    }
    if not full:
        return out
    pipes = plane.pipes
    listeners = sorted([(k, t.name, t.active) for k, t in edge.listeners.items()]
                       + [(k, u.name, u.active) for k, u in edge.udp_listeners.items()])
    return {
        **out,
        "reloads": edge.reloads,
        "nofile": {"soft": edge.nofile[0], "hard": edge.nofile[1]}, "splice": plane.splice,
        "pipes": {"pooled": len(pipes.free), "in_use": pipes.created - len(pipes.free)},
        "listeners": [{"address": f"{k[1]}:{k[2]}", "transport": k[0], "name": name, "active": active}
                      for k, name, active in listeners],
        "counters": [{"key": [family, *labels], "value": v} for family, labels, v in edge.counters.rows()],
        **{name: fn() for name, fn in edge.extra_status.items()},
    }


def live_clients(edge: Edge, service: str | None = None, address: str | None = None,
                 limit: int = 100) -> dict[str, object]:
    """The live connections and UDP sessions (oldest first), of `service` and/or from `address`.

    With an address, only that address's entries are looked at (admission keeps them by address);
    otherwise every live connection is, which is what a listing costs. `matched` counts them all,
    `clients` lists at most `limit`."""
    plane = edge.plane
    loop_now = plane.loop.time()
    wall = time.time()
    adm = plane.admission
    if address is not None:
        tcp: list[Any] = list(adm.tcp.of(address))
        udp: list[Any] = list(adm.udp.of(address))
    else:
        tcp = list(plane.conns)
        udp = [u for ulst in edge.udp_listeners.values() for u in ulst.sessions.values()]
    rows: list[tuple[float, dict[str, object]]] = []
    for c in tcp:
        route = getattr(c, "route", None)
        flows = getattr(c, "flows", None)
        server = getattr(c, "server", None)
        if route is None or flows is None or server is None:  # not relaying (yet), or an HTTP client
            continue
        if service is not None and route.service != service:
            continue
        rows.append((c.t0, {"address": c.peer.ip, "port": c.peer.port, "transport": "tcp", "listener": c.listener.name,
                            "service": route.service, "upstream": server.name,
                            "since": round(wall - (loop_now - c.t0), 1), "bytes_in": flows[0].nbytes,
                            "bytes_out": flows[1].nbytes, "via_proxy": c.peer.via_proxy}))
    for u in udp:
        if service is not None and u.route.service != service:
            continue
        rows.append((u.t0, {"address": u.peer.ip, "port": u.peer.port, "transport": "udp", "listener": u.listener.name,
                            "service": u.route.service, "upstream": u.server.name,
                            "since": round(wall - (loop_now - u.t0), 1), "bytes_in": u.bytes_in,
                            "bytes_out": u.bytes_out, "via_proxy": u.peer.via_proxy}))
    rows.sort(key=lambda r: r[0])
    limit = max(0, min(limit, MAX_CLIENTS_LISTED))
    return {"matched": len(rows), "clients": [r for _, r in rows[:limit]]}
