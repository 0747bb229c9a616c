"""Pools of upstream servers: picking, passive health, draining; their per-process state.

A `Pool` and its `Server`s are this process's live view of a configured pool:
health, active counts, traffic and balancer position change as it runs, and a
worker process has its own. `Upstreams` owns them: the runtime built from a
config (immutable route tables) gets its pools from `Upstreams.pool`, which
hands back the same `Server` objects for the members a reload keeps, so health
and counts survive reloads.

Balancing:
- round-robin: smooth weighted round-robin (nginx's), so weights interleave.
- least-connections: fewest active connections relative to weight.
- source-hash: weighted rendezvous (HRW) hashing of the client address, so a
  client stays on one server while it is healthy and adding or removing a
  server moves only the clients that must move.
"""

from __future__ import annotations

import hashlib
import math
import ssl
import time
from dataclasses import dataclass, field

from ..config.schema import PoolSettings
from ..config.units import Target, parse_target


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How to speak TLS to a pool's https:// servers (the HTTP layer's settings for them), so that
    active health checks talk to those servers the way requests do."""

    context: ssl.SSLContext
    server_name: str | None = None  # SNI and certificate name; None = each server's host
    pin: bytes | None = None  # SHA-256 of the server's certificate (DER)


@dataclass(slots=True, eq=False)
class Server:
    target: Target
    weight: int = 1
    drain: bool = False
    healthy: bool = True  # from active checks
    down_until: float = 0.0  # from passive health
    failures: int = 0
    active: int = 0
    total: int = 0
    udp_sessions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # smooth weighted round-robin state
    current_weight: int = 0
    # str(target), made once: events name the server of every connection
    name: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.name = str(self.target)

    def available(self, now: float) -> bool:
        return self.healthy and not self.drain and self.weight > 0 and now >= self.down_until

    def hash_key(self) -> bytes:
        return self.name.encode()


class Pool:
    __slots__ = ("balance", "connect_timeout", "down_for", "failures_to_down", "health", "name",
                 "proxy_protocol", "retries", "servers", "tls")

    def __init__(self, name: str, servers: list[Server], *, balance: str = "round-robin",
                 connect_timeout: float = 3.0, retries: int = 2, proxy_protocol: str = "off",
                 failures_to_down: int = 3, down_for: float = 10.0, health: object | None = None) -> None:
        self.name = name
        self.servers = servers
        self.balance = balance
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.proxy_protocol = proxy_protocol
        self.failures_to_down = failures_to_down
        self.down_for = down_for
        self.health = health
        # Set by the HTTP layer for pools of https:// servers (health checks use it).
        self.tls: UpstreamTls | None = None

    def pick(self, client: bytes, exclude: tuple[Server, ...] = (), now: float | None = None) -> Server | None:
        """The server for a new connection from `client` (packed address), or None if none is available."""
        t = time.monotonic() if now is None else now
        if len(self.servers) == 1:
            s = self.servers[0]
            return s if s not in exclude and s.available(t) else None
        cands = [s for s in self.servers if s not in exclude and s.available(t)]
        if not cands:
            return None
        if self.balance == "source-hash":
            return max(cands, key=lambda s: _hrw_score(client, s))
        if self.balance == "least-connections":
            return min(cands, key=lambda s: (s.active + s.udp_sessions + 1) / s.weight)
        total = 0
        best = cands[0]
        for s in cands:
            s.current_weight += s.weight
            total += s.weight
            if s.current_weight > best.current_weight:
                best = s
        best.current_weight -= total
        return best

    def connect_failed(self, server: Server, now: float | None = None) -> None:
        if len(self.servers) == 1:
            # Like nginx: a lone server is never marked down by passive health. There is nowhere
            # else to send clients, so marking it down would only refuse them for `down_for`
            # (e.g. after one ICMP unreachable from a restarting UDP upstream).
            return
        server.failures += 1
        if server.failures >= self.failures_to_down:
            server.down_until = (time.monotonic() if now is None else now) + self.down_for
            server.failures = 0

    def connect_succeeded(self, server: Server) -> None:
        server.failures = 0

    def find(self, name: str) -> Server | None:
        for s in self.servers:
            if s.name == name:
                return s
        return None


def _hrw_score(client: bytes, server: Server) -> float:
    h = int.from_bytes(hashlib.blake2b(client + b"|" + server.hash_key(), digest_size=8).digest(), "big")
    # Map to (0, 1] and weight it: score = -w / ln(u) (weighted rendezvous hashing).
    u = (h + 1) / 2.0**64
    return -server.weight / math.log(u) if u < 1.0 else math.inf


class Upstreams:
    """This process's live pools, by name; the same Server objects across reloads."""

    def __init__(self) -> None:
        self.pools: dict[str, Pool] = {}
        self._servers: dict[tuple[str, str], Server] = {}

    def pool(self, name: str, ps: PoolSettings) -> Pool:
        """The live pool for `ps`, reusing the Server of every member it had before."""
        servers = []
        for item in ps.servers:
            address, weight, drain = (item, 1, False) if isinstance(item, str) else (item.address, item.weight, item.drain)
            t = parse_target(address)
            s = self._servers.get((name, str(t)))
            if s is None:
                s = self._servers[(name, str(t))] = Server(t)
            s.weight, s.drain = weight, drain
            servers.append(s)
        p = Pool(name, servers, balance=ps.balance, connect_timeout=ps.connect_timeout, retries=ps.retries,
                 proxy_protocol=ps.proxy_protocol, failures_to_down=ps.passive.failures,
                 down_for=ps.passive.down_for, health=ps.health)
        self.pools[name] = p
        return p

    def keep_only(self, names: set[str]) -> None:
        """Forget pools a new runtime no longer has (their live connections keep their objects)."""
        for name in [n for n in self.pools if n not in names]:
            del self.pools[name]
        self._servers = {k: v for k, v in self._servers.items()
                         if k[0] in self.pools and v in self.pools[k[0]].servers}
