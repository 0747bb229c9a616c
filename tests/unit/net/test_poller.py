"""The data plane's epoll (net/poller.py): events reach the handler of their descriptor, a socket
closed while a batch is dispatched is closed after it (so its number cannot be reused by a socket
made in the same batch), and close() takes a socket out of the set without an EPOLL_CTL_DEL."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from edgeward.net.poller import IN, OUT, Deadlines, Handler, Poller


class Recorder(Handler):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_event(self, fd: int, events: int) -> None:
        self.seen.append((fd, events))


def _run(coro_fn: object) -> None:
    uvloop.run(coro_fn())  # type: ignore[operator]


def test_events_reach_their_handler_level_triggered() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        p = Poller(loop)
        a, b = socket.socketpair()
        a.setblocking(False)
        rec = Recorder()
        try:
            p.add(a.fileno(), IN, rec)
            b.send(b"x")
            for _ in range(3):  # unread: reported on every round
                await asyncio.sleep(0.01)
            assert len(rec.seen) >= 2 and all(fd == a.fileno() and ev & IN for fd, ev in rec.seen)
            a.recv(1)
            rec.seen.clear()
            await asyncio.sleep(0.02)
            assert rec.seen == []
            p.modify(a.fileno(), IN | OUT)
            await asyncio.sleep(0.01)
            assert rec.seen and rec.seen[0][1] & OUT
        finally:
            p.shutdown()
            a.close()
            b.close()

    _run(main)


def test_close_during_a_batch_is_deferred_and_later_events_are_dropped() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        p = Poller(loop)
        pairs = [socket.socketpair() for _ in range(2)]
        socks = [x for x, _ in pairs]
        fds = [s.fileno() for s in socks]
        closed_in_batch: list[int] = []
        reused: list[int] = []

        class Closer(Handler):
            def on_event(self, fd: int, events: int) -> None:
                # The first socket reported closes both; a socket made now must not take either number.
                for s in socks:
                    p.close(s)
                closed_in_batch.extend(s.fileno() for s in socks)  # still open until the batch ends
                fresh = socket.socket()
                reused.append(fresh.fileno())
                fresh.close()

        try:
            closer = Closer()
            for s in socks:
                s.setblocking(False)
                p.add(s.fileno(), IN, closer)
            for _, peer in pairs:
                peer.send(b"x")
            await asyncio.sleep(0.05)
            assert closed_in_batch == fds  # one call only: the second socket's event was dropped
            assert reused[0] not in fds
            assert all(s.fileno() == -1 for s in socks)  # closed once the batch was done
            assert p.handlers == {}
        finally:
            p.shutdown()
            for x, y in pairs:
                x.close()
                y.close()

    _run(main)


def test_remove_takes_a_shared_socket_out() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        p = Poller(loop)
        a, b = socket.socketpair()
        dup = a.dup()  # another holder of the same open file: close(a) alone would leave it watched
        rec = Recorder()
        try:
            p.add(a.fileno(), IN, rec)
            p.remove(a.fileno())
            b.send(b"x")
            await asyncio.sleep(0.02)
            assert rec.seen == []
        finally:
            p.shutdown()
            for s in (a, b, dup):
                s.close()

    _run(main)


def test_deadlines_fire_once_unless_dropped_and_not_early() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = Deadlines(loop)
        fired: list[tuple[str, float]] = []

        class Waiter(Handler):
            def __init__(self, name: str) -> None:
                self.name = name

            def on_deadline(self) -> None:
                fired.append((self.name, loop.time()))

        kept, dropped = Waiter("kept"), Waiter("dropped")
        at = loop.time() + 0.15
        d.add(kept, at)
        d.drop(dropped, d.add(dropped, at))
        await asyncio.sleep(0.4)
        assert [n for n, _ in fired] == ["kept"]
        assert at <= fired[0][1] < at + 0.2  # never early; late by at most a bucket (and loop latency)
        assert d.buckets == {}

    _run(main)
