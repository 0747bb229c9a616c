"""edgeward's own child processes (workers, the config checker), started with SIGHUP and SIGUSR1
blocked until they can take them.

SIGHUP (reload) and SIGUSR1 (reopen logs) end a process by default, and a Python process can
ignore or handle them only once its interpreter has started (~50 ms) and its first line runs.
`pkill -HUP edgeward` (or logrotate's `-USR1`) reaches every edgeward process, children too: one
landing in a worker or checker that was just starting killed it (a start failed, a reload was
rejected). So a child starts with both signals blocked (the signal mask survives exec):
pending, not acted on; a worker unblocks them once it ignores them (`daemon`), the checker never
needs them.

asyncio's subprocesses cannot do this under uvloop: libuv resets every signal's disposition and
the signal mask in the child before exec. `subprocess.Popen` keeps the parent's mask, so the
parent blocks the two signals in its own thread around the fork (a signal arriving then waits,
pending, until the mask is restored a moment later: none is lost); `close_fds` and `pass_fds`
work as usual. The event loop learns of the exit from a pidfd (Linux 5.3+), or else from a
thread waiting on that one pid; nothing else is reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from typing import Any

BLOCKED = (signal.SIGHUP, signal.SIGUSR1)


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(argv, **kwargs)` with `BLOCKED` blocked in the child from its first
    instruction."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    try:
        return subprocess.Popen(argv, **kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class ChildProcess:
    """A child started by `spawn`: what the master needs of asyncio's Process (pid, returncode,
    send_signal/kill/terminate, wait)."""

    def __init__(self, proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._proc = proc
        self._loop = loop
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = -1
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except OSError:  # a kernel before 5.3, or a seccomp policy: a thread waits instead
            loop.run_in_executor(None, proc.wait).add_done_callback(lambda _f: self._reap())
        else:
            loop.add_reader(self._pidfd, self._reap)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def _reap(self) -> None:
        if self._proc.poll() is None:
            return  # (a spurious wake-up)
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if not self._exited.done():
            self._exited.set_result(self._proc.returncode)  # type: ignore[arg-type]

    def send_signal(self, sig: int) -> None:
        """Signal the child unless it has been reaped (its pid may be someone else's by then):
        ProcessLookupError once its exit is known, like asyncio's Process; nothing when it has
        just exited (Popen reaps it first and sends nothing)."""
        if self._proc.returncode is not None:
            raise ProcessLookupError(self.pid)
        self._proc.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        """Its exit status as asyncio gives it: the code, or minus the signal that ended it."""
        return await asyncio.shield(self._exited)

    def __del__(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._pidfd)
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = -1


def spawn(argv: list[str], loop: asyncio.AbstractEventLoop, **kwargs: Any) -> ChildProcess:
    """Start `argv` (Popen's keyword arguments) with `BLOCKED` blocked in it; OSError if it cannot."""
    return ChildProcess(popen(argv, **kwargs), loop)
