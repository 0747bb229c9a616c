"""Traffic totals, current throughput and the last hour's history, for `status`, `top` and the dashboard.

The relay never updates a shared counter per chunk: ended connections' bytes are
in the per-service and per-server totals, and live ones are added by `traffic()`,
which walks the live connections and UDP sessions. That walk is the only work
proportional to the number of connections, so it runs only when sampled:

- every `step` seconds (10 s) for the history of the last hour (a bounded ring);
- every second while someone is looking (a `status` read, `top`, a dashboard's
  event stream called `watch()` in the last few seconds).

Throughput is the difference of the last two samples over their interval (bytes
per second), so a read never pays for the walk twice. Client and connection counts
come from counters kept on the open/close events (clients.py, stats.py), never from
the walk.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .edge import Edge


@dataclass(slots=True)
class Traffic:
    """Bytes (and datagrams) since start, ended and live, per service and per server."""

    t: float  # monotonic
    services: dict[str, list[int]] = field(default_factory=dict)  # service → [in, out, dgrams in, dgrams out]
    servers: dict[int, list[int]] = field(default_factory=dict)  # id(Server) → [in, out]
    total_in: int = 0
    total_out: int = 0


def traffic(edge: Edge) -> Traffic:
    """The totals now: ended connections' bytes plus those of every live connection and session."""
    tr = Traffic(time.monotonic())
    services = tr.services
    servers = tr.servers
    for name, st in edge.stats.services.items():
        services[name] = [st.bytes_in, st.bytes_out, st.dgrams_in, st.dgrams_out]
    for p in edge.runtime.pools.values():
        for s in p.servers:
            servers[id(s)] = [s.bytes_in, s.bytes_out]
    for c in edge.plane.conns:
        flows, route = c.flows, c.route
        if flows is not None and route is not None:
            bi, bo = flows[0].nbytes, flows[1].nbytes
            sv = services.get(route.service)
            if sv is None:
                sv = services[route.service] = [0, 0, 0, 0]
            sv[0] += bi
            sv[1] += bo
            srv = c.server
            if srv is not None:
                v = servers.get(id(srv))
                if v is not None:  # a server a reload removed: not shown any more
                    v[0] += bi
                    v[1] += bo
    for ulst in edge.udp_listeners.values():
        for u in ulst.sessions.values():
            sv = services.get(u.route.service)
            if sv is None:
                sv = services[u.route.service] = [0, 0, 0, 0]
            sv[0] += u.bytes_in
            sv[1] += u.bytes_out
            sv[2] += u.dgrams_in
            sv[3] += u.dgrams_out
            v = servers.get(id(u.server))
            if v is not None:
                v[0] += u.bytes_in
                v[1] += u.bytes_out
    tr.total_in = sum(v[0] for v in services.values())
    tr.total_out = sum(v[1] for v in services.values())
    return tr


def _rate(now: int, before: int, dt: float) -> float:
    return round(max(0, now - before) / dt, 1) if dt > 0 else 0.0


class Monitor:
    """Samples the edge's traffic (see the module docstring) and keeps the last hour's history."""

    WATCHED_FOR = 5.0  # seconds of 1 s sampling after the last look

    def __init__(self, edge: Edge, step: float = 10.0, span: float = 3600.0) -> None:
        self.edge = edge
        self.step = step
        self.history: deque[dict[str, Any]] = deque(maxlen=math.ceil(span / step))
        self.last: Traffic = traffic(edge)
        self.prev: Traffic | None = None
        self._watched_until = 0.0
        self._next_point = self.last.t + step
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        # With workers (workers/), this process relays nothing: history points are made from the
        # workers' summed state instead (set by the admin API).
        self.point_source: Callable[[], Awaitable[dict[str, Any]]] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def watch(self) -> None:
        """Someone is looking: sample every second for the next few seconds."""
        now = time.monotonic()
        was_idle = now >= self._watched_until
        self._watched_until = now + self.WATCHED_FOR
        if was_idle and self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            watched = time.monotonic() < self._watched_until
            delay = 1.0 if watched else max(0.05, self._next_point - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            if self.sample() and self.point_source is not None:
                self.history.append(await self.point_source())

    def sample(self) -> bool:
        """Take a sample now; add a history point when one is due (True: one was due)."""
        tr = traffic(self.edge)
        if tr.t - self.last.t < 0.2:  # a wake right after a sample: keep the longer interval
            return False
        self.prev, self.last = self.last, tr
        if tr.t >= self._next_point:
            self._next_point = tr.t + self.step
            if self.point_source is None:
                self.history.append(self.point())
            return True
        return False

    # ------------------------------------------------------------------ reads
    def _dt(self) -> float:
        return self.last.t - self.prev.t if self.prev is not None else 0.0

    def service_rates(self, service: str) -> tuple[float, float]:
        """(bytes/s in, bytes/s out) over the last sampling interval."""
        prev = self.prev
        if prev is None:
            return 0.0, 0.0
        now = self.last.services.get(service, (0, 0))
        before = prev.services.get(service, (0, 0))
        dt = self._dt()
        return _rate(now[0], before[0], dt), _rate(now[1], before[1], dt)

    def server_rates(self, server: object) -> tuple[float, float]:
        prev = self.prev
        if prev is None:
            return 0.0, 0.0
        now = self.last.servers.get(id(server), [0, 0])
        before = prev.servers.get(id(server), [0, 0])
        dt = self._dt()
        return _rate(now[0], before[0], dt), _rate(now[1], before[1], dt)

    def total_rates(self) -> tuple[float, float]:
        prev = self.prev
        if prev is None:
            return 0.0, 0.0
        dt = self._dt()
        return _rate(self.last.total_in, prev.total_in, dt), _rate(self.last.total_out, prev.total_out, dt)

    def point(self) -> dict[str, Any]:
        """One history point: counts now and throughput over the last interval."""
        edge = self.edge
        adm = edge.plane.admission
        rin, rout = self.total_rates()
        presence = edge.presence
        return {"time": round(time.time(), 1), "clients": adm.distinct_clients(), "connections": adm.tcp_count,
                "udp_sessions": adm.udp_count, "in_rate": rin, "out_rate": rout,
                "services": {r.service: presence.service_clients(r.service) for r in edge.runtime.routes}}
