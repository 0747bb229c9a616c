"""The composition root: config → runtime → edge → guard → access log → admin API, wired and run.

Nothing else in the package knows all the parts; each part knows only what it
is given here. Adding a route action (handoff, say) means writing its module
and choosing it in `RuntimeBuilder`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from .accesslog import AccessLog
from .admin.api import AdminAPI
from .config.loader import ConfigError, load
from .config.schema import Config, ServiceSettings
from .edge import BindError, Edge
from .events import EventBus
from .guard.validate import config_problems as jail_problems
from .guard_adapter import GuardAdapter
from .net.forward import Forward
from .routing import Action
from .runtime import Runtime
from .runtime import build_runtime as _build_runtime
from .tls.certstore import config_problems as certificate_problems
from .upstream.pool import Pool, Upstreams
from .webfront import CertificateError, Site, WebFront, is_http_service

log = logging.getLogger("edgeward")


class StartError(Exception):
    """The edge cannot start (cannot bind, cannot open the admin API...); the message says why."""


def load_config(path: str | Path) -> Config:
    """Read and check a config file (the guard checks its jails and filters, the certificate store
    its certificate files). Raises ConfigError with every problem at file:line:col."""
    return load(path, checks=(jail_problems, certificate_problems))


class RuntimeBuilder:
    """Config → runtime, deciding each service's action: `Forward` for addresses and pools of
    host:port servers, `ServeHttp` (webfront.py) for http:// and https:// upstreams.

    With a `WebFront` (a running edge), the HTTP part of the last runtime built waits in `site`
    until the edge applies that runtime; without one (`edgeward check`) a throwaway is used."""

    def __init__(self, front: WebFront | None = None) -> None:
        self.front = front
        self.site: Site | None = None

    def __call__(self, cfg: Config, upstreams: Upstreams) -> Runtime:
        front = self.front if self.front is not None else WebFront(EventBus())
        site = front.new_site(cfg)

        def make_action(service: str, svc: ServiceSettings, pool: Pool) -> Action:
            if is_http_service(cfg, svc):
                return site.action(service, svc, pool)
            return Forward(pool, svc.proxy_protocol or pool.proxy_protocol, svc.connect_timeout or pool.connect_timeout)

        rt = _build_runtime(cfg, upstreams, make_action, site.finish)
        self.site = site
        return rt


def build_runtime(cfg: Config, upstreams: Upstreams | None = None) -> Runtime:
    """The runtime of `cfg` on its own (for `edgeward check` and tests)."""
    return RuntimeBuilder()(cfg, upstreams if upstreams is not None else Upstreams())


async def serve(path: str, cfg: Config, demo: bool = False) -> None:
    """Run the edge for `cfg` until it is stopped (SIGTERM drains, SIGINT stops, SIGHUP reloads)."""
    demo_servers: list[asyncio.AbstractServer] = []
    if demo:
        from .demo import start_demo_upstreams
        demo_servers = await start_demo_upstreams()
    loop = asyncio.get_running_loop()
    bus = EventBus()
    front = WebFront(bus, loop)
    try:
        front.prepare(cfg)
    except CertificateError as e:
        raise StartError(str(e)) from None
    builder = RuntimeBuilder(front)
    edge = Edge(path, cfg, builder, load_config, loop, bus)
    front.admission = edge.admission
    state_dir = cfg.edge.state_dir

    def apply_web(_rt: Runtime) -> None:
        if builder.site is not None:
            front.apply(builder.site, state_dir)
    apply_web(edge.runtime)
    edge.on_reload.append(apply_web)
    edge.extra_status["web"] = front.status
    access_log: AccessLog | None = None
    if cfg.edge.access_log:
        try:
            access_log = AccessLog(cfg.edge.access_log, cfg.edge.access_log_format)
        except OSError as e:
            raise StartError(f"cannot open the access log {cfg.edge.access_log}: {e.strerror or e}") from None
        access_log.attach(edge.bus)
        edge.on_reload.append(lambda _rt: access_log.reopen() if access_log is not None else None)
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
    admin = AdminAPI(edge, cfg.edge.admin, cfg.edge.admin_token)
    guard.register(admin)
    try:
        await admin.start()
    except OSError as e:
        await edge.stop()
        await guard.stop()
        raise StartError(f"cannot open the admin API on {cfg.edge.admin}: {e.strerror or e}") from None
    edge.install_signals()
    try:
        await edge.wait_stopped()
    finally:
        await admin.stop()
        await front.close()
        await guard.stop()
        if access_log is not None:
            access_log.close()
        for s in demo_servers:
            s.close()


def run(path: str, cfg: Config, demo: bool = False) -> None:
    """Run on uvloop (plain asyncio where uvloop is missing). Raises StartError."""
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        runner = asyncio.run
    runner(serve(path, cfg, demo))
