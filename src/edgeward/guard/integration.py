"""Plugging the guard into the running edge: admit-time bans, closing banned clients, admin routes.

The adapter between the guard core (which imports nothing of the edge) and the
edge. The guard starts before the first listener accepts (so restored bans hold
from the first connection), the edge checks `BanSet.is_banned` at admit, and a
new ban closes the address's established connections on the protected listeners.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.schema import Config
from .build import GuardError
from .service import Guard

if TYPE_CHECKING:
    from ..admin.api import AdminAPI
    from ..server import Edge

log = logging.getLogger("edgeward.guard")


class GuardExtension:
    def __init__(self, edge: Edge, guard: Guard) -> None:
        self.edge = edge
        self.guard = guard
        self._unsub: list[Any] = []

    @classmethod
    def from_config(cls, edge: Edge, cfg: Config) -> GuardExtension | None:
        """Always present: even without jails, `edgeward ban` works and bans persist."""
        Path(cfg.edge.state_dir).mkdir(parents=True, exist_ok=True)
        return cls(edge, Guard.from_config(cfg))

    async def start(self) -> None:
        await self.guard.start()
        self.edge.bans = self.guard.banset
        self.edge.events = self.guard.events
        self.edge.extra_status["guard"] = self.guard.status
        self.edge.report_connections = any("edge:conn" in j.sources for j in self.guard.jail_settings.values())
        self._unsub.append(self.guard.banset.on_ban(self._on_ban))

    def _on_ban(self, addr: str, listeners: frozenset[str] | None) -> None:
        n = self.edge.close_client(addr, listeners)
        if n:
            log.info("closed %d connection(s) of banned %s", n, addr)

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
        return 200, self.guard.bans()

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
