"""BanSet expiry by a heap of end times: a replaced or lifted ban's old end is stale and ignored,
the heap stays bounded under re-bans, and a sweep with nothing ended costs nothing like a scan."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.guard.banset import BanSet


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_replaced_and_lifted_bans_leave_no_early_expiry() -> None:
    c = Clock()
    bs = BanSet(clock=c)
    bs.add("192.0.2.1", jail="a", until=c.t + 10)
    bs.add("192.0.2.1", jail="a", until=c.t + 100)  # extended
    bs.add("192.0.2.2", jail="a", until=c.t + 5)
    bs.remove("192.0.2.2")
    bs.add("192.0.2.2", jail="a", until=None)  # banned again, forever
    assert bs.next_expiry() == c.t + 100
    assert bs.expire(c.t + 50) == []
    assert bs.is_banned("192.0.2.1") and bs.is_banned("192.0.2.2")
    assert bs.expire(c.t + 100) == [("192.0.2.1", "a")]
    assert bs.next_expiry() is None and len(bs) == 1


def test_heap_stays_bounded_under_rebans() -> None:
    bs = BanSet()
    for i in range(20_000):
        bs.add("192.0.2.1", jail="a", until=2e9 + i)
    assert len(bs._ends) <= 4 * len(bs) + 1024
    assert bs.next_expiry() == 2e9 + 19_999


def test_sweep_with_nothing_ended_does_not_scan() -> None:
    bs = BanSet()
    now = time.time()
    for i in range(50_000):
        bs.add(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", jail="crowdsec", until=now + 3600 + i)
    t0 = time.process_time()
    for _ in range(1000):
        assert bs.expire(now) == []
        bs.next_expiry()
    assert time.process_time() - t0 < 0.5  # a scan of 50k bans would take ~40 ms each


parts = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["a", "b"]), st.none() | st.integers(1, 50),
                           st.booleans()), max_size=40)


@settings(max_examples=200, deadline=None)
@given(parts, st.integers(0, 60))
def test_expire_matches_a_full_scan(ops: list[tuple[int, str, int | None, bool]], at: int) -> None:
    c = Clock(0.0)
    bs = BanSet(clock=c)
    model: dict[tuple[str, str], int | None] = {}
    for n, jail, until, lift in ops:
        addr = f"192.0.2.{n}"
        if lift:
            bs.remove(addr, jail=jail)
            model.pop((addr, jail), None)
        else:
            bs.add(addr, jail=jail, until=None if until is None else float(until))
            model[(addr, jail)] = until
    timed = [u for u in model.values() if u is not None]
    assert bs.next_expiry() == (float(min(timed)) if timed else None)
    ended = sorted(k for k, u in model.items() if u is not None and u <= at)
    assert sorted(bs.expire(float(at))) == ended
    left = {a for (a, _j), u in model.items() if u is None or u > at}
    assert {a for a in bs.snapshot()} == left
