"""Bans shared between edge nodes through Redis ([guard.share]).

A ban or unban on one node is enforced on every node. Redis holds the state of
record, so a node that starts later or comes back after an outage can catch up:

- ``<prefix>:bans``   hash  "address|jail" -> the ban as JSON (start, end, reason,
  listeners, origin node, ...); ``<prefix>:ends`` sorted set of timed bans by end,
  so expired ones are pruned without scanning the hash;
- ``<prefix>:unbans`` hash  "address|jail" -> time of the last unban, and
  ``<prefix>:unban_times`` sorted set to forget them after ``unban_retention``;
- ``<prefix>:changes`` pub/sub channel: every change, for sub-millisecond
  propagation to the nodes connected now.

Every write is one Lua script (atomic in Redis) with the same rule a node applies
to what it receives: *last writer wins by the ban's start time, and an unban at
time T lifts every ban of that address and jail that started at or before T*.
Operations are therefore idempotent and commutative: replaying them, receiving
them twice or out of order, or merging a whole node's state, always ends in the
same bans. That is what makes the reconnect simple and loss-free: on every
(re)connection a node subscribes first (so nothing published from then on is
missed), then merges both ways with Redis (`plan_merge`): bans it made or learnt
while cut off are pushed, bans and unbans it missed are applied. If Redis lost
its data (restarted without persistence), the first node back fills it again.

Echo loops are avoided twice over: a change received from Redis is applied
through the guard's `apply_remote_*` methods, which never publish; and a node
skips messages carrying its own instance id.

While Redis is away every node keeps its bans (they are in its own SQLite store,
peers' bans too, marked with their origin), keeps banning, and retries with a
bounded, jittered back-off.

The `redis` library (redis.asyncio) is imported only by this module, and this
module only when [guard.share] is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

from edgeward.config.schema import ShareSettings, redact_url
from edgeward.guard.banset import normalize_addr
from edgeward.guard.store import BanRecord

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (address, jail)

_MAX_LINES = 10  # matched lines carried with a shared ban (status shows them; Redis stays small)
_MAX_LINE = 500
_MAX_QUEUE = 100_000  # changes waiting for Redis; beyond, the session restarts and merges instead
_BATCH = 256  # scripts per pipeline while merging
_PRUNE_EVERY = 60.0  # seconds between prunes of ended bans in Redis (each node, jittered)

# Numbers read back from Redis count only when finite: what another writer left there ("inf",
# "nan", text) must not refuse or lift bans forever.
_FINITE = """
local function finite(x)
  local n = tonumber(x)
  if n and n == n and n ~= math.huge and n ~= -math.huge then return n end
  return nil
end
local function start_of(doc)
  local ok, c = pcall(cjson.decode, doc)
  if ok and type(c) == 'table' then return finite(c.start) end
  return nil
end
"""

# KEYS: bans, ends, unbans, unban_times. ARGV: field, ban JSON, start, end ('' = forever), channel, message.
# Refused (0) when an unban at or after this start is known, or a newer ban of the key is held.
_PUT = _FINITE + """
local lifted = finite(redis.call('HGET', KEYS[3], ARGV[1]))
if lifted and lifted >= tonumber(ARGV[3]) then return 0 end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  if cur == ARGV[2] then return 2 end
  local s = start_of(cur)
  if s and s > tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""

# KEYS as _PUT. ARGV: field, time of the unban, channel, message.
# Remembers the unban (the latest per key), deletes a ban that started at or before it, and
# publishes when anything changed. Returns 1 if a ban was deleted.
_LIFT = _FINITE + """
local at = tonumber(ARGV[2])
local prev = finite(redis.call('HGET', KEYS[3], ARGV[1]))
local newer = (not prev) or prev < at
if newer then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
end
local deleted = 0
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local s = start_of(cur)
  if (not s) or s <= at then
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
    deleted = 1
  end
end
if newer or deleted == 1 then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return deleted
"""

# KEYS as _PUT. ARGV: now (bans that ended by then go), forget unbans older than this. Bounded
# work per call (the caller repeats while it returns 1000 or more).
_PRUNE = """
local n = 0
local ended = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)
for _, k in ipairs(ended) do
  redis.call('HDEL', KEYS[1], k)
  redis.call('ZREM', KEYS[2], k)
  n = n + 1
end
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[2], 'LIMIT', 0, 1000)
for _, k in ipairs(old) do
  redis.call('HDEL', KEYS[3], k)
  redis.call('ZREM', KEYS[4], k)
  n = n + 1
end
return n
"""


class SharedGuard(Protocol):
    """What the share needs of the guard (service.Guard implements it)."""

    def held(self) -> list[BanRecord]:
        """The bans in force here, this node's and peers'."""
        ...

    async def lifted_since(self, since: float) -> dict[Key, float]:
        """Unbans applied here since `since` (from the store: they survive a restart)."""
        ...

    async def apply_remote_ban(self, rec: BanRecord) -> bool:
        """Keep and enforce a ban from Redis unless a newer one of the key is held; never published."""
        ...

    async def apply_remote_unban(self, address: str, jail: str, at: float) -> bool:
        """Lift the ban of (address, jail) if it started at or before `at`; remember the unban."""
        ...


class BadRecord(ValueError):
    """A ban or message from Redis that is not one edgeward wrote (counted, skipped)."""


# -- the wire format (sans I/O) -----------------------------------------------------------------


def field_of(address: str, jail: str) -> str:
    return f"{address}|{jail}"


def key_of(fld: str) -> Key:
    address, sep, jail = fld.partition("|")
    if not sep or not jail:
        raise BadRecord(f"field {fld[:80]!r} is not address|jail")
    return address, jail


def encode_ban(rec: BanRecord, node: str) -> str:
    """A ban as stored in Redis and published: `origin` is always a node name there."""
    return json.dumps(
        {
            "address": rec.address,
            "jail": rec.jail,
            "start": rec.start,
            "end": rec.end,
            "reason": rec.reason,
            "count": rec.count,
            "listeners": None if rec.listeners is None else list(rec.listeners),
            "origin": rec.origin or node,
            "lines": [ln[:_MAX_LINE] for ln in rec.lines[-_MAX_LINES:]],
        },
        separators=(",", ":"),
        sort_keys=True,
    )


def _number(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise BadRecord(f"{what} is not a number")
    return float(v)


def _text(v: object, what: str, limit: int = 200) -> str:
    if not isinstance(v, str) or not v or len(v) > limit:
        raise BadRecord(f"{what} is not a short text")
    return v


def decode_ban(raw: str | bytes | Mapping[str, Any], node: str) -> BanRecord:
    """A ban read from Redis (`origin` equal to this node's name becomes None: ours). Raises BadRecord."""
    if isinstance(raw, Mapping):
        doc: object = raw
    else:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRecord(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BadRecord("not a JSON object")
    address = normalize_addr(_text(doc.get("address"), "address", 64))
    if address is None:
        raise BadRecord("address is not an IP address")
    jail = _text(doc.get("jail"), "jail")
    start = _number(doc.get("start"), "start")
    end_raw = doc.get("end")
    end = None if end_raw is None else _number(end_raw, "end")
    listeners_raw = doc.get("listeners")
    listeners: tuple[str, ...] | None = None
    if listeners_raw is not None:
        if not isinstance(listeners_raw, list) or len(listeners_raw) > 1000:
            raise BadRecord("listeners is not a list")
        listeners = tuple(_text(x, "listener") for x in listeners_raw)
    reason = doc.get("reason")
    count = doc.get("count")
    lines = doc.get("lines")
    origin = _text(doc.get("origin"), "origin")
    return BanRecord(
        address=address,
        jail=jail,
        reason=reason[:1000] if isinstance(reason, str) else "",
        lines=tuple(str(x)[:_MAX_LINE] for x in lines[:_MAX_LINES]) if isinstance(lines, list) else (),
        start=start,
        end=end,
        count=count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1,
        listeners=listeners,
        origin=None if origin == node else origin,
    )


def same_ban(a: BanRecord, b: BanRecord) -> bool:
    """The same ban for enforcement (the matched lines and reason aside)."""
    return (a.start, a.end, a.listeners, a.origin) == (b.start, b.end, b.listeners, b.origin)


@dataclass(slots=True)
class MergePlan:
    """What a node does to agree with Redis (`plan_merge`)."""

    push_unbans: dict[Key, float] = field(default_factory=dict)  # unbans Redis does not know
    drop: dict[Key, float] = field(default_factory=dict)  # local bans lifted meanwhile: key -> unban time
    push: list[BanRecord] = field(default_factory=list)  # local bans newer than Redis's (or missing there)
    adopt: list[BanRecord] = field(default_factory=list)  # Redis's bans newer than ours (or missing here)


def plan_merge(
    local: Iterable[BanRecord],
    local_unbans: Mapping[Key, float],
    remote: Iterable[BanRecord],
    remote_unbans: Mapping[Key, float],
    now: float,
) -> MergePlan:
    """Both sides' bans and unbans → what to push and what to apply, by the one rule of every
    write: the latest start wins, and an unban at T lifts what started at or before T."""
    plan = MergePlan()
    mine = {(r.address, r.jail): r for r in local if r.end is None or r.end > now}
    theirs = {(r.address, r.jail): r for r in remote if r.end is None or r.end > now}
    for key, at in local_unbans.items():
        if at > remote_unbans.get(key, -math.inf):
            plan.push_unbans[key] = at
    for key in mine.keys() | theirs.keys():
        lifted = max(local_unbans.get(key, -math.inf), remote_unbans.get(key, -math.inf))
        L, R = mine.get(key), theirs.get(key)
        if R is not None and R.start <= lifted:
            R = None
        if L is not None and L.start <= lifted:
            plan.drop[key] = lifted
            L = None
        if L is not None and (R is None or L.start > R.start):
            plan.push.append(L)
        elif R is not None and (L is None or R.start > L.start or not same_ban(L, R)):
            plan.adopt.append(R)
    return plan


# -- the connection ----------------------------------------------------------------------------------


@dataclass(slots=True)
class ShareStats:
    connects: int = 0  # sessions that reached Redis and merged
    failures: int = 0  # connection attempts and sessions that failed
    sent_bans: int = 0
    sent_unbans: int = 0
    refused_bans: int = 0  # pushes Redis refused: a newer ban or an unban there (it tells us)
    received_bans: int = 0
    received_unbans: int = 0
    stale: int = 0  # received changes older than what is held here
    bad: int = 0  # records and messages that are not edgeward's
    deferred: int = 0  # changes made while Redis was away (published by the next merge)
    merges: int = 0


@dataclass(slots=True)
class _Change:
    rec: BanRecord | None = None  # a ban
    key: Key | None = None  # or an unban of key at `at`
    at: float = 0.0


class BanShare:
    """One node's link to the shared bans. `banned`/`unbanned` are the guard's hooks (synchronous,
    cheap: they queue); `start` connects in the background and returns after the first merge or
    the first failure (bounded by `timeout`)."""

    def __init__(self, settings: ShareSettings, guard: SharedGuard, *,
                 clock: Callable[[], float] = time.time) -> None:
        if settings.redis is None:
            raise ValueError("[guard.share] redis is not set")
        self.settings = settings
        self.url = settings.redis
        self.shown_url = redact_url(settings.redis)
        self.node = settings.node or socket.gethostname()
        self.instance = f"{self.node}#{os.getpid()}.{random.getrandbits(48):012x}"
        self.guard = guard
        self._clock = clock
        p = settings.prefix
        self.keys = [f"{p}:bans", f"{p}:ends", f"{p}:unbans", f"{p}:unban_times"]
        self.channel = f"{p}:changes"
        self.stats = ShareStats()
        self.connected = False
        self.connected_since: float | None = None
        self.last_error: str | None = None
        self.retry_at: float | None = None
        self.last_merge: dict[str, int] = {}
        self._accepting = False  # queue changes (from subscription on), else count them deferred
        self._queue: asyncio.Queue[_Change] = asyncio.Queue()
        self._lock = asyncio.Lock()  # merges and writes one at a time
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()  # the first attempt ended (merged or failed)
        self._down_logged = False
        self._bad_logged = False
        self._session_broken = False

    # -- the guard's hooks ------------------------------------------------------------------

    def banned(self, rec: BanRecord) -> None:
        """A ban this node made (jail, admin, edge source): published to the others."""
        self._put(_Change(rec=rec))

    def unbanned(self, lifted: Mapping[Key, float]) -> None:
        """Unbans this node made: (address, jail) -> time of the unban; published to the others."""
        for key, at in lifted.items():
            self._put(_Change(key=key, at=at))

    def _put(self, change: _Change) -> None:
        if not self._accepting:
            self.stats.deferred += 1
            return
        if self._queue.qsize() >= _MAX_QUEUE:
            # Redis is far behind: stop queueing; the next session merges the whole state instead.
            self._accepting = False
            self.stats.deferred += 1
            self._session_broken = True
            return
        self._queue.put_nowait(change)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="edgeward-share")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first.wait(), self.settings.timeout)
        if not self.connected:
            log.warning("guard.share: not connected to Redis at %s yet; bans are enforced locally, "
                        "and shared once it is reached", self.shown_url)

    async def stop(self) -> None:
        self._accepting = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.connected = False

    # -- sessions ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.settings.retry_min
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, BadRecord, _SessionEnded) as exc:
                self._failed(exc)
            except Exception as exc:  # a bug must not end sharing for the life of the process
                if not self._down_logged:  # with its traceback once, not at every retry
                    log.exception("guard.share: unexpected error; reconnecting")
                self._failed(exc)
            if self.connected:  # this session had merged: start the back-off again
                delay = self.settings.retry_min
            self._accepting = False
            self.connected = False
            self.connected_since = None
            self._first.set()
            wait = delay * random.uniform(0.8, 1.0)  # jitter: nodes cut off together do not return in step
            self.retry_at = self._clock() + wait
            await asyncio.sleep(wait)
            self.retry_at = None
            delay = min(self.settings.retry_max, delay * 2)

    def _failed(self, exc: BaseException) -> None:
        self.stats.failures += 1
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, AuthenticationError | NoPermissionError) or "NOAUTH" in str(exc):
            text += " (check the password, in the URL or password_file, and the ACL user)"
        self.last_error = text
        level = logging.DEBUG if self._down_logged else logging.ERROR
        self._down_logged = True
        log.log(level, "guard.share: Redis at %s: %s; bans are kept and enforced locally, retrying "
                       "(failures are counted in status)", self.shown_url, text)

    def _client(self) -> aioredis.Redis:
        s = self.settings
        kwargs: dict[str, Any] = {
            "socket_timeout": s.timeout,
            "socket_connect_timeout": s.timeout,
            "retry": Retry(NoBackoff(), 0),  # our loop retries, with back-off and a merge
            "client_name": f"edgeward-{self.node}"[:100],
            # RESP2: what every Redis speaks (redis-py's default RESP3 needs HELLO, Redis >= 6), and
            # all this module needs (hashes, scripts, pub/sub).
            "protocol": 2,
        }
        if s.password_file is not None:
            kwargs["password"] = Path(s.password_file).read_text().rstrip("\r\n")
        if self.url.startswith("rediss:"):
            kwargs.update(ssl_ca_certs=s.ca_file, ssl_certfile=s.cert_file, ssl_keyfile=s.key_file)
        return aioredis.Redis.from_url(self.url, **kwargs)

    async def _session(self) -> None:
        """Connect, subscribe, merge, then send and receive until Redis is lost (always raises)."""
        self._session_broken = False
        client = self._client()
        pubsub = client.pubsub()
        try:
            await asyncio.wait_for(pubsub.subscribe(self.channel), self.settings.timeout)
            # From here every change published by others reaches us, and ours are queued: the
            # merge below can then take a snapshot without a gap.
            self._queue = asyncio.Queue()
            self._accepting = True
            scripts = (client.register_script(_PUT), client.register_script(_LIFT),
                       client.register_script(_PRUNE))
            await self._merge(client, scripts)
            self.connected = True
            self.connected_since = self._clock()
            self.stats.connects += 1
            if self._down_logged:
                log.warning("guard.share: Redis at %s reached again; merged (%s)", self.shown_url,
                            ", ".join(f"{k} {v}" for k, v in self.last_merge.items()))
            else:
                log.info("guard.share: node %s sharing bans through Redis at %s (%s)", self.node,
                         self.shown_url, ", ".join(f"{k} {v}" for k, v in self.last_merge.items()))
            self._down_logged = False
            self._first.set()
            tasks = [asyncio.create_task(self._receive(pubsub)),
                     asyncio.create_task(self._send(client, scripts)),
                     asyncio.create_task(self._prune(scripts[2]))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for t in done:
                t.result()  # raises what ended the session
            raise _SessionEnded("the session ended")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), 1.0)  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 1.0)

    async def _merge(self, client: aioredis.Redis, scripts: tuple[Any, Any, Any]) -> None:
        put, lift, prune = scripts
        now = self._clock()
        async with self._lock:
            while await prune(keys=self.keys, args=[now, now - self.settings.unban_retention]) >= 1000:
                pass
            pipe = client.pipeline(transaction=True)  # one snapshot of both hashes
            pipe.hgetall(self.keys[0])
            pipe.hgetall(self.keys[2])
            raw_bans, raw_unbans = await pipe.execute()
            remote: list[BanRecord] = []
            for fld, raw in raw_bans.items():
                try:
                    remote.append(decode_ban(raw, self.node))
                except BadRecord as exc:
                    self._bad(f"ban {_text_of(fld)[:80]!r} in {self.keys[0]}", exc)
            remote_unbans: dict[Key, float] = {}
            for fld, raw in raw_unbans.items():
                try:
                    remote_unbans[key_of(_text_of(fld))] = _number(float(raw), "unban time")
                except (BadRecord, ValueError) as exc:
                    self._bad(f"unban {_text_of(fld)[:80]!r} in {self.keys[2]}", exc)
            local_unbans = await self.guard.lifted_since(now - self.settings.unban_retention)
            plan = plan_merge(self.guard.held(), local_unbans, remote, remote_unbans, now)
            for i in range(0, len(plan.push_unbans), _BATCH):
                pipe = client.pipeline(transaction=False)
                for key, at in list(plan.push_unbans.items())[i:i + _BATCH]:
                    await lift(keys=self.keys, args=self._lift_args(key, at), client=pipe)
                await pipe.execute()
            for key, at in plan.drop.items():
                await self.guard.apply_remote_unban(key[0], key[1], at)
            for i in range(0, len(plan.push), _BATCH):
                pipe = client.pipeline(transaction=False)
                for rec in plan.push[i:i + _BATCH]:
                    await put(keys=self.keys, args=self._put_args(rec), client=pipe)
                await pipe.execute()
            for rec in plan.adopt:
                await self.guard.apply_remote_ban(rec)
        self.stats.merges += 1
        self.last_merge = {"pushed": len(plan.push), "received": len(plan.adopt),
                           "lifted": len(plan.drop), "unbans pushed": len(plan.push_unbans)}

    def _put_args(self, rec: BanRecord) -> list[Any]:
        doc = encode_ban(rec, self.node)
        msg = f'{{"op":"ban","by":{json.dumps(self.instance)},"ban":{doc}}}'
        return [field_of(rec.address, rec.jail), doc, repr(rec.start),
                "" if rec.end is None else repr(rec.end), self.channel, msg]

    def _lift_args(self, key: Key, at: float) -> list[Any]:
        msg = json.dumps({"op": "unban", "by": self.instance, "address": key[0], "jail": key[1], "at": at},
                         separators=(",", ":"))
        return [field_of(*key), repr(at), self.channel, msg]

    async def _send(self, client: aioredis.Redis, scripts: tuple[Any, Any, Any]) -> None:
        put, lift, _prune = scripts
        while True:
            if self._session_broken:
                raise _SessionEnded("too many changes waiting for Redis; merging instead")
            change = await self._queue.get()
            async with self._lock:
                if change.rec is not None:
                    done = await put(keys=self.keys, args=self._put_args(change.rec))
                    if done == 0:
                        self.stats.refused_bans += 1
                    else:
                        self.stats.sent_bans += 1
                elif change.key is not None:
                    await lift(keys=self.keys, args=self._lift_args(change.key, change.at))
                    self.stats.sent_unbans += 1

    async def _prune(self, prune: Any) -> None:
        """Drop ended bans and old unbans from Redis now and then (any node may: the script is
        idempotent), so the hash stays the size of the bans in force."""
        while True:
            await asyncio.sleep(_PRUNE_EVERY * random.uniform(0.5, 1.0))
            now = self._clock()
            async with self._lock:
                while await prune(keys=self.keys, args=[now, now - self.settings.unban_retention]) >= 1000:
                    pass

    async def _receive(self, pubsub: Any) -> None:
        keepalive = max(1.0, min(5.0, self.settings.timeout))
        last_heard = time.monotonic()
        ping_sent: float | None = None
        while True:
            if self._session_broken:
                raise _SessionEnded("too many changes waiting for Redis; merging instead")
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            now = time.monotonic()
            if msg is None:
                if ping_sent is not None and now - ping_sent > self.settings.timeout:
                    raise _SessionEnded(f"Redis did not answer a ping within {self.settings.timeout:g}s")
                if ping_sent is None and now - last_heard > keepalive:
                    await pubsub.ping()
                    ping_sent = now
                continue
            last_heard = now
            ping_sent = None
            if msg.get("type") == "message":
                await self._on_message(msg.get("data"))

    async def _on_message(self, data: object) -> None:
        try:
            if not isinstance(data, bytes | str):
                raise BadRecord("not text")
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise BadRecord("not a JSON object")
            if doc.get("by") == self.instance:
                return  # our own change, back from Redis
            op = doc.get("op")
            if op == "ban":
                ban = doc.get("ban")
                rec = decode_ban(ban if isinstance(ban, dict) else {}, self.node)
                if await self.guard.apply_remote_ban(rec):
                    self.stats.received_bans += 1
                else:
                    self.stats.stale += 1
            elif op == "unban":
                address = normalize_addr(_text(doc.get("address"), "address", 64))
                if address is None:
                    raise BadRecord("address is not an IP address")
                jail = _text(doc.get("jail"), "jail")
                at = _number(doc.get("at"), "at")
                if await self.guard.apply_remote_unban(address, jail, at):
                    self.stats.received_unbans += 1
                else:
                    self.stats.stale += 1
            else:
                raise BadRecord(f"unknown op {str(op)[:40]!r}")
        except (BadRecord, ValueError, UnicodeDecodeError) as exc:
            self._bad(f"message on {self.channel}", exc)

    def _bad(self, what: str, exc: Exception) -> None:
        self.stats.bad += 1
        level = logging.DEBUG if self._bad_logged else logging.WARNING
        self._bad_logged = True
        log.log(level, "guard.share: skipped a %s: %s (further ones are only counted)", what, exc)

    # -- status -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        s = self.stats
        now = self._clock()
        return {
            "redis": self.shown_url,
            "node": self.node,
            "connected": self.connected,
            "connected_since": self.connected_since,
            "last_error": self.last_error,
            "retry_in": None if self.retry_at is None else max(0.0, round(self.retry_at - now, 3)),
            "connects": s.connects,
            "failures": s.failures,
            "sent": {"bans": s.sent_bans, "unbans": s.sent_unbans, "refused": s.refused_bans},
            "received": {"bans": s.received_bans, "unbans": s.received_unbans, "stale": s.stale},
            "deferred": s.deferred,
            "bad": s.bad,
            "merges": s.merges,
            "last_merge": dict(self.last_merge),
            "queued": self._queue.qsize(),
            "bans_by_origin": dict(sorted(Counter(r.origin or self.node for r in self.guard.held()).items())),
        }


class _SessionEnded(Exception):
    """The session stopped for a reason of ours (keep-alive lost, queue overflow)."""


def _text_of(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
