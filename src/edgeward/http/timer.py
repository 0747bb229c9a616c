"""One timeout per connection, cheap to keep alive on a busy connection.

`touch()` only stores the time. When a timer fires it re-arms itself if its deadline moved since
(activity on an idle timer, or a restart with a later deadline), so a busy connection costs no
timer cancel/reschedule per read or per request: the event loop's timer is rescheduled only when
a deadline moves earlier. Absolute timers (header, keep-alive) ignore touches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Timer:
    __slots__ = ("_callback", "_handle", "_loop", "_when", "idle", "kind", "last", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[str], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0  # when the armed handle fires
        self.kind = ""  # what is being waited for; "" = not running
        self.timeout = 0.0
        self.idle = False
        self.last = 0.0

    def start(self, kind: str, timeout: float, *, idle: bool) -> None:
        self.kind = kind
        self.timeout = timeout
        self.idle = idle
        now = self._loop.time()
        self.last = now
        due = now + timeout
        if self._handle is not None:
            if self._when <= due:
                return  # fires earlier than needed and re-checks then
            self._handle.cancel()
        self._when = due
        self._handle = self._loop.call_at(due, self._fire)

    def touch(self) -> None:
        if self.idle:
            self.last = self._loop.time()

    def stop(self) -> None:
        """Not waiting any more; an armed handle fires once, idle, unless a start() reuses it."""
        self.kind = ""

    def cancel(self) -> None:
        """For a closed connection: nothing may keep it alive."""
        self.kind = ""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        kind = self.kind
        if not kind:
            return
        due = self.last + self.timeout
        if due > self._loop.time() + 0.001:
            self._when = due
            self._handle = self._loop.call_at(due, self._fire)
            return
        self.kind = ""
        self._callback(kind)
