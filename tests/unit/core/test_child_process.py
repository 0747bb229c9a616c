"""child_process: edgeward's children start with SIGHUP and SIGUSR1 blocked, so that one sent
while their interpreter starts (before their first line can ignore it) does not kill them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from edgeward.child_process import BLOCKED, spawn
from support import signal_bits, signal_mask

# The edge runs on uvloop; the stdlib loop when uvloop is unavailable.
LOOPS = pytest.mark.parametrize("new_loop", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"])


def run(new_loop: Callable[[], asyncio.AbstractEventLoop], main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


@LOOPS
def test_the_child_starts_with_reload_and_reopen_blocked_and_survives_them(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        fds = len(os.listdir("/proc/self/fd"))
        child = spawn(SLEEPER, asyncio.get_running_loop())
        assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == before  # the parent's mask is as it was
        assert signal_mask(child.pid, "SigBlk") & signal_bits(*BLOCKED) == signal_bits(*BLOCKED)
        # Sent at once, while its interpreter is still starting: pending, not acted on.
        child.send_signal(signal.SIGHUP)
        child.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.5)
        assert child.returncode is None
        child.terminate()
        assert await asyncio.wait_for(child.wait(), 10) == -signal.SIGTERM
        assert child.returncode == -signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # reaped: its pid may be someone else's now
            child.kill()
        assert len(os.listdir("/proc/self/fd")) == fds  # the pidfd is closed

    run(new_loop, main)


@LOOPS
def test_wait_gives_the_exit_code_to_every_waiter(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        child = spawn([sys.executable, "-c", "raise SystemExit(3)"], asyncio.get_running_loop())
        codes = await asyncio.wait_for(asyncio.gather(child.wait(), child.wait()), 10)
        assert codes == [3, 3]
        assert await child.wait() == 3

    run(new_loop, main)


@LOOPS
def test_a_child_that_cannot_start_is_an_oserror(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        with pytest.raises(OSError):
            spawn(["/nonexistent/python"], asyncio.get_running_loop())

    run(new_loop, main)


@LOOPS
def test_a_child_that_has_just_exited_is_not_signalled_and_raises_nothing(
        new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        child = spawn([sys.executable, "-c", "pass"], asyncio.get_running_loop())
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().split()[2] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)  # (the loop does not run: its exit is not known yet)
        assert child.returncode is None
        child.send_signal(signal.SIGTERM)  # a zombie: reaped here, not signalled, no error
        assert await asyncio.wait_for(child.wait(), 10) == 0

    run(new_loop, main)
