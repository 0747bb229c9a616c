"""`[edge] workers = N`: a master (control plane) and N worker processes accepting on SO_REUSEPORT
sockets the master holds. The edge runs as a subprocess; every process is found and stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeward.cli import _print_status
from http_peers import get, read_response
from pebble_peer import pebble
from support import (
    EDGEWARD,
    EdgeProcess,
    ThreadServer,
    UdpEcho,
    connect_from,
    echo_handler,
    free_port,
    metric,
    served,
    wait_until,
)


def edge_section(e_admin: int, tmp: Path, workers: int | str = 2, extra: str = "") -> str:
    return f"""
[edge]
admin = "127.0.0.1:{e_admin}"
state_dir = "{tmp / 'state'}"
workers = {workers if isinstance(workers, int) else '"' + workers + '"'}
drain_timeout = "3s"
{extra}
"""


def processes(st: dict[str, Any]) -> list[dict[str, Any]]:
    return list(st["workers"]["processes"])  # type: ignore[index]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie has finished)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError), open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
    return out


@contextlib.contextmanager
def edge_with_workers(tmp: Path, admin: int, config: str, wait: list[tuple[str, int]] | None = None,
                      extra_args: tuple[str, ...] = ()) -> Iterator[EdgeProcess]:
    """The edge, and at the end every worker it ever had stopped by PID (SIGKILL if it outlived its master)."""
    e = EdgeProcess(tmp, config, admin_port=admin, wait=wait, extra_args=extra_args)
    seen: set[int] = set()

    def note() -> None:
        seen.update(children(e.pid))
    try:
        note()
        yield e
        note()
    finally:
        with contextlib.suppress(Exception):
            note()
        e.stop()
        for pid in seen:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def echo_edge(tmp: Path, workers: int | str = 2, extra: str = "") -> Iterator[tuple[EdgeProcess, int]]:
    """An edge with workers (edge_with_workers) relaying one port to an echo upstream: (edge, port)."""
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    try:
        with edge_with_workers(tmp, admin, edge_section(admin, tmp, workers, extra) + f"""
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
""") as e:
            yield e, port
    finally:
        up.close()


def wait_workers(e: EdgeProcess, n: int = 2) -> list[dict[str, Any]]:
    assert wait_until(lambda: len(processes(e.status())) == n, 15), e.log()
    return processes(e.status())


def test_workers_1_is_one_process(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path, 1) + f"""
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
""", wait=[("127.0.0.1", port)]) as e:
        assert served("127.0.0.2", port)
        kids = [p for p in children(e.pid) if "worker" in Path(f"/proc/{p}/cmdline").read_text()]
        assert kids == []
        assert "workers" not in e.status()
    up.close()


def test_two_workers_serve_and_status_metrics_and_access_log_add_up(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    access = tmp_path / "access.log"
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path, extra=f'access_log = "{access}"') + f"""
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
""") as e:
        ws = wait_workers(e)
        assert len({w["pid"] for w in ws}) == 2 and e.pid not in {w["pid"] for w in ws}
        n = 300
        ok = sum(served("127.0.0.2", port) for _ in range(n))
        assert ok == n
        st = e.status()
        per = [w["total"] for w in processes(st)]
        assert all(t > 0 for t in per), per  # both workers accepted (SO_REUSEPORT spreads by 4-tuple hash)
        assert sum(per) == n
        assert st["services"]["echo"]["total"] == n  # type: ignore[index]
        # Bytes and closes are counted once the worker has seen the client's FIN: a moment after
        # served() returns.
        assert wait_until(lambda: e.counter("closed", f"127.0.0.1:{port}", "done") == n, 5)
        assert e.status()["services"]["echo"]["bytes_in"] == 4 * n  # type: ignore[index]
        text = e.metrics()
        assert metric(text, "edgeward_service_connections_total", service="echo") == n
        assert metric(text, "edgeward_worker_connections_total", worker="0") + \
            metric(text, "edgeward_worker_connections_total", worker="1") == n
        assert metric(text, "edgeward_workers") == 2
        out = subprocess.run([*EDGEWARD, "status", "--admin", f"127.0.0.1:{admin}"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0 and "workers (2 of 2 running, 0 restarts)" in out.stdout, out.stdout + out.stderr
        # One access log, written by both workers, whole lines only.
        assert wait_until(lambda: access.exists() and len(access.read_text().splitlines()) == n, 5)
        lines = access.read_text().splitlines()
        assert all(line.count(" tcp client=127.0.0.2:") == 1 and line.endswith("end=done") for line in lines)
        # logrotate: move the file, SIGUSR1 to the master; every worker reopens the path.
        access.rename(tmp_path / "access.log.1")
        e.signal(signal.SIGUSR1)
        assert wait_until(access.exists, 5)
        assert sum(served("127.0.0.2", port) for _ in range(40)) == 40
        assert wait_until(lambda: len(access.read_text().splitlines()) == 40, 5)
    up.close()


def test_ban_and_unban_reach_every_worker(tmp_path: Path) -> None:
    with echo_edge(tmp_path) as (e, port):
        wait_workers(e)
        # Connections of the address to ban, held open in both workers.
        held = []
        for _ in range(40):
            c = connect_from("127.0.0.7", port)
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            held.append(c)
            if all(w["connections"] > 0 for w in processes(e.status())):
                break
        assert all(w["connections"] > 0 for w in processes(e.status()))
        code, _ = e.api("POST", "/ban", {"addr": "127.0.0.7", "jail": "manual"})
        assert code == 200
        t0 = time.monotonic()
        for c in held:  # every held connection is closed by its worker
            c.settimeout(2)
            with contextlib.suppress(OSError):
                assert c.recv(1) == b""
            c.close()
        assert time.monotonic() - t0 < 2
        assert not any(served("127.0.0.7", port) for _ in range(40))
        assert served("127.0.0.8", port)
        ws = processes(e.status())
        assert all(w["refused"] > 0 for w in ws), ws  # refused at every worker
        for w in ws:  # from the master's send to the worker's apply
            assert w["propagation_ms"]["count"] >= 1
            assert w["propagation_ms"]["max"] <= 250.0, w  # pushed, not polled (bench measures it)
        code, _ = e.api("POST", "/unban", {"addr": "127.0.0.7"})
        assert code == 200
        assert all(served("127.0.0.7", port) for _ in range(20))
        assert all(w["propagation_ms"]["count"] >= 2 for w in processes(e.status()))


def test_a_ban_that_expires_lifts_in_every_worker(tmp_path: Path) -> None:
    with echo_edge(tmp_path) as (e, port):
        wait_workers(e)
        assert e.api("POST", "/ban", {"addr": "127.0.0.11", "jail": "manual", "bantime": 1.5})[0] == 200
        assert not any(served("127.0.0.11", port) for _ in range(20))
        assert all(w["refused"] > 0 for w in processes(e.status()))
        # The master's guard lifts it at its time; every worker hears of it.
        assert wait_until(lambda: served("127.0.0.11", port), 5)
        assert all(served("127.0.0.11", port) for _ in range(30))
        assert all(w["propagation_ms"]["count"] >= 2 for w in processes(e.status()))


def test_a_restarted_worker_gets_the_bans(tmp_path: Path) -> None:
    with echo_edge(tmp_path) as (e, port):
        ws = wait_workers(e)
        assert e.api("POST", "/ban", {"addr": "127.0.0.9", "jail": "manual"})[0] == 200
        os.kill(ws[1]["pid"], signal.SIGKILL)
        assert wait_until(lambda: e.status()["workers"]["restarts"] == 1, 10)  # type: ignore[index]
        wait_until(lambda: all(w["pid"] != ws[1]["pid"] for w in processes(e.status())), 10)
        assert not any(served("127.0.0.9", port) for _ in range(30))
        assert all(w["refused"] > 0 for w in processes(e.status()))


def test_killed_worker_is_restarted_counted_and_loses_no_queued_client(tmp_path: Path) -> None:
    with echo_edge(tmp_path) as (e, port):
        ws = wait_workers(e)
        assert all(served("127.0.0.2", port) for _ in range(60))
        assert e.status()["services"]["echo"]["total"] == 60  # type: ignore[index]
        # Every close counted before the kill: what a worker counts after the master's last read of
        # it dies with it (its last close comes a moment after served() returns).
        assert wait_until(lambda: e.counter("closed", f"127.0.0.1:{port}", "done") == 60, 5)
        victim = ws[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        # The master keeps the dead worker's listening socket: clients the kernel queues on it wait
        # for the replacement instead of being reset.
        ok = sum(served("127.0.0.2", port) for _ in range(100))
        assert ok == 100
        assert wait_until(lambda: e.status()["workers"]["restarts"] == 1, 10)  # type: ignore[index]
        ws2 = wait_workers(e)
        assert victim not in {w["pid"] for w in ws2} and not alive(victim)
        assert {w["index"]: w["restarts"] for w in ws2} == {0: 1, 1: 0}
        assert metric(e.metrics(), "edgeward_worker_restarts_total", worker="0") == 1
        assert all(served("127.0.0.2", port) for _ in range(50))
        assert "worker 0 (pid" in e.log() and "restarting it" in e.log()
        # Totals survive the restart (the dead worker's, as of its last report, are kept).
        st = e.status()
        assert st["services"]["echo"]["total"] == 210  # type: ignore[index]
        # (A connection is counted closed once its worker has seen the client's FIN: a moment after
        # served() returns.)
        assert wait_until(lambda: e.counter("closed", f"127.0.0.1:{port}", "done") == 210, 5)
        assert metric(e.metrics(), "edgeward_service_connections_total", service="echo") == 210


def test_reload_under_load_drops_and_refuses_nothing(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    port, extra_port, admin = free_port(), free_port(), free_port()
    head = edge_section(admin, tmp_path)
    base = head + f"""
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
"""
    with edge_with_workers(tmp_path, admin, base) as e:
        wait_workers(e)
        stop = threading.Event()
        results = {"ok": 0, "failed": 0}
        errors: list[str] = []
        lock = threading.Lock()

        def load() -> None:  # ~100 new connections/s per thread, 3 threads, bounded in time and count
            deadline = time.monotonic() + 10
            for _ in range(2000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                t = time.monotonic()
                try:
                    with connect_from("127.0.0.3", port) as c:
                        c.sendall(b"ping")
                        good = c.recv(4) == b"ping"
                except OSError as ex:
                    good = False
                    with lock:
                        errors.append(repr(ex))
                with lock:
                    results["ok" if good else "failed"] += 1
                time.sleep(max(0.0, 0.01 - (time.monotonic() - t)))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.7)
            # 1: a new service on a new port (new listening sockets go to the running workers)
            e.write_config(base + f"""
[services.extra]
listen = ["127.0.0.1:{extra_port}"]
to = "127.0.0.1:{up.port}"
""")
            assert e.api("POST", "/reload")[1] == {"applied": True}
            time.sleep(0.7)
            assert all(served("127.0.0.4", extra_port) for _ in range(20))
            # 2: SIGHUP, same config
            e.signal(signal.SIGHUP)
            time.sleep(0.7)
            # 3: the extra port goes away again
            e.write_config(base)
            assert e.api("POST", "/reload")[1] == {"applied": True}
            time.sleep(0.7)
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        assert results["failed"] == 0, (results, errors[:5])
        assert results["ok"] > 300
        assert wait_until(lambda: all(w["reloads"] == 3 for w in processes(e.status())), 5), processes(e.status())
        assert e.counter("reloads", "applied") == 3
        assert not served("127.0.0.4", extra_port)
    up.close()


def test_one_client_in_two_workers_is_counted_once(tmp_path: Path) -> None:
    with echo_edge(tmp_path) as (e, port):
        wait_workers(e)
        held = []
        for _ in range(40):
            c = connect_from("127.0.0.20", port)
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            held.append(c)
            if all(w["clients"] == 1 for w in processes(e.status())):
                break
        st = e.status()
        assert [w["clients"] for w in processes(st)] == [1, 1]  # the same address in both workers
        assert st["clients"] == 1
        assert st["connections"] == len(held)
        assert st["services"]["echo"]["clients"] == 1  # type: ignore[index]
        pool = st["pools"]["service:echo"]  # type: ignore[index]
        assert pool["clients"] == 1 and pool["servers"][0]["clients"] == 1
        assert metric(e.metrics(), "edgeward_clients") == 1
        code, cl = e.api("GET", "/clients")
        assert code == 200 and cl["distinct"] == 1 and cl["matched"] == len(held)  # type: ignore[index]
        assert cl["addresses"] == {"127.0.0.20": len(held)}  # type: ignore[index]
        other = connect_from("127.0.0.21", port)
        other.sendall(b"y")
        assert other.recv(1) == b"y"
        assert e.status()["clients"] == 2
        for c in [*held, other]:
            c.close()
        assert wait_until(lambda: e.status()["clients"] == 0, 5)


def test_udp_sessions_stay_in_one_worker(tmp_path: Path) -> None:
    echo = UdpEcho(tag="up")
    port, admin = free_port(), free_port()
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path) + f"""
[services.media]
listen = ["udp/127.0.0.1:{port}"]
to = "127.0.0.1:{echo.port}"
""") as e:
        wait_workers(e)
        clients = []
        for i in range(24):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.0.0.{30 + i % 4}", 0))
            s.settimeout(3)
            clients.append(s)
        upstream_ports: dict[int, set[str]] = {}
        for rnd in range(5):
            for i, s in enumerate(clients):
                s.sendto(f"{i}-{rnd}".encode(), ("127.0.0.1", port))
            for i, s in enumerate(clients):
                data, _ = s.recvfrom(2048)
                tag, _lport, peer_port, body = data.decode().split("|")
                assert tag == "up"
                assert body == f"{i}-{rnd}"
                upstream_ports.setdefault(i, set()).add(peer_port)
        # Every datagram of a client went out of one upstream socket: one session, in one worker.
        assert all(len(v) == 1 for v in upstream_ports.values()), upstream_ports
        st = e.status()
        per = [w["udp_sessions"] for w in processes(st)]
        assert sum(per) == len(clients) and all(n > 0 for n in per), per
        assert st["udp_sessions"] == len(clients)
        assert st["services"]["media"]["udp_sessions_total"] == len(clients)  # type: ignore[index]
        assert st["services"]["media"]["datagrams_in"] == 5 * len(clients)  # type: ignore[index]
        assert st["clients"] == 4
        for s in clients:
            s.close()
    echo.close()


def test_health_changes_reach_every_worker(tmp_path: Path) -> None:
    a, b = ThreadServer(echo_handler(b"A")), ThreadServer(echo_handler(b"B"))
    port, admin = free_port(), free_port()
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path) + f"""
[pools.web]
servers = ["127.0.0.1:{a.port}", "127.0.0.1:{b.port}"]
health = {{ interval = "0.2s", timeout = "0.5s" }}
[services.web]
listen = ["127.0.0.1:{port}"]
to = "web"
""") as e:
        wait_workers(e)

        def tags(n: int) -> set[bytes]:
            out = set()
            for _ in range(n):
                with connect_from("127.0.0.2", port) as c:
                    out.add(c.recv(1))
            return out
        assert tags(20) == {b"A", b"B"}
        b.close()  # b's port refuses from now on: the master's check marks it down
        assert wait_until(lambda: not e.status()["pools"]["web"]["servers"][1]["healthy"], 5)  # type: ignore[index]
        assert tags(30) == {b"A"}  # no worker sends a client to b any more
        ws = processes(e.status())
        for w in ws:
            assert w["propagation_ms"]["count"] >= 1 and w["propagation_ms"]["max"] <= 250.0, w
        failed = e.counter("connect_failures", "web", f"127.0.0.1:{b.port}")
        # A restarted worker starts with the master's view of health: it never tries b.
        os.kill(ws[0]["pid"], signal.SIGKILL)
        assert wait_until(lambda: e.status()["workers"]["restarts"] == 1, 10)  # type: ignore[index]
        assert wait_until(lambda: len(processes(e.status())) == 2, 10)
        assert tags(30) == {b"A"}
        assert wait_until(lambda: all(w["total"] > 0 for w in processes(e.status())), 5)
        assert e.counter("connect_failures", "web", f"127.0.0.1:{b.port}") == failed
    a.close()


def test_master_sigterm_stops_every_worker(tmp_path: Path) -> None:
    with echo_edge(tmp_path, "auto") as (e, port):
        n = len(os.sched_getaffinity(0))
        ws = wait_workers(e, n)
        pids = [w["pid"] for w in ws]
        assert sorted(pids) == sorted(p for p in children(e.pid)
                                      if "worker" in Path(f"/proc/{p}/cmdline").read_text())
        held = connect_from("127.0.0.2", port)
        held.sendall(b"z")
        assert held.recv(1) == b"z"
        e.signal(signal.SIGTERM)
        time.sleep(0.5)
        held.sendall(b"w")  # draining: a live connection keeps working until it ends
        assert held.recv(1) == b"w"
        with pytest.raises(OSError):
            connect_from("127.0.0.2", port).recv(1)  # new clients are refused while draining
        held.close()
        e.proc.wait(10)
        assert e.proc.returncode == 0
        assert not any(alive(p) for p in pids)  # no orphans


@pytest.mark.parametrize(("challenge", "workers"), [("http-01", 2), ("tls-alpn-01", 2), ("http-01", 1)])
def test_acme_in_the_master_certificates_served_by_every_worker(tmp_path: Path, challenge: str, workers: int) -> None:
    """The master orders (pebble validates through whichever worker the kernel picks: the workers
    answer the master's HTTP-01 tokens and TLS-ALPN-01 certificates); every worker serves the result,
    also after reloads (with one process too: a reload used to drop the ACME certificate)."""
    up = ThreadServer(http_upstream)
    admin = free_port()
    with pebble(tmp_path / "pebble", resolve=("meet.test",)) as ca:
        web80, web443 = ca.http_port, ca.tls_port  # where pebble validates: the edge's 80 and 443
        with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path, workers) + f"""
[acme]
directory = "{ca.directory}"
ca_file = "{ca.ca_file}"
challenges = ["{challenge}"]
retry_min = "1s"
[http]
redirect = "127.0.0.1:{web80}"
[services.meet]
listen = ["127.0.0.1:{web443}"]
names = ["meet.test"]
to = "http://127.0.0.1:{up.port}"
""") as e:
            if workers > 1:
                wait_workers(e, workers)

            def acme() -> dict[str, Any]:
                return e.status()["web"]["acme"].get("meet.test", {})  # type: ignore[index, union-attr, no-any-return]
            assert wait_until(lambda: acme().get("state") == "valid", 60), f"{e.status()['web']}\n{e.log()}"
            assert acme()["challenge"] == challenge
            (tmp_path / "root.pem").write_bytes(ca.root_pem())
            ctx = ssl.create_default_context(cafile=str(tmp_path / "root.pem"))

            def https_statuses(n: int) -> list[int]:
                out = []
                for _ in range(n):  # new connections: both workers, each with the master's certificate
                    with socket.create_connection(("127.0.0.1", web443), timeout=10) as raw, \
                            ctx.wrap_socket(raw, server_hostname="meet.test") as t:
                        t.sendall(b"GET / HTTP/1.1\r\nHost: meet.test\r\nConnection: close\r\n\r\n")
                        r = read_response(t)
                        out.append(r.status if r is not None else 0)
                return out
            assert https_statuses(30) == [200] * 30
            st = e.status()
            assert st["services"]["meet"]["requests"] == 30  # type: ignore[index]
            if workers > 1:  # both workers served the master's certificate
                assert all(w["requests"] > 0 for w in processes(st))
            # Only the master orders: one account, one certificate on disk.
            assert len(list((tmp_path / "state" / "acme" / "certs").iterdir())) == 1
            assert get(web80, "/.well-known/acme-challenge/not-a-token", host="meet.test").status == 404
            # Reloads keep the certificate in the master's hands and in every worker.
            for _ in range(2):
                assert e.api("POST", "/reload")[1] == {"applied": True}
                assert https_statuses(10) == [200] * 10
            assert acme()["state"] == "valid"
    up.close()


def test_jails_hear_what_every_worker_sees(tmp_path: Path) -> None:
    """Protocol errors seen by a worker reach the master's jails; the ban then holds in every worker."""
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path) + f"""
[services.tls]
listen = ["127.0.0.1:{port}"]
names = ["a.example.org"]
to = "127.0.0.1:{up.port}"

[jails.garbage]
sources = ["edge:proto"]
maxretry = 4
findtime = "1m"
bantime = "1h"
""") as e:
        wait_workers(e)
        for _ in range(4):  # four malformed ClientHellos, from new source ports: spread over the workers
            with connect_from("127.0.0.41", port) as c:
                c.sendall(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # a handshake that is no ClientHello
                with contextlib.suppress(OSError):
                    c.recv(10)
        assert wait_until(lambda: any(b["address"] == "127.0.0.41" for b in e.api("GET", "/bans")[1]), 5)  # type: ignore[union-attr]
        st = e.status()
        (jail,) = st["guard"]["jails"]  # type: ignore[index]
        assert jail["counters"]["bans"] == 1
        assert e.counter("protocol_errors", f"127.0.0.1:{port}", "bad_tls") == 4  # counted once, by the workers
        before = e.counter("refused", f"127.0.0.1:{port}", "banned")
        for _ in range(20):  # refused (reset at admission) by every worker
            with contextlib.suppress(OSError), connect_from("127.0.0.41", port) as c:
                assert c.recv(10) == b""
        assert e.counter("refused", f"127.0.0.1:{port}", "banned") == before + 20
        assert all(w["refused"] > 0 for w in processes(e.status()))
    up.close()


def test_a_flood_jail_counts_connections_of_every_worker(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path) + f"""
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"

[jails.flood]
sources = ["edge:conn"]
maxretry = 20
findtime = "1m"
bantime = "1h"
""") as e:
        wait_workers(e)
        assert sum(served("127.0.0.60", port) for _ in range(19)) == 19  # 19 < 20: not yet
        assert all(w["total"] > 0 for w in processes(e.status()))  # both workers counted some
        served("127.0.0.60", port)  # the 20th, wherever it lands, is the one too many
        assert wait_until(lambda: not served("127.0.0.60", port), 5)
        (jail,) = e.status()["guard"]["jails"]  # type: ignore[index]
        assert jail["counters"]["bans"] == 1
        assert served("127.0.0.61", port)
    up.close()


def http_upstream(c: socket.socket) -> None:
    """A minimal HTTP/1.1 upstream: 401 for /secret, 200 "ok" otherwise; one request per connection."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(4096)
        if not d:
            return
        buf += d
    path = buf.split(b" ", 2)[1]
    status = b"401 Unauthorized" if path.startswith(b"/secret") else b"200 OK"
    c.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def http_get(port: int, path: str, src: str = "127.0.0.2") -> int:
    """The response's status; 0 if the edge closed or reset the connection instead."""
    data = b""
    with contextlib.suppress(ConnectionError), connect_from(src, port) as c:
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n".encode())
        while chunk := c.recv(4096):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def test_http_services_run_in_the_workers_without_acme(tmp_path: Path) -> None:
    up = ThreadServer(http_upstream)
    port, admin = free_port(), free_port()
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path) + f"""
[acme]
enabled = false
[http]
redirect = "off"
[services.web]
listen = ["127.0.0.1:{port}"]
to = "http://127.0.0.1:{up.port}"

[jails.auth]
sources = ["edge:http401"]
maxretry = 3
findtime = "1m"
bantime = "1h"
""") as e:
        wait_workers(e)
        assert [http_get(port, "/") for _ in range(40)] == [200] * 40
        st = e.status()
        assert st["services"]["web"]["requests"] == 40  # type: ignore[index]
        assert [http_get(port, "/secret", "127.0.0.50") for _ in range(3)] == [401] * 3
        assert wait_until(lambda: http_get(port, "/", "127.0.0.50") == 0, 5)  # banned: closed at admission
        assert http_get(port, "/") == 200
    up.close()


def test_server_drain_and_the_dashboard_reach_every_worker(tmp_path: Path) -> None:
    a, b = ThreadServer(echo_handler(b"A")), ThreadServer(echo_handler(b"B"))
    port, admin = free_port(), free_port()
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path) + f"""
[pools.web]
servers = ["127.0.0.1:{a.port}", "127.0.0.1:{b.port}"]
[services.web]
listen = ["127.0.0.1:{port}"]
to = "web"
""") as e:
        wait_workers(e)

        def tags(n: int) -> set[bytes]:
            out = set()
            for _ in range(n):
                with connect_from("127.0.0.2", port) as c:
                    out.add(c.recv(1))
            return out
        assert tags(20) == {b"A", b"B"}
        code, _ = e.api("POST", f"/pools/web/drain?server=127.0.0.1:{a.port}")
        assert code == 200
        assert tags(30) == {b"B"}  # neither worker sends new clients to the drained server
        assert e.status()["pools"]["web"]["servers"][0]["drain"] is True  # type: ignore[index]
        # The dashboard's live view (what `edgeward top` reads too) adds the workers up.
        # Workers report on an interval: the last client's close may reach the master a report
        # later, so the stream is read until the view has it (bounded).
        deadline = time.monotonic() + 10
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/events", timeout=10) as r:
            while True:
                while not (line := r.readline()).startswith(b"data: "):
                    pass
                view = json.loads(line[6:])
                if view["services"]["web"]["active"] == 0 or time.monotonic() > deadline:
                    break
        assert view["services"]["web"]["active"] == 0 and view["pools"]["web"]["servers"][1]["server"].endswith(
            str(b.port))
        assert e.api("GET", "/history")[0] == 200
    a.close()
    b.close()


def test_a_reload_while_a_worker_starts_reaches_it(tmp_path: Path) -> None:
    """A reload sent while a restarted worker is still starting is applied once it runs: the new
    address's socket in its share is served, not left queueing for nobody."""
    up = ThreadServer(echo_handler())
    port, extra_port, admin = free_port(), free_port(), free_port()
    base = edge_section(admin, tmp_path) + f"""
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
"""
    with edge_with_workers(tmp_path, admin, base) as e:
        ws = wait_workers(e)
        os.kill(ws[0]["pid"], signal.SIGKILL)
        assert wait_until(lambda: e.status()["workers"]["restarts"] == 1, 10)  # type: ignore[index]
        e.write_config(base + f"""
[services.extra]
listen = ["127.0.0.1:{extra_port}"]
to = "127.0.0.1:{up.port}"
""")
        assert e.api("POST", "/reload")[1] == {"applied": True}
        ws2 = wait_workers(e)
        assert all(served("127.0.0.2", extra_port) for _ in range(40))
        assert wait_until(lambda: all(w["total"] > 0 for w in processes(e.status())), 5)
        assert ws2[0]["pid"] != ws[0]["pid"]
    up.close()


def test_a_hung_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    """A worker that stops answering (SIGSTOP here: a runaway loop looks the same) is killed and
    restarted; the clients the kernel queued on its socket meanwhile are served by its successor."""
    with echo_edge(tmp_path) as (e, port):
        ws = wait_workers(e)
        stuck = ws[0]["pid"]
        os.kill(stuck, signal.SIGSTOP)
        results: list[bool] = []

        def client() -> None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
                    c.sendall(b"ping")
                    results.append(c.recv(4) == b"ping")
            except OSError:
                results.append(False)
        threads = [threading.Thread(target=client) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [True] * 20
        assert not alive(stuck)
        st = e.status()
        assert st["workers"]["restarts"] == 1  # type: ignore[index]
        assert [w["hung"] for w in processes(st)] == [1, 0]
        assert "answered nothing" in e.log()


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


def replacement(e: EdgeProcess, known: set[int]) -> int:
    """The pid of the worker the master starts next, once it runs `edgeward worker` (stopping the
    child between fork and exec would stop the master, which waits for the exec)."""
    found: list[int] = []

    def look() -> bool:
        found[:] = [p for p in children(e.pid) if p not in known and "worker" in cmdline(p)]
        return bool(found)
    assert wait_until(look, 10), e.log()
    return found[0]


def test_a_worker_whose_master_dies_while_it_starts_does_not_outlive_it(tmp_path: Path) -> None:
    """The master sends a new worker its init at once; if the master dies before that worker has
    built its edge, the worker reads the init and then the end of the channel: it must drain and
    exit, not serve on as an orphan holding its share of the listening sockets."""
    with echo_edge(tmp_path) as (e, _port):
        ws = wait_workers(e)
        os.kill(ws[0]["pid"], signal.SIGKILL)
        new = replacement(e, {w["pid"] for w in ws})
        os.kill(new, signal.SIGSTOP)  # its init waits in the channel, unread
        try:
            time.sleep(0.3)
            os.kill(e.pid, signal.SIGKILL)
            assert wait_until(lambda: not alive(e.pid), 10)
        finally:
            os.kill(new, signal.SIGCONT)
        try:
            assert wait_until(lambda: not alive(new), 20), e.log()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(new, signal.SIGKILL)  # (an orphan, if the test failed)


def test_a_worker_restarted_while_the_file_is_mid_edit_starts(tmp_path: Path) -> None:
    """A worker never reads the config file (the master sends the text it checked, and its log
    level): one restarted while the file is broken starts and serves, with run's --log-level."""
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    config = edge_section(admin, tmp_path) + f"""
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
"""
    with edge_with_workers(tmp_path, admin, config, extra_args=("--log-level", "debug")) as e:
        ws = wait_workers(e)
        e.config_path.write_text(config + "\n[services.broken\n")  # being edited, not reloaded
        os.kill(ws[0]["pid"], signal.SIGKILL)
        assert wait_until(lambda: e.status()["workers"]["alive"] == 2  # type: ignore[index]
                          and ws[0]["pid"] not in {w["pid"] for w in processes(e.status())}, 15), e.log()
        st = e.status()
        assert st["workers"]["restarts"] == 1, e.log()  # type: ignore[index]
        new = next(w["pid"] for w in processes(st) if w["index"] == 0)
        args = cmdline(new)
        assert args[args.index("--log-level") + 1] == "debug"
        assert all(served("127.0.0.2", port) for _ in range(30))
    up.close()


def test_a_reload_of_a_listeners_options_while_a_worker_starts_leaves_no_socket_unserved(tmp_path: Path) -> None:
    """The new sockets of a reload sent while a restarted worker is starting wait with the reload
    (not taken at once under the old config, then closed by the reload, which bound its own)."""
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()

    def config(backlog: int) -> str:
        return edge_section(admin, tmp_path) + f"""
[listeners.front]
bind = ["127.0.0.1:{port}"]
backlog = {backlog}
[services.echo]
listen = ["front"]
to = "127.0.0.1:{up.port}"
"""
    with edge_with_workers(tmp_path, admin, config(100), wait=[("127.0.0.1", port)]) as e:
        ws = wait_workers(e)
        os.kill(ws[0]["pid"], signal.SIGKILL)
        # The replacement is held (SIGSTOP) as soon as it exists: the reload's messages wait in its
        # channel behind its init, as when a reload comes while a worker imports.
        new = replacement(e, {w["pid"] for w in ws})
        os.kill(new, signal.SIGSTOP)
        try:
            e.write_config(config(200))
            e.signal(signal.SIGHUP)
            assert wait_until(lambda: e.status()["reloads"] == 1, 10), e.log()  # type: ignore[index]
        finally:
            os.kill(new, signal.SIGCONT)
        assert wait_until(lambda: e.status()["workers"]["alive"] == 2, 15), e.log()  # type: ignore[index]
        assert all(served("127.0.0.2", port) for _ in range(40)), e.log()
        assert "binding one" not in e.log()
    up.close()


def test_a_stalled_master_kills_no_healthy_worker(tmp_path: Path) -> None:
    """The master's own loop stalling longer than HUNG_AFTER (SIGSTOP/SIGCONT here; a paused
    container or a long reload alike) is not its workers hanging: none is killed."""
    with echo_edge(tmp_path) as (e, port):
        ws = wait_workers(e)
        e.signal(signal.SIGSTOP)
        try:
            time.sleep(7)  # > HUNG_AFTER (5 s)
        finally:
            e.signal(signal.SIGCONT)
        time.sleep(3)  # a few watchdog rounds after the stall
        st = e.status()
        assert [w["pid"] for w in processes(st)] == [w["pid"] for w in ws], e.log()
        assert [w["hung"] for w in processes(st)] == [0, 0]
        assert st["workers"]["restarts"] == 0  # type: ignore[index]
        assert all(served("127.0.0.2", port) for _ in range(20))


def test_a_restarted_worker_that_never_gets_ready_is_replaced(tmp_path: Path) -> None:
    """A replacement stuck in its start (SIGSTOP here) is killed after READY_TIMEOUT (30 s) and
    replaced, so that its share of the listening sockets is served again."""
    with echo_edge(tmp_path) as (e, port):
        ws = wait_workers(e)
        first = {w["pid"] for w in ws}
        os.kill(ws[0]["pid"], signal.SIGKILL)
        stuck = replacement(e, first)
        os.kill(stuck, signal.SIGSTOP)
        try:
            assert wait_until(lambda: not alive(stuck), 45), e.log()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGCONT)
        assert wait_until(lambda: e.status()["workers"]["alive"] == 2, 15), e.log()  # type: ignore[index]
        st = e.status()
        assert stuck not in {w["pid"] for w in processes(st)}
        assert st["workers"]["restarts"] == 2  # type: ignore[index]
        assert "was not ready after" in e.log()
        assert all(served("127.0.0.2", port) for _ in range(30))


def test_a_ban_that_narrows_narrows_in_every_worker(tmp_path: Path) -> None:
    """One jail bans an address on one listener, another everywhere; lifting the second leaves the
    first in force in the master and, as narrow as that, in every worker."""
    up = ThreadServer(echo_handler())
    port_a, port_b, admin = free_port(), free_port(), free_port()
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path) + f"""
[listeners.a]
bind = ["127.0.0.1:{port_a}"]
[listeners.b]
bind = ["127.0.0.1:{port_b}"]
[services.echo_a]
listen = ["a"]
to = "127.0.0.1:{up.port}"
[services.echo_b]
listen = ["b"]
to = "127.0.0.1:{up.port}"

[jails.only_a]
sources = ["edge:proto"]
listeners = ["a"]
""", wait=[("127.0.0.1", port_a), ("127.0.0.1", port_b)]) as e:
        wait_workers(e)
        assert e.api("POST", "/ban", {"addr": "127.0.0.9", "jail": "only_a"})[0] == 200
        assert e.api("POST", "/ban", {"addr": "127.0.0.9", "jail": "manual"})[0] == 200
        assert wait_until(lambda: not served("127.0.0.9", port_b), 5)
        assert e.api("POST", "/unban", {"addr": "127.0.0.9", "jail": "manual"})[0] == 200
        # Every worker serves it on b again (30 connections: both workers), and refuses it on a.
        assert wait_until(lambda: served("127.0.0.9", port_b), 5)
        assert all(served("127.0.0.9", port_b) for _ in range(30)), e.log()
        assert not any(served("127.0.0.9", port_a) for _ in range(30))
        assert all(w["refused"] > 0 for w in processes(e.status()))
    up.close()


def test_a_worker_that_misses_the_status_deadline_keeps_its_counts(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A worker that does not answer the status in time (stopped here) is counted as of its
    previous report, marked stale: /metrics counters never go back."""
    with echo_edge(tmp_path) as (e, port):
        ws = wait_workers(e)
        assert all(served("127.0.0.2", port) for _ in range(40))
        assert all(w["total"] > 0 for w in processes(e.status()))
        before = metric(e.metrics(), "edgeward_service_connections_total", service="echo")
        assert before == 40
        os.kill(ws[0]["pid"], signal.SIGSTOP)
        try:
            during = metric(e.metrics(), "edgeward_service_connections_total", service="echo")
            st = e.status()
        finally:
            os.kill(ws[0]["pid"], signal.SIGCONT)
        _print_status(st)  # what `edgeward status` prints from that answer says which worker is stale
        shown = capsys.readouterr().out
        assert "0 (stale)" in shown and "1 (stale)" not in shown
        assert during == 40
        assert st["services"]["echo"]["total"] == 40  # type: ignore[index]
        assert [(w["pid"], w["stale"]) for w in processes(st)] == [(ws[0]["pid"], True), (ws[1]["pid"], False)]
        assert wait_until(lambda: not any(w["stale"] for w in processes(e.status())), 10)


def test_a_draining_worker_is_succeeded_at_once(tmp_path: Path) -> None:
    """SIGTERM to one worker (or a reload it rejects): it finishes its connections, while its
    successor, started at once on the same sockets, serves its share of new clients."""
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    with edge_with_workers(tmp_path, admin, edge_section(admin, tmp_path).replace('"3s"', '"30s"') + f"""
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
""") as e:
        ws = wait_workers(e)
        held = []
        try:
            for _ in range(20):  # open connections in both workers: a drain that lasts
                c = connect_from("127.0.0.2", port)
                c.sendall(b"x")
                assert c.recv(1) == b"x"
                held.append(c)
            assert all(w["connections"] > 0 for w in processes(e.status()))
            victim = ws[0]["pid"]
            os.kill(victim, signal.SIGTERM)
            assert wait_until(lambda: e.status()["workers"]["alive"] == 2  # type: ignore[index]
                              and victim not in {w["pid"] for w in processes(e.status())}, 15), e.log()
            assert alive(victim)  # still finishing its connections
            assert all(served("127.0.0.2", port) for _ in range(40)), e.log()
            for c in held:  # the held connections still work, in the draining worker too
                c.sendall(b"y")
                assert c.recv(1) == b"y"
        finally:
            for c in held:
                c.close()
        assert wait_until(lambda: not alive(victim), 10)
        st = e.status()
        assert st["services"]["echo"]["total"] >= 60  # type: ignore[index]
        assert "drains; starting its successor" in e.log()
    up.close()
