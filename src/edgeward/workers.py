"""`[edge] workers = N`: a master keeps the control plane, N worker processes the data plane.

The master (`MasterEdge`, an `Edge` that opens no listener itself) loads and reloads the
config, runs the health checks, the guard and its jails, ACME, the kernel table and the admin
API. It binds every listening address once per worker with SO_REUSEPORT and keeps its copy of
each socket: the kernel spreads new connections (UDP: datagrams, by 4-tuple hash, so a client's
session stays in one worker) over the group, and a worker that dies leaves its socket, and the
connections queued on it, open in the master until its replacement takes them over.

Each worker (`WorkerLink`, started by `edgeward worker`) is an ordinary `Edge` whose listening
sockets come from the master and whose servers' health and bans are the master's: the guard
is the state of record, and the worker holds a mirror `BanSet` its admission reads.

Master and worker talk over one SOCK_SEQPACKET socketpair (message boundaries kept, listening
sockets passed with SCM_RIGHTS): small JSON arrays `[kind, ...]`, sent without waiting. A ban or a
health change reaches every worker in well under a millisecond (`propagation_ms` in each worker's
status: from the master's send to the worker's apply).

  master → worker  listeners (+ fds) · init · bans · ban · unban · health · reload · server_drain ·
                   reopen · status · clients · stop
  worker → master  ready · reloaded · status · clients · report (what the jails hear: protocol
                   errors, HTTP 401/403, connections for flood jails)
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .config.schema import Config
from .edge import ConfigLoader, Edge, RuntimeBuilder
from .events import (
    ConnAccepted,
    EventBus,
    HealthChanged,
    HttpRequest,
    Peer,
    ProtocolError,
    UdpSessionStarted,
)
from .guard.banset import BanSet
from .monitor import Monitor
from .net import sockets
from .net.tcp import listener_settings_summary
from .runtime import ListenerKey, Runtime
from .status import live_clients, plane_report

log = logging.getLogger("edgeward.workers")

TextLoader = Callable[[str, str], Config]  # (config text, file name) → Config

MAX_FDS = 200  # per message (the kernel takes at most 253)
_CHUNK = 60_000  # bytes of JSON per packet; longer messages go in several


def worker_count(cfg: Config) -> int:
    """`[edge] workers` as a number: "auto" is the CPUs this process may run on."""
    n = cfg.edge.workers
    if n == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    return int(n)


def problems(cfg: Config) -> list[tuple[tuple[str | int, ...], str, str]]:
    """What `workers > 1` cannot do yet: ACME. Certificates are ordered and renewed by one
    process, and each worker terminates TLS with its own store; without a store shared through
    the master, N workers would each order every certificate. File certificates work."""
    if worker_count(cfg) <= 1 or not cfg.acme.enabled:
        return []
    from .config.loader import service_scheme
    https = [n for n, svc in cfg.services.items() if service_scheme(cfg, svc) is not None]
    if not https:
        return []
    return [(("edge", "workers"), f"workers = {cfg.edge.workers} with HTTP services ({', '.join(sorted(https))}) "
             "needs [acme] enabled = false: ACME runs in one process only",
             "give the HTTP services [tls] certificate files and set [acme] enabled = false, or keep workers = 1")]


# ---------------------------------------------------------------------- the channel
class Channel:
    """One end of the master ↔ worker socketpair, on the event loop.

    Each packet is one byte (b"+": more of this message follows, b".": last) and JSON; file
    descriptors ride on a message's first packet. Sends never block: what the socket does not
    take is queued and written when it is writable again."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[list[Any], list[socket.socket]], None], on_closed: Callable[[], None]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.on_message = on_message
        self.on_closed = on_closed
        self.closed = False
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._parts: list[bytes] = []
        self._fds: list[socket.socket] = []
        self._writing = False

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def send(self, msg: list[Any], fds: list[int] | None = None) -> None:
        if self.closed:
            return
        data = json.dumps(msg, separators=(",", ":")).encode()
        chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
        for i, chunk in enumerate(chunks):
            packet = (b"." if i == len(chunks) - 1 else b"+") + chunk
            self._out.append((packet, fds if (i == 0 and fds) else []))
        self._flush()

    def _flush(self) -> None:
        while self._out:
            packet, fds = self._out[0]
            try:
                if fds:
                    self.sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    self.sock.send(packet)
            except BlockingIOError:
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:
                self._lost()
                return
            self._out.popleft()
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        for _ in range(256):
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(_CHUNK + 16, socket.CMSG_SPACE(MAX_FDS * 4))
            except BlockingIOError:
                return
            except OSError:
                self._lost()
                return
            if not data:
                self._lost()
                return
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
                    self._fds.extend(socket.socket(fileno=fd) for fd in fds)
            self._parts.append(data[1:])
            if data[:1] == b"+":
                continue
            raw_msg = b"".join(self._parts)
            got, self._parts, self._fds = self._fds, [], []
            try:
                msg = json.loads(raw_msg)
                self.on_message(msg, got)
            except Exception:
                log.exception("workers: message %r failed", raw_msg[:80])
                for s in got:
                    s.close()
            if self.closed:
                return

    def _lost(self) -> None:
        if not self.closed:
            self.close()
            self.on_closed()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        for s in self._fds:
            s.close()


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


# ---------------------------------------------------------------------- master
class Worker:
    """One worker process as the master sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.ready: asyncio.Future[None] | None = None
        self.started = 0.0
        self.restarts = 0
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.last: dict[str, Any] | None = None  # its last status report (what it counted, until then)

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

    def __init__(self, config_path: str, cfg: Config, build: RuntimeBuilder, load: ConfigLoader, load_text: TextLoader,
                 count: int, loop: asyncio.AbstractEventLoop | None = None, bus: EventBus | None = None) -> None:
        self.count = count
        self.load_text = load_text
        self._load_file = load
        self._next_text = ""
        # The text each worker parses: the very text the master checked, whatever the file says later.
        self.config_text = _read(config_path)
        self.held: dict[ListenerKey, tuple[tuple[str, ...], list[socket.socket]]] = {}
        self._fresh: set[ListenerKey] = set()
        super().__init__(config_path, cfg, build, self._load, loop, bus)
        self.workers = [Worker(i) for i in range(count)]
        self.restarts = 0
        self.stopping = False
        # What dead workers had counted (at their last report): totals stay totals across restarts.
        self.retired: dict[str, Any] = {"services": {}, "pools": {}, "counters": [], "retired": True}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn_reports = False
        self._unsub: list[Callable[[], object]] = []
        self.bus.subscribe(HealthChanged, self._on_health)
        self.extra_status["workers"] = self._workers_status

    def _load(self, path: str) -> Config:
        try:
            text = _read(path)
        except (OSError, ValueError):
            return self._load_file(path)  # raises the loader's own ConfigError
        cfg = self.load_text(text, path)
        self._next_text = text
        return cfg

    # ------------------------------------------------------------------ listening sockets
    def _open_listeners(self, rt: Runtime) -> None:
        """Bind N sockets (SO_REUSEPORT) for each address that is new or whose socket options
        changed, as the workers' `Edge._open_listeners` will ask for; close the master's copies of
        what is gone (a worker's copy stays open until it applies the new runtime)."""
        from .config.loader import ConfigError
        from .edge import BindError
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
            raise ConfigError([]) from BindError(f"cannot bind: {e.strerror or e}")
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
        self._conn_reports = ConnAccepted in self.bus.kinds  # a flood jail listens
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

    async def _spawn(self, w: Worker) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for s in (mine, theirs):  # a full reply (status of 10k clients) never waits for the reader
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            assert self.config_path is not None
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgeward.cli", "worker", "--control-fd", str(theirs.fileno()),
                "--index", str(w.index), self.config_path, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        w.started = time.monotonic()
        w.ready = self.loop.create_future()
        ch = w.channel = Channel(mine, self.loop, lambda msg, fds: self._on_message(w, msg, fds), lambda: None)
        ch.start()
        for msg, fds in self._listener_messages(w, set(self.held)):
            ch.send(msg, fds)
        self._send_state(w)
        ch.send(["init", {"index": w.index, "path": self.config_path, "config": self.config_text,
                          "conn_reports": self._conn_reports}])
        task = self.loop.create_task(self._watch(w, w.proc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_state(self, w: Worker) -> None:
        """The full ban set and every server's health (at start, after a restart or a reload)."""
        assert w.channel is not None
        bans = self.admission.bans
        if isinstance(bans, BanSet):
            w.channel.send(["bans", _merged_bans(bans)])
        w.channel.send(["health", self._health_state()])

    def _health_state(self) -> list[list[Any]]:
        return [[p.name, s.name, s.healthy] for p in self.runtime.pools.values() for s in p.servers]

    async def _watch(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if w.channel is not None:
            w.channel.close()
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
        kind = msg[0]
        if kind == "ready":
            if w.ready is not None and not w.ready.done():
                w.ready.set_result(None)
        elif kind in ("status", "clients", "reloaded"):
            fut = w.pending.pop(int(msg[1]), None)
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
            if kind == "reloaded" and not msg[2]:
                # A worker that cannot apply what the master checked and applied would leave the new
                # addresses' sockets in its share unserved: it is replaced (its successor starts
                # with the master's config).
                self.counters.inc("reloads", "worker_rejected")
                log.error("worker %d rejected the reload the master applied; replacing it", w.index)
                if w.proc is not None and w.proc.returncode is None:
                    w.proc.send_signal(signal.SIGTERM)
        elif kind == "report":
            self._report(msg[1:])

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

    def _reload(self, path: str) -> bool:
        if not super()._reload(path):
            return False
        self.config_text = self._next_text
        if worker_count(self.runtime.config) != self.count:
            log.warning("workers = %s: the number of workers changes at the next start; %d run until then",
                        self.runtime.config.edge.workers, self.count)
        rid = next(self._ids)
        for w in self.workers:
            ch = w.channel
            if ch is None or ch.closed:
                continue  # a worker being restarted gets the new config in its init
            for msg, fds in self._listener_messages(w, self._fresh):
                ch.send(msg, fds)
            ch.send(["reload", rid, self.config_text])
            fut: asyncio.Future[Any] = self.loop.create_future()
            w.pending[rid] = fut
            self._send_state(w)
        return True

    async def reload_workers(self) -> list[bool | None]:
        """Wait for the workers' answers to the last reload (None: a worker that did not answer)."""
        rid = max((k for w in self.workers for k in w.pending), default=None)
        if rid is None:
            return []
        out: list[bool | None] = []
        for w in self.workers:
            fut = w.pending.get(rid)
            if fut is None:
                continue
            try:
                async with asyncio.timeout(10):
                    out.append(bool(await fut))
            except TimeoutError:
                out.append(None)
        return out

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
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
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
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGINT)  # stop now
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
                rep["worker"] = {"index": w.index, "pid": w.pid, "restarts": w.restarts}
                w.last = rep
                out.append(rep)
        if self.restarts:
            out.append(self.retired)
        return out

    def _retire(self, w: Worker) -> None:
        """Keep the totals of a worker that died, as of its last report (what it counted after that
        is lost with it), so that status and /metrics counters do not go back at a restart."""
        last, w.last = w.last, None
        if last is None:
            return
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


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------- worker
class WorkerLink:
    """The worker's side: its edge's sockets, bans and health come from the master; it answers
    the master's questions and tells it what the jails hear."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.channel = Channel(sock, loop, self._on_message, self._master_gone)
        self.init: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.bans = BanSet()
        self.offered: dict[ListenerKey, socket.socket] = {}
        self.edge: Edge | None = None
        self.monitor: Monitor | None = None
        self.load_text: TextLoader | None = None
        self.index = -1
        self.propagation_ms = {"last": 0.0, "max": 0.0, "count": 0}
        self._health: list[list[Any]] = []
        self._text = ""
        self._path = ""
        self.reopen: list[Callable[[], None]] = []  # the access log's reopen
        # What needs the edge and came before it was built (a reload sent while this worker was
        # starting): handled once it runs.
        self._early: list[list[Any]] = []
        self.channel.start()

    async def wait_init(self) -> dict[str, Any]:
        """The master's init message: index, path, config text, conn_reports."""
        init = await self.init
        self.index = int(init["index"])
        self._path, self._text = str(init["path"]), str(init["config"])
        return init

    def close(self) -> None:
        self.channel.close()

    def load(self, _path: str) -> Config:
        """The edge's loader: the config text the master sent (it checked it already)."""
        assert self.load_text is not None
        return self.load_text(self._text, self._path)

    def attach(self, edge: Edge, load_text: TextLoader, conn_reports: bool) -> None:
        self.edge = edge
        self.load_text = load_text
        edge.load = self.load
        edge.listen_tcp = self._take_tcp
        edge.bind_udp = self._take_udp
        edge.active_health = False  # the master checks, and says
        edge.admission.bans = self.bans
        self.bans.on_ban(self._banned)
        self.monitor = Monitor(edge)
        self._apply_health()
        bus = edge.bus

        def on_error(ev: ProtocolError) -> None:
            self.channel.send(["report", "proto", ev.listener, ev.peer.ip, ev.peer.port, ev.kind])
        bus.subscribe(ProtocolError, on_error)

        def on_request(ev: HttpRequest) -> None:
            if ev.status in (401, 403):
                self.channel.send(["report", "http", ev.listener, ev.peer.ip, ev.peer.port, ev.status,
                                   ev.service or "-", ev.host, ev.path])
        bus.subscribe(HttpRequest, on_request)
        if conn_reports:
            def on_conn(ev: ConnAccepted | UdpSessionStarted) -> None:
                self.channel.send(["report", "conn", ev.listener, ev.peer.ip, ev.peer.port])
            bus.subscribe(ConnAccepted, on_conn)
            bus.subscribe(UdpSessionStarted, on_conn)

    def ready(self) -> None:
        assert self.monitor is not None
        self.monitor.start()
        self.channel.send(["ready"])
        early, self._early = self._early, []
        for msg in early:
            self._on_message(msg, [])

    def _take(self, key: ListenerKey) -> socket.socket | None:
        return self.offered.pop(key, None)

    def _take_tcp(self, host: str, port: int, backlog: int, reuseport: bool) -> socket.socket:
        s = self._take(("tcp", host, port))
        if s is None:  # not offered (the master's view differs): join the group on our own
            log.warning("worker %d: no socket from the master for tcp %s:%d; binding one", self.index, host, port)
            return sockets.listen_tcp(host, port, backlog, True)
        s.setblocking(False)
        return s

    def _take_udp(self, host: str, port: int, reuseport: bool) -> socket.socket:
        s = self._take(("udp", host, port))
        if s is None:
            log.warning("worker %d: no socket from the master for udp %s:%d; binding one", self.index, host, port)
            return sockets.bind_udp(host, port, True)
        s.setblocking(False)
        return s

    def _banned(self, addr: str, listeners: frozenset[str] | None) -> None:
        if self.edge is not None:
            self.edge.plane.admission.close_client(addr, listeners)

    def _apply_health(self) -> None:
        edge = self.edge
        if edge is None:
            return
        pools = edge.runtime.pools
        for pool, server, healthy in self._health:
            p = pools.get(pool)
            s = p.find(server) if p is not None else None
            if s is not None and s.healthy != healthy:
                s.healthy = bool(healthy)
                edge.bus.publish(HealthChanged(pool, server, bool(healthy)))

    def _delay(self, stamp: float) -> None:
        ms = (time.monotonic() - float(stamp)) * 1000.0
        d = self.propagation_ms
        d["last"] = round(ms, 3)
        d["max"] = round(max(d["max"], ms), 3)
        d["count"] += 1

    def _on_message(self, msg: list[Any], fds: list[socket.socket]) -> None:
        kind = msg[0]
        if kind == "listeners":
            for key, s in zip(msg[1], fds, strict=True):
                old = self.offered.pop((str(key[0]), str(key[1]), int(key[2])), None)
                if old is not None:
                    old.close()
                self.offered[(str(key[0]), str(key[1]), int(key[2]))] = s
            return
        for s in fds:
            s.close()
        if self.edge is None and kind in ("reload", "server_drain", "reopen", "stop"):
            self._early.append(msg)
            return
        if kind == "ban":
            self.bans.add(msg[1], jail="master", listeners=msg[2])
            self._delay(msg[3])
        elif kind == "unban":
            self.bans.remove(msg[1])
            self._delay(msg[2])
        elif kind == "bans":
            wanted = {addr: lst for addr, lst in msg[1]}
            for addr in [a for a in self.bans.snapshot() if a not in wanted]:
                self.bans.remove(addr)
            for addr, lst in wanted.items():
                self.bans.add(addr, jail="master", listeners=lst)
        elif kind == "health":
            changed = {(x[0], x[1]) for x in msg[1]}
            self._health = [h for h in self._health if (h[0], h[1]) not in changed] + msg[1]
            self._apply_health()
            if len(msg) > 2:  # a change seen by a health check (not the state sent at start or reload)
                self._delay(msg[2])
        elif kind == "init":
            if not self.init.done():
                self.init.set_result(msg[1])
        elif kind == "reload":
            self._reload(int(msg[1]), str(msg[2]))
        elif kind == "server_drain" and self.edge is not None:
            self.edge.set_drain(msg[1], msg[2], bool(msg[3]))
        elif kind == "reopen" and self.edge is not None:
            for fn in self.reopen:
                fn()
        elif kind == "status":
            self._answer_status(int(msg[1]), bool(msg[2]))
        elif kind == "clients" and self.edge is not None:
            self.channel.send(["clients", msg[1], self._clients(msg[2], msg[3], int(msg[4]))])
        elif kind == "stop" and self.edge is not None:
            self.loop.create_task(self.edge.drain(float(msg[1])))

    def _reload(self, rid: int, text: str) -> None:
        edge = self.edge
        if edge is None:
            return
        self._text = text
        applied = edge.reload()
        for s in self.offered.values():  # offered for a runtime we did not apply: never accept on them
            s.close()
        self.offered.clear()
        self.channel.send(["reloaded", rid, applied])

    def _answer_status(self, rid: int, full: bool) -> None:
        edge = self.edge
        if edge is None:
            self.channel.send(["status", rid, None])
            return
        rep = plane_report(edge, self.monitor, full)
        rep["propagation_ms"] = dict(self.propagation_ms)
        rep["pid"] = os.getpid()
        self.channel.send(["status", rid, rep])

    def _clients(self, service: str | None, address: str | None, limit: int) -> dict[str, Any]:
        assert self.edge is not None
        out = live_clients(self.edge, service, address, limit)
        out["addresses"] = self.edge.presence.addresses(service)
        return out

    def _master_gone(self) -> None:
        edge = self.edge
        log.error("worker %d: the master is gone; draining", self.index)
        if edge is not None:
            self.loop.create_task(edge.drain())
        elif not self.init.done():
            self.init.set_exception(ConnectionError("the master closed the control socket"))
