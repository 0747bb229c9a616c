"""The master ↔ worker channel (workers.py) and the merge of the workers' status, without processes."""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeward.config.loader import loads
from edgeward.status import merge_reports
from edgeward.workers import Channel, worker_count


def test_messages_larger_than_a_packet_and_sockets_arrive_whole_and_in_order() -> None:
    async def run() -> tuple[list[list[Any]], list[int], bool]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        got: list[list[Any]] = []
        fds: list[int] = []
        closed = asyncio.Event()

        def on_message(msg: list[Any], socks: list[socket.socket]) -> None:
            got.append(msg)
            for s in socks:
                fds.append(s.fileno())
                s.close()

        sender = Channel(a, loop, lambda m, s: None, lambda: None)
        receiver = Channel(b, loop, on_message, closed.set)
        sender.start()
        receiver.start()
        big = ["status", 1, {"addresses": [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(40_000)]}]
        passed = socket.socket()
        sender.send(big)  # about 600 KB: more than the socket's buffer, queued and written as it drains
        sender.send(["listeners", [["tcp", "127.0.0.1", 1]]], [passed.fileno()])
        sender.send(["ban", "192.0.2.1", None, 0.0])
        while len(got) < 3:
            await asyncio.sleep(0.01)
        passed.close()
        sender.close()
        await asyncio.wait_for(closed.wait(), 5)  # the other end's close is seen
        return got, fds, receiver.closed

    got, fds, receiver_closed = asyncio.run(run())
    assert [m[0] for m in got] == ["status", "listeners", "ban"]
    assert len(got[0][2]["addresses"]) == 40_000 and got[0][2]["addresses"][-1] == "10.0.156.63"
    assert len(fds) == 1
    assert receiver_closed


def test_a_malformed_message_is_logged_and_the_channel_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> list[list[Any]]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        got: list[list[Any]] = []
        receiver = Channel(b, loop, lambda m, s: got.append(m), lambda: None)
        receiver.start()
        a.send(b".{not json")
        a.send(b'.["ok"]')
        while not got:
            await asyncio.sleep(0.01)
        a.close()
        receiver.close()
        return got

    assert asyncio.run(run()) == [["ok"]]
    assert "message" in caplog.text


def test_workers_auto_is_the_cpus_this_process_may_use() -> None:
    assert worker_count(loads("[edge]\nworkers = 3\n")) == 3
    assert worker_count(loads("")) == 1
    assert worker_count(loads('[edge]\nworkers = "auto"\n')) == len(os.sched_getaffinity(0))
    with pytest.raises(Exception, match="between 1 and 256"):
        loads("[edge]\nworkers = 0\n")


def _report(addresses: list[str], total: int, refused: int, active: int) -> dict[str, Any]:
    return {
        "connections": active, "udp_sessions": 0, "in_rate": 1.0, "out_rate": 2.0, "clients": len(addresses),
        "services": {"web": {"active": active, "total": total, "bytes_in": 10 * total, "bytes_out": 0}},
        "pools": {"p": {"servers": [{"server": "10.0.0.1:80", "active": active, "total": total, "available": True}]}},
        "listeners": [{"address": "127.0.0.1:443", "transport": "tcp", "name": "l", "active": active}],
        "counters": [{"key": ["refused", "l", "banned"], "value": refused},
                     {"key": ["reloads", "applied"], "value": 1}],
        "pipes": {"pooled": 2, "in_use": 0}, "splice": True,
        "addresses": {"all": addresses, "services": {"web": addresses}, "pools": {"p": addresses},
                      "servers": {"p/10.0.0.1:80": addresses}},
    }


def test_merged_status_adds_the_workers_up_and_counts_a_client_once() -> None:
    control = {
        "services": {"web": {"active": 0, "total": 0, "clients": 0, "pool": "p"}},
        "pools": {"p": {"balance": "round-robin", "servers": [{"server": "10.0.0.1:80", "healthy": False,
                                                                "available": False, "active": 0}]}},
        "counters": [{"key": ["reloads", "applied"], "value": 2}, {"key": ["protocol_errors", "l", "x"], "value": 9}],
        "workers": {"count": 2, "restarts": 0, "alive": 2},
    }
    one = _report(["192.0.2.1", "192.0.2.2"], 5, 1, 2)
    two = _report(["192.0.2.2", "192.0.2.3"], 7, 2, 3)
    st = merge_reports(control, [one, two], True)
    assert st["clients"] == 3 and st["connections"] == 5 and st["in_rate"] == 2.0
    web = st["services"]["web"]
    assert web["total"] == 12 and web["bytes_in"] == 120 and web["clients"] == 3 and web["pool"] == "p"
    pool = st["pools"]["p"]
    assert pool["clients"] == 3 and pool["active"] == 5
    assert pool["servers"][0]["healthy"] is False and pool["servers"][0]["total"] == 12  # health: the master's
    assert st["listeners"] == [{"address": "127.0.0.1:443", "transport": "tcp", "name": "l", "active": 5}]
    counters = {tuple(c["key"]): c["value"] for c in st["counters"]}
    # reloads are the master's; every other family the workers' (the master's copy of what they
    # reported to the jails is not counted twice)
    assert counters == {("refused", "l", "banned"): 3, ("reloads", "applied"): 2}
    assert [w["refused"] for w in st["workers"]["processes"]] == [1, 2]
    assert st["pipes"] == {"pooled": 4, "in_use": 0}


def fill(ch: Channel) -> None:
    """Sends until the peer's buffer is full and the channel queues (a worker that is not reading)."""
    for _ in range(100_000):
        if ch._out:
            return
        ch.send(["ban", "198.51.100.1", None, 0.0])
    raise AssertionError("the channel never queued")


def test_a_queued_socket_is_the_one_sent_even_if_its_owner_closed_it() -> None:
    """A socket queued behind a full channel and closed by the master before the queue drains is
    still the one that arrives (not whatever socket got its descriptor number next)."""
    async def run() -> tuple[list[tuple[str, int]], tuple[str, int]]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        got: list[tuple[str, int]] = []

        def on_message(msg: list[Any], socks: list[socket.socket]) -> None:
            for s in socks:
                if msg[0] == "listeners":
                    got.append(s.getsockname())
                s.close()
        sender = Channel(a, loop, lambda m, s: None, lambda: None)
        fill(sender)
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        name = first.getsockname()
        sender.send(["listeners", [["tcp", "127.0.0.1", name[1]]]], [first.fileno()])
        first.close()
        other = socket.socket()  # most likely the number `first` had
        other.bind(("127.0.0.1", 0))
        receiver = Channel(b, loop, on_message, lambda: None)
        receiver.start()
        for _ in range(500):
            if got:
                break
            await asyncio.sleep(0.01)
        sender.close()
        receiver.close()
        other.close()
        return got, name

    got, name = asyncio.run(run())
    assert got == [name]


def test_closing_a_channel_closes_its_queued_copies_of_sockets() -> None:
    async def run() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sender = Channel(a, loop, lambda m, s: None, lambda: None)
        fill(sender)
        before = len(os.listdir("/proc/self/fd"))
        with socket.socket() as s:
            for _ in range(10):
                sender.send(["listeners", [["tcp", "127.0.0.1", 1]]], [s.fileno()])
            queued = len(os.listdir("/proc/self/fd"))
        sender.close()
        b.close()
        return queued - before, len(os.listdir("/proc/self/fd")) - before

    queued, after = asyncio.run(run())
    assert queued == 11  # the socket and the channel's ten copies
    assert after == -2  # the copies closed, and both ends of the channel


def test_a_mirror_of_a_ban_set_follows_a_ban_that_narrows() -> None:
    """The master's ban set and a worker's mirror, wired as master.py and worker.py do: when one
    jail's part is lifted, expires or narrows while another's remains, the mirror narrows too."""
    from edgeward.guard.banset import BanSet
    now = [1000.0]
    master, mirror = BanSet(clock=lambda: now[0]), BanSet(clock=lambda: now[0])
    told: list[tuple[str, frozenset[str] | None]] = []

    def ban(addr: str, listeners: frozenset[str] | None) -> None:
        told.append((addr, listeners))
        mirror.add(addr, jail="master", listeners=None if listeners is None else sorted(listeners))
    master.on_ban(ban)
    master.on_narrow(ban)
    master.on_unban(lambda addr: mirror.remove(addr))
    a = "203.0.113.7"
    master.add(a, jail="sshd", listeners=["ssh"])
    master.add(a, jail="crowdsec", listeners=None)
    assert mirror.is_banned(a, "web")
    master.remove(a, jail="crowdsec")  # lifted: the ssh-only part remains
    assert not master.is_banned(a, "web") and not mirror.is_banned(a, "web") and mirror.is_banned(a, "ssh")
    master.add(a, jail="flood", listeners=["web", "ssh"], until=now[0] + 60)
    assert mirror.is_banned(a, "web")
    now[0] += 61
    master.expire()  # the flood part ends: ssh only again
    assert not mirror.is_banned(a, "web") and mirror.is_banned(a, "ssh")
    master.add(a, jail="sshd", listeners=["ssh", "imap"])
    master.add(a, jail="sshd", listeners=["imap"])  # the same jail, narrower
    assert not mirror.is_banned(a, "ssh") and mirror.is_banned(a, "imap")
    n = len(told)
    master.add(a, jail="sshd", listeners=["imap"])  # nothing changed: nobody told
    assert len(told) == n
    master.remove(a)
    assert a not in mirror


def test_the_queue_for_a_peer_that_does_not_read_is_capped_dropping_only_reports() -> None:
    """A master that does not read (stopped, busy) cannot make a worker queue without limit: over
    the cap, reports are dropped and counted; bans and control messages are still queued, and
    arrive once the peer reads."""
    async def run() -> tuple[int, int, int, list[list[Any]]]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sender = Channel(a, loop, lambda m, s: None, lambda: None, max_queued=1 << 20)
        for i in range(300_000):  # one report per connection of a flood
            sender.send(["report", "conn", "front", f"198.51.{(i >> 8) & 255}.{i & 255}", 40000 + i % 20000])
        peak = sender.queued
        sender.send(["ban", "198.51.100.1", None, 0.0])
        sender.send(["status", 1, {"x": "y" * 100_000}])
        got: list[list[Any]] = []
        receiver = Channel(b, loop, lambda m, s: got.append(m), lambda: None)
        receiver.start()
        for _ in range(1000):
            if got and got[-1][0] == "status":
                break
            await asyncio.sleep(0.01)
        left = sender.queued
        sender.close()
        receiver.close()
        return peak, sender.dropped, left, got

    peak, dropped, left, got = asyncio.run(run())
    assert peak <= (1 << 20) + 200
    assert dropped > 250_000
    assert [m[0] for m in got[-2:]] == ["ban", "status"]
    assert len(got) == 300_000 - dropped + 2
    assert left == 0


def test_the_config_a_master_sends_is_the_config_it_checked(tmp_path: Path) -> None:
    """Workers get the master's Config pickled (workers/settings.py): equal, and never validated
    again, so a worker never imports pydantic."""
    from edgeward.app import load_config
    from edgeward.workers import pack_config, unpack_config
    cfg_path = tmp_path / "edge.toml"
    cfg_path.write_text('[edge]\nworkers = 2\nadmin = "unix:/tmp/x.sock"\n[pools.p]\nservers = ["10.0.0.1:443", '
                        '{address = "10.0.0.2:443", weight = 3}]\n[services.s]\nlisten = ["[::]:443"]\n'
                        'names = ["A.example.org"]\nto = "p"\n')
    cfg = load_config(cfg_path)
    packed = pack_config(cfg)
    assert unpack_config(packed) == cfg and unpack_config(packed).services["s"].names == ["a.example.org"]
    code = ("import sys; from edgeward.workers import unpack_config; "
            f"c = unpack_config({packed!r}); assert c.pools['p'].servers[1].weight == 3, c; "
            "print(sorted(m for m in sys.modules if m.startswith('pydantic')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    with pytest.raises(ValueError, match="not a config"):
        unpack_config(base64.b64encode(pickle.dumps({"edge": {}})).decode())
