"""Plugging the guard into the running edge: config mapping, admit-time bans, admin routes.

The guard starts before the first listener accepts (so restored bans hold from
the first connection), the edge checks `BanSet.is_banned` at admit, and a new
ban closes the address's established connections on the protected listeners.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.schema import Config, JailSettings
from .filter import DEFAULT_SEARCH_DIRS
from .jail import BanIncrement
from .nft import NftConfig
from .service import Guard, GuardConfig, GuardError, JailConfig

if TYPE_CHECKING:
    from ..admin.api import AdminAPI
    from ..server import Edge

log = logging.getLogger("edgeward.guard")


def jail_config(name: str, j: JailSettings) -> JailConfig:
    filt, params = j.filter, {}
    if filt and filt.endswith("]") and "[" in filt:
        # fail2ban's `filter = sshd[mode=aggressive]`
        filt, _, rest = filt.partition("[")
        for kv in rest[:-1].split(","):
            if "=" in kv:
                k, v = kv.split("=", 1)
                params[k.strip()] = v.strip().strip("\"'")
    inc = BanIncrement()
    if j.increment is not None and j.increment.enabled:
        i = j.increment
        inc = BanIncrement(enabled=True, factor=i.factor, formula=i.formula, multipliers=tuple(i.multipliers),
                           maxtime=i.maxtime, rndtime=i.rndtime, overalljails=i.overalljails)
    return JailConfig(name=name, enabled=j.enabled, logpath=tuple(j.logpath), sources=tuple(j.sources), filter=filt,
                      filter_params=params, failregex=tuple(j.failregex), ignoreregex=tuple(j.ignoreregex),
                      datepattern=j.datepattern, maxlines=j.maxlines, maxretry=j.maxretry, findtime=j.findtime,
                      bantime=j.bantime, increment=inc, ignoreip=tuple(j.ignoreip),
                      listeners=None if j.listeners is None else tuple(j.listeners))


def guard_config(cfg: Config) -> GuardConfig:
    g = cfg.guard
    dirs = tuple(dict.fromkeys([*g.filter_dirs, *DEFAULT_SEARCH_DIRS]))
    return GuardConfig(jails=tuple(jail_config(n, j) for n, j in cfg.jails.items()),
                       db_path=str(Path(cfg.edge.state_dir) / "guard.sqlite"), db_synchronous=g.db_synchronous,
                       filter_dirs=dirs, ignoreip=tuple(g.ignoreip),
                       match_isolation=g.match_isolation, match_timeout=g.match_timeout,
                       nft=NftConfig(enabled=g.nft.enabled, table=g.nft.table, hook=g.nft.hook))


class GuardExtension:
    def __init__(self, edge: Edge, guard: Guard) -> None:
        self.edge = edge
        self.guard = guard
        self._unsub: list[Any] = []

    @classmethod
    def from_config(cls, edge: Edge, cfg: Config) -> GuardExtension | None:
        """Always present: even without jails, `edgeward ban` works and bans persist."""
        Path(cfg.edge.state_dir).mkdir(parents=True, exist_ok=True)
        return cls(edge, Guard(guard_config(cfg)))

    async def start(self) -> None:
        await self.guard.start()
        self.edge.bans = self.guard.banset
        self.edge.events = self.guard.events
        self.edge.extra_status["guard"] = self.guard.status
        self.edge.report_connections = any("edge:conn" in j.sources for j in self.guard.config.jails)
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
