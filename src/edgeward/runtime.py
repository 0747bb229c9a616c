"""The runtime: what a validated config means for this process, built once per (re)load.

`build_runtime` turns a Config into route tables per listening port; every
route carries the action its service asked for. The runtime never changes
once built: a reload builds a new one and swaps it in, while connections keep
the one they started with. Per-process state (server health, active counts,
balancer position) is not in it but in `upstream.pool.Upstreams`, which hands
the same live servers to every runtime, so that state survives reloads.

Which action a service gets is decided by the composition root (app.py), passed
in as `make_action`: this module knows routes and listeners, not the modules
that implement actions.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .config.loader import resolve_listen
from .config.schema import Config, ListenerSettings, PoolSettings, ServiceSettings
from .config.units import parse_bind
from .routing import Action, Route, RouteTable, make_route
from .upstream.pool import Pool, Upstreams

ListenerKey = tuple[str, str, int]  # (transport, host, port)

# (service name, its settings, its pool) → the action its routes carry. The pool is None only for a
# service handing off (`to` names a [handoffs] endpoint) without a fallback: it relays to nothing.
ActionFactory = Callable[[str, ServiceSettings, Pool | None], Action]


@dataclass(frozen=True, slots=True, eq=False)
class ListenerRuntime:
    """What a connection accepted on one port needs: its options and route table."""

    name: str
    settings: ListenerSettings
    table: RouteTable
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    _trust_cache: dict[str, bool] = field(default_factory=dict)

    def trusts(self, ip: str) -> bool:
        """Whether a PROXY header from `ip` is believed (trusted_proxies)."""
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


def build_runtime(cfg: Config, upstreams: Upstreams, make_action: ActionFactory,
                  extra: Callable[[], Iterable[tuple[str, Route]]] | None = None) -> Runtime:
    """Config → route tables per listening port, each route with its service's action.

    `extra`, called once every service's action is made, adds routes of the edge's own on bind
    addresses ("[::]:80": the HTTP redirect, which covers the names of the HTTP services): they
    join a listener the config has there, or make one with default settings."""
    pools = {name: upstreams.pool(name, ps) for name, ps in cfg.pools.items()}
    listener_routes: dict[ListenerKey, list[Route]] = defaultdict(list)
    listener_settings: dict[ListenerKey, tuple[str, ListenerSettings]] = {}
    all_routes = []
    for sname, svc in cfg.services.items():
        if svc.forward == "kernel":
            continue  # nftables forwards its packets (kernel_forward.py): no listener, no route here
        # A service handing off relays only to its fallback, if it has one.
        target = svc.fallback if svc.to in cfg.handoffs else svc.to
        pool: Pool | None
        if target is None:
            pool = None
        elif target in pools:
            pool = pools[target]
        else:
            # An address target is a pool of one, named after the service.
            pool = upstreams.pool(f"service:{sname}", PoolSettings(servers=[target]))
            pools[pool.name] = pool
        route = make_route(sname, make_action(sname, svc, pool), svc.names, svc.protocol, svc.alpn, svc.source)
        all_routes.append(route)
        for item in svc.listen:
            settings = cfg.listeners.get(item)
            for spec in resolve_listen(cfg, item):
                for port in spec.ports():
                    key: ListenerKey = (spec.transport, spec.host, port)
                    listener_routes[key].append(route)
                    if key not in listener_settings:
                        lname = item if settings is not None else str(spec)
                        listener_settings[key] = (lname, settings or ListenerSettings(bind=[item]))
    for bind, route in extra() if extra is not None else ():
        for spec in [parse_bind(bind)]:
            for port in spec.ports():
                key = (spec.transport, spec.host, port)
                listener_routes[key].append(route)
                listener_settings.setdefault(key, (str(spec), ListenerSettings(bind=[bind])))
    listeners = {}
    for key, routes in listener_routes.items():
        lname, ls = listener_settings[key]
        trusted = tuple(ipaddress.ip_network(c, strict=False) for c in ls.trusted_proxies)
        listeners[key] = ListenerRuntime(lname, ls, RouteTable(routes), trusted)
    return Runtime(cfg, listeners, pools, tuple(all_routes))
