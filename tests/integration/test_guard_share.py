"""Bans shared between edge nodes through a real redis-server ([guard.share]).

Each node is an `edgeward run` process with its own state directory, relaying one loopback
port to an echo server; a ban on one node must get the address refused on the others (probed
by connecting from that 127.0.0.x source address). Redis runs without persistence, so a
SIGKILL and restart brings it back empty: the nodes must refill it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from redis_peer import RedisServer, redis_server
from support import (
    EDGEWARD,
    EdgeProcess,
    ThreadServer,
    connect_from,
    echo_handler,
    free_port,
    metric,
    served,
    wait_until,
)

pytestmark = pytest.mark.peer("redis-server")


class Node:
    def __init__(self, tmp: Path, name: str, up: int, share: str, jails: str = "") -> None:
        self.name = name
        self.port = free_port()
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = f"""
[services.echo]
listen = ["127.0.0.1:{self.port}"]
to = "127.0.0.1:{up}"

[guard.share]
node = "{name}"
timeout = "1s"
retry_min = "100ms"
retry_max = "500ms"
{share}
{jails}
"""
        self.edge = EdgeProcess(self.dir, self.config, wait=[("127.0.0.1", self.port)])

    def restart(self) -> None:
        self.edge.stop()
        self.edge = EdgeProcess(self.dir, self.config, admin_port=self.edge.admin_port,
                                wait=[("127.0.0.1", self.port)])

    def serves(self, addr: str) -> bool:
        return served(addr, self.port)

    def ban(self, addr: str, **body: Any) -> dict[str, Any]:
        code, data = self.edge.api("POST", "/ban", {"addr": addr, **body})
        assert code == 200, data
        assert isinstance(data, dict)
        return data

    def unban(self, addr: str, **body: Any) -> None:
        code, data = self.edge.api("POST", "/unban", {"addr": addr, **body})
        assert code == 200, data

    def bans(self) -> list[dict[str, Any]]:
        code, data = self.edge.api("GET", "/bans")
        assert code == 200 and isinstance(data, list), data
        return data

    def share(self) -> dict[str, Any]:
        code, data = self.edge.api("GET", "/guard")
        assert code == 200 and isinstance(data, dict), data
        return data["share"]  # type: ignore[no-any-return]

    def connected(self) -> bool:
        return bool(self.share()["connected"])


@contextlib.contextmanager
def cluster(tmp: Path, redis: RedisServer | None, names: tuple[str, ...] = ("a", "b"),
            share: str | None = None, jails: str = "") -> Iterator[dict[str, Node]]:
    up = ThreadServer(echo_handler())
    share = share if share is not None else f'redis = "{redis.url if redis else ""}"'
    nodes: dict[str, Node] = {}
    try:
        for n in names:
            nodes[n] = Node(tmp, n, up.port, share, jails)
        if redis is not None:
            for n in nodes.values():
                assert wait_until(n.connected, 10), n.edge.log()
        yield nodes
    finally:
        for n in nodes.values():
            n.edge.stop()
        up.close()


def test_a_ban_and_an_unban_on_one_node_hold_on_the_two_others(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis, \
            cluster(tmp_path, redis, ("a", "b", "c")) as nodes:
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        attacker, bystander = "127.0.0.66", "127.0.0.77"
        assert all(n.serves(attacker) for n in nodes.values())
        a.ban(attacker, reason="seen on a")
        assert wait_until(lambda: not b.serves(attacker), 5), b.edge.log()
        assert wait_until(lambda: not c.serves(attacker), 5), c.edge.log()
        assert not a.serves(attacker)
        assert all(n.serves(bystander) for n in nodes.values())
        # Shown on every node with its origin; stored in Redis once.
        for n in (a, b, c):
            [ban] = [x for x in n.bans() if x["address"] == attacker]
            assert ban["origin"] == "a" and ban["reason"] == "seen on a" and ban["forever"]
        stored = json.loads(redis.cli("HGET", "edgeward:bans", f"{attacker}|manual"))
        assert stored["origin"] == "a"
        # The commands show it too: `edgeward bans` with the origin, `edgeward status` the link.
        env = dict(os.environ, COLUMNS="250")
        out = subprocess.run([*EDGEWARD, "bans", "--admin", f"127.0.0.1:{b.edge.admin_port}"], env=env,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        [row] = [ln for ln in out.splitlines() if attacker in ln]
        assert re.search(rf"{re.escape(attacker)}\s*│\s*manual\s*│\s*a\s*│", row), out
        out = subprocess.run([*EDGEWARD, "status", "--admin", f"127.0.0.1:{b.edge.admin_port}"], env=env,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert "shared bans" in out and "connected" in out and redis.url in out, out
        assert re.search(r"│\s*a 1\s*│", out), out  # bans held here, by origin
        assert b.share()["bans_by_origin"] == {"a": 1}
        # An unban on another node lifts it everywhere.
        c.unban(attacker)
        assert wait_until(lambda: all(n.serves(attacker) for n in nodes.values()), 5)
        assert redis.cli("HEXISTS", "edgeward:bans", f"{attacker}|manual").strip() == "0"
        assert not any(x["address"] == attacker for n in nodes.values() for x in n.bans())
        # Nothing echoed back and forth: one ban sent by a, received once by b and c.
        assert a.share()["sent"]["bans"] == 1 and a.share()["received"]["bans"] == 0
        assert b.share()["received"]["bans"] == 1 and c.share()["received"]["unbans"] == 0
        assert a.share()["received"]["unbans"] == 1
        assert all(n.share()["received"]["stale"] == 0 for n in nodes.values())


def test_a_jail_ban_is_shared(tmp_path: Path) -> None:
    """Only a has the jail (and reads the log): b refuses the address from a's ban alone."""
    log = tmp_path / "app.log"
    log.write_text("")
    jails = f"""
[jails.app-auth]
logpath = ["{log}"]
failregex = ["Failed authentication attempt .* from IP: <HOST>$"]
maxretry = 2
findtime = "5m"
bantime = "1h"
"""
    with redis_server(tmp_path / "redis") as redis:
        up = ThreadServer(echo_handler())
        a = Node(tmp_path, "a", up.port, f'redis = "{redis.url}"', jails)
        b = Node(tmp_path, "b", up.port, f'redis = "{redis.url}"')
        try:
            assert wait_until(lambda: a.connected() and b.connected(), 10)
            attacker = "127.0.0.67"
            with log.open("a") as f:
                for _ in range(2):
                    f.write(f"{time.strftime('%b %d %H:%M:%S')} Failed authentication attempt for x from IP: {attacker}\n")
            assert wait_until(lambda: not b.serves(attacker), 5), b.edge.log()
            assert not a.serves(attacker)
            for n in (a, b):
                [ban] = [x for x in n.bans() if x["address"] == attacker]
                assert ban["jail"] == "app-auth" and ban["origin"] == "a"
                assert not ban["forever"] and ban["remaining"] > 3500
                assert ban["lines"] and attacker in ban["lines"][-1]
        finally:
            a.edge.stop()
            b.edge.stop()
            up.close()


def test_redis_killed_and_restarted_nothing_is_lost(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis, cluster(tmp_path, redis, ("a", "b")) as nodes:
        a, b = nodes["a"], nodes["b"]
        before, during_a, during_b, lifted = "127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"
        a.ban(before)
        a.ban(lifted)
        assert wait_until(lambda: not b.serves(before) and not b.serves(lifted), 5)
        redis.kill()  # no persistence: it comes back empty
        assert wait_until(lambda: not a.connected() and not b.connected(), 10)
        # While Redis is away each node keeps its bans and keeps banning (and unbanning) locally.
        a.ban(during_a)
        b.ban(during_b)
        a.unban(lifted)
        assert not a.serves(during_a) and b.serves(during_a)
        assert not b.serves(during_b) and a.serves(during_b)
        assert not a.serves(before) and not b.serves(before)
        assert a.serves(lifted) and not b.serves(lifted)
        assert a.share()["failures"] >= 1 and a.share()["last_error"]
        text = a.edge.metrics()  # what an alert on "bans are no longer shared" reads
        assert metric(text, "edgeward_share_connected") == 0 and metric(text, "edgeward_share_failures_total") >= 1
        assert metric(text, "edgeward_share_sent_total", kind="ban") >= 2
        redis.start()
        assert wait_until(lambda: a.connected() and b.connected(), 10)
        # Both ways: a's ban reaches b, b's reaches a, the old ban holds on both, a's unban reaches b.
        assert wait_until(lambda: not b.serves(during_a) and not a.serves(during_b), 5), b.edge.log()
        assert not a.serves(before) and not b.serves(before)
        assert wait_until(lambda: b.serves(lifted), 5), b.edge.log()
        # Redis was refilled with every ban in force.
        fields = set(redis.cli("HKEYS", "edgeward:bans").split())
        assert fields == {f"{x}|manual" for x in (before, during_a, during_b)}
        assert metric(b.edge.metrics(), "edgeward_share_connected") == 1
        received = b.share()["received"]["bans"]  # by pub/sub (what a merge took is in last_merge)
        assert received >= 2 and metric(b.edge.metrics(), "edgeward_share_received_total", kind="ban") == received


def test_a_late_node_gets_the_current_bans_and_a_restart_without_redis_keeps_them(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis, cluster(tmp_path, redis, ("a",)) as nodes:
        a = nodes["a"]
        for i in range(1, 21):
            a.ban(f"127.0.2.{i}")
        up = ThreadServer(echo_handler())
        late = Node(tmp_path, "late", up.port, f'redis = "{redis.url}"')
        try:
            # Merged before the listener took its first connection.
            assert all(not late.serves(f"127.0.2.{i}") for i in range(1, 21))
            assert late.serves("127.0.2.99")
            assert late.share()["last_merge"]["received"] == 20
            # The peers' bans are in late's own store: a restart with Redis gone still enforces them.
            redis.kill()
            late.restart()
            assert not late.connected()
            assert all(not late.serves(f"127.0.2.{i}") for i in (1, 10, 20))
            assert {x["origin"] for x in late.bans()} == {"a"}
        finally:
            late.edge.stop()
            up.close()


def test_an_expiring_ban_lifts_everywhere_and_a_forever_ban_stays(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis, cluster(tmp_path, redis, ("a", "b")) as nodes:
        a, b = nodes["a"], nodes["b"]
        short, forever = "127.0.3.1", "127.0.3.2"
        a.ban(short, bantime=2)
        b.ban(forever)
        assert wait_until(lambda: not b.serves(short) and not a.serves(forever), 5)
        assert wait_until(lambda: a.serves(short) and b.serves(short), 6)
        assert not a.serves(forever) and not b.serves(forever)
        assert [x["address"] for x in a.bans()] == [forever]
        # A node merging later prunes the ended ban from Redis.
        a.restart()
        assert wait_until(a.connected, 10)
        assert redis.cli("HKEYS", "edgeward:bans").split() == [f"{forever}|manual"]


def test_password_in_url_and_in_a_file(tmp_path: Path) -> None:
    pw = "s3cret-for-tests"
    with redis_server(tmp_path / "redis", password=pw) as redis:
        pwfile = tmp_path / "redis.pass"
        pwfile.write_text(pw + "\n")
        pwfile.chmod(0o600)
        url_with = redis.url.replace("redis://", f"redis://:{pw}@")
        up = ThreadServer(echo_handler())
        a = Node(tmp_path, "a", up.port, f'redis = "{url_with}"')
        b = Node(tmp_path, "b", up.port, f'redis = "{redis.url}"\npassword_file = "{pwfile}"')
        c = Node(tmp_path, "c", up.port, f'redis = "{redis.url}"')  # no password: refused, retries
        try:
            assert wait_until(lambda: a.connected() and b.connected(), 10)
            a.ban("127.0.4.1")
            assert wait_until(lambda: not b.serves("127.0.4.1"), 5)
            assert c.serves("127.0.4.1")
            st = c.share()
            assert not st["connected"] and st["failures"] >= 1
            fds = len(os.listdir(f"/proc/{c.edge.pid}/fd"))
            assert wait_until(lambda: c.share()["failures"] >= st["failures"] + 6, 10)
            # Refused logins leave no descriptor behind (one may be open at the moment of looking).
            assert wait_until(lambda: len(os.listdir(f"/proc/{c.edge.pid}/fd")) <= fds, 3)
            st = c.share()
            assert "auth" in st["last_error"].lower() or "noauth" in st["last_error"].lower(), st
            assert pw not in json.dumps(a.share()) and pw not in a.edge.log()
        finally:
            for n in (a, b, c):
                n.edge.stop()
            up.close()


@pytest.mark.parametrize("client_certs", [False, True])
def test_tls(tmp_path: Path, client_certs: bool) -> None:
    with redis_server(tmp_path / "redis", tls=True, client_certs=client_certs) as redis:
        share = f'redis = "{redis.url}"\nca_file = "{redis.ca_file}"'
        if client_certs:
            share += f'\ncert_file = "{redis.client_cert}"\nkey_file = "{redis.client_key}"'
        with cluster(tmp_path, redis, ("a", "b"), share=share) as nodes:
            nodes["a"].ban("127.0.5.1")
            assert wait_until(lambda: not nodes["b"].serves("127.0.5.1"), 5)
        # Without the CA the server's certificate is refused: not connected, counted, retried.
        up = ThreadServer(echo_handler())
        n = Node(tmp_path, "untrusting", up.port, f'redis = "{redis.url}"')
        try:
            assert wait_until(lambda: n.share()["failures"] >= 2, 10)
            assert not n.connected() and "certificate" in n.share()["last_error"].lower()
        finally:
            n.edge.stop()
            up.close()


def test_unreachable_redis_at_start_the_edge_runs_retries_and_joins_later(tmp_path: Path) -> None:
    port = free_port()
    up = ThreadServer(echo_handler())
    a = Node(tmp_path, "a", up.port, f'redis = "redis://127.0.0.1:{port}/0"')
    try:
        assert a.serves("127.0.6.1")  # started and serving
        a.ban("127.0.6.1")  # and banning, locally
        assert not a.serves("127.0.6.1")
        assert wait_until(lambda: a.share()["failures"] >= 3, 10)  # retries, bounded back-off
        fds = len(os.listdir(f"/proc/{a.edge.pid}/fd"))
        assert wait_until(lambda: a.share()["failures"] >= 10, 10)
        # No descriptor left behind by an attempt (one may be open at the moment of looking).
        assert wait_until(lambda: len(os.listdir(f"/proc/{a.edge.pid}/fd")) <= fds, 3)
        st = a.share()
        assert not st["connected"]
        assert st["retry_in"] is None or st["retry_in"] <= 0.5  # retry_max
        assert "guard.share: Redis at redis://127.0.0.1" in a.edge.log()
        with redis_server(tmp_path / "redis", port=port) as redis:
            assert wait_until(a.connected, 5)
            assert redis.cli("HKEYS", "edgeward:bans").split() == ["127.0.6.1|manual"]
    finally:
        a.edge.stop()
        up.close()


def test_a_unix_socket_url(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis", unix=True) as redis, cluster(tmp_path, redis, ("a", "b")) as nodes:
        nodes["b"].ban("127.0.8.1")
        assert wait_until(lambda: not nodes["a"].serves("127.0.8.1"), 5)
        assert redis.cli("HKEYS", "edgeward:bans").split() == ["127.0.8.1|manual"]


def test_a_node_keeps_its_ignoreip_for_other_nodes_jail_bans(tmp_path: Path) -> None:
    """b's [guard] ignoreip holds against a's jail bans (a's admin bans in jail "manual" hold everywhere)."""
    jail = '[jails.web]\nsources = ["edge:http401"]\nmaxretry = 3\nbantime = "1h"\n'
    with redis_server(tmp_path / "redis") as redis:
        up = ThreadServer(echo_handler())
        a = Node(tmp_path, "a", up.port, f'redis = "{redis.url}"', jail)
        b = Node(tmp_path, "b", up.port, f'redis = "{redis.url}"', '[guard]\nignoreip = ["127.0.9.0/24"]\n')
        try:
            assert wait_until(lambda: a.connected() and b.connected(), 10)
            a.ban("127.0.9.1", jail="web")
            a.ban("127.0.9.2")
            a.ban("127.0.10.1", jail="web")
            assert wait_until(lambda: not b.serves("127.0.10.1") and not b.serves("127.0.9.2"), 5)
            assert b.serves("127.0.9.1") and not a.serves("127.0.9.1")
            assert "127.0.9.1 in jail web from node a not applied: in guard.ignoreip" in b.edge.log()
        finally:
            a.edge.stop()
            b.edge.stop()
            up.close()


def test_garbage_in_redis_is_counted_and_skipped(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis, cluster(tmp_path, redis, ("a", "b")) as nodes:
        a, b = nodes["a"], nodes["b"]
        for junk in ("not json", "[1,2]", '{"op":"ban","by":"x","ban":{"address":"nope"}}',
                     '{"op":"unban","by":"x","address":"127.0.0.1","jail":"j","at":"soon"}', '{"op":"boom"}'):
            redis.cli("PUBLISH", "edgeward:changes", junk)
        redis.cli("HSET", "edgeward:bans", "127.0.11.1|manual", "{broken")
        redis.cli("HSET", "edgeward:unbans", "no-jail", "1")
        redis.cli("HSET", "edgeward:unbans", "127.0.11.2|manual", "inf")  # would refuse every later ban
        assert wait_until(lambda: a.share()["bad"] >= 5 and b.share()["bad"] >= 5, 5)
        b.restart()  # a merge reads the broken hash entries
        assert wait_until(b.connected, 10)
        assert b.share()["bad"] == 3
        a.ban("127.0.11.2")  # still sharing
        assert wait_until(lambda: not b.serves("127.0.11.2"), 5)
        assert b.serves("127.0.11.1")


def test_a_stalled_redis_is_noticed_and_rejoined(tmp_path: Path) -> None:
    """Redis stopped (SIGSTOP: the connection stays open, nothing answers): the keep-alive ping
    notices within its timeout, the node retries, and merges once Redis answers again."""
    with redis_server(tmp_path / "redis") as redis, cluster(tmp_path, redis, ("a", "b")) as nodes:
        a, b = nodes["a"], nodes["b"]
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            a.ban("127.0.12.1")  # returns at once: publishing never holds up a ban
            assert not a.serves("127.0.12.1")
            assert wait_until(lambda: not a.connected() and not b.connected(), 10)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert wait_until(lambda: a.connected() and b.connected(), 10)
        assert wait_until(lambda: not b.serves("127.0.12.1"), 5)


def test_an_acl_user_limited_to_the_prefix(tmp_path: Path) -> None:
    """A Redis ACL user that may touch only edgeward's keys and channel (and not run admin
    commands) is enough: redis://edge@host with the password in password_file."""
    with redis_server(tmp_path / "redis", password="admin-pw") as redis:
        redis.cli("ACL", "SETUSER", "edge", "on", ">edge-pw", "resetkeys", "~edgeward:*", "resetchannels",
                  "&edgeward:*", "+@all", "-@admin", "-@dangerous")
        pwfile = tmp_path / "edge.pass"
        pwfile.write_text("edge-pw\n")
        share = f'redis = "redis://edge@127.0.0.1:{redis.port}/0"\npassword_file = "{pwfile}"'
        with cluster(tmp_path, redis, ("a", "b"), share=share) as nodes:
            nodes["a"].ban("127.0.13.1", bantime=3600)
            assert wait_until(lambda: not nodes["b"].serves("127.0.13.1"), 5)
            nodes["b"].unban("127.0.13.1")
            assert wait_until(lambda: nodes["a"].serves("127.0.13.1"), 5)
            assert nodes["a"].share()["bad"] == 0 and nodes["a"].share()["failures"] == 0


def test_a_ban_from_an_edge_source_is_shared(tmp_path: Path) -> None:
    """a's jail on what a's edge sees itself (edge:proto: malformed ClientHellos) bans on b too."""
    tls_port = free_port()
    with redis_server(tmp_path / "redis") as redis:
        up = ThreadServer(echo_handler())
        extra = f"""
[services.tls]
listen = ["127.0.0.1:{tls_port}"]
names = ["a.example.org"]
to = "127.0.0.1:{up.port}"
[jails.garbage]
sources = ["edge:proto"]
maxretry = 2
findtime = "1m"
bantime = "1h"
"""
        a = Node(tmp_path, "a", up.port, f'redis = "{redis.url}"', extra)
        b = Node(tmp_path, "b", up.port, f'redis = "{redis.url}"')
        try:
            assert wait_until(lambda: a.connected() and b.connected(), 10)
            for _ in range(2):
                with connect_from("127.0.0.41", tls_port) as c:
                    c.sendall(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # a handshake that is no ClientHello
                    with contextlib.suppress(OSError):
                        c.recv(10)
            assert wait_until(lambda: not b.serves("127.0.0.41"), 5), b.edge.log()
            [ban] = b.bans()
            assert (ban["jail"], ban["origin"]) == ("garbage", "a")
        finally:
            a.edge.stop()
            b.edge.stop()
            up.close()
