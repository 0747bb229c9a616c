"""The HTTP layer's writes go out at the end of the loop's turn (http/outbox.py): one send per
connection per turn, in order, sent before a close, dropped by an abort."""

from __future__ import annotations

import asyncio

from edgeward.config.schema import HttpSettings
from edgeward.config.units import parse_target
from edgeward.http.outbox import JOIN_LIMIT, Outbox, Sender
from edgeward.http.proxy import HttpProxy
from edgeward.http.routes import HttpRoutes, HttpUpstream
from edgeward.http.upstream import UpstreamConnection
from edgeward.upstream.pool import Pool, Server


class CountingTransport:
    def __init__(self, log: list[tuple[str, bytes]], name: str) -> None:
        self.log = log
        self.name = name
        self.writes = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes += 1
        self.log.append((self.name, bytes(data)))

    def writelines(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def close(self) -> None:
        self.closed = True
        self.log.append((self.name, b"<close>"))

    abort = close


def sender(outbox: Outbox, log: list[tuple[str, bytes]], name: str) -> tuple[Sender, CountingTransport]:
    s = Sender(outbox)
    t = CountingTransport(log, name)
    s.transport = t  # type: ignore[assignment]
    return s, t


async def test_writes_of_one_turn_go_out_together_at_its_end() -> None:
    log: list[tuple[str, bytes]] = []
    box = Outbox()
    a, ta = sender(box, log, "a")
    b, tb = sender(box, log, "b")
    a.write(b"HTTP/1.1 200 OK\r\n\r\n")
    b.write(b"GET / HTTP/1.1\r\n\r\n")
    a.write_parts((b"5\r\n", b"hello", b"\r\n"))
    assert log == []  # nothing sent during the turn
    await asyncio.sleep(0)
    assert log == [("a", b"HTTP/1.1 200 OK\r\n\r\n5\r\nhello\r\n"), ("b", b"GET / HTTP/1.1\r\n\r\n")]
    assert ta.writes == 1 and tb.writes == 1
    a.write(b"next")  # a later turn is scheduled again
    await asyncio.sleep(0)
    assert log[-1] == ("a", b"next")


async def test_large_pieces_are_not_copied_into_one() -> None:
    log: list[tuple[str, bytes]] = []
    a, ta = sender(Outbox(), log, "a")
    big = b"x" * JOIN_LIMIT
    a.write(b"head")
    a.write(big)
    await asyncio.sleep(0)
    assert log == [("a", b"head" + big)] and ta.writes == 1  # writelines: one call, no join copy


async def test_a_close_sends_what_was_queued_first_and_an_abort_drops_it() -> None:
    routes = HttpRoutes()
    proxy = HttpProxy(routes, HttpSettings())
    server = Server(parse_target("http://127.0.0.1:9"))
    upstream = HttpUpstream("u", Pool("u", [server]), "http")
    log: list[tuple[str, bytes]] = []

    closing = UpstreamConnection(proxy, server, upstream)
    t = CountingTransport(log, "closing")
    closing.connection_made(t)  # type: ignore[arg-type]
    closing.write(b"last words")
    closing.close()
    closing.write(b"too late")
    await asyncio.sleep(0)
    assert log == [("closing", b"last words"), ("closing", b"<close>")]

    aborting = UpstreamConnection(proxy, server, upstream)
    t2 = CountingTransport(log, "aborting")
    aborting.connection_made(t2)  # type: ignore[arg-type]
    aborting.write(b"never")
    aborting.abort()
    await asyncio.sleep(0)
    assert t2.writes == 0 and t2.closed
