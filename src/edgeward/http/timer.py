"""One timeout per connection, cheap to keep alive on a busy connection.

`touch()` only stores the time. When an idle timer fires it re-arms itself if there was activity
since, so a connection moving bytes costs no timer cancel/reschedule per read. Absolute timers
(header and keep-alive timeouts) ignore touches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Timer:
    __slots__ = ("_callback", "_handle", "_loop", "idle", "kind", "last", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[str], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
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
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(now + timeout, self._fire)

    def touch(self) -> None:
        self.last = self._loop.time()

    def stop(self) -> None:
        self.kind = ""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        kind = self.kind
        if not kind:
            return
        if self.idle:
            due = self.last + self.timeout
            if due > self._loop.time() + 0.001:
                self._handle = self._loop.call_at(due, self._fire)
                return
        self.kind = ""
        self._callback(kind)
