"""The composition root: config → runtime → edge → guard → access log → admin API, wired and run.

Nothing else in the package knows all the parts; each part knows only what it
is given here. Adding a route action (handoff, say) means writing its module
and choosing it in `RuntimeBuilder`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .accesslog import AccessLog
from .admin.api import AdminAPI
from .config.loader import ConfigError, Problem, load, loads, service_scheme
from .config.schema import Config, ServiceSettings
from .edge import AsyncConfigLoader, BindError, ConfigLoader, Edge
from .events import EventBus
from .guard.validate import config_problems as jail_problems
from .guard_adapter import GuardAdapter
from .kernel_forward import KernelForwardError, KernelTable
from .kernel_forward import problems as kernel_problems
from .net.forward import Forward
from .net.handoff import Endpoints, HandOff
from .net.sockets import check_transparent
from .net.transparent import transparent_of
from .routing import Action
from .runtime import Runtime
from .runtime import build_runtime as _build_runtime
from .systemd import Supervision
from .upstream.pool import Pool, Upstreams
from .workers.settings import worker_count

if TYPE_CHECKING:
    from .admission import Admission
    from .clients import Presence
    from .stats import ServiceStats
    from .webfront import Site, WebFront
    from .workers import MasterEdge

log = logging.getLogger("edgeward")


class StartError(Exception):
    """The edge cannot start (cannot bind, cannot open the admin API...); the message says why."""


def _certificate_problems(cfg: Config) -> Iterable[tuple[tuple[str | int, ...], str, str]]:
    if not cfg.tls.certificates:
        return ()
    from .tls.certstore import (
        config_problems,  # cryptography is imported only for configs with certificates
    )
    return config_problems(cfg)


def load_config(path: str | Path) -> Config:
    """Read and check a config file (the guard checks its jails and filters, the certificate store
    its certificate files). Raises ConfigError with every problem at file:line:col."""
    return load(path, checks=(jail_problems, _certificate_problems, kernel_problems))


def load_config_text(text: str, name: str) -> Config:
    """`load_config` of a config's text (the daemon's config checker gets it on its stdin)."""
    return loads(text, name, checks=(jail_problems, _certificate_problems, kernel_problems))


def has_http_services(cfg: Config) -> bool:
    return any(service_scheme(cfg, svc) is not None for svc in cfg.services.values())


class RuntimeBuilder:
    """Config → runtime, deciding each service's action: `Forward` for addresses and pools of
    host:port servers, `ServeHttp` (webfront.py) for http:// and https:// upstreams.

    The web front (TLS, ACME, the HTTP proxy) is made, and its modules imported, only once a
    config has HTTP services. The HTTP part of the last runtime built waits in `site` until the
    edge applies that runtime (`apply_web`)."""

    def __init__(self, bus: EventBus | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 state_dir: str = "", check_privileges: bool = False) -> None:
        self.bus = bus if bus is not None else EventBus()
        # A builder for a running edge refuses configs this process lacks the privileges for
        # (transparent mode); `edgeward check` and tests build runtimes without that check.
        self.check_privileges = check_privileges
        self.loop = loop
        self.state_dir = state_dir
        self.admission: Admission | None = None
        self.presence: Presence | None = None
        self.services: defaultdict[str, ServiceStats] | None = None  # the edge's per-service stats
        self.front: WebFront | None = None
        self.site: Site | None = None
        self.endpoints = Endpoints()  # handoff endpoints, kept across reloads
        # With workers: what the web front is in this process (the master's orders certificates,
        # a worker's serves the master's), set on it when it is made.
        self.web_role: Callable[[WebFront], None] | None = None

    def web(self) -> WebFront:
        if self.front is None:
            from .webfront import WebFront
            self.front = WebFront(self.bus, self.loop)
            self.front.admission = self.admission
            self.front.presence = self.presence
            self.front.services = self.services
            if self.web_role is not None:
                self.web_role(self.front)
        return self.front

    def __call__(self, cfg: Config, upstreams: Upstreams) -> Runtime:
        if self.check_privileges and (problems := transparent_problems(cfg)):
            raise ConfigError(problems)
        if not has_http_services(cfg):
            self.site = None
            return _build_runtime(cfg, upstreams, self._relay_action(cfg))
        from .webfront import CertificateError
        front = self.web()
        try:
            site = front.new_site(cfg)
        except CertificateError as e:
            raise ConfigError([Problem("[tls]", 1, 1, str(e), "check the certificate files")]) from None

        relay = self._relay_action(cfg)

        def make_action(service: str, svc: ServiceSettings, pool: Pool | None) -> Action:
            if pool is not None and service_scheme(cfg, svc) is not None:
                return site.action(service, svc, pool)
            return relay(service, svc, pool)

        rt = _build_runtime(cfg, upstreams, make_action, site.finish)
        self.site = site
        return rt

    def _relay_action(self, cfg: Config) -> Callable[[str, ServiceSettings, Pool | None], Action]:
        """Actions of services whose bytes the edge never reads: `Forward`, or `HandOff`
        (net/handoff.py) for a service whose `to` is a [handoffs] endpoint."""
        def make_action(service: str, svc: ServiceSettings, pool: Pool | None) -> Action:
            if svc.to in cfg.handoffs:
                endpoint = self.endpoints.get(svc.to, cfg.handoffs[svc.to])
                fallback = forward_action(service, svc, pool, transparent_of(cfg, svc)) if pool is not None else None
                return HandOff(endpoint, fallback)
            assert pool is not None
            return forward_action(service, svc, pool, transparent_of(cfg, svc))
        return make_action

    def apply_web(self, _rt: Runtime) -> None:
        """The edge serves the runtime built last: its HTTP part starts serving too."""
        if self.site is not None and self.front is not None:
            self.front.apply(self.site, self.state_dir)

    def web_status(self) -> dict[str, object]:
        return self.front.status() if self.front is not None else {}

    async def close(self) -> None:
        if self.front is not None:
            await self.front.close()


def forward_action(service: str, svc: ServiceSettings, pool: Pool, transparent: bool = False) -> Forward:
    return Forward(pool, svc.proxy_protocol or pool.proxy_protocol, svc.connect_timeout or pool.connect_timeout,
                   transparent)


def transparent_problems(cfg: Config) -> list[Problem]:
    """Transparent upstream connections need CAP_NET_ADMIN: refuse a config that asks for them when
    this process cannot make them, rather than failing every connection."""
    users = [f"services.{n}" for n, svc in cfg.services.items() if transparent_of(cfg, svc)]
    if not users:
        return []
    try:
        check_transparent()
    except PermissionError:
        return [Problem("[" + users[0] + "]", 1, 1,
                        f"transparent upstream connections ({', '.join(users)}) need CAP_NET_ADMIN, which this "
                        "process does not have",
                        "run edgeward as root, or grant it (systemd: AmbientCapabilities=CAP_NET_ADMIN)")]
    return []


def build_runtime(cfg: Config, upstreams: Upstreams | None = None) -> Runtime:
    """The runtime of `cfg` on its own (for `edgeward check` and tests)."""
    return RuntimeBuilder()(cfg, upstreams if upstreams is not None else Upstreams())


async def serve(path: str, cfg: Config, demo: bool = False, load: ConfigLoader = load_config,
                load_async: AsyncConfigLoader | None = None) -> None:
    """Run the edge for `cfg` until it is stopped (SIGTERM drains, SIGINT stops, SIGHUP reloads).
    Reloads read the config with `load_async` if given (the daemon: config_checker.py), else `load`."""
    demo_servers: list[asyncio.AbstractServer] = []
    if demo:
        from .demo import start_demo_upstreams
        demo_servers = await start_demo_upstreams()
    loop = asyncio.get_running_loop()
    builder = RuntimeBuilder(EventBus(), loop, cfg.edge.state_dir, check_privileges=True)
    workers = worker_count(cfg)
    master: MasterEdge | None = None
    try:
        if workers > 1:  # a master: the control plane here, the data plane in `workers` processes
            # Imported here: a single-process edge never loads the master's side (~0.9 MB of RSS).
            from .workers import MasterEdge
            m = master = MasterEdge(path, cfg, builder, load, workers, loop, builder.bus)
            # ACME runs here; the workers serve what it gets (and its challenge answers).
            m.acme_state = lambda: builder.front.shared_state() if builder.front is not None else None
            builder.web_role = lambda front: front.share(m.acme_changed)
            if builder.front is not None:
                builder.front.share(m.acme_changed)
            edge: Edge = m
        else:
            edge = Edge(path, cfg, builder, load, loop, builder.bus)
    except ConfigError as e:
        raise StartError(str(e)) from None
    edge.load_async = load_async
    _wire_web(builder, edge)
    # With workers, each writes its own lines (to the same file, appending whole lines).
    access_log = _access_log(cfg, edge) if workers == 1 else None
    if workers == 1:
        edge.on_reload.append(lambda rt: log.warning("workers = %s takes effect at the next start",
                                                     rt.config.edge.workers) if worker_count(rt.config) != 1 else None)
    guard = GuardAdapter.from_config(edge, cfg)
    await guard.start()
    try:
        await edge.start()
    except ConfigError as e:
        await guard.stop()
        cause = e.__cause__
        raise StartError(str(cause) if isinstance(cause, BindError) else str(e)) from None
    except OSError as e:
        await guard.stop()
        raise StartError(f"cannot start: {e}") from None
    kernel = KernelTable(cfg.kernel, cfg.edge.state_dir)
    try:
        await kernel.apply(cfg)
    except KernelForwardError as e:
        await edge.stop()
        await guard.stop()
        raise StartError(f"cannot forward in the kernel: {e}") from None

    def kernel_follows(rt: Runtime) -> None:
        async def apply() -> None:
            try:
                await kernel.apply(rt.config)
            except KernelForwardError as e:
                log.error("reload: kernel forwarding kept as it was: %s", e)
                edge.counters.inc("reloads", "kernel_failed")
        task = loop.create_task(apply())
        kernel_tasks.add(task)
        task.add_done_callback(kernel_tasks.discard)
    kernel_tasks: set[asyncio.Task[None]] = set()
    edge.on_reload.append(kernel_follows)
    edge.extra_status["kernel"] = lambda: {"table": kernel.settings.table, "applied": kernel.applied,
                                           "rules": kernel.rules}
    admin = AdminAPI(edge, cfg.edge.admin, cfg.edge.admin_token)
    guard.register(admin)
    try:
        await admin.start()
    except OSError as e:
        await edge.stop()
        await kernel.remove()
        await guard.stop()
        raise StartError(f"cannot open the admin API on {cfg.edge.admin}: {e.strerror or e}") from None
    edge.install_signals()
    supervision = Supervision.from_env(lambda: _summary(edge, master))
    if supervision is not None:
        # Listeners bound, bans restored, admin API up: ready (systemd Type=notify).
        edge.on_reload_start.append(supervision.reloading)
        edge.on_reload_done.append(lambda _applied: supervision.reloaded())
        edge.on_drain.append(supervision.stopping)
        supervision.ready()
    if access_log is not None:
        loop.add_signal_handler(signal.SIGUSR1, access_log.reopen)  # logrotate's postrotate: kill -USR1
    elif master is not None:
        loop.add_signal_handler(signal.SIGUSR1, master.reopen_logs)
    # Everything built so far (modules, config, runtime) lives as long as the process: move it out
    # of the cyclic collector's sight, so that collections triggered by per-connection objects do
    # not walk it again and again.
    edge.memory.give_back()
    gc.freeze()
    try:
        await edge.wait_stopped()
    finally:
        if supervision is not None:
            await supervision.close()
        await admin.stop()
        await kernel.remove()
        await builder.close()
        await guard.stop()
        if access_log is not None:
            access_log.close()
        for s in demo_servers:
            s.close()


def _wire_web(builder: RuntimeBuilder, edge: Edge) -> None:
    builder.admission = edge.admission
    builder.presence = edge.presence
    builder.services = edge.stats.services
    if builder.front is not None:
        builder.front.admission = edge.admission
        builder.front.presence = edge.presence
        builder.front.services = edge.stats.services
    builder.apply_web(edge.runtime)
    edge.on_reload.append(builder.apply_web)
    edge.extra_status["web"] = builder.web_status


def _access_log(cfg: Config, edge: Edge) -> AccessLog | None:
    if not cfg.edge.access_log:
        return None
    try:
        access_log = AccessLog(cfg.edge.access_log, cfg.edge.access_log_format)
    except OSError as e:
        raise StartError(f"cannot open the access log {cfg.edge.access_log}: {e.strerror or e}") from None
    access_log.attach(edge.bus)
    edge.on_reload.append(lambda _rt: access_log.reopen())
    return access_log


async def serve_worker(control: socket.socket) -> None:
    """One worker of a master (`[edge] workers = N`): the data plane only, until the master says
    stop (or goes away). Its listening sockets, bans and server health come from the master."""
    from .workers import WorkerLink
    loop = asyncio.get_running_loop()
    link = WorkerLink(control, loop)
    init = await link.wait_init()
    cfg = link.load()  # as the master checked it
    builder = RuntimeBuilder(EventBus(), loop, cfg.edge.state_dir, check_privileges=True)

    def follower(front: WebFront) -> None:
        front.follower = True  # no ACME here: the master's certificates and challenge answers
        front.follow(link.acme)
    builder.web_role = follower
    link.web_front = lambda: builder.front
    edge = Edge(str(init["path"]), cfg, builder, link.load, loop, builder.bus)
    _wire_web(builder, edge)
    link.attach(edge, bool(init.get("conn_reports")), bool(init.get("http_reports", True)))
    access_log = _access_log(cfg, edge)
    if access_log is not None:
        link.reopen.append(access_log.reopen)
    try:
        await edge.start()
    except (ConfigError, OSError) as e:
        raise StartError(f"worker {link.index}: cannot start: {e.__cause__ or e}") from None
    for sig in (signal.SIGHUP, signal.SIGUSR1):  # the master reloads and reopens, and tells us
        loop.add_signal_handler(sig, lambda: None)
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(edge.drain()))
    loop.add_signal_handler(signal.SIGINT, lambda: loop.create_task(edge.drain(0)))
    link.ready()
    gc.freeze()
    try:
        await edge.wait_stopped()
    finally:
        link.close()
        await builder.close()
        if access_log is not None:
            access_log.close()


def run_worker(control_fd: int) -> None:
    """`edgeward worker`: started by a master, never by hand."""
    _runner()(serve_worker(socket.socket(fileno=control_fd)))


def _summary(edge: Edge, master: MasterEdge | None = None) -> str:
    """One line for systemd's STATUS= (`systemctl status edgeward`); `master` is `edge` with workers."""
    adm = edge.admission
    bans = adm.bans
    banned = len(bans) if isinstance(bans, Sized) else 0
    if master is not None:  # the connections are the workers' (`edgeward status` adds them up)
        alive = sum(1 for w in master.workers if w.alive)
        return (f"{alive} of {master.count} workers running ({master.restarts} restarts); "
                f"{master.describe_listeners()}; {banned} banned; {master.reloads} reloads")
    return (f"{len(edge.listeners)} TCP and {len(edge.udp_listeners)} UDP listeners; {adm.tcp_count} connections, "
            f"{adm.udp_count} UDP sessions, {adm.distinct_clients()} clients; {banned} banned; "
            f"{edge.reloads} reloads")


def run(path: str, cfg: Config, demo: bool = False, load: ConfigLoader = load_config,
        load_async: AsyncConfigLoader | None = None) -> None:
    """Run on uvloop (plain asyncio where uvloop is missing). Raises StartError."""
    _runner()(serve(path, cfg, demo, load, load_async))


def _runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop
        return uvloop.run  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        return asyncio.run
