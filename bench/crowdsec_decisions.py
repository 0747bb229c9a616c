"""CrowdSec decisions at the edge: from `cscli decisions add` to the edge refusing that address (and
from `cscli decisions delete` to serving it again), and the start of an edge with a large list.

Starts Debian's crowdsec LAPI (`crowdsec -no-cs`, its own config and SQLite data in a temp
directory: tests/crowdsec_peer.py) and `edgeward run` as its bouncer, then:
  - N rounds, each at a random phase of the poll: add a decision for a loopback address, probe
    through the edge from it until refused; delete it, probe until served;
  - K decisions imported (`cscli decisions import`), a fresh edge started: time until it accepts,
    decisions in force, RSS, the time of GET /bans.
Prints the figures and a JSON line at the end.

    python bench/crowdsec_decisions.py [--rounds 20] [--interval 1] [--decisions 20000]

Everything runs on 127.0.0.0/8 high ports, is bounded in count and time, and every process
started is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from crowdsec_peer import lapi
from support import EdgeProcess, ThreadServer, echo_handler, free_port, served, wait_until


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def edge_config(port: int, up: int, url: str, key: str, interval: float) -> str:
    return f"""
[services.app]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up}"

[guard.crowdsec]
lapi_url = "{url}"
api_key = "{key}"
update_frequency = "{int(interval * 1000)}ms"
timeout = "10s"
"""


def summary(xs: list[float]) -> dict[str, float]:
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--interval", type=float, default=1.0, help="update_frequency, seconds")
    ap.add_argument("--decisions", type=int, default=20000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgeward-crowdsec-bench-"))
    up = ThreadServer(echo_handler())
    out: dict[str, object] = {"case": "crowdsec_decisions", "interval": args.interval}
    try:
        with lapi(tmp / "lapi") as server:
            key = server.add_bouncer("edge")
            port = free_port()
            (tmp / "a").mkdir()
            edge = EdgeProcess(tmp / "a", edge_config(port, up.port, server.url, key, args.interval),
                               wait=[("127.0.0.1", port)])
            try:
                add, lift = [], []
                bound = 3 * args.interval + 5
                for i in range(args.rounds):
                    ip = f"127.0.6.{i % 250 + 1}"
                    time.sleep(random.uniform(0, args.interval))
                    t0 = time.monotonic()
                    server.cscli("decisions", "add", "--ip", ip, "--duration", "1h")
                    if not wait_until(lambda ip=ip: not served(ip, port), bound):
                        raise SystemExit(f"{ip} not refused within {bound}s")
                    add.append(time.monotonic() - t0)
                    time.sleep(random.uniform(0, args.interval))
                    t0 = time.monotonic()
                    server.cscli("decisions", "delete", "--ip", ip)
                    if not wait_until(lambda ip=ip: served(ip, port), bound):
                        raise SystemExit(f"{ip} not served again within {bound}s")
                    lift.append(time.monotonic() - t0)
            finally:
                edge.stop()
            out["add_to_refused_s"] = summary(add)
            out["delete_to_served_s"] = summary(lift)
            print(f"update_frequency {args.interval:g}s, {args.rounds} rounds (cscli's own run included):")
            print(f"  cscli decisions add -> refused at the edge: {out['add_to_refused_s']}")
            print(f"  cscli decisions delete -> served again:     {out['delete_to_served_s']}")

            n = args.decisions
            csv = tmp / "decisions.csv"
            with csv.open("w") as f:
                f.write("duration,scope,value,reason\n")
                for i in range(n):
                    f.write(f"1h,ip,10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255},bench/scale\n")
                f.write("1h,range,127.0.7.0/24,bench/scale\n")
            server.cscli("decisions", "import", "-i", str(csv))
            (tmp / "b").mkdir()
            t0 = time.monotonic()
            edge = EdgeProcess(tmp / "b", edge_config(port, up.port, server.url, key, args.interval),
                               wait=[("127.0.0.1", port)])
            try:
                ready = time.monotonic() - t0
                st = edge.status()["guard"]["crowdsec"]  # type: ignore[index]
                refused = not served("127.0.7.9", port)
                t1 = time.monotonic()
                edge.api("GET", "/bans")
                bans_s = time.monotonic() - t1
                out["large"] = {"decisions": st["decisions"], "ready_s": round(ready, 2), "range_refused": refused,
                                "rss_mib": round(rss_mib(edge.pid), 1), "get_bans_s": round(bans_s, 3)}
                print(f"  {n + 1} decisions at start: edge accepting after {ready:.2f}s with {st['decisions']} in "
                      f"force (range refused: {refused}), RSS {rss_mib(edge.pid):.0f} MiB, GET /bans {bans_s:.2f}s")
            finally:
                edge.stop()
    finally:
        up.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
