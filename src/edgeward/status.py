"""What `edgeward status` and `/metrics` show: the edge's state as one JSON-able dict.

Ended connections' traffic is in the per-service and per-server totals; the
bytes of live ones are added here, at read time, so the relay never updates a
shared counter per chunk.
"""

from __future__ import annotations

import time
from collections import defaultdict

from . import __version__
from .edge import Edge


def edge_status(edge: Edge) -> dict[str, object]:
    plane = edge.plane
    live_in: dict[str, int] = defaultdict(int)
    live_out: dict[str, int] = defaultdict(int)
    live_srv: dict[int, tuple[int, int]] = {}
    for c in plane.conns:
        if c.flows is not None and c.route is not None:
            bi, bo = c.flows[0].nbytes, c.flows[1].nbytes
            live_in[c.route.service] += bi
            live_out[c.route.service] += bo
            if c.server is not None:
                a, b = live_srv.get(id(c.server), (0, 0))
                live_srv[id(c.server)] = (a + bi, b + bo)
    live_dg: dict[str, tuple[int, int]] = {}
    for ulst in edge.udp_listeners.values():
        for u in ulst.sessions.values():
            svc = u.route.service
            live_in[svc] += u.bytes_in
            live_out[svc] += u.bytes_out
            di, do = live_dg.get(svc, (0, 0))
            live_dg[svc] = (di + u.dgrams_in, do + u.dgrams_out)
            a, b = live_srv.get(id(u.server), (0, 0))
            live_srv[id(u.server)] = (a + u.bytes_in, b + u.bytes_out)
    services = {}
    for r in edge.runtime.routes:
        st = edge.stats.services[r.service]
        di, do = live_dg.get(r.service, (0, 0))
        pool = r.action.pool
        services[r.service] = {"active": st.active, "total": st.total, "bytes_in": st.bytes_in + live_in[r.service],
                               "bytes_out": st.bytes_out + live_out[r.service],
                               "pool": pool.name if pool is not None else "", "action": r.action.kind,
                               "udp_sessions": st.udp_active, "udp_sessions_total": st.udp_total,
                               "requests": st.requests,
                               "datagrams_in": st.dgrams_in + di, "datagrams_out": st.dgrams_out + do}
    pools = {}
    now = time.monotonic()
    for name, p in edge.runtime.pools.items():
        pools[name] = {"balance": p.balance, "servers": [
            {"server": s.name, "healthy": s.healthy, "available": s.available(now), "drain": s.drain,
             "weight": s.weight, "active": s.active, "total": s.total, "udp_sessions": s.udp_sessions,
             "bytes_in": s.bytes_in + live_srv.get(id(s), (0, 0))[0],
             "bytes_out": s.bytes_out + live_srv.get(id(s), (0, 0))[1]}
            for s in p.servers]}
    pipes = plane.pipes
    listeners = sorted([(k, t.name, t.active) for k, t in edge.listeners.items()]
                       + [(k, u.name, u.active) for k, u in edge.udp_listeners.items()])
    adm = plane.admission
    return {
        "version": __version__, "uptime": round(time.time() - edge.started_at, 1),
        "connections": adm.tcp_count, "udp_sessions": adm.udp_count, "clients": adm.distinct_clients(),
        "reloads": edge.reloads,
        "nofile": {"soft": edge.nofile[0], "hard": edge.nofile[1]}, "splice": plane.splice,
        "pipes": {"pooled": len(pipes.free), "in_use": pipes.created - len(pipes.free)},
        "listeners": [{"address": f"{k[1]}:{k[2]}", "transport": k[0], "name": name, "active": active}
                      for k, name, active in listeners],
        "services": services, "pools": pools,
        "counters": [{"key": [family, *labels], "value": v} for family, labels, v in edge.counters.rows()],
        **{name: fn() for name, fn in edge.extra_status.items()},
    }
