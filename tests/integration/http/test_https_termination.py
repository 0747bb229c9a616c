"""TLS termination by the edge's own layer (http/tls_transport.py), byte by byte.

The client here is OpenSSL over memory BIOs on a plain socket, so each test decides exactly which
TLS bytes go out and when: records cut into single bytes, several records in one write, a
close_notify or a bare FIN after a request, a record that does not decrypt, a hello that never
ends. Behind the edge: a real nginx.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httptools
import pytest
import trustme

from http_peers import HttpEdge, NginxUpstream, closed_by_peer, get, nginx_upstream
from support import free_port, require, wait_until, write_cert


@dataclass
class Env:
    edge: HttpEdge
    nginx: NginxUpstream
    tls_port: int
    ca_pem: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require("nginx")
    tmp = tmp_path_factory.mktemp("https")
    ca = trustme.CA()
    ca_pem = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    write_cert(ca, tmp, "edge", "a.test")
    with nginx_upstream(tmp, store_bodies=True, big_bytes=8 << 20) as ngx:
        tls_port = free_port()
        config = f"""
[http]
redirect = "off"
header_timeout = "1s"

[services.web]
listen = ["127.0.0.1:{tls_port}"]
names = ["a.test"]
to = "http://127.0.0.1:{ngx.port}"
"""
        edge = HttpEdge(tmp, config, tls=[f"127.0.0.1:{tls_port}"], cert=tmp / "edge.pem", key=tmp / "edge.key",
                        wait=[tls_port])
        try:
            yield Env(edge, ngx, tls_port, ca_pem)
        finally:
            edge.stop()


class BioClient:
    """A TLS 1.3 client whose every byte on the wire the test controls."""

    def __init__(self, env: Env, *, handshake: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", env.tls_port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = ssl.create_default_context(cafile=str(env.ca_pem))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="a.test")
        self.plain = b""
        self.eof = False
        if handshake:
            self.handshake()

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                assert data, "the edge closed during the handshake"
                self.incoming.write(data)
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def records(self, plaintext: bytes) -> bytes:
        """`plaintext` as TLS records (one per 16 KiB), not sent."""
        self.obj.write(plaintext)
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def read_until_closed(self, timeout: float = 10.0) -> bytes:
        """Everything the edge sends, decrypted, until it closes the connection."""
        self.sock.settimeout(timeout)
        while not self.eof:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                break
            self.incoming.write(data)
            self._drain()
        return self.plain

    def _drain(self) -> None:
        try:
            while True:
                chunk = self.obj.read(65536)
                if not chunk:
                    self.eof = True  # the edge's close_notify
                    return
                self.plain += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.eof = True  # the edge's close_notify, after the client sent its own

    def responses(self, n: int, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        """The next `n` responses (status, body), read as they come."""
        got: list[tuple[int, bytes]] = []
        parts: list[bytes] = []

        class P:
            def on_body(self, b: bytes) -> None:
                parts.append(b)

            def on_message_complete(self) -> None:
                got.append((parser.get_status_code(), b"".join(parts)))
                parts.clear()

        parser = httptools.HttpResponseParser(P())
        fed = 0
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        while len(got) < n and time.monotonic() < deadline:
            if fed < len(self.plain):
                parser.feed_data(self.plain[fed:])
                fed = len(self.plain)
                continue
            data = self.sock.recv(65536)
            assert data, f"closed after {len(got)} of {n} responses"
            self.incoming.write(data)
            self._drain()
        self.plain = self.plain[fed:]
        return got

    def close(self) -> None:
        self.sock.close()


def ok(env: Env) -> bool:
    return get(env.tls_port, "/", host="a.test", tls_host="a.test", ca=env.ca_pem).status == 200


def test_a_request_cut_into_single_bytes_is_answered(env: Env) -> None:
    c = BioClient(env)
    try:
        wire = c.records(b"GET /one-byte HTTP/1.1\r\nHost: a.test\r\n\r\n")
        for i in range(len(wire)):
            c.sock.send(wire[i:i + 1])
            time.sleep(0.001)  # (TCP_NODELAY: the edge gets most bytes in reads of their own)
        [(status, _)] = c.responses(1)
        assert status == 200
    finally:
        c.close()
    assert any(r["path"] == "/one-byte" and r["status"] == 200 for r in env.edge.wait_records(1))


def test_many_records_in_one_write_and_many_requests_in_one_record(env: Env) -> None:
    c = BioClient(env)
    try:
        req = b"GET /r%d HTTP/1.1\r\nHost: a.test\r\n\r\n"
        wire = b"".join(c.records(req % i) for i in range(5)) + c.records(req % 5 + req % 6 + req % 7)
        c.sock.sendall(wire)
        assert [s for s, _ in c.responses(8)] == [200] * 8
    finally:
        c.close()


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "bare_fin"])
def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(env: Env, close_notify: bool) -> None:
    # TLS 1.3 closes one direction at a time (RFC 8446 6.1); a FIN without close_notify is also
    # what many clients do. Either way the request is complete and is answered, then closed.
    c = BioClient(env)
    try:
        wire = c.records(b"GET /half HTTP/1.1\r\nHost: a.test\r\n\r\n")
        if close_notify:
            wire += c.close_notify()
        c.sock.sendall(wire)
        c.sock.shutdown(socket.SHUT_WR)
        out = c.read_until_closed()
    finally:
        c.close()
    assert out.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\n" in out, out[:200]


def test_large_bodies_both_ways_cross_as_many_records(env: Env) -> None:
    body = os.urandom(5 << 20)
    c = BioClient(env)
    try:
        c.sock.sendall(c.records(b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % len(body)))
        for i in range(0, len(body), 1 << 20):
            c.sock.sendall(c.records(body[i:i + (1 << 20)]))
        [(status, stored)] = c.responses(1, timeout=30)
        assert status == 200
        assert hashlib.sha256(Path(stored.decode().strip()).read_bytes()).digest() == hashlib.sha256(body).digest()
        c.sock.sendall(c.records(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n"))
        [(status, big)] = c.responses(1, timeout=30)
        assert env.nginx.public is not None
        assert status == 200 and big == (env.nginx.public / "big.bin").read_bytes()
    finally:
        c.close()


def test_a_record_that_does_not_decrypt_ends_only_its_connection(env: Env) -> None:
    assert ok(env)
    before = env.edge.counter("tls_errors")
    base = env.edge.fds()
    c = BioClient(env)
    try:
        good = c.records(b"GET /before-forgery HTTP/1.1\r\nHost: a.test\r\n\r\n")
        forged = bytes.fromhex("17030300 40".replace(" ", "")) + os.urandom(64)
        c.sock.sendall(good + forged)
        assert closed_by_peer(c.sock)
    finally:
        c.close()
    assert wait_until(lambda: env.edge.counter("tls_errors") == before + 1, 5)
    assert ok(env)
    assert wait_until(lambda: env.edge.fds() <= base, 5), (base, env.edge.fds())


def test_a_hello_that_never_ends_times_out_and_is_counted(env: Env) -> None:
    assert ok(env)
    before = env.edge.counter("tls_handshake_failed")
    base = env.edge.fds()
    c = BioClient(env, handshake=False)
    try:
        with pytest.raises(ssl.SSLWantReadError):
            c.obj.do_handshake()
        hello = c.outgoing.read()
        c.sock.sendall(hello[:len(hello) // 2])
        t0 = time.monotonic()
        assert closed_by_peer(c.sock, timeout=5)
        assert 0.5 <= time.monotonic() - t0 <= 4  # header_timeout is 1 s (the wheel's steps add a little)
    finally:
        c.close()
    assert wait_until(lambda: env.edge.counter("tls_handshake_failed") == before + 1, 5)
    assert wait_until(lambda: env.edge.fds() <= base, 5), (base, env.edge.fds())
    assert ok(env)
