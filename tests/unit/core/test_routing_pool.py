"""Route specificity and pool balancing."""

import ipaddress
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.config.units import parse_target
from edgeward.net.forward import Forward
from edgeward.routing import Facts, RouteTable, make_route
from edgeward.upstream.pool import Pool, Server


def pool(name: str, *addrs: str, balance: str = "round-robin") -> Pool:
    return Pool(name, [Server(parse_target(a)) for a in addrs], balance=balance)


def fwd(p: Pool) -> Forward:
    return Forward(p, "off", 1.0)


def facts(name: str | None = None, protocol: str | None = "tls", alpn: tuple[str, ...] = (), ip: str = "192.0.2.1") -> Facts:
    return Facts(protocol, name, alpn, ipaddress.ip_address(ip))


def test_most_specific_wins() -> None:
    P = {n: pool(n, "127.0.0.1:1") for n in "abcdefg"}
    table = RouteTable([
        make_route("default", fwd(P["a"]), [], None, [], []),
        make_route("wild", fwd(P["b"]), ["*.example.org"], None, [], []),
        make_route("deepwild", fwd(P["c"]), ["*.dev.example.org"], None, [], []),
        make_route("exact", fwd(P["d"]), ["www.example.org"], None, [], []),
        make_route("xmpp", fwd(P["e"]), ["www.example.org"], None, ["xmpp-client"], []),
        make_route("lan", fwd(P["f"]), [], None, [], ["10.0.0.0/8"]),
        make_route("ssh", fwd(P["g"]), [], "ssh", [], []),
    ])
    def svc(f: Facts) -> str | None:
        r = table.lookup(f)
        return r.service if r else None
    assert svc(facts("www.example.org")) == "exact"
    assert svc(facts("www.example.org", alpn=("h2", "xmpp-client"))) == "xmpp"
    assert svc(facts("a.dev.example.org")) == "deepwild"
    assert svc(facts("x.example.org")) == "wild"
    assert svc(facts("example.org")) == "default"  # a wildcard does not match the bare domain
    assert svc(facts(None, ip="10.1.2.3")) == "lan"
    assert svc(facts(None, protocol="ssh")) == "ssh"
    assert svc(facts("other.net")) == "default"
    assert table.needs_sniff


def test_address_only_table_needs_no_sniff() -> None:
    t = RouteTable([make_route("fwd", fwd(pool("p", "127.0.0.1:1")), [], None, [], ["10.0.0.0/8"])])
    assert not t.needs_sniff


def test_round_robin_respects_weights() -> None:
    p = pool("p", "127.0.0.1:1", "127.0.0.1:2")
    p.servers[1].weight = 3
    picks = Counter(p.pick(b"c").name for _ in range(400))  # type: ignore[union-attr]
    assert picks["127.0.0.1:2"] == 300


def test_least_connections() -> None:
    p = pool("p", "127.0.0.1:1", "127.0.0.1:2", balance="least-connections")
    p.servers[0].active = 5
    assert p.pick(b"c") is p.servers[1]


def test_unavailable_servers_are_skipped_and_retries_exclude() -> None:
    p = pool("p", "127.0.0.1:1", "127.0.0.1:2")
    p.servers[0].healthy = False
    assert all(p.pick(b"c") is p.servers[1] for _ in range(5))
    assert p.pick(b"c", exclude=(p.servers[1],)) is None
    p.servers[0].healthy = True
    p.servers[0].drain = True
    assert p.pick(b"c", exclude=(p.servers[1],)) is None


def test_passive_health_marks_down_for_a_while() -> None:
    p = pool("p", "127.0.0.1:1", "127.0.0.1:2")
    s = p.servers[0]
    for _ in range(3):
        p.connect_failed(s, now=100.0)
    assert not s.available(105.0)
    assert s.available(111.0)


def test_a_lone_server_is_never_marked_down_passively() -> None:
    p = pool("p", "127.0.0.1:1")
    for _ in range(10):
        p.connect_failed(p.servers[0], now=100.0)
    assert p.pick(b"c", now=100.0) is p.servers[0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.ip_addresses(v=4).map(str), min_size=50, max_size=200, unique=True))
def test_source_hash_is_stable_and_moves_few_clients(clients: list[str]) -> None:
    p = pool("p", *(f"127.0.0.1:{i}" for i in range(1, 5)), balance="source-hash")
    before = {c: p.pick(c.encode()) for c in clients}
    assert all(p.pick(c.encode()) is before[c] for c in clients)  # sticky
    p.servers.append(Server(parse_target("127.0.0.1:5")))
    after = {c: p.pick(c.encode()) for c in clients}
    moved = [c for c in clients if after[c] is not before[c]]
    # Only clients that now belong to the new server move (consistent hashing).
    assert all(after[c] is p.servers[-1] for c in moved)
    # Down server: only its clients move, and they come back when it recovers.
    victim = p.servers[0]
    victim.healthy = False
    during = {c: p.pick(c.encode()) for c in clients}
    assert all(during[c] is after[c] for c in clients if after[c] is not victim)
    victim.healthy = True
    assert all(p.pick(c.encode()) is after[c] for c in clients)
