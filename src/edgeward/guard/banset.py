"""The in-memory ban set that the data plane consults on every accept.

`BanSet.is_banned` is on the hot path of every new connection and every UDP
datagram of a new session, so it is one dict lookup in the common case. Bans
are stored under the canonical text of the address (``ipaddress`` form,
IPv4-mapped IPv6 reduced to IPv4); lookups of addresses as the kernel reports
them (``getpeername``) hit that key directly, and other spellings go through a
small bounded normalisation cache.

Several jails may ban the same address with different protected-listener sets
and end times; the set keeps each jail's part and a merged view, so lifting
one jail's ban leaves the others in force.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BanCallback = Callable[[str, "frozenset[str] | None"], None]
UnbanCallback = Callable[[str], None]

# Bounded so that a flood of odd spellings cannot grow memory without limit.
_NORMALISE_CACHE_MAX = 65536


def normalize_addr(addr: str) -> str | None:
    """Canonical text of an IP address, or None if `addr` is not one.

    Accepts brackets (``[::1]``), zone ids (``fe80::1%eth0`` - the zone is
    dropped, bans are per address) and IPv4-mapped IPv6 (``::ffff:1.2.3.4`` ->
    ``1.2.3.4``) so that a dual-stack listener and an IPv4 listener agree.
    """
    text = addr.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if "%" in text:
        text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(slots=True)
class _Part:
    """One jail's ban of one address."""

    listeners: frozenset[str] | None  # None: every listener
    until: float | None  # epoch seconds; None: forever


@dataclass(slots=True)
class _Entry:
    """All bans of one address, with the merged view the hot path reads."""

    parts: dict[str, _Part] = field(default_factory=dict)
    listeners: frozenset[str] | None = None
    until: float | None = None
    refused: int = 0

    def merge(self) -> None:
        listeners: set[str] | None = set()
        until: float | None = 0.0
        for part in self.parts.values():
            if part.listeners is None or listeners is None:
                listeners = None
            else:
                listeners |= part.listeners
            until = None if part.until is None or until is None else max(until, part.until)
        self.listeners = None if listeners is None else frozenset(listeners)
        self.until = until


class BanSet:
    """Banned addresses, per jail, with expiry and ban/unban subscribers.

    `clock` returns epoch seconds (injected for tests). Subscribers run
    synchronously inside `add`/`remove`/`expire` on the caller's thread (the
    event loop); they must be quick - e.g. close the address's connections.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._alias: dict[str, str | None] = {}
        self._on_ban: list[BanCallback] = []
        self._on_unban: list[UnbanCallback] = []
        self.refused_by_jail: dict[str, int] = {}

    # -- hot path ---------------------------------------------------------

    def is_banned(self, addr: str, listener: str | None = None) -> bool:
        """True if `addr` is banned on `listener` (None: on any listener).

        A True answer counts one refusal for the jails holding the ban, on
        the assumption that the caller refuses the connection.
        """
        entry = self._entries.get(addr)
        if entry is None:
            if not self._entries:
                return False
            key = self._alias.get(addr, "")
            if key == "":
                key = self._remember_alias(addr)
            if key is None or key == addr:
                return False
            entry = self._entries.get(key)
            if entry is None:
                return False
        if entry.until is not None and entry.until <= self._clock():
            return False
        if listener is not None and entry.listeners is not None and listener not in entry.listeners:
            return False
        entry.refused += 1
        for jail in entry.parts:
            self.refused_by_jail[jail] = self.refused_by_jail.get(jail, 0) + 1
        return True

    def _remember_alias(self, addr: str) -> str | None:
        if len(self._alias) >= _NORMALISE_CACHE_MAX:
            self._alias.clear()
        key = normalize_addr(addr)
        self._alias[addr] = key
        return key

    # -- changes ----------------------------------------------------------

    def add(
        self,
        addr: str,
        *,
        jail: str = "manual",
        listeners: Iterable[str] | None = None,
        until: float | None = None,
    ) -> bool:
        """Ban `addr` for `jail` on `listeners` (None: all) until `until` (None: forever).

        Returns False (and changes nothing) if `addr` is not an IP address.
        Replaces an earlier ban of the same address by the same jail.
        Subscribers are told when the address becomes banned or its merged
        listener set grows.
        """
        key = normalize_addr(addr)
        if key is None:
            log.warning("ban of invalid address %r ignored", addr)
            return False
        entry = self._entries.get(key)
        before: frozenset[str] | None = frozenset()
        if entry is None:
            entry = _Entry()
            self._entries[key] = entry
            self._alias.clear()  # a cached miss may now be a hit
        elif entry.parts:
            before = entry.listeners
        entry.parts[jail] = _Part(None if listeners is None else frozenset(listeners), until)
        entry.merge()
        grew = before is not None and (entry.listeners is None or not entry.listeners <= before)
        if grew:
            for cb in list(self._on_ban):
                try:
                    cb(key, entry.listeners)
                except Exception:
                    log.exception("on_ban subscriber failed for %s", key)
        return True

    def remove(self, addr: str, *, jail: str | None = None) -> bool:
        """Lift the ban of `addr` by `jail` (None: by every jail). True if one was lifted."""
        key = normalize_addr(addr)
        if key is None:
            return False
        entry = self._entries.get(key)
        if entry is None:
            return False
        if jail is None:
            entry.parts.clear()
        elif entry.parts.pop(jail, None) is None:
            return False
        if entry.parts:
            entry.merge()
            return True
        del self._entries[key]
        self._notify_unban(key)
        return True

    def clear(self) -> list[str]:
        """Lift every ban; returns the addresses that were banned."""
        keys = list(self._entries)
        self._entries.clear()
        for key in keys:
            self._notify_unban(key)
        return keys

    def expire(self, now: float | None = None) -> list[tuple[str, str]]:
        """Drop the parts whose time is up; returns (address, jail) pairs dropped."""
        now = self._clock() if now is None else now
        dropped: list[tuple[str, str]] = []
        for key, entry in list(self._entries.items()):
            if entry.until is None or entry.until > now:
                # The merged view is still in force, but a shorter part of
                # another jail may have ended.
                ended = [
                    j for j, p in entry.parts.items() if p.until is not None and p.until <= now
                ]
                if not ended:
                    continue
            else:
                ended = list(entry.parts)
            for jail in ended:
                del entry.parts[jail]
                dropped.append((key, jail))
            if entry.parts:
                entry.merge()
            else:
                del self._entries[key]
                self._notify_unban(key)
        return dropped

    def next_expiry(self) -> float | None:
        """Earliest end time of any timed part, for scheduling `expire`."""
        ends = [
            p.until for e in self._entries.values() for p in e.parts.values() if p.until is not None
        ]
        return min(ends) if ends else None

    # -- subscribers --------------------------------------------------------

    def on_ban(self, callback: BanCallback) -> Callable[[], None]:
        """Call `callback(addr, listeners)` when an address becomes banned; returns an unsubscribe."""
        self._on_ban.append(callback)
        return lambda: self._on_ban.remove(callback) if callback in self._on_ban else None

    def on_unban(self, callback: UnbanCallback) -> Callable[[], None]:
        """Call `callback(addr)` when an address is no longer banned; returns an unsubscribe."""
        self._on_unban.append(callback)
        return lambda: self._on_unban.remove(callback) if callback in self._on_unban else None

    def _notify_unban(self, key: str) -> None:
        for cb in list(self._on_unban):
            try:
                cb(key)
            except Exception:
                log.exception("on_unban subscriber failed for %s", key)

    # -- views --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, str) and normalize_addr(addr) in self._entries

    def listeners_of(self, addr: str) -> frozenset[str] | None:
        """Merged protected-listener set of a banned address (None: all or not banned)."""
        key = normalize_addr(addr)
        entry = self._entries.get(key) if key is not None else None
        return None if entry is None else entry.listeners

    def snapshot(self) -> dict[str, dict[str, tuple[frozenset[str] | None, float | None]]]:
        """address -> jail -> (listeners, until); a copy, for status and for pushing to workers."""
        return {
            key: {jail: (p.listeners, p.until) for jail, p in entry.parts.items()}
            for key, entry in self._entries.items()
        }

    def refused(self, addr: str) -> int:
        """Connections refused from `addr` since it was banned."""
        key = normalize_addr(addr)
        entry = self._entries.get(key) if key is not None else None
        return 0 if entry is None else entry.refused
