"""The guard runtime: jails fed by sources, bans stored and enforced.

`Guard` owns the jails, their sources (followed logs, the journal, edge
events), the ban store, the in-memory `BanSet` the data plane checks at admit,
and the optional nftables mirror.

The path of a failure, and why it is fast: inotify wakes the follower, the
new lines are matched in the matcher process (see matcher.py: `re` holds the
GIL, so only another process keeps a runaway regex from freezing the event
loop; each batch has a deadline, past which the process is killed and
restarted and the batch dropped and counted), the jail counts on the loop,
a ban is committed to SQLite on the store's thread (~0.1 ms under synchronous=NORMAL) and only
then added to the `BanSet` - a ban is never reported as enforced before it
would survive ``kill -9``. Its `on_ban` subscribers (the data plane) close the
address's connections right there.

Configuration arrives as the config schema's own models (`GuardSettings`
and a `JailSettings` per jail name, edgeward/config/schema.py: the one
description of every option, its default and unit); guard/build.py turns
them into filters and jails, guard/validate.py says what is wrong with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeward.config.schema import Config, GuardSettings, JailSettings
from edgeward.guard.banset import BanSet, normalize_addr
from edgeward.guard.build import (
    CROWDSEC_JAIL,
    MANUAL_JAIL,
    BanNotStored,
    GuardError,
    build_filter,
    build_jail,
    filter_search_path,
)
from edgeward.guard.jail import BanDecision, BanHistory, IgnoreList, Jail
from edgeward.guard.matcher import MatcherClosed, MatcherError, MatchTimeout, ProcessMatcher
from edgeward.guard.nft import NftError, NftSync
from edgeward.guard.sources import EventSource, FileFollower, JournalSource
from edgeward.guard.store import BanRecord, Position, Store
from edgeward.guard.types import FailMatch
from edgeward.guard.validate import jail_problems

if TYPE_CHECKING:
    from edgeward.guard.crowdsec import CrowdSecBouncer
    from edgeward.guard.filter import Filter
    from edgeward.guard.share import BanShare

__all__ = ["MANUAL_JAIL", "Guard", "GuardError"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _JailRuntime:
    name: str
    cfg: JailSettings
    jail: Jail
    filter: Filter | None
    listeners: frozenset[str] | None
    followers: list[FileFollower] = field(default_factory=list)
    journals: list[JournalSource] = field(default_factory=list)
    unsubscribe: list[Callable[[], None]] = field(default_factory=list)
    banned: set[str] = field(default_factory=set)
    lines: int = 0
    matches: int = 0
    while_banned: int = 0
    filter_errors: int = 0
    filter_timeouts: int = 0
    filter_stats: dict[str, int] = field(default_factory=dict)  # process mode: summed deltas


class Guard:
    """Jails, sources, store and ban set, started and stopped together.

    `banset` and `events` are public: the data plane calls
    ``guard.banset.is_banned(addr, listener)`` at admit, subscribes
    ``guard.banset.on_ban(...)`` to close connections, and reports what it
    sees with ``guard.events.report(host, kind, detail)``.
    """

    def __init__(
        self,
        settings: GuardSettings,
        jails: Mapping[str, JailSettings] | None = None,
        *,
        db_path: str | None,
        banset: BanSet | None = None,
        events: EventSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`db_path` is the ban store (None: in memory only, bans do not survive a
        restart). Raises GuardError for every problem `validate.jail_problems` finds."""
        jails = dict(jails or {})
        problems = [msg for _where, msg, _hint in jail_problems(settings, jails)]
        if problems:
            raise GuardError("; ".join(problems))
        self.settings = settings
        self.jail_settings = jails
        self.db_path = db_path
        self._clock = clock
        self.banset = banset if banset is not None else BanSet(clock=clock)
        self.events = events if events is not None else EventSource(clock=clock)
        self.history = BanHistory()
        self.store: Store | None = None
        self.nft: NftSync | None = NftSync(settings.nft) if settings.nft.enabled else None
        search_path = filter_search_path(settings)
        self._jails: dict[str, _JailRuntime] = {}
        for name, jc in jails.items():
            if not jc.enabled:
                continue
            flt = build_filter(name, jc, search_path)
            jail = build_jail(name, jc, settings, flt, self.history)
            listeners = None if jc.listeners is None else frozenset(jc.listeners)
            self._jails[name] = _JailRuntime(name, jc, jail, flt, listeners)
        self._bans: dict[tuple[str, str], BanRecord] = {}
        self._matcher: ThreadPoolExecutor | None = None
        self._process: ProcessMatcher | None = None
        if settings.match_isolation == "process":
            filtered = {n: rt.cfg for n, rt in self._jails.items() if rt.filter is not None}
            if filtered:  # no process for a guard without log jails
                self._process = ProcessMatcher(filtered, search_path, timeout=settings.match_timeout)
        elif settings.match_isolation == "thread":
            self._matcher = self._thread_matcher()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at: float | None = None
        self._started = False
        self.ban_latency: list[float] = []  # seconds from match to enforcement, last 1000
        self.store_errors = 0  # bans the store failed to keep (enforced in memory only)
        self.share: BanShare | None = None
        if settings.share.redis is not None:
            # Here, not at the top: only a config with [guard.share] imports the redis library.
            from edgeward.guard.share import BanShare

            self.share = BanShare(settings.share, self, clock=clock)
        # Other nodes' jails decided with their own ignoreip; this node's is kept for their bans too.
        self._remote_ignore = IgnoreList(settings.ignoreip)
        self._unbanned_at: dict[tuple[str, str], float] = {}  # shared bans: the last unban of each
        self.crowdsec: CrowdSecBouncer | None = None  # [guard.crowdsec]: made at start

    @classmethod
    def from_config(cls, cfg: Config, *, clock: Callable[[], float] = time.time) -> Guard:
        """The guard of a whole config: its [guard] and [jails.*] tables, bans kept in
        edge.state_dir/guard.sqlite."""
        return cls(cfg.guard, cfg.jails, db_path=str(Path(cfg.edge.state_dir) / "guard.sqlite"),
                   clock=clock)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, restore bans into the ban set, then start the sources.

        Returns only after every stored ban is in the ban set, so the server
        can call it before its first listener accepts.
        """
        if self._started:
            return
        loop = asyncio.get_running_loop()
        # the matcher process starts (~0.1 s) while the store opens and bans are restored
        matcher_ready = (
            loop.create_task(self._process.start()) if self._process is not None else None
        )
        try:
            await self._restore()
        except BaseException:
            if matcher_ready is not None:
                matcher_ready.cancel()
                await asyncio.gather(matcher_ready, return_exceptions=True)
                assert self._process is not None
                await self._process.close()
            raise
        if matcher_ready is not None:
            try:
                await matcher_ready
            except MatcherError as exc:
                # Bans matter more than isolation: match on a thread rather than not at all.
                log.error("guard: %s; matching on a thread instead (no deadline)", exc)
                assert self._process is not None
                await self._process.close()
                self._process = None
                self._matcher = self._thread_matcher()
        for rt in self._jails.values():
            self._start_sources(rt)
        if self.settings.crowdsec is not None:
            # Imported only for a config that asks for it (it brings requests).
            from edgeward.guard.crowdsec import CrowdSecBouncer
            snapshot = str(Path(self.db_path).with_name("crowdsec-decisions.json")) if self.db_path else None
            self.crowdsec = CrowdSecBouncer(self.settings.crowdsec, self.banset, clock=self._clock,
                                            on_change=self._schedule_expiry, snapshot=snapshot,
                                            ignore=self.settings.ignoreip)
            await self.crowdsec.start()
        self._started = True
        self._schedule_expiry()
        if self.share is not None:
            await self.share.start()

    async def _restore(self) -> None:
        """Open the store, restore bans and history, apply the nftables table."""
        loop = asyncio.get_running_loop()
        path = self.db_path or ":memory:"
        self.store = await loop.run_in_executor(
            None, lambda: Store(path, synchronous=self.settings.db_synchronous)
        )
        store = self.store
        now = self._clock()
        expired = await store.call(store.remove_expired, now)
        # History older than history_max_age no longer grows bans: keep the table small.
        await store.call(store.purge_history, now - self.settings.history_max_age)
        if self.share is not None:
            await store.call(store.purge_lifted, now - self.settings.share.unban_retention)
            self._unbanned_at = await store.call(store.lifted, 0.0)
        records = await store.call(store.active_bans, now)
        for a, j, s, _ in await store.call(store.history, now - self.settings.history_max_age):
            self.history.record(a, j, s)
        for rec in records:
            self._enforce(rec)
        log.info("guard: restored %d bans (%d expired while down)", len(records), expired)
        if self.nft is not None:
            try:
                await self.nft.apply_full(
                    ((r.address, r.end) for r in records if r.listeners is None), now
                )
            except NftError as exc:
                log.error(
                    "guard: nftables table not applied: %s (bans still enforced at admit)", exc
                )

    def _start_sources(self, rt: _JailRuntime) -> None:
        cfg, name = rt.cfg, rt.name
        store = self.store

        async def on_lines(lines: list[str], rt: _JailRuntime = rt) -> None:
            await self._on_lines(rt, lines)

        for path in cfg.logpath:
            f = FileFollower(
                path,
                state=_KeyedPositions(store, f"{name}:") if store is not None else None,
                poll_interval=self.settings.poll_interval,
                start=cfg.start,
                use_inotify=self.settings.use_inotify,
            )
            rt.followers.append(f)
            f.start_task(on_lines)
        for src in cfg.sources:
            if src.startswith("edge:"):
                rt.unsubscribe.append(self.events.subscribe(src[5:], self._event_handler(rt)))
            elif src == "journal":
                if not JournalSource.available():
                    log.warning("jail %s: journalctl not found; journal source skipped", name)
                    continue
                matches = tuple(cfg.journalmatch) or tuple(
                    rt.filter.journalmatch if rt.filter is not None else ()
                )
                j = JournalSource(
                    matches,
                    state=_KeyedPositions(store, f"{name}:") if store is not None else None,
                )
                rt.journals.append(j)
                j.start_task(on_lines)

    async def stop(self) -> None:
        """Stop the sources, wait for bans being committed, close the store."""
        if not self._started:
            return
        if self.share is not None:
            await self.share.stop()
        self._started = False
        for rt in self._jails.values():
            for f in rt.followers:
                await f.stop()
            for j in rt.journals:
                await j.stop()
            for u in rt.unsubscribe:
                u()
            rt.followers.clear()
            rt.journals.clear()
            rt.unsubscribe.clear()
        if self.crowdsec is not None:
            await self.crowdsec.stop()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.nft is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nft.flushed(), 5.0)
            await self.nft.close()
        if self._matcher is not None:
            self._matcher.shutdown(wait=False)
        if self._process is not None:
            await self._process.close()
        if self.store is not None:
            store, self.store = self.store, None
            await asyncio.get_running_loop().run_in_executor(None, store.close)

    # -- failures -----------------------------------------------------------------------

    async def _on_lines(self, rt: _JailRuntime, lines: list[str]) -> None:
        flt = rt.filter
        if flt is None:
            return
        rt.lines += len(lines)
        received = time.monotonic()
        if self._process is not None:
            matches = await self._match_in_process(rt, lines)
        elif self._matcher is not None:
            loop = asyncio.get_running_loop()
            try:
                matches = await loop.run_in_executor(self._matcher, _match_lines, flt, lines, rt)
            except RuntimeError:  # the matcher was shut down: we are stopping
                return
        else:
            matches = _match_lines(flt, lines, rt)
        decisions = [
            d for m in matches if (d := self._on_failure(rt, m, received, spawn=False)) is not None
        ]
        for d in decisions:
            await self._commit(d, received)

    async def _match_in_process(self, rt: _JailRuntime, lines: list[str]) -> list[FailMatch]:
        assert self._process is not None
        try:
            res = await self._process.match(rt.name, lines, time.time())
        except MatchTimeout as exc:
            rt.filter_timeouts += 1
            log.log(
                logging.ERROR if rt.filter_timeouts == 1 else logging.DEBUG,
                "%s (longest line %d characters); suspect: %s. Further timeouts of this jail "
                "are only counted (filter_timeouts)",
                exc, exc.longest, _suspects(rt.filter),
            )
            return []
        except MatcherClosed:  # we are stopping
            return []
        except MatcherError as exc:
            rt.filter_errors += 1
            log.error("jail %s: %s; %d line(s) skipped", rt.name, exc, len(lines))
            return []
        for k, v in res.stats.items():
            rt.filter_stats[k] = rt.filter_stats.get(k, 0) + v
        broken = res.stats.get("errors", 0)
        if broken:
            rt.filter_errors += broken
            log.error("jail %s: the filter failed on %d line(s); skipped", rt.name, broken)
        return res.matches

    @staticmethod
    def _thread_matcher() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeward-match")

    def _on_failure(
        self, rt: _JailRuntime, m: FailMatch, received: float | None, *, spawn: bool = True
    ) -> BanDecision | None:
        """Count one failure; a resulting ban is committed in a task (spawn) or returned."""
        rt.matches += 1
        addr = normalize_addr(m.host)
        if addr is not None and addr in rt.banned:
            rt.while_banned += 1  # lines still in flight from before the ban
            return None
        decision = rt.jail.add_failure(m, self._clock())
        if decision is None or not spawn:
            return decision
        self._spawn(self._commit(decision, time.monotonic() if received is None else received))
        return None

    def _event_handler(self, rt: _JailRuntime) -> Callable[[FailMatch], None]:
        def handle(m: FailMatch) -> None:
            self._on_failure(rt, m, None)

        return handle

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, d: BanDecision, received: float | None = None, *, report: bool = False) -> BanRecord:
        """Store, then enforce, a ban. A failing store does not stop enforcement; with `report`
        (the admin API's ban) it raises BanNotStored after enforcing."""
        rt = self._jails.get(d.jail)
        listeners = rt.listeners if rt is not None else None
        rec = BanRecord(
            address=d.address,
            jail=d.jail,
            reason=d.reason,
            lines=d.lines,
            # Shared bans: a new ban starts after every unban of it this node knows, so that an unban
            # stamped by a clock running ahead of ours does not refuse it everywhere else.
            start=max(d.start, self._unbanned_at.get((d.address, d.jail), -1.0) + 0.001),
            end=d.end,
            count=d.count,
            listeners=None if listeners is None else tuple(sorted(listeners)),
        )
        if rt is not None:
            rt.banned.add(d.address)  # no second decision while this one commits
        store = self.store
        if store is None:
            raise GuardError("guard is not running")
        stored: Exception | None = None
        try:
            await store.call(store.add_ban, rec, d.bantime)
        except Exception as exc:
            # Disk full, a read-only or broken database: the ban still holds (a client that earned
            # it is refused), but only in memory; it is said loudly and counted.
            stored = exc
            self.store_errors += 1
            log.error("guard: storing the ban of %s failed (%s); enforced in memory only, lost at restart",
                      d.address, exc)
        self.history.record(d.address, d.jail, d.start)
        self._enforce(rec)
        if received is not None:
            self.ban_latency.append(time.monotonic() - received)
            del self.ban_latency[:-1000]
        end = "forever" if d.end is None else f"{d.bantime:g}s"
        log.warning("guard: banned %s in jail %s for %s (%s)", d.address, d.jail, end, d.reason)
        if self.share is not None:
            self.share.banned(rec)
        if self.crowdsec is not None:
            self.crowdsec.report_ban(d.address, d.jail, d.reason, d.start, d.end, max(1, d.failures))
        if stored is not None and report:
            raise BanNotStored(self._ban_dict(rec, self._clock()), str(stored))
        return rec

    def _enforce(self, rec: BanRecord) -> None:
        self._bans[(rec.address, rec.jail)] = rec
        rt = self._jails.get(rec.jail)
        if rt is not None:
            rt.banned.add(rec.address)
        self.banset.add(rec.address, jail=rec.jail, listeners=rec.listeners, until=rec.end)
        if self.nft is not None and rec.listeners is None and self._started:
            self.nft.add(rec.address, rec.end)
        if rec.end is not None:
            self._schedule_expiry()

    # -- expiry -----------------------------------------------------------------------------

    def _schedule_expiry(self) -> None:
        if not self._started:
            return
        nxt = self.banset.next_expiry()
        if nxt is None or (
            self._expiry is not None and self._expiry_at is not None and self._expiry_at <= nxt
        ):
            return
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        self._expiry_at = nxt
        self._expiry = loop.call_later(max(0.0, nxt - self._clock()) + 0.001, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self._expiry_at = None
        now = self._clock()
        dropped = self.banset.expire(now)
        for addr, jail in dropped:
            self._bans.pop((addr, jail), None)
            rt = self._jails.get(jail)
            if rt is not None:
                rt.banned.discard(addr)
            log.info("guard: ban of %s in jail %s ended", addr, jail)
        if dropped and self.store is not None:
            store = self.store
            self._spawn(store.call(store.remove_expired, now))
        self._schedule_expiry()

    # -- admin ------------------------------------------------------------------------------

    async def ban(
        self, jail: str, addr: str, reason: str = "manual", bantime: float | None = None
    ) -> dict[str, Any]:
        """Ban `addr` in `jail` now (jail "manual": forever unless `bantime`). Returns the ban."""
        if normalize_addr(addr) is None:
            raise GuardError(f"{addr!r} is not an IP address")
        now = self._clock()
        rt = self._jails.get(jail)
        if rt is not None:
            d = rt.jail.manual_ban(addr, now, reason=reason, bantime=bantime)
        elif jail == MANUAL_JAIL:
            bt = -1.0 if bantime is None or bantime == 0 else float(bantime)
            key = normalize_addr(addr) or addr
            d = BanDecision(
                jail=MANUAL_JAIL,
                address=key,
                start=now,
                end=None if bt < 0 else now + bt,
                bantime=bt,
                count=self.history.count(key, MANUAL_JAIL) + 1,
                failures=0,
                lines=(),
                reason=reason,
            )
        else:
            raise GuardError(f"no jail named {jail!r}")
        rec = await self._commit(d, report=True)
        return self._ban_dict(rec, now)

    async def unban(
        self, addr: str | None = None, *, all: bool = False, jail: str | None = None
    ) -> list[str]:
        """Lift the bans of `addr` (in `jail`, or every jail), or every ban with all=True.

        Returns the addresses that are no longer banned. Takes effect at
        once: the ban set, the nftables set and the store.
        """
        if all == (addr is not None):
            raise GuardError("give an address or all=True")
        key: str | None = None
        if addr is not None:
            key = normalize_addr(addr)
            if key is None:
                raise GuardError(f"{addr!r} is not an IP address")
        targets = [
            (a, j)
            for (a, j) in self._bans
            if (key is None or a == key) and (jail is None or j == jail)
        ]
        store = self.store
        now = self._clock()
        shared = self.share is not None
        # The unban of a ban this node sees lifts that ban on every node, even if this node's clock
        # runs behind the clock of the node that made it.
        lifted_at = {k: max(now, self._bans[k].start) for k in targets}
        if store is not None:
            await store.call(
                functools.partial(store.remove_ban, key, jail, lifted_at=now if shared else None)
            )
        lifted: list[str] = []
        for a, j in targets:
            self._bans.pop((a, j), None)
            rt = self._jails.get(j)
            if rt is not None:
                rt.banned.discard(a)
                rt.jail.forget(a)
            self.banset.remove(a, jail=j)
            if self.crowdsec is not None:
                self.crowdsec.report_unban(a, j)
            if a not in self.banset:
                lifted.append(a)
                if self.nft is not None:
                    self.nft.delete(a)
        for a in set(lifted):
            log.warning("guard: unbanned %s", a)
        if self.share is not None:
            # A ban named exactly is lifted on the other nodes even if it has not reached this one.
            if key is not None and jail is not None:
                lifted_at.setdefault((key, jail), now)
            self._note_unbans(lifted_at)
            self.share.unbanned(lifted_at)
        return sorted(set(lifted))

    # -- shared bans ([guard.share], guard/share.py) -------------------------------------------

    def _note_unbans(self, lifted: Mapping[tuple[str, str], float]) -> None:
        for k, at in lifted.items():
            self._unbanned_at[k] = max(at, self._unbanned_at.get(k, at))
        if len(self._unbanned_at) > 100_000 and self.share is not None:  # forget what Redis forgets too
            oldest = self._clock() - self.settings.share.unban_retention
            self._unbanned_at = {k: t for k, t in self._unbanned_at.items() if t >= oldest}

    def held(self) -> list[BanRecord]:
        """The bans in force here, this node's and other nodes'."""
        now = self._clock()
        return [r for r in self._bans.values() if r.end is None or r.end > now]

    async def lifted_since(self, since: float) -> dict[tuple[str, str], float]:
        """Unbans applied here since `since`, from the store."""
        store = self.store
        if store is None:
            return {}
        return await store.call(store.lifted, since)

    async def apply_remote_ban(self, rec: BanRecord) -> bool:
        """A ban from another node (through Redis): stored and enforced like ours, never published
        again, not counted in this node's ban history. Ignored (False) if it has ended or a ban of
        the same address and jail that started later is held."""
        key = (rec.address, rec.jail)
        cur = self._bans.get(key)
        if (rec.end is not None and rec.end <= self._clock()) or (
            # a later ban is held, or this one already (its reason and matched lines aside)
            cur is not None and (cur.start > rec.start or (cur.start, cur.end, cur.listeners, cur.origin)
                                 == (rec.start, rec.end, rec.listeners, rec.origin))
        ):
            return False
        if rec.jail != MANUAL_JAIL and rec.address in self._remote_ignore:
            log.info("guard: ban of %s in jail %s from node %s not applied: in guard.ignoreip",
                     rec.address, rec.jail, rec.origin)
            return False
        store = self.store
        if store is None:
            return False
        bantime = -1.0 if rec.end is None else rec.end - rec.start
        try:
            await store.call(functools.partial(store.add_ban, rec, bantime, history=False))
        except Exception as exc:
            self.store_errors += 1
            log.error("guard: storing the ban of %s from node %s failed (%s); enforced in memory only",
                      rec.address, rec.origin, exc)
        cur = self._bans.get(key)
        if cur is not None and cur.start > rec.start:  # one of ours arrived meanwhile
            return False
        self._enforce(rec)
        end = "forever" if rec.end is None else f"{bantime:g}s"
        log.warning("guard: banned %s in jail %s for %s (from node %s: %s)", rec.address, rec.jail, end,
                    rec.origin or "this one", rec.reason)
        return True

    async def apply_remote_unban(self, address: str, jail: str, at: float) -> bool:
        """An unban from another node at `at`: lifts the ban of (address, jail) if it started at
        or before `at`, and remembers the unban (the store's `lifted`). Never published again."""
        store = self.store
        if store is not None:
            try:
                await store.call(
                    functools.partial(store.remove_ban, address, jail, lifted_at=at, started_by=at)
                )
            except Exception as exc:  # the unban still holds here, until a restart brings the ban back
                self.store_errors += 1
                log.error("guard: storing the unban of %s in jail %s failed (%s)", address, jail, exc)
        self._note_unbans({(address, jail): at})
        cur = self._bans.get((address, jail))
        if cur is None or cur.start > at:
            return False
        del self._bans[(address, jail)]
        rt = self._jails.get(jail)
        if rt is not None:
            rt.banned.discard(address)
            rt.jail.forget(address)
        self.banset.remove(address, jail=jail)
        if address not in self.banset and self.nft is not None:
            self.nft.delete(address)
        log.warning("guard: unbanned %s in jail %s (from another node)", address, jail)
        return True

    def bans(self) -> list[dict[str, Any]]:
        """Bans in force, oldest first, JSON-serialisable."""
        now = self._clock()
        recs = sorted(self._bans.values(), key=lambda r: r.start)
        out = [self._ban_dict(r, now) for r in recs if r.end is None or r.end > now]
        if self.crowdsec is not None:
            out = sorted(out + self.crowdsec.bans(now), key=lambda b: float(b["start"]))
        return out

    def newest_bans(self, n: int) -> tuple[int, list[dict[str, Any]]]:
        """(how many bans are in force, the newest `n` of them, newest first). For the dashboard and
        `edgeward top`, which refresh every second or two: with a CrowdSec blocklist of 20k decisions,
        building every ban's dict each time held the event loop for 0.3-1 s; this builds `n`."""
        now = self._clock()
        live = [r for r in self._bans.values() if r.end is None or r.end > now]
        out = [self._ban_dict(r, now) for r in heapq.nlargest(n, live, key=lambda r: r.start)]
        total = len(live)
        if self.crowdsec is not None:
            total += self.crowdsec.in_force(now)
            out = heapq.nlargest(n, out + self.crowdsec.newest_bans(n, now), key=lambda b: float(b["start"]))
        return total, out

    def _ban_dict(self, rec: BanRecord, now: float) -> dict[str, Any]:
        d = rec.to_dict()
        if self.share is not None and rec.origin is None:
            d["origin"] = self.share.node
        d["remaining"] = None if rec.end is None else max(0.0, rec.end - now)
        d["refused"] = self.banset.refused(rec.address)
        return d

    def status(self, jail: str | None = None) -> dict[str, Any]:
        """Jails (settings, sources, failure counts per address, bans with reasons), JSON-serialisable."""
        if jail == CROWDSEC_JAIL and self.crowdsec is not None:
            return {"crowdsec": self.crowdsec.status(with_bans=True)}
        if jail is not None and jail not in self._jails:
            raise GuardError(f"no jail named {jail!r}")
        now = self._clock()
        jails = []
        for name, rt in self._jails.items():
            if jail is not None and name != jail:
                continue
            cfg = rt.cfg
            sources: list[dict[str, Any]] = [
                {
                    "type": "file",
                    "path": f.path,
                    "inotify": f.using_inotify,
                    "lines": f.stats.lines,
                    "cut_lines": f.stats.cut_lines,
                    "decode_errors": f.stats.decode_errors,
                    "rotations": f.stats.rotations,
                    "truncations": f.stats.truncations,
                    "errors": f.stats.errors,
                }
                for f in rt.followers
            ]
            sources += [
                {"type": "journal", "matches": list(j.matches), "lines": j.stats.lines}
                for j in rt.journals
            ]
            sources += [
                {"type": "edge", "kind": s[5:]} for s in cfg.sources if s.startswith("edge:")
            ]
            st = rt.jail.stats
            jails.append(
                {
                    "name": name,
                    "filter": cfg.filter or ("inline" if cfg.failregex else None),
                    "sources": sources,
                    "maxretry": cfg.maxretry,
                    "findtime": cfg.findtime,
                    "bantime": cfg.bantime,
                    "increment": cfg.increment is not None and cfg.increment.enabled,
                    "listeners": None if rt.listeners is None else sorted(rt.listeners),
                    "failures": rt.jail.failures(now),
                    "counters": {
                        "lines": rt.lines,
                        "matches": rt.matches,
                        "failures": st.failures,
                        "ignored": st.ignored,
                        "too_old": st.too_old,
                        "future": st.future,
                        "invalid": st.invalid,
                        "evicted": st.evicted,
                        "while_banned": rt.while_banned,
                        "filter_errors": rt.filter_errors,
                        "filter_timeouts": rt.filter_timeouts,
                        "bans": st.bans,
                        "refused": self.banset.refused_by_jail.get(name, 0),
                    },
                    "bans": [
                        self._ban_dict(r, now)
                        for (a, j), r in sorted(self._bans.items(), key=lambda kv: kv[1].start)
                        if j == name and (r.end is None or r.end > now)
                    ],
                }
            )
        out: dict[str, Any] = {"jails": jails}
        if jail is None:
            out["banned"] = len(self.banset)
            out["store_errors"] = self.store_errors
            out["events"] = {
                "reported": self.events.stats.reported,
                "delivered": self.events.stats.delivered,
                "unsubscribed": self.events.stats.unsubscribed,
                "invalid": self.events.stats.invalid,
            }
            out["manual"] = [
                self._ban_dict(r, now) for (a, j), r in self._bans.items() if j not in self._jails
            ]
            out["matcher"] = {
                "isolation": "process" if self._process is not None else (
                    "thread" if self._matcher is not None else "inline"),
                "timeout": self.settings.match_timeout,
                "pid": self._process.pid if self._process is not None else None,
                "restarts": max(0, self._process.starts - 1) if self._process is not None else 0,
            }
            if self.share is not None:
                out["share"] = self.share.status()
            if self.crowdsec is not None:
                out["crowdsec"] = self.crowdsec.status()
            if self.nft is not None:
                out["nft"] = {
                    "table": self.settings.nft.table,
                    "runs": self.nft.runs,
                    "errors": self.nft.errors,
                }
        return out

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until pending ban commits are done (for tests and orderly shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


def _match_lines(flt: Filter, lines: list[str], rt: _JailRuntime) -> list[FailMatch]:
    """Run the filter over a batch (one lock, ~30% faster than per line); a line that breaks the
    filter is counted by the filter and skipped, never fatal."""
    before = flt.stats["errors"]
    out = flt.process_lines(lines, now=time.time())
    broken = flt.stats["errors"] - before
    if broken:
        rt.filter_errors += broken
        log.error("jail %s: the filter failed on %d line(s); skipped", rt.name, broken)
    return out


def _suspects(flt: Filter | None) -> str:
    """Which regexes a timeout most likely comes from, for the log."""
    if flt is None:
        return "unknown"
    flagged = [u.split(" may backtrack")[0] for u in flt.unsupported if "may backtrack" in u]
    if flagged:
        return "; ".join(flagged)
    rxs = [f"{rx.origin.path}:{rx.origin.line}: {rx.source!r}" for rx in flt.failregex]
    return "no regex has nested repetition; one of " + "; ".join(rxs)


class _KeyedPositions:
    """Positions of one jail's sources: several jails may follow the same file."""

    def __init__(self, store: Store, prefix: str) -> None:
        self._store = store
        self._prefix = prefix

    def load(self, key: str) -> Position | None:
        return self._store.load(self._prefix + key)

    def save(self, key: str, pos: Position) -> None:
        self._store.save(self._prefix + key, pos)
