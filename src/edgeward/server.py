"""The edge process: builds the runtime from a config, runs it, reloads it, drains it.

Control plane vs data plane: `build_runtime` turns a validated Config into
immutable route tables and pools (the only thing connections read); `Edge`
owns sockets, connections, counters, health checks and the admin API. A reload
builds a new runtime and swaps it into the listeners; connections keep the one
they started with, and unchanged listening sockets are kept open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import resource
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .config.loader import ConfigError, load, resolve_listen
from .config.schema import Config, ListenerSettings, PoolSettings
from .config.units import parse_target
from .guard.validate import config_problems
from .net.pipes import HAS_SPLICE, PipePool
from .net.tcp import TcpConn, TcpListener, listener_settings_summary, make_listen_socket
from .net.udp import UdpListener, UdpSession, make_udp_socket
from .routing import Route, RouteTable, make_route
from .upstream.health import HealthChecker
from .upstream.pool import Pool, Server

log = logging.getLogger("edgeward")

ListenerKey = tuple[str, str, int]


@dataclass(frozen=True, slots=True, eq=False)
class ListenerRuntime:
    """What a connection accepted on one port needs: its options and route table."""

    name: str
    settings: ListenerSettings
    table: RouteTable
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    _trust_cache: dict[str, bool] = field(default_factory=dict)

    def trusts(self, ip: str) -> bool:
        if not self.trusted:
            return False
        hit = self._trust_cache.get(ip)
        if hit is None:
            try:
                a = ipaddress.ip_address(ip)
                hit = any(a in n for n in self.trusted)
            except ValueError:
                hit = False
            if len(self._trust_cache) < 4096:
                self._trust_cache[ip] = hit
        return hit


@dataclass(frozen=True, slots=True, eq=False)
class Runtime:
    config: Config
    listeners: dict[ListenerKey, ListenerRuntime]
    pools: dict[str, Pool]
    routes: tuple[Route, ...]


def build_runtime(cfg: Config, previous: Runtime | None = None) -> Runtime:
    """Config → route tables and pools. Server objects of an unchanged pool member are reused,
    so health state and active counts survive a reload."""
    old: dict[tuple[str, str], Server] = {}
    if previous is not None:
        for pname, p in previous.pools.items():
            for s in p.servers:
                old[(pname, s.name)] = s

    def make_pool(pname: str, ps: PoolSettings) -> Pool:
        servers = []
        for item in ps.servers:
            address, weight, drain = (item, 1, False) if isinstance(item, str) else (item.address, item.weight, item.drain)
            t = parse_target(address)
            s = old.get((pname, str(t)))
            if s is None:
                s = Server(t)
            s.weight, s.drain = weight, drain
            servers.append(s)
        return Pool(pname, servers, balance=ps.balance, connect_timeout=ps.connect_timeout, retries=ps.retries,
                    proxy_protocol=ps.proxy_protocol, failures_to_down=ps.passive.failures,
                    down_for=ps.passive.down_for, health=ps.health)

    pools = {name: make_pool(name, ps) for name, ps in cfg.pools.items()}
    listener_routes: dict[ListenerKey, list[Route]] = defaultdict(list)
    listener_settings: dict[ListenerKey, tuple[str, ListenerSettings]] = {}
    all_routes = []
    for sname, svc in cfg.services.items():
        if svc.to in pools:
            pool = pools[svc.to]
        else:
            # An address target is a pool of one, named after the service.
            pool = make_pool(f"service:{sname}", PoolSettings(servers=[svc.to]))  # type: ignore[call-arg]
            pools[pool.name] = pool
        proxy = svc.proxy_protocol or pool.proxy_protocol
        timeout = svc.connect_timeout or pool.connect_timeout
        route = make_route(sname, pool, proxy, timeout, svc.names, svc.protocol, svc.alpn, svc.source)
        all_routes.append(route)
        for item in svc.listen:
            settings = cfg.listeners.get(item)
            for spec in resolve_listen(cfg, item):
                for port in spec.ports():
                    key: ListenerKey = (spec.transport, spec.host, port)
                    listener_routes[key].append(route)
                    if key not in listener_settings:
                        lname = item if settings is not None else str(spec)
                        listener_settings[key] = (lname, settings or ListenerSettings(bind=[item]))  # type: ignore[call-arg]
    listeners = {}
    for key, routes in listener_routes.items():
        lname, ls = listener_settings[key]
        trusted = tuple(ipaddress.ip_network(c, strict=False) for c in ls.trusted_proxies)
        listeners[key] = ListenerRuntime(lname, ls, RouteTable(routes), trusted)
    return Runtime(cfg, listeners, pools, tuple(all_routes))


class BanCheck(Protocol):
    def is_banned(self, addr: str, listener: str | None = None) -> bool: ...


class EventSink(Protocol):
    def report(self, host: str, kind: str, detail: str) -> None: ...


@dataclass(slots=True)
class ServiceStats:
    active: int = 0
    total: int = 0
    bytes_in: int = 0  # client → upstream (TCP and UDP payload)
    bytes_out: int = 0  # upstream → client
    udp_active: int = 0  # live UDP sessions
    udp_total: int = 0
    dgrams_in: int = 0
    dgrams_out: int = 0


def raise_nofile(want: int | str) -> tuple[int, int]:
    """Raise the open-files soft limit (to the hard limit for "max"); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want == "max" else int(want)
    if hard != resource.RLIM_INFINITY and target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target, target
        except (ValueError, OSError):
            log.warning("cannot raise the open-files hard limit from %d to %d (needs root); using %d", hard, target, hard)
            target = hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit to %d: %s", target, e)
    return soft, hard


class Edge:
    """The running edge (one process)."""

    def __init__(self, config_path: str | None, cfg: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config_path = config_path
        self.loop = loop or asyncio.get_event_loop()
        self.runtime = build_runtime(cfg)
        self.listeners: dict[ListenerKey, TcpListener] = {}
        self.udp_listeners: dict[ListenerKey, UdpListener] = {}
        self.udp_by_ip: dict[str, set[UdpSession]] = {}
        self.udp_count = 0
        self.conns: set[TcpConn] = set()
        self.by_ip: dict[str, set[TcpConn]] = {}
        self.counters: dict[tuple[str, ...], int] = defaultdict(int)
        self.service_stats: dict[str, ServiceStats] = defaultdict(ServiceStats)
        self.splice = HAS_SPLICE and cfg.edge.splice
        self.pipes = PipePool()
        self.now = time.monotonic()
        self.clock: Callable[[], float] = time.monotonic
        self.draining = False
        self.bans: BanCheck | None = None
        self.events: EventSink | None = None
        self.health = HealthChecker(list(self.runtime.pools.values()))
        self.nofile: tuple[int, int] = (0, 0)
        self.started_at = time.time()
        self.reloads = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.admin: object | None = None
        # Parts plugged in at start (the guard) add their own sections to `status()`.
        self.extra_status: dict[str, Callable[[], object]] = {}
        self.report_connections = False  # set when a jail counts every connection (edge:conn)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.nofile = raise_nofile(self.runtime.config.edge.nofile)
        log.info("open-files limit: soft %d, hard %d", *self.nofile)
        self._open_listeners(self.runtime)
        self._resume_all()
        self.health.start()
        self._sweeper = self.loop.create_task(self._sweep())
        log.info("edgeward started: %d TCP and %d UDP listeners, splice=%s", len(self.listeners),
                 len(self.udp_listeners), self.splice)

    def _resume_all(self) -> None:
        for lst in self.listeners.values():
            lst.resume()
        for ulst in self.udp_listeners.values():
            ulst.resume()

    def _open_listeners(self, rt: Runtime) -> None:
        """Bind what is new, keep what is unchanged, close what is gone. All-or-nothing on bind errors."""
        opened: dict[ListenerKey, TcpListener] = {}
        opened_udp: dict[ListenerKey, UdpListener] = {}
        try:
            for key, lrt in rt.listeners.items():
                transport, host, port = key
                if transport == "udp":
                    ucur = self.udp_listeners.get(key)
                    if ucur is None:
                        opened_udp[key] = UdpListener(self, host, port, lrt,
                                                      make_udp_socket(host, port, lrt.settings.reuseport))
                    elif ucur.rt.settings.reuseport != lrt.settings.reuseport:
                        # A new SO_REUSEPORT setting needs a new socket on the same port; sessions stay.
                        try:
                            ucur.rebind(functools.partial(make_udp_socket, host, port, lrt.settings.reuseport))
                        except OSError:
                            ucur.close()
                            del self.udp_listeners[key]
                            raise
                    continue
                cur = self.listeners.get(key)
                if cur is not None:
                    if listener_settings_summary(cur.rt.settings) == listener_settings_summary(lrt.settings):
                        continue
                    # Options changed: a new socket needs the port, so close and rebind.
                    cur.close()
                    del self.listeners[key]
                sock = make_listen_socket(host, port, lrt.settings.backlog, lrt.settings.reuseport)
                opened[key] = TcpListener(self, host, port, lrt, sock)
        except OSError as e:
            for lst in opened.values():
                lst.close()
            for ulst in opened_udp.values():
                ulst.close()
            raise ConfigError([]) from _bind_error(e)
        for key, lst in list(self.listeners.items()):
            if key not in rt.listeners:
                lst.close()
                del self.listeners[key]
            else:
                lst.rt = rt.listeners[key]
                lst.name = lst.rt.name
        for key, ulst in list(self.udp_listeners.items()):
            if key not in rt.listeners:
                ulst.close()  # its sessions end: their replies could not reach the clients any more
                del self.udp_listeners[key]
            else:
                ulst.rt = rt.listeners[key]  # new sessions use the new runtime; live ones keep theirs
                ulst.name = ulst.rt.name
        self.listeners.update(opened)
        self.udp_listeners.update(opened_udp)

    def reload(self) -> bool:
        """Re-read the config; on any error keep the running one. Returns True if applied."""
        if self.config_path is None:
            return False
        try:
            cfg = load(self.config_path, checks=(config_problems,))
            rt = build_runtime(cfg, self.runtime)
            self._open_listeners(rt)
        except ConfigError as e:
            cause = e.__cause__
            log.error("reload rejected, keeping the running config:\n%s", cause or e)
            self.count("reloads", "rejected")
            return False
        except OSError as e:
            log.error("reload rejected, keeping the running config: %s", e)
            self.count("reloads", "rejected")
            return False
        old_health = self.health
        self.runtime = rt
        self.splice = HAS_SPLICE and cfg.edge.splice
        self.health = HealthChecker(list(rt.pools.values()))
        self.loop.create_task(old_health.stop())
        self.health.start()
        if not self.draining:
            self._resume_all()
        self.reloads += 1
        self.count("reloads", "applied")
        log.info("reloaded %s: %d TCP and %d UDP listeners", self.config_path, len(self.listeners),
                 len(self.udp_listeners))
        return True

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; let connections finish up to the drain timeout; then close the rest.

        UDP listeners stay open while TCP connections drain, forwarding for the sessions they
        have (`draining` refuses new ones); they close with everything else at the end."""
        self.draining = True
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()
        limit = self.runtime.config.edge.drain_timeout if timeout is None else timeout
        deadline = self.loop.time() + limit
        while self.conns and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.conns:
            log.info("drain timeout: closing %d connections", len(self.conns))
        for c in list(self.conns):
            c.close("drain")
        await self.stop()

    async def stop(self) -> None:
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()
        for ulst in self.udp_listeners.values():
            ulst.close("stop")
        self.udp_listeners.clear()
        for c in list(self.conns):
            c.close("stop")
        await self.health.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.pipes.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signals(self) -> None:
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.loop.add_signal_handler(signal.SIGTERM, lambda: self.loop.create_task(self.drain()))
        self.loop.add_signal_handler(signal.SIGINT, lambda: self.loop.create_task(self.drain(0)))

    async def _sweep(self) -> None:
        """Once a second: refresh the coarse clock connections stamp activity with; close idle ones."""
        while True:
            await asyncio.sleep(1.0)
            self.now = now = time.monotonic()
            for c in [c for c in self.conns if now - c.last > c.rt.settings.idle_timeout]:
                self.count("closed", c.listener.name, "idle_timeout" if c.flows else "sniff_stalled")
                c.close("idle")
            if self.udp_count:
                for ulst in list(self.udp_listeners.values()):
                    if ulst.sessions:
                        ulst.sweep(now)

    # ------------------------------------------------------------------ data plane hooks
    def admit(self, listener: TcpListener, sock: socket.socket, peer: tuple[str, int] | tuple[str, int, int, int]) -> None:
        ip = peer[0] if isinstance(peer, tuple) else "0.0.0.0"
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        port = peer[1] if isinstance(peer, tuple) else 0
        reason = self._refusal(listener, ip)
        if reason is not None:
            self.count("refused", listener.name, reason)
            sock.close()
            return
        sock.setblocking(False)
        if self.report_connections and self.events is not None:
            self.events.report(ip, "conn", listener.name)
        conn = TcpConn(self, listener, sock, ip, port)
        self._register(conn)
        conn.start()

    def _refusal(self, listener: TcpListener, ip: str) -> str | None:
        if self.bans is not None and self.bans.is_banned(ip, listener.name):
            return "banned"
        edge = self.runtime.config.edge
        if len(self.conns) >= edge.max_connections:
            return "global_limit"
        lmax = listener.rt.settings.max_connections
        if lmax is not None and listener.active >= lmax:
            return "listener_limit"
        per = edge.max_connections_per_client
        if per:
            mine = self.by_ip.get(ip)
            if mine is not None and len(mine) >= per:
                return "client_limit"
        return None

    def _register(self, conn: TcpConn) -> None:
        self.conns.add(conn)
        conn.listener.active += 1
        s = self.by_ip.get(conn.client_ip)
        if s is None:
            s = self.by_ip[conn.client_ip] = set()
        s.add(conn)

    def _unregister_ip(self, conn: TcpConn) -> None:
        s = self.by_ip.get(conn.client_ip)
        if s is not None:
            s.discard(conn)
            if not s:
                del self.by_ip[conn.client_ip]

    def rebind_client(self, conn: TcpConn, ip: str, port: int) -> None:
        """A trusted PROXY header named the real client: account, limit and ban by it from now on."""
        self._unregister_ip(conn)
        conn.client_ip, conn.client_port = ip, port
        s = self.by_ip.setdefault(ip, set())
        s.add(conn)
        if self.bans is not None and self.bans.is_banned(ip, conn.listener.name):
            conn._fail("banned")
            return
        per = self.runtime.config.edge.max_connections_per_client
        if per and len(s) > per:
            conn._fail("client_limit")

    def started(self, conn: TcpConn) -> None:
        assert conn.route is not None
        st = self.service_stats[conn.route.service]
        st.active += 1
        st.total += 1

    def ended(self, conn: TcpConn, relayed: bool) -> None:
        self.conns.discard(conn)
        conn.listener.active -= 1
        self._unregister_ip(conn)
        if relayed and conn.route is not None:
            st = self.service_stats[conn.route.service]
            st.active -= 1
            if conn.flows is not None:
                bi, bo = conn.flows[0].nbytes, conn.flows[1].nbytes
                st.bytes_in += bi
                st.bytes_out += bo
                if conn.server is not None:
                    conn.server.bytes_in += bi
                    conn.server.bytes_out += bo

    # ------------------------------------------------------------------ UDP sessions
    def udp_refusal(self, listener: UdpListener, ip: str) -> str | None:
        """Why a datagram from `ip` may not open a session on `listener`, or None."""
        if self.draining:
            return "draining"
        if self.bans is not None and self.bans.is_banned(ip, listener.name):
            return "banned"
        edge = self.runtime.config.edge
        if self.udp_count >= edge.max_udp_sessions:
            return "udp_global_limit"
        lmax = listener.rt.settings.max_connections
        if lmax is not None and len(listener.sessions) >= lmax:
            return "listener_limit"
        per = edge.max_udp_sessions_per_client
        if per:
            mine = self.udp_by_ip.get(ip)
            if mine is not None and len(mine) >= per:
                return "udp_client_limit"
        return None

    def udp_started(self, s: UdpSession) -> None:
        self.udp_count += 1
        mine = self.udp_by_ip.get(s.client_ip)
        if mine is None:
            mine = self.udp_by_ip[s.client_ip] = set()
        mine.add(s)
        st = self.service_stats[s.route.service]
        st.udp_active += 1
        st.udp_total += 1
        s.server.udp_sessions += 1
        if self.report_connections and self.events is not None:
            self.events.report(s.client_ip, "conn", s.listener.name)

    def udp_ended(self, s: UdpSession) -> None:
        self.udp_count -= 1
        mine = self.udp_by_ip.get(s.client_ip)
        if mine is not None:
            mine.discard(s)
            if not mine:
                del self.udp_by_ip[s.client_ip]
        st = self.service_stats[s.route.service]
        st.udp_active -= 1
        st.bytes_in += s.bytes_in
        st.bytes_out += s.bytes_out
        st.dgrams_in += s.dgrams_in
        st.dgrams_out += s.dgrams_out
        srv = s.server
        srv.udp_sessions -= 1
        srv.bytes_in += s.bytes_in
        srv.bytes_out += s.bytes_out

    def udp_sessions(self) -> list[UdpSession]:
        return [s for lst in self.udp_listeners.values() for s in lst.sessions.values()]

    def report(self, conn: TcpConn, kind: str) -> None:
        """An edge-observed failure of this client (garbage, bad PROXY header, ...)."""
        self.count("protocol_errors", conn.listener.name, kind)
        if self.events is not None:
            # Jails subscribe to broad kinds ("edge:proto", "edge:sniff"); the detail says which.
            broad = "sniff" if kind in ("sniff_timeout", "sniff_half_closed") else "proto"
            self.events.report(conn.client_ip, broad, f"{conn.listener.name} {kind}")

    def count(self, *key: str) -> None:
        self.counters[key] += 1

    def client_key(self, ip: str) -> bytes:
        return ip.encode()

    def close_client(self, ip: str, listeners: frozenset[str] | None = None) -> int:
        """Close every connection and UDP session of `ip` (on the given listeners, default all).
        Returns how many."""
        victims = [c for c in self.by_ip.get(ip, ()) if listeners is None or c.listener.name in listeners]
        for c in victims:
            self.count("closed", c.listener.name, "banned")
            c.close("banned")
        sessions = [s for s in self.udp_by_ip.get(ip, ()) if listeners is None or s.listener.name in listeners]
        for s in sessions:
            self.count("closed", s.listener.name, "banned")
            s.close("banned")
        return len(victims) + len(sessions)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, object]:
        live_in: dict[str, int] = defaultdict(int)
        live_out: dict[str, int] = defaultdict(int)
        live_srv: dict[int, tuple[int, int]] = {}
        for c in self.conns:
            if c.flows is not None and c.route is not None:
                live_in[c.route.service] += c.flows[0].nbytes
                live_out[c.route.service] += c.flows[1].nbytes
                if c.server is not None:
                    a, b = live_srv.get(id(c.server), (0, 0))
                    live_srv[id(c.server)] = (a + c.flows[0].nbytes, b + c.flows[1].nbytes)
        live_dg: dict[str, tuple[int, int]] = {}
        for u in self.udp_sessions():
            svc = u.route.service
            live_in[svc] += u.bytes_in
            live_out[svc] += u.bytes_out
            di, do = live_dg.get(svc, (0, 0))
            live_dg[svc] = (di + u.dgrams_in, do + u.dgrams_out)
            a, b = live_srv.get(id(u.server), (0, 0))
            live_srv[id(u.server)] = (a + u.bytes_in, b + u.bytes_out)
        services = {}
        for r in self.runtime.routes:
            st = self.service_stats[r.service]
            di, do = live_dg.get(r.service, (0, 0))
            services[r.service] = {"active": st.active, "total": st.total, "bytes_in": st.bytes_in + live_in[r.service],
                                   "bytes_out": st.bytes_out + live_out[r.service], "pool": r.pool.name,
                                   "udp_sessions": st.udp_active, "udp_sessions_total": st.udp_total,
                                   "datagrams_in": st.dgrams_in + di, "datagrams_out": st.dgrams_out + do}
        pools = {}
        now = time.monotonic()
        for name, p in self.runtime.pools.items():
            pools[name] = {"balance": p.balance, "servers": [
                {"server": s.name, "healthy": s.healthy, "available": s.available(now), "drain": s.drain,
                 "weight": s.weight, "active": s.active, "total": s.total, "udp_sessions": s.udp_sessions,
                 "bytes_in": s.bytes_in + live_srv.get(id(s), (0, 0))[0],
                 "bytes_out": s.bytes_out + live_srv.get(id(s), (0, 0))[1]}
                for s in p.servers]}
        return {
            "version": _version(), "uptime": round(time.time() - self.started_at, 1),
            "connections": len(self.conns), "udp_sessions": self.udp_count, "clients": self.distinct_clients(),
            "reloads": self.reloads,
            "nofile": {"soft": self.nofile[0], "hard": self.nofile[1]}, "splice": self.splice,
            "pipes": {"pooled": len(self.pipes.free), "in_use": self.pipes.created - len(self.pipes.free)},
            "listeners": [{"address": f"{k[1]}:{k[2]}", "transport": k[0], "name": name, "active": active}
                          for k, name, active in sorted([(k, t.name, t.active) for k, t in self.listeners.items()]
                                                        + [(k, u.name, u.active) for k, u in self.udp_listeners.items()])],
            "services": services, "pools": pools,
            "counters": [{"key": list(k), "value": v} for k, v in sorted(self.counters.items())],
            **{name: fn() for name, fn in self.extra_status.items()},
        }

    def distinct_clients(self) -> int:
        """Distinct client addresses with an open connection or a live UDP session."""
        by_ip = self.by_ip
        return len(by_ip) + sum(1 for ip in self.udp_by_ip if ip not in by_ip)

    def set_drain(self, pool: str, server: str, drain: bool) -> bool:
        p = self.runtime.pools.get(pool)
        s = p.find(server) if p is not None else None
        if s is None:
            return False
        s.drain = drain
        return True


def _version() -> str:
    from . import __version__
    return __version__


class BindError(Exception):
    pass


def _bind_error(e: OSError) -> BindError:
    return BindError(f"cannot bind: {e.strerror or e}")
