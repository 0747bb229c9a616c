"""The client side of the HTTP layer, driven without sockets: bytes in (in any split), responses out.

The edge's routes here have no upstream (every well-formed request gets 404, or a redirect in the
port-80 mode), so each outcome is decided by the request parsing and checks alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward.config.loader import validate
from edgeward.config.schema import HttpSettings
from edgeward.config.units import parse_target
from edgeward.http import HttpProxy, HttpRoute, HttpRoutes, HttpUpstream
from edgeward.http.exchange import ClientConnection
from edgeward.upstream.pool import Pool, Server


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.eof = False
        self.reading = True
        self.after_close = 0

    def write(self, data: bytes) -> None:
        if self.closed or self.eof:
            self.after_close += len(data)
        self.out += data

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        for p in parts:
            self.write(p)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def nowhere(name: str) -> HttpUpstream:
    return HttpUpstream(name, Pool(name, [Server(parse_target("http://127.0.0.1:9"), healthy=False)]), "http")


SETTINGS = validate(HttpSettings, {"max_header_bytes": "4KiB", "max_headers": 20})


def run(loop: asyncio.AbstractEventLoop, pieces: list[bytes], *, redirect: bool = False) -> tuple[FakeTransport, list[int]]:
    routes = HttpRoutes([HttpRoute(nowhere("down"), ("down.test",))])
    proxy = HttpProxy(routes, SETTINGS, loop=loop)
    conn = ClientConnection(proxy, routes, ("192.0.2.1", 1234), ("127.0.0.1", 80), scheme="http",
                            redirect=redirect, https_port=443, via_proxy=False)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    for p in pieces:
        if t.closed:
            break
        conn.data_received(p)
        proxy.outbox.flush()  # what the loop does at the end of the turn (http/outbox.py)
    conn.connection_lost(None)
    return t, statuses(bytes(t.out))


def statuses(out: bytes) -> list[int]:
    found: list[int] = []

    class R:
        def on_headers_complete(self) -> None:
            found.append(parser.get_status_code())

    parser = httptools.HttpResponseParser(R())
    parser.feed_data(out)  # raises if the edge wrote anything but well-formed responses
    return found


REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"GET /x?y HTTP/1.0\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: down.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET http://evil/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.test\r\nX: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Long: " + b"x" * 5000 + b"\r\n\r\n",
]
OK_STATUSES = {404, 503, 301, 308}  # what a well-formed request gets here
ERROR_STATUSES = {400, 405, 408, 414, 417, 431, 501, 505}


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [p for p in out if p]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(st.one_of(st.sampled_from(REQUESTS), st.binary(max_size=60)), min_size=1, max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), redirect=st.booleans())
def test_any_bytes_any_split(loop: asyncio.AbstractEventLoop, reqs: list[bytes], cuts: list[int], redirect: bool) -> None:
    data = b"".join(reqs)
    whole, got_whole = run(loop, [data], redirect=redirect)
    split, got_split = run(loop, splits(data, cuts), redirect=redirect)
    assert got_whole == got_split  # segmentation never changes what a request means
    for t, got in ((whole, got_whole), (split, got_split)):
        assert set(got) <= OK_STATUSES | ERROR_STATUSES
        errors = [i for i, s in enumerate(got) if s in ERROR_STATUSES]
        if errors:
            assert errors == [len(got) - 1]  # an error is the last thing said...
            assert t.closed or t.eof  # ...before closing
        assert t.after_close == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=st.sampled_from(REQUESTS), pos=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_one_byte_mutations(loop: asyncio.AbstractEventLoop, req: bytes, pos: int, byte: int) -> None:
    i = pos % len(req)
    data = req[:i] + bytes([byte]) + req[i + 1:]
    t, got = run(loop, [data])
    assert len(got) <= 2 and set(got) <= OK_STATUSES | ERROR_STATUSES
    assert t.after_close == 0


def test_examples(loop: asyncio.AbstractEventLoop) -> None:
    assert run(loop, [REQUESTS[0]])[1] == [404]
    assert run(loop, [REQUESTS[4]])[1] == [503]  # a route whose only server is down
    t, _ = run(loop, [b"HEAD / HTTP/1.1\r\nHost: a.test\r\n\r\n"])
    assert t.out.startswith(b"HTTP/1.1 404 ") and t.out.endswith(b"\r\n\r\n")  # no body after a HEAD
    assert run(loop, [REQUESTS[0] * 3])[1] == [404, 404, 404]
    t, got = run(loop, [REQUESTS[6]])
    assert got == [400] and t.closed
    assert run(loop, [REQUESTS[9]])[1] == [431]
    assert run(loop, [b"GET / HTTP/1.1\r\nHost: down.test\r\n\r\n"], redirect=True)[1] == [301]
    assert run(loop, [b"POST / HTTP/1.1\r\nHost: down.test\r\nContent-Length: 0\r\n\r\n"], redirect=True)[1] == [308]
