"""What the reliability tests observe of the edge, from outside: CPU time, descriptors, RSS, counters.

The edge is a black box here: a subprocess (support.EdgeProcess) read through
/proc/PID and its admin API. Also: many scripted client connections driven by
one selector loop (each connection a small script: send these bytes at these
times, maybe half-close, then wait for the edge to close), and a resource-limit
helper for load generators.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import resource
import selectors
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds (clock-tick resolution: 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_ns(pid: int) -> int:
    """Time on CPU of every live thread of a process, in nanoseconds (the scheduler's own account,
    /proc/PID/task/*/schedstat): the same quantity as utime+stime at a resolution fine enough for
    a few hundred cheap connections."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_nofile(want: int = 20000) -> int:
    """Raise this process' open-files soft limit towards `want` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def counters(status: dict[str, object], first: str) -> dict[tuple[str, ...], int]:
    """Counters of the edge's /status whose key starts with `first` ("refused", "protocol_errors", ...)."""
    out: dict[tuple[str, ...], int] = {}
    for c in status["counters"]:  # type: ignore[attr-defined]
        key = tuple(c["key"])
        if key[0] == first:
            out[key[1:]] = int(c["value"])
    return out


def diff(after: dict[tuple[str, ...], int], before: dict[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


# ---------------------------------------------------------------------- scripted clients
@dataclass(slots=True)
class Script:
    """What one client does: (delay from connect, bytes) sends, then maybe FIN, then wait for the edge."""

    sends: list[tuple[float, bytes]] = field(default_factory=list)
    fin_at: float | None = None  # seconds after connect; None: never half-close
    src: str = "127.0.0.1"
    read_all: bool = True  # read (and drop) whatever the edge relays back
    expect: int = 0  # bytes of reply that mean "served" (good connections)


@dataclass(slots=True)
class Outcome:
    closed_by_edge: int = 0  # EOF or RST seen before the deadline
    resets: int = 0
    served: int = 0  # got `expect` bytes back
    timed_out: int = 0  # still open at the deadline (closed by us)
    connect_errors: int = 0
    lifetimes: list[float] = field(default_factory=list)  # connect → closed by the edge


class _Conn:
    __slots__ = ("got", "i", "script", "sock", "t0")

    def __init__(self, sock: socket.socket, script: Script, t0: float) -> None:
        self.sock = sock
        self.script = script
        self.t0 = t0
        self.i = 0
        self.got = 0


def drive(port: int, scripts: list[Script], *, deadline: float, concurrency: int = 500,
          host: str = "127.0.0.1", close_when_served: bool = True, rate: float | None = None) -> Outcome:
    """Run every script against host:port, at most `concurrency` at once and (with `rate`) at most
    `rate` new connections a second; each ends when the edge closes it (or it is served) or
    `deadline` seconds after its connect."""
    out = Outcome()
    sel = selectors.DefaultSelector()
    timers: list[tuple[float, int, _Conn, str]] = []
    seq = 0
    live: set[_Conn] = set()
    todo = list(reversed(scripts))
    buf = bytearray(65536)
    t_start = time.monotonic()
    started = 0

    def finish(c: _Conn, how: str) -> None:
        live.discard(c)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(c.sock)
        if how in ("eof", "reset"):
            out.closed_by_edge += 1
            out.lifetimes.append(time.monotonic() - c.t0)
            if how == "reset":
                out.resets += 1
        elif how == "timeout":
            out.timed_out += 1
        c.sock.close()

    def schedule(at: float, c: _Conn, what: str) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(timers, (at, seq, c, what))

    while todo or live:
        while todo and len(live) < concurrency and (rate is None or started < (time.monotonic() - t_start) * rate):
            sc = todo.pop()
            started += 1
            s = socket.socket()
            try:
                s.bind((sc.src, 0))
                s.settimeout(3)
                s.connect((host, port))
            except OSError:
                out.connect_errors += 1
                s.close()
                continue
            s.setblocking(False)
            c = _Conn(s, sc, time.monotonic())
            live.add(c)
            sel.register(s, selectors.EVENT_READ, c)
            for k, (delay, _data) in enumerate(sc.sends):
                schedule(c.t0 + delay, c, f"send{k}")
            if sc.fin_at is not None:
                schedule(c.t0 + sc.fin_at, c, "fin")
            schedule(c.t0 + deadline, c, "deadline")
        now = time.monotonic()
        wait = 0.05 if not timers else max(0.0, min(0.05, timers[0][0] - now))
        if rate is not None and todo:
            wait = min(wait, 0.005)
        for key, _ in sel.select(wait):
            c = key.data
            try:
                n = c.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                finish(c, "reset")
                continue
            except OSError:
                finish(c, "reset")
                continue
            if n == 0:
                finish(c, "eof")
                continue
            c.got += n
            if c.script.expect and c.got >= c.script.expect:
                out.served += 1
                if close_when_served:
                    finish(c, "served")
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, c, what = heapq.heappop(timers)
            if c not in live:
                continue
            if what == "deadline":
                finish(c, "timeout")
            elif what == "fin":
                with contextlib.suppress(OSError):
                    c.sock.shutdown(socket.SHUT_WR)
            else:
                data = c.script.sends[int(what[4:])][1]
                try:
                    c.sock.send(data)
                except BlockingIOError:
                    pass  # the edge stopped reading: fine for a bad client
                except OSError as e:
                    if e.errno in (errno.EPIPE, errno.ECONNRESET):
                        finish(c, "reset")
    sel.close()
    return out


@contextlib.contextmanager
def measured(pid: int) -> Iterator[dict[str, float]]:
    """CPU seconds and wall seconds spent by `pid` inside the block."""
    res: dict[str, float] = {}
    c0, t0 = cpu_ns(pid), time.monotonic()
    yield res
    res["cpu"] = (cpu_ns(pid) - c0) / 1e9
    res["wall"] = time.monotonic() - t0
