"""The running edge (one process): its listeners, and their start, reload, drain and stop.

The `Edge` owns the listening sockets and the data plane's context
(`net.plane.DataPlane`: event bus, counters, admission, live connections); the
runtime it serves comes from `build` (app.py passes in how a config becomes a
runtime). A reload builds a new runtime and swaps it into the listeners;
connections keep the one they started with, and unchanged listening sockets
stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import logging
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .admission import Admission
from .clients import Presence
from .config.loader import ConfigError
from .config.schema import Config
from .events import EventBus, HealthChanged
from .net import sockets
from .net.pipes import HAS_SPLICE
from .net.plane import CLOCK_STEP, DataPlane
from .net.tcp import TcpListener, listener_settings_summary
from .net.udp import UdpListener
from .runtime import ListenerKey, Runtime
from .stats import Counters, Stats
from .upstream.health import HealthChecker
from .upstream.pool import Pool, Server, Upstreams

log = logging.getLogger("edgeward")

RuntimeBuilder = Callable[[Config, Upstreams], Runtime]
ConfigLoader = Callable[[str], Config]
# A loader that waits for another process (the daemon's config checker), the loop serving meanwhile:
# called when the reload is asked (it reads the file then), awaited when the reloads before it are done.
AsyncConfigLoader = Callable[[str], Awaitable[Config]]


def raise_nofile(want: int | str) -> tuple[int, int]:
    """Raise the open-files soft limit (to the hard limit for "max"); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want == "max" else int(want)
    if hard != resource.RLIM_INFINITY and target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target, target
        except (ValueError, OSError):
            log.warning("cannot raise the open-files hard limit from %d to %d (needs root); using %d", hard, target, hard)
            target = hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit to %d: %s", target, e)
    return soft, hard


def service_pools(rt: Runtime) -> dict[str, str]:
    """Service → the name of the pool its action sends to (services without one are left out)."""
    return {r.service: r.action.pool.name for r in rt.routes if r.action.pool is not None}


class BindError(Exception):
    pass


class MemoryReturn:
    """Gives memory back to the system after a burst of connections has ended.

    A closed relayed connection is partly held in reference cycles (connection <-> flows), which
    only the cycle collector frees, and gc.freeze() at start keeps the long-lived heap out of its
    full collections, which then run rarely: after 9,000 connections close, RSS stayed ~24 MB above
    its start. When the count of live connections and sessions has fallen to under half of a
    peak at least BURST above it, and has stopped falling, one full collection frees them, and
    glibc's malloc_trim(0) hands the free pages back (a few ms; at most once per COOLDOWN seconds; measured: RSS back
    to ~5 MB above start, tests/reliability's burst case)."""

    BURST = 1000
    COOLDOWN = 10.0

    def __init__(self) -> None:
        self.peak = 0
        self.prev = 0
        self.last = 0.0
        self.runs = 0
        self._trim: Callable[[int], object] | None = None
        self._looked_up = False

    def after_sweep(self, live: int, peak: int) -> None:
        """`live` now, `peak`: the most at once since the last sweep."""
        falling, self.prev = live < self.prev, live
        if peak > self.peak:
            self.peak = peak
        if live == self.peak:
            return
        if self.peak - live < self.BURST or live * 2 > self.peak or falling:
            return  # no burst ended, or it is still ending: once, when the count has settled
        now = time.monotonic()
        if now - self.last < self.COOLDOWN:
            return
        self.last, self.peak = now, live
        self.give_back()
        self.runs += 1

    def give_back(self) -> None:
        """One full collection, then the free pages back to the system. Also run once after start:
        building the config's schema and the runtime leaves ~2 MB of freed heap behind."""
        gc.collect()
        trim = self._malloc_trim()
        if trim is not None:
            trim(0)

    def status(self) -> dict[str, int]:
        """For `edgeward status`: this process' RSS and how often a burst was given back."""
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * resource.getpagesize() // 1024
        except (OSError, ValueError, IndexError):
            rss = 0
        return {"rss_kib": rss, "after_burst_collections": self.runs}

    def _malloc_trim(self) -> Callable[[int], object] | None:
        if not self._looked_up:
            self._looked_up = True
            try:
                import ctypes
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc
                self._trim = None
        return self._trim


class Edge:
    """Listeners, the data plane they feed, and the lifecycle around them."""

    def __init__(self, config_path: str | None, cfg: Config, build: RuntimeBuilder, load: ConfigLoader,
                 loop: asyncio.AbstractEventLoop | None = None, bus: EventBus | None = None) -> None:
        self.config_path = config_path
        self.build = build
        self.load = load
        # When set (`edgeward run`), reloads (SIGHUP, the admin API) read the config with it instead
        # of `load`, as `reload_async`.
        self.load_async: AsyncConfigLoader | None = None
        self._reloading = asyncio.Lock()  # one reload at a time, in the order asked
        self._reload_tasks: set[asyncio.Task[bool]] = set()
        self._waiting_signal_reload: asyncio.Task[bool] | None = None  # a SIGHUP's, before its turn
        self.loop = loop or asyncio.get_event_loop()
        self.bus = bus if bus is not None else EventBus()
        self.counters = Counters()
        self.stats = Stats(self.bus, self.counters)
        self.presence = Presence(self.bus)  # distinct clients per service, pool and server
        self.upstreams = Upstreams()
        self.runtime = build(cfg, self.upstreams)
        self.presence.set_pools(service_pools(self.runtime))
        self.plane = DataPlane(self.loop, Admission(cfg.edge), self.bus, self.counters, cfg.edge.splice)
        self.listeners: dict[ListenerKey, TcpListener] = {}
        self.udp_listeners: dict[ListenerKey, UdpListener] = {}
        self.health = self._health_checker(self.runtime)
        # A worker process (workers/) gets its listening sockets from the master and its servers'
        # health from the master's checks: it swaps these three.
        self.listen_tcp: Callable[[str, int, int, bool], socket.socket] = sockets.listen_tcp
        self.bind_udp: Callable[[str, int, bool], socket.socket] = sockets.bind_udp
        self.active_health = True
        self.nofile: tuple[int, int] = (0, 0)
        self.started_at = time.time()
        self.reloads = 0
        self.on_reload: list[Callable[[Runtime], None]] = []  # parts that follow the config (the HTTP layer...)
        # Watchers of the lifecycle (systemd's notify socket): a reload starting and done (applied or
        # not), draining started.
        self.on_reload_start: list[Callable[[], None]] = []
        self.on_reload_done: list[Callable[[bool], None]] = []
        self.on_drain: list[Callable[[], None]] = []
        # Parts plugged in at start (the guard) add their own sections to `status`.
        self.extra_status: dict[str, Callable[[], object]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.memory = MemoryReturn()
        self.extra_status["memory"] = self.memory.status
        self._stopped = asyncio.Event()

    @property
    def admission(self) -> Admission:
        return self.plane.admission

    def _health_checker(self, rt: Runtime) -> HealthChecker:
        def changed(pool: Pool, server: Server, healthy: bool) -> None:
            self.bus.publish(HealthChanged(pool.name, server.name, healthy))
        return HealthChecker(list(rt.pools.values()), changed, sockets.open_stream)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.nofile = raise_nofile(self.runtime.config.edge.nofile)
        log.info("open-files limit: soft %d, hard %d", *self.nofile)
        self._open_listeners(self.runtime)
        self._resume_all()
        if self.active_health:
            self.health.start()
        self._sweeper = self.loop.create_task(self._sweep())
        log.info("edgeward started: %s, splice=%s", self.describe_listeners(), self.plane.splice)

    def _resume_all(self) -> None:
        for lst in self.listeners.values():
            lst.resume()
        for ulst in self.udp_listeners.values():
            ulst.resume()

    def _open_listeners(self, rt: Runtime) -> None:
        """Bind what is new, keep what is unchanged, close what is gone. All-or-nothing on bind errors."""
        plane = self.plane
        opened: dict[ListenerKey, TcpListener] = {}
        opened_udp: dict[ListenerKey, UdpListener] = {}
        try:
            for key, lrt in rt.listeners.items():
                transport, host, port = key
                if transport == "udp":
                    ucur = self.udp_listeners.get(key)
                    if ucur is None:
                        opened_udp[key] = UdpListener(plane, host, port, lrt,
                                                      self.bind_udp(host, port, lrt.settings.reuseport))
                    elif ucur.rt.settings.reuseport != lrt.settings.reuseport:
                        # A new SO_REUSEPORT setting needs a new socket on the same port; sessions stay.
                        try:
                            ucur.rebind(functools.partial(self.bind_udp, host, port, lrt.settings.reuseport))
                        except OSError:
                            ucur.close()
                            del self.udp_listeners[key]
                            raise
                    continue
                cur = self.listeners.get(key)
                if cur is not None:
                    if listener_settings_summary(cur.rt.settings) == listener_settings_summary(lrt.settings):
                        continue
                    # Options changed: a new socket needs the port, so close and rebind.
                    cur.close()
                    del self.listeners[key]
                sock = self.listen_tcp(host, port, lrt.settings.backlog, lrt.settings.reuseport)
                opened[key] = TcpListener(plane, host, port, lrt, sock)
        except OSError as e:
            for lst in opened.values():
                lst.close()
            for ulst in opened_udp.values():
                ulst.close()
            raise ConfigError([]) from BindError(sockets.bind_failure(transport, host, port, lrt.name, e))
        for key, lst in list(self.listeners.items()):
            if key not in rt.listeners:
                lst.close()
                del self.listeners[key]
            else:
                lst.rt = rt.listeners[key]
                lst.name = lst.rt.name
        for key, ulst in list(self.udp_listeners.items()):
            if key not in rt.listeners:
                ulst.close()  # its sessions end: their replies could not reach the clients any more
                del self.udp_listeners[key]
            else:
                ulst.rt = rt.listeners[key]  # new sessions use the new runtime; live ones keep theirs
                ulst.name = ulst.rt.name
        self.listeners.update(opened)
        self.udp_listeners.update(opened_udp)

    def reload(self) -> bool:
        """Re-read the config; on any error keep the running one. Returns True if applied."""
        if self.config_path is None:
            return False
        for fn in self.on_reload_start:
            fn()
        applied = False
        try:
            applied = self._reload(self.config_path)
        finally:
            for done in self.on_reload_done:
                done(applied)
        return applied

    async def reload_async(self, on_turn: Callable[[], None] | None = None) -> bool:
        """`reload`, reading the config with `load_async` when set: the event loop keeps serving
        while another process checks the file. Returns True if applied. `on_turn` is called when
        this reload's turn comes (reloads run one at a time, in the order asked)."""
        if self.load_async is None or self.config_path is None:
            if on_turn is not None:
                on_turn()
            return self.reload()
        try:  # the file as it is now, even if reloads before this one are still being checked
            pending: Awaitable[Config] | ConfigError | OSError = self.load_async(self.config_path)
        except (ConfigError, OSError) as e:
            pending = e
        try:
            await self._reloading.acquire()
        except asyncio.CancelledError:  # stopping: this reload never runs (nor its check)
            if inspect.iscoroutine(pending):
                pending.close()
            raise
        try:
            if on_turn is not None:
                on_turn()
            for fn in self.on_reload_start:
                fn()
            applied = False
            try:
                try:
                    if isinstance(pending, ConfigError | OSError):
                        raise pending
                    cfg = await pending
                except (ConfigError, OSError) as e:
                    self._rejected(e)
                    return False
                if self.plane.admission.draining:  # stopping meanwhile: nothing to reload
                    log.info("reload dropped: the edge is stopping")
                    return False
                applied = self._apply_config(cfg)
            finally:
                for done in self.on_reload_done:
                    done(applied)
            return applied
        finally:
            self._reloading.release()

    def _reload_signal(self) -> None:
        waiting = self._waiting_signal_reload
        if waiting is not None and not waiting.done():
            # A newer SIGHUP supersedes one still waiting for its turn (it would apply an older
            # text, then this one would apply the newer): a storm of signals makes at most two
            # checks (the running one and the last), not one each.
            waiting.cancel()
            log.info("reload: a newer SIGHUP supersedes the one still waiting for its turn")
        task = self.loop.create_task(self.reload_async(on_turn=self._signal_reload_turn))
        self._waiting_signal_reload = task
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    def _signal_reload_turn(self) -> None:
        self._waiting_signal_reload = None

    def _rejected(self, e: ConfigError | OSError) -> None:
        if isinstance(e, ConfigError):
            log.error("reload rejected, keeping the running config:\n%s", e.__cause__ or e)
        else:
            log.error("reload rejected, keeping the running config: %s", e)
        self.counters.inc("reloads", "rejected")

    def _reload(self, path: str) -> bool:
        try:
            cfg = self.load(path)
        except (ConfigError, OSError) as e:
            self._rejected(e)
            return False
        return self._apply_config(cfg)

    def _apply_config(self, cfg: Config) -> bool:
        """Build `cfg`'s runtime and serve it; on an error keep the running one. True if applied."""
        try:
            rt = self.build(cfg, self.upstreams)
            self._open_listeners(rt)
        except (ConfigError, OSError) as e:
            self._rejected(e)
            return False
        old_health = self.health
        self.runtime = rt
        self.presence.set_pools(service_pools(rt))
        self.upstreams.keep_only(set(rt.pools))
        self.plane.admission.settings = cfg.edge
        self.plane.splice = HAS_SPLICE and cfg.edge.splice
        self.health = self._health_checker(rt)
        self.loop.create_task(old_health.stop())
        if self.active_health:
            self.health.start()
        for fn in self.on_reload:
            fn(rt)
        if not self.plane.admission.draining:
            self._resume_all()
        self.reloads += 1
        self.counters.inc("reloads", "applied")
        log.info("reloaded %s: %s", self.config_path, self.describe_listeners())
        return True

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; let connections finish up to the drain timeout; then close the rest.

        UDP listeners stay open while TCP connections drain, forwarding for the sessions they
        have (admission refuses new ones); they close with everything else at the end."""
        self.plane.admission.draining = True
        for fn in self.on_drain:
            fn()
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()
        limit = self.runtime.config.edge.drain_timeout if timeout is None else timeout
        deadline = self.loop.time() + limit
        conns = self.plane.conns
        while conns and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if conns:
            log.info("drain timeout: closing %d connections", len(conns))
        for c in list(conns):
            c.close("drain")
        await self.stop()

    async def stop(self) -> None:
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()
        for ulst in self.udp_listeners.values():
            ulst.close("stop")
        self.udp_listeners.clear()
        for c in list(self.plane.conns):
            c.close("stop")
        await self.health.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.plane.close()
        self._stopped.set()

    def describe_listeners(self) -> str:
        return f"{len(self.listeners)} TCP and {len(self.udp_listeners)} UDP listeners"

    async def plane_reports(self, full: bool) -> list[dict[str, Any]] | None:
        """The state of the worker processes' data planes (status.py merges them), or None: this
        process is the data plane (workers = 1, or a worker itself)."""
        return None

    async def plane_clients(self, service: str | None, address: str | None, limit: int) -> list[dict[str, Any]] | None:
        """The workers' live clients (`status.live_clients` of each, with `addresses`), or None."""
        return None

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signals(self) -> None:
        self.loop.add_signal_handler(signal.SIGHUP, self._reload_signal)
        self.loop.add_signal_handler(signal.SIGTERM, lambda: self.loop.create_task(self.drain()))
        self.loop.add_signal_handler(signal.SIGINT, lambda: self.loop.create_task(self.drain(0)))

    async def _sweep(self) -> None:
        """Once a second: refresh the coarse clock connections stamp activity with; close idle ones."""
        plane = self.plane
        while True:
            await asyncio.sleep(CLOCK_STEP)
            # A stamp lags its activity by up to the step that followed it; that step may have
            # been longer than CLOCK_STEP when the loop was busy: the longer of the two is added.
            now = time.monotonic()
            step = max(CLOCK_STEP, now - plane.now)
            plane.now = now
            idle_since = now - step
            for c in [c for c in plane.conns if idle_since - c.last > c.rt.settings.idle_timeout]:
                if c.flows is not None:
                    c.close("idle_timeout")
                else:
                    c.fail("sniff_stalled")
            if plane.admission.udp_count:
                for ulst in list(self.udp_listeners.values()):
                    if ulst.sessions:
                        ulst.sweep(idle_since)
            adm = plane.admission
            live = adm.tcp_count + adm.udp_count
            self.memory.after_sweep(live, adm.peak)
            adm.peak = live

    # ------------------------------------------------------------------ admin actions
    def close_client(self, ip: str, listeners: frozenset[str] | None = None) -> int:
        """Close every connection and UDP session of `ip` (on the given listeners, default all)."""
        return self.plane.admission.close_client(ip, listeners)

    def set_drain(self, pool: str, server: str, drain: bool) -> bool:
        p = self.runtime.pools.get(pool)
        s = p.find(server) if p is not None else None
        if s is None:
            return False
        s.drain = drain
        return True
