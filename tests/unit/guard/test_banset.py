"""BanSet: normalisation, per-listener bans, expiry, subscribers, speed sanity."""

from __future__ import annotations

import time

import pytest

from edgeward.guard.banset import BanSet, normalize_addr


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::FFFF:c000:0201", "192.0.2.1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("not-an-ip", None),
        ("", None),
        ("300.1.1.1", None),
    ],
)
def test_normalize(raw: str, canonical: str | None) -> None:
    assert normalize_addr(raw) == canonical


def test_spellings_hit_the_same_ban() -> None:
    bs = BanSet()
    assert bs.add("::ffff:198.51.100.7", jail="xmpp")
    assert bs.is_banned("198.51.100.7")
    assert bs.is_banned("::ffff:198.51.100.7")
    assert not bs.is_banned("198.51.100.8")
    assert bs.add("2001:DB8::7")
    assert bs.is_banned("2001:db8::7")
    assert bs.is_banned("2001:db8:0::7")
    assert bs.is_banned("[2001:db8::7]")
    assert not bs.is_banned("2001:db8::8")
    assert not bs.is_banned("garbage")
    assert len(bs) == 2
    assert "198.51.100.7" in bs


def test_invalid_address_is_refused_not_raised() -> None:
    bs = BanSet()
    assert not bs.add("example.org")
    assert len(bs) == 0


def test_listener_sets_merge_per_jail() -> None:
    bs = BanSet()
    bs.add("192.0.2.9", jail="a", listeners=["xmpp-c2s"])
    assert bs.is_banned("192.0.2.9", "xmpp-c2s")
    assert not bs.is_banned("192.0.2.9", "https")
    assert bs.is_banned("192.0.2.9")  # on some listener
    bs.add("192.0.2.9", jail="b", listeners=["https"])
    assert bs.is_banned("192.0.2.9", "https")
    bs.add("192.0.2.9", jail="c")  # all listeners
    assert bs.is_banned("192.0.2.9", "ssh")
    assert bs.remove("192.0.2.9", jail="c")
    assert not bs.is_banned("192.0.2.9", "ssh")
    assert bs.is_banned("192.0.2.9", "https")
    assert bs.remove("192.0.2.9")  # every jail
    assert not bs.is_banned("192.0.2.9", "https")
    assert not bs.remove("192.0.2.9")


def test_expiry_lazy_and_explicit() -> None:
    clock = Clock()
    bs = BanSet(clock=clock)
    unbanned: list[str] = []
    bs.on_unban(unbanned.append)
    bs.add("192.0.2.1", jail="a", until=clock.t + 10)
    bs.add("192.0.2.2", jail="a")  # forever
    bs.add("192.0.2.3", jail="a", until=clock.t + 5)
    bs.add("192.0.2.3", jail="b", until=clock.t + 20, listeners=["x"])
    assert bs.next_expiry() == clock.t + 5
    clock.t += 10
    # lazy: refused no more even before expire() ran
    assert not bs.is_banned("192.0.2.1")
    dropped = bs.expire()
    assert sorted(dropped) == [("192.0.2.1", "a"), ("192.0.2.3", "a")]
    assert unbanned == ["192.0.2.1"]
    assert bs.is_banned("192.0.2.3", "x")
    assert not bs.is_banned("192.0.2.3", "y")
    assert bs.is_banned("192.0.2.2")
    clock.t += 1e9
    assert bs.is_banned("192.0.2.2")


def test_on_ban_subscribers_see_new_and_grown_bans() -> None:
    bs = BanSet()
    seen: list[tuple[str, frozenset[str] | None]] = []
    unsubscribe = bs.on_ban(lambda a, ls: seen.append((a, ls)))

    def broken(addr: str, listeners: frozenset[str] | None) -> None:
        raise RuntimeError("subscriber bug")

    bs.on_ban(broken)  # must not stop the ban nor the other subscribers
    bs.add("::ffff:192.0.2.5", jail="a", listeners=["p"])
    bs.add("192.0.2.5", jail="a", listeners=["p"])  # same: nothing new
    bs.add("192.0.2.5", jail="b", listeners=["q"])  # grew
    bs.add("192.0.2.5", jail="c")  # all
    assert seen == [
        ("192.0.2.5", frozenset({"p"})),
        ("192.0.2.5", frozenset({"p", "q"})),
        ("192.0.2.5", None),
    ]
    unsubscribe()
    bs.add("192.0.2.6")
    assert len(seen) == 3
    assert bs.is_banned("192.0.2.6")


def test_refusals_counted_per_jail() -> None:
    bs = BanSet()
    bs.add("192.0.2.1", jail="xmpp")
    for _ in range(3):
        assert bs.is_banned("192.0.2.1")
    assert not bs.is_banned("192.0.2.2")
    assert bs.refused("192.0.2.1") == 3
    assert bs.refused_by_jail == {"xmpp": 3}


def test_clear_and_snapshot() -> None:
    bs = BanSet()
    bs.add("192.0.2.1", jail="a", until=5e9)
    bs.add("2001:db8::1", jail="b", listeners=["x"])
    snap = bs.snapshot()
    assert snap == {"192.0.2.1": {"a": (None, 5e9)}, "2001:db8::1": {"b": (frozenset({"x"}), None)}}
    assert sorted(bs.clear()) == ["192.0.2.1", "2001:db8::1"]
    assert len(bs) == 0


def test_alias_cache_is_bounded() -> None:
    bs = BanSet()
    bs.add("192.0.2.1")
    for i in range(70_000):
        bs.is_banned(f"2001:db8::{i:x}")
    assert len(bs._alias) <= 65536


def test_lookup_is_cheap_with_many_bans() -> None:
    """Sanity, not a benchmark: 100k bans, lookups stay well under 10 us each."""
    bs = BanSet()
    for i in range(100_000):
        bs.add(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", jail="j")
    probes = [f"172.16.{i >> 8 & 255}.{i & 255}" for i in range(20_000)]
    probes += [f"10.0.{i >> 8 & 255}.{i & 255}" for i in range(20_000)]
    t0 = time.perf_counter()
    hits = sum(bs.is_banned(p) for p in probes)
    per_lookup = (time.perf_counter() - t0) / len(probes)
    assert hits == 20_000
    assert per_lookup < 10e-6
