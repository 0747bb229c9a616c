"""Log sources: tail -F semantics on real files, positions across restarts, edge events."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from edgeward.guard.sources import EventSource, FileFollower, JournalSource
from edgeward.guard.store import MemoryPositions
from edgeward.guard.types import FailMatch

MODES = [pytest.param(True, id="inotify"), pytest.param(False, id="poll")]


class Collector:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.batches = 0
        self._changed = asyncio.Event()

    async def __call__(self, lines: list[str]) -> None:
        self.lines.extend(lines)
        self.batches += 1
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[str]:
        async def until() -> None:
            while len(self.lines) < n:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"expected {n} lines, got {len(self.lines)}: {self.lines[-5:]}"
            ) from None
        return self.lines

    async def settle(self, seconds: float = 0.6) -> list[str]:
        """Let the follower run a while more: catches lines delivered twice."""
        await asyncio.sleep(seconds)
        return self.lines


@asynccontextmanager
async def following(path: Path, **kw: object) -> AsyncIterator[tuple[FileFollower, Collector]]:
    kw.setdefault("poll_interval", 0.05)
    f = FileFollower(path, **kw)  # type: ignore[arg-type]
    c = Collector()
    f.start_task(c)
    try:
        yield f, c
    finally:
        await f.stop()


def append(path: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with open(path, "ab") as fh:
        fh.write(data)


def numbered(a: int, b: int) -> str:
    return "".join(f"line {i}\n" for i in range(a, b))


def expect(a: int, b: int) -> list[str]:
    return [f"line {i}" for i in range(a, b)]


@pytest.mark.parametrize("inotify", MODES)
async def test_appends_and_partial_lines(tmp_path: Path, inotify: bool) -> None:
    log = tmp_path / "app.log"
    append(log, "first\nsecond with")
    async with following(log, use_inotify=inotify) as (f, c):
        await c.wait_for(1)
        await c.settle(0.2)
        assert c.lines == ["first"]  # the partial line waits for its newline
        append(log, "out newline yet\r\nthird\n")
        await c.wait_for(3)
        assert c.lines == ["first", "second without newline yet", "third"]
        assert f.using_inotify is inotify
        append(log, numbered(0, 5000))
        await c.wait_for(5003)
        assert c.lines[3:] == expect(0, 5000)
        assert f.stats.lines == 5003


@pytest.mark.parametrize("inotify", MODES)
async def test_missing_file_and_directory_appear_later(tmp_path: Path, inotify: bool) -> None:
    log = tmp_path / "later" / "sub" / "app.log"
    async with following(log, use_inotify=inotify) as (_f, c):
        await asyncio.sleep(0.2)
        log.parent.mkdir(parents=True)
        await asyncio.sleep(0.2)
        append(log, numbered(0, 3))
        await c.wait_for(3)
        append(log, numbered(3, 5))
        assert await c.wait_for(5) == expect(0, 5)


@pytest.mark.parametrize("inotify", MODES)
async def test_rotation_by_rename_with_lines_between(tmp_path: Path, inotify: bool) -> None:
    log = tmp_path / "app.log"
    append(log, numbered(0, 5))
    async with following(log, use_inotify=inotify) as (f, c):
        await c.wait_for(5)
        with open(log, "ab") as writer:  # a writer that keeps its file open over the rotation
            writer.write(numbered(5, 8).encode())
            writer.flush()
            os.rename(log, tmp_path / "app.log.1")
            writer.write(numbered(8, 10).encode())  # written after the rename, before reopening
            writer.flush()
            append(log, numbered(10, 13))  # the new file
            writer.write(numbered(13, 14).encode())  # a late write to the old file
        await c.wait_for(14)
        lines = await c.settle()
        assert sorted(lines) == sorted(expect(0, 14))  # none lost, none twice
        assert lines[:10] == expect(0, 10)  # the old file is finished first
        assert f.stats.rotations == 1
        append(log, numbered(14, 16))
        await c.wait_for(16)
        assert c.lines[-2:] == expect(14, 16)


@pytest.mark.parametrize("inotify", MODES)
async def test_rotation_by_copytruncate_with_lines_between(tmp_path: Path, inotify: bool) -> None:
    log = tmp_path / "app.log"
    append(log, numbered(0, 5))
    async with following(log, use_inotify=inotify) as (f, c):
        await c.wait_for(5)
        # what logrotate's copytruncate does, with writes racing it
        append(log, numbered(5, 9))
        shutil.copyfile(log, tmp_path / "app.log.1")
        os.truncate(log, 0)
        append(log, numbered(9, 12))
        await c.wait_for(12)
        lines = await c.settle()
        assert lines == expect(0, 12)
        assert f.stats.truncations == 1


async def test_truncate_and_refill_past_offset_between_polls(tmp_path: Path) -> None:
    """The file is truncated and grows past our old offset before we look again."""
    log = tmp_path / "app.log"
    append(log, numbered(0, 3))
    async with following(log, use_inotify=False, poll_interval=0.5) as (f, c):
        await c.wait_for(3)
        append(log, numbered(3, 5))
        shutil.copyfile(log, tmp_path / "app.log.1")
        os.truncate(log, 0)
        append(log, "a much longer first line after the truncation\n" + numbered(5, 40))
        await c.wait_for(41)
        lines = await c.settle()
        assert lines == [
            *expect(0, 5),
            "a much longer first line after the truncation",
            *expect(5, 40),
        ]
        assert f.stats.truncations == 1


async def test_restart_continues_at_saved_position(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    state = MemoryPositions()
    append(log, numbered(0, 5) + "partial")
    async with following(log, state=state) as (_f, c):
        await c.wait_for(5)
    append(log, " line\n" + numbered(5, 7))
    async with following(log, state=state) as (_f, c):
        await c.wait_for(3)
        assert await c.settle(0.3) == ["partial line", *expect(5, 7)]


async def test_restart_after_rename_rotation_while_down(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    state = MemoryPositions()
    append(log, numbered(0, 5))
    async with following(log, state=state) as (_f, c):
        await c.wait_for(5)
    append(log, numbered(5, 7))
    os.rename(log, tmp_path / "app.log.1")
    append(log, numbered(7, 9))
    async with following(log, state=state) as (f, c):
        await c.wait_for(4)
        assert await c.settle(0.3) == expect(5, 9)
        assert f.stats.rotations == 1


async def test_restart_after_copytruncate_while_down(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    state = MemoryPositions()
    append(log, numbered(0, 5))
    async with following(log, state=state) as (_f, c):
        await c.wait_for(5)
    append(log, numbered(5, 7))
    shutil.copyfile(log, tmp_path / "app.log.1")
    os.truncate(log, 0)
    append(log, "new first line\n" + numbered(7, 30))
    async with following(log, state=state) as (f, c):
        await c.wait_for(26)
        assert await c.settle(0.3) == [*expect(5, 7), "new first line", *expect(7, 30)]
        assert f.stats.truncations == 1


async def test_restart_with_no_state_change_reads_nothing_twice(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    state = MemoryPositions()
    append(log, numbered(0, 100))
    async with following(log, state=state) as (_f, c):
        await c.wait_for(100)
    for _ in range(2):
        async with following(log, state=state) as (_f, c):
            assert await c.settle(0.3) == []


async def test_start_at_tail_without_saved_position(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, numbered(0, 10))
    async with following(log, start="tail") as (_f, c):
        await asyncio.sleep(0.2)
        append(log, numbered(10, 12))
        await c.wait_for(2)
        assert await c.settle(0.2) == expect(10, 12)


async def test_file_appearing_later_is_read_whole_even_with_start_tail(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    async with following(log, start="tail") as (_f, c):
        await asyncio.sleep(0.2)
        append(log, numbered(0, 3))
        await c.wait_for(3)
        assert await c.settle(0.2) == expect(0, 3)


async def test_huge_lines_are_cut_and_counted(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    async with following(log, max_line=1 << 20) as (f, c):
        await asyncio.sleep(0.1)
        append(log, b"A" * (3 << 20) + b"B" * 10 + b"\nok\n")
        await c.wait_for(2)
        # a huge line arriving in pieces, without its newline for a while
        for _ in range(3):
            append(log, b"C" * (700 << 10))
            await asyncio.sleep(0.05)
        append(log, b"\nafter\n")
        await c.wait_for(4)
        lines = await c.settle(0.2)
        assert len(lines) == 4
        assert lines[0] == "A" * (1 << 20)
        assert lines[1] == "ok"
        assert lines[2] == "C" * (1 << 20)
        assert lines[3] == "after"
        assert f.stats.cut_lines == 2


async def test_invalid_utf8_and_binary_garbage(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, b"bad \xff\xfe bytes\n\x00\x01\x02 binary \xc3\n" + "ok é\n".encode())
    async with following(log) as (f, c):
        lines = await c.wait_for(3)
        assert lines[0] == "bad \ufffd\ufffd bytes"
        assert lines[1] == "\x00\x01\x02 binary \ufffd"
        assert lines[2] == "ok é"
        assert f.stats.decode_errors == 2


@pytest.mark.parametrize("inotify", MODES)
async def test_directory_vanishes_and_comes_back(
    tmp_path: Path, inotify: bool, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    log = d / "app.log"
    append(log, numbered(0, 2))
    with caplog.at_level(logging.INFO, logger="edgeward.guard.sources"):
        async with following(log, use_inotify=inotify) as (f, c):
            await c.wait_for(2)
            shutil.rmtree(d)
            await asyncio.sleep(0.5)  # several checks with the directory gone
            d.mkdir()
            append(log, numbered(2, 5))
            await c.wait_for(5)
            assert await c.settle(0.2) == expect(0, 5)
            append(log, numbered(5, 6))
            await c.wait_for(6)
            assert f.stats.errors == 0
    gone = [r for r in caplog.records if "does not exist; waiting" in r.getMessage()]
    assert len(gone) == 1


async def test_many_rotations_in_a_row(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    async with following(log, rotate_grace=0.1) as (_f, c):
        n = 0
        for r in range(5):
            append(log, numbered(n, n + 20))
            n += 20
            await c.wait_for(n)
            if r % 2:
                os.rename(log, tmp_path / f"app.log.{r}")
            else:
                shutil.copyfile(log, tmp_path / f"app.log.{r}")
                os.truncate(log, 0)
        append(log, numbered(n, n + 1))
        await c.wait_for(n + 1)
        assert await c.settle() == expect(0, n + 1)


def test_journal_entry_format() -> None:
    raw = json.dumps(
        {
            "__REALTIME_TIMESTAMP": "1800000000123456",
            "_HOSTNAME": "edge",
            "SYSLOG_IDENTIFIER": "sshd",
            "_PID": "42",
            "MESSAGE": "Failed password for root from 192.0.2.1 port 22 ssh2",
            "__CURSOR": "s=abc",
        }
    ).encode()
    line, cursor = JournalSource.format_entry(raw)
    assert line == (
        "2027-01-15T08:00:00.123456+00:00 edge sshd[42]: Failed password for root from 192.0.2.1 port 22 ssh2"
    )
    assert cursor == "s=abc"
    binary = json.dumps({"MESSAGE": [104, 105, 255], "_COMM": "x"}).encode()
    line, _ = JournalSource.format_entry(binary)
    assert line is not None and line.endswith("x: hi\ufffd")
    assert JournalSource.format_entry(b"not json") == (None, None)
    assert JournalSource.format_entry(b"[1, 2]") == (None, None)


async def test_journal_source_follows_when_a_journal_runs(tmp_path: Path) -> None:
    if not JournalSource.available() or not Path("/run/systemd/journal/socket").exists():
        pytest.skip("no systemd journal here")
    src = JournalSource(("SYSLOG_IDENTIFIER=edgeward-test",), state=MemoryPositions())
    c = Collector()
    src.start_task(c)
    try:
        await asyncio.sleep(1.0)
        proc = await asyncio.create_subprocess_exec(
            "logger", "-t", "edgeward-test", "hello from the test"
        )
        await proc.wait()
        lines = await c.wait_for(1, timeout=10)
        assert "edgeward-test" in lines[0] and "hello from the test" in lines[0]
    finally:
        await src.stop()


def test_event_source_dispatch() -> None:
    ev = EventSource(clock=lambda: 1234.5)
    got: list[FailMatch] = []
    every: list[FailMatch] = []
    unsubscribe = ev.subscribe("sniff", got.append)
    ev.subscribe("*", every.append)

    def broken(m: FailMatch) -> None:
        raise RuntimeError("handler bug")

    ev.subscribe("proto", broken)
    ev.report("::ffff:203.0.113.9", "sniff", "garbage first bytes")
    ev.report("203.0.113.9", "proto", "bad xmpp header")  # the broken handler must not raise
    ev.report("not an address", "sniff", "")
    assert got == [
        FailMatch(
            host="203.0.113.9",
            time=1234.5,
            line="edge sniff from 203.0.113.9: garbage first bytes",
            tags={"kind": "sniff", "detail": "garbage first bytes"},
        )
    ]
    assert [m.tags["kind"] for m in every] == ["sniff", "proto"]
    assert ev.stats.invalid == 1
    unsubscribe()
    ev.report("203.0.113.9", "sniff", "")
    assert len(got) == 1
    ev2 = EventSource()
    ev2.report("203.0.113.9", "conn")
    assert ev2.stats.unsubscribed == 1
