"""The master: the control plane of `Edge`, and the worker processes it starts, feeds and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ..child_process import ChildProcess, spawn
from ..config.loader import ConfigError
from ..config.schema import Config
from ..edge import BindError, ConfigLoader, Edge, RuntimeBuilder
from ..events import ConnAccepted, EventBus, HealthChanged, HttpRequest, Peer, ProtocolError
from ..guard.banset import BanSet
from ..net import sockets
from ..net.tcp import listener_settings_summary
from ..runtime import ListenerKey, Runtime
from .channel import MAX_FDS, Channel
from .settings import pack_config, worker_count

log = logging.getLogger("edgeward.workers")


def _key(k: ListenerKey) -> list[Any]:
    return [k[0], k[1], k[2]]


def _merged_bans(bans: BanSet) -> list[list[Any]]:
    """[address, listeners or None] of every ban in force: the view a worker's admission needs."""
    out: list[list[Any]] = []
    for addr, parts in bans.snapshot().items():
        listeners: set[str] | None = set()
        for lst, _until in parts.values():
            if lst is None or listeners is None:
                listeners = None
            else:
                listeners |= lst
        out.append([addr, None if listeners is None else sorted(listeners)])
    return out


class Worker:
    """One worker process as the master sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: ChildProcess | None = None
        self.channel: Channel | None = None
        self.ready: asyncio.Future[None] | None = None
        self.started = 0.0
        self.restarts = 0
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.last: dict[str, Any] | None = None  # its last status report (what it counted, until then)
        self.last_full: dict[str, Any] | None = None  # its last full one (with the counters)
        self.heard = 0.0  # when it last sent anything (monotonic)
        self.hung = 0  # times it was killed for answering nothing

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.channel is not None \
            and not self.channel.closed and self.ready is not None and self.ready.done() \
            and self.ready.exception() is None


class MasterEdge(Edge):
    """The edge of a master process: the control plane of `Edge` (config, reload, health, the
    state status reads), and N workers for the data plane."""

    READY_TIMEOUT = 30.0
    STATUS_TIMEOUT = 2.0
    # A worker that answers no ping for this long is stuck (a runaway loop, SIGSTOP...): it is
    # killed and restarted, so that its share of the listening sockets is served again.
    PING_EVERY = 1.0
    HUNG_AFTER = 5.0

    def __init__(self, config_path: str, cfg: Config, build: RuntimeBuilder, load: ConfigLoader,
                 count: int, loop: asyncio.AbstractEventLoop | None = None, bus: EventBus | None = None) -> None:
        self.count = count
        # What each worker runs: the very config the master checked and applied, whatever the file
        # says later (the workers never read the file, nor validate: they import no pydantic).
        self.config_packed = pack_config(cfg)
        self.held: dict[ListenerKey, tuple[tuple[str, ...], list[socket.socket]]] = {}
        self._fresh: set[ListenerKey] = set()
        super().__init__(config_path, cfg, build, load, loop, bus)
        self.workers = [Worker(i) for i in range(count)]
        self.restarts = 0
        self.stopping = False
        self.draining: set[ChildProcess] = set()  # predecessors finishing their connections
        # What dead workers had counted (at their last report): totals stay totals across restarts.
        self.retired: dict[str, Any] = {"services": {}, "pools": {}, "counters": [], "retired": True}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn_reports = False
        self._http_reports = False
        self._unsub: list[Callable[[], object]] = []
        # The ACME state the workers serve (app.py: the web front's `shared_state`), None without HTTP.
        self.acme_state: Callable[[], dict[str, Any] | None] = lambda: None
        self._acme_due = False
        self.bus.subscribe(HealthChanged, self._on_health)
        self.extra_status["workers"] = self._workers_status

    # ------------------------------------------------------------------ listening sockets
    def _open_listeners(self, rt: Runtime) -> None:
        """Bind N sockets (SO_REUSEPORT) for each address that is new or whose socket options
        changed, as the workers' `Edge._open_listeners` will ask for; close the master's copies of
        what is gone (a worker's copy stays open until it applies the new runtime)."""
        fresh: dict[ListenerKey, tuple[tuple[str, ...], list[socket.socket]]] = {}
        try:
            for key, lrt in rt.listeners.items():
                transport, host, port = key
                summary = (str(lrt.settings.reuseport),) if transport == "udp" else \
                    tuple(str(x) for x in listener_settings_summary(lrt.settings))
                cur = self.held.get(key)
                if cur is not None and cur[0] == summary:
                    continue
                socks: list[socket.socket] = []
                fresh[key] = (summary, socks)
                for _ in range(self.count):
                    if transport == "udp":
                        socks.append(sockets.bind_udp(host, port, True))
                    else:
                        socks.append(sockets.listen_tcp(host, port, lrt.settings.backlog, True))
        except OSError as e:
            for _, socks in fresh.values():
                for s in socks:
                    s.close()
            raise ConfigError([]) from BindError(sockets.bind_failure(transport, host, port, lrt.name, e))
        for key in [k for k in self.held if k not in rt.listeners or k in fresh]:
            for s in self.held.pop(key)[1]:
                s.close()
        self.held.update(fresh)
        self._fresh = set(fresh)

    def _listener_messages(self, w: Worker, keys: set[ListenerKey]) -> list[tuple[list[Any], list[int]]]:
        items = sorted(keys)
        out = []
        for i in range(0, len(items), MAX_FDS):
            part = items[i:i + MAX_FDS]
            out.append((["listeners", [_key(k) for k in part]], [self.held[k][1][w.index].fileno() for k in part]))
        return out

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        bans = self.admission.bans
        if isinstance(bans, BanSet):  # the guard's: the state of record, mirrored in every worker
            self._unsub.append(bans.on_ban(self._on_ban))
            self._unsub.append(bans.on_unban(self._on_unban))
            # A narrower merged entry (one jail's part lifted while another's remains): the workers
            # replace theirs with it (a worker's mirror holds one part, "master", per address).
            self._unsub.append(bans.on_narrow(self._on_ban))
        self._conn_reports = ConnAccepted in self.bus.kinds  # a flood jail listens
        self._http_reports = HttpRequest in self.bus.kinds  # a jail reads edge:http401/403
        await super().start()  # binds (our _open_listeners), starts the health checks
        for w in self.workers:
            await self._spawn(w)
        try:
            async with asyncio.timeout(self.READY_TIMEOUT):
                for w in self.workers:
                    assert w.ready is not None
                    await w.ready
        except (TimeoutError, RuntimeError) as e:
            await self.stop()
            raise OSError(f"workers did not start: {e or 'timeout'}") from None
        log.info("%d workers started: pids %s", self.count, " ".join(str(w.pid) for w in self.workers))
        task = self.loop.create_task(self._watchdog())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watchdog(self) -> None:
        while not self.stopping:
            before = time.monotonic()
            await asyncio.sleep(self.PING_EVERY)
            now = time.monotonic()
            if now - before > 2 * self.PING_EVERY:
                # Our own loop stalled (SIGSTOP/SIGCONT, a paused container, a long reload): the
                # workers' pongs wait unread in the channels, so silence says nothing about them.
                # Judge them again from now on.
                log.warning("workers: the master's loop stalled for %.1fs; the watchdog starts over",
                            now - before - self.PING_EVERY)
                for w in self.workers:
                    w.heard = max(w.heard, now)
                continue
            for w in self.workers:
                ch = w.channel
                if not w.alive or ch is None or w.proc is None:
                    continue
                if now - w.heard > self.HUNG_AFTER:
                    log.error("worker %d (pid %d) answered nothing for %.0fs: killing it", w.index, w.pid,
                              now - w.heard)
                    w.hung += 1
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()  # _watch restarts it
                    w.heard = now  # once
                else:
                    ch.send(["ping"])

    async def _spawn(self, w: Worker) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for s in (mine, theirs):  # a full reply (status of 10k clients) never waits for the reader
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            assert self.config_path is not None
            # Started with SIGHUP and SIGUSR1 blocked until it ignores them (child_process).
            w.proc = spawn(
                [sys.executable, "-m", "edgeward", "worker", "--control-fd", str(theirs.fileno()),
                 "--index", str(w.index), "--log-level", _log_level(), self.config_path],
                self.loop, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        w.started = w.heard = time.monotonic()
        w.ready = self.loop.create_future()
        # A worker that never says ready (stuck in its start) is killed, and _watch starts another:
        # the watchdog only judges running workers.
        timer = self.loop.call_later(self.READY_TIMEOUT, self._not_ready, w, w.proc)
        w.ready.add_done_callback(lambda _f: timer.cancel())
        ch = w.channel = Channel(mine, self.loop, lambda msg, fds: self._on_message(w, msg, fds), lambda: None)
        ch.start()
        for msg, fds in self._listener_messages(w, set(self.held)):
            ch.send(msg, fds)
        self._send_state(w)
        ch.send(["init", {"index": w.index, "path": self.config_path, "config": self.config_packed,
                          "conn_reports": self._conn_reports, "http_reports": self._http_reports}])
        task = self.loop.create_task(self._watch(w, w.proc, ch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _state(self) -> list[list[Any]]:
        """The full ban set and every server's health (at start, after a restart or a reload): built
        once, sent to every worker that needs it."""
        out: list[list[Any]] = []
        bans = self.admission.bans
        if isinstance(bans, BanSet):
            out.append(["bans", _merged_bans(bans)])
        out.append(["health", self._health_state()])
        acme = self.acme_state()
        if acme is not None:
            out.append(["acme", acme])
        return out

    def _not_ready(self, w: Worker, proc: ChildProcess) -> None:
        if self.stopping or w.proc is not proc or proc.returncode is not None or w.ready is None or w.ready.done():
            return
        log.error("worker %d (pid %d) was not ready after %.0fs: killing it", w.index, proc.pid, self.READY_TIMEOUT)
        w.hung += 1
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # _watch restarts it

    def _send_state(self, w: Worker, state: list[list[Any]] | None = None) -> None:
        assert w.channel is not None
        for msg in self._state() if state is None else state:
            w.channel.send(msg)

    def acme_changed(self) -> None:
        """A certificate, challenge or HTTP-01 answer of the master's ACME changed: every worker
        gets the new state (once per loop iteration, however many changes it made)."""
        if not self._acme_due:
            self._acme_due = True
            self.loop.call_soon(self._send_acme)

    def _send_acme(self) -> None:
        self._acme_due = False
        acme = self.acme_state()
        if acme is not None:
            self._broadcast(["acme", acme])

    def _health_state(self) -> list[list[Any]]:
        return [[p.name, s.name, s.healthy] for p in self.runtime.pools.values() for s in p.servers]

    async def _watch(self, w: Worker, proc: ChildProcess, ch: Channel) -> None:
        code = await proc.wait()
        ch.close()
        self.draining.discard(proc)
        if w.proc is not proc:  # handed over to a successor while it drained (_handover)
            return
        for fut in w.pending.values():
            if not fut.done():
                fut.set_result(None)
        w.pending.clear()
        if w.ready is not None and not w.ready.done():
            w.ready.set_exception(RuntimeError(f"worker {w.index} exited with {code} before it was ready"))
            w.ready.exception()  # retrieved: start() or the restart below reports it
        if self.stopping or w.proc is not proc:
            return
        self._retire(w)
        lived = time.monotonic() - w.started
        w.restarts += 1
        self.restarts += 1
        log.error("worker %d (pid %d) exited with %s after %.1fs; restarting it", w.index, proc.pid, code, lived)
        if lived < 1.0:  # crashing at start: do not spin
            await asyncio.sleep(min(5.0, 0.2 * 2 ** min(w.restarts, 5)))
            if self.stopping:
                return
        try:
            await self._spawn(w)
        except OSError as e:
            log.error("cannot restart worker %d: %s", w.index, e)

    def _on_message(self, w: Worker, msg: list[Any], fds: list[socket.socket]) -> None:
        for s in fds:
            s.close()
        w.heard = time.monotonic()
        kind = msg[0]
        if kind == "ready":
            if w.ready is not None and not w.ready.done():
                w.ready.set_result(None)
        elif kind in ("status", "clients"):
            fut = w.pending.pop(int(msg[1]), None)
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif kind == "reloaded":
            if not msg[2]:
                # A worker that cannot apply what the master checked and applied would leave the new
                # addresses' sockets in its share unserved: it is replaced (its successor starts
                # with the master's config).
                self.counters.inc("reloads", "worker_rejected")
                log.error("worker %d rejected the reload the master applied; replacing it", w.index)
                if w.proc is not None and w.proc.returncode is None:
                    w.proc.send_signal(signal.SIGTERM)
        elif kind == "report":
            self._report(msg[1:])
        elif kind == "draining":
            self._handover(w, msg[1] if len(msg) > 1 and isinstance(msg[1], dict) else None)

    def _handover(self, w: Worker, last: dict[str, Any] | None) -> None:
        """Worker `w` drains (SIGTERM, or it rejected a reload): its successor starts at once and
        takes the same listening sockets, so that its share of new clients is not left queued
        until its connections end (up to drain_timeout). The draining process finishes alone."""
        proc, ch = w.proc, w.channel
        if self.stopping or proc is None or ch is None or proc.returncode is not None:
            return
        if last is not None:
            last["worker"] = {"index": w.index, "pid": w.pid, "restarts": w.restarts, "hung": w.hung}
            w.last = w.last_full = last
        self._retire(w)  # its totals as it stopped accepting

        def ignore(_msg: list[Any], fds: list[socket.socket]) -> None:
            for s in fds:
                s.close()
        ch.on_message = ignore  # it is no worker of ours any more; _watch closes the channel at its exit
        for fut in w.pending.values():
            if not fut.done():
                fut.set_result(None)
        w.pending.clear()
        self.draining.add(proc)
        w.proc = w.channel = None
        w.restarts += 1
        self.restarts += 1
        log.warning("worker %d (pid %d) drains; starting its successor", w.index, proc.pid)
        task = self.loop.create_task(self._respawn(w))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respawn(self, w: Worker) -> None:
        try:
            await self._spawn(w)
        except OSError as e:
            log.error("cannot restart worker %d: %s", w.index, e)

    def _report(self, r: list[Any]) -> None:
        """What a worker saw that the jails hear: published on the master's bus, where the guard
        adapter subscribed (the master's own counters do not count them: status adds the workers')."""
        what, listener, ip, port = r[0], str(r[1]), str(r[2]), int(r[3])
        peer = Peer(ip, port)
        if what == "proto":
            self.bus.publish(ProtocolError(listener, peer, str(r[4])))
        elif what == "http":
            self.bus.publish(HttpRequest(listener, peer, str(r[5]), "", str(r[6]), "", str(r[7]), "", int(r[4]),
                                         0, 0, 0.0, "", False, ""))
        elif what == "conn":
            self.bus.publish(ConnAccepted(listener, peer))

    def _broadcast(self, msg: list[Any]) -> None:
        for w in self.workers:
            if w.channel is not None and not w.channel.closed:
                w.channel.send(msg)

    def _on_ban(self, addr: str, listeners: frozenset[str] | None) -> None:
        self._broadcast(["ban", addr, None if listeners is None else sorted(listeners), time.monotonic()])

    def _on_unban(self, addr: str) -> None:
        self._broadcast(["unban", addr, time.monotonic()])

    def _on_health(self, ev: HealthChanged) -> None:
        self._broadcast(["health", [[ev.pool, ev.server, ev.healthy]], time.monotonic()])

    def _apply_config(self, cfg: Config) -> bool:
        if not super()._apply_config(cfg):
            return False
        self.config_packed = pack_config(cfg)
        if worker_count(self.runtime.config) != self.count:
            log.warning("workers = %s: the number of workers changes at the next start; %d run until then",
                        self.runtime.config.edge.workers, self.count)
        rid = next(self._ids)
        state = self._state()
        for w in self.workers:
            ch = w.channel
            if ch is None or ch.closed:
                continue  # a worker being restarted gets the new config in its init
            for msg, fds in self._listener_messages(w, self._fresh):
                ch.send(msg, fds)
            ch.send(["reload", rid, self.config_packed])  # answered by "reloaded"
            self._send_state(w, state)
        return True

    def close_client(self, ip: str, listeners: frozenset[str] | None = None) -> int:
        return 0  # the workers close their connections themselves when the ban reaches them

    def set_drain(self, pool: str, server: str, drain: bool) -> bool:
        if not super().set_drain(pool, server, drain):
            return False
        self._broadcast(["server_drain", pool, server, drain])
        return True

    def reopen_logs(self) -> None:
        self._broadcast(["reopen"])

    async def drain(self, timeout: float | None = None) -> None:
        """Every worker drains (stops accepting; its connections finish within the timeout); then stop."""
        limit = self.runtime.config.edge.drain_timeout if timeout is None else timeout
        self.admission.draining = True
        self.stopping = True
        for fn in self.on_drain:
            fn()
        self._broadcast(["stop", limit])
        # The workers close their copies of the listening sockets now: with the master's closed too,
        # new clients are refused at once (as when one process drains), not queued for nobody.
        for _, socks in self.held.values():
            for s in socks:
                s.close()
        self.held.clear()
        await self._wait_workers(limit + 5.0)
        await self.stop()

    async def _wait_workers(self, limit: float) -> None:
        procs = [p for p in [*(w.proc for w in self.workers), *self.draining] if p is not None and p.returncode is None]
        if not procs:
            return
        try:
            async with asyncio.timeout(limit):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    log.error("worker pid %d did not stop in time: killed", p.pid)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in procs))

    async def stop(self) -> None:
        self.stopping = True
        for p in [*(w.proc for w in self.workers), *self.draining]:
            if p is not None and p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)  # stop now
        await self._wait_workers(5.0)
        for w in self.workers:
            if w.channel is not None:
                w.channel.close()
        for t in list(self._tasks):
            t.cancel()
        for _, socks in self.held.values():
            for s in socks:
                s.close()
        self.held.clear()
        for u in self._unsub:
            u()
        await super().stop()

    # ------------------------------------------------------------------ reads
    async def _ask(self, w: Worker, msg: list[Any]) -> Any:
        ch = w.channel
        if not w.alive or ch is None:
            return None
        rid = next(self._ids)
        fut: asyncio.Future[Any] = self.loop.create_future()
        w.pending[rid] = fut
        ch.send([msg[0], rid, *msg[1:]])
        try:
            async with asyncio.timeout(self.STATUS_TIMEOUT):
                return await fut
        except TimeoutError:
            return None
        finally:
            w.pending.pop(rid, None)

    async def plane_reports(self, full: bool) -> list[dict[str, Any]]:
        replies = await asyncio.gather(*(self._ask(w, ["status", full]) for w in self.workers))
        out = []
        for w, rep in zip(self.workers, replies, strict=True):
            if isinstance(rep, dict):
                rep["worker"] = {"index": w.index, "pid": w.pid, "restarts": w.restarts, "hung": w.hung}
                w.last = rep
                if full:
                    w.last_full = rep
                out.append(rep)
            else:
                # No answer in time (busy, stopped, restarting): its previous report, marked stale,
                # so that totals and /metrics counters never go back.
                last = (w.last_full or w.last) if full else w.last
                if last is not None:
                    out.append({**last, "stale": True,
                                "worker": {**last["worker"], "restarts": w.restarts, "hung": w.hung}})
        if self.restarts:
            out.append(self.retired)
        return out

    def _retire(self, w: Worker) -> None:
        """Keep the totals of a worker that died, as of its last report (what it counted after that
        is lost with it), so that status and /metrics counters do not go back at a restart."""
        last, full, w.last, w.last_full = w.last, w.last_full, None, None
        if last is None:
            return
        if "counters" not in last and full is not None:
            last = {**last, "counters": full["counters"]}
        r = self.retired
        for name, svc in last.get("services", {}).items():
            mine = r["services"].setdefault(name, {})
            for k in ("total", "bytes_in", "bytes_out", "udp_sessions_total", "requests", "datagrams_in",
                      "datagrams_out"):
                mine[k] = mine.get(k, 0) + svc.get(k, 0)
        for pname, pool in last.get("pools", {}).items():
            servers = r["pools"].setdefault(pname, {"servers": []})["servers"]
            for srv in pool.get("servers", ()):
                mine = next((x for x in servers if x["server"] == srv["server"]), None)
                if mine is None:
                    mine = {"server": srv["server"]}
                    servers.append(mine)
                for k in ("total", "bytes_in", "bytes_out"):
                    mine[k] = mine.get(k, 0) + srv.get(k, 0)
        counters = {tuple(c["key"]): c["value"] for c in r["counters"]}
        for c in last.get("counters", ()):
            key = tuple(c["key"])
            counters[key] = counters.get(key, 0) + c["value"]
        r["counters"] = [{"key": list(k), "value": v} for k, v in counters.items()]

    async def plane_clients(self, service: str | None, address: str | None, limit: int) -> list[dict[str, Any]]:
        replies = await asyncio.gather(*(self._ask(w, ["clients", service, address, limit]) for w in self.workers))
        return [r for r in replies if isinstance(r, dict)]

    def describe_listeners(self) -> str:
        tcp = sum(1 for k in self.held if k[0] == "tcp")
        return (f"{tcp} TCP and {len(self.held) - tcp} UDP listening addresses, one socket each for "
                f"{self.count} workers")

    def _workers_status(self) -> dict[str, object]:
        return {"count": self.count, "restarts": self.restarts,
                "alive": sum(1 for w in self.workers if w.alive)}


def _log_level() -> str:
    """The master's log level (`edgeward run --log-level` or [edge] log_level, as daemon.py set it),
    for its workers: they never read the config file, which may be mid-edit when one restarts."""
    name = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return name.lower() if isinstance(name, str) and name.lower() in ("debug", "info", "warning", "error") else "info"
