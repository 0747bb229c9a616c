"""Health checks, retries, reload without drops, drain; the things operators do to a running edge."""

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import (
    EDGEWARD,
    EdgeProcess,
    ThreadServer,
    echo_handler,
    free_port,
    recv_line,
    wait_until,
)


class Health:
    """The switch a stand-in bridge's GET /about/health answers by: 200 when ok, 500 when not."""

    def __init__(self) -> None:
        self.ok = True


def tag_of(port: int, src: str = "127.0.0.1") -> bytes:
    """Connect from `src`, say hello, return the first line the upstream answers (its tag)."""
    with socket.socket() as c:
        c.bind((src, 0))
        c.settimeout(5)
        c.connect(("127.0.0.1", port))
        c.sendall(b"hello\n")
        return recv_line(c)


def test_failing_http_health_check_takes_server_out_and_back(tmp_path: Path) -> None:
    # Each bridge answers its REST health GET on the same port as its (echo) media service.
    h1, h2 = Health(), Health()
    b1 = ThreadServer(bridge_handler(b"b1\n", h1))
    b2 = ThreadServer(bridge_handler(b"b2\n", h2))
    port = free_port()
    cfg = f"""
[pools.bridges]
servers = ["127.0.0.1:{b1.port}", "127.0.0.1:{b2.port}"]
balance = "source-hash"
health = {{ http = "/about/health", interval = "200ms", timeout = "500ms" }}

[services.media]
listen = ["127.0.0.1:{port}"]
to = "bridges"
"""
    edge = EdgeProcess(tmp_path, cfg, wait=[("127.0.0.1", port)])
    try:
        clients = [f"127.0.0.{i}" for i in range(10, 40)]
        first = {c: tag_of(port, c) for c in clients}
        assert set(first.values()) == {b"b1\n", b"b2\n"}  # spread
        assert all(tag_of(port, c) == first[c] for c in clients)  # sticky
        def b1_healthy() -> object:
            servers = {s["server"]: s for s in edge.status()["pools"]["bridges"]["servers"]}  # type: ignore[index]
            return servers[f"127.0.0.1:{b1.port}"]["healthy"]
        h1.ok = False
        # (a few intervals of 200 ms; waited for rather than slept, the machine may be busy)
        assert wait_until(lambda: b1_healthy() is False, 5)
        assert all(tag_of(port, c) == b"b2\n" for c in clients)
        h1.ok = True
        assert wait_until(lambda: b1_healthy() is True, 5)
        assert {c: tag_of(port, c) for c in clients} == first  # clients come back to their bridge
    finally:
        edge.stop()
        for s in (b1, b2):
            s.close()


def bridge_handler(tag: bytes, health: Health):  # type: ignore[no-untyped-def]
    """One port that answers the health GET (like a bridge's REST port) or tags and echoes."""
    def handle(c: socket.socket) -> None:
        c.settimeout(5)
        first = c.recv(4096, socket.MSG_PEEK)
        if first.startswith(b"GET /about/health"):
            c.recv(4096)
            code = b"200 OK" if health.ok else b"500 Oops"
            c.sendall(b"HTTP/1.0 " + code + b"\r\nContent-Length: 0\r\n\r\n")
            return
        c.settimeout(None)
        c.sendall(tag)
        while d := c.recv(65536):
            c.sendall(d)
    return handle


def test_killing_a_server_under_load_fails_no_client(tmp_path: Path) -> None:
    b1, b2 = ThreadServer(echo_handler(b"b1\n")), ThreadServer(echo_handler(b"b2\n"))
    port = free_port()
    edge = EdgeProcess(tmp_path, f"""
[pools.p]
servers = ["127.0.0.1:{b1.port}", "127.0.0.1:{b2.port}"]
retries = 2
connect_timeout = "1s"
passive = {{ failures = 1, down_for = "30s" }}
[services.s]
listen = ["127.0.0.1:{port}"]
to = "p"
""", wait=[("127.0.0.1", port)])
    failures = []
    try:
        for i in range(300):
            if i == 50:
                b1.close()  # its port now refuses: retries must hide it from clients
            try:
                line = tag_of(port)
                if line not in (b"b1\n", b"b2\n"):
                    failures.append(line)
            except OSError as e:
                failures.append(repr(e).encode())
        assert failures == []
        assert edge.counter("connect_failures", "p", f"127.0.0.1:{b1.port}") >= 1
    finally:
        edge.stop()
        b2.close()


def test_reload_under_steady_connections_drops_none(tmp_path: Path) -> None:
    a, b = ThreadServer(echo_handler(b"a\n")), ThreadServer(echo_handler(b"b\n"))
    port = free_port()
    base = f"""
[services.s]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{{}}"
"""
    edge = EdgeProcess(tmp_path, base.format(a.port), wait=[("127.0.0.1", port)])
    errors: list[str] = []
    seen: set[bytes] = set()
    stop = threading.Event()
    # An established connection that lives across every reload.
    long = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert recv_line(long) == b"a\n"

    def load() -> None:
        n = 0
        while not stop.is_set() and n < 5000:
            n += 1
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    line = recv_line(c)
                    c.sendall(b"x")
                    if not line or c.recv(1) != b"x":
                        errors.append("short")
                    seen.add(line)
            except OSError as e:
                errors.append(repr(e))
    t = threading.Thread(target=load)
    t.start()
    try:
        for i in range(6):
            time.sleep(0.3)
            edge.write_config(base.format(b.port if i % 2 == 0 else a.port))
            edge.signal(signal.SIGHUP)
        time.sleep(0.3)
        # An invalid config changes nothing.
        edge.write_config(base.format(a.port).replace('to =', 'too ='))
        edge.signal(signal.SIGHUP)
        time.sleep(0.5)
        stop.set()
        t.join(30)
        assert errors == []
        assert seen == {b"a\n", b"b\n"}
        long.sendall(b"still here")
        assert long.recv(100) == b"still here"
        # Each reload's file is checked by a process of its own (config_checker.py), one after the
        # other: the last ones may still be running. A SIGHUP that comes while an earlier one still
        # waits for its turn supersedes it (edge.py, _reload_signal); the last, invalid, one
        # cannot be superseded.
        def superseded() -> int:
            return edge.log().count("supersedes the one still waiting")
        assert wait_until(lambda: edge.counter("reloads", "rejected") == 1, 15)
        assert edge.counter("reloads", "applied") + superseded() == 6, edge.log()
        assert "reload rejected" in edge.log()
        # The CLI says so too, with exit code 2.
        r = subprocess.run([*EDGEWARD, "reload", "--admin", f"127.0.0.1:{edge.admin_port}"], capture_output=True)
        assert r.returncode == 2
    finally:
        stop.set()
        long.close()
        edge.stop()
        a.close()
        b.close()


def test_sigterm_drains_established_connections(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    port = free_port()
    admin = free_port()
    edge = EdgeProcess(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path}/state"
drain_timeout = "3s"
[services.s]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
""", admin_port=admin, wait=[("127.0.0.1", port)])
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"1")
        assert c.recv(1) == b"1"
        edge.signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except OSError:
                return True
        # No new connections (once the signal is handled: waited for, well within the drain)...
        assert wait_until(refused, 2)
        # ...but the established one still works until the drain timeout.
        c.sendall(b"2")
        assert c.recv(1) == b"2"
        assert edge.proc.wait(10) == 0
        assert c.recv(1) == b""
        c.close()
    finally:
        edge.stop()
        up.close()


def test_cli_check_reports_problems_with_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[services.s]\nlisten = ["127.0.0.1:99999"]\nto = "nowhere"\n')
    r = subprocess.run([*EDGEWARD, "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{bad}:2:10:" in r.stderr and "65535" in r.stderr  # at the value
    assert f"{bad}:3:6: to: no pool named 'nowhere'" in r.stderr
    r = subprocess.run([*EDGEWARD, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("edgeward ")
    r = subprocess.run([*EDGEWARD, "status", "--admin", f"127.0.0.1:{free_port()}"], capture_output=True, text=True)
    assert r.returncode == 3
    r = subprocess.run([sys.executable, "-m", "edgeward.cli", "schema"], capture_output=True, text=True)
    assert r.returncode == 0 and '"services"' in r.stdout


@pytest.mark.parametrize("workers", [0, 2], ids=["single", "workers"])
def test_a_port_in_use_names_the_address_at_start_and_reload(tmp_path: Path, workers: int) -> None:
    """As HAProxy's "cannot bind socket [addr]": which address, why, and what usually fixes it; at
    start the edge exits 1 and leaves nothing; at a reload the running config stays."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    head = f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
{f"workers = {workers}" if workers else ""}
[services.s]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
"""
    try:
        cfg = tmp_path / "taken.toml"
        cfg.write_text(head + f'[services.t]\nlisten = ["127.0.0.1:{taken}"]\nto = "127.0.0.1:{up.port}"\n')
        r = subprocess.run([*EDGEWARD, "run", str(cfg)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        assert f"cannot bind 127.0.0.1:{taken}: Address already in use" in r.stderr, r.stderr
        assert f"ss -lntup 'sport = :{taken}'" in r.stderr
        # Running, then a reload that asks for the taken port: rejected, named, and the edge serves on.
        edge = EdgeProcess(tmp_path, head, admin_port=admin, wait=[("127.0.0.1", port)])
        try:
            edge.write_config(cfg.read_text())
            assert edge.api("POST", "/reload") == (422, {"applied": False})  # (the reason is in the log)
            assert wait_until(lambda: f"cannot bind 127.0.0.1:{taken}: Address already in use" in edge.log())
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"still")
                assert c.recv(5) == b"still"
        finally:
            edge.stop()
    finally:
        held.close()
        up.close()
