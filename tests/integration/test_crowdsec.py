"""edgeward as a CrowdSec bouncer against Debian's real crowdsec LAPI (started by the test on a
loopback port with its own config and SQLite data): `cscli decisions add` refuses the source at
the edge within the poll interval, delete lifts it, ranges cover, durations end, a LAPI that is
down keeps the last decisions enforced and a restarted one resumes, a wrong key is a logged and
counted error, and this node's own bans show up in `cscli alerts list`."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from crowdsec_peer import Lapi, lapi
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

pytestmark = pytest.mark.peer("crowdsec")

POLL = 0.3  # update_frequency of these tests, seconds


def config(port: int, up: int, url: str, key: str, extra: str = "") -> str:
    return f"""
[services.app]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up}"

[guard.crowdsec]
lapi_url = "{url}"
api_key = "{key}"
update_frequency = "{int(POLL * 1000)}ms"
max_backoff = "1s"
timeout = "2s"
{extra}
"""


@pytest.fixture
def upstream() -> ThreadServer:
    up = ThreadServer(echo_handler())
    yield up
    up.close()


def refused_within(src: str, port: int, timeout: float) -> float | None:
    """Seconds until `src` is refused at the edge (None: still served after `timeout`)."""
    t0 = time.monotonic()
    if wait_until(lambda: not served(src, port), timeout):
        return time.monotonic() - t0
    return None


def test_decisions_ban_ranges_expire_and_lift(tmp_path: Path, upstream: ThreadServer) -> None:
    with lapi(tmp_path / "lapi") as server:
        key = server.add_bouncer("edge")
        port = free_port()
        edge = EdgeProcess(tmp_path, config(port, upstream.port, server.url, key), wait=[("127.0.0.1", port)])
        try:
            attacker, bystander = "127.0.0.5", "127.0.0.20"
            assert served(attacker, port)
            established = connect_from(attacker, port)
            established.sendall(b"hi")
            assert established.recv(2) == b"hi"

            server.cscli("decisions", "add", "--ip", attacker, "--duration", "1h",
                         "--reason", "crowdsecurity/ssh-bf")
            took = refused_within(attacker, port, 10 * POLL + 5)
            assert took is not None, edge.log()
            print(f"cscli decisions add -> refused at the edge: {took:.2f}s (update_frequency {POLL}s)")
            assert not served(attacker, port)
            assert served(bystander, port)
            # The live connection of the source was closed when the decision arrived.
            try:
                assert established.recv(10) == b""
            except OSError:
                pass
            established.close()

            bans = edge.api("GET", "/bans")[1]
            assert isinstance(bans, list)
            (ban,) = [b for b in bans if b["address"] == attacker]
            assert ban["jail"] == "crowdsec" and ban["reason"] == "crowdsecurity/ssh-bf"
            assert ban["origin"] == "cscli" and 3500 < ban["remaining"] <= 3600
            st = edge.status()["guard"]["crowdsec"]  # type: ignore[index]
            assert st["connected"] and st["decisions"] == 1 and st["refused"] >= 1
            assert edge.counter("refused", f"127.0.0.1:{port}", "banned") >= 1
            # `edgeward status` shows the decision with its scenario.
            out = subprocess.run([*EDGEWARD, "status", "--admin", f"127.0.0.1:{edge.admin_port}"],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert "crowdsec" in out.stdout and "connected" in out.stdout
            assert attacker in out.stdout and "crowdsecurity/ssh-bf" in out.stdout
            # The dashboard's live view lists it with its scenario.
            with socket.create_connection(("127.0.0.1", edge.admin_port), timeout=5) as s:
                s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while b"\n\n" not in got.split(b"data: ", 1)[-1] or b"data: " not in got:
                    chunk = s.recv(65536)
                    assert chunk
                    got += chunk
                view = json.loads(got.split(b"data: ", 1)[1].split(b"\n\n", 1)[0])
            assert {"address": attacker, "jail": "crowdsec", "reason": "crowdsecurity/ssh-bf"}.items() <= \
                view["bans"][0].items()
            detail = edge.api("GET", "/guard?jail=crowdsec")[1]
            assert [b["address"] for b in detail["crowdsec"]["bans"]] == [attacker]  # type: ignore[index]

            # A range covers every address in it, and only those.
            server.cscli("decisions", "add", "--range", "127.0.1.0/24", "--duration", "1h")
            assert refused_within("127.0.1.9", port, 10 * POLL + 5) is not None
            assert not served("127.0.1.200", port)
            assert served("127.0.2.1", port)
            assert edge.status()["guard"]["crowdsec"]["ranges"] == 1  # type: ignore[index]

            # Deletions lift them.
            server.cscli("decisions", "delete", "--ip", attacker)
            assert wait_until(lambda: served(attacker, port), 10 * POLL + 5), edge.log()
            server.cscli("decisions", "delete", "--range", "127.0.1.0/24")
            assert wait_until(lambda: served("127.0.1.9", port), 10 * POLL + 5)
            assert edge.status()["guard"]["crowdsec"]["decisions"] == 0  # type: ignore[index]

            # A decision with a duration ends at its time, at the edge too.
            short = "127.0.0.6"
            server.cscli("decisions", "add", "--ip", short, "--duration", "3s")
            t0 = time.monotonic()
            assert refused_within(short, port, 10 * POLL + 5) is not None
            assert wait_until(lambda: served(short, port), 10), edge.log()
            assert time.monotonic() - t0 < 3 + 10 * POLL + 2
            assert edge.proc.poll() is None
        finally:
            edge.stop()
            upstream.close()


def test_lapi_down_keeps_decisions_and_a_restart_resumes(tmp_path: Path, upstream: ThreadServer) -> None:
    server = Lapi(tmp_path / "lapi")
    server.start()
    edge: EdgeProcess | None = None
    try:
        key = server.add_bouncer("edge")
        server.cscli("decisions", "add", "--ip", "127.0.0.7", "--duration", "1h")
        port = free_port()
        edge = EdgeProcess(tmp_path, config(port, upstream.port, server.url, key), wait=[("127.0.0.1", port)])
        # Decisions already in force are there from the start (the edge waited for the first poll).
        assert not served("127.0.0.7", port)

        server.kill()
        assert wait_until(lambda: edge.status()["guard"]["crowdsec"]["errors"] >= 2, 10)  # type: ignore[index]
        st = edge.status()["guard"]["crowdsec"]  # type: ignore[index]
        assert not st["connected"] and st["decisions"] == 1
        assert st["errors_by_kind"].get("connect", 0) >= 2
        assert not served("127.0.0.7", port)  # the last known decision still holds
        assert served("127.0.0.8", port)
        time.sleep(2.5)  # several failed polls: back-off, never a busy loop
        errors = edge.status()["guard"]["crowdsec"]["errors"]  # type: ignore[index]
        assert errors <= 2.5 / POLL + 2
        assert edge.log().count("cannot reach the LAPI") == 1  # said once, then counted
        text = edge.metrics()
        assert metric(text, "edgeward_crowdsec_connected") == 0
        assert metric(text, "edgeward_crowdsec_decisions") == 1
        assert metric(text, "edgeward_crowdsec_errors_total", kind="connect") >= 2

        server.start()  # same port, same database
        server.cscli("decisions", "add", "--ip", "127.0.0.8", "--duration", "1h", "--reason", "after-restart")
        assert refused_within("127.0.0.8", port, 1 + 10 * POLL + 5) is not None, edge.log()
        assert not served("127.0.0.7", port)
        st = edge.status()["guard"]["crowdsec"]  # type: ignore[index]
        assert st["connected"] and st["decisions"] == 2
        assert "answers again" in edge.log()
        assert metric(edge.metrics(), "edgeward_crowdsec_connected") == 1
    finally:
        if edge is not None:
            edge.stop()
        server.stop()
        upstream.close()


def test_wrong_api_key_is_a_clear_counted_error(tmp_path: Path, upstream: ThreadServer) -> None:
    with lapi(tmp_path / "lapi") as server:
        server.add_bouncer("edge")
        port = free_port()
        edge = EdgeProcess(tmp_path, config(port, upstream.port, server.url, "not-the-key"),
                           wait=[("127.0.0.1", port)])
        try:
            assert wait_until(lambda: edge.status()["guard"]["crowdsec"]["errors"] >= 3, 10)  # type: ignore[index]
            st = edge.status()["guard"]["crowdsec"]  # type: ignore[index]
            assert st["errors_by_kind"] == {"auth": st["errors"]} and not st["connected"]
            assert "refused the bouncer's credentials (403" in st["last_error"]
            log = edge.log()
            assert "refused the bouncer's credentials (403 'access forbidden')" in log
            assert "api_key" in log and log.count("refused the bouncer's credentials") == 1
            assert served("127.0.0.5", port)  # the edge keeps running and serving
            assert edge.proc.poll() is None
        finally:
            edge.stop()
            upstream.close()


def test_own_bans_are_sent_as_alerts(tmp_path: Path, upstream: ThreadServer) -> None:
    with lapi(tmp_path / "lapi") as server:
        key = server.add_bouncer("edge")
        server.add_machine("edge-node", "s3cret-pass-word")
        pw = tmp_path / "machine.pw"
        pw.write_text("s3cret-pass-word\n")
        port = free_port()
        extra = f'machine_id = "edge-node"\npassword_file = "{pw}"\n'
        edge = EdgeProcess(tmp_path, config(port, upstream.port, server.url, key, extra), wait=[("127.0.0.1", port)])
        try:
            code, ban = edge.api("POST", "/ban", {"addr": "127.0.0.9", "jail": "manual", "reason": "probing",
                                                   "bantime": 600})
            assert code == 200, ban

            def alert_seen() -> bool:
                return any(a.get("scenario") == "edgeward/manual" for a in server.alerts())

            assert wait_until(alert_seen, 10), edge.log()
            (alert,) = [a for a in server.alerts() if a.get("scenario") == "edgeward/manual"]
            assert alert["machine_id"] == "edge-node"
            assert alert["source"]["value"] == "127.0.0.9"  # type: ignore[index]
            (dec,) = alert["decisions"]  # type: ignore[misc]
            assert dec["type"] == "ban" and dec["origin"] == "crowdsec" and dec["value"] == "127.0.0.9"
            decisions = server.cscli("decisions", "list", "-o", "json")
            assert "127.0.0.9" in decisions and "edgeward/manual" in decisions
            st = edge.status()["guard"]["crowdsec"]["alerts"]  # type: ignore[index]
            assert st["sent"] == 1 and st["errors"] == 0 and st["pending"] == 0
            # The decision comes back through the stream, like any other: enforced twice over.
            assert wait_until(lambda: any(b["jail"] == "crowdsec" and b["address"] == "127.0.0.9"
                                          for b in edge.api("GET", "/bans")[1]), 10 * POLL + 5)  # type: ignore[union-attr]
            assert not served("127.0.0.9", port)
            # An admin's unban here withdraws this node's decision from the LAPI too, so the
            # address is free here and everywhere else.
            code, lifted = edge.api("POST", "/unban", {"addr": "127.0.0.9"})
            # Not free at once: the LAPI's decision holds here until the next poll lifts it.
            assert code == 200 and lifted == {"unbanned": []}
            assert wait_until(lambda: served("127.0.0.9", port), 10 * POLL + 5), edge.log()
            assert "127.0.0.9" not in server.cscli("decisions", "list", "-o", "json")
            assert edge.status()["guard"]["crowdsec"]["alerts"]["withdrawn"] == 1  # type: ignore[index]
        finally:
            edge.stop()
            upstream.close()


def test_restart_while_the_lapi_is_down_keeps_the_last_decisions(tmp_path: Path, upstream: ThreadServer) -> None:
    server = Lapi(tmp_path / "lapi")
    server.start()
    edge: EdgeProcess | None = None
    port = free_port()
    try:
        key = server.add_bouncer("edge")
        cfg = config(port, upstream.port, server.url, key)
        server.cscli("decisions", "add", "--ip", "127.0.0.11", "--duration", "1h", "--reason", "kept")
        server.cscli("decisions", "add", "--range", "127.0.5.0/24", "--duration", "1h")
        edge = EdgeProcess(tmp_path, cfg, wait=[("127.0.0.1", port)])
        assert not served("127.0.0.11", port) and not served("127.0.5.5", port)
        edge.stop()
        # While the edge is away: one decision deleted, one added; then the LAPI goes down.
        server.cscli("decisions", "delete", "--range", "127.0.5.0/24")
        server.cscli("decisions", "add", "--ip", "127.0.0.12", "--duration", "1h")
        server.kill()

        edge = EdgeProcess(tmp_path, cfg, wait=[("127.0.0.1", port)])
        st = edge.status()["guard"]["crowdsec"]  # type: ignore[index]
        assert st["restored"] == 2 and not st["connected"]
        assert not served("127.0.0.11", port)  # the last known decisions, from the snapshot
        assert not served("127.0.5.5", port)  # (its deletion is not known yet)
        assert served("127.0.0.12", port)
        reasons = {b["address"]: b["reason"] for b in edge.api("GET", "/bans")[1]}  # type: ignore[union-attr]
        assert reasons["127.0.0.11"] == "kept"

        server.start()
        # The first answer is the LAPI's whole state: the deleted range is lifted, the new one enforced.
        assert wait_until(lambda: served("127.0.5.5", port), 1 + 10 * POLL + 5), edge.log()
        assert wait_until(lambda: not served("127.0.0.12", port), 5)
        assert not served("127.0.0.11", port)
        assert edge.status()["guard"]["crowdsec"]["decisions"] == 2  # type: ignore[index]
    finally:
        if edge is not None:
            edge.stop()
        server.stop()
        upstream.close()


def test_alerts_wait_for_a_lapi_that_is_down(tmp_path: Path, upstream: ThreadServer) -> None:
    server = Lapi(tmp_path / "lapi")
    server.start()
    edge: EdgeProcess | None = None
    try:
        key = server.add_bouncer("edge")
        server.add_machine("edge-node", "another-pass-word")
        port = free_port()
        extra = 'machine_id = "edge-node"\npassword = "another-pass-word"\n'
        edge = EdgeProcess(tmp_path, config(port, upstream.port, server.url, key, extra), wait=[("127.0.0.1", port)])
        assert edge.api("POST", "/ban", {"addr": "127.0.0.13", "jail": "manual", "bantime": 600})[0] == 200

        def alerts() -> dict[str, object]:
            return edge.status()["guard"]["crowdsec"]["alerts"]  # type: ignore[index, no-any-return]

        assert wait_until(lambda: alerts()["sent"] == 1, 10), edge.log()  # logged in, token kept
        server.kill()
        assert edge.api("POST", "/ban", {"addr": "127.0.0.14", "jail": "manual", "bantime": 600})[0] == 200
        assert not served("127.0.0.14", port)  # the ban holds here at once, whatever the LAPI
        assert wait_until(lambda: int(alerts()["errors"]) >= 2, 10)  # type: ignore[call-overload]
        assert alerts()["pending"] == 1 and alerts()["sent"] == 1
        server.start()
        # Sent once the LAPI is back (with a new login if it no longer takes the old token).
        assert wait_until(lambda: alerts()["sent"] == 2 and alerts()["pending"] == 0, 10), edge.log()
        values = {a["source"]["value"] for a in server.alerts() if a.get("scenario") == "edgeward/manual"}  # type: ignore[index]
        assert values == {"127.0.0.13", "127.0.0.14"}
    finally:
        if edge is not None:
            edge.stop()
        server.stop()
        upstream.close()


def test_origin_and_scenario_filters(tmp_path: Path, upstream: ThreadServer) -> None:
    with lapi(tmp_path / "lapi") as server:
        key = server.add_bouncer("edge")
        server.cscli("decisions", "add", "--ip", "127.0.0.15", "--reason", "crowdsecurity/ssh-bf")
        server.cscli("decisions", "add", "--ip", "127.0.0.16", "--reason", "crowdsecurity/http-probing")
        imported = tmp_path / "list.csv"
        imported.write_text("duration,scope,value,reason\n1h,ip,127.0.0.17,crowdsecurity/ssh-bf\n")
        server.cscli("decisions", "import", "-i", str(imported))  # origin cscli-import
        port = free_port()
        extra = 'origins = ["cscli"]\nscenarios_not_containing = ["http"]\n'
        edge = EdgeProcess(tmp_path, config(port, upstream.port, server.url, key, extra), wait=[("127.0.0.1", port)])
        try:
            assert not served("127.0.0.15", port)
            assert served("127.0.0.16", port)  # scenario filtered out by the LAPI
            assert served("127.0.0.17", port)  # origin filtered out by the LAPI
            assert edge.status()["guard"]["crowdsec"]["decisions"] == 1  # type: ignore[index]
        finally:
            edge.stop()
            upstream.close()


def test_decisions_reach_every_worker(tmp_path: Path, upstream: ThreadServer) -> None:
    """With [edge] workers = 2 the bouncer runs in the master; its decisions (an address and a
    range) reach both workers, which refuse them and close the range's open connections."""
    with lapi(tmp_path / "lapi") as server:
        key = server.add_bouncer("edge")
        port, admin = free_port(), free_port()
        edge = EdgeProcess(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
workers = 2
""" + config(port, upstream.port, server.url, key), admin_port=admin, wait=[("127.0.0.1", port)])
        try:
            assert wait_until(lambda: len(edge.status()["workers"]["processes"]) == 2, 15)  # type: ignore[index]
            # Clients inside the range, held open until some are in each worker.
            held = []
            for i in range(40):
                c = connect_from(f"127.0.3.{10 + i}", port)
                c.sendall(b"x")
                assert c.recv(1) == b"x"
                held.append(c)
                if all(w["connections"] > 0 for w in edge.status()["workers"]["processes"]):  # type: ignore[index]
                    break
            assert all(w["connections"] > 0 for w in edge.status()["workers"]["processes"])  # type: ignore[index]
            server.cscli("decisions", "add", "--range", "127.0.3.0/24", "--duration", "1h")
            server.cscli("decisions", "add", "--ip", "127.0.0.9", "--duration", "1h")
            assert refused_within("127.0.0.9", port, 10 * POLL + 5) is not None, edge.log()
            assert wait_until(lambda: not served("127.0.3.200", port), 10 * POLL + 5)
            for c in held:  # closed by whichever worker held it (a timeout fails the test)
                c.settimeout(3)
                try:
                    assert c.recv(1) == b""
                except ConnectionResetError:
                    pass
                c.close()
            # Refused by every worker (each connection lands on one of them by the kernel's hash).
            for _ in range(40):
                assert not served("127.0.3.7", port) and not served("127.0.0.9", port)
            ws = edge.status()["workers"]["processes"]  # type: ignore[index]
            assert all(w["refused"] > 0 for w in ws), ws
            assert served("127.0.4.1", port)
        finally:
            edge.stop()
            upstream.close()
