"""HTTP routes: (Host, path, client address) → an upstream service.

Within the HTTP layer a request is routed by its Host (exact names, then "*.example.org" wildcards
with the longer suffix first, then services without names, as in ../routing.py), then by the
longest matching path prefix (segment-aware, on the normalized path, see paths.py), then by the
longer `source` prefix. A service restricted by `source` is only found by clients in it, here as at
the edge's first routing step. When no route of an exact name takes a path, wildcard and then
nameless services are tried, so a name's specific paths can sit on top of a catch-all.

Nothing else is reachable: no route → 421 (TLS listener: a name not served here) or 404.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..config.schema import ServiceSettings, UpstreamTlsSettings
from ..upstream.pool import Pool
from .paths import prefix_matches

log = logging.getLogger("edgeward.http")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True, eq=False)
class HttpUpstream:
    """Where a service's requests go: a pool of HTTP(S) servers and how to talk to them."""

    service: str
    pool: Pool
    scheme: Literal["http", "https"]
    ssl: ssl.SSLContext | None = None  # https only
    server_name: str | None = None  # SNI and certificate name; None = the server's host
    pin: bytes | None = None  # SHA-256 of the upstream certificate (DER), checked after the handshake
    connect_timeout: float = 3.0


@dataclass(frozen=True, slots=True, eq=False)
class HttpRoute:
    upstream: HttpUpstream
    names: tuple[str, ...] = ()  # exact names and "*.example.org"; () = any Host
    paths: tuple[bytes, ...] = (b"/",)
    sources: tuple[IPNetwork, ...] = ()


@dataclass(slots=True)
class _Entry:
    prefix: bytes
    sources: tuple[IPNetwork, ...]
    upstream: HttpUpstream
    order: tuple[int, int] = field(default=(0, 0))


def _sorted(entries: list[_Entry]) -> list[_Entry]:
    for e in entries:
        src = max((n.prefixlen + (0 if n.version == 6 else 96) for n in e.sources), default=-1)
        e.order = (len(e.prefix) if e.prefix != b"/" else 0, src)
    return sorted(entries, key=lambda e: e.order, reverse=True)


class HttpRoutes:
    """The HTTP routes of one listener (immutable; a reload builds new ones).

    `redirect_names`: names (exact or "*.") that are redirected to https when no route takes them
    (a port-80 listener that also proxies plain-HTTP services)."""

    __slots__ = ("_default", "_exact", "_redirect_exact", "_redirect_wild", "_wild", "routes", "uses_paths",
                 "uses_source")

    def __init__(self, routes: Iterable[HttpRoute] = (), *, redirect_names: Iterable[str] = ()) -> None:
        self.routes = tuple(routes)
        exact: dict[str, list[_Entry]] = {}
        wild: dict[str, list[_Entry]] = {}
        default: list[_Entry] = []
        for r in self.routes:
            for prefix in r.paths:
                if not r.names:
                    default.append(_Entry(prefix, r.sources, r.upstream))
                for n in r.names:
                    target = wild.setdefault(n[1:], []) if n.startswith("*.") else exact.setdefault(n, [])
                    target.append(_Entry(prefix, r.sources, r.upstream))
        self._exact = {n: _sorted(es) for n, es in exact.items()}
        self._wild = [(suffix, _sorted(es)) for suffix, es in sorted(wild.items(), key=lambda kv: len(kv[0]), reverse=True)]
        self._default = _sorted(default)
        self.uses_source = any(r.sources for r in self.routes)
        # Only path prefixes other than "/" read the path: without them a request's path need not
        # be normalized for routing (paths.routing_path) at all.
        self.uses_paths = any(p != b"/" for r in self.routes for p in r.paths)
        names = list(redirect_names)
        self._redirect_exact = frozenset(n for n in names if not n.startswith("*."))
        self._redirect_wild = tuple(sorted((n[1:] for n in names if n.startswith("*.")), key=len, reverse=True))

    @staticmethod
    def _first(entries: list[_Entry], path: bytes, client: IPAddress | None) -> HttpUpstream | None:
        for e in entries:
            if prefix_matches(e.prefix, path) and (not e.sources or (client is not None and any(client in n for n in e.sources))):
                return e.upstream
        return None

    def lookup(self, host: str | None, path: bytes, client: IPAddress | None = None) -> HttpUpstream | None:
        """The upstream for a request, or None. `path` normalized by paths.routing_path when
        `uses_paths` (without it, every prefix is "/" and any path matches)."""
        if host is not None:
            entries = self._exact.get(host)
            if entries is not None and (up := self._first(entries, path, client)) is not None:
                return up
            for suffix, entries in self._wild:
                if host.endswith(suffix) and (up := self._first(entries, path, client)) is not None:
                    return up
        return self._first(self._default, path, client) if self._default else None

    def redirects(self, host: str) -> bool:
        """Whether this Host is one of the `redirect_names`."""
        return host in self._redirect_exact or any(host.endswith(s) for s in self._redirect_wild)

    def serves(self, host: str | None) -> bool:
        """Whether some route (or redirect name) takes this Host at all: the names terminated here."""
        if host is None:
            return False
        if host in self._exact or host in self._redirect_exact:
            return True
        return any(host.endswith(s) for s, _ in self._wild) or any(host.endswith(s) for s in self._redirect_wild)


def upstream_ssl_context(settings: UpstreamTlsSettings | None, service: str = "") -> ssl.SSLContext:
    """The client-side TLS context for an https:// upstream."""
    s = settings or UpstreamTlsSettings()
    ctx = ssl.create_default_context(cafile=s.ca) if s.ca else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if s.ca:
        # The upstream's own (self-signed or leaf) certificate may be the whole trust: accept a chain
        # that ends at any certificate of `ca`, and do not ask a leaf to look like a CA.
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    if not s.verify or (s.pin and not s.ca):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if not s.verify:
        log.warning("service %s: upstream_tls.verify = false: any certificate is accepted from its https "
                    "upstream (set upstream_tls.ca or upstream_tls.pin to check it)", service or "?")
    return ctx


def upstream_for_service(name: str, svc: ServiceSettings, pool: Pool, *, connect_timeout: float | None = None) -> HttpUpstream:
    """The HttpUpstream of an HTTP service (its pool's servers all carry the scheme)."""
    schemes = {s.target.scheme for s in pool.servers}
    if len(schemes) != 1 or None in schemes:
        raise ValueError(f"service {name!r}: pool {pool.name!r} is not a pool of http:// or https:// servers")
    scheme: Literal["http", "https"] = "https" if "https" in schemes else "http"
    tls = svc.upstream_tls
    ctx = upstream_ssl_context(tls, name) if scheme == "https" else None
    pin = bytes.fromhex(tls.pin) if tls is not None and tls.pin else None
    return HttpUpstream(name, pool, scheme, ctx, tls.server_name if tls is not None else None, pin,
                        connect_timeout if connect_timeout is not None else svc.connect_timeout or pool.connect_timeout)


def route_for_service(name: str, svc: ServiceSettings, pool: Pool, *, connect_timeout: float | None = None) -> HttpRoute:
    """The HttpRoute of an HTTP service: its names, paths and sources, to its upstream."""
    paths = tuple(p.encode() for p in svc.paths) or (b"/",)
    sources = tuple(ipaddress.ip_network(s, strict=False) for s in svc.source)
    return HttpRoute(upstream_for_service(name, svc, pool, connect_timeout=connect_timeout), tuple(svc.names), paths, sources)


def certificate_pin(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()
