"""Scenario 04 end to end: real prosody (Debian, mod_log_auth) + real XMPP client (slixmpp) + edgeward.

Failed logins are made directly against prosody from distinct loopback addresses, so prosody's log
names each client's own address (the issue's "for now": BOSH with X-Forwarded-For and transparent
c2s through the edge will extend this test). The edge follows prosody's log with the shipped
prosody-auth filter and must refuse the attacker on every protected port, close its established
sessions, never ban the ignoreip address, leave others alone, lift the ban at once on
`edgeward unban`, and keep it across kill -9.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, cast

from scenarios.prosody_peer import BanTimer, Prosody, prosody, wait_for, xmpp_login
from support import EDGEWARD, EdgeProcess, ThreadServer, echo_handler, free_port

ATTACKER = "127.0.0.2"
BYSTANDER = "127.0.0.3"
ALICE_SRC = "127.0.0.4"
TRUSTED = "127.0.0.50"  # the jail's ignoreip
JID, PASSWORD = "alice@example.org", "secret"


def edge_config(xmpp_port: int, echo_port: int, c2s_port: int, echo_up: int, prosody_log: Path) -> str:
    return f"""
[services.xmpp]
listen = ["127.0.0.1:{xmpp_port}"]
to = "127.0.0.1:{c2s_port}"

[services.echo]                 # a second protected service: the ban covers every listener
listen = ["127.0.0.1:{echo_port}"]
to = "127.0.0.1:{echo_up}"

[jails.prosody]
logpath = ["{prosody_log}"]
filter = "prosody-auth"
maxretry = 3
findtime = "5m"
bantime = -1
ignoreip = ["{TRUSTED}"]
"""


def connect_from(src: str, port: int, timeout: float = 3.0) -> socket.socket:
    c = socket.socket()
    c.bind((src, 0))
    c.settimeout(timeout)
    c.connect(("127.0.0.1", port))
    return c


def echoed(src: str, port: int) -> bool:
    """True if a new connection from `src` gets its bytes echoed through the edge; False if the
    edge closed it (a banned address is accepted by the kernel and closed at admit)."""
    try:
        with connect_from(src, port) as c:
            c.sendall(b"ping")
            return c.recv(4) == b"ping"
    except OSError:
        return False


def xmpp_features(src: str, port: int) -> bool:
    """True if prosody's stream features come back through the edge for a new stream from `src`."""
    try:
        with connect_from(src, port) as c:
            return b"</stream:features>" in open_stream(c)
    except OSError:
        return False


def open_stream(c: socket.socket) -> bytes:
    c.sendall(b"<?xml version='1.0'?><stream:stream to='example.org' version='1.0' "
              b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
    buf = b""
    while b"</stream:features>" not in buf:
        d = c.recv(4096)
        if not d:
            break
        buf += d
    return buf


def closed_by_peer(c: socket.socket, timeout: float = 3.0) -> bool:
    """True if the peer closes `c` (EOF or reset) within `timeout`; data before the close is skipped."""
    c.settimeout(timeout)
    try:
        while c.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True  # reset


def guard_jail(edge: EdgeProcess) -> dict[str, Any]:
    """The one jail's live state from the admin API (failures per address, counters, bans)."""
    code, data = edge.api("GET", "/guard")
    assert code == 200 and isinstance(data, dict), data
    (jail,) = data["jails"]
    return cast(dict[str, Any], jail)


def current_bans(edge: EdgeProcess) -> list[dict[str, Any]]:
    code, data = edge.api("GET", "/bans")
    assert code == 200 and isinstance(data, list), data
    return data


def fail_login(peer: Prosody, src: str) -> None:
    """One failed SASL PLAIN login of alice from `src` straight to prosody; its log line names `src`."""
    before = peer.failed_logins(src)
    assert xmpp_login(src, peer.c2s_port, JID, "wrong-" + src) is False
    assert peer.failed_logins(src) == before + 1


def test_prosody_failed_logins_ban_at_the_edge(tmp_path: Path) -> None:
    t0 = time.monotonic()
    c2s_port, xmpp_port, echo_port = free_port(), free_port(), free_port()
    with contextlib.ExitStack() as stack:
        peer = stack.enter_context(prosody(tmp_path, c2s_port, {"alice": PASSWORD}))
        echo_up = ThreadServer(echo_handler())
        stack.callback(echo_up.close)
        config = edge_config(xmpp_port, echo_port, c2s_port, echo_up.port, peer.log)
        edge = EdgeProcess(tmp_path, config, wait=[("127.0.0.1", xmpp_port), ("127.0.0.1", echo_port)])
        # Through a lambda: `edge` is replaced by the restarted edge below and that one must be stopped.
        stack.callback(lambda: edge.stop())
        admin = ["--admin", f"127.0.0.1:{edge.admin_port}"]

        # Before any failure everyone gets through, and a real login through the edge works.
        assert xmpp_login(ALICE_SRC, xmpp_port, JID, PASSWORD) is True
        assert echoed(ATTACKER, echo_port) and xmpp_features(ATTACKER, xmpp_port)

        # Established sessions opened before the failures: the attacker's XMPP stream and echo
        # connection through the edge (to be closed by the ban), a bystander's (to survive it).
        att_stream = stack.enter_context(connect_from(ATTACKER, xmpp_port))
        assert b"</stream:features>" in open_stream(att_stream)
        att_echo = stack.enter_context(connect_from(ATTACKER, echo_port))
        att_echo.sendall(b"hi")
        assert att_echo.recv(2) == b"hi"
        by_echo = stack.enter_context(connect_from(BYSTANDER, echo_port))

        # The trusted address fails more often than maxretry: counted as ignored, never banned.
        for _ in range(4):
            fail_login(peer, TRUSTED)
        # Two failures of the attacker: below maxretry, still served.
        for _ in range(2):
            fail_login(peer, ATTACKER)
        assert wait_for(lambda: guard_jail(edge)["failures"] == {ATTACKER: 2}
                        and guard_jail(edge)["counters"]["ignored"] == 4, 5), guard_jail(edge)
        assert echoed(ATTACKER, echo_port) and xmpp_features(ATTACKER, xmpp_port)

        # The third failure bans; time it from the line in prosody's log to the edge refusing.
        timer = BanTimer(peer, ATTACKER, 3, lambda: not echoed(ATTACKER, echo_port))
        timer.start()
        fail_login(peer, ATTACKER)
        timer.join(20)
        latency_ms = timer.latency_ms()
        assert latency_ms is not None, "attacker was never refused"
        print(f"\nscenario 04: prosody log line -> edge refuses {ATTACKER}: {latency_ms:.1f} ms "
              f"({timer.probes} probes)")

        # Refused on every protected port, by a raw stream and by the real client library.
        assert not echoed(ATTACKER, echo_port)
        assert not xmpp_features(ATTACKER, xmpp_port)
        assert xmpp_login(ATTACKER, xmpp_port, JID, PASSWORD) is None
        # Its established sessions were closed when the ban started.
        assert closed_by_peer(att_stream), "attacker's XMPP stream through the edge stayed open"
        assert closed_by_peer(att_echo), "attacker's echo session stayed open"
        # The bystander's session lives on, and new connections of others are served.
        by_echo.sendall(b"still")
        assert by_echo.recv(5) == b"still"
        assert echoed(BYSTANDER, echo_port) and xmpp_features(BYSTANDER, xmpp_port)
        assert echoed(TRUSTED, echo_port) and xmpp_features(TRUSTED, xmpp_port)
        assert xmpp_login(ALICE_SRC, xmpp_port, JID, PASSWORD) is True

        bans = current_bans(edge)
        assert [(b["address"], b["jail"], b["end"]) for b in bans] == [(ATTACKER, "prosody", None)]
        assert f"from IP: {ATTACKER}" in str(bans)  # the reason keeps prosody's lines
        assert guard_jail(edge)["counters"]["refused"] >= 1
        r = subprocess.run([*EDGEWARD, "status", "prosody", *admin], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0 and ATTACKER in r.stdout and TRUSTED not in r.stdout, r.stdout + r.stderr

        # kill -9, restart: the ban holds from the very first connection of the attacker.
        edge.signal(signal.SIGKILL)
        edge.proc.wait(5)
        edge.stop()
        edge = EdgeProcess(tmp_path, config, wait=[("127.0.0.1", xmpp_port), ("127.0.0.1", echo_port)])
        admin = ["--admin", f"127.0.0.1:{edge.admin_port}"]
        assert not xmpp_features(ATTACKER, xmpp_port)
        assert not echoed(ATTACKER, echo_port)
        assert echoed(BYSTANDER, echo_port)
        # prosody's old lines are not counted again (the log position was kept).
        assert guard_jail(edge)["failures"] == {}

        # `edgeward unban` lifts it at once, on every port; the attacker's address can log in again.
        r = subprocess.run([*EDGEWARD, "unban", ATTACKER, *admin], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stdout + r.stderr
        assert echoed(ATTACKER, echo_port) and xmpp_features(ATTACKER, xmpp_port)
        assert xmpp_login(ATTACKER, xmpp_port, JID, PASSWORD) is True
        assert current_bans(edge) == []
    print(f"scenario 04 took {time.monotonic() - t0:.1f} s")
