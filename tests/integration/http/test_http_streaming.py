"""Bodies stream through the HTTP layer with backpressure: a 1 GiB upload reaches nginx intact
while the edge's memory stays flat; a reader that stalls a large download is not buffered for."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from http_peers import HttpEdge, NginxUpstream, nginx_upstream, read_response
from support import free_port, require

GiB = 1 << 30
BIG_FILE = 256 << 20
RSS_GROWTH_LIMIT_KIB = 64 * 1024  # the body is 16x larger than this


@dataclass
class Env:
    edge: HttpEdge
    nginx: NginxUpstream
    port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require("nginx")
    tmp = tmp_path_factory.mktemp("stream")
    with nginx_upstream(tmp, store_bodies=True, big_bytes=BIG_FILE) as ngx:
        port = free_port()
        config = f"""
[http]
redirect = "off"

[services.cloud]
listen = ["127.0.0.1:{port}"]
names = ["cloud.test"]
to = "http://127.0.0.1:{ngx.port}"
"""
        edge = HttpEdge(tmp, config, wait=[port])
        try:
            yield Env(edge, ngx, port)
        finally:
            edge.stop()


def blocks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    """`total` bytes of incompressible data, block by block, never all in memory."""
    seed = os.urandom(size)
    for i in range(total // size):
        yield i.to_bytes(8, "big") + seed[8:]


def stored_digest(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    os.unlink(path)  # 1 GiB on disk is not kept
    return h.digest()


def test_one_gib_upload_with_content_length(env: Env) -> None:
    _, hwm0 = env.edge.rss_kib()
    rss0, _ = env.edge.rss_kib()
    h = hashlib.sha256()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        s.sendall(b"PUT /upload/big HTTP/1.1\r\nHost: cloud.test\r\nContent-Length: %d\r\n\r\n" % GiB)
        for b in blocks(GiB):
            h.update(b)
            s.sendall(b)
        r = read_response(s, timeout=120)
    elapsed = time.monotonic() - t0
    assert r is not None and r.status == 200
    assert stored_digest(r.body.decode().strip()) == h.digest()
    _, hwm1 = env.edge.rss_kib()
    growth = hwm1 - max(hwm0, rss0)
    print(f"1 GiB upload in {elapsed:.1f}s ({GiB / elapsed / 1e6:.0f} MB/s), peak RSS growth {growth} KiB")
    assert growth < RSS_GROWTH_LIMIT_KIB, (hwm0, hwm1)


def test_chunked_upload_of_256_mib(env: Env) -> None:
    h = hashlib.sha256()
    total = 256 << 20
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        s.sendall(b"POST /upload/chunked HTTP/1.1\r\nHost: cloud.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i, b in enumerate(blocks(total)):
            piece = b[: (i * 7919) % len(b) + 1]  # chunks of varied sizes
            h.update(piece)
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        s.sendall(b"0\r\n\r\n")
        r = read_response(s, timeout=120)
    assert r is not None and r.status == 200
    assert stored_digest(r.body.decode().strip()) == h.digest()


def test_stalled_reader_is_not_buffered_for(env: Env) -> None:
    assert env.nginx.public is not None
    want = hashlib.sha256((env.nginx.public / "big.bin").read_bytes()).digest()
    rss0, hwm0 = env.edge.rss_kib()
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: cloud.test\r\n\r\n")
        time.sleep(2)  # not reading: the edge must stop reading nginx, not buffer 256 MiB
        rss_stalled, _ = env.edge.rss_kib()
        assert rss_stalled - rss0 < 32 * 1024, (rss0, rss_stalled)
        r = read_response(s, timeout=60)
    assert r is not None and r.status == 200 and hashlib.sha256(r.body).digest() == want
    _, hwm1 = env.edge.rss_kib()
    assert hwm1 - max(hwm0, rss0) < RSS_GROWTH_LIMIT_KIB


def test_many_uploads_in_parallel_keep_memory_flat(env: Env) -> None:
    import threading
    rss0, _ = env.edge.rss_kib()
    errors: list[str] = []
    size = 32 << 20

    def one(i: int) -> None:
        h = hashlib.sha256()
        try:
            with socket.create_connection(("127.0.0.1", env.port)) as s:
                s.sendall(b"PUT /upload/p%d HTTP/1.1\r\nHost: cloud.test\r\nContent-Length: %d\r\n\r\n" % (i, size))
                for b in blocks(size):
                    h.update(b)
                    s.sendall(b)
                r = read_response(s, timeout=120)
            if r is None or r.status != 200 or stored_digest(r.body.decode().strip()) != h.digest():
                errors.append(f"upload {i}: {r}")
        except OSError as e:
            errors.append(f"upload {i}: {e}")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    _, hwm = env.edge.rss_kib()
    assert hwm - rss0 < RSS_GROWTH_LIMIT_KIB, (rss0, hwm)

