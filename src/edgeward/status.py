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


# ---------------------------------------------------------------------- workers = N
# With workers, the master's own edge is the control plane (config, health, guard); the numbers
# of the data plane are each worker's (`plane_report`), added up here. Distinct clients are
# counted once across workers: each worker sends its client addresses, and the master counts
# the union.
_SERVICE_SUMS = ("active", "total", "bytes_in", "bytes_out", "in_rate", "out_rate", "udp_sessions",
                 "udp_sessions_total", "requests", "datagrams_in", "datagrams_out")
_SERVER_SUMS = ("active", "total", "udp_sessions", "bytes_in", "bytes_out", "in_rate", "out_rate")
CONTROL_FAMILIES = frozenset({"reloads"})  # counted by the master; every other family by the workers


def plane_report(edge: Edge, monitor: Monitor | None, full: bool) -> dict[str, Any]:
    """A worker's state for the master: `edge_status` and the client addresses behind its counts."""
    st: dict[str, Any] = edge_status(edge, monitor, True)
    adm = edge.plane.admission
    presence = edge.presence
    st["addresses"] = {
        "all": sorted(set(adm.tcp.by_ip) | set(adm.udp.by_ip)),
        "services": {k: list(v) for k, v in presence.by_service.items() if v},
        "pools": {k: list(v) for k, v in presence.by_pool.items() if v},
        "servers": {k: list(v) for k, v in presence.by_server.items() if v},
    }
    return st


def merge_reports(control: dict[str, Any], reports: list[dict[str, Any]], full: bool) -> dict[str, Any]:
    """The master's status (control plane) with the workers' data planes added up."""
    out = dict(control)

    def union(part: str, key: str | None = None) -> int:
        seen: set[str] = set()
        for r in reports:
            a = r.get("addresses", {})
            seen.update(a.get(part, ()) if key is None else a.get(part, {}).get(key, ()))
        return len(seen)

    for k in ("connections", "udp_sessions", "in_rate", "out_rate"):
        out[k] = sum(r.get(k, 0) for r in reports)
    out["clients"] = union("all")
    services = {}
    for name, svc in control.get("services", {}).items():
        s = dict(svc)
        for k in _SERVICE_SUMS:
            s[k] = sum(r.get("services", {}).get(name, {}).get(k, 0) for r in reports)
        s["clients"] = union("services", name)
        services[name] = s
    out["services"] = services
    pools = {}
    for pname, pool in control.get("pools", {}).items():
        servers = []
        for srv in pool["servers"]:
            s = dict(srv)
            theirs = [x for r in reports for x in r.get("pools", {}).get(pname, {}).get("servers", ())
                      if x.get("server") == srv["server"]]
            for k in _SERVER_SUMS:
                s[k] = sum(x.get(k, 0) for x in theirs)
            # Passive health is each worker's: a server one worker marked down is shown down.
            s["available"] = bool(srv["available"]) and all(x.get("available", True) for x in theirs)
            s["clients"] = union("servers", f"{pname}/{srv['server']}")
            servers.append(s)
        pools[pname] = {**pool, "servers": servers, "clients": union("pools", pname),
                        "active": sum(s["active"] for s in servers),
                        "udp_sessions": sum(s["udp_sessions"] for s in servers)}
    out["pools"] = pools
    if not full:
        return out
    listeners: dict[tuple[str, str], dict[str, Any]] = {}
    for r in reports:
        for lst in r.get("listeners", ()):
            cur = listeners.setdefault((lst["address"], lst["transport"]), {**lst, "active": 0})
            cur["active"] += lst["active"]
    out["listeners"] = [listeners[k] for k in sorted(listeners)]
    counters: dict[tuple[str, ...], int] = {}
    for c in control.get("counters", ()):
        if c["key"][0] in CONTROL_FAMILIES:
            counters[tuple(c["key"])] = c["value"]
    for r in reports:
        for c in r.get("counters", ()):
            if c["key"][0] not in CONTROL_FAMILIES:
                key = tuple(c["key"])
                counters[key] = counters.get(key, 0) + c["value"]
    out["counters"] = [{"key": list(k), "value": v} for k, v in sorted(counters.items())]
    out["pipes"] = {k: sum(r.get("pipes", {}).get(k, 0) for r in reports) for k in ("pooled", "in_use")}
    live = [r for r in reports if not r.get("retired")]
    out["splice"] = all(r.get("splice", False) for r in live) if live else control.get("splice")
    per_worker = []
    for r in reports:
        if r.get("retired"):  # the totals of workers that died: in the sums above, not a process
            continue
        w = r.get("worker", {})
        per_worker.append({
            "index": w.get("index"), "pid": w.get("pid"), "restarts": w.get("restarts", 0), "hung": w.get("hung", 0),
            "stale": bool(r.get("stale")),  # no answer in time: its previous report
            "uptime": r.get("uptime"), "connections": r.get("connections", 0), "udp_sessions": r.get("udp_sessions", 0),
            "clients": r.get("clients", 0),
            "total": sum(s.get("total", 0) + s.get("udp_sessions_total", 0) for s in r.get("services", {}).values()),
            "requests": sum(s.get("requests", 0) for s in r.get("services", {}).values()),
            "refused": sum(c["value"] for c in r.get("counters", ()) if c["key"][0] == "refused"),
            "reloads": r.get("reloads", 0), "rss_kib": r.get("memory", {}).get("rss_kib", 0),
            "propagation_ms": r.get("propagation_ms", {}),
            "dropped_reports": r.get("dropped_reports", 0),  # not heard by the jails: the master did not read
        })
    workers = dict(out.get("workers") or {})
    workers["processes"] = per_worker
    out["workers"] = workers
    return out


async def read_status(edge: Edge, monitor: Monitor | None = None, full: bool = True) -> dict[str, Any]:
    """`edge_status`, with the workers' data planes added when there are workers."""
    reports = await edge.plane_reports(full)
    st: dict[str, Any] = edge_status(edge, monitor, full)
    return st if reports is None else merge_reports(st, reports, full)


async def read_clients(edge: Edge, service: str | None, address: str | None, limit: int) -> dict[str, Any]:
    """`live_clients` with the distinct addresses and their counts (of every worker, when there are workers)."""
    parts = await edge.plane_clients(service, address, limit)
    if parts is None:
        out = live_clients(edge, service, address, limit)
        addresses = edge.presence.addresses(service)
    else:
        rows = sorted((c for p in parts for c in p["clients"]), key=lambda c: c["since"])
        out = {"matched": sum(p["matched"] for p in parts), "clients": rows[:max(0, min(limit, MAX_CLIENTS_LISTED))]}
        addresses = {}
        for p in parts:
            for ip, n in p["addresses"].items():
                addresses[ip] = addresses.get(ip, 0) + n
    if address is not None:
        addresses = {address: addresses[address]} if address in addresses else {}
    out["addresses"] = dict(sorted(addresses.items())[:max(0, limit)])
    out["distinct"] = len(addresses)
    return out
