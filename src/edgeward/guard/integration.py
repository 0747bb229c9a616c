"""The config schema's guard and jail settings mapped onto the guard's own configuration."""

from __future__ import annotations

from pathlib import Path

from ..config.schema import Config, JailSettings
from .filter import DEFAULT_SEARCH_DIRS
from .jail import BanIncrement
from .nft import NftConfig
from .service import GuardConfig, JailConfig


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
