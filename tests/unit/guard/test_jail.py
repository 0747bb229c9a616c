"""Jail logic: windows, thresholds, ignoreip, growing bans, forever, memory bounds."""

from __future__ import annotations

import random

import pytest

from edgeward.config.schema import BanIncrementSettings
from edgeward.guard.jail import (
    BanHistory,
    IgnoreList,
    Jail,
    JailError,
    compile_formula,
)
from edgeward.guard.types import FailMatch

T0 = 1_800_000_000.0


def fail(host: str, t: float, line: str = "") -> FailMatch:
    return FailMatch(host=host, time=t, line=line or f"failed login from {host}")


def test_bans_at_maxretry_within_findtime() -> None:
    j = Jail("xmpp", maxretry=3, findtime=300, bantime=-1)
    assert j.add_failure(fail("198.51.100.7", T0), T0) is None
    assert j.add_failure(fail("198.51.100.7", T0 + 100), T0 + 100) is None
    assert j.failures(T0 + 100) == {"198.51.100.7": 2}
    d = j.add_failure(fail("198.51.100.7", T0 + 200, "third"), T0 + 200)
    assert d is not None
    assert d.address == "198.51.100.7"
    assert d.end is None  # forever
    assert d.bantime < 0
    assert d.failures == 3
    assert d.lines[-1] == "third"
    assert d.count == 1
    assert "3 failures" in d.reason
    # counts reset after the ban
    assert j.failures(T0 + 200) == {}


def test_sliding_window_forgets_old_failures() -> None:
    j = Jail("j", maxretry=3, findtime=60, bantime=600)
    assert j.add_failure(fail("192.0.2.1", T0), T0) is None
    assert j.add_failure(fail("192.0.2.1", T0 + 30), T0 + 30) is None
    # third failure 61 s after the first: window holds only two
    assert j.add_failure(fail("192.0.2.1", T0 + 61), T0 + 61) is None
    assert j.failures(T0 + 61) == {"192.0.2.1": 2}
    d = j.add_failure(fail("192.0.2.1", T0 + 70), T0 + 70)
    assert d is not None and d.end == T0 + 70 + 600


def test_addresses_are_counted_separately_and_normalised() -> None:
    j = Jail("j", maxretry=2, findtime=60, bantime=60)
    assert j.add_failure(fail("::ffff:192.0.2.1", T0), T0) is None
    assert j.add_failure(fail("192.0.2.2", T0), T0) is None
    d = j.add_failure(fail("192.0.2.1", T0 + 1), T0 + 1)
    assert d is not None and d.address == "192.0.2.1"
    assert j.failures(T0 + 1) == {"192.0.2.2": 1}


def test_old_future_and_invalid_entries_are_skipped_and_counted() -> None:
    j = Jail("j", maxretry=1, findtime=60, bantime=60)
    assert j.add_failure(fail("192.0.2.1", T0 - 3600), T0) is None  # re-read old log
    assert j.add_failure(fail("192.0.2.1", T0 + 10 * 86400), T0) is None  # far future
    assert j.add_failure(fail("not-an-address", T0), T0) is None
    assert (j.stats.too_old, j.stats.future, j.stats.invalid) == (1, 1, 1)
    # small skew into the future is clamped to now, and counts
    d = j.add_failure(fail("192.0.2.1", T0 + 5), T0)
    assert d is not None and d.start == T0


def test_out_of_order_times_use_the_span_of_the_last_maxretry() -> None:
    j = Jail("j", maxretry=3, findtime=100, bantime=60)
    assert j.add_failure(fail("192.0.2.1", T0 + 90), T0 + 90) is None
    assert j.add_failure(fail("192.0.2.1", T0 + 10), T0 + 90) is None
    assert j.add_failure(fail("192.0.2.1", T0 + 50), T0 + 90) is not None


@pytest.mark.parametrize(
    "ignore",
    [["198.51.100.0/24"], ["198.51.100.7"], ["::ffff:198.51.100.7"], ["::ffff:198.51.100.0/120"]],
)
def test_ignoreip_v4(ignore: list[str]) -> None:
    j = Jail("j", maxretry=1, findtime=60, bantime=60, ignoreip=ignore)
    assert j.add_failure(fail("198.51.100.7", T0), T0) is None
    assert j.add_failure(fail("::ffff:198.51.100.7", T0), T0) is None
    assert j.stats.ignored == 2
    assert j.add_failure(fail("203.0.113.1", T0), T0) is not None


def test_ignoreip_v6_and_bad_entries() -> None:
    ig = IgnoreList(["2001:db8::/32", "fd00::1", " ", "127.0.0.1/8"])
    assert "2001:db8:1::5" in ig
    assert "fd00::1" in ig
    assert "fd00::2" not in ig
    assert "127.8.9.10" in ig
    assert "garbage" not in ig
    with pytest.raises(JailError):
        IgnoreList(["example.org"])
    with pytest.raises(JailError):
        IgnoreList(["10.0.0.0/33"])


def test_bad_settings_raise() -> None:
    with pytest.raises(JailError):
        Jail("j", maxretry=0)
    with pytest.raises(JailError):
        Jail("j", findtime=0)
    with pytest.raises(JailError):
        Jail("j", bantime=0)


def ban_twice(j: Jail, addr: str, now: float) -> float:
    for _ in range(j.maxretry):
        d = j.add_failure(fail(addr, now), now)
    assert d is not None
    j.history.record(d.address, d.jail, d.start)  # what the Guard does after committing
    return d.bantime


def test_increment_default_formula_doubles() -> None:
    j = Jail("j", maxretry=1, findtime=60, bantime=600, increment=BanIncrementSettings(enabled=True))
    times = [ban_twice(j, "192.0.2.1", T0 + i) for i in range(5)]
    assert times == [600, 1200, 2400, 4800, 9600]


def test_increment_factor_maxtime_and_multipliers() -> None:
    inc = BanIncrementSettings(enabled=True, factor=3, maxtime=10_000)
    j = Jail("j", maxretry=1, findtime=60, bantime=600, increment=inc)
    assert [ban_twice(j, "192.0.2.1", T0 + i) for i in range(4)] == [600, 3600, 7200, 10_000]
    inc = BanIncrementSettings(enabled=True, multipliers=(1, 5, 30))
    j = Jail("j", maxretry=1, findtime=60, bantime=60, increment=inc)
    assert [ban_twice(j, "192.0.2.1", T0 + i) for i in range(5)] == [60, 300, 1800, 1800, 1800]


def test_increment_custom_formula_and_rndtime() -> None:
    inc = BanIncrementSettings(enabled=True, formula="ban.Time * (ban.Count + 1) * banFactor", rndtime=10)
    j = Jail("j", maxretry=1, findtime=60, bantime=100, increment=inc, rng=random.Random(1))
    first = ban_twice(j, "192.0.2.1", T0)
    second = ban_twice(j, "192.0.2.1", T0 + 1)
    assert first == 100  # the first ban is never grown
    assert 200 <= second < 210


def test_increment_per_jail_or_overall() -> None:
    history = BanHistory()
    a = Jail(
        "a",
        maxretry=1,
        findtime=60,
        bantime=100,
        increment=BanIncrementSettings(enabled=True),
        history=history,
    )
    b = Jail(
        "b",
        maxretry=1,
        findtime=60,
        bantime=100,
        increment=BanIncrementSettings(enabled=True),
        history=history,
    )
    both = Jail(
        "c", maxretry=1, findtime=60, bantime=100,
        increment=BanIncrementSettings(enabled=True, overalljails=True), history=history,
    )  # fmt: skip
    ban_twice(a, "192.0.2.1", T0)
    ban_twice(a, "192.0.2.1", T0 + 1)
    assert ban_twice(b, "192.0.2.1", T0 + 2) == 100  # b has not banned it before
    assert ban_twice(both, "192.0.2.1", T0 + 3) == 100 * 8  # three earlier bans anywhere


def test_forever_is_not_incremented() -> None:
    j = Jail("j", maxretry=1, findtime=60, bantime=-1, increment=BanIncrementSettings(enabled=True))
    for i in range(3):
        assert ban_twice(j, "192.0.2.1", T0 + i) == -1


@pytest.mark.parametrize(
    "formula",
    [
        "__import__('os').system('true')",
        "ban.Time.__class__",
        "open('x')",
        "ban.Other",
        "1 +",
        "lambda: 1",
    ],
)
def test_formula_rejects_code(formula: str) -> None:
    with pytest.raises(JailError):
        compile_formula(formula)


def test_formula_guards_huge_exponents() -> None:
    with pytest.raises(JailError):
        compile_formula("ban.Time * 2 ** 100000")
    f = compile_formula("max(ban.Time, 10) if ban.Count > 1 else -ban.Time")
    assert f(5, 2, 1) == 10
    assert f(5, 1, 1) == -5


def test_manual_ban_ignores_ignoreip_and_uses_given_bantime() -> None:
    j = Jail("j", maxretry=3, findtime=60, bantime=600, ignoreip=["192.0.2.0/24"])
    d = j.manual_ban("192.0.2.4", T0, reason="admin", bantime=30)
    assert d.end == T0 + 30 and d.reason == "admin"
    d = j.manual_ban("192.0.2.4", T0)
    assert d.end == T0 + 600
    with pytest.raises(JailError):
        j.manual_ban("nope", T0)


def test_tracked_addresses_are_bounded_lru() -> None:
    j = Jail("j", maxretry=3, findtime=600, bantime=60, max_tracked=100)
    for i in range(1000):
        j.add_failure(fail(f"10.0.{i >> 8}.{i & 255}", T0), T0)
    assert len(j.failures()) == 100
    assert j.stats.evicted == 900
    # a recently seen address survives eviction
    j.add_failure(fail("10.0.3.132", T0), T0)  # i=900, the oldest tracked: moves to the end
    for i in range(1000, 1099):
        j.add_failure(fail(f"10.1.{i >> 8}.{i & 255}", T0), T0)
    assert j.failures()["10.0.3.132"] == 2
    assert "10.0.3.133" not in j.failures()


def test_per_address_memory_is_bounded_by_maxretry() -> None:
    j = Jail("j", maxretry=3, findtime=10, bantime=60)
    now = T0
    for _ in range(10_000):  # one failure every 6 s never reaches 3 in 10 s
        now += 6
        assert j.add_failure(fail("192.0.2.1", now, "x" * 10_000), now) is None
    f = j._failures["192.0.2.1"]
    assert len(f.times) <= 3 and len(f.lines) <= 3
    assert all(len(line) <= 2000 for line in f.lines)


def test_prune_and_forget() -> None:
    j = Jail("j", maxretry=5, findtime=60, bantime=60)
    j.add_failure(fail("192.0.2.1", T0), T0)
    j.add_failure(fail("192.0.2.2", T0 + 50), T0 + 50)
    assert j.prune(T0 + 100) == 1
    assert list(j.failures()) == ["192.0.2.2"]
    j.forget("::ffff:192.0.2.2")
    assert j.failures() == {}


def test_history_forget_before() -> None:
    h = BanHistory()
    h.record("192.0.2.1", "a", T0)
    h.record("192.0.2.1", "b", T0 + 100)
    assert h.count("192.0.2.1") == 2
    assert h.count("192.0.2.1", "a") == 1
    assert h.count("192.0.2.1", since=T0 + 50) == 1
    h.forget_before(T0 + 50)
    assert h.count("192.0.2.1") == 1
