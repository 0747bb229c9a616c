"""The worker's side: its edge's sockets, bans and health come from the master."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config.schema import Config
from ..edge import Edge
from ..events import ConnAccepted, HealthChanged, HttpRequest, ProtocolError, UdpSessionStarted
from ..guard.banset import BanSet
from ..monitor import Monitor
from ..runtime import ListenerKey
from ..status import live_clients, plane_report
from .channel import Channel
from .settings import unpack_config

if TYPE_CHECKING:
    from ..webfront import WebFront

log = logging.getLogger("edgeward.workers")

class WorkerLink:
    """The worker's side: its edge's sockets, bans and health come from the master; it answers
    the master's questions and tells it what the jails hear."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.channel = Channel(sock, loop, self._on_message, self._master_gone)
        self.init: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.bans = BanSet()
        self.offered: dict[ListenerKey, socket.socket] = {}
        self.edge: Edge | None = None
        self.monitor: Monitor | None = None
        self.index = -1
        self._drain_when_ready = False  # the master went while this worker's edge was being built
        self.propagation_ms = {"last": 0.0, "max": 0.0, "count": 0}
        self._health: list[list[Any]] = []
        self._config = ""  # the config the master sent last (pack_config)
        self._path = ""
        self.reopen: list[Callable[[], None]] = []  # the access log's reopen
        # What needs the edge and came before it was built (a reload sent while this worker was
        # starting, and the sockets of that reload): handled once it runs, in order.
        self._early: list[tuple[list[Any], list[socket.socket]]] = []
        # The master's ACME state (certificates, challenges) and this worker's web front, if it has one.
        self.acme: dict[str, Any] = {}
        self.web_front: Callable[[], WebFront | None] = lambda: None
        self.channel.start()

    async def wait_init(self) -> dict[str, Any]:
        """The master's init message: index, path, config (`pack_config`), conn_reports, http_reports."""
        init = await self.init
        self.index = int(init["index"])
        self._path, self._config = str(init["path"]), str(init["config"])
        return init

    def close(self) -> None:
        self.channel.close()
        for _msg, fds in self._early:
            for s in fds:
                s.close()
        self._early.clear()

    def load(self, _path: str = "") -> Config:
        """The edge's loader: the config the master sent (it checked it already)."""
        return unpack_config(self._config)

    def attach(self, edge: Edge, conn_reports: bool, http_reports: bool = True) -> None:
        self.edge = edge
        edge.load = self.load
        edge.listen_tcp = self._take_tcp
        edge.bind_udp = self._take_udp
        edge.active_health = False  # the master checks, and says
        edge.admission.bans = self.bans
        self.bans.on_ban(self._banned)
        edge.on_drain.append(self._draining)
        self.monitor = Monitor(edge)
        self._apply_health()
        bus = edge.bus

        def on_error(ev: ProtocolError) -> None:
            self.channel.send(["report", "proto", ev.listener, ev.peer.ip, ev.peer.port, ev.kind])
        bus.subscribe(ProtocolError, on_error)

        if http_reports:
            def on_request(ev: HttpRequest) -> None:
                if ev.status in (401, 403):
                    self.channel.send(["report", "http", ev.listener, ev.peer.ip, ev.peer.port, ev.status,
                                       ev.service or "-", ev.host, ev.path])
            bus.subscribe(HttpRequest, on_request)
        if conn_reports:
            def on_conn(ev: ConnAccepted | UdpSessionStarted) -> None:
                self.channel.send(["report", "conn", ev.listener, ev.peer.ip, ev.peer.port])
            bus.subscribe(ConnAccepted, on_conn)
            bus.subscribe(UdpSessionStarted, on_conn)

    def ready(self) -> None:
        assert self.monitor is not None
        if self._drain_when_ready and self.edge is not None:
            self.loop.create_task(self.edge.drain())
            return
        self.monitor.start()
        self.channel.send(["ready"])
        early, self._early = self._early, []
        for msg, fds in early:
            self._on_message(msg, fds)

    def _draining(self) -> None:
        """This worker stops accepting (SIGTERM, a rejected reload, the master's stop): the master
        starts its successor on the same sockets now, not once this one's connections are done.
        With what it counted so far, kept in the totals."""
        edge = self.edge
        if edge is None or self.channel.closed:
            return
        rep = plane_report(edge, self.monitor, True)
        rep["propagation_ms"] = dict(self.propagation_ms)
        rep["pid"] = os.getpid()
        self.channel.send(["draining", rep])

    def _take(self, key: ListenerKey) -> socket.socket | None:
        return self.offered.pop(key, None)

    def _take_tcp(self, host: str, port: int, backlog: int, reuseport: bool) -> socket.socket:
        return self._offered("tcp", host, port)

    def _take_udp(self, host: str, port: int, reuseport: bool) -> socket.socket:
        return self._offered("udp", host, port)

    def _offered(self, transport: str, host: str, port: int) -> socket.socket:
        """The master's socket for this address, in this worker's share. Never one of our own: a
        socket the master does not hold is one it cannot hand to a successor, and the master's
        copy of this share would queue clients for nobody. Without it the start or reload fails
        (a reload answers `reloaded false`, and the master replaces this worker)."""
        s = self._take((transport, host, port))
        if s is None:
            log.error("worker %d: no socket from the master for %s %s:%d", self.index, transport, host, port)
            raise OSError(errno.EADDRNOTAVAIL, f"no socket from the master for {transport} {host}:{port}")
        s.setblocking(False)
        return s

    def _banned(self, addr: str, listeners: frozenset[str] | None) -> None:
        if self.edge is not None:
            self.edge.plane.admission.close_client(addr, listeners)

    def _apply_health(self) -> None:
        edge = self.edge
        if edge is None:
            return
        pools = edge.runtime.pools
        for pool, server, healthy in self._health:
            p = pools.get(pool)
            s = p.find(server) if p is not None else None
            if s is not None and s.healthy != healthy:
                s.healthy = bool(healthy)
                edge.bus.publish(HealthChanged(pool, server, bool(healthy)))

    def _delay(self, stamp: float) -> None:
        ms = (time.monotonic() - float(stamp)) * 1000.0
        d = self.propagation_ms
        d["last"] = round(ms, 3)
        d["max"] = round(max(d["max"], ms), 3)
        d["count"] += 1

    def _on_message(self, msg: list[Any], fds: list[socket.socket]) -> None:
        kind = msg[0]
        if kind == "listeners" and self.edge is None and self.init.done():
            # The sockets of a reload sent while this worker starts: taken with that reload, not
            # now under the config it starts with (which its reload would then close).
            self._early.append((msg, fds))
            return
        if kind == "listeners":
            for key, s in zip(msg[1], fds, strict=True):
                old = self.offered.pop((str(key[0]), str(key[1]), int(key[2])), None)
                if old is not None:
                    old.close()
                self.offered[(str(key[0]), str(key[1]), int(key[2]))] = s
            return
        for s in fds:
            s.close()
        if self.edge is None and kind in ("reload", "server_drain", "reopen", "stop"):
            self._early.append((msg, []))
            return
        if kind == "ban":  # the master's merged entry (wider or narrower): replaces ours
            self.bans.add(msg[1], jail="master", listeners=msg[2])
            self._delay(msg[3])
        elif kind == "unban":
            self.bans.remove(msg[1])
            self._delay(msg[2])
        elif kind == "bans":
            wanted = {addr: lst for addr, lst in msg[1]}
            for addr in [a for a in self.bans.snapshot() if a not in wanted]:
                self.bans.remove(addr)
            for addr, lst in wanted.items():
                self.bans.add(addr, jail="master", listeners=lst)
        elif kind == "acme":
            self.acme = msg[1]
            front = self.web_front()
            if front is not None:
                front.follow(self.acme)
        elif kind == "health":
            changed = {(x[0], x[1]) for x in msg[1]}
            self._health = [h for h in self._health if (h[0], h[1]) not in changed] + msg[1]
            self._apply_health()
            if len(msg) > 2:  # a change seen by a health check (not the state sent at start or reload)
                self._delay(msg[2])
        elif kind == "init":
            if not self.init.done():
                self.init.set_result(msg[1])
        elif kind == "reload":
            self._reload(int(msg[1]), str(msg[2]))
        elif kind == "server_drain" and self.edge is not None:
            self.edge.set_drain(msg[1], msg[2], bool(msg[3]))
        elif kind == "reopen" and self.edge is not None:
            for fn in self.reopen:
                fn()
        elif kind == "ping":
            self.channel.send(["pong"])
        elif kind == "status":
            self._answer_status(int(msg[1]), bool(msg[2]))
        elif kind == "clients" and self.edge is not None:
            self.channel.send(["clients", msg[1], self._clients(msg[2], msg[3], int(msg[4]))])
        elif kind == "stop" and self.edge is not None:
            self.loop.create_task(self.edge.drain(float(msg[1])))

    def _reload(self, rid: int, packed: str) -> None:
        edge = self.edge
        if edge is None:
            return
        self._config = packed
        applied = edge.reload()
        for s in self.offered.values():  # offered for a runtime we did not apply: never accept on them
            s.close()
        self.offered.clear()
        self.channel.send(["reloaded", rid, applied])

    def _answer_status(self, rid: int, full: bool) -> None:
        edge = self.edge
        if edge is None:
            self.channel.send(["status", rid, None])
            return
        rep = plane_report(edge, self.monitor, full)
        rep["propagation_ms"] = dict(self.propagation_ms)
        rep["pid"] = os.getpid()
        rep["dropped_reports"] = self.channel.dropped
        self.channel.send(["status", rid, rep])

    def _clients(self, service: str | None, address: str | None, limit: int) -> dict[str, Any]:
        assert self.edge is not None
        out = live_clients(self.edge, service, address, limit)
        out["addresses"] = self.edge.presence.addresses(service)
        return out

    def _master_gone(self) -> None:
        edge = self.edge
        log.error("worker %d: the master is gone; draining", self.index)
        if edge is not None:
            self.loop.create_task(edge.drain())
        elif not self.init.done():
            self.init.set_exception(ConnectionError("the master closed the control socket"))
        else:
            # The init came and the edge is still being built: ready() drains it, else this worker
            # would serve on, an orphan holding its share of the listening sockets.
            self._drain_when_ready = True
