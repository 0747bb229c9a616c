"""Scenario 04 over HTTP: real prosody (Debian, mod_bosh, mod_log_auth) behind the edge's HTTP proxy.

The edge terminates TLS for chat.test with a trustme certificate (and serves the same name on a
plain HTTP port) and proxies its `/http-bind` path to prosody's BOSH endpoint; prosody trusts the
edge (127.0.0.1) for X-Forwarded-For, so mod_log_auth logs each client's own loopback address,
not the edge's. A small BOSH client (XEP-0124/0206: session creation, SASL PLAIN, restart, bind)
makes the logins. The prosody-auth jail follows prosody's log: the attacker's third failed BOSH
login bans it at the edge (its TLS connections reset, its open keep-alive connection closed, the
relayed c2s port closed to it too), while a bystander's open BOSH session, alice's new logins
over HTTPS and over the relayed c2s port, and the jail's ignoreip address keep working. Forged
forwarding headers from the attacker never put someone else's address in prosody's log.
`edgeward unban` lets the attacker's address back in.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import trustme

from scenarios.prosody_peer import (
    BanTimer,
    BoshClient,
    Prosody,
    bosh_login,
    prosody,
    wait_for,
    xmpp_login,
)
from support import EDGEWARD, EdgeProcess, free_port, write_cert

ATTACKER = "127.0.0.2"
BYSTANDER = "127.0.0.3"
ALICE_SRC = "127.0.0.4"
TRUSTED = "127.0.0.50"  # the jail's ignoreip
# Not 127.0.0.1: that is the edge's own address towards prosody, which prosody trusts as a proxy.
WEB = "chat.test"  # the web name the edge terminates; the XMPP domain is prosody's example.org
JID, PASSWORD = "alice@example.org", "secret"
# What a client may send to pass for someone else. The edge drops these and sets its own (the
# header-level check is tests/integration/test_http_edge.py); here the end-to-end property: the
# address prosody logs, and the jail bans, is the client's own whatever it sends. (Prosody takes
# the last address that is not a trusted proxy, so a proxy that appended would pass this too.)
FORGED = {"X-Forwarded-For": BYSTANDER, "X-Real-IP": BYSTANDER, "Forwarded": f"for={BYSTANDER}"}


def edge_config(tmp: Path, https_port: int, http_port: int, xmpp_port: int, peer: Prosody) -> str:
    return f"""
[tls]
certificates = [{{ cert = "{tmp / 'edge.pem'}", key = "{tmp / 'edge.key'}" }}]

[http]
redirect = "off"                # the test's plain port serves BOSH itself; nothing binds port 80

[services.bosh]
listen = ["127.0.0.1:{https_port}", "127.0.0.1:{http_port}"]
names = ["{WEB}"]
paths = ["/http-bind"]
to = "http://127.0.0.1:{peer.http_port}"

[services.xmpp]                 # plain c2s relayed to the same prosody: the ban covers it too
listen = ["127.0.0.1:{xmpp_port}"]
to = "127.0.0.1:{peer.c2s_port}"

[jails.prosody]
logpath = ["{peer.log}"]
filter = "prosody-auth"
maxretry = 3
findtime = "5m"
bantime = -1
ignoreip = ["{TRUSTED}"]
"""


def tls_handshake(src: str, port: int, ca: Path) -> str | None:
    """A TLS handshake with the edge from `src` for the web name: None if it completes, else the
    name of the error (ConnectionResetError when the edge resets the connection)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.socket() as s:
            s.bind((src, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            with ctx.wrap_socket(s, server_hostname=WEB):
                return None
    except OSError as e:
        return type(e).__name__


def closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    """True if the edge closes `s` (EOF, reset, or a TLS error from either) within `timeout`."""
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def guard_jail(edge: EdgeProcess) -> dict[str, Any]:
    code, data = edge.api("GET", "/guard")
    assert code == 200 and isinstance(data, dict), data
    (jail,) = data["jails"]
    return cast(dict[str, Any], jail)


def current_bans(edge: EdgeProcess) -> list[dict[str, Any]]:
    code, data = edge.api("GET", "/bans")
    assert code == 200 and isinstance(data, list), data
    return data


def test_failed_bosh_logins_through_the_edge_ban_the_client(tmp_path: Path) -> None:
    t0 = time.monotonic()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    write_cert(ca, tmp_path, "edge", WEB)
    (tmp_path / "edge.key").chmod(0o600)
    ca_file = tmp_path / "ca.pem"
    c2s_port, bosh_port = free_port(), free_port()
    https_port, http_port, xmpp_port = free_port(), free_port(), free_port()

    def https_login(src: str, password: str, **kw: Any) -> bool | None:
        return bosh_login(src, https_port, WEB, JID, password, ca=ca_file, **kw)

    def fail_https(src: str, *, banning: bool = False) -> None:
        """One failed BOSH login of alice from `src` over HTTPS, with forged forwarding headers;
        prosody's log names `src` (from the edge's X-Forwarded-For) and nobody else. The login
        that gets `src` banned may not see its <failure/>: prosody logs the failure before
        answering, and the ban closes the client's connections, that one included."""
        before = peer.failed_logins(src)
        outcome = https_login(src, "wrong-" + src, headers=FORGED)
        assert outcome is False or (banning and outcome is None), outcome
        assert peer.failed_logins(src) == before + 1

    with contextlib.ExitStack() as stack:
        peer = stack.enter_context(prosody(tmp_path, c2s_port, {"alice": PASSWORD}, http_port=bosh_port))
        edge = EdgeProcess(tmp_path, edge_config(tmp_path, https_port, http_port, xmpp_port, peer),
                           wait=[("127.0.0.1", p) for p in (https_port, http_port, xmpp_port)])
        stack.callback(edge.stop)
        admin = ["--admin", f"127.0.0.1:{edge.admin_port}"]

        # Before any failure: alice logs in over HTTPS, over plain HTTP and over the relayed c2s.
        assert https_login(ALICE_SRC, PASSWORD) is True
        assert bosh_login(ALICE_SRC, http_port, WEB, JID, PASSWORD) is True
        assert xmpp_login(ALICE_SRC, xmpp_port, JID, PASSWORD) is True

        # Sessions opened before the failures, each on its keep-alive HTTPS connection: the
        # attacker's (to be closed by the ban) and a bystander's, logged in (to survive it).
        att = stack.enter_context(BoshClient(ATTACKER, https_port, WEB, "example.org", ca=ca_file))
        att.open()
        by = stack.enter_context(BoshClient(BYSTANDER, https_port, WEB, "example.org", ca=ca_file))
        by.open()
        assert by.authenticate("alice", PASSWORD) and by.bind().startswith(JID + "/")

        # The trusted address fails more often than maxretry (over plain HTTP): ignored, never banned.
        for _ in range(4):
            before = peer.failed_logins(TRUSTED)
            assert bosh_login(TRUSTED, http_port, WEB, JID, "wrong") is False
            assert peer.failed_logins(TRUSTED) == before + 1
        # Two failures of the attacker: below maxretry, still served.
        for _ in range(2):
            fail_https(ATTACKER)
        assert wait_for(lambda: guard_jail(edge)["failures"] == {ATTACKER: 2}
                        and guard_jail(edge)["counters"]["ignored"] == 4, 5), guard_jail(edge)
        assert tls_handshake(ATTACKER, https_port, ca_file) is None

        # The third failure bans; time it from the line in prosody's log to the edge refusing a
        # new TLS connection of the attacker.
        timer = BanTimer(peer, ATTACKER, 3, lambda: tls_handshake(ATTACKER, https_port, ca_file) is not None)
        timer.start()
        fail_https(ATTACKER, banning=True)
        timer.join(20)
        latency = timer.latency_ms()
        assert latency is not None, "attacker was never refused"
        print(f"\nscenario 04 over HTTP: prosody log line -> edge refuses {ATTACKER}: {latency:.1f} ms "
              f"({timer.probes} probes)")

        # The forged headers changed nothing: every failure prosody logged is the attacker's own address.
        assert peer.failed_logins(ATTACKER) == 3 and peer.failed_logins(BYSTANDER) == 0

        # Refused everywhere: TLS reset, BOSH over HTTPS and plain HTTP, the relayed c2s port.
        assert tls_handshake(ATTACKER, https_port, ca_file) == "ConnectionResetError"
        assert https_login(ATTACKER, PASSWORD) is None
        assert bosh_login(ATTACKER, http_port, WEB, JID, PASSWORD) is None
        assert xmpp_login(ATTACKER, xmpp_port, JID, PASSWORD) is None
        # Its keep-alive connection was closed when the ban started.
        assert att.conn.sock is not None and closed_by_peer(att.conn.sock), \
            "attacker's HTTPS connection stayed open"

        # The bystander's session goes on over the same connection; new clients are served.
        assert by.ping() and by.conn.connects == 1
        by.terminate()
        assert https_login(ALICE_SRC, PASSWORD) is True
        assert https_login(BYSTANDER, PASSWORD) is True
        assert bosh_login(TRUSTED, http_port, WEB, JID, PASSWORD) is True
        assert xmpp_login(BYSTANDER, xmpp_port, JID, PASSWORD) is True

        bans = current_bans(edge)
        assert [(b["address"], b["jail"], b["end"]) for b in bans] == [(ATTACKER, "prosody", None)]
        assert f"from IP: {ATTACKER}" in str(bans)  # the reason keeps prosody's lines
        assert guard_jail(edge)["counters"]["refused"] >= 1
        r = subprocess.run([*EDGEWARD, "status", "prosody", *admin], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0 and ATTACKER in r.stdout and TRUSTED not in r.stdout, r.stdout + r.stderr

        # `edgeward unban` lifts it at once: the attacker's address can log in again.
        r = subprocess.run([*EDGEWARD, "unban", ATTACKER, *admin], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stdout + r.stderr
        assert current_bans(edge) == []
        assert tls_handshake(ATTACKER, https_port, ca_file) is None
        assert https_login(ATTACKER, PASSWORD) is True
        assert xmpp_login(ATTACKER, xmpp_port, JID, PASSWORD) is True
    print(f"scenario 04 over HTTP took {time.monotonic() - t0:.1f} s")
