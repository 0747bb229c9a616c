"""HTTP services as a route action: TLS terminated by SNI, the HTTP/1.1 proxy, the port-80 redirect.

A service whose `to` is `http://` or `https://` gets the `ServeHttp` action on
every listener it names. The sniffed first bytes decide: a TLS client is
terminated with the certificate chosen by its SNI (from `[tls]` files, else
from ACME), a plain HTTP client is served as plain HTTP; either way its
requests then go to `edgeward.http.HttpProxy`, routed by Host and path. On
the `[http] redirect` address (port 80 by default) plain requests for those
names get a permanent redirect to https, except ACME HTTP-01 challenges, which
the edge answers itself.

Terminated and relayed services share a listener: the route table looks at the
SNI first, so `cloud.example.org` may be terminated while `mail.example.org`
on the same 443 is relayed untouched.

`WebFront` lives as long as the process: the certificate store and the ACME
manager keep their state across reloads. Each runtime gets its own `Site` (its
HTTP routes per listener and its `HttpProxy`); a reload retires the old proxy,
whose connections (websockets included) carry on with the routes they began with.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config.loader import resolve_listen, service_scheme
from .config.schema import Config, ServiceSettings
from .events import EventBus, Peer
from .http import HttpProxy, HttpRoute, HttpRoutes, route_for_service
from .http.exchange import ClientConnection
from .routing import Route, make_route
from .runtime import ListenerKey
from .tls.certstore import (
    CertificateError,
    CertStore,
    certificate_from_pem,
    load_configured_files,
    tls_version,
)
from .upstream.pool import Pool, UpstreamTls

if TYPE_CHECKING:
    from .admission import Admission
    from .clients import Presence
    from .net.tcp import TcpConn
    from .stats import ServiceStats
    from .tls.acme import AcmeManager

log = logging.getLogger("edgeward.web")

ALPN = ("http/1.1",)


def is_http_service(cfg: Config, svc: ServiceSettings) -> bool:
    return service_scheme(cfg, svc) is not None


@dataclass(frozen=True, slots=True)
class ServeHttp:
    """Terminate TLS (or not, for a plain HTTP client) and serve HTTP requests."""

    site: Site
    redirect: bool = False  # the [http] redirect listener: plain requests of terminated names → https
    kind: str = "http"
    pool: Pool | None = None
    needs_sniff: bool = True  # TLS is terminated, plain HTTP served as it is: the first bytes tell which

    def start(self, conn: TcpConn) -> None:
        self.site.serve(conn, self.redirect)


class _Client:
    """An HTTP client connection as admission sees it (bans close it; limits and `status` count it),
    and the service (and pool) who-is-on counts it under, from its latest request."""

    __slots__ = ("admission", "conn", "listener", "peer", "pool", "service")

    def __init__(self, admission: Admission, peer: Peer, listener: _Named, conn: ClientConnection) -> None:
        self.admission = admission
        self.peer = peer
        self.listener = listener
        self.conn = conn
        self.service = ""
        self.pool = ""

    def close(self, reason: str = "closed") -> None:
        self.conn.close()


@dataclass(frozen=True, slots=True)
class _Named:
    name: str


class EdgeHttpProxy(HttpProxy):
    """The HTTP proxy, reporting its requests on the bus and its clients to admission."""

    def __init__(self, routes: HttpRoutes, site: Site) -> None:
        super().__init__(routes, site.cfg.http, events=site.front.bus,
                         acme_http01=site.front.acme.http01_response if site.front.acme is not None else None,
                         loop=site.front.loop)
        self.site = site
        self.service_stats = site.front.services  # (again when the site starts serving: WebFront.apply)
        self.admitted: dict[ClientConnection, _Client] = {}
        self._listeners: dict[str, _Named] = {}  # one per listener, shared by its clients
        self.on_service = self._on_service

    def admit(self, conn: ClientConnection, peer: Peer, listener: str) -> None:
        admission = self.site.front.admission
        if admission is None:
            return
        named = self._listeners.get(listener)
        if named is None:
            named = self._listeners[listener] = _Named(listener)
        entry = _Client(admission, peer, named, conn)
        self.admitted[conn] = entry
        admission.add_tcp(entry)

    def _on_service(self, conn: ClientConnection, service: str) -> None:
        entry = self.admitted.get(conn)
        presence = self.site.front.presence
        if entry is None or presence is None:
            return
        if entry.service:
            presence.leave(entry.service, entry.pool, entry.peer.ip)
        entry.service = service
        entry.pool = self.site.service_pool.get(service, "")  # kept: a reload may move the service
        presence.enter(service, entry.pool, entry.peer.ip)

    def _forget(self, conn: ClientConnection) -> None:
        entry = self.admitted.pop(conn, None)
        if entry is not None:
            entry.admission.remove_tcp(entry)
            presence = self.site.front.presence
            if entry.service and presence is not None:
                presence.leave(entry.service, entry.pool, entry.peer.ip)

    def connection_lost(self, conn: ClientConnection) -> None:
        super().connection_lost(conn)
        self._forget(conn)

    def connection_failed(self, conn: ClientConnection) -> None:
        self._forget(conn)


class Site:
    """The HTTP services of one runtime: routes per listener, the redirect, the proxy serving them."""

    def __init__(self, front: WebFront, cfg: Config) -> None:
        self.front = front
        self.cfg = cfg
        self.files = load_configured_files(cfg.tls)  # read now: a reload with a bad file is refused
        self.routes: dict[ListenerKey, list[HttpRoute]] = {}
        self.names: set[str] = set()  # every name of an HTTP service: terminated when TLS arrives
        self.https_ports: Counter[int] = Counter()
        self._https_port: int | None = None  # https_port(), once the services are all in
        self.by_listener: dict[ListenerKey, HttpRoutes] = {}
        self.redirect_routes = HttpRoutes()
        self.service_pool: dict[str, str] = {}  # HTTP service → its upstream pool (who is on)
        self._proxy: EdgeHttpProxy | None = None

    def action(self, name: str, svc: ServiceSettings, pool: Pool) -> ServeHttp:
        route = route_for_service(name, svc, pool)
        self.service_pool[name] = pool.name
        up = route.upstream
        if up.ssl is not None and pool.tls is None:
            # Health checks of the pool's https:// servers speak TLS the way its requests do (those of
            # the first service using the pool, when several with different upstream_tls share it).
            pool.tls = UpstreamTls(up.ssl, up.server_name, up.pin)
        for item in svc.listen:
            for spec in resolve_listen(self.cfg, item):
                for port in spec.ports():
                    self.routes.setdefault((spec.transport, spec.host, port), []).append(route)
                    self.https_ports[port] += 1
        self.names.update(svc.names)
        return ServeHttp(self)

    def finish(self) -> list[tuple[str, Route]]:
        """Build the HTTP route tables; the redirect listener's route, if there is one to make."""
        self._https_port = None
        redirect_names = sorted(self.names)
        self.by_listener = {key: HttpRoutes(routes) for key, routes in self.routes.items()}
        extra: list[tuple[str, Route]] = []
        where = self.cfg.http.redirect
        if where != "off" and redirect_names:
            spec = resolve_listen(self.cfg, where)[0]
            key = (spec.transport, spec.host, spec.first_port)
            # Plain-HTTP services the config puts on that address keep their routes; other names redirect.
            self.by_listener[key] = HttpRoutes(self.routes.get(key, ()), redirect_names=redirect_names)
            self.redirect_routes = self.by_listener[key]
            extra.append((where, make_route("http-redirect", ServeHttp(self, redirect=True), [], "http", [], [])))
        self._proxy = EdgeHttpProxy(HttpRoutes(), self)
        return extra

    @property
    def proxy(self) -> EdgeHttpProxy:
        assert self._proxy is not None, "Site.finish() builds the proxy"
        return self._proxy

    def https_port(self) -> int:
        """Where redirects send clients: the port most HTTP services listen on (443 in production)."""
        port = self._https_port
        if port is None:
            ports = [p for p, _ in self.https_ports.most_common() if p != 80]
            port = self._https_port = ports[0] if ports else 443
        return port

    def serve(self, conn: TcpConn, redirect: bool) -> None:
        sniffed = conn.sniffed
        tls = sniffed is not None and sniffed.protocol == "tls"
        key = conn.listener.key
        routes = self.by_listener.get(key)
        if routes is None:
            conn.fail("no_route")
            return
        ctx = self.front.server_context() if tls else None
        local = conn.local
        if local is None:
            try:
                la = conn.client.getsockname()
                local = (la[0], la[1])
            except OSError:
                local = ("0.0.0.0", 0)
        peer = conn.peer
        listener = conn.listener.name
        sock = conn.detach()
        proxy = self.proxy
        client = proxy.serve(sock, (peer.ip, peer.port), local, ssl_context=ctx, scheme="https" if tls else "http",
                             redirect_to_https=redirect and not tls, client_from_trusted_proxy=peer.via_proxy,
                             routes=routes, https_port=self.https_port(), listener=listener, peer=peer)
        proxy.admit(client, peer, listener)


class WebFront:
    """Certificates (files and ACME) and the current Site, for the life of the process."""

    def __init__(self, bus: EventBus, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.bus = bus
        self.loop = loop
        self.admission: Admission | None = None
        self.presence: Presence | None = None  # who is on: HTTP clients per service
        # The edge's per-service traffic (stats.Stats.services): the proxy counts its requests there.
        self.services: defaultdict[str, ServiceStats] | None = None
        self.certs: CertStore | None = None
        self.acme: AcmeManager | None = None
        self.site: Site | None = None
        self.errors: list[str] = []
        # With workers (workers/): the master's front orders the certificates and tells of every
        # change of its ACME state (`share`); each worker's front orders none and serves the
        # master's (`follower`, `follow`).
        self.follower = False
        self._share: Callable[[], None] | None = None
        self._followed: dict[str, Any] = {}
        self._tokens: dict[str, str] = {}

    def new_site(self, cfg: Config) -> Site:
        return Site(self, cfg)

    def server_context(self) -> ssl.SSLContext | None:
        return self.certs.server_context(ALPN) if self.certs is not None else None

    def apply(self, site: Site, state_dir: str) -> None:
        """Make `site` the one serving new connections; hand ACME the names without a file certificate."""
        old = self.site
        self.site = site
        if old is not None and old is not site and old._proxy is not None:
            old._proxy.retire()
        if site._proxy is not None:
            site._proxy.service_stats = self.services
        cfg = site.cfg
        certs = self.certs
        if certs is None or certs.minimum_version != tls_version(cfg.tls.min_version):
            # A new TLS policy needs a new store; the ACME manager keeps its certificates in the
            # store it was given, so it is made anew too (it reloads them from the state dir).
            certs = self.certs = CertStore(minimum_version=tls_version(cfg.tls.min_version))
            self._retire_acme()
            certs.on_change.append(self._changed)
        certs.set_file_certificates(site.files)
        certs.set_default_name(cfg.tls.default_certificate)
        # The names no [tls] file covers (an ACME certificate already in the store does not take
        # its name out of ACME's hands: it is what ACME keeps and renews).
        files = [c for slot, c in certs.slots().items() if not slot.startswith("acme:")]
        wanted = sorted(n for n in site.names if not any(c.covers(n) for c in files))
        if self.follower:
            self._serve_followed()
            if cfg.acme.enabled and wanted:
                site.proxy.acme_http01 = self._tokens.get
            return
        if not (cfg.acme.enabled and wanted):
            if self.acme is not None:
                self.acme.manage(())
            return
        if self.acme is not None and self.acme.settings != cfg.acme:
            self._retire_acme()
        if self.acme is None:
            from .tls.acme import AcmeManager  # the acme library is imported only when ACME is used
            self.acme = AcmeManager(cfg.acme, Path(state_dir), certs)
            self.acme.on_http01.append(self._changed)
            if self.loop is not None:
                self.loop.create_task(self.acme.start())
        self.acme.manage(wanted)
        # The proxy answers HTTP-01 challenges from the current manager.
        site.proxy.acme_http01 = self.acme.http01_response

    # ------------------------------------------------------------------ ACME with workers
    def share(self, notify: Callable[[], None]) -> None:
        """Master: call `notify` after every change of what `shared_state` returns."""
        self._share = notify

    def _changed(self) -> None:
        if self._share is not None:
            self._share()

    def shared_state(self) -> dict[str, Any]:
        """Master: the ACME certificates, TLS-ALPN-01 challenge certificates and HTTP-01 answers
        in force, as a worker's front serves them (`follow`). PEM text: keys included."""
        certs = self.certs
        return {
            "certs": {slot: [c.chain_pem.decode(), c.key_pem.decode()]
                      for slot, c in (certs.slots().items() if certs is not None else ()) if slot.startswith("acme:")},
            "challenges": {name: [chain.decode(), key.decode()]
                           for name, (chain, key) in (certs.challenge_pems.items() if certs is not None else ())},
            "tokens": self.acme.http01_tokens() if self.acme is not None else {},
        }

    def follow(self, state: dict[str, Any]) -> None:
        """Worker: serve the master's ACME state (`shared_state`) from now on."""
        self._followed = state
        self._tokens.clear()  # in place: the proxy answers from this very dict
        self._tokens.update(state.get("tokens") or {})
        self._serve_followed()

    def _serve_followed(self) -> None:
        certs = self.certs
        if certs is None:
            return  # the first `apply` makes the store and serves it
        want = self._followed.get("certs") or {}
        for slot in [s for s in certs.slots() if s.startswith("acme:") and s not in want]:
            certs.remove(slot)
        for slot, (chain, key) in want.items():
            cur = certs.get(slot)
            try:
                cert = certificate_from_pem(chain.encode(), key.encode(), source="acme")
            except CertificateError as e:
                log.error("the master's certificate %s cannot be served: %s", slot, e)
                continue
            if cur is None or cur.fingerprint != cert.fingerprint:
                certs.put(slot, cert)
        challenges = self._followed.get("challenges") or {}
        for name in [n for n in certs.pending_challenges() if n not in challenges]:
            certs.clear_challenge(name)
        for name, (chain, key) in challenges.items():
            if certs.challenge_pems.get(name) != (chain.encode(), key.encode()):
                certs.set_challenge(name, chain.encode(), key.encode())

    def _retire_acme(self) -> None:
        old, self.acme = self.acme, None
        if old is not None and self.loop is not None:
            self.loop.create_task(old.close())

    async def close(self) -> None:
        if self.site is not None and self.site._proxy is not None:
            self.site._proxy.close_idle_clients()
        if self.acme is not None:
            await self.acme.close()

    def status(self) -> dict[str, object]:
        site = self.site
        return {
            "certificates": self.certs.status() if self.certs is not None else {},
            "acme": self.acme.status() if self.acme is not None else {},
            "http": site.proxy.stats() if site is not None and site._proxy is not None else {},
        }


__all__ = ["CertificateError", "ServeHttp", "Site", "WebFront", "is_http_service"]
