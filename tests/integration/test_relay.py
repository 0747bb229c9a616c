"""Relay: byte-exact forwarding, half-close, backpressure, idle timeout; splice and buffered paths."""

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from support import (
    EdgeProcess,
    ThreadServer,
    echo_handler,
    fds_besides_pipe_pool,
    free_port,
    settles_to,
)

pytestmark = pytest.mark.parametrize("splice", [True, False], ids=["splice", "buffered"])


def edge_config(port: int, upstream: int, splice: bool, extra: str = "") -> str:
    return f"""
splice = {str(splice).lower()}
{extra}
[services.fwd]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{upstream}"
"""


def start(tmp: Path, up: int, splice: bool, listener_extra: str = "") -> tuple[EdgeProcess, int]:
    port = free_port()
    cfg = edge_config(port, up, splice)
    cfg = cfg.replace("splice =", f'[edge]\nadmin = "127.0.0.1:{{ADMIN}}"\nstate_dir = "{tmp}/state"\nsplice =')
    admin = free_port()
    cfg = cfg.replace("{ADMIN}", str(admin))
    if listener_extra:
        cfg = cfg.replace(f'listen = ["127.0.0.1:{port}"]', 'listen = ["l"]') + \
            f'\n[listeners.l]\nbind = ["127.0.0.1:{port}"]\n{listener_extra}\n'
    return EdgeProcess(tmp, cfg, admin_port=admin, wait=[("127.0.0.1", port)]), port


def test_bulk_both_directions_byte_exact(tmp_path: Path, splice: bool) -> None:
    up = ThreadServer(echo_handler())
    edge, port = start(tmp_path, up.port, splice)
    try:
        payload = os.urandom(8 << 20)
        got = bytearray()
        with socket.create_connection(("127.0.0.1", port)) as c:
            def reader() -> None:
                while len(got) < len(payload):
                    d = c.recv(1 << 20)
                    if not d:
                        break
                    got.extend(d)
            t = threading.Thread(target=reader)
            t.start()
            c.sendall(payload)
            t.join(30)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        st = edge.status()
        assert st["services"]["fwd"]["bytes_in"] == len(payload)  # type: ignore[index]
    finally:
        edge.stop()
        up.close()


def test_half_close_keeps_other_direction(tmp_path: Path, splice: bool) -> None:
    # The upstream reads until EOF, then answers: the client's FIN must reach it while
    # the upstream → client direction stays open.
    def handler(c: socket.socket) -> None:
        buf = b""
        while d := c.recv(65536):
            buf += d
        time.sleep(0.2)
        c.sendall(b"got %d bytes" % len(buf))
        c.shutdown(socket.SHUT_WR)
    up = ThreadServer(handler)
    edge, port = start(tmp_path, up.port, splice)
    try:
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"x" * 100000)
            c.shutdown(socket.SHUT_WR)
            c.settimeout(5)
            resp = b""
            while d := c.recv(4096):
                resp += d
        assert resp == b"got 100000 bytes"
        deadline = time.monotonic() + 5
        while edge.status()["connections"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert edge.status()["connections"] == 0
    finally:
        edge.stop()
        up.close()


def test_backpressure_slow_reader_bounded(tmp_path: Path, splice: bool) -> None:
    # The upstream floods; the client reads nothing. The edge must stop reading the upstream
    # (bounded buffering) instead of growing: the upstream's send eventually blocks.
    sent = [0]
    blocked = threading.Event()

    def flood(c: socket.socket) -> None:
        c.settimeout(2)
        chunk = b"z" * 65536
        try:
            while sent[0] < 512 << 20:
                sent[0] += c.send(chunk)
        except TimeoutError:
            blocked.set()
    up = ThreadServer(flood)
    edge, port = start(tmp_path, up.port, splice)
    try:
        rss0 = _rss(edge.pid)
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            assert blocked.wait(20), "upstream never blocked: the edge buffered without bound"
            assert sent[0] < 64 << 20
            assert _rss(edge.pid) - rss0 < 32 << 20
            # Reading resumes the flow.
            c.settimeout(5)
            got = 0
            while got < 1 << 20:
                got += len(c.recv(65536))
    finally:
        edge.stop()
        up.close()


def test_idle_timeout_closes(tmp_path: Path, splice: bool) -> None:
    up = ThreadServer(echo_handler())
    edge, port = start(tmp_path, up.port, splice, listener_extra='idle_timeout = "1s"')
    try:
        base = fds_besides_pipe_pool(edge)
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"ping")
            c.settimeout(5)
            assert c.recv(10) == b"ping"
            t0 = time.monotonic()
            assert c.recv(10) == b""  # closed by the edge
            assert 0.95 < time.monotonic() - t0 < 4
        assert edge.counter("closed", "l", "idle_timeout") == 1
        assert settles_to(edge, base) == base
    finally:
        edge.stop()
        up.close()


def test_idle_timeout_never_closes_early(tmp_path: Path, splice: bool) -> None:
    """Idleness is judged once a second on a clock kept to the second: connections last active at
    every point of that second are each closed no sooner than their timeout after it."""
    up = ThreadServer(echo_handler())
    edge, port = start(tmp_path, up.port, splice, listener_extra='idle_timeout = "1s"')
    idle: list[float] = []
    errors: list[str] = []

    def client(delay: float) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=8) as c:
                time.sleep(delay)
                c.sendall(b"ping")
                assert c.recv(10) == b"ping"
                active = time.monotonic()
                assert c.recv(10) == b""  # closed by the edge
                idle.append(time.monotonic() - active)
        except (OSError, AssertionError) as e:
            errors.append(repr(e))
    try:
        # last active 0.1 s apart across 0.9 s (under the timeout: none may close before its ping)
        threads = [threading.Thread(target=client, args=(i / 10,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert errors == [] and len(idle) == 10, errors
        assert min(idle) > 0.95, sorted(idle)  # not before the timeout...
        assert max(idle) < 4, sorted(idle)  # ...and within a couple of the clock's steps after it
        assert edge.counter("closed", "l", "idle_timeout") == 10
    finally:
        edge.stop()
        up.close()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
