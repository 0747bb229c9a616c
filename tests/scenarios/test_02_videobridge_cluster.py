"""Scenario 02 (../shared/scenarios/02-videobridge-cluster.md): one front server and several videobridges.

Stand-ins: three bridges on their own loopback addresses (127.0.0.11-13), each with an HTTP
`/about/health` that the test switches between 200 and 500, a TCP echo and a UDP echo on the same
port, both saying which bridge answered; the front server is a TCP echo on its ports. Clients come
from 12 loopback addresses.

What must hold: new clients are spread over the healthy bridges by source hash and stay on one
bridge (TCP and UDP alike); a bridge whose health check fails gets no new clients and its UDP
clients move on their next datagram; it gets its clients back when it recovers; `status`, the
admin API and `/metrics` show per-service and per-bridge distinct clients equal to what the test
opened (several connections from one address counted once) and drop back when they close; the edge
raised its open-files limit to the 65000 the setup asks for.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import (
    EdgeProcess,
    ThreadServer,
    UdpEcho,
    echo_handler,
    free_port,
    recv_line,
    wait_until,
)

BRIDGE_IPS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
CLIENTS = tuple(f"127.0.1.{i}" for i in range(1, 13))
CHECK_INTERVAL = 0.5


class Bridge:
    """A videobridge stand-in: /about/health (200 or 500 on demand), a TCP and a UDP echo on `port`."""

    def __init__(self, ip: str, port: int, health_port: int) -> None:
        self.ip = ip
        self.name = f"{ip}:{port}"
        self.healthy = threading.Event()
        self.healthy.set()
        self.checks = 0
        self.health = ThreadServer(self._health, host=ip, port=health_port)
        try:
            self.tcp = ThreadServer(echo_handler(f"bridge {self.name}\n".encode()), host=ip, port=port)
            try:
                self.udp = UdpEcho(ip, [port], tag=self.name)
            except OSError:
                self.tcp.close()
                raise
        except OSError:
            self.health.close()
            raise

    def _health(self, c: socket.socket) -> None:
        c.settimeout(2)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = c.recv(4096)
            if not chunk:
                return
            head += chunk
        self.checks += 1
        ok = head.startswith(b"GET /about/health ") and self.healthy.is_set()
        body = b'{"status": "ok"}' if ok else b'{"status": "failing"}'
        c.sendall(b"HTTP/1.1 " + (b"200 OK" if ok else b"500 Internal Server Error")
                  + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\nConnection: close\r\n\r\n" + body)

    def close(self) -> None:
        self.health.close()
        self.tcp.close()
        self.udp.close()


def _bridges() -> list[Bridge]:
    """Three bridges on the same two ports (media and health) of their own addresses, as in real life."""
    for _ in range(20):
        port, health_port = free_port(BRIDGE_IPS[0]), free_port(BRIDGE_IPS[0])
        made: list[Bridge] = []
        try:
            for ip in BRIDGE_IPS:
                made.append(Bridge(ip, port, health_port))
            return made
        except OSError:  # a port taken on another address meanwhile: try others
            for b in made:
                b.close()
    raise RuntimeError("no common free ports on the bridge addresses")


@pytest.fixture
def bridges() -> Iterator[list[Bridge]]:
    made = _bridges()
    try:
        yield made
    finally:
        for b in made:
            b.close()


class Participant:
    """One client address: a TCP media connection (kept open) and a UDP socket."""

    def __init__(self, ip: str, tcp_port: int, udp_port: int) -> None:
        self.ip = ip
        self.udp_port = udp_port
        self.tcp_port = tcp_port
        self.conns: list[socket.socket] = []
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((ip, 0))
        self.udp.settimeout(3)

    def connect(self) -> str:
        """A new TCP connection through the edge; returns the bridge that took it (kept open)."""
        c = socket.socket()
        c.bind((self.ip, 0))
        c.settimeout(5)
        c.connect(("127.0.0.1", self.tcp_port))
        self.conns.append(c)
        line = recv_line(c)
        assert line.startswith(b"bridge "), f"{self.ip}: {line!r}"
        c.sendall(b"media")
        assert c.recv(5) == b"media"
        return line[7:].strip().decode()

    def datagram(self, data: bytes = b"rtp") -> str:
        """One datagram through the edge; returns the bridge that echoed it."""
        self.udp.sendto(data, ("127.0.0.1", self.udp_port))
        reply = self.udp.recv(2048)
        name, _port, _peer, echoed = reply.split(b"|", 3)
        assert echoed == data
        return name.decode()

    def hang_up(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()

    def close(self) -> None:
        self.hang_up()
        self.udp.close()


def metric(text: str, name: str, **labels: str) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {want} in /metrics")


def test_scenario_02(tmp_path: Path, bridges: list[Bridge]) -> None:
    web, xmpp, turn, media_tcp, media_udp, admin = (free_port() for _ in range(6))
    front = ThreadServer(echo_handler(b"front\n"))
    port = bridges[0].name.rsplit(":", 1)[1]
    health_port = bridges[0].health.port
    # The user's part: the pool of bridges with their health URL and source-hash balancing, the
    # public ports that lead to it, and the front server's ports listed once.
    config = f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
nofile = 65000

[pools.bridges]
servers = [{", ".join(f'"{ip}:{port}"' for ip in BRIDGE_IPS)}]
balance = "source-hash"
health = {{ http = "/about/health", port = {health_port}, interval = "{CHECK_INTERVAL}s", timeout = "0.4s" }}

[listeners.media-udp]
bind = ["udp/127.0.0.1:{media_udp}"]
udp_idle_timeout = "3s"

[services.front]
listen = ["127.0.0.1:{web}", "127.0.0.1:{xmpp}", "127.0.0.1:{turn}"]
to = "127.0.0.1:{front.port}"

[services.media-tcp]
listen = ["127.0.0.1:{media_tcp}"]
to = "bridges"

[services.media]
listen = ["media-udp"]
to = "bridges"
"""
    edge = EdgeProcess(tmp_path, config, admin_port=admin, wait=[("127.0.0.1", media_tcp)])
    people = [Participant(ip, media_tcp, media_udp) for ip in CLIENTS]
    try:
        st = edge.status()
        nofile: dict[str, int] = st["nofile"]  # type: ignore[assignment]
        if nofile["soft"] != 65000:  # a container whose hard limit is lower, and no CAP_SYS_RESOURCE: said so
            assert nofile["soft"] == nofile["hard"] < 65000
            assert f"cannot raise the open-files hard limit from {nofile['hard']} to 65000" in edge.log()
        assert f"open-files limit: soft {nofile['soft']}" in edge.log()

        # 1. Everyone joins: spread over the bridges, and each address stays on one bridge.
        home: dict[str, str] = {}
        for p in people:
            home[p.ip] = p.connect()
            assert p.datagram() == home[p.ip]  # the media of one participant: TCP and UDP on one bridge
            assert p.connect() == home[p.ip]  # a second connection (another tab): same bridge
            assert p.datagram() == home[p.ip]
        on = {b.name: {ip for ip, h in home.items() if h == b.name} for b in bridges}
        assert sum(1 for s in on.values() if s) >= 2, f"source hash put everyone on one bridge: {on}"
        with socket.create_connection(("127.0.0.1", web), timeout=5) as w:  # the front server, by the way
            assert recv_line(w) == b"front\n"

        # 2. status, /clients and /metrics: 12 participants, 24 TCP connections, 12 UDP sessions.
        def services() -> dict[str, Any]:
            return edge.status()["services"]  # type: ignore[return-value]
        # (the front server's connection above may still be closing at the edge)
        assert wait_until(lambda: services()["media-tcp"]["active"] == 24 and edge.status()["connections"] == 24)
        st = edge.status()
        assert st["connections"] == 24 and st["udp_sessions"] == 12 and st["clients"] == 12
        svc: dict[str, Any] = st["services"]  # type: ignore[assignment]
        assert svc["media-tcp"]["clients"] == 12 and svc["media"]["clients"] == 12
        assert svc["media"]["udp_sessions"] == 12 and svc["media"]["datagrams_in"] == 24
        pool: dict[str, Any] = st["pools"]["bridges"]  # type: ignore[index]
        assert pool["clients"] == 12 and pool["active"] == 24 and pool["udp_sessions"] == 12
        by_name = {s["server"]: s for s in pool["servers"]}
        for b in bridges:
            s = by_name[b.name]
            assert s["healthy"] and s["available"]
            assert s["clients"] == len(on[b.name]), (b.name, s)  # 2 connections + 1 session each: 1 client
            assert s["active"] == 2 * len(on[b.name]) and s["udp_sessions"] == len(on[b.name])
            assert s["bytes_in"] == len(on[b.name]) * (2 * 5 + 2 * 3)  # "media" per connection, "rtp" per datagram
        code, clients = edge.api("GET", "/clients?service=media&limit=5")
        assert code == 200 and isinstance(clients, dict)
        assert clients["distinct"] == 12 and clients["matched"] == 12 and len(clients["clients"]) == 5
        assert all(c["transport"] == "udp" and c["upstream"] == home[c["address"]] for c in clients["clients"])
        code, text = edge.api("GET", "/metrics")
        assert code == 200 and isinstance(text, str)
        assert metric(text, "edgeward_service_clients", service="media-tcp") == 12
        assert metric(text, "edgeward_service_udp_sessions", service="media") == 12
        assert metric(text, "edgeward_pool_clients", pool="bridges") == 12
        for b in bridges:
            assert metric(text, "edgeward_server_clients", pool="bridges", server=b.name) == len(on[b.name])
            assert metric(text, "edgeward_server_up", pool="bridges", server=b.name) == 1

        # 3. A bridge fails its health check: no new clients within the check interval; its UDP
        # participants move on their next datagram; its live TCP connections are left alone.
        victim = max(bridges, key=lambda b: len(on[b.name]))
        moved = sorted(on[victim.name])
        victim.healthy.clear()

        def down() -> bool:
            return not {s["server"]: s for s in edge.status()["pools"]["bridges"]["servers"]}[victim.name]["healthy"]  # type: ignore[index]
        assert wait_until(down, 10 * CHECK_INTERVAL)
        code, text = edge.api("GET", "/metrics")
        assert isinstance(text, str) and metric(text, "edgeward_server_up", pool="bridges", server=victim.name) == 0
        for p in people:
            now = p.datagram()
            assert now != victim.name
            if p.ip not in moved:
                assert now == home[p.ip]  # the others stay where they are
            assert p.connect() == now  # a new connection follows the datagrams
        st = edge.status()
        by_name = {s["server"]: s for s in st["pools"]["bridges"]["servers"]}  # type: ignore[index]
        assert by_name[victim.name]["udp_sessions"] == 0
        assert by_name[victim.name]["active"] == 2 * len(moved)  # old calls still there, nothing new
        assert by_name[victim.name]["clients"] == len(moved)
        assert sum(by_name[b.name]["udp_sessions"] for b in bridges) == 12
        assert st["services"]["media-tcp"]["clients"] == 12  # type: ignore[index]  # 36 connections, 12 people

        # The moved participants hang up (their old calls on the dead bridge end): it has no one left.
        for p in people:
            if p.ip in moved:
                p.hang_up()
        assert wait_until(lambda: {s["server"]: s for s in edge.status()["pools"]["bridges"]["servers"]}  # type: ignore[index]
                          [victim.name]["clients"] == 0)

        # 4. It recovers: the clients whose hash points at it go there again.
        victim.healthy.set()
        assert wait_until(lambda: not down(), 10 * CHECK_INTERVAL)
        for ip in moved:
            p = next(x for x in people if x.ip == ip)
            assert p.connect() == victim.name
        st = edge.status()
        by_name = {s["server"]: s for s in st["pools"]["bridges"]["servers"]}  # type: ignore[index]
        assert by_name[victim.name]["clients"] == len(moved) and by_name[victim.name]["active"] == len(moved)

        # 5. Everyone leaves: the TCP view drops at once, the UDP one when the sessions go idle.
        for p in people:
            p.hang_up()
        assert wait_until(lambda: services()["media-tcp"]["clients"] == 0 and services()["media-tcp"]["active"] == 0)
        assert edge.status()["connections"] == 0
        assert wait_until(lambda: edge.status()["clients"] == 0, 10)
        st = edge.status()
        assert st["services"]["media"]["clients"] == 0 and st["pools"]["bridges"]["clients"] == 0  # type: ignore[index]
        assert all(s["clients"] == 0 for s in st["pools"]["bridges"]["servers"])  # type: ignore[index]
        code, text = edge.api("GET", "/metrics")
        assert isinstance(text, str) and metric(text, "edgeward_pool_clients", pool="bridges") == 0
        for b in bridges:
            assert b.checks > 0
    finally:
        for p in people:
            with contextlib.suppress(OSError):
                p.close()
        edge.stop()
        front.close()
