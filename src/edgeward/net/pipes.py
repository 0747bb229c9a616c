"""A pool of kernel pipes for splice().

splice() moves bytes socket → pipe → socket without copying them into Python.
A pipe is only needed while bytes are in flight, so a flow takes one from the
pool when data arrives and gives it back as soon as it is empty: an idle
connection holds no pipe (two descriptors saved per idle connection).
"""

from __future__ import annotations

import fcntl
import os
from typing import Final

F_SETPIPE_SZ: Final[int] = getattr(fcntl, "F_SETPIPE_SZ", 1031)
HAS_SPLICE: Final[bool] = hasattr(os, "splice")
SPLICE_FLAGS: Final[int] = (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2))


class PipePool:
    __slots__ = ("capacity", "created", "free", "keep")

    def __init__(self, capacity: int = 256 * 1024, keep: int = 128) -> None:
        self.capacity = capacity
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.created = 0

    def get(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # A bigger pipe moves more per splice() call, so fewer Python round trips per MB.
            fcntl.fcntl(w, F_SETPIPE_SZ, self.capacity)
        except OSError:
            pass  # over pipe-user-pages-soft: the default 64 KiB pipe still works
        self.created += 1
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        """Give back an empty pipe."""
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes (it cannot be reused)."""
        os.close(pipe[0])
        os.close(pipe[1])
        self.created -= 1

    def close(self) -> None:
        while self.free:
            self.discard(self.free.pop())
