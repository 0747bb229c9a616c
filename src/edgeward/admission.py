"""Who may come in, and who is in: one admission for TCP connections and UDP sessions.

`peer_from_sockaddr` is the one place a client address is normalised (the
`Peer` it builds is what every later step sees). `Admission` answers "may this
client open a connection (a session) on this listener?" from bans and limits,
and keeps the per-client registries those limits, ban enforcement (close every
connection of a newly banned address) and distinct-client counts need.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from typing import Protocol

from .config.schema import EdgeSettings
from .events import Peer


def normalise_ip(text: str) -> str:
    """An address as bans, limits and logs spell it: IPv4-mapped reduced, zone id dropped."""
    if text.startswith("::ffff:") and "." in text:
        text = text[7:]
    if "%" in text:
        text = text.split("%", 1)[0]
    return text


def peer_from_sockaddr(addr: object, via_proxy: bool = False) -> Peer:
    """The Peer of an accepted socket's address (or a PROXY header's source address)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return Peer(normalise_ip(str(addr[0])), int(addr[1]), via_proxy)
    return Peer("0.0.0.0", 0, via_proxy)  # an AF_UNIX client: no address to ban or limit by


class BanCheck(Protocol):
    def is_banned(self, addr: str, listener: str | None = None) -> bool: ...


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class Admitted(Protocol):
    """A live TCP connection or UDP session, as the registries see it."""

    @property
    def peer(self) -> Peer: ...
    @property
    def listener(self) -> _Named: ...
    def close(self, reason: str = "closed") -> None: ...


class _Registry:
    """Live connections (or sessions) by client address."""

    __slots__ = ("by_ip",)

    def __init__(self) -> None:
        self.by_ip: dict[str, set[Admitted]] = {}

    def add(self, ip: str, item: Admitted) -> int:
        """Register `item`; returns how many `ip` has now."""
        s = self.by_ip.get(ip)
        if s is None:
            s = self.by_ip[ip] = set()
        s.add(item)
        return len(s)

    def remove(self, ip: str, item: Admitted) -> None:
        s = self.by_ip.get(ip)
        if s is not None:
            s.discard(item)
            if not s:
                del self.by_ip[ip]

    def count(self, ip: str) -> int:
        s = self.by_ip.get(ip)
        return 0 if s is None else len(s)

    def of(self, ip: str) -> Iterable[Admitted]:
        return tuple(self.by_ip.get(ip, ()))


class Admission:
    """Bans and limits at the door, for both transports; registries of who is in."""

    __slots__ = ("_networks", "bans", "draining", "peak", "settings", "tcp", "tcp_count", "udp", "udp_count")

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings  # swapped on reload
        self.bans: BanCheck | None = None  # set by the guard adapter
        self.draining = False
        self.tcp = _Registry()
        self.udp = _Registry()
        self.tcp_count = 0
        self.udp_count = 0
        # Most TCP connections and UDP sessions at once since the sweeper last looked (a burst
        # shorter than its one-second tick still shows, for edge.MemoryReturn).
        self.peak = 0
        # Banned networks whose clients are still to close (see close_client).
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, frozenset[str] | None]] = []

    def refusal(self, transport: str, listener: str, listener_active: int, listener_max: int | None,
                ip: str) -> str | None:
        """Why `ip` may not open a TCP connection (a UDP session) on `listener` now, or None."""
        udp = transport == "udp"
        if udp and self.draining:  # TCP listeners are closed when draining; UDP ones keep their sessions
            return "draining"
        bans = self.bans
        if bans is not None and bans.is_banned(ip, listener):
            return "banned"
        s = self.settings
        if udp:
            if self.udp_count >= s.max_udp_sessions:
                return "udp_global_limit"
        elif self.tcp_count >= s.max_connections:
            return "global_limit"
        if listener_max is not None and listener_active >= listener_max:
            return "listener_limit"
        per = s.max_udp_sessions_per_client if udp else s.max_connections_per_client
        if per:
            mine = (self.udp if udp else self.tcp).by_ip.get(ip)
            if mine is not None and len(mine) >= per:
                return "udp_client_limit" if udp else "client_limit"
        return None

    # ------------------------------------------------------------------ registries
    def add_tcp(self, conn: Admitted) -> None:
        self.tcp_count = n = self.tcp_count + 1
        n += self.udp_count
        if n > self.peak:
            self.peak = n
        by_ip = self.tcp.by_ip
        ip = conn.peer.ip
        s = by_ip.get(ip)  # _Registry.add, inlined: once per connection
        if s is None:
            s = by_ip[ip] = set()
        s.add(conn)

    def remove_tcp(self, conn: Admitted) -> None:
        self.tcp_count -= 1
        self.tcp.remove(conn.peer.ip, conn)

    def rebind_tcp(self, conn: Admitted, old: Peer, listener: str) -> str | None:
        """`conn` now speaks for another client (a trusted PROXY header named it): move it to that
        address's registry and check the ban and the per-client limit again. Returns a refusal."""
        self.tcp.remove(old.ip, conn)
        n = self.tcp.add(conn.peer.ip, conn)
        bans = self.bans
        if bans is not None and bans.is_banned(conn.peer.ip, listener):
            return "banned"
        per = self.settings.max_connections_per_client
        if per and n > per:
            return "client_limit"
        return None

    def add_udp(self, session: Admitted) -> None:
        self.udp_count = n = self.udp_count + 1
        n += self.tcp_count
        if n > self.peak:
            self.peak = n
        self.udp.add(session.peer.ip, session)

    def remove_udp(self, session: Admitted) -> None:
        self.udp_count -= 1
        self.udp.remove(session.peer.ip, session)

    def distinct_clients(self) -> int:
        """Distinct client addresses with an open connection or a live UDP session."""
        tcp = self.tcp.by_ip
        return len(tcp) + sum(1 for ip in self.udp.by_ip if ip not in tcp)

    def close_client(self, ip: str, listeners: frozenset[str] | None) -> int:
        """Close every connection and session of `ip` (on `listeners`, default all) as "banned".
        `ip` may be a network ("192.0.2.0/24", a CrowdSec range decision): every client inside it;
        those are closed on the loop's next turn (0 is returned), with every other network banned
        meanwhile."""
        if "/" in ip:
            return self._close_network(ip, listeners)
        victims = [a for reg in (self.tcp, self.udp) for a in reg.of(ip)
                   if listeners is None or a.listener.name in listeners]
        for a in victims:
            a.close("banned")
        return len(victims)

    def _close_network(self, text: str, listeners: frozenset[str] | None) -> int:
        # Range bans come in batches (a CrowdSec blocklist brings thousands at once): walking every
        # client for each range cost ~17 ms per range with 10k clients, seconds of a blocked loop for
        # a blocklist. Gathered, they cost one walk, each address parsed once.
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return 0
        self._networks.append((net, listeners))
        if len(self._networks) > 1:
            return 0  # a walk is already on its way
        try:
            asyncio.get_running_loop().call_soon(self.close_in_networks)
        except RuntimeError:  # no running loop (a tool, a test): now
            return self.close_in_networks()
        return 0

    def close_in_networks(self) -> int:
        """Close the clients inside the networks banned since the last call; how many were closed."""
        pending, self._networks = self._networks, []
        if not pending:
            return 0
        # (version, prefix length) -> network number -> listeners (None: all)
        index: dict[tuple[int, int], dict[int, frozenset[str] | None]] = {}
        for net, lst in pending:
            table = index.setdefault((net.version, net.prefixlen), {})
            key = int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
            if key in table:
                before = table[key]
                lst = None if before is None or lst is None else before | lst
            table[key] = lst
        closed = 0
        for reg in (self.tcp, self.udp):
            for ip in list(reg.by_ip):
                try:
                    addr = ipaddress.ip_address(ip)
                except ValueError:
                    continue
                n, bits, version = int(addr), addr.max_prefixlen, addr.version
                hit = False
                on: frozenset[str] | None = frozenset()  # the listeners, merged over every covering network
                for (v, plen), table in index.items():
                    if v == version and (n >> (bits - plen)) in table:
                        lst = table[n >> (bits - plen)]
                        hit, on = True, (None if lst is None or on is None else on | lst)
                if not hit:
                    continue
                victims = [a for a in reg.of(ip) if on is None or a.listener.name in on]
                for a in victims:
                    a.close("banned")
                closed += len(victims)
        return closed
