"""The embedded ban store: bans, ban history (for growing bans), log positions.

SQLite in WAL mode. Durability choice: ``synchronous=NORMAL`` by default. In
WAL mode a commit under NORMAL has written the transaction to the WAL file
(write() returned) before `commit()` returns, so ``kill -9`` of edgeward loses
nothing; only a power cut or kernel crash can lose the last commits, because
NORMAL syncs the WAL at checkpoints, not at every commit. Measured on this
machine a ban commit (ban row + history row) takes 0.07 ms under NORMAL and
0.28 ms under FULL (one fsync; far more on a spinning or network disk);
``synchronous="FULL"`` is one setting away for hosts that want bans to
survive power loss too.

Threading: the data plane must never block on disk, so the `Store` owns one
connection that is used only from its own writer thread (a one-worker
executor). Every method has a blocking form (for tests, the CLI and the
startup path) and the Guard calls them through `Store.call`, which returns an
awaitable. A ban is reported as enforced only after its commit returned.

Log positions are saved often (after every batch of lines); `save_position`
only records the newest position in memory and schedules one flush, so a burst
of batches costs one small transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 2  # 2: bans.origin, lifted (shared bans, guard/share.py)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bans (
    address   TEXT NOT NULL,
    jail      TEXT NOT NULL,
    reason    TEXT NOT NULL,
    lines     TEXT NOT NULL,          -- JSON list of the matched entries
    start     REAL NOT NULL,
    end       REAL,                   -- NULL: forever
    count     INTEGER NOT NULL,       -- 1 for the first ban of the address
    listeners TEXT,                   -- JSON list; NULL: every listener
    origin    TEXT,                   -- the node whose ban it is ([guard.share]); NULL: this node
    PRIMARY KEY (address, jail)
);
CREATE TABLE IF NOT EXISTS lifted (   -- recent unbans, kept only with [guard.share]: a node that
    address TEXT NOT NULL,            -- reconnects must not bring back a ban lifted meanwhile
    jail    TEXT NOT NULL,
    at      REAL NOT NULL,
    PRIMARY KEY (address, jail)
);
CREATE TABLE IF NOT EXISTS ban_history (
    address TEXT NOT NULL,
    jail    TEXT NOT NULL,
    start   REAL NOT NULL,
    bantime REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ban_history_address ON ban_history (address);
CREATE INDEX IF NOT EXISTS ban_history_start ON ban_history (start);
CREATE TABLE IF NOT EXISTS positions (
    key     TEXT PRIMARY KEY,         -- the followed path (or a journal's name)
    dev     INTEGER NOT NULL,
    ino     INTEGER NOT NULL,
    offset  INTEGER NOT NULL,
    head    TEXT,                     -- hash of the file's first line
    cursor  TEXT,                     -- journal cursor
    updated REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a follower stopped: the file's identity and the consumed offset.

    `head` is a hash of the file's first line, so that a file that was
    replaced by one reusing the inode number, or truncated and refilled past
    the old offset, is recognised as new. `cursor` is used by the journal.
    """

    dev: int = 0
    ino: int = 0
    offset: int = 0
    head: str | None = None
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class BanRecord:
    """One stored ban."""

    address: str
    jail: str
    reason: str
    lines: tuple[str, ...]
    start: float
    end: float | None  # None: forever
    count: int = 1
    listeners: tuple[str, ...] | None = None  # None: every listener
    origin: str | None = None  # the node whose ban this is ([guard.share]); None: this node

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "jail": self.jail,
            "reason": self.reason,
            "lines": list(self.lines),
            "start": self.start,
            "end": self.end,
            "forever": self.end is None,
            "count": self.count,
            "listeners": None if self.listeners is None else list(self.listeners),
            "origin": self.origin,
        }


class Store:
    """SQLite ban store. `path=":memory:"` keeps everything in memory (tests, no persistence)."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError("synchronous must be NORMAL, FULL or EXTRA")
        self.path = str(path)
        self.synchronous = synchronous.upper()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeward-store")
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending_positions: dict[str, Position] = {}
        self._flush_scheduled = False
        self._closed = False
        # No file yet (an edge that never banned anything): SQLite, about 1.5 MB of a small edge's
        # memory, is loaded when the first ban or log position is written; until then every read
        # answers empty (_unwritten).
        self._deferred = self.path != ":memory:" and not Path(self.path).exists()
        if not self._deferred:
            self.run(self._open)

    # -- threading -----------------------------------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the writer thread."""
        return self._executor.submit(fn, *args)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread and wait (blocking)."""
        return self.submit(fn, *args).result()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread and await it (never blocks the loop)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def _db(self) -> sqlite3.Connection:
        if self._conn is None and self._deferred:
            self._deferred = False
            self._open()
        if self._conn is None:
            raise RuntimeError("store is closed")
        return self._conn

    def _unwritten(self) -> bool:
        """Nothing was ever written (no file, not opened): reads need not load SQLite."""
        return self._deferred and self._conn is None

    def _open(self) -> None:
        import sqlite3
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a commit
        # happens exactly where the code says.
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(bans)")}
        if "origin" not in columns:  # a store of schema 1: bans were all this node's own
            conn.execute("ALTER TABLE bans ADD COLUMN origin TEXT")
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        self._conn = conn

    def close(self) -> None:
        """Flush pending positions and close (blocking; idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.run(self._flush_positions)
            self.run(self._close)
        finally:
            self._executor.shutdown(wait=True)

    def _close(self) -> None:
        self._deferred = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- bans (run these on the writer thread: via run/call/submit) --------------------

    def add_ban(
        self, rec: BanRecord, bantime: float, position: tuple[str, Position] | None = None,
        *, history: bool = True,
    ) -> None:
        """Store a ban and its history entry (and optionally a log position) in one commit.

        history=False stores the ban only (a ban received from another node: it does not
        grow this node's bans)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT OR REPLACE INTO bans (address, jail, reason, lines, start, end, count, listeners, origin)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.address,
                    rec.jail,
                    rec.reason,
                    json.dumps(list(rec.lines)),
                    rec.start,
                    rec.end,
                    rec.count,
                    None if rec.listeners is None else json.dumps(list(rec.listeners)),
                    rec.origin,
                ),
            )
            if history:
                db.execute(
                    "INSERT INTO ban_history (address, jail, start, bantime) VALUES (?, ?, ?, ?)",
                    (rec.address, rec.jail, rec.start, bantime),
                )
            if position is not None:
                self._write_position(db, *position)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls back by itself on some errors (disk full): keep the first error
                db.execute("ROLLBACK")
            raise

    def remove_ban(
        self, address: str | None = None, jail: str | None = None, *, lifted_at: float | None = None,
        started_by: float | None = None,
    ) -> int:
        """Delete bans of `address` (None: all) in `jail` (None: every jail); returns how many.

        With `lifted_at` (shared bans) the unban is remembered in the same commit (`lifted`), for
        every ban deleted and for the (address, jail) asked even if none was stored here. With
        `started_by` only bans that started at or before it are deleted (a newer ban stays)."""
        db = self._db()
        clauses: list[str] = []
        args: list[Any] = []
        if address is not None:
            clauses.append("address = ?")
            args.append(address)
        if jail is not None:
            clauses.append("jail = ?")
            args.append(jail)
        if started_by is not None:
            clauses.append("start <= ?")
            args.append(started_by)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        db.execute("BEGIN IMMEDIATE")
        try:
            if lifted_at is not None:
                # max(): a ban that started after `lifted_at` by its node's clock is still lifted
                db.execute("INSERT OR REPLACE INTO lifted (address, jail, at) SELECT address, jail, max(?, start)"
                           " FROM bans" + where, [lifted_at, *args])
                if address is not None and jail is not None:
                    db.execute("INSERT INTO lifted (address, jail, at) VALUES (?, ?, ?) ON CONFLICT"
                               " (address, jail) DO UPDATE SET at = max(at, excluded.at)",
                               (address, jail, lifted_at))
            cur = db.execute("DELETE FROM bans" + where, args)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return cur.rowcount

    def lifted(self, since: float) -> dict[tuple[str, str], float]:
        """(address, jail) -> time of the unban, for the unbans since `since` (shared bans)."""
        if self._unwritten():
            return {}
        rows = self._db().execute("SELECT address, jail, at FROM lifted WHERE at >= ?", (since,))
        return {(a, j): at for a, j, at in rows}

    def purge_lifted(self, before: float) -> int:
        """Forget unbans older than `before`."""
        if self._unwritten():
            return 0
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        cur = db.execute("DELETE FROM lifted WHERE at < ?", (before,))
        db.execute("COMMIT")
        return cur.rowcount

    def remove_expired(self, now: float) -> int:
        """Delete bans whose end has passed; returns how many."""
        if self._unwritten():
            return 0
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        cur = db.execute("DELETE FROM bans WHERE end IS NOT NULL AND end <= ?", (now,))
        db.execute("COMMIT")
        return cur.rowcount

    def active_bans(self, now: float | None = None) -> list[BanRecord]:
        """Bans in force at `now` (None: all stored), oldest first."""
        if self._unwritten():
            return []
        db = self._db()
        sql = "SELECT address, jail, reason, lines, start, end, count, listeners, origin FROM bans"
        args: tuple[Any, ...] = ()
        if now is not None:
            sql += " WHERE end IS NULL OR end > ?"
            args = (now,)
        out = []
        for address, jail, reason, lines, start, end, count, listeners, origin in db.execute(
            sql + " ORDER BY start", args
        ):
            out.append(
                BanRecord(
                    address=address,
                    jail=jail,
                    reason=reason,
                    lines=tuple(_json_list(lines)),
                    start=start,
                    end=end,
                    count=count,
                    listeners=None if listeners is None else tuple(_json_list(listeners)),
                    origin=origin,
                )
            )
        return out

    def history(self, since: float | None = None) -> list[tuple[str, str, float, float]]:
        """(address, jail, start, bantime) of earlier bans, oldest first."""
        if self._unwritten():
            return []
        db = self._db()
        if since is None:
            rows = db.execute(
                "SELECT address, jail, start, bantime FROM ban_history ORDER BY start"
            )
        else:
            rows = db.execute(
                "SELECT address, jail, start, bantime FROM ban_history WHERE start >= ? ORDER BY start",
                (since,),
            )
        return [(a, j, s, b) for a, j, s, b in rows]

    def purge_history(self, before: float) -> int:
        """Forget history entries that started before `before`."""
        if self._unwritten():
            return 0
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        cur = db.execute("DELETE FROM ban_history WHERE start < ?", (before,))
        db.execute("COMMIT")
        return cur.rowcount

    def forget_history(self, address: str | None = None) -> int:
        """Forget the history of one address (or all), e.g. after a manual unban."""
        if self._unwritten():
            return 0
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        if address is None:
            cur = db.execute("DELETE FROM ban_history")
        else:
            cur = db.execute("DELETE FROM ban_history WHERE address = ?", (address,))
        db.execute("COMMIT")
        return cur.rowcount

    # -- positions ---------------------------------------------------------------------

    def load(self, key: str) -> Position | None:
        """Saved position of `key` (the `PositionStore` protocol; blocking, quick)."""
        with self._lock:
            pending = self._pending_positions.get(key)
        if pending is not None:
            return pending
        return self.run(self._load_position, key)

    def save(self, key: str, pos: Position) -> None:
        """Remember `pos` for `key`; written by the writer thread soon (the `PositionStore` protocol).

        Never blocks: consecutive saves of one key coalesce into one row write.
        """
        with self._lock:
            self._pending_positions[key] = pos
            if self._flush_scheduled or self._closed:
                return
            self._flush_scheduled = True
        self.submit(self._flush_positions)

    def flush(self) -> None:
        """Write pending positions now (blocking)."""
        self.run(self._flush_positions)

    def _load_position(self, key: str) -> Position | None:
        if self._unwritten():
            return None
        row = (
            self._db()
            .execute("SELECT dev, ino, offset, head, cursor FROM positions WHERE key = ?", (key,))
            .fetchone()
        )
        if row is None:
            return None
        return Position(dev=row[0], ino=row[1], offset=row[2], head=row[3], cursor=row[4])

    def _flush_positions(self) -> None:
        with self._lock:
            pending, self._pending_positions = self._pending_positions, {}
            self._flush_scheduled = False
        if not pending or (self._conn is None and not self._deferred):
            return
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, pos in pending.items():
                self._write_position(db, key, pos)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls back by itself on some errors (disk full): keep the first error
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _write_position(db: sqlite3.Connection, key: str, pos: Position) -> None:
        db.execute(
            "INSERT OR REPLACE INTO positions (key, dev, ino, offset, head, cursor, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, pos.dev, pos.ino, pos.offset, pos.head, pos.cursor, time.time()),
        )


class MemoryPositions:
    """A `PositionStore` in a dict: for tests and for running without a database."""

    def __init__(self) -> None:
        self.positions: dict[str, Position] = {}

    def load(self, key: str) -> Position | None:
        return self.positions.get(key)

    def save(self, key: str, pos: Position) -> None:
        self.positions[key] = pos


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return []
    return [str(v) for v in value] if isinstance(value, list) else []
