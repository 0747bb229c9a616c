"""Route tables: (listener, sniffed facts, client address) → route, and what a route does.

A route carries an *action*: what happens to a connection once it is routed.
Forwarding to a pool (net/forward.py) is one; terminating TLS and serving HTTP,
or handing the socket to a local server, are others. Each is a module of its own
that implements `Action`; the route table neither knows nor cares which.

A listener's table is built once per config and never changes (reload builds a
new one). Routes are kept sorted most-specific first, so lookup is the first
match. The order, most specific first:

1. exact name  >  wildcard name (longer suffix first)  >  no name
2. ALPN given  >  not
3. protocol given  >  not
4. longer source prefix  >  shorter  >  no source

A wildcard ``*.example.org`` matches any name below example.org (one or more
labels, like nginx's ``server_name``), not example.org itself.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .upstream.pool import Pool

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Facts:
    """What is known of a client when it is routed."""

    protocol: str | None  # tls/http/xmpp/ssh/unknown, None when the listener did not sniff
    name: str | None
    alpn: tuple[str, ...]
    client: IPAddress | None  # None when no route of the listener looks at the source


class Action(Protocol):
    """What a route does with a connection once it is routed.

    `start(conn)` receives the routed connection (a `net.tcp.TcpConn`: routing sits below the
    network layer, so it is not named here) and owns it from then on. `pool` is the pool the
    action sends clients to, if it has exactly one (UDP forwarding and `status` use it).
    """

    @property
    def kind(self) -> str: ...
    @property
    def pool(self) -> Pool | None: ...
    @property
    def needs_sniff(self) -> bool:
        """The action must know the client's protocol (TLS or not) even when the route matches
        every client: the connection is then sniffed before it is started."""
        ...
    def start(self, conn: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class Route:
    service: str
    action: Action
    exact: frozenset[str] = frozenset()
    wildcards: tuple[str, ...] = ()  # stored as ".example.org"
    protocol: str | None = None
    alpn: frozenset[str] = frozenset()
    sources: tuple[IPNetwork, ...] = ()
    order: tuple[int, ...] = field(default=(), compare=False)

    @property
    def needs_sniff(self) -> bool:
        return bool(self.exact or self.wildcards or self.protocol or self.alpn) or self.action.needs_sniff

    def matches(self, f: Facts) -> bool:
        if self.exact or self.wildcards:
            n = f.name
            if n is None:
                return False
            if n not in self.exact and not any(n.endswith(w) for w in self.wildcards):
                return False
        if self.protocol is not None and f.protocol != self.protocol:
            return False
        if self.alpn and not self.alpn.intersection(f.alpn):
            return False
        if self.sources:
            return f.client is not None and any(f.client in net for net in self.sources)
        return True


def specificity(names: list[str], protocol: str | None, alpn: list[str], sources: list[IPNetwork]) -> tuple[int, ...]:
    """Sort key, larger = more specific (see the module doc)."""
    if any("*" not in n for n in names):
        name_rank = (2, 0)
    elif names:
        name_rank = (1, max(len(n) for n in names))
    else:
        name_rank = (0, 0)
    src = max((s.prefixlen + (0 if s.version == 6 else 96) for s in sources), default=-1)
    return (*name_rank, 1 if alpn else 0, 1 if protocol else 0, src)


def make_route(service: str, action: Action, names: list[str], protocol: str | None, alpn: list[str],
               sources: list[str]) -> Route:
    nets = [ipaddress.ip_network(s, strict=False) for s in sources]
    exact = frozenset(n for n in names if not n.startswith("*."))
    wild = tuple(sorted((n[1:] for n in names if n.startswith("*.")), key=len, reverse=True))
    return Route(service, action, exact, wild, protocol, frozenset(alpn), tuple(nets),
                 specificity(names, protocol, alpn, nets))


class RouteTable:
    """The routes of one listener, most specific first."""

    __slots__ = ("needs_sniff", "routes", "uses_source")

    def __init__(self, routes: list[Route]) -> None:
        self.routes = tuple(sorted(routes, key=lambda r: r.order, reverse=True))
        # A listener whose routes look only at the client address never waits for bytes.
        self.needs_sniff = any(r.needs_sniff for r in self.routes)
        self.uses_source = any(r.sources for r in self.routes)

    def lookup(self, facts: Facts) -> Route | None:
        for r in self.routes:
            if r.matches(facts):
                return r
        return None


def normalise_name(name: str | None) -> str | None:
    if name is None:
        return None
    return name.lower().rstrip(".") or None
