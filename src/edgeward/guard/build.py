"""Building the guard's parts from the config schema: a jail's filter and its `Jail`.

The schema (`edgeward.config.schema`: `GuardSettings`, `JailSettings`, ...) is the
one description of every guard option; this module turns those settings into
the objects that run. Both the `Guard` (service.py) and the matcher process
(matcher.py) build filters here, so neither has to import the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from edgeward.config.schema import GuardSettings, JailSettings
from edgeward.guard.jail import BanHistory, Jail
from edgeward.guard.types import DEFAULT_SEARCH_DIRS

if TYPE_CHECKING:
    from edgeward.guard.filter import Filter

# The filter engine (guard/filter.py, datedetect.py: ~4 MB of compiled patterns and tables) is
# imported by the functions below, when a jail has a filter: a guard without log jails (bans from
# the admin API and the edge's own events only) never loads it.

# Bans asked for by the admin without a jail live in this one; no configured jail may take the name.
MANUAL_JAIL = "manual"
# Bans from a CrowdSec Local API's decisions ([guard.crowdsec]) live in this one.
CROWDSEC_JAIL = "crowdsec"


class GuardError(ValueError):
    """A guard configuration that cannot run, or a bad admin request."""


class BanNotStored(Exception):
    """A ban is enforced (in memory, and in nftables if mirrored) but the ban store could not keep it:
    it will not survive a restart. `ban` is the ban as the admin API shows it."""

    def __init__(self, ban: dict[str, object], error: str) -> None:
        super().__init__(f"enforced in memory but not stored (lost at restart): {error}")
        self.ban = ban
        self.error = error


def filter_search_path(settings: GuardSettings) -> tuple[str, ...]:
    """Where filters named without a path are looked for: the configured directories,
    then fail2ban's and edgeward's own (each once)."""
    return tuple(dict.fromkeys([*settings.filter_dirs, *DEFAULT_SEARCH_DIRS]))


def build_filter(name: str, jail: JailSettings, search_path: Sequence[str]) -> Filter | None:
    """Jail `name`'s filter, or None for a jail fed only by edge events. Raises GuardError.

    ``filter = "sshd[mode=aggressive]"`` passes parameters like a fail2ban jail
    (parsed by `load_filter`); inline ``failregex`` builds a filter of its own.
    """
    if not (jail.filter or jail.failregex):
        if jail.logpath or any(s.startswith("journal") for s in jail.sources):
            raise GuardError(f"jail {name}: a log source needs a filter or failregex")
        return None
    from edgeward.guard.filter import Filter, FilterError, load_filter
    try:
        if jail.filter:
            if jail.failregex or jail.ignoreregex:
                raise GuardError(f"jail {name}: give a filter or an inline failregex, not both")
            return load_filter(jail.filter, search_dirs=search_path, default_tz=jail.logtimezone)
        return Filter.from_inline(
            jail.failregex, jail.ignoreregex, jail.datepattern, jail.maxlines,
            default_tz=jail.logtimezone,
        )
    except FilterError as exc:
        raise GuardError(f"jail {name}: {exc}") from exc


def build_jail(
    name: str,
    jail: JailSettings,
    settings: GuardSettings,
    flt: Filter | None,
    history: BanHistory | None = None,
) -> Jail:
    """The failure counting of jail `name` (raises JailError for settings it cannot use)."""
    return Jail(
        name,
        flt,
        maxretry=jail.maxretry,
        findtime=jail.findtime,
        bantime=jail.bantime,
        ignoreip=(*settings.ignoreip, *jail.ignoreip),
        increment=jail.increment,
        history=history,
        max_tracked=settings.max_tracked,
    )
