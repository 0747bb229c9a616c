"""Bad input never crashes or leaks; limits refuse and count; IPv6, port ranges, draining a server."""

import os
import random
import socket
from pathlib import Path

import pytest

from edgeward.codec.testing import build_client_hello
from support import (
    EdgeProcess,
    ThreadServer,
    echo_handler,
    fds_besides_pipe_pool,
    free_port,
    settles_to,
)


def send_and_close(port: int, data: bytes, *, wait_reply: float = 0.0, src: str = "127.0.0.1") -> None:
    with socket.socket() as c:
        c.bind((src, 0))
        c.settimeout(2)
        c.connect(("127.0.0.1", port))
        if data:
            try:
                c.sendall(data)
            except OSError:
                return
        if wait_reply:
            c.settimeout(wait_reply)
            try:
                c.recv(100)
            except OSError:
                pass


@pytest.fixture
def edge(tmp_path: Path):  # type: ignore[no-untyped-def]
    up = ThreadServer(echo_handler())
    port = free_port()
    e = EdgeProcess(tmp_path, f"""
[listeners.tls]
bind = ["127.0.0.1:{port}"]
sniff_timeout = "500ms"
trusted_proxies = ["127.0.0.2/32"]
[services.a]
listen = ["tls"]
names = ["a.example.org"]
to = "127.0.0.1:{up.port}"
""", wait=[("127.0.0.1", port)])
    try:
        yield e, port, up
    finally:
        e.stop()
        up.close()


def test_garbage_truncated_oversized_and_silent_clients(edge) -> None:  # type: ignore[no-untyped-def]
    e, port, _up = edge
    base = fds_besides_pipe_pool(e)
    rng = random.Random(7)
    hello = build_client_hello("a.example.org", ["h2"])
    cases: list[tuple[bytes, float]] = [(os.urandom(rng.randint(1, 3000)), 0.0) for _ in range(40)]
    cases += [(hello[:n], 0.0) for n in (1, 5, 9, 43, len(hello) - 1)]                   # truncated, closed mid-sniff
    cases += [(hello[:20], 1.0)]                                                         # truncated, waits: sniff timeout
    big = b"\x16\x03\x01\xff\xff\x01\xff\xff\xfb" + os.urandom(20000)                     # oversized hello
    cases += [(big, 0.5), (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", 0.5)]               # zero-length body hello
    cases += [(b"", 0.0), (b"", 1.0)]                                                    # silent clients
    cases += [(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 0.5)]                              # PROXY from untrusted
    cases += [(b"GET / HTTP/1.1\r\nHost: " + b"x" * 70000, 0.5)]                         # endless HTTP head
    for data, wait in cases:
        send_and_close(port, data, wait_reply=wait)
    for data in (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n", b"PROXY " + b"9" * 200 + b"\r\n",
                 b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff" + bytes(30)):                 # bad lengths, trusted sender
        send_and_close(port, data, wait_reply=0.5, src="127.0.0.2")
    # Still serving normally.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(hello)
        got = b""
        while len(got) < len(hello):
            d = c.recv(65536)
            assert d, got  # (EOF: fail here rather than spin)
            got += d
        assert got == hello
    assert e.proc.poll() is None
    assert settles_to(e, base) == base
    st = e.status()
    assert st["connections"] == 0
    total_refused = sum(c["value"] for c in st["counters"] if c["key"][0] == "refused")  # type: ignore[index, union-attr]
    assert total_refused >= 40
    assert e.counter("refused", "tls", "proxy_untrusted") == 1
    assert e.counter("refused", "tls", "proxy_invalid") == 3
    assert e.counter("refused", "tls", "sniff_timeout") >= 1
    assert e.counter("protocol_errors", "tls", "bad_tls") >= 2


def test_connection_limits_refuse_and_count(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    port = free_port()
    admin = free_port()
    e = EdgeProcess(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path}/state"
max_connections_per_client = 3
[listeners.l]
bind = ["127.0.0.1:{port}"]
max_connections = 5
[services.s]
listen = ["l"]
to = "127.0.0.1:{up.port}"
""", admin_port=admin, wait=[("127.0.0.1", port)])
    held = []
    try:
        def open_from(src: str) -> bool:
            c = socket.socket()
            c.bind((src, 0))
            c.settimeout(2)
            try:  # a refused client is reset (net/refusal.py): at connect already, or at the first read
                c.connect(("127.0.0.1", port))
                c.sendall(b"x")
                ok = c.recv(1) == b"x"
            except OSError:
                ok = False
            held.append(c)
            return ok
        assert [open_from("127.0.0.11") for _ in range(4)] == [True, True, True, False]
        assert [open_from("127.0.0.12") for _ in range(3)] == [True, True, False]  # listener limit 5
        assert e.counter("refused", "l", "client_limit") == 1
        assert e.counter("refused", "l", "listener_limit") == 1
        assert e.status()["clients"] == 2
    finally:
        for c in held:
            c.close()
        e.stop()
        up.close()


def test_ipv6_port_range_and_drain(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    a, b = ThreadServer(echo_handler(b"a")), ThreadServer(echo_handler(b"b"))
    first = free_port()
    while any(_busy(p) for p in range(first, first + 3)):
        first = free_port()
    e = EdgeProcess(tmp_path, f"""
[pools.p]
servers = ["127.0.0.1:{a.port}", "127.0.0.1:{b.port}"]
[services.range]
listen = ["127.0.0.1:{first}-{first + 2}", "[::1]:{first}"]
to = "p"
""", wait=[("127.0.0.1", first + 2)])
    try:
        tags = set()
        for host, p in [("127.0.0.1", first), ("127.0.0.1", first + 1), ("127.0.0.1", first + 2), ("::1", first)]:
            with socket.create_connection((host, p), timeout=5) as c:
                tags.add(c.recv(1))
        assert tags == {b"a", b"b"}
        code, _ = e.api("POST", f"/pools/p/drain?server=127.0.0.1:{a.port}")
        assert code == 200
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", first), timeout=5) as c:
                assert c.recv(1) == b"b"
        code, _ = e.api("POST", "/pools/p/drain?server=nope")
        assert code == 404
    finally:
        e.stop()
        a.close()
        b.close()


def _busy(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return False
        except OSError:
            return True


def test_metrics_endpoint(edge) -> None:  # type: ignore[no-untyped-def]
    e, port, _ = edge
    send_and_close(port, b"\x00garbage", wait_reply=0.5)
    code, text = e.api("GET", "/metrics")
    assert code == 200 and isinstance(text, str)
    assert "edgeward_connections 0" in text
    assert 'edgeward_refused_total{listener="tls",reason="no_route"} 1' in text
