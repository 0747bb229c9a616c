"""The Lua scripts of guard/share.py against a real redis-server, checked against the rule they
implement: for each address and jail the ban that started last is kept, an unban at T deletes
what started at or before T and refuses such bans later, a change is published when it changed
something, pruning drops ended bans and old unbans."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward.config.schema import ShareSettings
from edgeward.guard.share import _LIFT, _PRUNE, _PUT, BanShare, decode_ban, field_of
from edgeward.guard.store import BanRecord
from redis_peer import RedisServer

pytestmark = pytest.mark.peer("redis-server")

NOW = 2_000_000.0


class _NoGuard:
    def held(self) -> list[BanRecord]:
        return []

    async def lifted_since(self, since: float) -> dict[tuple[str, str], float]:
        return {}

    async def apply_remote_ban(self, rec: BanRecord) -> bool:
        return False

    async def apply_remote_unban(self, address: str, jail: str, at: float) -> bool:
        return False


def subscribed(c: redis.Redis, channel: str) -> redis.client.PubSub:
    """A subscription whose confirmation has been read: what comes next is messages."""
    p = c.pubsub()
    p.subscribe(channel)
    msg = p.get_message(timeout=5)
    assert msg is not None and msg["type"] == "subscribe", msg
    return p


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    r = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield r
    finally:
        r.stop()


KEYS = st.sampled_from([("192.0.2.1", "sshd"), ("192.0.2.1", "manual"), ("2001:db8::1", "sshd")])
TIMES = st.integers(0, 30).map(lambda t: NOW - 30 + t)
OPS = st.lists(st.one_of(
    st.tuples(st.just("ban"), KEYS, TIMES, st.none() | st.integers(1, 60), st.sampled_from(["a", "b"])),
    st.tuples(st.just("unban"), KEYS, TIMES),
), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS)
def test_the_scripts_keep_what_the_rule_says(server: RedisServer, ops: list[tuple[object, ...]]) -> None:
    c = redis.Redis(port=server.port)
    try:
        c.flushall()
        share = BanShare(ShareSettings(redis=server.url, node="n"), _NoGuard())
        put, lift, prune = c.register_script(_PUT), c.register_script(_LIFT), c.register_script(_PRUNE)
        p = subscribed(c, share.channel)
        bans: dict[tuple[str, str], BanRecord] = {}
        unbans: dict[tuple[str, str], float] = {}
        published = 0
        for op in ops:
            if op[0] == "ban":
                _, key, start, length, origin = op
                assert isinstance(key, tuple) and isinstance(start, float)
                rec = BanRecord(key[0], key[1], "r", (), start, None if length is None else start + float(length),
                                origin=str(origin))
                applied = put(keys=share.keys, args=share._put_args(rec))
                ok = unbans.get(key, -math.inf) < start and (key not in bans or bans[key].start <= start)
                if ok and bans.get(key) != rec:
                    assert applied == 1
                    bans[key] = rec
                    published += 1
                else:
                    assert applied in (0, 2)
            else:
                _, key, at = op
                assert isinstance(key, tuple) and isinstance(at, float)
                deleted = lift(keys=share.keys, args=share._lift_args(key, at))
                newer = unbans.get(key, -math.inf) < at
                unbans[key] = max(at, unbans.get(key, -math.inf))
                gone = key in bans and bans[key].start <= at
                if gone:
                    del bans[key]
                assert deleted == (1 if gone else 0)
                published += 1 if (newer or gone) else 0
        raw = c.hgetall(share.keys[0])
        held = {tuple(f.decode().split("|", 1)): decode_ban(v, "someone") for f, v in raw.items()}
        assert held == bans
        assert {tuple(f.decode().split("|", 1)): float(v) for f, v in c.hgetall(share.keys[2]).items()} == unbans
        c.publish(share.channel, "end")  # after every message the scripts published
        got = 0
        while (msg := p.get_message(timeout=5)) is not None and msg["data"] != b"end":
            got += 1
        assert msg is not None
        assert got == published
        # Pruning at NOW drops the ended bans and (with retention 5 s) unbans older than NOW - 5.
        prune(keys=share.keys, args=[NOW, NOW - 5])
        live = {k for k, b in bans.items() if b.end is None or b.end > NOW}
        assert {tuple(f.decode().split("|", 1)) for f in c.hkeys(share.keys[0])} == live
        assert {tuple(f.decode().split("|", 1)) for f in c.hkeys(share.keys[2])} == {
            k for k, at in unbans.items() if at >= NOW - 5}
        p.close()
    finally:
        c.close()


def test_a_message_carries_the_ban_and_who_sent_it(server: RedisServer) -> None:
    c = redis.Redis(port=server.port)
    try:
        c.flushall()
        share = BanShare(ShareSettings(redis=server.url, node="n1"), _NoGuard())
        p = subscribed(c, share.channel)
        rec = BanRecord("192.0.2.7", "sshd", "5 failures", ("line",), NOW, None)
        assert c.register_script(_PUT)(keys=share.keys, args=share._put_args(rec)) == 1
        msg = p.get_message(timeout=2)
        assert msg is not None
        doc = json.loads(msg["data"])
        assert doc["op"] == "ban" and doc["by"] == share.instance and doc["by"].startswith("n1#")
        assert decode_ban(doc["ban"], "n2") == BanRecord("192.0.2.7", "sshd", "5 failures", ("line",), NOW, None,
                                                         origin="n1")
        assert c.hget(share.keys[0], field_of("192.0.2.7", "sshd")) is not None
        p.close()
    finally:
        c.close()
