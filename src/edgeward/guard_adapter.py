"""The guard wired to the edge: bans at admission, edge events as jail sources, admin routes.

The guard core (guard/) knows nothing of the edge; this adapter is the only
place the two meet. The guard starts before the first listener accepts (so
restored bans hold from the first connection); admission asks the guard's ban
set about every new client; a new ban closes the address's live connections
and sessions on the listeners it protects; what the edge sees itself (protocol
errors, sniff timeouts, HTTP 401/403 answers, every connection for flood
jails) reaches the jails that subscribed to `edge:<kind>`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config.schema import Config
from .events import BanAdded, BanLifted, ConnAccepted, HttpRequest, ProtocolError, UdpSessionStarted
from .guard.build import BanNotStored, GuardError
from .guard.service import Guard

if TYPE_CHECKING:
    from .admin.api import AdminAPI
    from .edge import Edge

log = logging.getLogger("edgeward.guard")

# Edge-observed kinds → the broad source a jail subscribes to ("edge:sniff", "edge:proto").
_SNIFF_KINDS = frozenset({"sniff_timeout", "sniff_half_closed"})


class GuardAdapter:
    def __init__(self, edge: Edge, guard: Guard) -> None:
        self.edge = edge
        self.guard = guard
        self._unsub: list[Callable[[], object]] = []

    @classmethod
    def from_config(cls, edge: Edge, cfg: Config) -> GuardAdapter:
        """Always present: even without jails, `edgeward ban` works and bans persist."""
        Path(cfg.edge.state_dir).mkdir(parents=True, exist_ok=True)
        return cls(edge, Guard.from_config(cfg))

    async def start(self) -> None:
        guard, edge = self.guard, self.edge
        await guard.start()
        edge.admission.bans = guard.banset
        edge.extra_status["guard"] = guard.status
        report = guard.events.report
        bus = edge.bus

        def on_error(ev: ProtocolError) -> None:
            # Jails subscribe to broad kinds; the detail says which.
            report(ev.peer.ip, "sniff" if ev.kind in _SNIFF_KINDS else "proto", f"{ev.listener} {ev.kind}")

        self._unsub.append(bus.subscribe(ProtocolError, on_error))

        # The per-request and per-connection subscribers only when a jail reads them: each is a
        # call of interpreted code for every request or connection.
        sources = {s for j in guard.jail_settings.values() for s in j.sources}
        if sources & {"edge:http401", "edge:http403", "edge:*"}:
            def on_request(ev: HttpRequest) -> None:
                # Failed authentications seen by the edge itself: a jail with sources = ["edge:http401"]
                # bans repeated 401s of any route, with no log file.
                if ev.status in (401, 403):
                    report(ev.peer.ip, f"http{ev.status}", f"{ev.listener} {ev.service or '-'} {ev.host}{ev.path}")
            self._unsub.append(bus.subscribe(HttpRequest, on_request))
        if sources & {"edge:conn", "edge:*"}:
            def on_conn(ev: ConnAccepted | UdpSessionStarted) -> None:
                report(ev.peer.ip, "conn", ev.listener)
            self._unsub.append(bus.subscribe(ConnAccepted, on_conn))
            self._unsub.append(bus.subscribe(UdpSessionStarted, on_conn))
        self._unsub.append(guard.banset.on_ban(self._on_ban))
        self._unsub.append(guard.banset.on_unban(lambda addr: bus.publish(BanLifted(addr))))

    def _on_ban(self, addr: str, listeners: frozenset[str] | None) -> None:
        n = self.edge.close_client(addr, listeners)  # a range (a CrowdSec decision): every client inside
        if n:
            log.info("closed %d connection(s) of banned %s", n, addr)
        self.edge.bus.publish(BanAdded(addr, listeners))

    async def stop(self) -> None:
        for u in self._unsub:
            u()
        await self.guard.stop()

    def register(self, admin: AdminAPI) -> None:
        admin.add_route("GET", "/bans", self._bans)
        admin.add_route("GET", "/guard", self._status)
        admin.add_route("POST", "/ban", self._ban)
        admin.add_route("POST", "/unban", self._unban)

    async def _bans(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        """Every ban in force (oldest first); with ?newest=N, {"total": in force, "bans": the newest N}."""
        newest = query.get("newest")
        if not newest:
            return 200, self.guard.bans()
        try:
            n = int(newest[0])
        except ValueError:
            return 400, {"error": "newest must be a number of bans"}
        if not 0 <= n <= 10000:
            return 400, {"error": "newest must be between 0 and 10000"}
        total, bans = self.guard.newest_bans(n)
        return 200, {"total": total, "bans": bans}

    async def _status(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        given = query.get("jail")
        jail = given[0] if given else None
        try:
            return 200, self.guard.status(jail)
        except (GuardError, KeyError) as e:
            return 404, {"error": str(e)}

    async def _ban(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or "addr" not in body:
            return 400, {"error": "body must be {\"addr\": ..., \"jail\": ...}"}
        try:
            ipaddress.ip_address(str(body["addr"]).strip("[]"))
            rec = await self.guard.ban(str(body.get("jail") or "manual"), str(body["addr"]),
                                       str(body.get("reason") or "manual ban"), body.get("bantime"))
        except BanNotStored as e:
            # Enforced, but the store (disk full?) could not keep it: 507 Insufficient Storage.
            return 507, {"error": str(e), "ban": e.ban, "enforced": True, "stored": False}
        except (GuardError, ValueError, KeyError) as e:
            return 400, {"error": str(e)}
        return 200, rec

    async def _unban(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        body = body or {}
        try:
            lifted = await self.guard.unban(body.get("addr"), all=bool(body.get("all")), jail=body.get("jail"))
        except (GuardError, ValueError) as e:
            return 400, {"error": str(e)}
        return 200, {"unbanned": lifted}
