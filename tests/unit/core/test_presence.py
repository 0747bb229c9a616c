"""Distinct clients per service, pool and server, kept from the open/close events (clients.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgeward.clients import Presence
from edgeward.events import (
    ConnClosed,
    ConnOpened,
    EventBus,
    Peer,
    UdpSessionEnded,
    UdpSessionStarted,
)


def opened(ip: str, service: str = "web", upstream: str = "10.0.0.1:80", port: int = 1) -> ConnOpened:
    return ConnOpened("l", Peer(ip, port), service, upstream)


def closed(ip: str, service: str = "web", upstream: str = "10.0.0.1:80", port: int = 1) -> ConnClosed:
    return ConnClosed("l", Peer(ip, port), service, upstream, 0, 0, 0.0, "done")


def test_several_connections_of_one_address_are_one_client() -> None:
    bus = EventBus()
    p = Presence(bus)
    p.set_pools({"web": "bridges"})
    for port in (1, 2, 3):
        bus.publish(opened("192.0.2.1", port=port))
    bus.publish(UdpSessionStarted("m", Peer("192.0.2.1", 9), "web", "10.0.0.1:80"))
    bus.publish(opened("192.0.2.2", upstream="10.0.0.2:80"))
    assert p.service_clients("web") == 2 and p.pool_clients("bridges") == 2
    assert p.server_clients("bridges", "10.0.0.1:80") == 1 and p.server_clients("bridges", "10.0.0.2:80") == 1
    assert p.addresses("web") == {"192.0.2.1": 4, "192.0.2.2": 1}
    for port in (1, 2, 3):
        bus.publish(closed("192.0.2.1", port=port))
    assert p.service_clients("web") == 2  # its UDP session is still live
    bus.publish(UdpSessionEnded("m", Peer("192.0.2.1", 9), "web", "10.0.0.1:80", 0, 0, 0, 0, 0.0, "udp_idle"))
    assert p.service_clients("web") == 1 and p.server_clients("bridges", "10.0.0.1:80") == 0
    bus.publish(closed("192.0.2.2", upstream="10.0.0.2:80"))
    assert not any(p.by_service.values()) and not any(p.by_pool.values()) and not any(p.by_server.values())
    p.set_pools({"web": "bridges"})
    assert p.by_service == {} and p.by_pool == {} and p.by_server == {}  # nothing kept for who left


def test_never_relayed_closes_and_unknown_closes_change_nothing() -> None:
    bus = EventBus()
    p = Presence(bus)
    bus.publish(opened("192.0.2.1"))
    bus.publish(ConnClosed("l", Peer("192.0.2.1", 5), "", "", 0, 0, 0.0, "no_route"))
    bus.publish(closed("192.0.2.9", service="other"))  # opened before the subscriber existed
    assert p.service_clients("web") == 1 and p.service_clients("other") == 0


def test_a_reload_that_moves_a_service_to_another_pool_keeps_counts_consistent() -> None:
    bus = EventBus()
    p = Presence(bus)
    p.set_pools({"web": "old"})
    bus.publish(opened("192.0.2.1"))
    p.set_pools({"web": "new"})
    bus.publish(opened("192.0.2.2", upstream="10.0.0.9:80"))  # a server of the new pool
    assert p.pool_clients("old") == 1 and p.pool_clients("new") == 1
    bus.publish(closed("192.0.2.1"))
    assert p.pool_clients("old") == 0 and p.pool_clients("new") == 1
    bus.publish(closed("192.0.2.2", upstream="10.0.0.9:80"))
    assert not any(p.by_pool.values())


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 2), st.integers(0, 1), st.booleans()),
                max_size=200))
def test_counts_match_a_model_whatever_the_order(ops: list[tuple[bool, int, int, int, bool]]) -> None:
    """Against a model that keeps every live connection: distinct addresses per service and server,
    with reloads (which prune what is idle) anywhere in between."""
    bus = EventBus()
    p = Presence(bus)
    p.set_pools({"s0": "p", "s1": "p"})
    live: list[tuple[str, str, str]] = []
    for is_open, ipn, srv, svc, reload in ops:
        if reload:
            p.set_pools({"s0": "p", "s1": "p"})
        item = (f"192.0.2.{ipn}", f"s{svc}", f"10.0.0.{srv}:80")
        if is_open:
            live.append(item)
            bus.publish(opened(item[0], item[1], item[2]))
        elif item in live:
            live.remove(item)
            bus.publish(closed(item[0], item[1], item[2]))
    for svc in ("s0", "s1"):
        assert p.service_clients(svc) == len({ip for ip, s, _ in live if s == svc})
    for srv in range(3):
        name = f"10.0.0.{srv}:80"
        assert p.server_clients("p", name) == len({ip for ip, _, u in live if u == name})
    assert p.pool_clients("p") == len({ip for ip, _, _ in live})
