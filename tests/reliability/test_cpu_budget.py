"""CPU budgets under adversarial input: what one bad connection costs the edge, against a good one.

For each class of bad input a few hundred clients (two thousand for the silent
ones) run against a sniffing listener; the edge's own CPU time (its threads'
time on CPU from /proc/PID/task/*/schedstat, i.e. utime+stime at nanosecond
resolution; not wall time) over the class, divided by the number of
connections, is compared with the cost of a good connection (SNI-routed TLS
hello relayed to an echo upstream and back). The table is printed (pytest -s).

Asserted, with generous bounds, only for the classes where the edge must wait
for a client (silence, half-close, trickle, a PROXY header announcing more than
it sends, connects that send nothing): a regression to busy-looping on such a
socket costs about one CPU-second per second of waiting, far past the bounds.
The other classes are decided at once from the bytes at hand; their cost is
printed for the record.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from badinput import HELLO, SNIFF_TIMEOUT, TRUSTED, classes, silent
from harness import Script, counters, diff, drive, measured, raise_nofile

from support import (
    EdgeProcess,
    ThreadServer,
    echo_handler,
    fds_besides_pipe_pool,
    free_port,
    settles_to,
)

N = 300
SILENT_N = 2000

# A spin regression costs ~1 CPU-s per second of waiting; these bounds are far above
# normal costs (measured: tens to a few hundred microseconds per connection).
PER_CONN_FLOOR = 0.002  # s of edge CPU per bad connection, whatever a good one costs
PER_CONN_TIMES_GOOD = 10
MAX_BUSY = 0.5  # edge CPU / wall time over a waiting class


@pytest.fixture
def edge(tmp_path: Path):  # type: ignore[no-untyped-def]
    raise_nofile()
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    e = EdgeProcess(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
max_connections_per_client = 0
[listeners.front]
bind = ["127.0.0.1:{port}"]
sniff_timeout = "{SNIFF_TIMEOUT}s"
trusted_proxies = ["{TRUSTED}/32"]
[services.a]
listen = ["front"]
names = ["a.example.org"]
to = "127.0.0.1:{up.port}"
""", admin_port=admin, wait=[("127.0.0.1", port)])
    try:
        yield e, port
    finally:
        e.stop()
        up.close()


def test_cpu_per_bad_connection_is_bounded(edge) -> None:  # type: ignore[no-untyped-def]
    e, port = edge
    rng = random.Random(13)
    # Warm up (first connections import and allocate), then the reference: good connections.
    drive(port, [Script([(0.0, HELLO)], expect=len(HELLO)) for _ in range(50)], deadline=5)
    time.sleep(0.3)
    base_fds = fds_besides_pipe_pool(e)
    good_n = N
    with measured(e.pid) as m:
        res = drive(port, [Script([(0.0, HELLO)], expect=len(HELLO)) for _ in range(good_n)],
                    deadline=5, concurrency=50)
        time.sleep(0.2)  # let the edge finish closing its side
    assert res.served == good_n, res
    good = m["cpu"] / good_n
    rows = [("good: SNI-routed hello, echoed", good_n, m["cpu"], m["wall"], good, 1.0, "", "")]
    failures = []
    for name, (make, waits) in classes(SNIFF_TIMEOUT).items():
        n = SILENT_N if make is silent else N
        before = e.status()
        with measured(e.pid) as m:
            res = drive(port, [make(rng) for _ in range(n)], deadline=SNIFF_TIMEOUT + 5,
                        concurrency=min(n, 1000))
            time.sleep(0.2)
        after = e.status()
        per = m["cpu"] / n
        reasons = diff(counters(after, "refused"), counters(before, "refused"))
        why = ", ".join(f"{k[-1]}={v}" for k, v in sorted(reasons.items()))
        rows.append((name, n, m["cpu"], m["wall"], per, per / good, why, "asserted" if waits else ""))
        # Every bad client was closed by the edge, none outlived the sniff timeout by much.
        assert res.closed_by_edge == n, (name, res.closed_by_edge, res.timed_out)
        assert max(res.lifetimes) < SNIFF_TIMEOUT + 1.5, (name, max(res.lifetimes))
        assert sum(reasons.values()) >= n * 0.95, (name, reasons)
        if waits:
            bound = max(PER_CONN_FLOOR, PER_CONN_TIMES_GOOD * good)
            if per > bound:
                failures.append(f"{name}: {per * 1e3:.2f} ms CPU per connection > {bound * 1e3:.2f} ms")
            if m["cpu"] / m["wall"] > MAX_BUSY:
                failures.append(f"{name}: edge busy {m['cpu'] / m['wall']:.0%} of the wall time")
    print()
    print(f"{'class':34} {'conns':>6} {'CPU s':>7} {'wall s':>7} {'CPU/conn':>10} {'x good':>7}  refusals")
    for name, n, cpu, wall, per, ratio, why, note in rows:
        print(f"{name:34} {n:>6} {cpu:>7.3f} {wall:>7.2f} {per * 1e6:>8.0f}µs {ratio:>7.1f}  {why} {note}")
    assert not failures, failures
    assert e.proc.poll() is None
    assert e.status()["connections"] == 0
    # Descriptors back where they were (pipes pooled for splice() not counted).
    assert settles_to(e, base_fds) == base_fds
