"""The guard inside the running edge: log line → ban → refused at admit, established closed,
ignoreip never banned, unban at once, bans survive kill -9, edge-observed failures ban too."""

import signal
import subprocess
import time
from pathlib import Path

from support import (
    EDGEWARD,
    EdgeProcess,
    ThreadServer,
    connect_from,
    echo_handler,
    free_port,
    served,
    wait_until,
)


def config(tmp: Path, p1: int, p2: int, up: int, log: Path) -> str:
    return f"""
[services.chat]
listen = ["127.0.0.1:{p1}"]
to = "127.0.0.1:{up}"
[services.web]
listen = ["127.0.0.1:{p2}"]
to = "127.0.0.1:{up}"

[jails.app-auth]
logpath = ["{log}"]
failregex = ["Failed authentication attempt .* from IP: <HOST>$"]
maxretry = 3
findtime = "5m"
bantime = -1
ignoreip = ["127.0.0.50"]
"""


def test_log_failures_ban_at_the_edge_and_persist(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    p1, p2 = free_port(), free_port()
    log = tmp_path / "app.log"
    log.write_text("")
    edge = EdgeProcess(tmp_path, config(tmp_path, p1, p2, up.port, log), wait=[("127.0.0.1", p1)])
    try:
        attacker, friend, bystander = "127.0.0.66", "127.0.0.50", "127.0.0.77"
        established = connect_from(attacker, p2)
        established.sendall(b"hi")
        assert established.recv(2) == b"hi"
        with log.open("a") as f:
            for who in (attacker, friend):
                for _ in range(4):
                    f.write(f"{time.strftime('%b %d %H:%M:%S')} c2s1 info Failed authentication attempt (not-authorized) for user x from IP: {who}\n")
            f.flush()
        assert wait_until(lambda: not served(attacker, p1)), "attacker not banned"
        # Refused at admit on every protected port (the probe above may instead have been
        # closed mid-connection when the ban landed).
        assert not served(attacker, p1)
        assert not served(attacker, p2)
        # The established session of the attacker was closed by the ban.
        try:
            assert established.recv(10) == b""
        except OSError:
            pass
        established.close()
        assert served(friend, p1)  # ignoreip
        assert served(bystander, p1)
        bans = edge.api("GET", "/bans")[1]
        assert [b["address"] for b in bans] == [attacker]  # type: ignore[union-attr, index]
        assert "Failed authentication" in str(bans)
        newest = edge.api("GET", "/bans?newest=5")[1]  # what the dashboard and `top` read
        assert newest["total"] == 1 and [b["address"] for b in newest["bans"]] == [attacker]  # type: ignore[index]
        assert edge.api("GET", "/bans?newest=lots")[0] == 400
        assert edge.counter("refused", f"127.0.0.1:{p1}", "banned") >= 1
        # kill -9 and restart: the ban is still there before the first connection.
        edge.proc.send_signal(signal.SIGKILL)
        edge.proc.wait(5)
        edge.stop()
        edge = EdgeProcess(tmp_path, config(tmp_path, p1, p2, up.port, log), wait=[("127.0.0.1", p1)])
        assert not served(attacker, p1)
        # Old log lines are not counted again after the restart (the position was kept).
        (jail,) = edge.api("GET", "/guard")[1]["jails"]  # type: ignore[index]
        assert jail["counters"]["lines"] == 0 and jail["failures"] == {}
        r = subprocess.run([*EDGEWARD, "unban", attacker, "--admin", f"127.0.0.1:{edge.admin_port}"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert served(attacker, p1)
        r = subprocess.run([*EDGEWARD, "bans", "--admin", f"127.0.0.1:{edge.admin_port}", "--json"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == "[]"
    finally:
        edge.stop()
        up.close()


def test_manual_ban_and_edge_observed_failures(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    port, tls_port = free_port(), free_port()
    edge = EdgeProcess(tmp_path, f"""
[services.fwd]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
[services.tls]
listen = ["127.0.0.1:{tls_port}"]
names = ["a.example.org"]
to = "127.0.0.1:{up.port}"

[jails.garbage]
sources = ["edge:proto"]
maxretry = 2
findtime = "1m"
bantime = "1h"
""", wait=[("127.0.0.1", port)])
    try:
        r = subprocess.run([*EDGEWARD, "ban", "manual", "127.0.0.40", "--admin", f"127.0.0.1:{edge.admin_port}"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not served("127.0.0.40", port)
        # Two malformed ClientHellos → banned by the edge's own observation.
        for _ in range(2):
            with connect_from("127.0.0.41", tls_port) as c:
                c.sendall(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # a handshake that is no ClientHello
                try:
                    c.recv(10)
                except OSError:
                    pass
        assert wait_until(lambda: not served("127.0.0.41", port))
        st = edge.status()
        (jail,) = st["guard"]["jails"]  # type: ignore[index]
        assert jail["name"] == "garbage" and jail["counters"]["bans"] == 1
    finally:
        edge.stop()
        up.close()


def maps_sqlite(pid: int) -> bool:
    return "libsqlite3" in Path(f"/proc/{pid}/maps").read_text()


def test_sqlite_is_loaded_by_the_first_ban_and_the_ban_outlives_a_restart(tmp_path: Path) -> None:
    """An edge that never banned anything has no ban store yet: SQLite is not loaded (memory on a
    small VPS) until a ban is written, and that ban is restored at the next start."""
    up = ThreadServer(echo_handler())
    port = free_port()
    cfg = f'[services.fwd]\nlisten = ["127.0.0.1:{port}"]\nto = "127.0.0.1:{up.port}"\n'
    edge = EdgeProcess(tmp_path, cfg, wait=[("127.0.0.1", port)])
    try:
        assert edge.api("GET", "/bans")[0] == 200
        assert not maps_sqlite(edge.proc.pid)
        assert served("127.0.0.50", port)
        assert edge.api("POST", "/ban", {"jail": "manual", "addr": "127.0.0.50"})[0] == 200
        assert maps_sqlite(edge.proc.pid) and not served("127.0.0.50", port)
    finally:
        edge.stop()
    edge = EdgeProcess(tmp_path, cfg, wait=[("127.0.0.1", port)])
    try:
        assert not served("127.0.0.50", port) and served("127.0.0.51", port)
    finally:
        edge.stop()
        up.close()
