"""A banned network closes the clients inside it: gathered per loop turn (a CrowdSec blocklist
brings thousands of ranges at once), each client address parsed once per batch."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field

from edgeward.admission import Admission
from edgeward.config.schema import EdgeSettings
from edgeward.events import Peer


@dataclass(eq=False)
class Listener:
    name: str


@dataclass(eq=False)
class Conn:
    peer: Peer
    listener: Listener
    closed: list[str] = field(default_factory=list)

    def close(self, reason: str = "") -> None:
        self.closed.append(reason)


def admission_with(clients: list[tuple[str, str]]) -> tuple[Admission, list[Conn]]:
    adm = Admission(EdgeSettings())
    conns = [Conn(Peer(ip, 1000 + i, False), Listener(lst)) for i, (ip, lst) in enumerate(clients)]
    for c in conns:
        adm.add_tcp(c)
    return adm, conns


def test_without_a_loop_a_network_closes_its_clients_at_once() -> None:
    adm, conns = admission_with([("192.0.2.1", "web"), ("192.0.2.200", "ssh"), ("192.0.3.1", "web"),
                                 ("2001:db8::5", "web")])
    assert adm.close_client("192.0.2.0/24", None) == 2
    assert [bool(c.closed) for c in conns] == [True, True, False, False]
    assert adm.close_client("2001:db8::/32", frozenset({"ssh"})) == 0  # only on ssh: the web client stays
    assert adm.close_client("2001:db8::/32", frozenset({"web"})) == 1
    assert conns[1].closed == ["banned"]


async def test_a_batch_of_networks_is_one_walk_on_the_next_turn() -> None:
    rows = [(f"10.{i // 250}.{i % 250}.7", "web" if i % 2 else "ssh") for i in range(5000)]
    adm, conns = admission_with(rows)
    nets = [f"10.{k}.{j}.0/24" for k in range(0, 20, 2) for j in range(0, 250, 3)]  # 840 ranges
    for n in nets:
        assert adm.close_client(n, None) == 0  # deferred to one walk
    assert adm.close_client("10.1.0.0/16", frozenset({"web"})) == 0
    assert not any(c.closed for c in conns)
    await asyncio.sleep(0)
    banned = [ipaddress.ip_network(n) for n in nets]
    for c in conns:
        addr = ipaddress.ip_address(c.peer.ip)
        want = any(addr in n for n in banned) or (addr in ipaddress.ip_network("10.1.0.0/16")
                                                    and c.listener.name == "web")
        assert c.closed == (["banned"] if want else []), c  # once, even when two networks cover it
    assert adm.close_in_networks() == 0  # nothing left pending
