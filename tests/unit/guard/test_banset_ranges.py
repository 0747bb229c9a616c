"""BanSet ranges (CrowdSec Range decisions): coverage, expiry, removal, per-listener, and the
property that a lookup answers what `ipaddress` says for any mix of ranges and addresses."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.guard.banset import BanSet, normalize_key


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_normalize_key() -> None:
    assert normalize_key("192.0.2.7/24") == "192.0.2.0/24"
    assert normalize_key("192.0.2.7/32") == "192.0.2.7"
    assert normalize_key("::ffff:192.0.2.0/120") == "192.0.2.0/24"
    assert normalize_key("2001:DB8::/32") == "2001:db8::/32"
    assert normalize_key("10.0.0.0/33") is None
    assert normalize_key("nope/8") is None
    assert normalize_key("192.0.2.1") == "192.0.2.1"


def test_range_covers_its_addresses_only() -> None:
    bs = BanSet()
    assert bs.add("127.0.1.0/24", jail="crowdsec")
    assert bs.ranges == 1 and len(bs) == 1
    assert bs.is_banned("127.0.1.1")
    assert bs.is_banned("127.0.1.255")
    assert bs.is_banned("::ffff:127.0.1.9")  # another spelling, through the alias cache
    assert not bs.is_banned("127.0.2.1")
    assert not bs.is_banned("127.0.0.255")
    assert not bs.is_banned("2001:db8::1")
    assert bs.refused("127.0.1.0/24") == 3
    assert bs.refused_by_jail == {"crowdsec": 3}
    assert "127.0.1.0/24" in bs and "127.0.1.1" not in bs


def test_nested_ranges_and_v6() -> None:
    bs = BanSet()
    bs.add("10.0.0.0/8", jail="a", listeners=["web"])
    bs.add("10.1.0.0/16", jail="b")
    bs.add("2001:db8::/32", jail="c")
    assert bs.is_banned("10.1.2.3", "chat")  # the /16 covers every listener
    assert bs.is_banned("10.2.2.3", "web")
    assert not bs.is_banned("10.2.2.3", "chat")  # the /8 only protects web
    assert bs.is_banned("2001:db8:ffff::1")
    assert not bs.is_banned("2001:db9::1")
    assert bs.remove("10.1.0.0/16", jail="b")
    assert not bs.is_banned("10.1.2.3", "chat")
    assert bs.is_banned("10.1.2.3", "web")
    assert bs.ranges == 2


def test_range_expiry_and_unban_notification() -> None:
    clock = Clock()
    bs = BanSet(clock=clock)
    lifted: list[str] = []
    banned: list[str] = []
    bs.on_unban(lifted.append)
    bs.on_ban(lambda a, _l: banned.append(a))
    bs.add("127.0.1.0/24", jail="crowdsec", until=clock.t + 10)
    assert banned == ["127.0.1.0/24"]
    assert bs.is_banned("127.0.1.5")
    clock.t += 11
    assert not bs.is_banned("127.0.1.5")  # lazily, before the sweep
    assert bs.expire() == [("127.0.1.0/24", "crowdsec")]
    assert lifted == ["127.0.1.0/24"]
    assert bs.ranges == 0 and len(bs) == 0
    assert not bs.is_banned("127.0.1.5")


def test_an_address_ban_and_a_range_ban_are_separate() -> None:
    bs = BanSet()
    bs.add("127.0.1.7", jail="sshd")
    bs.add("127.0.1.0/24", jail="crowdsec")
    assert bs.remove("127.0.1.7")
    assert bs.is_banned("127.0.1.7")  # still in the range
    bs.clear()
    assert bs.ranges == 0 and not bs.is_banned("127.0.1.7")


networks = st.one_of(
    st.builds(lambda n, p: ipaddress.IPv4Network((n, p), strict=False), st.integers(0, 2**32 - 1),
              st.integers(1, 32)),
    st.builds(lambda n, p: ipaddress.IPv6Network((n, p), strict=False), st.integers(0, 2**128 - 1),
              st.integers(1, 128)),
)
addresses = st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                      st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))


@settings(max_examples=300, deadline=None)
@given(st.lists(networks, max_size=8), st.lists(addresses, min_size=1, max_size=20))
def test_lookup_agrees_with_ipaddress(
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    bs = BanSet()
    for i, n in enumerate(nets):
        assert bs.add(str(n), jail=f"j{i}")
    # Addresses that the networks cover, and others.
    probes = [*addrs, *(n.network_address for n in nets), *(n.broadcast_address for n in nets)]
    # IPv4-mapped addresses are IPv4 clients (a dual-stack listener reports them so): they are
    # covered by IPv4 networks (and mapped ones, /96 and longer), not by a wider IPv6 network.
    canon = [ipaddress.ip_network(normalize_key(str(n)) or "") for n in nets]
    for a in probes:
        mapped = a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) else None
        c = mapped if mapped is not None else a
        want = any(c in n for n in canon)
        assert bs.is_banned(str(a)) == want, (a, nets)
    for n in nets:
        bs.remove(str(n))
    assert bs.ranges == 0
    assert not any(bs.is_banned(str(a)) for a in probes)
