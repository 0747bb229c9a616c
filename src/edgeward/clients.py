"""Who is on now: distinct client addresses per service, per pool and per server.

The "how many people are in the conference" number. A subscriber of the event
bus that keeps, for each service, pool and server, a reference count per
client address (TCP connections plus UDP sessions): an open adds one, a close
takes one away, an address whose count reaches zero is forgotten. So the
distinct count is `len()` of a dict, kept in O(1) per open and close, and no
request ever walks the live connections to count them.

A service's pool is the one its route has when its first connection to a
server opens (`set_pools`, on start and on every reload). The pool is pinned
per (service, server) while that pair has live connections (until the next
reload when it has none), so a reload that points a service at another pool can
never make a close decrement a count its open did not increment.

Connections handed to the HTTP layer have no ConnOpened/ConnClosed: webfront.py
counts each under the service (and its pool) of its latest request with `enter`
and `leave`, not per server (its requests use pooled upstream connections).
"""

from __future__ import annotations

from collections.abc import Mapping

from .events import ConnClosed, ConnOpened, EventBus, UdpSessionEnded, UdpSessionStarted

Refs = dict[str, int]  # client address → live connections + sessions


class _Pin:
    """A (service, server) pair: the pool its opens were counted under, and the three tables of
    addresses it counts in, looked up once per pair rather than once per connection."""

    __slots__ = ("live", "pool", "pool_refs", "server_key", "server_refs", "service_refs")

    def __init__(self, pool: str, server_key: str, service_refs: Refs, pool_refs: Refs, server_refs: Refs) -> None:
        self.pool = pool
        self.server_key = server_key  # "pool/server"
        self.service_refs = service_refs
        self.pool_refs = pool_refs
        self.server_refs = server_refs
        self.live = 0


class Presence:
    """Distinct client addresses with a live connection or UDP session, per service/pool/server.

    Server keys are "pool/server" (a server's name is its address, which two pools may share)."""

    __slots__ = ("_pinned", "_service_pool", "by_pool", "by_server", "by_service")

    def __init__(self, bus: EventBus) -> None:
        self.by_service: dict[str, Refs] = {}
        self.by_pool: dict[str, Refs] = {}
        self.by_server: dict[str, Refs] = {}
        self._service_pool: Mapping[str, str] = {}
        self._pinned: dict[tuple[str, str], _Pin] = {}
        bus.subscribe(ConnOpened, self._opened)
        bus.subscribe(UdpSessionStarted, self._opened)
        bus.subscribe(ConnClosed, self._closed)
        bus.subscribe(UdpSessionEnded, self._closed)

    def set_pools(self, service_pool: Mapping[str, str]) -> None:
        """Which pool each service sends to (from the runtime being applied).

        Pins, and the tables of services, pools and servers, stay while idle (a short connection
        then costs no allocation of them) and are dropped here, so they are bounded by the config."""
        self._service_pool = dict(service_pool)
        self._pinned = {k: p for k, p in self._pinned.items() if p.live > 0}
        for table in (self.by_service, self.by_pool, self.by_server):
            for k in [k for k, refs in table.items() if not refs]:
                del table[k]

    def _pin(self, service: str, upstream: str) -> _Pin:
        pool = self._service_pool.get(service, "")
        server_key = f"{pool}/{upstream}"
        pin = _Pin(pool, server_key, self.by_service.setdefault(service, {}), self.by_pool.setdefault(pool, {}),
                   self.by_server.setdefault(server_key, {}))
        self._pinned[(service, upstream)] = pin
        return pin

    # Once per relayed connection each: a few dict operations, written out rather than in helpers.
    def _opened(self, ev: ConnOpened | UdpSessionStarted) -> None:
        pin = self._pinned.get((ev.service, ev.upstream))
        if pin is None:
            pin = self._pin(ev.service, ev.upstream)
        pin.live += 1
        ip = ev.peer.ip
        refs = pin.service_refs
        refs[ip] = refs.get(ip, 0) + 1
        refs = pin.pool_refs
        refs[ip] = refs.get(ip, 0) + 1
        refs = pin.server_refs
        refs[ip] = refs.get(ip, 0) + 1

    def _closed(self, ev: ConnClosed | UdpSessionEnded) -> None:
        if not ev.upstream:  # never relayed: never counted
            return
        pin = self._pinned.get((ev.service, ev.upstream))
        if pin is None:  # opened before this subscriber existed
            return
        pin.live -= 1
        ip = ev.peer.ip
        refs = pin.service_refs
        n = refs.get(ip, 0)
        if n > 1:
            refs[ip] = n - 1
        else:
            refs.pop(ip, None)
        refs = pin.pool_refs
        n = refs.get(ip, 0)
        if n > 1:
            refs[ip] = n - 1
        else:
            refs.pop(ip, None)
        refs = pin.server_refs
        n = refs.get(ip, 0)
        if n > 1:
            refs[ip] = n - 1
        else:
            refs.pop(ip, None)

    # ------------------------------------------------------------------ HTTP clients
    def enter(self, service: str, pool: str, ip: str) -> None:
        """An HTTP client connection now belongs to `service`, which sends to `pool` ("" if none)."""
        refs = self.by_service.setdefault(service, {})
        refs[ip] = refs.get(ip, 0) + 1
        if pool:
            refs = self.by_pool.setdefault(pool, {})
            refs[ip] = refs.get(ip, 0) + 1

    def leave(self, service: str, pool: str, ip: str) -> None:
        for refs in (self.by_service.get(service), self.by_pool.get(pool)):
            if refs is None:
                continue
            n = refs.get(ip, 0)
            if n > 1:
                refs[ip] = n - 1
            else:
                refs.pop(ip, None)

    # ------------------------------------------------------------------ reads
    def service_clients(self, service: str) -> int:
        return len(self.by_service.get(service, ()))

    def pool_clients(self, pool: str) -> int:
        return len(self.by_pool.get(pool, ()))

    def server_clients(self, pool: str, server: str) -> int:
        return len(self.by_server.get(f"{pool}/{server}", ()))

    def addresses(self, service: str | None = None) -> dict[str, int]:
        """Client address → live connections and sessions (of `service`, or of every service)."""
        if service is not None:
            return dict(self.by_service.get(service, {}))
        out: dict[str, int] = {}
        for refs in self.by_service.values():
            for ip, n in refs.items():
                out[ip] = out.get(ip, 0) + n
        return out
