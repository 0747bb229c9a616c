"""Response framings, interim responses, stale keep-alive connections and timeouts, against small
scripted upstreams that answer exactly what each case needs."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from http_peers import HttpEdge, closed_by_peer, get, read_response, request
from support import ThreadServer, free_port, wait_until


def read_head(c: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(65536)
        if not d:
            return buf
        buf += d
    return buf


def read_body(c: socket.socket, head: bytes) -> bytes:
    """The Content-Length body after `head` (or the chunked body), as the upstream reads it."""
    h, _, rest = head.partition(b"\r\n\r\n")
    lower = h.lower()
    if b"content-length:" in lower:
        n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < n:
            d = c.recv(65536)
            if not d:  # the edge gave up on this request (a timeout): an upstream sees EOF
                break
            rest += d
        return rest
    if b"transfer-encoding: chunked" in lower:
        while not rest.endswith(b"0\r\n\r\n"):
            d = c.recv(65536)
            if not d:
                break
            rest += d
    return rest


Script = Callable[[socket.socket, bytes], bool]  # (conn, request head) -> keep the connection?


def scripted(answer: Script) -> ThreadServer:
    def handle(c: socket.socket) -> None:
        while True:
            head = read_head(c)
            if not head:
                return
            if not answer(c, head):
                return
    return ThreadServer(handle)


def edge_for(tmp: Path, upstream_port: int, http: str = "", retries: int = 0) -> tuple[HttpEdge, int]:
    port = free_port()
    config = f"""
[http]
redirect = "off"
{http}

[pools.up]
servers = ["http://127.0.0.1:{upstream_port}"]
retries = {retries}

[services.s]
listen = ["127.0.0.1:{port}"]
to = "up"
"""
    return HttpEdge(tmp, config, wait=[port]), port


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., tuple[HttpEdge, int]]]:
    made: list[tuple[HttpEdge, ThreadServer]] = []

    def factory(answer: Script, http: str = "") -> tuple[HttpEdge, int]:
        up = scripted(answer)
        sub = tmp_path / f"e{len(made)}"
        sub.mkdir()
        edge, port = edge_for(sub, up.port, http)
        made.append((edge, up))
        return edge, port
    yield factory
    for edge, up in made:
        edge.stop()
        up.close()


def test_chunked_response_is_passed_on_chunked(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    def answer(c: socket.socket, head: bytes) -> bool:
        c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n")
        for part in (b"hello ", b"chunked ", b"world"):
            c.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            time.sleep(0.01)
        c.sendall(b"0\r\nX-Trailer: t\r\n\r\n")
        return True
    _edge, port = make(answer)
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(2):  # the client connection stays usable
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            r = read_response(s)
            assert r is not None and r.body == b"hello chunked world" and r.header("Transfer-Encoding") == "chunked"
    r10 = request(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    assert r10 is not None and r10.body == b"hello chunked world" and r10.header("Transfer-Encoding") is None


def test_close_delimited_response_becomes_chunked_for_http11(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    def answer(c: socket.socket, head: bytes) -> bool:
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close")
        return False
    _edge, port = make(answer)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.body == b"until the close" and r.header("Transfer-Encoding") == "chunked"
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.body == b"until the close"


def test_interim_responses_and_upstream_100_continue(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    def answer(c: socket.socket, head: bytes) -> bool:
        if b"expect: 100-continue" in head.lower():
            c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = read_body(c, head)
        else:
            body = b""
        c.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return True
    _edge, port = make(answer)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")  # relayed before the body is sent
        s.sendall(b"hello")
        r = read_response(s)
        assert r is not None and r.status == 200 and r.body == b"hello" and r.interim == [103]


def test_upstream_refusing_before_the_body(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    def answer(c: socket.socket, head: bytes) -> bool:
        c.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        return False
    _edge, port = make(answer)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 100000000\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.status == 413 and r.header("Connection") == "close"
        assert closed_by_peer(s)


def test_head_response_with_length_does_not_wait_for_a_body(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    def answer(c: socket.socket, head: bytes) -> bool:
        if head.startswith(b"HEAD"):
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n")
        else:
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")
        return True
    edge, port = make(answer)
    before = edge.counter("upstream_connected")
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        r = read_response(s, head_request=True, timeout=3)
        assert r is not None and r.header("Content-Length") == "12345"
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.body == b"get"
    assert edge.counter("upstream_connected") - before == 1  # the upstream connection was reused after HEAD


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",  # unasked
    b"garbage\r\n\r\n",
])
def test_bad_upstream_responses_are_502(make: Callable[..., tuple[HttpEdge, int]], bad: bytes) -> None:
    def answer(c: socket.socket, head: bytes) -> bool:
        c.sendall(bad)
        time.sleep(0.2)
        return False
    _edge, port = make(answer)
    r = get(port, host="x")
    assert r.status == 502 and r.body == b"502 Bad Gateway\n"


def test_stale_keep_alive_connection_is_retried_for_idempotent_requests(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    # The upstream answers the first request of each connection and closes, without saying so,
    # when a second one comes: the edge's kept connection turns out dead on reuse.
    served: set[int] = set()

    def answer(c: socket.socket, head: bytes) -> bool:
        if id(c) in served:
            return False
        served.add(id(c))
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True
    edge, port = make(answer)
    for _ in range(3):
        assert get(port, host="x").status == 200
    assert edge.counter("upstream_retried") >= 2
    r = request(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert r is not None and r.status == 502  # never sent twice: it might have been applied


def test_header_timeout_answers_408_to_a_slow_head(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    edge, port = make(lambda c, h: False, 'header_timeout = "1s"')
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        r = read_response(s, timeout=5)
        assert r is not None and r.status == 408 and 0.8 < time.monotonic() - t0 < 10
        assert closed_by_peer(s)
    with socket.create_connection(("127.0.0.1", port)) as s:  # silent client: closed without a word
        s.settimeout(5)
        assert s.recv(100) == b""
    recs = edge.wait_records(1)
    assert recs[0]["status"] == 408 and recs[0]["error"] == "timeout:header"


def test_slowloris_trickle_does_not_extend_the_header_timeout(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    _edge, port = make(lambda c, h: False, 'header_timeout = "1s"')
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        t0 = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - t0 < 5:
                s.sendall(b"X-A: b\r\n")
                time.sleep(0.1)
        assert time.monotonic() - t0 < 10


def test_body_timeout_and_keepalive_timeout(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    got: list[bytes] = []

    def answer(c: socket.socket, head: bytes) -> bool:
        got.append(read_body(c, head))
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True
    _edge, port = make(answer, 'body_timeout = "1s"\nkeepalive_timeout = "1s"')
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        r = read_response(s, timeout=5)
        assert r is not None and r.status == 408
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (r := read_response(s)) is not None and r.status == 200
        t0 = time.monotonic()
        assert closed_by_peer(s, 10) and 0.8 < time.monotonic() - t0 < 10  # idle keep-alive closed


def test_response_timeout_is_504(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    def answer(c: socket.socket, head: bytes) -> bool:
        time.sleep(3)
        return False
    _edge, port = make(answer, 'response_timeout = "1s"')
    t0 = time.monotonic()
    r = get(port, host="x", timeout=6)
    assert r.status == 504 and r.body == b"504 Gateway Timeout\n" and time.monotonic() - t0 > 0.8


def test_upstream_never_reading_the_body_is_504(make: Callable[..., tuple[HttpEdge, int]]) -> None:
    stop = threading.Event()

    def answer(c: socket.socket, head: bytes) -> bool:
        stop.wait(30)  # reads the head, never the body; a 504 can only be the edge's timeout
        return False
    edge, port = make(answer, 'response_timeout = "1s"\nbody_timeout = "30s"')
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")

        def send() -> None:
            with contextlib.suppress(OSError):
                s.sendall(b"x" * 1_000_000_000)  # blocks once every buffer on the way is full
        t = threading.Thread(target=send, daemon=True)
        t.start()
        r = read_response(s, timeout=25)
        assert r is not None and r.status == 504
    stop.set()
    rss, _ = edge.rss_kib()
    assert rss < 200_000


def test_connect_retries_reach_a_live_server(tmp_path: Path) -> None:
    up = scripted(lambda c, h: bool(c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) or True)
    port = free_port()
    dead = free_port()
    config = f"""
[http]
redirect = "off"
[pools.up]
servers = ["http://127.0.0.1:{dead}", "http://127.0.0.1:{up.port}"]
retries = 1
[services.s]
listen = ["127.0.0.1:{port}"]
to = "up"
"""
    edge = HttpEdge(tmp_path, config, wait=[port])
    try:
        assert all(get(port, host="x").status == 200 for _ in range(6))
        assert wait_until(lambda: edge.counter("upstream_connect_failed") >= 1)
    finally:
        edge.stop()
        up.close()
