"""Connection timeouts on the shared wheel (http/timer.py): never early, at most one bucket late,
re-armed by activity, let go of on cancel; and an idle keep-alive client connection lets go of
its parser after RELEASE_AFTER and still serves its next request."""

from __future__ import annotations

import asyncio
import gc
import weakref

from edgeward.config.loader import validate
from edgeward.config.schema import HttpSettings
from edgeward.http import HttpProxy, HttpRoutes
from edgeward.http.exchange import RELEASE_AFTER, ClientConnection
from edgeward.http.timer import RESOLUTION, Timer, TimerWheel


class Owner:
    def __init__(self) -> None:
        self.fired: list[tuple[str, float]] = []

    def timed_out(self, kind: str) -> None:
        self.fired.append((kind, asyncio.get_running_loop().time()))


async def test_fires_after_its_timeout_never_before() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop)
    owners = [Owner() for _ in range(20)]
    t0 = loop.time()
    timers = []
    for i, o in enumerate(owners):
        t = Timer(wheel, o, Owner.timed_out)
        t.start("header", 0.05 + 0.01 * i, idle=False)
        timers.append(t)
    await asyncio.sleep(0.05 + 0.01 * 20 + 2 * RESOLUTION + 0.1)
    for i, o in enumerate(owners):
        assert len(o.fired) == 1 and o.fired[0][0] == "header"
        late = o.fired[0][1] - t0 - (0.05 + 0.01 * i)
        assert -0.002 <= late <= RESOLUTION + 0.1
    assert len(wheel) == 0


async def test_touch_extends_an_idle_timer_and_stop_silences() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop)
    busy, stopped = Owner(), Owner()
    t = Timer(wheel, busy, Owner.timed_out)
    t.start("body", 0.3, idle=True)
    s = Timer(wheel, stopped, Owner.timed_out)
    s.start("body", 0.1, idle=True)
    s.stop()
    t0 = loop.time()
    while loop.time() - t0 < 0.6:  # activity every 50 ms keeps it alive
        t.touch()
        await asyncio.sleep(0.05)
    assert busy.fired == [] and stopped.fired == []
    await asyncio.sleep(0.3 + 2 * RESOLUTION)
    assert [k for k, _ in busy.fired] == ["body"] and stopped.fired == []


async def test_earlier_restart_moves_the_deadline_and_cancel_lets_go() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop)
    o = Owner()
    t = Timer(wheel, o, Owner.timed_out)
    t.start("keepalive", 30.0, idle=False)
    t0 = loop.time()
    t.start("header", 0.1, idle=False)
    await asyncio.sleep(0.1 + 2 * RESOLUTION)
    assert [k for k, _ in o.fired] == ["header"] and o.fired[0][1] - t0 >= 0.098

    gone = Owner()
    ref = weakref.ref(gone)
    c = Timer(wheel, gone, Owner.timed_out)
    c.start("keepalive", 60.0, idle=False)
    assert len(wheel) == 1
    c.cancel()
    del gone, c
    gc.collect()
    assert ref() is None and len(wheel) == 0  # a closed connection is not kept for its timeout


class MemoryTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        for p in parts:
            self.out += p

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def test_idle_keepalive_connection_lets_go_of_its_parser() -> None:
    settings = validate(HttpSettings, {"keepalive_timeout": RELEASE_AFTER + 0.5})
    proxy = HttpProxy(HttpRoutes(), settings)
    conn = ClientConnection(proxy, HttpRoutes(), ("192.0.2.1", 1), ("127.0.0.1", 80), scheme="http",
                            redirect=False, https_port=443, via_proxy=False)
    t = MemoryTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    proxy.outbox.flush()  # what the loop does at the end of the turn (http/outbox.py)
    assert t.out.startswith(b"HTTP/1.1 404 ") and not t.closed
    assert conn.parser is not None
    await asyncio.sleep(RELEASE_AFTER + 2 * RESOLUTION)
    assert conn.parser is None and not t.closed  # idle: the parser is gone, the connection is not
    conn.data_received(b"GET /again HTTP/1.1\r\nHost: a.test\r\n\r\n")
    proxy.outbox.flush()
    assert t.out.count(b"HTTP/1.1 404 ") == 2 and not t.closed
    await asyncio.sleep(RELEASE_AFTER + 0.5 + 2 * RESOLUTION)
    assert t.closed  # then the keep-alive timeout closes it (RELEASE_AFTER + the rest)
