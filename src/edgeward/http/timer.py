"""Timeouts of many connections on few event-loop timers, cheap to keep alive on a busy connection.

A `Timer` (one per connection and direction) does not own an event-loop timer: its deadline sits in
a `TimerWheel` bucket of `RESOLUTION` seconds (a set entry), and the wheel arms one loop timer per
bucket that holds deadlines. 9,000 idle keep-alive connections then cost 9,000 set entries and
about one loop timer per bucket their deadlines fall in, instead of 9,000 loop timers (each a
TimerHandle, a libuv timer and a context: about 600 bytes) and a call_at per connection.
Deadlines are rounded up to the next bucket: a timeout fires at most RESOLUTION late, never early.

`touch()` only stores the time. When a timer fires it re-arms itself if its deadline moved since
(activity on an idle timer, or a restart with a later deadline), so a busy connection costs no
timer cancel/reschedule per read or per request: a timer is moved to another bucket only when its
deadline moves earlier. Absolute timers (header, keep-alive) ignore touches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

RESOLUTION = 0.1  # seconds per bucket


class TimerWheel:
    """The buckets of one event loop's timers (one wheel per HttpProxy)."""

    __slots__ = ("_buckets", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._buckets: dict[int, set[Timer[Any]]] = {}

    def add(self, timer: Timer[Any], due: float) -> int:
        """File `timer` under the bucket that ends at or after `due`; returns that bucket."""
        x = due / RESOLUTION
        tick = int(x)  # ceil of a positive time, compiled to native arithmetic (math.ceil is a Python call)
        if tick < x:
            tick += 1
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            self.loop.call_at(tick * RESOLUTION, self._fire, tick)
        bucket.add(timer)
        return tick

    def remove(self, timer: Timer[Any], tick: int) -> None:
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.discard(timer)  # an empty bucket stays until its loop timer fires: no cancel per timer

    def _fire(self, tick: int) -> None:
        bucket = self._buckets.pop(tick, None)
        if bucket:
            for timer in bucket:
                timer.expired()

    def __len__(self) -> int:
        """Armed timers (for tests and status)."""
        return sum(len(b) for b in self._buckets.values())


class Timer(Generic[T]):
    """One deadline of `owner`: `callback(owner, kind)` when it passes. The callback is the class's
    function, not a bound method (which would be one more object per connection)."""

    __slots__ = ("_callback", "_owner", "_tick", "_wheel", "idle", "kind", "last", "timeout")

    def __init__(self, wheel: TimerWheel, owner: T, callback: Callable[[T, str], None]) -> None:
        self._wheel = wheel
        self._owner: T | None = owner  # None once cancelled: a connection and its timer form no cycle
        self._callback = callback
        self._tick = 0  # the wheel bucket it is filed under; 0 = none
        self.kind = ""  # what is being waited for; "" = not running
        self.timeout = 0.0
        self.idle = False
        self.last = 0.0

    def start(self, kind: str, timeout: float, *, idle: bool) -> None:
        self.kind = kind
        self.timeout = timeout
        self.idle = idle
        wheel = self._wheel
        now = self.last = wheel.loop.time()
        tick = self._tick
        if tick:
            if tick * RESOLUTION <= now + timeout:
                return  # fires earlier than needed and re-checks then
            wheel.remove(self, tick)
        self._tick = wheel.add(self, now + timeout)

    def touch(self) -> None:
        if self.idle:
            self.last = self._wheel.loop.time()

    def stop(self) -> None:
        """Not waiting any more; a filed timer fires once, idle, unless a start() reuses it."""
        self.kind = ""

    def cancel(self) -> None:
        """For a closed connection: nothing may keep it alive (the wheel lets go of it now), and it
        never fires again. The owner is let go of too, so that the connection is freed when its
        last reference goes, without waiting for the cycle collector."""
        self.kind = ""
        self._owner = None
        if self._tick:
            self._wheel.remove(self, self._tick)
            self._tick = 0

    def expired(self) -> None:
        """Its bucket's time came (called by the wheel)."""
        self._tick = 0
        kind = self.kind
        if not kind:
            return
        wheel = self._wheel
        due = self.last + self.timeout
        if due > wheel.loop.time() + 0.001:
            self._tick = wheel.add(self, due)
            return
        self.kind = ""
        owner = self._owner
        if owner is not None:
            self._callback(owner, kind)
