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

Configuration arrives as the plain dataclasses below (`GuardConfig`,
`JailConfig`); the config schema maps TOML onto them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from edgeward.guard.banset import BanSet, normalize_addr
from edgeward.guard.filter import DEFAULT_SEARCH_DIRS, Filter, FilterError, load_filter
from edgeward.guard.jail import BanDecision, BanHistory, BanIncrement, Jail, JailError
from edgeward.guard.matcher import MatcherClosed, MatcherError, MatchTimeout, ProcessMatcher
from edgeward.guard.nft import NftConfig, NftError, NftSync
from edgeward.guard.sources import EventSource, FileFollower, JournalSource
from edgeward.guard.store import BanRecord, Position, Store
from edgeward.guard.types import FailMatch

log = logging.getLogger(__name__)

MANUAL_JAIL = "manual"
MATCH_ISOLATION = ("process", "thread", "inline")


class GuardError(ValueError):
    """A guard configuration that cannot run, or a bad admin request."""


@dataclass(frozen=True, slots=True)
class JailConfig:
    """One jail. Defaults follow fail2ban's where it has one.

    - `name` (required): unique jail name ("manual" is reserved).
    - `enabled` (True).
    - `logpath` (()): log files to follow (``tail -F`` semantics).
    - `sources` (()): other sources: ``"edge:<kind>"`` (edge-observed events,
      see `EventSource`; kinds ``sniff``, ``proto``, ``conn``, ``http401``, ...)
      and ``"journal"`` (the systemd journal, filtered by `journalmatch`).
    - `filter` (None): fail2ban filter by name (searched in
      `GuardConfig.filter_dirs`; ``"sshd[mode=aggressive]"`` allowed) or path.
    - `filter_params` ({}): extra filter parameters (fail2ban's ``filter = x[a=b]``).
    - `failregex` / `ignoreregex` (()): inline regexes with ``<HOST>``; used
      when `filter` is None, appended to the filter's otherwise.
    - `datepattern` (None: auto-detect), `maxlines` (1): for inline filters.
    - `journalmatch` (()): journalctl matches (default: the filter's own).
    - `maxretry` (5): failures that trigger a ban.
    - `findtime` (600 s): window in which `maxretry` failures must fall.
    - `bantime` (600 s): ban length; negative: forever.
    - `increment` (off): growing bans, fail2ban's ``bantime.*`` (see `BanIncrement`).
    - `ignoreip` (()): addresses and CIDRs (v4/v6) never banned by this jail
      (`GuardConfig.ignoreip` is added).
    - `listeners` (None: all): names of the listeners the ban protects.
    - `start` ("head"): where to begin a log file seen for the first time:
      "head" (everything; entries older than findtime are not counted) or "tail".
    """

    name: str
    enabled: bool = True
    logpath: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    filter: str | None = None
    filter_params: Mapping[str, str] = field(default_factory=dict)
    failregex: tuple[str, ...] = ()
    ignoreregex: tuple[str, ...] = ()
    datepattern: str | None = None
    maxlines: int = 1
    journalmatch: tuple[str, ...] = ()
    maxretry: int = 5
    findtime: float = 600.0
    bantime: float = 600.0
    increment: BanIncrement = field(default_factory=BanIncrement)
    ignoreip: tuple[str, ...] = ()
    listeners: tuple[str, ...] | None = None
    start: str = "head"


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """The guard as a whole.

    - `jails` (()): the jails.
    - `db_path` ("/var/lib/edgeward/guard.sqlite"): the ban store; None keeps
      bans in memory only (they do not survive a restart).
    - `db_synchronous` ("NORMAL"): SQLite synchronous mode; NORMAL survives
      ``kill -9`` (see store.py), FULL also survives power loss (+1 fsync per ban).
    - `filter_dirs` (("/etc/fail2ban/filter.d", edgeward's own)): where filters
      named without a path are searched.
    - `ignoreip` (()): addresses and CIDRs never banned by any jail.
    - `poll_interval` (0.25 s): log polling period where inotify is missing.
    - `use_inotify` (True): False forces polling.
    - `max_tracked` (100000): addresses counted per jail before the least
      recently seen is forgotten (bounds memory under a spoofed-source flood).
    - `history_max_age` (7 days): how long past bans count for growing bans.
    - `match_isolation` ("process"): where filters run. "process": in one
      matcher process per guard (see matcher.py), so a regex that backtracks
      catastrophically cannot stall the event loop, and each batch is bounded
      by `match_timeout`; "thread": on a matcher thread (no process, but `re`
      holds the GIL, so a runaway regex stalls the loop, unbounded); "inline":
      on the loop itself (tests and benchmarks).
    - `match_timeout` (2 s): deadline of one batch of lines in "process" mode;
      past it the matcher process is killed and restarted, the batch dropped
      and counted in the jail's ``filter_timeouts``.
    - `nft` (disabled): mirror bans into an nftables set (see `NftConfig`).
    """

    jails: tuple[JailConfig, ...] = ()
    db_path: str | None = "/var/lib/edgeward/guard.sqlite"
    db_synchronous: str = "NORMAL"
    filter_dirs: tuple[str, ...] = DEFAULT_SEARCH_DIRS
    ignoreip: tuple[str, ...] = ()
    poll_interval: float = 0.25
    use_inotify: bool = True
    max_tracked: int = 100_000
    history_max_age: float = 7 * 86400.0
    match_isolation: str = "process"
    match_timeout: float = 2.0
    nft: NftConfig = field(default_factory=NftConfig)


def build_filter(cfg: JailConfig, filter_dirs: tuple[str, ...]) -> Filter | None:
    """The jail's filter, or None for a jail fed only by edge events. Raises GuardError."""
    try:
        if cfg.filter:
            if cfg.failregex or cfg.ignoreregex:
                raise GuardError(f"jail {cfg.name}: give a filter or an inline failregex, not both")
            return load_filter(cfg.filter, search_dirs=filter_dirs, params=dict(cfg.filter_params))
        if cfg.failregex:
            return Filter.from_inline(
                list(cfg.failregex), list(cfg.ignoreregex), cfg.datepattern, cfg.maxlines
            )
    except FilterError as exc:
        raise GuardError(f"jail {cfg.name}: {exc}") from exc
    if cfg.logpath or any(s.startswith("journal") for s in cfg.sources):
        raise GuardError(f"jail {cfg.name}: a log source needs a filter or failregex")
    return None


def validate_config(config: GuardConfig) -> list[str]:
    """Every problem of `config` as a message (empty: fine). For ``edgeward check``."""
    problems: list[str] = []
    if config.match_isolation not in MATCH_ISOLATION:
        problems.append(
            f"match_isolation {config.match_isolation!r}: one of {', '.join(MATCH_ISOLATION)}"
        )
    if not config.match_timeout > 0:
        problems.append(f"match_timeout {config.match_timeout!r}: must be positive")
    names: set[str] = set()
    for jc in config.jails:
        if jc.name in names or jc.name == MANUAL_JAIL:
            problems.append(f"jail {jc.name}: duplicate or reserved name")
        names.add(jc.name)
        for src in jc.sources:
            if not (src.startswith("edge:") and len(src) > 5) and src != "journal":
                problems.append(f"jail {jc.name}: unknown source {src!r} (edge:<kind> or journal)")
        if not jc.logpath and not jc.sources:
            problems.append(f"jail {jc.name}: no logpath and no sources")
        try:
            flt = build_filter(jc, config.filter_dirs)
            Jail(
                jc.name,
                flt,
                maxretry=jc.maxretry,
                findtime=jc.findtime,
                bantime=jc.bantime,
                ignoreip=(*config.ignoreip, *jc.ignoreip),
                increment=jc.increment,
            )
            if flt is not None:
                problems += [f"jail {jc.name}: {u}" for u in flt.unsupported]
        except (GuardError, JailError) as exc:
            problems.append(str(exc) if str(exc).startswith("jail ") else f"jail {jc.name}: {exc}")
    return problems


@dataclass(slots=True)
class _JailRuntime:
    cfg: JailConfig
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
        config: GuardConfig,
        *,
        banset: BanSet | None = None,
        events: EventSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        problems = [p for p in validate_config(config) if "may backtrack" not in p]
        if problems:
            raise GuardError("; ".join(problems))
        self.config = config
        self._clock = clock
        self.banset = banset if banset is not None else BanSet(clock=clock)
        self.events = events if events is not None else EventSource(clock=clock)
        self.history = BanHistory()
        self.store: Store | None = None
        self.nft: NftSync | None = NftSync(config.nft) if config.nft.enabled else None
        self._jails: dict[str, _JailRuntime] = {}
        for jc in config.jails:
            if not jc.enabled:
                continue
            flt = build_filter(jc, config.filter_dirs)
            jail = Jail(
                jc.name,
                flt,
                maxretry=jc.maxretry,
                findtime=jc.findtime,
                bantime=jc.bantime,
                ignoreip=(*config.ignoreip, *jc.ignoreip),
                increment=jc.increment,
                history=self.history,
                max_tracked=config.max_tracked,
            )
            listeners = None if jc.listeners is None else frozenset(jc.listeners)
            self._jails[jc.name] = _JailRuntime(jc, jail, flt, listeners)
        self._bans: dict[tuple[str, str], BanRecord] = {}
        self._matcher: ThreadPoolExecutor | None = None
        self._process: ProcessMatcher | None = None
        if config.match_isolation == "process":
            filtered = [rt.cfg for rt in self._jails.values() if rt.filter is not None]
            if filtered:  # no process for a guard without log jails
                self._process = ProcessMatcher(
                    filtered, config.filter_dirs, timeout=config.match_timeout
                )
        elif config.match_isolation == "thread":
            self._matcher = self._thread_matcher()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at: float | None = None
        self._started = False
        self.ban_latency: list[float] = []  # seconds from match to enforcement, last 1000

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
        self._started = True
        self._schedule_expiry()

    async def _restore(self) -> None:
        """Open the store, restore bans and history, apply the nftables table."""
        loop = asyncio.get_running_loop()
        path = self.config.db_path or ":memory:"
        self.store = await loop.run_in_executor(
            None, lambda: Store(path, synchronous=self.config.db_synchronous)
        )
        store = self.store
        now = self._clock()
        expired = await store.call(store.remove_expired, now)
        # History older than history_max_age no longer grows bans: keep the table small.
        await store.call(store.purge_history, now - self.config.history_max_age)
        records = await store.call(store.active_bans, now)
        for a, j, s, _ in await store.call(store.history, now - self.config.history_max_age):
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
        cfg = rt.cfg
        store = self.store

        async def on_lines(lines: list[str], rt: _JailRuntime = rt) -> None:
            await self._on_lines(rt, lines)

        for path in cfg.logpath:
            f = FileFollower(
                path,
                state=_KeyedPositions(store, f"{cfg.name}:") if store is not None else None,
                poll_interval=self.config.poll_interval,
                start=cfg.start,
                use_inotify=self.config.use_inotify,
            )
            rt.followers.append(f)
            f.start_task(on_lines)
        for src in cfg.sources:
            if src.startswith("edge:"):
                rt.unsubscribe.append(self.events.subscribe(src[5:], self._event_handler(rt)))
            elif src == "journal":
                if not JournalSource.available():
                    log.warning("jail %s: journalctl not found; journal source skipped", cfg.name)
                    continue
                matches = cfg.journalmatch or tuple(
                    rt.filter.journalmatch if rt.filter is not None else ()
                )
                j = JournalSource(
                    matches,
                    state=_KeyedPositions(store, f"{cfg.name}:") if store is not None else None,
                )
                rt.journals.append(j)
                j.start_task(on_lines)

    async def stop(self) -> None:
        """Stop the sources, wait for bans being committed, close the store."""
        if not self._started:
            return
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
            res = await self._process.match(rt.cfg.name, lines, time.time())
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
            log.error("jail %s: %s; %d line(s) skipped", rt.cfg.name, exc, len(lines))
            return []
        for k, v in res.stats.items():
            rt.filter_stats[k] = rt.filter_stats.get(k, 0) + v
        broken = res.stats.get("errors", 0)
        if broken:
            rt.filter_errors += broken
            log.error("jail %s: the filter failed on %d line(s); skipped", rt.cfg.name, broken)
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

    async def _commit(self, d: BanDecision, received: float | None = None) -> BanRecord:
        rt = self._jails.get(d.jail)
        listeners = rt.listeners if rt is not None else None
        rec = BanRecord(
            address=d.address,
            jail=d.jail,
            reason=d.reason,
            lines=d.lines,
            start=d.start,
            end=d.end,
            count=d.count,
            listeners=None if listeners is None else tuple(sorted(listeners)),
        )
        if rt is not None:
            rt.banned.add(d.address)  # no second decision while this one commits
        store = self.store
        if store is None:
            raise GuardError("guard is not running")
        try:
            await store.call(store.add_ban, rec, d.bantime)
        except Exception:
            if rt is not None:
                rt.banned.discard(d.address)
            log.exception("guard: storing the ban of %s failed; not enforced", d.address)
            raise
        self.history.record(d.address, d.jail, d.start)
        self._enforce(rec)
        if received is not None:
            self.ban_latency.append(time.monotonic() - received)
            del self.ban_latency[:-1000]
        end = "forever" if d.end is None else f"{d.bantime:g}s"
        log.warning("guard: banned %s in jail %s for %s (%s)", d.address, d.jail, end, d.reason)
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
        rec = await self._commit(d)
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
        if store is not None:
            await store.call(store.remove_ban, key, jail)
        lifted: list[str] = []
        for a, j in targets:
            self._bans.pop((a, j), None)
            rt = self._jails.get(j)
            if rt is not None:
                rt.banned.discard(a)
                rt.jail.forget(a)
            self.banset.remove(a, jail=j)
            if a not in self.banset:
                lifted.append(a)
                if self.nft is not None:
                    self.nft.delete(a)
        for a in set(lifted):
            log.warning("guard: unbanned %s", a)
        return sorted(set(lifted))

    def bans(self) -> list[dict[str, Any]]:
        """Bans in force, oldest first, JSON-serialisable."""
        now = self._clock()
        recs = sorted(self._bans.values(), key=lambda r: r.start)
        return [self._ban_dict(r, now) for r in recs if r.end is None or r.end > now]

    def _ban_dict(self, rec: BanRecord, now: float) -> dict[str, Any]:
        d = rec.to_dict()
        d["remaining"] = None if rec.end is None else max(0.0, rec.end - now)
        d["refused"] = self.banset.refused(rec.address)
        return d

    def status(self, jail: str | None = None) -> dict[str, Any]:
        """Jails (settings, sources, failure counts per address, bans with reasons), JSON-serialisable."""
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
                    "increment": cfg.increment.enabled,
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
                "timeout": self.config.match_timeout,
                "pid": self._process.pid if self._process is not None else None,
                "restarts": max(0, self._process.starts - 1) if self._process is not None else 0,
            }
            if self.nft is not None:
                out["nft"] = {
                    "table": self.config.nft.table,
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
        log.error("jail %s: the filter failed on %d line(s); skipped", rt.cfg.name, broken)
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
