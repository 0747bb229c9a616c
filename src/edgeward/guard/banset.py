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

Networks (CrowdSec's Range decisions, "192.0.2.0/24") are entries too, keyed
by their canonical text; an index by prefix length (network number shifted
right) finds the ranges covering an address. It is consulted only after the
exact lookup missed and only while ranges exist, so a set without ranges costs
what it did: one dict lookup per accept.
"""

from __future__ import annotations

import heapq
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


def normalize_key(text: str) -> str | None:
    """Canonical text of an address (as `normalize_addr`) or of a network ("10.0.0.0/8").

    A network with host bits set is reduced to its network ("10.1.2.3/8" -> "10.0.0.0/8"); a
    full-length prefix (/32, /128) is the address itself; an IPv4-mapped IPv6 network is
    reduced to IPv4, like its addresses.
    """
    if "/" not in text:
        return normalize_addr(text)
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def _network_index(key: str) -> tuple[int, int, int]:
    """(IP version, prefix length, network number >> host bits) of a canonical network key."""
    net = ipaddress.ip_network(key)
    return net.version, net.prefixlen, int(net.network_address) >> (net.max_prefixlen - net.prefixlen)


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
        # Ranges: IP version -> prefix length -> network number (shifted) -> entry.
        self._nets: dict[int, dict[int, dict[int, _Entry]]] = {4: {}, 6: {}}
        self._ranges = 0
        self._ints: dict[str, int] = {}  # canonical address -> its number, bounded like _alias
        # (end, key, jail) of every timed part; stale ones (lifted, replaced) are skipped when met.
        self._ends: list[tuple[float, str, str]] = []
        self._on_ban: list[BanCallback] = []
        self._on_unban: list[UnbanCallback] = []
        self._on_narrow: list[BanCallback] = []
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
            if key is None:
                return False
            if key == addr:  # the canonical spelling missed: only a range can cover it
                return self._ranges != 0 and self._range_refuses(key, listener)
            entry = self._entries.get(key)
            if entry is None:
                return self._ranges != 0 and self._range_refuses(key, listener)
        if entry.until is not None and entry.until <= self._clock():
            return False
        if listener is not None and entry.listeners is not None and listener not in entry.listeners:
            return False
        entry.refused += 1
        for jail in entry.parts:
            self.refused_by_jail[jail] = self.refused_by_jail.get(jail, 0) + 1
        return True

    def _range_refuses(self, key: str, listener: str | None) -> bool:
        """The ranges covering the canonical address `key`: one dict lookup per prefix length in use."""
        n = self._ints.get(key)
        if n is None:
            if len(self._ints) >= _NORMALISE_CACHE_MAX:
                self._ints.clear()
            n = self._ints[key] = int(ipaddress.ip_address(key))
        six = ":" in key
        bits = 128 if six else 32
        now: float | None = None
        for plen, table in self._nets[6 if six else 4].items():
            entry = table.get(n >> (bits - plen))
            if entry is None:
                continue
            if entry.until is not None:
                now = self._clock() if now is None else now
                if entry.until <= now:
                    continue
            if listener is not None and entry.listeners is not None and listener not in entry.listeners:
                continue
            entry.refused += 1
            for jail in entry.parts:
                self.refused_by_jail[jail] = self.refused_by_jail.get(jail, 0) + 1
            return True
        return False

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

        `addr` may be a network ("192.0.2.0/24"): every address in it is banned.
        Returns False (and changes nothing) if `addr` is not an IP address or network.
        Replaces an earlier ban of the same address by the same jail.
        Subscribers are told when the address becomes banned or its merged
        listener set grows.
        """
        key = normalize_key(addr)
        if key is None:
            log.warning("ban of invalid address %r ignored", addr)
            return False
        entry = self._entries.get(key)
        before: frozenset[str] | None = frozenset()
        existed = False
        if entry is None:
            entry = _Entry()
            self._entries[key] = entry
            if "/" in key:
                version, plen, number = _network_index(key)
                self._nets[version].setdefault(plen, {})[number] = entry
                self._ranges += 1
            else:
                self._alias.clear()  # a cached miss may now be a hit
        elif entry.parts:
            before = entry.listeners
            existed = True
        entry.parts[jail] = _Part(None if listeners is None else frozenset(listeners), until)
        entry.merge()
        if until is not None:
            heapq.heappush(self._ends, (until, key, jail))
            if len(self._ends) > 4 * len(self._entries) + 1024:
                self._compact_ends()
        grew = before is not None and (entry.listeners is None or not entry.listeners <= before)
        if grew:
            for cb in list(self._on_ban):
                try:
                    cb(key, entry.listeners)
                except Exception:
                    log.exception("on_ban subscriber failed for %s", key)
        elif existed and entry.listeners != before:  # a jail replaced its part with a narrower one
            self._notify_narrow(key, entry)
        return True

    def remove(self, addr: str, *, jail: str | None = None) -> bool:
        """Lift the ban of `addr` (an address or a network) by `jail` (None: by every jail).
        True if one was lifted."""
        key = normalize_key(addr)
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
            before = entry.listeners
            entry.merge()
            if entry.listeners != before:
                self._notify_narrow(key, entry)
            return True
        self._drop(key)
        self._notify_unban(key)
        return True

    def _drop(self, key: str) -> None:
        del self._entries[key]
        if "/" in key:
            version, plen, number = _network_index(key)
            table = self._nets[version].get(plen)
            if table is not None and table.pop(number, None) is not None:
                self._ranges -= 1
                if not table:
                    del self._nets[version][plen]

    def clear(self) -> list[str]:
        """Lift every ban; returns the addresses that were banned."""
        keys = list(self._entries)
        self._entries.clear()
        self._nets = {4: {}, 6: {}}
        self._ranges = 0
        self._ends = []
        for key in keys:
            self._notify_unban(key)
        return keys

    def expire(self, now: float | None = None) -> list[tuple[str, str]]:
        """Drop the parts whose time is up; returns (address, jail) pairs dropped.

        Only the ended parts are visited (a heap of end times), not every ban: with tens of
        thousands of timed bans (a CrowdSec blocklist) a sweep stays a few microseconds."""
        now = self._clock() if now is None else now
        dropped: list[tuple[str, str]] = []
        heap = self._ends
        while heap and heap[0][0] <= now:
            until, key, jail = heapq.heappop(heap)
            entry = self._entries.get(key)
            part = entry.parts.get(jail) if entry is not None else None
            if entry is None or part is None or part.until != until:
                continue  # lifted or replaced since: a stale end
            del entry.parts[jail]
            dropped.append((key, jail))
            if entry.parts:
                before = entry.listeners
                entry.merge()
                if entry.listeners != before:
                    self._notify_narrow(key, entry)
            else:
                self._drop(key)
                self._notify_unban(key)
        return dropped

    def _compact_ends(self) -> None:
        """Rebuild the heap from the parts in force (bans replaced over and over leave stale ends)."""
        self._ends = [(p.until, k, j) for k, e in self._entries.items() for j, p in e.parts.items()
                      if p.until is not None]
        heapq.heapify(self._ends)

    def next_expiry(self) -> float | None:
        """Earliest end time of any timed part, for scheduling `expire`."""
        heap = self._ends
        while heap:
            until, key, jail = heap[0]
            entry = self._entries.get(key)
            part = entry.parts.get(jail) if entry is not None else None
            if part is not None and part.until == until:
                return until
            heapq.heappop(heap)  # stale
        return None

    # -- subscribers --------------------------------------------------------

    def on_ban(self, callback: BanCallback) -> Callable[[], None]:
        """Call `callback(addr, listeners)` when an address becomes banned; returns an unsubscribe."""
        self._on_ban.append(callback)
        return lambda: self._on_ban.remove(callback) if callback in self._on_ban else None

    def on_unban(self, callback: UnbanCallback) -> Callable[[], None]:
        """Call `callback(addr)` when an address is no longer banned; returns an unsubscribe."""
        self._on_unban.append(callback)
        return lambda: self._on_unban.remove(callback) if callback in self._on_unban else None

    def on_narrow(self, callback: BanCallback) -> Callable[[], None]:
        """Call `callback(addr, listeners)` when a banned address's merged listener set shrinks and
        it stays banned (one jail's part lifted or expired, or replaced by a narrower one while
        another's remains); returns an unsubscribe. With `on_ban` and `on_unban`, a mirror of this
        set (a worker's) follows every change of the merged view."""
        self._on_narrow.append(callback)
        return lambda: self._on_narrow.remove(callback) if callback in self._on_narrow else None

    def _notify_narrow(self, key: str, entry: _Entry) -> None:
        for cb in list(self._on_narrow):
            try:
                cb(key, entry.listeners)
            except Exception:
                log.exception("on_narrow subscriber failed for %s", key)

    def _notify_unban(self, key: str) -> None:
        for cb in list(self._on_unban):
            try:
                cb(key)
            except Exception:
                log.exception("on_unban subscriber failed for %s", key)

    # -- views --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def ranges(self) -> int:
        """How many of the entries are networks."""
        return self._ranges

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, str) and normalize_key(addr) in self._entries

    def listeners_of(self, addr: str) -> frozenset[str] | None:
        """Merged protected-listener set of a banned address (None: all or not banned)."""
        key = normalize_key(addr)
        entry = self._entries.get(key) if key is not None else None
        return None if entry is None else entry.listeners

    def snapshot(self) -> dict[str, dict[str, tuple[frozenset[str] | None, float | None]]]:
        """address -> jail -> (listeners, until); a copy, for status and for pushing to workers."""
        return {
            key: {jail: (p.listeners, p.until) for jail, p in entry.parts.items()}
            for key, entry in self._entries.items()
        }

    def refused(self, addr: str) -> int:
        """Connections refused from `addr` (an address, or a banned network) since it was banned."""
        entry = self._entries.get(addr)  # keys are canonical: the lists of bans ask with them
        if entry is None:
            key = normalize_key(addr)
            entry = self._entries.get(key) if key is not None else None
        return 0 if entry is None else entry.refused
