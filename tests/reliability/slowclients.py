"""Slowloris clients, as a process of their own: N clients each trickle a TLS hello one byte a second.

    python slowclients.py PORT N SNIFF_TIMEOUT

Prints STARTED, then (when the edge has cut every client, or the deadline passed) one JSON line:
how many the edge closed, how many were still open at the deadline, and their lifetimes.
"""

from __future__ import annotations

import json
import sys

from badinput import HELLO
from harness import Script, drive, percentile, raise_nofile


def main() -> int:
    port, n, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    raise_nofile()
    sends = [(float(i), HELLO[i : i + 1]) for i in range(int(timeout) + 3)]
    print("STARTED", flush=True)
    res = drive(port, [Script(list(sends)) for _ in range(n)], deadline=timeout + 10, concurrency=n)
    life = res.lifetimes
    print(json.dumps({
        "closed_by_edge": res.closed_by_edge, "timed_out": res.timed_out, "connect_errors": res.connect_errors,
        "lifetime": {"min": round(min(life, default=0), 3), "p50": round(percentile(life, 50), 3),
                     "p99": round(percentile(life, 99), 3), "max": round(max(life, default=0), 3)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
