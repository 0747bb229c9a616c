"""Log sources for jails: followed files, the systemd journal, edge events.

`FileFollower` follows a file like ``tail -F``:

- inotify on the file's *directory* (via ctypes on libc, read through the
  event loop's `add_reader`), so a matched line reaches the jail within
  milliseconds; polling every `poll_interval` where inotify is missing;
- a file that does not exist yet (or whose directory does not) is waited for;
- rotation by rename: the old file is read to its end (and for `rotate_grace`
  seconds more, for writers that reopen late), then the new file from 0;
- rotation by copytruncate: the file shrinking (or its first line changing)
  means it was truncated; the lines written before the truncation that were
  not read yet are taken from the copy (a sibling whose first line hashes the
  same), then the file is read again from 0. Lines written between the copy
  and the truncation are lost to every reader - that is copytruncate's race;
- positions (device, inode, consumed offset, hash of the first line) are
  saved after each batch was handled, so a restart neither re-counts old lines
  nor misses lines written while edgeward was down, even across a rotation;
- only complete lines are delivered; a partial last line waits for its
  newline. Lines longer than `max_line` bytes are cut there (counted); invalid
  UTF-8 is decoded with U+FFFD (counted);
- a vanished directory is logged once and waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from edgeward.guard.banset import normalize_addr
from edgeward.guard.store import Position
from edgeward.guard.types import FailMatch

log = logging.getLogger(__name__)

LineCallback = Callable[[list[str]], Awaitable[None]]

MAX_LINE = 1 << 20  # bytes; longer lines are cut
HEAD_BYTES = 4096  # the "first line" hashed for identity is capped here
_READ_CHUNK = 1 << 16
_MAX_READ_PER_TURN = 1 << 20  # then give the loop a turn, so a backlog cannot starve it
_BATCH_LINES = 1000


class PositionStore(Protocol):
    """Where followers keep their positions (`Store` and `MemoryPositions` implement it)."""

    def load(self, key: str) -> Position | None: ...

    def save(self, key: str, pos: Position) -> None: ...


# -- inotify via ctypes ----------------------------------------------------------------

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_DIR_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_EVENT = struct.Struct("iIII")


class _Libc:
    """libc's inotify functions, or None where there are none (not Linux)."""

    _instance: _Libc | None = None
    _tried = False

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.init1 = lib.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch = lib.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = lib.inotify_rm_watch
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.rm_watch.restype = ctypes.c_int

    @classmethod
    def get(cls) -> _Libc | None:
        if not cls._tried:
            cls._tried = True
            # ctypes.util (with shutil and tempfile, ~0.9 MB of RSS) only once a jail follows a log.
            import ctypes.util
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                cls._instance = cls(lib)
            except (OSError, AttributeError):
                cls._instance = None
        return cls._instance


class DirWatch:
    """One inotify instance watching one directory; calls `on_event(name, mask)` from the loop."""

    def __init__(self, directory: str, on_event: Callable[[str, int], None]) -> None:
        libc = _Libc.get()
        if libc is None:
            raise OSError(errno.ENOSYS, "inotify is not available")
        self._libc = libc
        self.directory = directory
        self._on_event = on_event
        fd = libc.init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.fd = fd
        self.wd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.fd, self._readable)

    def add(self) -> bool:
        """Watch the directory; False if it does not exist (yet)."""
        wd = self._libc.add_watch(self.fd, os.fsencode(self.directory), _DIR_MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if e in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise OSError(e, os.strerror(e), self.directory)
        self.wd = wd
        return True

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            log.exception("inotify read failed for %s", self.directory)
            return
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            raw = data[pos + _EVENT.size : pos + _EVENT.size + length]
            pos += _EVENT.size + length
            name = os.fsdecode(raw.split(b"\0", 1)[0])
            if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF) and wd == self.wd:
                self.wd = -1
            self._on_event(name, mask)

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.fd)
            self._loop = None
        with contextlib.suppress(OSError):
            os.close(self.fd)


# -- file following ---------------------------------------------------------------------


def _head_hash(fd: int) -> str | None:
    """Hash of the file's first line (capped), None while it has no complete first line."""
    try:
        data = os.pread(fd, HEAD_BYTES, 0)
    except OSError:
        return None
    nl = data.find(b"\n")
    if nl >= 0:
        data = data[: nl + 1]
    elif len(data) < HEAD_BYTES:
        return None
    return hashlib.blake2b(data, digest_size=12).hexdigest()


@dataclass(slots=True)
class _Tail:
    """One open file being read."""

    fd: int
    dev: int
    ino: int
    offset: int  # bytes read from the file
    head: str | None
    buf: bytearray = field(default_factory=bytearray)
    discarding: bool = False  # inside an overlong line, skipping to its newline
    closes_at: float | None = None  # for rotated files: stop reading then

    @property
    def consumed(self) -> int:
        return self.offset - len(self.buf)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(slots=True)
class FollowerStats:
    """Counters of one follower, for status and metrics."""

    lines: int = 0
    bytes: int = 0
    cut_lines: int = 0  # longer than max_line
    decode_errors: int = 0  # lines with invalid UTF-8
    rotations: int = 0  # by rename
    truncations: int = 0  # copytruncate or rewrite
    recovered_from_copy: int = 0  # bytes read from a rotated copy after a truncation
    errors: int = 0  # I/O errors (logged)


class FileFollower:
    """Follow `path` like ``tail -F`` and hand batches of lines to a callback.

    - `state`: where positions are kept across restarts (None: not kept).
    - `poll_interval` (0.25 s): polling period without inotify, and while the
      directory is missing.
    - `start` ("head"): where to begin a file seen for the first time with no
      saved position: "head" reads it all (the jail ignores entries older
      than findtime, like fail2ban), "tail" starts at its end.
    - `max_line` (1 MiB): longer lines are cut at this many bytes.
    - `rotate_grace` (2 s): how long a rotated-away file is still read.
    - `use_inotify` (True): False forces polling.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        state: PositionStore | None = None,
        poll_interval: float = 0.25,
        start: str = "head",
        max_line: int = MAX_LINE,
        rotate_grace: float = 2.0,
        use_inotify: bool = True,
        safety_poll: float = 2.0,
    ) -> None:
        if start not in ("head", "tail"):
            raise ValueError("start must be 'head' or 'tail'")
        self.path = os.path.abspath(os.fspath(path))
        self.directory, self.name = os.path.split(self.path)
        self.state = state
        self.poll_interval = poll_interval
        self.start = start
        self.max_line = max(1, max_line)
        self.rotate_grace = rotate_grace
        self.use_inotify = use_inotify
        # With inotify a periodic look still catches what events cannot show
        # (e.g. a file on NFS written by another host).
        self.safety_poll = safety_poll
        self.stats = FollowerStats()
        self.using_inotify = False
        self._cur: _Tail | None = None
        self._old: list[_Tail] = []
        self._watch: DirWatch | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._restored = False
        self._dir_missing_logged = False
        self._file_missing_logged = False
        self._appeared_later = False
        self._task: asyncio.Task[None] | None = None
        self._pending: list[str] = []
        self.caught_up = asyncio.Event()  # set after each check that reached EOF

    # -- lifecycle -------------------------------------------------------------------

    def start_task(self, callback: LineCallback) -> asyncio.Task[None]:
        """Run `run(callback)` as a task (kept here so `stop` can end it)."""
        self._task = asyncio.get_running_loop().create_task(
            self.run(callback), name=f"follow {self.path}"
        )
        return self._task

    async def stop(self) -> None:
        """Stop following and close the files (the saved position stays)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._close_all()

    async def run(self, callback: LineCallback) -> None:
        """Follow until cancelled or stopped."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                if self.use_inotify and self._watch is None:
                    self._setup_watch(loop)
                if self._watch is not None and self._watch.wd < 0 and not self._watch.add():
                    self._note_dir_missing()
                try:
                    await self._check(callback)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.stats.errors += 1
                    log.exception("following %s failed; retrying", self.path)
                self.caught_up.set()
                if self._watch is not None and self._watch.wd >= 0:
                    timeout = self.safety_poll
                    if self._old:
                        timeout = min(timeout, self.poll_interval)
                else:
                    timeout = self.poll_interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                self._wake.clear()
        finally:
            self._close_all()

    def _setup_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            watch = DirWatch(self.directory, self._on_event)
        except OSError as exc:
            log.info(
                "inotify unavailable for %s (%s); polling every %gs",
                self.path,
                exc,
                self.poll_interval,
            )
            self.use_inotify = False
            return
        watch.attach(loop)
        self._watch = watch
        self.using_inotify = True

    def _on_event(self, name: str, mask: int) -> None:
        if (
            name == self.name
            or not name
            or self._old
            or mask & (IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_Q_OVERFLOW)
        ):
            self.caught_up.clear()
            self._wake.set()

    def _close_all(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._cur is not None:
            self._cur.close()
            self._cur = None
        for t in self._old:
            t.close()
        self._old.clear()

    def _note_dir_missing(self) -> None:
        if not self._dir_missing_logged:
            self._dir_missing_logged = True
            log.warning("log directory %s does not exist; waiting for it", self.directory)

    # -- the work --------------------------------------------------------------------

    async def _check(self, callback: LineCallback) -> None:
        now = time.monotonic()
        # Rotated-away files first: their lines are older than the current file's.
        for old in list(self._old):
            await self._drain(old, callback)
            if old.closes_at is not None and now >= old.closes_at:
                await self._finish(old, callback)
                self._old.remove(old)
        cur = self._cur
        if cur is not None:
            # Truncation must be noticed before reading on: after a
            # copytruncate the bytes at our offset belong to new lines.
            size = os.fstat(cur.fd).st_size
            head = _head_hash(cur.fd) if size else None
            if size < cur.offset or (
                cur.head is not None and head is not None and head != cur.head
            ):
                await self._truncated(cur, callback)
            elif cur.head is None:
                cur.head = head
            await self._drain(cur, callback)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not os.path.isdir(self.directory):
                self._note_dir_missing()
            elif cur is None and not self._file_missing_logged:
                self._file_missing_logged = True
                log.info("log file %s does not exist yet; waiting for it", self.path)
            if cur is None:
                self._appeared_later = True
            return
        except OSError as exc:
            self.stats.errors += 1
            log.warning("cannot stat %s: %s", self.path, exc)
            return
        if self._dir_missing_logged:
            self._dir_missing_logged = False
            log.info("log directory %s is back", self.directory)
        self._file_missing_logged = False
        if cur is not None and (st.st_dev, st.st_ino) != (cur.dev, cur.ino):
            # Renamed away and replaced: finish the old one, keep it open a little
            # for writers that have not reopened yet.
            self.stats.rotations += 1
            await self._drain(cur, callback)
            cur.closes_at = now + self.rotate_grace
            self._old.append(cur)
            self._cur = cur = None
            cur = await self._open(callback, from_start=True)
        elif cur is None:
            cur = await self._open(callback, from_start=False)
        if cur is not None:
            await self._drain(cur, callback)

    async def _open(self, callback: LineCallback, *, from_start: bool) -> _Tail | None:
        """Open the file at `path`; position it from the saved state."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.stats.errors += 1
            log.warning("cannot open %s: %s", self.path, exc)
            return None
        st = os.fstat(fd)
        tail = _Tail(fd=fd, dev=st.st_dev, ino=st.st_ino, offset=0, head=_head_hash(fd))
        saved = None
        if not self._restored:
            self._restored = True
            saved = self.state.load(self.path) if self.state is not None else None
        if from_start:
            pass
        elif saved is not None:
            same_inode = (saved.dev, saved.ino) == (st.st_dev, st.st_ino)
            same_head = saved.head is None or saved.head == tail.head
            if same_inode and same_head and st.st_size >= saved.offset:
                tail.offset = saved.offset
            elif (
                not same_inode
                and saved.head is not None
                and saved.head == tail.head
                and st.st_size >= saved.offset
                and self._find_by_inode(saved) is None
            ):
                # Same content, new inode (copied or restored): carry on.
                tail.offset = saved.offset
            else:
                # Rotated (or truncated) while we were away: first the rest of
                # the file we were reading, wherever it went.
                await self._read_rest_of(
                    saved, callback, exclude_ino=st.st_ino if same_inode else None
                )
                if same_inode:
                    self.stats.truncations += 1
                else:
                    self.stats.rotations += 1
        elif self.start == "tail" and not self._appeared_later:
            # A file that appeared while we watched is new: all of it counts.
            tail.offset = st.st_size
        self._cur = tail
        if from_start:
            self._save(tail)  # the rotated file's position is obsolete now
        return tail

    def _find_by_inode(self, saved: Position) -> str | None:
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return None
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (saved.dev, saved.ino) and e.path != self.path:
                return e.path
        return None

    def _find_copy(
        self, head: str | None, min_size: int, exclude: tuple[int, int] | None
    ) -> str | None:
        """A sibling (name starting with ours) with the same first line and at least min_size bytes."""
        if head is None:
            return None
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError:
            return None
        for e in entries:
            if e.path == self.path or not e.name.startswith(self.name):
                continue
            try:
                st = e.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) == exclude or st.st_size < min_size:
                    continue
                fd = os.open(e.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if _head_hash(fd) == head:
                    return e.path
            finally:
                os.close(fd)
        return None

    async def _read_rest_of(
        self, saved: Position, callback: LineCallback, *, exclude_ino: int | None
    ) -> None:
        """After a restart: read what was written after `saved` in the file we were following."""
        path = None if exclude_ino is not None else self._find_by_inode(saved)
        if path is not None and saved.head is not None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _head_hash(fd) != saved.head:
                    path = None  # the inode number was reused by another file
            finally:
                os.close(fd)
        if path is None:
            exclude = (saved.dev, exclude_ino) if exclude_ino is not None else None
            path = self._find_copy(saved.head, saved.offset, exclude)
        if path is None:
            log.info(
                "%s was rotated while edgeward was down; the rotated file was not found", self.path
            )
            return
        await self._read_from_copy(path, saved.offset, callback)

    async def _read_from_copy(
        self, path: str, offset: int, callback: LineCallback, buf: bytes = b""
    ) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        st = os.fstat(fd)
        tail = _Tail(
            fd=fd, dev=st.st_dev, ino=st.st_ino, offset=offset, head=None, buf=bytearray(buf)
        )
        try:
            before = tail.offset
            await self._drain(tail, callback, save=False)
            self.stats.recovered_from_copy += tail.offset - before
            await self._finish(tail, callback)
        finally:
            tail.close()

    async def _truncated(self, cur: _Tail, callback: LineCallback) -> None:
        """copytruncate (or a rewrite): take the unread rest from the copy, then restart at 0."""
        self.stats.truncations += 1
        copy = self._find_copy(cur.head, cur.offset, (cur.dev, cur.ino))
        if copy is not None:
            await self._read_from_copy(copy, cur.offset, callback, bytes(cur.buf))
        elif cur.buf:
            await self._emit([self._decode(bytes(cur.buf))], callback, None)
        cur.buf.clear()
        cur.discarding = False
        cur.offset = 0
        cur.head = _head_hash(cur.fd)

    async def _finish(self, tail: _Tail, callback: LineCallback) -> None:
        """A file that will never grow again: its unterminated last line is a line."""
        await self._drain(tail, callback, save=False)
        if tail.buf and not tail.discarding:
            await self._emit([self._decode(bytes(tail.buf))], callback, None)
        tail.buf.clear()
        tail.close()

    async def _drain(self, tail: _Tail, callback: LineCallback, *, save: bool = True) -> None:
        """Read `tail` to its current end, delivering complete lines in batches."""
        save_tail = tail if save and tail is self._cur else None
        while True:
            lines: list[str] = []
            read = 0
            while read < _MAX_READ_PER_TURN:
                try:
                    chunk = os.pread(tail.fd, _READ_CHUNK, tail.offset)
                except OSError as exc:
                    self.stats.errors += 1
                    log.warning("reading %s failed: %s", self.path, exc)
                    break
                if not chunk:
                    break
                tail.offset += len(chunk)
                read += len(chunk)
                self.stats.bytes += len(chunk)
                self._split(tail, chunk, lines)
                if len(lines) >= _BATCH_LINES:
                    break
            if lines:
                await self._emit(lines, callback, save_tail)
            elif read and save_tail is not None:
                self._save(save_tail)  # e.g. skipped the middle of an overlong line
            if not read or (read < _MAX_READ_PER_TURN and len(lines) < _BATCH_LINES):
                return
            await asyncio.sleep(0)  # a large backlog must not hold the loop

    def _split(self, tail: _Tail, chunk: bytes, out: list[str]) -> None:
        buf = tail.buf
        buf += chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if tail.discarding:
                tail.discarding = False
            else:
                out.append(self._decode(bytes(buf[start:nl])))
            start = nl + 1
        del buf[:start]
        if len(buf) > self.max_line:
            if not tail.discarding:
                self.stats.cut_lines += 1
                out.append(self._decode(bytes(buf[: self.max_line])))
                tail.discarding = True
            buf.clear()

    def _decode(self, raw: bytes) -> str:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.stats.decode_errors += 1
            return raw.decode("utf-8", "replace")

    async def _emit(
        self, lines: list[str], callback: LineCallback, save_tail: _Tail | None
    ) -> None:
        self.stats.lines += len(lines)
        for i in range(0, len(lines), _BATCH_LINES):
            await callback(lines[i : i + _BATCH_LINES])
        if save_tail is not None:
            self._save(save_tail)

    def _save(self, tail: _Tail) -> None:
        if self.state is None:
            return
        if tail.head is None:
            tail.head = _head_hash(tail.fd)
        try:
            self.state.save(
                self.path,
                Position(dev=tail.dev, ino=tail.ino, offset=tail.consumed, head=tail.head),
            )
        except Exception:
            self.stats.errors += 1
            log.exception("saving the position of %s failed", self.path)


# -- the systemd journal ---------------------------------------------------------------


class JournalSource:
    """Follow the systemd journal through ``journalctl -f -o json``.

    Entries are turned into syslog-like lines
    (``2026-11-21T17:00:00.123456+00:00 host ident[pid]: message``) that
    fail2ban's filters (``%(__prefix_line)s``) and date detection understand.
    `matches` are journalctl match arguments (fail2ban's ``journalmatch``,
    e.g. ``_SYSTEMD_UNIT=sshd.service``). The cursor is saved like a file
    position under `key`, so a restart continues after the last entry seen.
    """

    def __init__(
        self,
        matches: tuple[str, ...] = (),
        *,
        state: PositionStore | None = None,
        key: str = "journal",
        journalctl: str = "journalctl",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.matches = matches
        self.state = state
        self.key = key
        self.journalctl = journalctl
        self.extra_args = extra_args
        self.stats = FollowerStats()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @staticmethod
    def available(journalctl: str = "journalctl") -> bool:
        import shutil
        return shutil.which(journalctl) is not None

    def start_task(self, callback: LineCallback) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(
            self.run(callback), name=f"journal {self.key}"
        )
        return self._task

    async def stop(self) -> None:
        self._stopping = True
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self, callback: LineCallback) -> None:
        while not self._stopping:
            saved = self.state.load(self.key) if self.state is not None else None
            args = [self.journalctl, "-f", "-o", "json", "--no-pager", *self.extra_args]
            if saved is not None and saved.cursor:
                args.append(f"--after-cursor={saved.cursor}")
            else:
                args += ["-n", "0"]
            args += list(self.matches)
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *args,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                    limit=MAX_LINE * 2,
                )
            except OSError as exc:
                log.warning("cannot run %s: %s; journal source stopped", self.journalctl, exc)
                return
            try:
                await self._read(self._proc, callback)
            finally:
                if self._proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()
                    await self._proc.wait()
            if not self._stopping:
                log.warning("journalctl exited (%s); restarting in 1s", self._proc.returncode)
                await asyncio.sleep(1.0)

    async def _read(self, proc: asyncio.subprocess.Process, callback: LineCallback) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # an entry longer than the stream limit
                self.stats.cut_lines += 1
                continue
            if not raw:
                return
            line, cursor = self.format_entry(raw)
            if line is None:
                self.stats.errors += 1
                continue
            self.stats.lines += 1
            await callback([line])
            if cursor and self.state is not None:
                self.state.save(self.key, Position(cursor=cursor))

    @staticmethod
    def format_entry(raw: bytes) -> tuple[str | None, str | None]:
        """(syslog-like line, cursor) of one ``journalctl -o json`` entry; (None, None) if unusable."""
        try:
            entry = json.loads(raw)
        except ValueError:
            return None, None
        if not isinstance(entry, dict):
            return None, None

        def text(name: str) -> str:
            v = entry.get(name)
            if isinstance(v, list):  # binary fields come as byte lists
                try:
                    return bytes(int(b) & 0xFF for b in v).decode("utf-8", "replace")
                except (TypeError, ValueError):
                    return ""
            return "" if v is None else str(v)

        try:
            ts = int(text("__REALTIME_TIMESTAMP")) / 1e6
        except ValueError:
            ts = time.time()
        stamp = datetime.fromtimestamp(ts, UTC).isoformat()
        ident = text("SYSLOG_IDENTIFIER") or text("_COMM")
        pid = text("SYSLOG_PID") or text("_PID")
        prefix = f"{ident}[{pid}]" if pid else ident
        line = f"{stamp} {text('_HOSTNAME')} {prefix}: {text('MESSAGE')}"
        return line[:MAX_LINE], text("__CURSOR") or None


# -- edge-observed events ----------------------------------------------------------------

EventHandler = Callable[[FailMatch], None]


@dataclass(slots=True)
class EventStats:
    reported: int = 0
    delivered: int = 0
    unsubscribed: int = 0  # kinds no jail listens to
    invalid: int = 0  # not an IP address
    by_kind: dict[str, int] = field(default_factory=dict)


class EventSource:
    """Failures the edge sees itself, with no log at all.

    The data plane calls `report(host, kind, detail)`: kinds used so far are
    ``sniff`` (garbage or unrecognised first bytes), ``proto`` (protocol
    errors), ``conn`` (every accepted connection - a jail with a high
    maxretry over a short findtime on ``edge:conn`` bans connection floods)
    and, with the HTTP layer, ``http401``/``http403``. Jails subscribe with
    ``source = "edge:<kind>"``. `report` is cheap and synchronous: a kind
    nobody subscribed to costs a dict lookup.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._subs: dict[str, list[EventHandler]] = {}
        self.stats = EventStats()

    def subscribe(self, kind: str, handler: EventHandler) -> Callable[[], None]:
        """Deliver reports of `kind` ("*" for every kind) to `handler`; returns an unsubscribe."""
        self._subs.setdefault(kind, []).append(handler)

        def unsubscribe() -> None:
            handlers = self._subs.get(kind, [])
            if handler in handlers:
                handlers.remove(handler)
            if not handlers:
                self._subs.pop(kind, None)

        return unsubscribe

    def report(self, host: str, kind: str, detail: str = "") -> None:
        """One failure of `host` of type `kind`; never raises."""
        self.stats.reported += 1
        handlers = self._subs.get(kind)
        wildcard = self._subs.get("*")
        if not handlers and not wildcard:
            self.stats.unsubscribed += 1
            return
        addr = normalize_addr(host)
        if addr is None:
            self.stats.invalid += 1
            return
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        detail = detail[:1000]
        match = FailMatch(
            host=addr,
            time=self._clock(),
            line=f"edge {kind} from {addr}: {detail}" if detail else f"edge {kind} from {addr}",
            tags={"kind": kind, "detail": detail},
        )
        for h in (*(handlers or ()), *(wildcard or ())):
            try:
                h(match)
                self.stats.delivered += 1
            except Exception:
                log.exception("edge event handler failed for %s %s", kind, addr)
