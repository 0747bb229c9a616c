"""CPU budgets under adversarial input: what one bad connection costs the edge, against a good one.

For each class of bad input a few hundred clients (two thousand for the silent
ones) run against a sniffing listener; the edge's own CPU time (utime+stime
from /proc, not wall time) over the class, divided by the number of
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
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Script, counters, diff, drive, measured, raise_nofile

from edgeward.codec.testing import build_client_hello
from support import (
    EdgeProcess,
    ThreadServer,
    echo_handler,
    fds_besides_pipe_pool,
    free_port,
    settles_to,
)

SNIFF_TIMEOUT = 2.0
HELLO = build_client_hello("a.example.org", ["h2"])
N = 300
SILENT_N = 2000
UNTRUSTED, TRUSTED = "127.0.0.1", "127.0.0.2"

# A spin regression costs ~1 CPU-s per second of waiting; these bounds are far above
# normal costs (measured: tens to a few hundred microseconds per connection).
PER_CONN_FLOOR = 0.002  # s of edge CPU per bad connection, whatever a good one costs
PER_CONN_TIMES_GOOD = 10
MAX_BUSY = 0.5  # edge CPU / wall time over a waiting class


def _random_bytes(rng: random.Random) -> Script:
    return Script([(0.0, rng.randbytes(rng.randint(1, 3000)))])


def _truncated_silence(rng: random.Random) -> Script:
    return Script([(0.0, HELLO[: rng.randint(6, len(HELLO) - 1)])])


def _truncated_fin(rng: random.Random) -> Script:
    return Script([(0.0, HELLO[: rng.randint(6, len(HELLO) - 1)])], fin_at=0.02)


def _trickle(rng: random.Random) -> Script:
    # One byte a second until the sniff timeout cuts the client off.
    return Script([(float(i), HELLO[i : i + 1]) for i in range(int(SNIFF_TIMEOUT) + 2)])


def _oversized(rng: random.Random) -> Script:
    return Script([(0.0, b"\x16\x03\x01\xff\xff\x01\xff\xff\xfb" + rng.randbytes(20000))])


_BAD_PROXY = [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 443\r\n",
    b"PROXY " + b"9" * 200 + b"\r\n",
    # v2 announcing 65535 bytes of addresses and sending 30: the edge waits for the rest
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff" + bytes(30),
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),  # shorter than an IPv4 address block
    # v2 announcing an IPv6 block (36 bytes) and sending 20: the edge waits for the rest
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" + bytes(20),
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1000",  # no CRLF yet: the edge waits for it
]


def _bad_proxy(rng: random.Random) -> Script:
    return Script([(0.0, rng.choice(_BAD_PROXY))], src=TRUSTED)


def _untrusted_proxy(rng: random.Random) -> Script:
    hdr = b"PROXY TCP4 203.0.113.9 192.0.2.2 5000 443\r\n"
    return Script([(0.0, hdr + HELLO)], src=UNTRUSTED)


def _endless_head(rng: random.Random) -> Script:
    return Script([(0.0, b"GET / HTTP/1.1\r\nHost: a.example.org\r\nX: " + b"x" * 70000)])


def _silent(rng: random.Random) -> Script:
    return Script([])


# name → (script maker, how many, waits for the client: asserted)
CLASSES: dict[str, tuple[Callable[[random.Random], Script], int, bool]] = {
    "random bytes": (_random_bytes, N, False),
    "truncated hello, then silence": (_truncated_silence, N, True),
    "truncated hello, then FIN": (_truncated_fin, N, True),
    "trickle, 1 byte/s": (_trickle, N, True),
    "oversized hello (20 KB record)": (_oversized, N, False),
    "bad PROXY lengths (trusted)": (_bad_proxy, N, True),
    "PROXY from an untrusted source": (_untrusted_proxy, N, False),
    "endless HTTP head (70 KB)": (_endless_head, N, False),
    "connects that send nothing": (_silent, SILENT_N, True),
}


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
    for name, (make, n, waits) in CLASSES.items():
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
