"""Filter matching in a separate process, with a deadline per batch.

Python's `re` holds the GIL for the whole of a match, so a user failregex
with catastrophic backtracking (``^(a+)+$`` on a long line of a's) running on
a thread of the edge still freezes the event loop, and with it the data
plane.  `ProcessMatcher` moves matching into one worker process per Guard:

- The worker is ``python -c ...`` started with asyncio's subprocess support
  (no fork of the edge's state, no re-import of its ``__main__``).  It builds
  each jail's `Filter` itself (guard/build.py) from the jails' (picklable)
  `JailSettings` and the filter search path, then answers batches.
- Messages are length-prefixed pickles over the worker's stdin/stdout (the
  worker points its own fd 1 at stderr, so a stray print cannot corrupt the
  stream).  Request: ``("match", jail, lines, now)``; reply: ``("ok", matches,
  stats_delta)`` where the delta is the change of `Filter.stats` for the batch.
- One batch is in flight at a time (an asyncio lock), and every exchange runs
  under ``asyncio.wait_for(..., timeout)``: the loop only awaits a pipe, it is
  never blocked.  When the deadline passes the worker is killed (SIGKILL),
  reaped, and a fresh one started; the batch is dropped and `MatchTimeout`
  raised so the Guard can count it.  A fresh worker has fresh filter state
  (multi-line buffers, last date seen), as after a restart of the edge.
- The worker dies with the edge: it asks the kernel for SIGKILL when its
  parent dies (``PR_SET_PDEATHSIG``, so even a worker stuck in a regex goes
  on ``kill -9`` of the edge) and exits on EOF of its stdin otherwise.

Cost per batch: two pipe writes, two pickles and a context switch (tens of
microseconds on a small batch), measured by bench/ban_latency.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from edgeward.config.schema import JailSettings
from edgeward.guard.types import FailMatch

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
_SPAWN_TIMEOUT = 15.0  # interpreter start + imports + filter compilation


class MatcherError(RuntimeError):
    """The worker could not be started, died, or answered nonsense."""


class MatcherClosed(MatcherError):
    """The matcher was closed (the guard is stopping)."""


class MatchTimeout(MatcherError):
    """A batch exceeded the deadline; the worker was killed and restarted."""

    def __init__(self, jail: str, lines: int, seconds: float, longest: int) -> None:
        super().__init__(
            f"jail {jail}: matching {lines} line(s) took longer than {seconds:g}s; "
            "the batch was dropped and the matcher restarted"
        )
        self.jail = jail
        self.lines = lines
        self.seconds = seconds
        self.longest = longest  # characters in the batch's longest line


@dataclass(slots=True)
class BatchResult:
    """What one batch produced: the failures, and the change of the filter's stats."""

    matches: list[FailMatch]
    stats: dict[str, int] = field(default_factory=dict)


class ProcessMatcher:
    """One worker process matching batches of lines for a set of jails.

    `start` before `match`; `close` to end the worker.  Not thread-safe: use
    from one event loop.
    """

    def __init__(
        self,
        jails: Mapping[str, JailSettings],
        search_path: Sequence[str],
        *,
        timeout: float = 2.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"match timeout must be positive, not {timeout!r}")
        self.timeout = timeout
        self._init = ("init", tuple(search_path), tuple(jails.items()))
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.starts = 0  # workers started (1 + restarts)
        self.timeouts = 0
        self.crashes = 0

    @property
    def pid(self) -> int | None:
        """The current worker's PID (None while none runs)."""
        p = self._proc
        return p.pid if p is not None and p.returncode is None else None

    async def start(self) -> None:
        """Start the worker and wait until its filters are compiled. Raises MatcherError."""
        async with self._lock:
            if self._proc is None:
                await self._spawn()

    async def match(self, jail: str, lines: list[str], now: float) -> BatchResult:
        """Run `jail`'s filter over `lines` in the worker.

        Raises `MatchTimeout` (batch dropped, worker restarted), `MatcherClosed`
        (stopping) or `MatcherError` (worker died or cannot start; the next
        call starts a new one).
        """
        async with self._lock:
            if self._closed:
                raise MatcherClosed("matcher closed")
            if self._proc is None or self._proc.returncode is not None:
                await self._spawn()
            proc = self._proc
            assert proc is not None
            try:
                reply = await asyncio.wait_for(
                    _exchange(proc, ("match", jail, lines, now)), self.timeout
                )
            except TimeoutError:
                self.timeouts += 1
                await self._kill()
                if not self._closed:
                    with contextlib.suppress(MatcherError):
                        await self._spawn()  # ready for the next batch
                raise MatchTimeout(
                    jail, len(lines), self.timeout, max(map(len, lines), default=0)
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError, OSError, pickle.PickleError,
                    EOFError) as exc:
                await self._kill()
                if self._closed:
                    raise MatcherClosed("matcher closed") from exc
                self.crashes += 1
                raise MatcherError(f"the matcher process died: {exc!r}") from exc
            except BaseException:  # cancelled mid-exchange: the stream is out of step
                self._kill_now()
                raise
        kind = reply[0] if isinstance(reply, tuple) and reply else None
        if kind == "ok":
            return BatchResult(reply[1], reply[2])
        raise MatcherError(f"the matcher failed: {reply[1] if kind == 'error' else reply!r}")

    async def close(self) -> None:
        """Kill the worker and reap it. Idempotent; later `match` calls raise MatcherClosed."""
        self._closed = True
        self._kill_now()  # also ends an exchange in progress (it sees EOF)
        async with self._lock:
            await self._kill()

    # -- the worker's life --------------------------------------------------------------

    async def _spawn(self) -> None:
        await self._kill()
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parent.parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        code = "from edgeward.guard.matcher import worker_main; worker_main()"
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            )
        except OSError as exc:
            raise MatcherError(f"cannot start the matcher process: {exc}") from exc
        self._proc = proc
        self.starts += 1
        try:
            reply = await asyncio.wait_for(_exchange(proc, self._init), _SPAWN_TIMEOUT)
        except BaseException as exc:
            await self._kill()
            if isinstance(exc, Exception):
                raise MatcherError(f"the matcher process did not start: {exc!r}") from exc
            raise
        if not (isinstance(reply, tuple) and reply and reply[0] == "ready"):
            await self._kill()
            raise MatcherError(f"the matcher process did not start: {reply!r}")
        for name, problem in reply[1].items():
            log.error("jail %s: the matcher process cannot build the filter: %s", name, problem)
        log.debug("guard: matcher process %d ready", proc.pid)

    def _kill_now(self) -> None:
        p = self._proc
        if p is not None and p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()

    async def _kill(self) -> None:
        p, self._proc = self._proc, None
        if p is None:
            return
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        if p.stdin is not None:
            p.stdin.close()
        await p.wait()


async def _exchange(proc: asyncio.subprocess.Process, msg: Any) -> Any:
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None and stdout is not None
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    stdin.write(_HEADER.pack(len(data)) + data)
    await stdin.drain()
    (n,) = _HEADER.unpack(await stdout.readexactly(_HEADER.size))
    return pickle.loads(await stdout.readexactly(n))


# -- inside the worker -------------------------------------------------------------------


def _die_with_parent(ppid: int) -> None:
    """SIGKILL this process when the edge dies, even while a regex holds the interpreter."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != ppid:  # the parent died before the line above
        os._exit(0)


def _read(inp: BinaryIO) -> Any:
    head = inp.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    body = inp.read(n)
    if len(body) < n:
        return None
    return pickle.loads(body)


def _write(out: BinaryIO, msg: Any) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def worker_main() -> None:
    """The worker's loop: ``init`` once, then ``match`` requests until EOF."""
    ppid = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()
    _die_with_parent(ppid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C of the edge: the edge stops us
    inp = os.fdopen(0, "rb")
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a print() must not corrupt the replies
    from edgeward.guard.build import GuardError, build_filter
    from edgeward.guard.filter import Filter

    filters: dict[str, Filter] = {}
    while True:
        try:
            msg = _read(inp)
        except Exception as exc:  # a request we cannot read: answer, then the parent restarts us
            _write(out, ("error", f"bad request: {exc!r}"))
            return
        if msg is None:
            return
        kind = msg[0]
        try:
            if kind == "match":
                _, jail, lines, now = msg
                flt = filters.get(jail)
                if flt is None:
                    _write(out, ("error", f"no filter for jail {jail!r}"))
                    continue
                before = flt.stats
                found = flt.process_lines(lines, now=now if now is not None else time.time())
                after = flt.stats
                delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
                _write(out, ("ok", found, delta))
            elif kind == "init":
                _, dirs, jails = msg
                problems: dict[str, str] = {}
                for name, settings in jails:
                    try:
                        flt2 = build_filter(name, settings, tuple(dirs))
                    except GuardError as exc:
                        problems[name] = str(exc)
                        continue
                    if flt2 is not None:
                        filters[name] = flt2
                _write(out, ("ready", problems))
            else:
                _write(out, ("error", f"unknown request {kind!r}"))
        except Exception as exc:
            _write(out, ("error", repr(exc)))
