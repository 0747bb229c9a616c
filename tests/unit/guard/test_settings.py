"""The guard's options live in the config schema only; each one reaches the part that uses it.

Real files, a real Guard, real sources: a setting that the schema accepts but
the guard ignores would show here as behaviour that did not change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeward.config.loader import ConfigError, loads
from edgeward.config.schema import BanIncrementSettings, Config, GuardSettings, JailSettings
from edgeward.guard.build import build_filter, filter_search_path
from edgeward.guard.filter import EDGEWARD_FILTER_DIR
from edgeward.guard.service import Guard
from edgeward.guard.validate import config_problems

RX = r"^auth failed from <HOST>$"


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def counters(guard: Guard, jail: str) -> dict[str, int]:
    return dict(guard.status(jail)["jails"][0]["counters"])


async def test_start_tail_skips_what_the_log_held_before(tmp_path: Path) -> None:
    head, tail = tmp_path / "head.log", tmp_path / "tail.log"
    for log in (head, tail):
        log.write_text("auth failed from 192.0.2.1\n" * 3)
    jails = {
        "head": JailSettings(logpath=[str(head)], failregex=[RX], maxretry=3),
        "tail": JailSettings(logpath=[str(tail)], failregex=[RX], maxretry=3, start="tail"),
    }
    guard = Guard(GuardSettings(match_isolation="inline"), jails, db_path=None)
    await guard.start()
    try:
        await wait_until(lambda: guard.banset.is_banned("192.0.2.1"))
        assert counters(guard, "head")["lines"] == 3
        append(tail, "auth failed from 192.0.2.2\n")
        await wait_until(lambda: counters(guard, "tail")["lines"] == 1)
        assert guard.status("tail")["jails"][0]["failures"] == {"192.0.2.2": 1}
    finally:
        await guard.stop()


async def test_polling_instead_of_inotify(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    jails = {"j": JailSettings(logpath=[str(log)], failregex=[RX], maxretry=1)}
    for use_inotify in (True, False):
        settings = GuardSettings(match_isolation="inline", use_inotify=use_inotify, poll_interval=0.05)
        guard = Guard(settings, jails, db_path=None)
        await guard.start()
        try:
            addr = f"192.0.2.{10 + use_inotify}"
            append(log, f"auth failed from {addr}\n")
            await wait_until(lambda a=addr, g=guard: g.banset.is_banned(a))  # type: ignore[misc]
            (src,) = guard.status("j")["jails"][0]["sources"]
            assert src["inotify"] is use_inotify
        finally:
            await guard.stop()


async def test_max_tracked_bounds_the_addresses_counted(tmp_path: Path) -> None:
    guard = Guard(GuardSettings(max_tracked=2), {"e": JailSettings(sources=["edge:x"])}, db_path=None)
    await guard.start()
    try:
        for i in range(5):
            guard.events.report(f"192.0.2.{i}", "x", "seen")
        st = guard.status("e")["jails"][0]
        assert sorted(st["failures"]) == ["192.0.2.3", "192.0.2.4"]
        assert st["counters"]["evicted"] == 3
    finally:
        await guard.stop()


async def test_history_max_age_limits_growing_bans(tmp_path: Path) -> None:
    db = str(tmp_path / "g.sqlite")
    t0 = 1_800_000_000.0
    now = [t0]
    jails = {"e": JailSettings(sources=["edge:x"], maxretry=1, bantime=60, increment=BanIncrementSettings())}

    async def ban_at(t: float, history_max_age: float) -> int:
        now[0] = t
        guard = Guard(GuardSettings(history_max_age=history_max_age), jails, db_path=db,
                      clock=lambda: now[0])
        await guard.start()
        try:
            rec = await guard.ban("e", "192.0.2.9")
            await guard.unban("192.0.2.9")
            return int(rec["count"])
        finally:
            await guard.stop()

    assert await ban_at(t0, 86400) == 1
    assert await ban_at(t0 + 7200, 86400) == 2  # the ban two hours ago counts within a day
    assert await ban_at(t0 + 14400, 3600) == 1  # ... but not within an hour


async def test_journalmatch_of_the_jail_or_of_the_filter(tmp_path: Path) -> None:
    jails = {
        "own": JailSettings(sources=["journal"], failregex=[RX], journalmatch=["_SYSTEMD_UNIT=app.service"]),
        "flt": JailSettings(sources=["journal"], filter="prosody-auth"),
    }
    guard = Guard(GuardSettings(match_isolation="inline"), jails, db_path=None)
    await guard.start()
    try:
        journals = {j["name"]: j["sources"] for j in guard.status()["jails"]}
        if not journals["own"]:
            pytest.skip("journalctl not installed")
        assert journals["own"] == [{"type": "journal", "matches": ["_SYSTEMD_UNIT=app.service"], "lines": 0}]
        assert journals["flt"][0]["matches"] == ["_SYSTEMD_UNIT=prosody.service"]
    finally:
        await guard.stop()


def test_filter_parameters_and_logtimezone_reach_the_filter() -> None:
    path = filter_search_path(GuardSettings())
    assert path[-1] == EDGEWARD_FILTER_DIR and "/etc/fail2ban/filter.d" in path
    flt = build_filter("x", JailSettings(filter="prosody-auth[logtimezone=x, user=bob]"), path)
    assert flt is not None and flt.options["user"] == "bob"
    line = "2005-08-14 12:00:00 auth failed from 192.0.2.1"
    rx = r"auth failed from <HOST>$"
    utc = build_filter("x", JailSettings(failregex=[rx], logtimezone="UTC"), path)
    plus2 = build_filter("x", JailSettings(failregex=[rx], logtimezone="+0200"), path)
    assert utc is not None and plus2 is not None
    (a,) = utc.process(line, now=2e9)
    (b,) = plus2.process(line, now=2e9)
    assert a.time == 1_124_020_800.0 and a.time - b.time == 7200


CONFIG = """\
[edge]
admin = "unix:/tmp/x/admin.sock"

[services.s]
listen = ["127.0.0.1:8443"]
to = "127.0.0.1:9"

[jails.app]
logpath = ["/var/log/app.log"]
filter = "no-such-filter"

[jails.edge]
sources = ["edge:sniff", "pigeon"]
logtimezone = "Mars"
"""


def test_loader_reports_guard_problems_where_they_were_written() -> None:
    def line_of(text: str) -> int:
        return CONFIG.splitlines().index(text) + 1

    loads(CONFIG, "edge.toml")  # without the guard's check the config layer cannot tell
    with pytest.raises(ConfigError) as ei:
        loads(CONFIG, "edge.toml", checks=(config_problems,))
    got = [str(p) for p in ei.value.problems]  # each at its value's column
    hint = " (see `edgeward check` docs in docs/config.md)"
    at_filter = line_of('filter = "no-such-filter"')
    at_sources = line_of('sources = ["edge:sniff", "pigeon"]')
    at_tz = line_of('logtimezone = "Mars"')
    assert got == [
        f"edge.toml:{at_filter}:10: jail app: no filter named "
        f"'no-such-filter' in /etc/fail2ban/filter.d, {EDGEWARD_FILTER_DIR} (give a path, or add the "
        "directory to the filter search path)" + hint,
        f"edge.toml:{at_sources}:11: jail edge: unknown "
        "source 'pigeon' (edge:<kind> or journal)" + hint,
        f"edge.toml:{at_tz}:15: jail edge: unknown or unsupported "
        "time zone 'Mars' (use an offset like +0200)" + hint,
    ]
    fine = CONFIG.replace('filter = "no-such-filter"', 'filter = "prosody-auth[mode=x]"')
    fine = fine.replace('"pigeon"', '"edge:proto"').replace('logtimezone = "Mars"', 'logtimezone = "UTC"')
    assert isinstance(loads(fine, "edge.toml", checks=(config_problems,)), Config)


def test_the_config_layer_imports_nothing_of_the_guard() -> None:
    import subprocess
    import sys

    code = ("import sys, edgeward.config.loader, edgeward.config.schema; "
            "print(sorted(m for m in sys.modules if m.startswith('edgeward.') and not m.startswith('edgeward.config')"
            # edgeward/__init__.py's selector of compiled modules imports nothing of edgeward.
            " and m != 'edgeward._native'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_newest_bans_builds_only_those_asked_for(tmp_path: Path) -> None:
    """The dashboard and `edgeward top` ask for the newest few bans and how many are in force
    (/bans?newest=N); the full list is built only for `edgeward bans`."""
    now = [1000.0]
    guard = Guard(GuardSettings(), {}, db_path=None, clock=lambda: now[0])
    await guard.start()
    try:
        for i in range(50):
            now[0] += 1
            await guard.ban("manual", f"192.0.2.{i}", "test", 10 if i < 5 else None)
        now[0] += 20  # the five timed bans (the oldest) have ended
        total, newest = guard.newest_bans(3)
        assert total == 45
        assert [b["address"] for b in newest] == ["192.0.2.49", "192.0.2.48", "192.0.2.47"]
        assert [b["address"] for b in guard.bans()][-3:] == ["192.0.2.47", "192.0.2.48", "192.0.2.49"]
        assert guard.newest_bans(0) == (45, [])
    finally:
        await guard.stop()
