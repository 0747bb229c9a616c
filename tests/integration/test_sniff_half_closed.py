"""A client that half-closes with an incomplete prefix is closed at once, without spinning a CPU.

Once a peer has sent FIN its socket stays readable whatever SO_RCVLOWAT says, so a sniffer
that polls again after a peek with no progress would wake at once, forever (until the sniff
timeout). The test measures the edge's own CPU time (utime+stime), not wall time.
"""

import os
import socket
import time
from pathlib import Path

import pytest

from edgeward.codec.testing import build_client_hello
from support import EdgeProcess, ThreadServer, echo_handler, free_port

HELLO = build_client_hello("a.example.org", ["h2"])
PARTIALS = {
    "tls": HELLO[:40],
    "http": b"GET / HTTP/1.1\r\nHost: a.exa",
    "xmpp": b"<?xml version='1.0'?><stream:stream to='a.exa",
    "ssh": b"SSH-2.0-Open",
    "proxy_v1": b"PROXY TCP4 192.0.2.1 192.0.2.2 1000",
    "proxy_v2": b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00",
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def edge(tmp_path: Path):  # type: ignore[no-untyped-def]
    up = ThreadServer(echo_handler())
    port = free_port()
    e = EdgeProcess(tmp_path, f"""
[listeners.front]
bind = ["127.0.0.1:{port}"]
sniff_timeout = "20s"
trusted_proxies = ["127.0.0.1/32"]
[services.a]
listen = ["front"]
names = ["a.example.org"]
to = "127.0.0.1:{up.port}"
""", wait=[("127.0.0.1", port)])
    try:
        yield e, port
    finally:
        e.stop()
        up.close()


def test_half_closed_partial_prefixes_are_closed_at_once_without_spinning(edge) -> None:  # type: ignore[no-untyped-def]
    e, port = edge
    time.sleep(0.3)
    cpu0 = cpu_seconds(e.pid)
    t0 = time.monotonic()
    clients = []
    for _ in range(4):
        for data in PARTIALS.values():
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            clients.append(c)
    for c in clients:
        # The edge closes its side well before the 20 s sniff timeout.
        try:
            assert c.recv(100) == b""
        except ConnectionResetError:
            pass
        c.close()
    closed_after = time.monotonic() - t0
    time.sleep(1.0)  # a spinning edge would burn this second too
    used = cpu_seconds(e.pid) - cpu0
    assert closed_after < 5.0
    # 24 hostile clients; a busy loop would cost about one CPU-second per second of waiting.
    assert used < 0.5, f"edge used {used:.2f} CPU-s on 24 half-closed clients"
    assert e.counter("refused", "front", "sniff_half_closed") == 24
    # A complete hello followed at once by FIN still routes (the prefix was complete).
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(HELLO)
        c.shutdown(socket.SHUT_WR)
        assert c.recv(len(HELLO) + 10)[:5] == HELLO[:5]
