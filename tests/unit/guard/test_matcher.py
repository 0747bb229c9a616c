"""Filter matching in a separate process: a catastrophic regex is bounded and never freezes the loop.

Real processes, real files, no mocks: the Guard follows a log, its matcher
process chews on a line that would take hours, the event loop keeps ticking,
the batch is dropped and counted, the worker is replaced, and later lines
still ban. No child process outlives `Guard.stop()` or a ``kill -9`` of the edge.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeward.config.loader import validate
from edgeward.config.schema import Config, GuardSettings, JailSettings
from edgeward.guard.matcher import MatcherClosed, MatcherError, MatchTimeout, ProcessMatcher
from edgeward.guard.service import Guard

# (x+x+)+y backtracks exponentially on x...xz: 40 x's would take hours; 3 match at once.
RUNAWAY_RX = r"^(x+x+)+y from <HOST>$"
BAD_LINE = "x" * 40 + "z y from 192.0.2.66\n"


def good_line(addr: str) -> str:
    return f"xxy from {addr}\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def children() -> set[int]:
    """PIDs whose parent is this test process (all threads)."""
    me = os.getpid()
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[1]) == me:
                out.add(int(entry))
    return out


async def wait_until(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def runaway_jail(log: Path) -> dict[str, JailSettings]:
    return {"runaway": JailSettings(logpath=[str(log)], failregex=[RUNAWAY_RX], maxretry=2, bantime=-1)}


async def test_runaway_regex_is_bounded_and_the_loop_keeps_ticking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    before = children()
    guard = Guard(GuardSettings(match_timeout=1.0), runaway_jail(log), db_path=str(tmp_path / "g.sqlite"))
    await guard.start()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    tick_task = asyncio.get_running_loop().create_task(ticker())
    try:
        first = guard.status()["matcher"]
        assert first["isolation"] == "process" and first["pid"] is not None
        pid1 = int(first["pid"])
        assert alive(pid1) and pid1 in children() - before

        def counters() -> dict[str, int]:
            return dict(guard.status("runaway")["jails"][0]["counters"])

        caplog.set_level(logging.DEBUG, logger="edgeward.guard.service")
        t0 = time.monotonic()
        append(log, BAD_LINE)
        await wait_until(lambda: counters()["filter_timeouts"] == 1)
        t1 = time.monotonic()
        assert t1 - t0 >= 0.9  # the batch really ran up to its deadline ...
        window = [t for t in ticks if t0 <= t <= t1]
        gaps = [b - a for a, b in itertools.pairwise(window)]
        # ... and all along the loop kept ticking every ~10 ms: never a 200 ms freeze
        assert len(window) >= (t1 - t0) / 0.05, len(window)
        assert max(gaps) < 0.2, max(gaps)
        assert counters()["lines"] == 1 and counters()["matches"] == 0

        # The stuck worker was killed and reaped, a new one is ready.
        await wait_until(lambda: guard.status()["matcher"]["pid"] is not None)
        pid2 = int(guard.status()["matcher"]["pid"])
        assert pid2 != pid1 and not alive(pid1)
        assert guard.status()["matcher"]["restarts"] == 1

        # Good lines of the same jail still match and ban.
        append(log, good_line("192.0.2.7") * 2)
        await wait_until(lambda: guard.banset.is_banned("192.0.2.7"))
        assert not guard.banset.is_banned("192.0.2.66")

        # A second runaway batch is counted too, but logged only once per jail.
        append(log, BAD_LINE)
        await wait_until(lambda: counters()["filter_timeouts"] == 2)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "took longer" in r.getMessage()]
        assert len(errors) == 1
        msg = errors[0].getMessage()
        assert "jail runaway" in msg and "(x+x+)+y" in msg and "<inline failregex>:1" in msg
        append(log, good_line("192.0.2.8") * 2)
        await wait_until(lambda: guard.banset.is_banned("192.0.2.8"))
        pid3 = int(guard.status()["matcher"]["pid"])
        assert pid3 not in (pid1, pid2) and not alive(pid2)
    finally:
        tick_task.cancel()
        await guard.stop()
    assert not alive(pid3)
    assert children() - before == set()


async def test_thread_and_inline_isolation_still_ban(tmp_path: Path) -> None:
    for mode in ("thread", "inline"):
        log = tmp_path / f"{mode}.log"
        log.write_text("")
        guard = Guard(GuardSettings(match_isolation=mode), runaway_jail(log), db_path=None)
        await guard.start()
        try:
            assert guard.status()["matcher"] == {"isolation": mode, "timeout": 2.0, "pid": None,
                                                 "restarts": 0}
            append(log, good_line("192.0.2.9") * 2)
            await wait_until(lambda g=guard: g.banset.is_banned("192.0.2.9"))  # type: ignore[misc]
        finally:
            await guard.stop()


async def test_no_process_without_log_jails(tmp_path: Path) -> None:
    before = children()
    guard = Guard(GuardSettings(), {"e": JailSettings(sources=["edge:proto"])}, db_path=None)
    await guard.start()
    try:
        assert guard.status()["matcher"]["pid"] is None
        assert children() - before == set()
    finally:
        await guard.stop()


def test_bad_isolation_settings_are_refused() -> None:
    # the schema is where the guard's settings are described, and checked
    with pytest.raises(ValueError, match="match_isolation"):
        validate(GuardSettings, {"match_isolation": "fork"})
    with pytest.raises(ValueError, match="match_timeout"):
        validate(GuardSettings, {"match_timeout": 0})
    with pytest.raises(ValueError):
        ProcessMatcher({}, (), timeout=-1)


async def test_config_maps_isolation_and_timeout(tmp_path: Path) -> None:
    cfg = validate(Config, {"edge": {"state_dir": str(tmp_path)},
                                 "guard": {"match_isolation": "thread", "match_timeout": "500ms"}})
    g = Guard.from_config(cfg)
    assert g.settings.match_isolation == "thread" and g.settings.match_timeout == 0.5
    assert g.db_path == str(tmp_path / "guard.sqlite")
    await g.start()
    try:
        assert g.status()["matcher"] == {"isolation": "thread", "timeout": 0.5, "pid": None, "restarts": 0}
    finally:
        await g.stop()
    default = Guard.from_config(validate(Config, {"edge": {"state_dir": str(tmp_path)}}))
    assert default.settings.match_isolation == "process" and default.settings.match_timeout == 2.0
    with pytest.raises(ValueError):
        validate(Config, {"guard": {"match_isolation": "fork"}})
    with pytest.raises(ValueError):
        validate(Config, {"guard": {"match_timeout": 0}})


async def test_matcher_stats_crash_recovery_and_close(tmp_path: Path) -> None:
    jail = JailSettings(failregex=[RUNAWAY_RX], logpath=["/nonexistent"])
    m = ProcessMatcher({"j": jail}, (), timeout=0.5)
    await m.start()
    try:
        res = await m.match("j", ["xxy from 192.0.2.1", "noise", "xxxy from 2001:db8::1"], time.time())
        assert [f.host for f in res.matches] == ["192.0.2.1", "2001:db8::1"]
        assert res.stats["lines"] == 3 and res.stats["matched"] == 2
        with pytest.raises(MatcherError, match="no filter"):
            await m.match("other", ["x"], time.time())

        # The worker dies under us: that batch fails, the next one gets a fresh worker.
        pid = m.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(3):
            try:
                res = await m.match("j", ["xxy from 192.0.2.2"], time.time())
                break
            except MatcherError:
                continue
        assert [f.host for f in res.matches] == ["192.0.2.2"]
        assert m.pid not in (None, pid)

        with pytest.raises(MatchTimeout) as exc:
            await m.match("j", ["short", BAD_LINE.rstrip()], time.time())
        assert exc.value.jail == "j" and exc.value.lines == 2 and exc.value.longest == len(BAD_LINE) - 1
        assert m.timeouts == 1
        # A close while a batch is stuck ends it at once, without waiting for the deadline.
        m.timeout = 30.0
        stuck = asyncio.get_running_loop().create_task(m.match("j", [BAD_LINE.rstrip()], time.time()))
        await asyncio.sleep(0.3)
        last = m.pid
        t0 = time.monotonic()
        await m.close()
        with pytest.raises(MatcherClosed):
            await stuck
        assert time.monotonic() - t0 < 5
        assert last is not None and not alive(last)
    finally:
        await m.close()
    with pytest.raises(MatcherClosed):
        await m.match("j", ["xxy from 192.0.2.3"], time.time())


WORKER_ORPHAN = textwrap.dedent(
    """
    import asyncio, sys
    from edgeward.config.schema import GuardSettings, JailSettings
    from edgeward.guard.service import Guard

    async def main():
        jail = JailSettings(logpath=[sys.argv[1]], failregex=[sys.argv[2]])
        guard = Guard(GuardSettings(match_timeout=600), {"r": jail}, db_path=None)
        await guard.start()
        print(guard.status()["matcher"]["pid"], flush=True)
        with open(sys.argv[1], "a") as f:
            f.write(sys.argv[3])
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_a_stuck_worker_dies_with_a_killed_edge(tmp_path: Path) -> None:
    """kill -9 of the edge while its worker is deep in a regex: the worker goes too (PDEATHSIG)."""
    log = tmp_path / "app.log"
    log.write_text("")
    p = subprocess.Popen([sys.executable, "-c", WORKER_ORPHAN, str(log), RUNAWAY_RX, BAD_LINE],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        worker = int(p.stdout.readline())
        time.sleep(0.5)  # the worker is now stuck in the regex
        assert alive(worker)
        cpu = Path(f"/proc/{worker}/stat").read_text().rsplit(") ", 1)[1].split()
        assert int(cpu[11]) + int(cpu[12]) > 0  # utime + stime: it is really busy
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(5)
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(worker)
