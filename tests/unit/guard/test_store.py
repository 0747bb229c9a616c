"""Ban store (SQLite, real files) and the Guard around it: persistence, kill -9, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeward.config.loader import validate
from edgeward.config.schema import BanIncrementSettings, GuardSettings, JailSettings
from edgeward.guard.service import Guard, GuardError
from edgeward.guard.store import BanRecord, Position, Store
from edgeward.guard.validate import jail_problems

PROSODY_RX = r"Failed authentication attempt \(not-authorized\) for user \S+ from IP: <HOST>$"


def prosody_line(addr: str, user: str = "alice@example.org") -> str:
    return f"c2s55d1 info Failed authentication attempt (not-authorized) for user {user} from IP: {addr}\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


# -- the store -----------------------------------------------------------------------


def test_bans_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "g.sqlite"
    s = Store(db)
    try:
        forever = BanRecord(
            "192.0.2.1", "xmpp", "3 failures", ("l1", "l2 ünï"), 100.0, None, 1, None
        )
        timed = BanRecord("2001:db8::1", "ssh", "r", (), 100.0, 200.0, 2, ("ssh", "https"))
        s.run(s.add_ban, forever, -1.0)
        s.run(s.add_ban, timed, 100.0)
        assert s.run(s.active_bans, 150.0) == [forever, timed]
        assert s.run(s.active_bans, 250.0) == [forever]
        assert s.run(s.remove_expired, 250.0) == 1
        assert s.run(s.active_bans) == [forever]
        # replacing a ban of the same address in the same jail keeps one row
        s.run(s.add_ban, BanRecord("192.0.2.1", "xmpp", "again", (), 300.0, None, 2), -1.0)
        assert [r.reason for r in s.run(s.active_bans)] == ["again"]
        assert len(s.run(s.history)) == 3
        assert s.run(s.remove_ban, "192.0.2.1", None) == 1
        assert s.run(s.active_bans) == []
        assert forever.to_dict()["forever"] is True
    finally:
        s.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_history_and_purge(tmp_path: Path) -> None:
    s = Store(tmp_path / "g.sqlite")
    try:
        for t in (10.0, 20.0, 30.0):
            s.run(s.add_ban, BanRecord("192.0.2.1", "a", "", (), t, t + 5), 5.0)
        assert [h[2] for h in s.run(s.history, 15.0)] == [20.0, 30.0]
        assert s.run(s.purge_history, 25.0) == 2
        assert s.run(s.forget_history, "192.0.2.1") == 1
        assert s.run(s.history) == []
    finally:
        s.close()


def test_positions_coalesce_and_persist(tmp_path: Path) -> None:
    db = tmp_path / "g.sqlite"
    s = Store(db)
    for i in range(1000):
        s.save("/var/log/x.log", Position(dev=1, ino=2, offset=i, head="h"))
    assert s.load("/var/log/x.log") == Position(dev=1, ino=2, offset=999, head="h")
    s.save("journal", Position(cursor="s=1"))
    s.close()
    s.close()  # idempotent
    s = Store(db)
    try:
        assert s.load("/var/log/x.log") == Position(dev=1, ino=2, offset=999, head="h")
        assert s.load("journal") == Position(cursor="s=1")
        assert s.load("/nope") is None
    finally:
        s.close()


def test_a_store_without_a_file_answers_empty_until_the_first_write(tmp_path: Path) -> None:
    db = tmp_path / "state" / "g.sqlite"
    s = Store(db)
    try:
        # Reads at start (restore, purges, history, a log's position) open nothing.
        assert s.run(s.remove_expired, 1.0) == 0 and s.run(s.purge_history, 1.0) == 0
        assert s.run(s.purge_lifted, 1.0) == 0 and s.run(s.forget_history, None) == 0
        assert s.run(s.active_bans) == [] and s.run(s.history) == [] and s.run(s.lifted, 0.0) == {}
        assert s.load("/var/log/x.log") is None
        assert not db.exists()
        ban = BanRecord("192.0.2.9", "edge:manual", "r", (), 100.0, None, 1)
        s.run(s.add_ban, ban, -1.0)  # the first write makes the file
        assert db.exists() and s.run(s.active_bans) == [ban]
    finally:
        s.close()
    s = Store(db)
    try:
        assert [r.address for r in s.run(s.active_bans)] == ["192.0.2.9"]
    finally:
        s.close()


def test_a_log_position_alone_makes_the_file_at_close(tmp_path: Path) -> None:
    db = tmp_path / "g.sqlite"
    s = Store(db)
    s.save("journal", Position(cursor="s=7"))
    s.close()
    assert db.exists()
    s = Store(db)
    try:
        assert s.load("journal") == Position(cursor="s=7")
    finally:
        s.close()


def test_a_closed_store_without_a_file_makes_none(tmp_path: Path) -> None:
    db = tmp_path / "g.sqlite"
    Store(db).close()
    assert not db.exists()


def test_bad_synchronous_mode() -> None:
    with pytest.raises(ValueError):
        Store(":memory:", synchronous="OFF")


def test_commit_cost_is_small(tmp_path: Path) -> None:
    """Sanity for the documented choice (NORMAL): a ban commit is far below a millisecond budget."""
    s = Store(tmp_path / "g.sqlite")
    try:
        n = 200
        t0 = time.perf_counter()
        for i in range(n):
            s.run(s.add_ban, BanRecord(f"10.0.{i >> 8}.{i & 255}", "j", "", (), 1.0, None), -1.0)
        per_ban = (time.perf_counter() - t0) / n
        assert per_ban < 0.02
    finally:
        s.close()


# -- kill -9 of a process that just banned ------------------------------------------------

BANNER = textwrap.dedent(
    """
    import asyncio, sys
    from edgeward.config.schema import GuardSettings, JailSettings
    from edgeward.guard.service import Guard

    async def main() -> None:
        jail = JailSettings(sources=["edge:test"], maxretry=1, bantime=-1)
        guard = Guard(GuardSettings(), {"edge": jail}, db_path=sys.argv[1])
        await guard.start()
        i = 0
        while True:
            addr = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            guard.events.report(addr, "test", "x")
            while not guard.banset.is_banned(addr):
                await asyncio.sleep(0)
            print(addr, flush=True)  # reported as enforced
            i += 1

    asyncio.run(main())
    """
)


def test_kill_9_loses_no_reported_ban(tmp_path: Path) -> None:
    db = tmp_path / "g.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", BANNER, str(db)], stdout=subprocess.PIPE, text=True
    )
    reported: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            reported.append(line.strip())
            if len(reported) == 300:
                os.kill(proc.pid, signal.SIGKILL)  # right after a ban was reported
                break
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(reported) == 300
    s = Store(db)
    try:
        stored = {r.address for r in s.run(s.active_bans)}
    finally:
        s.close()
    assert set(reported) <= stored


# -- the Guard ------------------------------------------------------------------------------


def xmpp_jail(log: Path, **kw: object) -> dict[str, JailSettings]:
    args: dict[str, object] = {
        "logpath": [str(log)],
        "failregex": [PROSODY_RX],
        "maxretry": 3,
        "findtime": 300.0,
        "bantime": -1.0,
        "ignoreip": ["127.0.0.1", "198.51.100.0/24"],
    }
    args.update(kw)
    return {"xmpp": validate(JailSettings, args)}


async def wait_until(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def test_guard_bans_from_log_and_survives_restart(tmp_path: Path) -> None:
    log, db = tmp_path / "prosody.log", tmp_path / "g.sqlite"
    log.write_text("c2s1 info Client connected\n")
    jails = xmpp_jail(log)
    guard = Guard(GuardSettings(), jails, db_path=str(db))
    closed: list[str] = []
    guard.banset.on_ban(lambda addr, listeners: closed.append(addr))
    await guard.start()
    try:
        append(log, prosody_line("203.0.113.7") * 3 + prosody_line("203.0.113.8") * 2)
        append(log, prosody_line("198.51.100.7") * 5 + prosody_line("127.0.0.1") * 5)
        await wait_until(lambda: guard.banset.is_banned("203.0.113.7"))
        await asyncio.sleep(0.2)
        assert closed == ["203.0.113.7"]
        assert not guard.banset.is_banned("203.0.113.8")
        assert not guard.banset.is_banned("198.51.100.7")  # ignoreip CIDR
        assert not guard.banset.is_banned("127.0.0.1")  # ignoreip address
        st = guard.status()
        (jail,) = st["jails"]
        assert jail["failures"] == {"203.0.113.8": 2}
        assert jail["counters"]["ignored"] == 10
        (ban,) = jail["bans"]
        assert ban["address"] == "203.0.113.7" and ban["forever"] and ban["jail"] == "xmpp"
        assert len(ban["lines"]) == 3 and "203.0.113.7" in ban["lines"][0]
        assert guard.bans()[0]["address"] == "203.0.113.7"
        assert guard.status("xmpp")["jails"][0]["name"] == "xmpp"
        with pytest.raises(GuardError):
            guard.status("nope")
    finally:
        await guard.stop()

    guard = Guard(GuardSettings(), jails, db_path=str(db))
    await guard.start()
    try:
        # restored before start() returned
        assert guard.banset.is_banned("203.0.113.7")
        # old lines are not re-counted: one more failure of .8 makes 1, not 3
        append(log, prosody_line("203.0.113.8"))
        await wait_until(lambda: guard.status()["jails"][0]["failures"] == {"203.0.113.8": 1})
        await asyncio.sleep(0.2)
        assert not guard.banset.is_banned("203.0.113.8")
        assert await guard.unban("::ffff:203.0.113.7") == ["203.0.113.7"]
        assert not guard.banset.is_banned("203.0.113.7")
        assert guard.bans() == []
    finally:
        await guard.stop()
    guard = Guard(GuardSettings(), jails, db_path=str(db))
    await guard.start()
    try:
        assert not guard.banset.is_banned("203.0.113.7")  # the unban was stored
    finally:
        await guard.stop()


async def test_guard_timed_bans_expire_and_grow(tmp_path: Path) -> None:
    log, db = tmp_path / "prosody.log", tmp_path / "g.sqlite"
    log.touch()
    jails = xmpp_jail(log, maxretry=1, bantime=0.3, increment=BanIncrementSettings())
    guard = Guard(GuardSettings(), jails, db_path=str(db))
    await guard.start()
    try:
        append(log, prosody_line("203.0.113.9"))
        await wait_until(lambda: guard.banset.is_banned("203.0.113.9"))
        assert guard.bans()[0]["end"] is not None
        await wait_until(lambda: not guard.banset.is_banned("203.0.113.9") and not guard.bans())
        await guard.wait_idle()
    finally:
        await guard.stop()
    guard = Guard(GuardSettings(), jails, db_path=str(db))
    await guard.start()
    try:
        assert guard.bans() == []  # expired bans are not restored
        append(log, prosody_line("203.0.113.9"))
        await wait_until(lambda: guard.banset.is_banned("203.0.113.9"))
        (ban,) = guard.bans()
        assert ban["count"] == 2  # history survived the restart
        assert ban["end"] - ban["start"] == pytest.approx(0.6)
    finally:
        await guard.stop()


async def test_guard_edge_events_manual_bans_and_listeners(tmp_path: Path) -> None:
    sniff = JailSettings(sources=["edge:sniff"], maxretry=2, bantime=60, listeners=["xmpp-c2s"])
    guard = Guard(GuardSettings(), {"sniff": sniff}, db_path=str(tmp_path / "g.sqlite"))
    await guard.start()
    try:
        guard.events.report("203.0.113.1", "sniff", "garbage")
        guard.events.report("203.0.113.1", "proto", "nobody listens to this kind")
        assert not guard.banset.is_banned("203.0.113.1")
        guard.events.report("203.0.113.1", "sniff", "garbage")
        await guard.wait_idle()
        assert guard.banset.is_banned("203.0.113.1", "xmpp-c2s")
        assert not guard.banset.is_banned("203.0.113.1", "https")
        ban = await guard.ban("manual", "2001:DB8::5", reason="seen in the access log")
        assert ban["address"] == "2001:db8::5" and ban["forever"]
        await guard.ban("sniff", "203.0.113.2", bantime=5)
        assert guard.banset.is_banned("203.0.113.2", "xmpp-c2s")
        assert {b["address"] for b in guard.bans()} == {"203.0.113.1", "2001:db8::5", "203.0.113.2"}
        with pytest.raises(GuardError):
            await guard.ban("nope", "203.0.113.3")
        with pytest.raises(GuardError):
            await guard.ban("manual", "example.org")
        with pytest.raises(GuardError):
            await guard.unban()
        assert guard.status()["manual"][0]["address"] == "2001:db8::5"
        assert sorted(await guard.unban(all=True)) == ["2001:db8::5", "203.0.113.1", "203.0.113.2"]
        assert len(guard.banset) == 0
    finally:
        await guard.stop()


async def test_guard_never_bans_from_bad_input(tmp_path: Path) -> None:
    log = tmp_path / "prosody.log"
    log.touch()
    guard = Guard(GuardSettings(), xmpp_jail(log, maxretry=1), db_path=str(tmp_path / "g.sqlite"))
    await guard.start()
    try:
        with open(log, "ab") as fh:
            fh.write(os.urandom(200_000).replace(b"\n", b"") + b"\n")
            fh.write(b"X" * (2 << 20) + b"\n")
            fh.write(
                b"Failed authentication attempt (not-authorized) for user a from IP: 999.1.1.1\n"
            )
            fh.write(
                b"Failed authentication attempt (not-authorized) for user \xff from IP: nothost\n"
            )
            fh.write(b"sentinel\n")
        await wait_until(lambda: guard.status()["jails"][0]["counters"]["lines"] >= 5)
        await asyncio.sleep(0.1)
        assert len(guard.banset) == 0
        src = guard.status()["jails"][0]["sources"][0]
        assert src["cut_lines"] == 1
    finally:
        await guard.stop()


def test_config_validation_messages(tmp_path: Path) -> None:
    settings = GuardSettings(filter_dirs=[str(tmp_path)])
    bad = {
        "a": JailSettings(logpath=["/x"]),  # a log without a filter
        "b": JailSettings(sources=["carrier-pigeon"], failregex=["x <HOST>"]),
        "c": JailSettings(failregex=["(unclosed <HOST>"], logpath=["/x"]),
        "manual": JailSettings(sources=["edge:sniff"]),
        "e": JailSettings(filter="no-such-filter", logpath=["/x"]),
        "f": JailSettings(sources=["edge:sniff"], bantime=0),
        "g": JailSettings(sources=["edge:sniff"], increment=BanIncrementSettings(formula="__import__('os')")),
        "h": JailSettings(failregex=["x <HOST>"], logpath=["/x"], logtimezone="Mars/Olympus"),
    }
    problems = list(jail_problems(settings, bad))
    text = "\n".join(msg for _where, msg, _hint in problems)
    for needle in (
        "jail a:",
        "carrier-pigeon",
        "jail c:",
        "reserved",
        "no-such-filter",
        "jail f: bantime must not be 0",
        "jail g: bantime.formula",
        "jail h: unknown or unsupported time zone",
    ):
        assert needle in text
    # each problem names the key it is about, for `edgeward check`'s file:line:col
    where = {msg.split(":", 1)[0]: loc for loc, msg, _hint in problems}
    assert where["jail a"] == ("jails", "a")
    assert where["jail b"] == ("jails", "b", "sources", 0)
    assert where["jail c"] == ("jails", "c", "failregex")
    assert where["jail e"] == ("jails", "e", "filter")
    assert where["jail f"] == ("jails", "f", "bantime")
    assert where["jail g"] == ("jails", "g", "increment", "formula")
    assert where["jail h"] == ("jails", "h", "logtimezone")
    with pytest.raises(GuardError):
        Guard(settings, bad, db_path=None)
    # what a type can say, the schema refuses before the guard sees it
    with pytest.raises(ValueError, match="maxretry"):
        validate(JailSettings, {"sources": ["edge:sniff"], "maxretry": 0})
    with pytest.raises(ValueError, match="ignoreip"):
        validate(JailSettings, {"sources": ["edge:sniff"], "ignoreip": ["nope"]})
    assert list(jail_problems(GuardSettings(), {"ok": JailSettings(sources=["edge:conn"])})) == []
